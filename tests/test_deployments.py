"""Schedules, data triggers and the per-model slot against a real Prefect server on loopback.

One module-wide server (``prefect server start``) and one ``tuneflow serve`` process (deployments +
watcher) for a tiny-model landing-zone config; each scenario drops files and watches flow runs through
the API. Every process the tests start is killed in ``finally``. Run with ``pytest -m integration``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import make_rows, tiny_config_dict
from servers import PrefectApi, WebhookReceiver, free_port, stop_group

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
QUIET_S = 1.0
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": str(REPO),
    }
    return env


class Stack(PrefectApi):
    """What the scenarios share: API URL, landing zone, MLflow store, the client helpers."""

    def __init__(self, api: str, landing: Path, mlflow_uri: str, log: Path, model_name: str = "tiny-clf"):
        self.api, self.landing, self.mlflow_uri, self.log = api, landing, mlflow_uri, log
        self.model_name = model_name

    def wait_runs(self, deployment: str, count: int, timeout: float, done: bool = True) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.runs(deployment)
            if len(runs) >= count and (not done or all(r.state_type.value in TERMINAL for r in runs)):
                return runs
            time.sleep(1)
        raise AssertionError(
            f"{deployment}: wanted {count} finished run(s) within {timeout:.0f} s, have "
            f"{[(r.name, r.state_type.value) for r in self.runs(deployment)]}\n"
            f"--- serve log ---\n{self.log.read_text()[-4000:]}"
        )

    def wait_run_for(self, file: str, timeout: float):
        """The finished on-new-data run whose trigger announced ``file`` (not one another scenario queued)."""
        deadline = time.monotonic() + timeout
        while True:
            runs = [
                r
                for r in self.runs("retrain/on-new-data")
                if file in [f["name"] for f in (r.parameters.get("trigger") or {}).get("files", [])]
            ]
            if runs and runs[0].state_type.value in TERMINAL:
                return runs[0]
            assert time.monotonic() < deadline, f"no finished run for {file}: {[(r.name, r.state_type) for r in runs]}"
            time.sleep(1)

    def versions(self) -> list[str]:
        from mlflow import MlflowClient

        return sorted(
            (
                str(v.version)
                for v in MlflowClient(self.mlflow_uri, self.mlflow_uri).search_model_versions(
                    f"name='{self.model_name}'"
                )
            ),
            key=int,
        )

    def log_times(self, run_id, text: str, timeout_s: float = 30) -> list:
        """Timestamps of a run's log lines containing ``text``; waits for them, since a run's logs reach
        the server in batches, sometimes after the run is already COMPLETED."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [line.timestamp for line in self.logs(run_id) if text in line.message]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(1)

    def explain(self, run) -> str:
        """The end of a run's log, for assertion messages."""
        tail = self.logs(run.id)[-8:]
        return f"run {run.name} {run.state_type.value}:\n" + "\n".join(line.message[:800] for line in tail)

    def drop(self, name: str, seed: int) -> Path:
        path = self.landing / "incoming" / name
        tmp = path.with_name(name + ".part")  # written under a name the watcher ignores, then renamed
        make_rows(30, seed=seed).to_csv(tmp, index=False)
        os.rename(tmp, path)
        return path


