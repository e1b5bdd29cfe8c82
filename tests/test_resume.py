"""Resume after a crash: a retrain killed with SIGKILL during training resumes from its newest complete
checkpoint on the next run, and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tuneflow.cli import main
from tuneflow.tracking import checkpoints_root
from tuneflow.train_common import COMPLETE_MARKER, latest_checkpoint

from conftest import tiny_config_dict


def _train_runs(client, experiment_id: str) -> list:
    runs = client.search_runs(
        [experiment_id], filter_string="tags.mlflow.runName = 'train'", order_by=["start_time ASC"]
    )
    return [r for r in runs if r.info.status == "FINISHED"]


def _final(client, run_id: str, metric: str) -> tuple[int, float]:
    history = client.get_metric_history(run_id, metric)
    last = max(history, key=lambda m: m.step)
    return last.step, last.value


def test_a_retrain_killed_during_training_resumes_from_its_newest_checkpoint(
    workdir, data_csv, tiny_model_dir, prefect_harness
):
    from mlflow import MlflowClient
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    rng = random.Random()
    killed = None
    for attempt in range(3):  # the kill may land after training ended on a fast machine: a bounded number of tries
        name = f"resume-{attempt}"
        path = workdir / f"{name}.yaml"
        cfg = tiny_config_dict(
            data_csv,
            tiny_model_dir,
            train={"epochs": 8, "checkpoint_minutes": 0, "logging_steps": 1},
            registry={"model_name": name},
        )
        path.write_text(yaml.safe_dump(cfg))
        log = (workdir / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuneflow.cli", "run", "--config", str(path)],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        root = checkpoints_root(name)
        while proc.poll() is None and time.monotonic() < deadline:
            if any(root.glob(f"*/checkpoint-*/{COMPLETE_MARKER}")):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.5))  # somewhere in training, after at least one complete checkpoint
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            killed = (name, path)
            break
        assert proc.returncode == 0, (workdir / f"{name}.log").read_text()[-3000:]
    assert killed is not None, "training always finished before the kill"
    name, path = killed
    (left,) = list(checkpoints_root(name).iterdir())
    newest = latest_checkpoint(left)
    assert newest is not None  # partial ones (a kill during a save) are removed by latest_checkpoint
    client = MlflowClient()
    assert not client.search_model_versions(f"name='{name}'")  # nothing half-registered

    assert main(["run", "--config", str(path)]) == 0  # the rerun resumes
    exp = client.get_experiment_by_name("tiny").experiment_id
    (resumed,) = _train_runs(client, exp)
    resumed_from = resumed.data.metrics["resumed_from_step"]
    assert resumed_from > 0
    assert not checkpoints_root(name).exists()  # swept after the run succeeded
    dead = client.search_runs([exp], filter_string="attributes.status = 'KILLED'")
    assert dead, "the killed run's MLflow run was left RUNNING"

    assert main(["run", "--config", str(path), "--force"]) == 0  # the same work, uninterrupted
    fresh = _train_runs(client, exp)[-1]
    assert fresh.data.metrics["resumed_from_step"] == 0
    # A resumed run trains on the batches the uninterrupted one saw, with the same RNG states: the same outcome.
    step_r, loss_r = _final(client, resumed.info.run_id, "eval/loss")
    step_f, loss_f = _final(client, fresh.info.run_id, "eval/loss")
    assert step_r == step_f
    assert abs(loss_r - loss_f) <= 1e-4 + 1e-3 * loss_f, (resumed_from, loss_r, loss_f)
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    m = {v: client.get_run(versions[v].run_id).data.metrics for v in versions}
    assert abs(m["1"]["eval/macro_f1"] - m["2"]["eval/macro_f1"]) <= 1e-6, m


def test_a_marked_checkpoint_whose_files_were_partly_deleted_is_not_resumed_from(tmp_path):
    """transformers deletes older checkpoints itself (save_total_limit, keeping the best): a kill during that
    deletion left a marked folder without its weights, and the rerun failed with "Can't find a valid checkpoint"
    (seen in CI). The marker lists the files and sizes it vouches for."""
    from tuneflow.train_common import mark_complete

    def saved(step: int) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name, size in [("model.safetensors", 300), ("optimizer.pt", 200), ("trainer_state.json", 10)]:
            (folder / name).write_bytes(b"x" * size)
        mark_complete(folder)
        return folder

    older, newer, newest = saved(39), saved(40), saved(41)
    (newest / "model.safetensors").unlink()  # the deletion got this far when the process was killed
    (newer / "optimizer.pt").write_bytes(b"x" * 7)  # a file of another size than the one saved
    assert latest_checkpoint(tmp_path) == older
    assert not newest.exists() and not newer.exists()  # removed, as a checkpoint whose save never finished

    legacy = saved(42)  # a marker from before markers listed files: still resumed from
    (legacy / COMPLETE_MARKER).write_text(f"{time.time()}\n")
    assert latest_checkpoint(tmp_path) == legacy
