"""MLflow setup and run records against a real temporary MLflow store: where the store and artifacts go,
the per-stage runs and their timings, lineage helpers, links to the UI, the decision tags."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tuneflow.registry import decide
from tuneflow.tracking import (
    MAX_INPUT_TAG,
    _sources_tag,
    configure_tracking,
    ensure_experiment,
    flatten,
    git_commit,
    log_decision,
    model_url,
    run_url,
    stage_run,
)


def test_without_tracking_uri_the_store_is_a_sqlite_file_under_the_cwd(workdir, monkeypatch):
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI (the workdir fixture's call set it): unset it.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = configure_tracking()
    db = elsewhere.resolve() / "mlruns" / "mlflow.db"
    assert uri == f"sqlite:///{db}"
    assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
    ensure_experiment("cwd-store")
    with mlflow.start_run() as run:
        mlflow.log_metric("m", 1.0)
    assert db.is_file() and MlflowClient().get_run(run.info.run_id).data.metrics == {"m": 1.0}


def test_a_set_tracking_uri_wins_over_the_local_store(workdir, monkeypatch):
    other = workdir / "team" / "store.db"
    other.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert configure_tracking(workdir / "ignored") == f"sqlite:///{other}"
    assert mlflow.get_tracking_uri() == f"sqlite:///{other}"
    assert not (workdir / "ignored").exists()


def test_experiment_artifacts_go_under_mlruns_artifacts_and_the_id_is_stable(workdir):
    name = "SMS spam / v2"
    first = ensure_experiment(name)
    assert ensure_experiment(name) == first
    slug = workdir.resolve() / "mlruns" / "artifacts" / "SMS-spam-v2"
    assert mlflow.get_experiment(first).artifact_location == slug.as_uri()
    with mlflow.start_run() as run:  # ensure_experiment also made it the active experiment
        mlflow.log_dict({"x": 1}, "notes/x.json")
    assert run.info.experiment_id == first
    assert (slug / run.info.run_id / "artifacts" / "notes" / "x.json").is_file()


def test_a_stage_run_records_its_time_on_itself_and_on_the_parent(workdir):
    client = MlflowClient()
    with mlflow.start_run() as parent:
        pid = parent.info.run_id
        seen = {}

        def stage():  # Prefect may run a task on another thread: the parent is passed, not taken from the stack
            with stage_run(pid, "tokenize") as run:
                time.sleep(0.05)
                seen["id"] = run.info.run_id

        worker = threading.Thread(target=stage)
        worker.start()
        worker.join(timeout=60)
        assert mlflow.active_run().info.run_id == pid  # the parent stays the active run here
    child = client.get_run(seen["id"])
    assert child.data.tags["tuneflow.stage"] == "tokenize" and child.data.tags["mlflow.parentRunId"] == pid
    assert child.info.status == "FINISHED"
    seconds = child.data.metrics["stage_seconds"]
    assert seconds >= 0.05
    assert client.get_run(pid).data.metrics["time/tokenize_seconds"] == pytest.approx(seconds)


def test_a_failed_stage_ends_its_run_as_failed_without_a_time(workdir):
    client = MlflowClient()
    with mlflow.start_run() as parent:
        with pytest.raises(RuntimeError, match="boom"):
            with stage_run(parent.info.run_id, "train") as run:
                raise RuntimeError("boom")
    child = client.get_run(run.info.run_id)
    assert child.info.status == "FAILED" and "stage_seconds" not in child.data.metrics
    assert "time/train_seconds" not in client.get_run(parent.info.run_id).data.metrics


def test_flatten_joins_nested_keys_with_dots():
    tree = {"name": "x", "data": {"labels": ["ham", "spam"], "split": {"salt": "s", "eval_fraction": 0.2}}}
    assert flatten(tree) == {
        "name": "x",
        "data.labels": ["ham", "spam"],
        "data.split.salt": "s",
        "data.split.eval_fraction": 0.2,
    }
    assert flatten({"a": {"b": 1}}, "cfg.") == {"cfg.a.b": 1}


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def test_git_commit_names_the_commit_marks_edits_and_says_unknown_outside_a_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find a repository above
    outside = tmp_path / "outside"
    outside.mkdir()
    assert git_commit(outside) == "unknown"

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    assert git_commit(repo) == "unknown"  # no commit yet
    (repo / "f.txt").write_text("one\n")
    _git(repo, "add", "f.txt")
    _git(repo, "commit", "-q", "-m", "first")
    sha = git_commit(repo)
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    (repo / "new.txt").write_text("untracked files do not count\n")
    assert git_commit(repo) == sha
    (repo / "f.txt").write_text("two\n")
    assert git_commit(repo) == f"{sha}-dirty"


def test_links_point_at_the_configured_ui(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TUNEFLOW_MLFLOW_UI_URL", raising=False)
    assert run_url("1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    monkeypatch.setenv("TUNEFLOW_MLFLOW_UI_URL", "https://mlflow.example.org:8443/")
    assert run_url("7", "r1") == "https://mlflow.example.org:8443/#/experiments/7/runs/r1"
    assert model_url("sms-clf", "3") == "https://mlflow.example.org:8443/#/models/sms-clf/versions/3"
    # A team server given as the tracking URI is the UI too.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example.org:5000/")
    assert model_url("m", "1") == "http://tracking.example.org:5000/#/models/m/versions/1"


def test_log_decision_tags_the_stage_run_and_the_parent_run(workdir):
    client = MlflowClient()
    promoted = decide("macro_f1", 0.93, 0.9, "2", 0.0)
    kept = decide("macro_f1", 0.5, 0.9, "2", 0.0)
    with mlflow.start_run() as parent:
        with stage_run(parent.info.run_id, "register") as stage:
            log_decision(promoted, "3", parent.info.run_id)
    for run_id in (parent.info.run_id, stage.info.run_id):
        tags = client.get_run(run_id).data.tags
        assert tags["tuneflow.decision"] == "promoted" and tags["tuneflow.registered_version"] == "3"
        assert tags["tuneflow.decision_reason"] == promoted.reason and "beats champion v2" in promoted.reason
        assert tags["tuneflow.challenger_score"] == "0.930000" and tags["tuneflow.champion_version_before"] == "2"

    with mlflow.start_run() as parent:
        with stage_run(parent.info.run_id, "register"):
            log_decision(kept, None, parent.info.run_id)  # registration off: no version
    tags = client.get_run(parent.info.run_id).data.tags
    assert tags["tuneflow.decision"] == "rejected" and "tuneflow.registered_version" not in tags


def test_source_list_tag_stays_within_mlflow_limit():
    assert _sources_tag(["a.csv", "b.csv"]) == '["a.csv", "b.csv"]'
    long = _sources_tag([f"batch-{i:04d}-from-the-nightly-export.csv" for i in range(200)])
    assert len(long) <= MAX_INPUT_TAG and long.endswith('more"]')


def test_runs_left_running_by_a_dead_retrain_process_are_marked_killed(workdir):
    import os
    import socket

    from tuneflow.tracking import HOST_TAG, PID_TAG, end_dead_runs

    exp = mlflow.set_experiment("dead-runs").experiment_id
    client = MlflowClient()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs (kill -9 of a retrain looks the same afterwards)
    here = socket.gethostname()
    dead = client.create_run(exp, tags={HOST_TAG: here, PID_TAG: str(gone.pid)})
    stage = client.create_run(exp, tags={"mlflow.parentRunId": dead.info.run_id})
    alive = client.create_run(exp, tags={HOST_TAG: here, PID_TAG: str(os.getpid())})
    elsewhere = client.create_run(exp, tags={HOST_TAG: "another-machine", PID_TAG: str(gone.pid)})
    assert end_dead_runs(exp) == [dead.info.run_id]
    status = {r: client.get_run(r).info.status for r in (dead.info.run_id, stage.info.run_id)}
    assert set(status.values()) == {"KILLED"}
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # this process: alive
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"  # cannot know: left alone