def _start_stack(tmp: Path, cfg: dict, landing: Path, model_name: str, extra_env: dict | None = None):
    """Start ``prefect server`` and ``tuneflow serve`` for one config; yields the Stack, kills both after."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _base_env(tmp / "prefect-home")
    server_env = env | {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_UI_ENABLED": "false"}
    server_log = open(tmp / "server.log", "w")
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=server_env,
                stdout=server_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2).read()
                break
            except OSError as exc:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    log_tail = (tmp / "server.log").read_text()[-3000:]
                    raise RuntimeError(f"prefect server did not start:\n{log_tail}") from exc
                time.sleep(0.5)

        config_path = tmp / "tiny.yaml"
        config_path.write_text(yaml.safe_dump(cfg))
        mlflow_uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
        (tmp / "mlruns").mkdir()
        serve_env = env | {
            "PREFECT_API_URL": api,
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "TUNEFLOW_CACHE_DIR": str(tmp / "cache"),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            **(extra_env or {}),
        }
        serve_log = tmp / "serve.log"
        with open(serve_log, "w") as fh:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tuneflow.cli", "serve", "--config", str(config_path)],
                    cwd=REPO,
                    env=serve_env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        st = Stack(api, landing, mlflow_uri, serve_log, model_name)
        deadline = time.monotonic() + 120
        while True:
            try:
                st.runs("retrain/on-new-data")
                if cfg.get("schedule"):
                    st.runs("retrain/scheduled")
                break
            except Exception as exc:
                if time.monotonic() > deadline or procs[1].poll() is not None:
                    raise RuntimeError(
                        f"tuneflow serve did not register its deployments:\n{serve_log.read_text()[-3000:]}"
                    ) from exc
                time.sleep(1)
        yield st
    finally:
        for p in reversed(procs):
            stop_group(p)
        server_log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("deployments")
    landing = tmp / "landing"
    (landing / "accepted").mkdir(parents=True)
    (landing / "incoming").mkdir()
    make_rows(60, seed=100).to_csv(landing / "accepted" / "seed.csv", index=False)  # what the scheduled run trains on
    cfg = tiny_config_dict(Path("unused"), tiny_model_dir)
    cfg["data"] = {"landing": str(landing), "labels": ["ham", "spam"], "eval_fraction": 0.25}
    cfg["schedule"] = {"cron": "* * * * *", "timezone": "UTC"}  # the shortest cron: fires at the next minute
    cfg["watch"] = {"quiet_seconds": QUIET_S, "poll_seconds": 0.3}
    hook = WebhookReceiver()
    for st in _start_stack(tmp, cfg, landing, "tiny-clf", {"TUNEFLOW_ALERT_WEBHOOK_URL": hook.url}):
        st.hook = hook
        yield st
    hook.server.shutdown()


def test_a_scheduled_run_fires_and_registers_a_model(stack):
    t0 = time.monotonic()
    runs = stack.wait_runs("retrain/scheduled", 1, timeout=150)
    assert [r.state_type.value for r in runs[:1]] == ["COMPLETED"], stack.explain(runs[0])
    assert runs[0].parameters["config_path"].endswith("tiny.yaml")
    assert stack.versions() == ["1"]
    with stack.client() as c:
        dep = c.read_deployment_by_name("retrain/scheduled")
        assert [s.schedule.cron for s in dep.schedules] == ["* * * * *"]  # what the UI shows
        c.pause_deployment(dep.id)  # the scenarios below count runs: no more minute-by-minute retrains
        deadline = time.monotonic() + 30
        while any(
            r.state_type.value not in TERMINAL and r.state_type.value != "SCHEDULED"
            for r in stack.runs("retrain/scheduled")
        ):
            assert time.monotonic() < deadline, "a second scheduled run kept running"
            time.sleep(1)
    print(f"scheduled run fired and finished after {time.monotonic() - t0:.0f} s")


def test_a_new_file_leads_to_exactly_one_retrain_and_a_new_version(stack):
    before, n0 = stack.versions(), len(stack.runs("retrain/on-new-data"))
    stack.drop("batch-b.csv", seed=1)
    t0 = time.monotonic()
    run = stack.wait_runs("retrain/on-new-data", n0 + 1, timeout=120)[-1]
    assert run.state_type.value == "COMPLETED", stack.explain(run)
    trigger = run.parameters["trigger"]
    assert [f["name"] for f in trigger["files"]] == ["batch-b.csv"] and len(trigger["files"][0]["sha256"]) == 64
    assert len(stack.versions()) == len(before) + 1
    assert (stack.landing / "accepted" / "batch-b.csv").exists()
    time.sleep(QUIET_S + 4)
    assert len(stack.runs("retrain/on-new-data")) == n0 + 1
    print(f"one file -> one run in {time.monotonic() - t0:.0f} s")


def test_five_files_dropped_together_lead_to_one_run(stack):
    before, n0 = stack.versions(), len(stack.runs("retrain/on-new-data"))
    for i in range(5):
        stack.drop(f"burst-{i}.csv", seed=10 + i)
    stack.wait_runs("retrain/on-new-data", n0 + 1, timeout=120)
    time.sleep(QUIET_S + 4)
    runs = stack.runs("retrain/on-new-data")
    assert len(runs) == n0 + 1 and runs[-1].state_type.value == "COMPLETED", stack.explain(runs[-1])
    assert sorted(f["name"] for f in runs[-1].parameters["trigger"]["files"]) == [f"burst-{i}.csv" for i in range(5)]
    assert len(stack.versions()) == len(before) + 1


def test_the_same_file_again_triggers_nothing(stack):
    n0 = len(stack.runs("retrain/on-new-data"))
    known = next(
        p for p in sorted((stack.landing / "accepted").glob("[!.]*")) if p.name != "seed.csv"
    )  # announced before
    copy = stack.landing / "incoming" / "same-bytes-again.csv"
    shutil.copy(known, copy)
    time.sleep(QUIET_S + 6)
    assert len(stack.runs("retrain/on-new-data")) == n0
    copy.unlink()  # a later run's gate would quarantine it as a repeat


def test_a_leftover_repeat_beside_new_batches_is_quarantined_the_new_ones_trained_and_an_alert_posted(stack):
    before, n0 = stack.versions(), len(stack.runs("retrain/on-new-data"))
    known = next(p for p in sorted((stack.landing / "accepted").glob("[!.]*")) if p.name != "seed.csv")
    shutil.copy(known, stack.landing / "incoming" / "leftover-repeat.csv")  # the same bytes: not announced
    time.sleep(QUIET_S + 4)
    assert len(stack.runs("retrain/on-new-data")) == n0
    for i in range(3):
        stack.drop(f"good-{i}.csv", seed=40 + i)
    run = stack.wait_run_for("good-0.csv", timeout=150)
    assert run.state_type.value == "COMPLETED", stack.explain(run)
    assert run.state_name == "Completed with quarantined batches"
    assert len(stack.versions()) == len(before) + 1  # the three good batches were trained on
    accepted = {p.name for p in (stack.landing / "accepted").iterdir()}
    assert {"good-0.csv", "good-1.csv", "good-2.csv"} <= accepted and "leftover-repeat.csv" not in accepted
    assert (stack.landing / "quarantine" / "leftover-repeat.csv").exists()
    alert = stack.hook.wait_for(lambda a: "leftover-repeat.csv" in a.get("body", ""), timeout=90)
    assert alert["subject"] == "tuneflow: batch(es) of tiny quarantined"
    assert "the accepted batches were trained on" in alert["body"] and alert["path"].endswith("not-for-logs")
    assert "not-for-logs" not in stack.log.read_text()  # the webhook's token is in no log
    print(f"alert received: {alert}")


def test_a_failed_retrain_posts_an_alert(stack):
    bad = stack.landing / "incoming" / "wrong-columns.csv"
    tmp = bad.with_name(bad.name + ".part")
    tmp.write_text("message,category\nhello there,ham\n")
    os.rename(tmp, bad)
    run = stack.wait_run_for("wrong-columns.csv", timeout=120)
    assert run.state_type.value == "FAILED", stack.explain(run)
    alert = stack.hook.wait_for(lambda a: a.get("subject") == "tuneflow: retrain of tiny-clf failed", timeout=90)
    assert run.name in alert["body"] and "Failed" in alert["body"]
    print(f"alert received: {alert}")
    stack.hook.wait_for(lambda a: "wrong-columns.csv" in a.get("body", ""), timeout=30)  # and the quarantine


def test_a_trigger_during_a_running_retrain_is_queued_and_runs_after_it(stack):
    n0 = len(stack.runs("retrain/on-new-data"))
    stack.drop("during-1.csv", seed=21)
    stack.wait_runs("retrain/on-new-data", n0 + 1, timeout=60, done=False)
    deadline = time.monotonic() + 60
    while stack.runs("retrain/on-new-data")[n0].state_type.value != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    stack.drop("during-2.csv", seed=22)
    runs = stack.wait_runs("retrain/on-new-data", n0 + 2, timeout=150)
    first, second = runs[n0], runs[n0 + 1]
    assert [first.state_type.value, second.state_type.value] == ["COMPLETED", "COMPLETED"], stack.explain(
        first
    ) + stack.explain(second)
    # The second run was started while the first ran, and got the model's slot only when the first finished.
    assert second.start_time < first.end_time
    # Compare with the first run's release of the slot, not its end time: a flow run ends seconds
    # after its body returns (state, logs, results), more under load.
    released = stack.log_times(first.id, "released the retrain slot")
    got_slot = stack.log_times(second.id, "got the retrain slot")
    assert released and got_slot and got_slot[0] >= released[0]
    waited = stack.log_times(second.id, "waiting for the retrain slot")
    assert waited and waited[0] < released[0]
    assert {"during-1.csv", "during-2.csv"} <= {p.name for p in (stack.landing / "accepted").iterdir()}
    print(
        f"first {first.start_time}..{first.end_time} (slot released {released[0]}), "
        f"second waited from {waited[0]}, got the slot {got_slot[0]}"
    )


@pytest.fixture(scope="module")
def sft_stack(tmp_path_factory):
    from sft_fixtures import build_tiny_llama, sft_config, sft_frame

    tmp = tmp_path_factory.mktemp("deployments-sft")
    base = build_tiny_llama(tmp / "tiny-llama")
    landing = tmp / "landing"
    (landing / "accepted").mkdir(parents=True)
    (landing / "incoming").mkdir()
    cfg = sft_config(base, Path("unused"))
    cfg["data"] = {"landing": str(landing), "eval_fraction": 0.25}
    cfg["watch"] = {"quiet_seconds": QUIET_S, "poll_seconds": 0.3}
    st = next(gen := _start_stack(tmp, cfg, landing, "tiny-sft"))
    st.sft_rows = sft_frame
    try:
        yield st
    finally:
        gen.close()


def test_an_sft_batch_in_the_landing_zone_is_retrained_through_serve(sft_stack):
    path = sft_stack.landing / "incoming" / "pairs-1.jsonl"
    tmp = path.with_name(path.name + ".part")
    sft_stack.sft_rows(48).to_json(tmp, orient="records", lines=True)
    os.rename(tmp, path)
    run = sft_stack.wait_runs("retrain/on-new-data", 1, timeout=180)[-1]
    assert run.state_type.value == "COMPLETED", sft_stack.explain(run)
    assert sft_stack.versions() == ["1"]
    assert (sft_stack.landing / "accepted" / "pairs-1.jsonl").exists()
    from mlflow import MlflowClient

    mv = MlflowClient(sft_stack.mlflow_uri, sft_stack.mlflow_uri).get_model_version("tiny-sft", "1")
    assert mv.tags["tuneflow.kind"] == "sft" and mv.tags["tuneflow.decision"] == "promoted"


@pytest.fixture(scope="module")
def decay_stack(tmp_path_factory, tiny_model_dir):
    """``monitor.retrain_when: degraded``: new batches are monitored, only decay retrains (retrain/on-decay)."""
    tmp = tmp_path_factory.mktemp("decay")
    landing = tmp / "landing"
    (landing / "incoming").mkdir(parents=True)
    cfg = tiny_config_dict(Path("unused"), tiny_model_dir)
    cfg["data"] = {"landing": str(landing), "labels": ["ham", "spam"], "eval_fraction": 0.25}
    cfg["watch"] = {"quiet_seconds": QUIET_S, "poll_seconds": 0.3}
    cfg["monitor"] = {"retrain_when": "degraded", "min_rows": 50, "max_drop": 0.1}
    hook = WebhookReceiver()
    for st in _start_stack(tmp, cfg, landing, "tiny-clf", {"TUNEFLOW_ALERT_WEBHOOK_URL": hook.url}):
        st.hook = hook
        yield st
    hook.server.shutdown()


def _drop_rows(stack, name: str, rows) -> None:
    path = stack.landing / "incoming" / name
    tmp = path.with_name(name + ".part")
    rows.to_csv(tmp, index=False)
    os.rename(tmp, path)


def test_retrain_on_decay_monitors_in_distribution_batches_and_retrains_once_on_a_degraded_one(decay_stack):
    from mlflow import MlflowClient

    st = decay_stack
    _drop_rows(st, "first.csv", make_rows(150, seed=1))  # no champion yet: the first batch trains v1
    run = st.wait_run_for("first.csv", timeout=150)
    assert run.state_type.value == "COMPLETED", st.explain(run)
    assert st.versions() == ["1"]
    for i in range(3):  # in distribution: monitored, not retrained
        _drop_rows(st, f"same-{i}.csv", make_rows(40, seed=20 + i))
        run = st.wait_run_for(f"same-{i}.csv", timeout=150)
        assert run.state_type.value == "COMPLETED", st.explain(run)
    assert st.versions() == ["1"] and st.runs("retrain/on-decay") == []
    client = MlflowClient(st.mlflow_uri, st.mlflow_uri)
    exp = client.get_experiment_by_name("tiny")
    (mon,) = client.search_runs([exp.experiment_id], "tags.`tuneflow.monitor_of` = 'tiny-clf'")
    assert [m.step for m in client.get_metric_history(mon.info.run_id, "champion/macro_f1")] == [1, 2, 3]
    assert [m.value for m in client.get_metric_history(mon.info.run_id, "degraded")] == [0.0, 0.0, 0.0]

    flipped = make_rows(40, seed=30)
    spam = flipped.index[flipped.label == "spam"]
    flipped.loc[spam[12:], "label"] = "ham"  # 28 of 40 spam rows labelled ham; 12 left for the gate's minimum
    _drop_rows(st, "flipped.csv", flipped)
    run = st.wait_run_for("flipped.csv", timeout=150)
    assert run.state_type.value == "COMPLETED", st.explain(run)
    (decay,) = st.wait_runs("retrain/on-decay", 1, timeout=180)
    assert decay.state_type.value == "COMPLETED", st.explain(decay)
    assert decay.parameters["trigger"]["event"] == "tuneflow.champion.degraded"
    assert decay.parameters["trigger"]["batches"] == ["flipped.csv"]
    assert st.versions() == ["1", "2"]  # exactly one retrain
    with st.client() as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[decay.id])))
    text = "\n".join(str(a.data) for a in arts)
    assert "tuneflow.champion.degraded" in text and "flipped.csv" in text and "max_drop" in text, text[:2000]
    v2 = client.get_model_version("tiny-clf", "2")
    assert "flipped.csv" in v2.tags["tuneflow.retrain_cause"]
    alert = st.hook.wait_for(lambda a: a.get("subject") == "tuneflow: tiny-clf degraded on new data", timeout=90)
    assert "flipped.csv" in alert["body"] and "max_drop" in alert["body"]
    time.sleep(5)
    assert len(st.runs("retrain/on-decay")) == 1
    assert len([a for a in st.hook.received if "degraded on new data" in a.get("subject", "")]) == 1
