"""A Prefect outage while a retrain holds its model's slot, against a real ``prefect server`` on loopback.

The holder is a flow that takes the slot with ``model_slot`` (what ``tuneflow run`` and deployed retrains hold)
and keeps the interpreter busy, as training does, until the test tells it to stop. Run with ``pytest -m
integration``; every process the test starts is killed in ``finally``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import free_port, stop_group, wait_until_up

pytestmark = [pytest.mark.integration, pytest.mark.timeout(330)]

OUTAGE_S = 90
MODEL = "outage-model"
HOLDER = """
import sys, time
from pathlib import Path
from prefect import flow
from tuneflow.flows.retrain import model_slot
from tuneflow.runtime import configure_environment

stop = Path(sys.argv[1])

@flow(name="slot-holder")
def holder():
    with model_slot(sys.argv[2]):
        print("HOLDER got the slot", flush=True)
        while not stop.exists():  # Python bytecode all along, as a training loop runs
            sum(i * i for i in range(20000))
            time.sleep(0.05)
        print("HOLDER body done", flush=True)

configure_environment()
holder()
"""


def _probe(api: str, model: str) -> str:
    """Try to take the model's slot without waiting, as a second retrain would: 'taken' (and given back at
    once), 'held' (423: a run holds it) or 'down'."""
    import httpx
    from prefect.client.orchestration import SyncPrefectClient

    try:
        with SyncPrefectClient(api) as client:
            response = client.increment_concurrency_slots_with_lease([f"retrain-{model}"], 1, "concurrency", 60)
            client.release_concurrency_slots_with_lease(response.json()["lease_id"])
            return "taken"
    except httpx.HTTPStatusError as exc:
        return "held" if exc.response.status_code == 423 else f"HTTP {exc.response.status_code}"
    except httpx.HTTPError:
        return "down"


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert proc.poll() is None, f"the holder exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout_s:.0f} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


class Server:
    """``prefect server start`` on a free loopback port, with its own PREFECT_HOME; stopped and started again on
    the same port and database by ``stop`` / ``start``."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.home = tmp / "prefect-home"  # the server's SQLite database and its lease files
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        self.env |= {
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "true",
            "PREFECT_UI_ENABLED": "false",
            # leases kept on disk: a restarted server still knows who holds a slot (docs/how-to/team-mode.md)
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
            "TUNEFLOW_CACHE_DIR": str(tmp / "cache"),
        }
        self.log = tmp / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "a") as fh:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_up(f"{self.api}/health", self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)

    def holder(self, tmp: Path, model: str) -> tuple[subprocess.Popen, Path, Path]:
        """Start the holder of ``model``'s slot; returns the process, its stop file and its log."""
        stop, log = tmp / f"stop-{model}", tmp / f"holder-{model}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(stop), model],
                env=self.env | {"PREFECT_API_URL": self.api},
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc, stop, log


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("slot-outage"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_a_retrain_survives_a_90_s_prefect_outage_and_keeps_its_slot(server, tmp_path):
    holder, stop, log = server.holder(tmp_path, MODEL)
    try:
        _wait_for(log, "HOLDER got the slot", holder, 120)
        assert _probe(server.api, MODEL) == "held"
        time.sleep(5)
        server.stop()  # the outage: the server is down, its database and lease files stay
        time.sleep(OUTAGE_S)
        server.start()
        back = time.monotonic()
        # The holder renews (or takes back) its slot within seconds of the server's return, and trains on.
        _wait_for(log, "the slot is ours again", holder, 60)
        recovered_s = time.monotonic() - back
        probes = []
        for _ in range(5):  # from now on a second retrain of the model must wait
            probes.append(_probe(server.api, MODEL))
            time.sleep(1)
        assert probes == ["held"] * 5, probes
        assert holder.poll() is None, log.read_text()[-4000:]
        stop.touch()
        assert holder.wait(timeout=60) == 0, log.read_text()[-4000:]
        assert "HOLDER body done" in log.read_text()
        assert _probe(server.api, MODEL) == "taken"  # and the slot is free once the retrain ends
        print(f"slot ours again {recovered_s:.1f} s after the server answered")
        print("\n".join(line[:400] for line in log.read_text().splitlines() if "retrain slot" in line))
    finally:
        stop_group(holder)


def test_a_retrain_whose_slot_another_run_took_meanwhile_stops_and_says_why(server, tmp_path):
    """The lease lapsed (here: removed from the server's lease files, as the server's repossessor does after an
    outage) and another run took the slot before the holder could take it back: the holder must stop."""
    from prefect.client.orchestration import SyncPrefectClient

    model = "outage-model-lost"
    holder, stop, log = server.holder(tmp_path, model)
    try:
        _wait_for(log, "HOLDER got the slot", holder, 120)
        leases = [p for p in (server.home / "concurrency_leases").glob("*.json") if p.name != "expirations.json"]
        assert len(leases) == 1, leases  # the holder's (the other test's holder has released its slot)
        with SyncPrefectClient(server.api) as client:
            leases[0].unlink()
            client.release_concurrency_slots([f"retrain-{model}"], 1, 1.0)  # what revoking the lease does
            assert _probe(server.api, model) == "taken"
            client.increment_concurrency_slots_with_lease([f"retrain-{model}"], 1, "concurrency", 300)  # the other run
        assert holder.wait(timeout=60) != 0, log.read_text()[-4000:]
        text = log.read_text()
        assert "HOLDER body done" not in text
        assert "SlotLost" in text and "another run holds the slot now" in text, text[-4000:]
    finally:
        stop.touch()
        stop_group(holder)
