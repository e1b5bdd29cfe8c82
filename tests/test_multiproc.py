"""train.processes > 1: the same Trainer in several processes under torchrun (gloo on CPU), on the tiny BERT.

Tolerance of "matches one process": one process is exactly reproducible, two are not bit-identical to it,
by design: each rank draws dropout masks for its half of a batch (other tensors than one process's), the
gradient is averaged across ranks in another order, and the last incomplete batch of an epoch is filled up
with rows from the start of the epoch (accelerate's even_batches, or a rank would get no rows and hang).
What must be identical is the recipe: the number of optimizer steps, the learning rate at every step, the
loss scale. Observed on this model, 4 fresh random tiny models x 1 vs 2 processes (3 epochs, lr 5e-3):
best macro-F1 equal every time, eval loss per epoch within 0.05, first logged loss within 0.003, the training
loss curve within 0.11 at worst. Asserted: steps and learning rates equal, first logged loss within 0.02
(a loss scaled by the number of processes, a bug transformers 5.24 has for classification, is 2x: 0.69 vs
1.39), best macro-F1 within 0.02 and both >= 0.9, final eval loss within 0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
import time

import pytest
import torch

from tuneflow.config import PipelineConfig
from tuneflow.kinds import get_kind
from tuneflow.kinds.classification import load_base_model
from tuneflow.multiproc import TrainingProcessError, launch
from tuneflow.train_common import COMPLETE_MARKER, TrainingError, checkpoint_processes, mark_complete

from conftest import tiny_config_dict, tiny_training_setup


def _evals(result) -> list[dict]:
    return [h for h in result.log_history if "eval_loss" in h]


def test_two_processes_train_the_same_recipe_as_one_and_resume_exactly(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    kind = get_kind("classification")
    cfg1, tok, data = tiny_training_setup(tiny_model_dir, tmp_path, epochs=3)
    cfg2 = cfg1.model_copy(update={"train": cfg1.train.model_copy(update={"processes": 2})})
    one = kind.train(cfg1, tok, data, tmp_path / "one")
    two = kind.train(cfg2, tok, data, tmp_path / "two")

    assert two.extra["train_processes"] == 2
    assert two.steps == one.steps and two.epochs_run == one.epochs_run  # the global batch is batch_size
    rates = [[(h["step"], h["learning_rate"]) for h in r.log_history if "learning_rate" in h] for r in (one, two)]
    assert rates[0] == rates[1]  # the same schedule, step for step
    losses = [[h["loss"] for h in r.log_history if "loss" in h] for r in (one, two)]
    assert losses[1][0] == pytest.approx(losses[0][0], abs=0.02), losses
    assert one.best_metric >= 0.9 and two.best_metric >= 0.9
    assert two.best_metric == pytest.approx(one.best_metric, abs=0.02)
    assert _evals(two)[-1]["eval_loss"] == pytest.approx(_evals(one)[-1]["eval_loss"], abs=0.1)
    base = load_base_model(cfg1.model, cfg1.data.labels)
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(base.state_dict()[q], two.model.state_dict()[q])
    assert two.model.config.id2label == {0: "ham", 1: "spam"}

    # Its checkpoints hold one RNG state per process: one process refuses to resume from them ...
    with pytest.raises(TrainingError, match=r"written by 2 training process\(es\), but train.processes is 1"):
        kind.train(cfg1, tok, data, tmp_path / "two")

    # ... and two processes resume exactly: from an earlier epoch's end (the one the rotation kept: the best, or
    # the one before the last), the same last weights as the whole run.
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "two").glob("checkpoint-*"))
    step = next(s for s in kept if s < two.steps)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "two" / f"checkpoint-{step}", crashed / f"checkpoint-{step}")
    # saving every step (all ranks agree on each time-based save) changes nothing in what is trained
    every_step = cfg2.model_copy(update={"train": cfg2.train.model_copy(update={"checkpoint_minutes": 0})})
    resumed = kind.train(every_step, tok, data, crashed)
    assert resumed.extra["resumed_from_step"] == step
    last = f"checkpoint-{two.steps}/model.safetensors"
    a, b = load_file(tmp_path / "two" / last), load_file(crashed / last)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run trained on other batches"
    for folder in crashed.glob("checkpoint-*"):  # marked complete by rank 0 once both ranks wrote their part
        assert (folder / COMPLETE_MARKER).is_file() and checkpoint_processes(folder) == 2, sorted(folder.iterdir())


FAILING = """
import os, pathlib, sys, time
rank, out = int(os.environ["RANK"]), pathlib.Path(sys.argv[1])
(out / f"pid-{rank}").write_text(str(os.getpid()))
print(f"rank {rank} started", flush=True)
if rank == 1:
    while not (out / "pid-0").exists():
        time.sleep(0.05)
    print("loading shard 7 of the data", flush=True)
    raise RuntimeError("disk full while writing shard 7")
