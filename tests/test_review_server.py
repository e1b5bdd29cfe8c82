"""registry.approval: required against a real Prefect server and `tuneflow serve` on loopback.

A triggered retrain registers its challenger and completes "Waiting for review"; the review waits in a run of
review/<model> that is suspended, so a second retrain of the model runs meanwhile; `tuneflow review` from another
process resumes that run and the run applies the decision (approve moves champion, reject leaves it); a review
nobody decides in time is rejected. Run with ``pytest -m integration``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_deployments import REPO, TERMINAL, _base_env, _start_stack

from conftest import make_rows, tiny_config_dict
from servers import WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "tiny-clf"


@pytest.fixture(scope="module")
def review_stack(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("review")
    landing = tmp / "landing"
    (landing / "accepted").mkdir(parents=True)
    (landing / "incoming").mkdir()
    cfg = tiny_config_dict(Path("unused"), tiny_model_dir, train={"epochs": 2})
    cfg["data"] = {"landing": str(landing), "labels": ["ham", "spam"], "eval_fraction": 0.25}
    cfg["watch"] = {"quiet_seconds": 1.0, "poll_seconds": 0.3}
    cfg["monitor"] = {"enabled": False}
    cfg["registry"] = {"model_name": MODEL, "approval": "required", "approval_timeout_hours": 1.0}
    hook = WebhookReceiver()
    for st in _start_stack(tmp, cfg, landing, MODEL, {"TUNEFLOW_ALERT_WEBHOOK_URL": hook.url}):
        st.hook, st.cfg, st.config_path = hook, cfg, tmp / "tiny.yaml"
        yield st
    hook.server.shutdown()


def _set_config(st, **registry) -> None:
    """The retrain reads its config file at every run: change the review settings for the next one."""
    st.cfg["registry"] |= registry
    st.config_path.write_text(yaml.safe_dump(st.cfg))


def _cli(st, *args: str) -> subprocess.CompletedProcess:
    """`tuneflow ...` in its own process, as a reviewer on another machine would run it."""
    env = _base_env(Path(st.config_path).parent / "cli-home") | {
        "PREFECT_API_URL": st.api,
        "MLFLOW_TRACKING_URI": st.mlflow_uri,
    }
    return subprocess.run(
        [sys.executable, "-m", "tuneflow.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def _tags(st, version: str) -> dict:
    from mlflow import MlflowClient

    return MlflowClient(st.mlflow_uri, st.mlflow_uri).get_model_version(MODEL, version).tags


def _champion(st) -> str | None:
    from mlflow import MlflowClient

    aliases = MlflowClient(st.mlflow_uri, st.mlflow_uri).get_registered_model(MODEL).aliases
    return str(aliases["champion"]) if "champion" in aliases else None


def _retrain_waiting(st, name: str, seed: int, runs_before: int):
    """Drop a batch; the retrain it triggers completes "Waiting for review". Returns (retrain run, review run)."""
    path = st.landing / "incoming" / name
    make_rows(40, seed=seed).to_csv(path.with_name(name + ".part"), index=False)
    os.rename(path.with_name(name + ".part"), path)
    run = st.wait_runs("retrain/on-new-data", runs_before + 1, timeout=300)[-1]
    assert run.state_name == "Waiting for review", st.explain(run)
    version = st.versions()[-1]
    review_run = _tags(st, version)["tuneflow.review.flow_run"]
    return run, version, review_run


def _state(st, run_id: str, want: set[str], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        with st.client() as c:
            run = c.read_flow_run(run_id)
        if run.state_name in want or time.monotonic() > deadline:
            return run
        time.sleep(1)


def test_review_waits_suspended_a_second_retrain_runs_and_the_cli_decides(review_stack):
    st = review_stack
    _set_config(st, approval_timeout_hours=0.03)  # 108 s: this one times out
    first, v1, r1 = _retrain_waiting(st, "batch-1.csv", seed=1, runs_before=0)
    requested = time.monotonic()
    assert _champion(st) is None and _tags(st, v1)["tuneflow.review"] == "waiting"
    run1 = _state(st, r1, {"Suspended"})
    assert run1.state_name == "Suspended", run1.state  # no process waits: the run exits while suspended
    alert = st.hook.wait_for(lambda a: "review needed" in a.get("body", ""), timeout=60)
    assert f"{MODEL} v{v1}" in alert["body"] and "#/models/tiny-clf/versions/" in alert["body"]

    # the first review still waits: the model's retrain slot is free, a second retrain runs to its end
    _set_config(st, approval_timeout_hours=1.0)
    second, v2, r2 = _retrain_waiting(st, "batch-2.csv", seed=2, runs_before=1)
    assert _state(st, r1, {"Suspended"}).state_name == "Suspended"
    # the second review's run is started by the worker: Submitting / Running until it suspends itself
    assert _state(st, r2, {"Suspended"}).state_name == "Suspended"
    with st.client() as c:  # nothing holds the model's retrain slot while both reviews wait
        assert c.read_global_concurrency_limit_by_name(f"retrain-{MODEL}").active_slots == 0

    listed = _cli(st, "review", "list", MODEL)
    assert listed.returncode == 0, listed.stderr
    assert f"{r2[:8]} (Suspended)" in listed.stdout and f"{r1[:8]} (Suspended)" in listed.stdout

    # bad input: exit 2, nothing moved
    bad = _cli(st, "review", "approve", MODEL, "99", "--reviewer", "Ada")
    assert bad.returncode == 2 and "has no version 99" in bad.stderr

    # reject v2 from another process: the suspended run is resumed, applies it, champion stays (none)
    rejected = _cli(st, "review", "reject", MODEL, v2, "--reviewer", "Bob", "--comment", "recall too low")
    assert rejected.returncode == 0, rejected.stdout + rejected.stderr
    assert f"v{v2} rejected by Bob: recall too low" in rejected.stdout
    assert _state(st, r2, {"Rejected"}).state_name == "Rejected"
    assert _champion(st) is None and _tags(st, v2)["tuneflow.decision"] == "rejected"

    # the first review passes its deadline: rejected (timeout), its run ended, champion still none
    time.sleep(max(0.0, 110 - (time.monotonic() - requested)))
    listed = _cli(st, "review", "list", MODEL)
    assert listed.returncode == 0 and f"timed out, rejected: {MODEL} v{v1}" in listed.stdout, listed.stdout
    assert _tags(st, v1)["tuneflow.review.reviewer"] == "tuneflow (timeout)"
    assert _state(st, r1, {"Rejected (timed out)"}).state_name == "Rejected (timed out)"
    assert _champion(st) is None

    # a third challenger, approved from another process: champion moves, the history says who and why
    _, v3, r3 = _retrain_waiting(st, "batch-3.csv", seed=3, runs_before=2)
    approved = _cli(st, "review", "approve", MODEL, v3, "--reviewer", "Ada", "--comment", "card read, looks right")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert _champion(st) == v3
    assert _state(st, r3, {"Approved"}).state_name == "Approved"
    history = _cli(st, "models", MODEL, "--history")
    assert "approve" in history.stdout and "review:Ada" in history.stdout and "card read" in history.stdout
    again = _cli(st, "review", "reject", MODEL, v3, "--reviewer", "Bob")
    assert again.returncode == 2 and "already approved by Ada" in again.stderr
    assert all(r.state_type.value in TERMINAL for r in st.runs("retrain/on-new-data"))
