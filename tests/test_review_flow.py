"""registry.approval: required in the retrain flow, run in place against Prefect's test harness (a real server): the
challenger waits paused, `tuneflow review approve` resumes the same run and champion moves; nobody deciding in time
rejects it. The deployed form (a review deployment that suspends) is tested against a real server in
test_review_server.py."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from tuneflow.config import PipelineConfig

from conftest import tiny_config_dict

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _config(data_csv, tiny_model_dir, **registry) -> PipelineConfig:
    raw = tiny_config_dict(data_csv, tiny_model_dir, train={"epochs": 1}, registry={"approval": "required", **registry})
    return PipelineConfig.model_validate(raw)


def _wait_for_review(name: str, runner: threading.Thread, timeout_s: float = 240):
    from tuneflow.approval import reviews

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and runner.is_alive():
        waiting = reviews(name)
        if waiting:
            return waiting[0]
        time.sleep(1)
    raise AssertionError(f"no review of {name} waited (within {timeout_s:.0f} s, while the retrain ran)")


def test_a_retrain_waits_paused_and_the_cli_approval_resumes_it(workdir, data_csv, tiny_model_dir, capsys, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from tuneflow.cli import main
    from tuneflow.flows.retrain import retrain_once
    from tuneflow.registry import champion_version

    cfg = _config(data_csv, tiny_model_dir)
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(result=retrain_once(cfg, config_file="t.yaml")), daemon=True)
    runner.start()
    review = _wait_for_review("tiny-clf", runner)
    assert champion_version("tiny-clf") is None  # waiting: nothing moved
    with get_client(sync_client=True) as client:
        for _ in range(30):  # the run pauses right after recording the review
            run = client.read_flow_run(review.flow_run_id)
            if run.state.is_paused():
                break
            time.sleep(1)
    assert run.state.is_paused(), run.state
    # the form: its description is the comparison a reviewer reads
    keyset = run.state.state_details.run_input_keyset
    with get_client(sync_client=True) as client:
        description = client.read_flow_run_input(run.id, keyset["description"])
    assert "Metrics on the same eval split" in description and "Challenger v1 in MLflow" in description
    assert "| macro_f1 |" in description and "Trained on" in description

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    argv = ["review", "approve", "tiny-clf", review.version, "--reviewer", "Ada", "--comment", "read the card"]
    assert main(argv) == 0
    assert "v1 approved by Ada: read the card; champion is v1" in capsys.readouterr().out
    runner.join(timeout=120)
    assert not runner.is_alive()
    result = out["result"]
    assert result["review"] == "approved" and result["promoted"] is True and "approved by Ada" in result["reason"]
    assert champion_version("tiny-clf") == "1"
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(review.flow_run_id).state.is_completed()
    tags = MlflowClient().get_model_version("tiny-clf", "1").tags
    assert tags["tuneflow.review.reviewer"] == "Ada" and tags["tuneflow.decision"] == "promoted"


def test_nobody_deciding_in_time_rejects_the_challenger(workdir, data_csv, tiny_model_dir):
    from prefect.client.orchestration import get_client

    from tuneflow.flows.retrain import retrain_once
    from tuneflow.registry import champion_version

    cfg = _config(data_csv, tiny_model_dir, approval_timeout_hours=3 / 3600)  # 3 s
    result = retrain_once(cfg, config_file="t.yaml")
    assert result["review"] == "rejected" and result["promoted"] is False
    assert champion_version("tiny-clf") is None
    tags = MlflowClient().get_model_version("tiny-clf", "1").tags
    assert tags["tuneflow.review.reviewer"] == "tuneflow (timeout)" and tags["tuneflow.decision"] == "rejected"
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(tags["tuneflow.review.flow_run"]).state.is_completed()


def test_a_review_whose_flow_run_is_gone_is_listed_as_such_and_can_be_closed(
    workdir, register_tiny, capsys, monkeypatch
):
    import uuid

    from prefect.settings import PREFECT_API_URL

    from tuneflow.approval import request_review
    from tuneflow.cli import main
    from tuneflow.registry import champion_version, decide

    register_tiny("gone-clf", decide("macro_f1", 0.6, None, None, 0.0))
    register_tiny("gone-clf", decide("macro_f1", 0.5, None, "9", 0.0))  # held: not promoted
    gone = str(uuid.uuid4())  # a flow run the server never had (deleted)
    request_review("gone-clf", "2", decide("macro_f1", 0.9, 0.6, "1", 0.0), gone, timeout_hours=1)
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    capsys.readouterr()
    assert main(["review", "list", "gone-clf"]) == 0
    out = capsys.readouterr().out
    assert f"{gone[:8]} (gone)" in out and "gone-clf v2: its flow run is gone; close it with" in out
    assert main(["review", "approve", "gone-clf", "2", "--reviewer", "Ada", "--comment", "run lost, card read"]) == 0
    out = capsys.readouterr().out
    assert "is gone from the Prefect server: deciding here" in out and "v2 approved by Ada" in out
    assert champion_version("gone-clf") == "2"