time.sleep(300)  # rank 0 would wait for rank 1 forever: torchrun must stop it
"""


def test_a_failing_rank_fails_the_stage_naming_it_with_its_last_lines_and_the_others_are_stopped(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent(FAILING))
    start = time.monotonic()
    with pytest.raises(TrainingProcessError) as err:
        launch([str(script), str(tmp_path)], 2, tmp_path / "work")
    message = str(err.value)
    assert "rank 1 of 2 failed (exit code 1)" in message, message
    assert "loading shard 7 of the data" in message and "disk full while writing shard 7" in message, message
    assert time.monotonic() - start < 120
    _assert_gone(tmp_path / "pid-0", "rank 0 still runs after rank 1 failed")


def _assert_gone(pid_file, says: str) -> None:
    """The process whose pid ``pid_file`` holds has exited (torchrun may reap it a moment before it is gone)."""
    pid = int(pid_file.read_text())
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"{says} (pid {pid})")


HANGING = """
import os, pathlib, sys, time
rank, out = int(os.environ["RANK"]), pathlib.Path(sys.argv[1])
(out / f"pid-{rank}").write_text(str(os.getpid()))
if rank == 0:
    while not (out / "pid-1").exists():
        time.sleep(0.05)
    (out / "result.json").write_text("{}")  # the work is saved
    print("rank 0 wrote its result", flush=True)
    sys.exit(0)
