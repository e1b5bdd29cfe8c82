"""What a Prefect outage does to a retrain that holds its model's slot (issue 19).

Starts ``prefect server start`` on a free loopback port (its own PREFECT_HOME, SQLite), then a holder process
that takes the slot of model ``outage-demo`` with ``tuneflow.flows.retrain.model_slot`` (what ``tuneflow run``
and deployed retrains take) inside a flow, and keeps busy in Python until told to stop. Ten seconds after it
got the slot the server is killed (SIGTERM to its process group), stays down ``--outage`` seconds, and is
started again on the same port and database. Meanwhile a prober tries every 2 s to take the same slot
(without waiting): a probe that gets it means a second retrain could have started. At the end the holder is
told to stop, and the limit's occupied slots are read.

    .venv/bin/python benchmarks/slot_outage.py [--outage 90] [--after 150] [--lease-storage memory|filesystem]

Prints a timeline (seconds since the holder got the slot); results are written down in docs/how-to/schedules.md
("A Prefect outage during a retrain") and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
MODEL = "outage-demo"
STORAGES = {
    "memory": "prefect.server.concurrency.lease_storage.memory",  # Prefect 3.9's default
    "filesystem": "prefect.server.concurrency.lease_storage.filesystem",
}


def hold(stop_file: Path) -> None:
    """The holder: a flow that takes the model's slot and keeps the interpreter busy until ``stop_file`` exists."""
    from prefect import flow

    from tuneflow.flows.retrain import model_slot
    from tuneflow.runtime import configure_environment

    @flow(name="slot-outage-holder")
    def holder() -> None:
        with model_slot(MODEL):
            print("HOLDER got the slot", flush=True)
            while not stop_file.exists():  # Python bytecode all along, as a training loop runs
                sum(i * i for i in range(20000))
                time.sleep(0.05)
            print("HOLDER body done", flush=True)

    configure_environment()
    holder()
    print("HOLDER exited normally", flush=True)


def probe(api: str) -> str:
    """Try to take the slot without waiting: 'taken' (given back at once), 'held' (423) or 'down'."""
    import httpx
    from prefect.client.orchestration import SyncPrefectClient

    from tuneflow.flows.retrain import limit_name

    try:
        with SyncPrefectClient(api) as client:
            response = client.increment_concurrency_slots_with_lease([limit_name(MODEL)], 1, "concurrency", 60)
            client.release_concurrency_slots_with_lease(response.json()["lease_id"])
            return "taken"
    except httpx.HTTPStatusError as exc:
        return "held" if exc.response.status_code == 423 else f"HTTP {exc.response.status_code}"
    except httpx.HTTPError:
        return "down"


def active_slots(api: str) -> int:
    from prefect.client.orchestration import SyncPrefectClient

    from tuneflow.flows.retrain import limit_name

    with SyncPrefectClient(api) as client:
        return client.read_global_concurrency_limit_by_name(limit_name(MODEL)).active_slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outage", type=float, default=90, help="seconds the server stays down")
    ap.add_argument("--after", type=float, default=150, help="seconds to watch after the server is back")
    ap.add_argument("--lease-storage", choices=sorted(STORAGES), default="memory")
    ap.add_argument("--hold", help=argparse.SUPPRESS)  # the holder process: the stop file
    args = ap.parse_args()
    if args.hold:
        hold(Path(args.hold))
        return

    from servers import free_port, stop_group, wait_until_up

    tmp = Path(tempfile.mkdtemp(prefix="slot-outage-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": STORAGES[args.lease_storage],
        "TUNEFLOW_CACHE_DIR": str(tmp / "cache"),
    }
    server_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server_log = tmp / "server.log"

    def start_server() -> subprocess.Popen:
        with open(server_log, "a") as fh:
            proc = subprocess.Popen(server_cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_up(f"{api}/health", proc, server_log)
        return proc

    server = start_server()
    stop_file = tmp / "stop"
    holder_log = tmp / "holder.log"
    with open(holder_log, "w") as fh:
        holder = subprocess.Popen(
            [sys.executable, __file__, "--hold", str(stop_file)],
            env=env | {"PREFECT_API_URL": api},
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while "HOLDER got the slot" not in holder_log.read_text():
            assert holder.poll() is None, holder_log.read_text()[-3000:]
            time.sleep(0.2)
        t0 = time.monotonic()

        def say(what: str) -> None:
            print(f"{time.monotonic() - t0:6.1f} s  {what}", flush=True)

        say(f"holder got the slot (lease storage: {args.lease_storage}); probe: {probe(api)}")
        time.sleep(10)
        stop_group(server)
        say("server stopped")
        time.sleep(args.outage)
        server = start_server()
        say(f"server back ({args.outage:.0f} s outage requested); active slots {active_slots(api)}")
        last = None
        end = time.monotonic() + args.after
        while time.monotonic() < end:
            alive = holder.poll() is None
            state = (alive, probe(api))
            if state != last:
                say(f"holder {'running' if alive else f'exited {holder.returncode}'}; probe: {state[1]}")
                last = state
            time.sleep(2)
        stop_file.touch()
        holder.wait(timeout=60)
        say(f"holder stopped, exit code {holder.returncode}; active slots {active_slots(api)}")
        tail = [line for line in holder_log.read_text().splitlines() if "HOLDER" in line or "lease" in line.lower()]
        print("\n".join(line[:300] for line in tail[-12:]))
        print(f"logs in {tmp}")
    finally:
        stop_group(holder)
        stop_group(server)


if __name__ == "__main__":
    main()