time.sleep(600)  # rank 1 never exits (a teardown that hangs)
"""


def test_ranks_that_do_not_exit_after_the_result_is_saved_are_stopped_and_the_run_counts(tmp_path, caplog):
    script = tmp_path / "hanging.py"
    script.write_text(textwrap.dedent(HANGING))
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="tuneflow.multiproc"):
        launch([str(script), str(tmp_path)], 2, tmp_path / "work", done=tmp_path / "result.json", exit_grace=3)
    assert time.monotonic() - start < 120
    assert "had not exited 3 s later" in caplog.text and "stopping them" in caplog.text, caplog.text
    _assert_gone(tmp_path / "pid-1", "rank 1 still runs after the run was counted finished")


PARENT = """
import sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from conftest import tiny_training_setup
from tuneflow.kinds import get_kind
from tuneflow.runtime import configure_environment
import logging
configure_environment()
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
tmp = Path(sys.argv[2])
cfg, tok, data = tiny_training_setup(Path(sys.argv[1]), tmp, epochs=500, processes=2)
get_kind("classification").train(cfg, tok, data, tmp / "work")
"""


def test_ranks_stop_when_the_process_that_started_them_is_killed(tiny_model_dir, tmp_path):
    import signal
    import subprocess
    from pathlib import Path

    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT))
    out = (tmp_path / "parent.log").open("w")
    args = [sys.executable, str(script), str(tiny_model_dir), str(tmp_path), str(Path(__file__).parent)]
    parent = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pids: dict[str, int] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and parent.poll() is None:
        text = (tmp_path / "parent.log").read_text()
        found = re.findall(r"\[rank (\d)\] .*rank \d of 2: pid (\d+) \(torchrun (\d+)\)", text)
        pids = {r: int(p) for r, p, _ in found} | ({"torchrun": int(found[0][2])} if found else {})
        if len(pids) == 3 and "[rank 0] {'loss'" in text:
            break
        time.sleep(0.2)
    assert len(pids) == 3 and parent.poll() is None, (tmp_path / "parent.log").read_text()[-3000:]
    os.kill(parent.pid, signal.SIGKILL)  # the parent only: nothing can stop torchrun on its way out
    parent.wait()
    alive = dict(pids)
    for _ in range(600):
        for rank, pid in list(alive.items()):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                del alive[rank]
        if not alive:
            break
        time.sleep(0.1)
    try:
        assert not alive, f"{sorted(alive)} still run for a parent that is gone"
    finally:
        for pid in alive.values():
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("train.processes=0", "train.processes"),
        ("train.processes=two", "train.processes"),
        ("train.processes=3", "train.batch_size 16 is not a multiple of train.processes 3"),
        ("train.processes=128", "train.eval_batch_size 64 is not a multiple of train.processes 128"),
    ],
)
def test_invalid_process_counts_are_refused_at_load(override, says, capsys):
    from pathlib import Path

    from tuneflow.cli import main

    cfg = Path(__file__).resolve().parents[1] / "configs" / "sms-spam.yaml"
    extra = ["--set", "train.batch_size=128"] if override.endswith("=128") else []
    assert main(["run", "--config", str(cfg), "--set", override, *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and "Fix:" in err, err


def test_kind_sft_refuses_more_than_one_process(capsys):
    from pathlib import Path

    from tuneflow.cli import main

    cfg = Path(__file__).resolve().parents[1] / "configs" / "chatterbot-sft.yaml"
    assert main(["run", "--config", str(cfg), "--set", "train.processes=2"]) == 2
    err = capsys.readouterr().err
    assert "kind sft trains in one process" in err and "set it to 1" in err, err


def test_the_flow_trains_in_two_processes_logs_to_its_train_run_and_registers(
    workdir, data_csv, tiny_model_dir, prefect_harness
):
    from mlflow import MlflowClient

    from tuneflow.flows.retrain import retrain_once

    cfg = PipelineConfig.model_validate(tiny_config_dict(data_csv, tiny_model_dir, train={"processes": 2}))
    out = retrain_once(cfg, config_file="test.yaml")
    assert out["version"] == "1" and out["promoted"] is True
    assert out["metrics"]["macro_f1"] > 0.9, out["metrics"]
    client = MlflowClient()
    stage = f"tags.mlflow.parentRunId = '{out['run_id']}' AND tags.mlflow.runName = 'train'"
    (train_run,) = client.search_runs([out["experiment_id"]], filter_string=stage)
    metrics = train_run.data.metrics
    assert metrics["train_processes"] == 2 and metrics["steps"] > 0 and metrics["train_seconds"] > 0
    assert len(client.get_metric_history(train_run.info.run_id, "train/loss")) >= 2  # the ranks' log history
    assert len(client.get_metric_history(train_run.info.run_id, "eval/macro_f1")) == 4  # one per epoch
    # only the retrain's own runs: the training processes opened none
    runs = client.search_runs([out["experiment_id"]])
    assert {r.data.tags.get("mlflow.runName") for r in runs if r.info.run_id != out["run_id"]} <= {
        "validate",
        "tokenize",
        "train",
        "evaluate",
        "champion",
        "register",
    }


def _cli_run_and_its_checkpoint_folder(workdir, data_csv, tiny_model_dir, name: str):
    """A finished ``tuneflow run`` (one process, one epoch) of a config saved as ``<name>.yaml``; returns the config
    path and the folder where a rerun of the same work (with --force) looks for checkpoints to resume from."""
    import yaml
    from mlflow import MlflowClient

    from tuneflow.cli import main
    from tuneflow.registry_base import FINGERPRINT_TAG
    from tuneflow.tracking import checkpoints_root

    path = workdir / f"{name}.yaml"
    cfg = tiny_config_dict(data_csv, tiny_model_dir, train={"epochs": 1}, registry={"model_name": name})
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 0
    (mv,) = MlflowClient().search_model_versions(f"name='{name}'")
    return path, checkpoints_root(name) / mv.tags[FINGERPRINT_TAG][:16]


def _left_checkpoint(tiny_model_dir, tmp_path, folder, processes: int):
    """A complete checkpoint in ``folder`` as a crashed run with ``processes`` training processes leaves it: a real
    one-process training's, with its RNG state as rank 0's and rank 1's when ``processes`` is 2 (the only files
    that differ by rank: weights, optimizer and scheduler are the same in every process)."""
    cfg, tok, data = tiny_training_setup(tiny_model_dir, tmp_path, epochs=1)
    get_kind("classification").train(cfg, tok, data, folder)
    (checkpoint,) = folder.glob("checkpoint-*")
    if processes == 2:
        state = checkpoint / "rng_state.pth"
        shutil.copy(state, checkpoint / "rng_state_1.pth")
        state.rename(checkpoint / "rng_state_0.pth")
        mark_complete(checkpoint)  # the marker lists the files a 2-process save writes
    assert checkpoint_processes(checkpoint) == processes
    return checkpoint


def test_a_checkpoint_of_another_number_of_processes_stops_the_run_with_exit_2_and_the_fix(
    workdir, data_csv, tiny_model_dir, prefect_harness, capsys
):
    from mlflow import MlflowClient

    from tuneflow.cli import main

    path, folder = _cli_run_and_its_checkpoint_folder(workdir, data_csv, tiny_model_dir, "procs-clf")
    # written by one process, resumed with two: refused before any training process starts
    checkpoint = _left_checkpoint(tiny_model_dir, workdir, folder, processes=1)
    capsys.readouterr()
    assert main(["run", "--config", str(path), "--force", "--set", "train.processes=2"]) == 2
    err = capsys.readouterr().err
    assert "error: training failed; nothing was registered" in err and str(checkpoint) in err, err
    assert "written by 1 training process(es), but train.processes is 2" in err, err
    assert "Fix: rerun with train.processes=1" in err and f"or delete {folder}" in err, err
    assert "Traceback" not in err, err

    # written by two, resumed with one
    shutil.rmtree(folder)
    checkpoint = _left_checkpoint(tiny_model_dir, workdir, folder, processes=2)
    assert main(["run", "--config", str(path), "--force"]) == 2
    err = capsys.readouterr().err
    assert "written by 2 training process(es), but train.processes is 1" in err and str(checkpoint) in err, err
    assert "Fix: rerun with train.processes=2" in err and "Traceback" not in err, err
    assert len(MlflowClient().search_model_versions("name='procs-clf'")) == 1  # nothing registered
    assert checkpoint.is_dir()  # kept for the rerun the message proposes


@pytest.mark.timeout(300)  # a rank left waiting for the failed one would hang the run: fail instead
def test_a_failing_training_rank_stops_the_run_with_exit_2_naming_it_its_error_and_the_fix(
    workdir, data_csv, tiny_model_dir, prefect_harness, capsys
):
    """A real 2-process run whose rank 1 cannot read its own input: the RNG state file of the checkpoint it
    resumes from (each rank reads only its own) is corrupt. Rank 0 reads a good one and goes on to wait for rank 1
    in the first step's gradient exchange: torchrun must stop it, and the run must end, not hang."""
    from mlflow import MlflowClient

    from tuneflow.cli import main

    path, folder = _cli_run_and_its_checkpoint_folder(workdir, data_csv, tiny_model_dir, "rank-clf")
    checkpoint = _left_checkpoint(tiny_model_dir, workdir, folder, processes=2)
    # corrupt on disk after the save: the marker's sizes still match (a file of another size is a partial save)
    corrupt = checkpoint / "rng_state_1.pth"
    corrupt.write_bytes((b"half-written by a crashed disk\n" * corrupt.stat().st_size)[: corrupt.stat().st_size])
    capsys.readouterr()
    start = time.monotonic()
    assert main(["run", "--config", str(path), "--force", "--set", "train.processes=2"]) == 2
    assert time.monotonic() - start < 240
    err = capsys.readouterr().err
    assert "error: training failed; nothing was registered" in err, err
    assert "training process rank 1 of 2 failed (exit code 1)" in err, err
    # rank 1's own lines: where it failed and its exception (what torch.load makes of the corrupt file)
    assert "torch.load(rng_file" in err and re.search(r"\[rank1\]: \w+Error: ", err), err
    assert f"This run resumed from {checkpoint}" in err and f"delete {folder} to train from the start" in err, err
    assert err.rstrip().splitlines()[-1].startswith("Fix: "), err  # the last word is the fix, not a traceback
    assert len(MlflowClient().search_model_versions("name='rank-clf'")) == 1  # nothing registered
