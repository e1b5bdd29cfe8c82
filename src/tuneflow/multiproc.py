"""Training in several processes (``train.processes`` > 1): the same Trainer, data-parallel under torchrun.

The train stage calls ``train_in_processes`` instead of training in its own process. It writes a spec (the
config, the tokenized splits, the tokenizer, the checkpoint folder and the checkpoint to resume from), starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m tuneflow.train_worker <spec>`` and streams
the processes' output into this process's log. Every rank runs ``tuneflow.train.fit_with_trainer`` (transformers
trains data-parallel from torchrun's environment: gloo on CPU, NCCL on GPUs); rank 0 saves the model and a
result file, which this process reads back into a ``TrainResult`` and logs to the active MLflow run, as the
single-process path does. The processes log nothing to MLflow themselves.

A failed rank fails the stage with its rank, exit code, last lines and the fix; torchrun stops the other ranks, and
this process stops torchrun when it is interrupted itself.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneflow.config import PipelineConfig
from tuneflow.train_common import TrainingError, TrainResult, log_history_to_mlflow, resume_point

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

WORKER_MODULE = "tuneflow.train_worker"
RESULT_FILE = "result.json"
MODEL_DIR = "model"
# torchrun --tee prefixes each line of local rank r with "[default<r>]:" (role "default")
_RANK_LINE = re.compile(r"^\[default(\d+)\]:(.*)$")


class TrainingProcessError(TrainingError):
    """A training process failed; the message names its rank, its exit code and its last lines."""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_process(processes: int, threads: int | None) -> int:
    """torch threads of each training process: ``train.threads`` when set, else this machine's cores / N."""
    return threads or max(1, usable_cores() // processes)


def torchrun_command(processes: int, log_dir: Path, target: list[str]) -> list[str]:
    """torchrun on this machine (``--standalone``: a rendezvous on a free local port) with each rank's output
    teed to ``log_dir`` and to the console prefixed by its rank; no restarts (a failed run must be looked at)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "--max-restarts",
        "0",
        "--tee",
        "3",
        "--log-dir",
        str(log_dir),
        *target,
    ]


def launch(
    target: list[str],
    processes: int,
    work: Path,
    env: dict[str, str] | None = None,
    tail: int = 15,
    fix: str = "",
    done: Path | None = None,
    exit_grace: float = 120.0,
) -> float:
    """Run ``target`` (``["-m", module, args...]`` or ``[script, args...]``) as ``processes`` ranks under torchrun;
    each line they print goes to this module's log, prefixed with its rank. Returns the wall time.

    ``done``: a file the ranks write last, once their work is saved (the worker's result file). When it exists and
    torchrun has not ended ``exit_grace`` seconds later (a rank stuck in the process group's teardown, seen once
    under heavy CPU contention), the processes are stopped and the run counts as finished, with a warning: the
    work is saved, and a wait nothing would end is not a result.

    Raises:
        TrainingProcessError: a rank failed (or torchrun did): the message names the rank torchrun saw fail
            first, its exit code and its last ``tail`` lines, then ``fix``. torchrun has stopped the other ranks
            by then.
    """
    work.mkdir(parents=True, exist_ok=True)
    command = torchrun_command(processes, work / "logs", target)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    tails: dict[str, collections.deque[str]] = collections.defaultdict(lambda: collections.deque(maxlen=tail))
    launcher: collections.deque[str] = collections.deque(maxlen=400)  # torchrun's own lines (its failure report)
    log.info("starting %d training processes: %s", processes, " ".join(command))
    start = time.perf_counter()
    # Same process group as this one: a Ctrl-C or a kill of the group reaches torchrun, which stops its ranks.
    proc = subprocess.Popen(
        command, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, name="torchrun-output", daemon=True).start()
    done_at: float | None = None
    try:
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None:  # torchrun closed its output: it has ended, or is about to
                code = proc.wait()
                break
            match = _RANK_LINE.match(line)
            if match:
                rank, text = match.groups()
                if text.strip():
                    tails[rank].append(text)
                    log.info("[rank %s] %s", rank, text)
            elif line.strip():
                launcher.append(line)
                log.info("[torchrun] %s", line)
            if done is not None and done_at is None and done.exists():
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at > exit_grace and proc.poll() is None:
                log.warning(
                    "the training finished and its result is saved (%s), but the processes had not exited %.0f s "
                    "later (a rank stuck in the process group's teardown): stopping them",
                    done,
                    exit_grace,
                )
                stop(proc)
                code = 0
                break
    finally:
        stop(proc)
    if code != 0:
        raise TrainingProcessError(
            "\n".join(filter(None, [failure_message(code, processes, tails, list(launcher)), fix]))
        )
    return time.perf_counter() - start


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop torchrun if it still runs (this process was interrupted): SIGTERM makes it stop its ranks first."""
    if proc.poll() is not None:
        return
    log.warning("stopping the training processes (torchrun pid %d)", proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def failure_message(code: int, processes: int, tails: dict[str, Any], launcher: list[str]) -> str:
    """Which rank failed first (torchrun's "Root Cause" report), with its exit code and last lines."""
    report = "\n".join(launcher)
    root = report[report.rfind("Root Cause") :] if "Root Cause" in report else ""
    rank = re.search(r"rank\s*:\s*(\d+)", root)
    exit_code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    if rank is None:
        shown = sorted(tails) or []
        lines = [f"training in {processes} processes failed (torchrun exit code {code})"]
        for r in shown:
            lines += [f"rank {r}, last lines:", *(f"  {x}" for x in tails[r])]
        if not shown:
            lines += ["torchrun's last lines:", *(f"  {x}" for x in launcher[-15:])]
        return "\n".join(lines)
    r = rank.group(1)
    how = f"exit code {exit_code.group(1)}" if exit_code else f"torchrun exit code {code}"
    last = list(tails.get(r, [])) or ["(it printed nothing)"]
    return "\n".join(
        [
            f"training process rank {r} of {processes} failed ({how}); the other ranks were stopped. "
            f"Rank {r}'s last lines:",
            *(f"  {x}" for x in last),
        ]
    )


def failure_fix(checkpoints: Path, resume: Path | None) -> str:
    """What to do after a training process failed: its error names the cause; a checkpoint it resumed from may be it."""
    fix = "Fix: correct what the failed rank's error names, then rerun"
    if resume is None:
        return f"{fix} (it resumes from the newest complete checkpoint in {checkpoints}, if one was saved)."
    return (
        f"{fix}. This run resumed from {resume}: if the error is about a file of that checkpoint (unreadable, "
        f"corrupt), delete {checkpoints} to train from the start."
    )


def train_in_processes(
    cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, data: DatasetDict, checkpoints: Path
) -> TrainResult:
    """Train as ``kind.train`` does, in ``cfg.train.processes`` processes; see the module's docstring.

    Resumes from the newest complete checkpoint under ``checkpoints`` when a killed run left one (it is
    chosen here, once, and must have been written by as many processes: ``resume_point``).

    Raises:
        TrainingProcessError: a training process failed.
        TrainingError: a checkpoint of another number of processes.
        ValueError: more processes than GPUs on a GPU machine.
    """
    import torch
    import transformers

    n = cfg.train.processes
    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise ValueError(
            f"train.processes is {n}, but this machine has {torch.cuda.device_count()} GPU(s): one process per "
            f"GPU. Fix: set train.processes to at most {torch.cuda.device_count()}"
        )
    threads = threads_per_process(n, cfg.train.threads)
    if not torch.cuda.is_available() and n * threads > usable_cores():
        log.warning("%d processes x %d threads on %d cores: they will compete for them", n, threads, usable_cores())
    checkpoints.mkdir(parents=True, exist_ok=True)
    resume = resume_point(checkpoints, n)
    if resume is not None:
        log.warning("resuming training from %s left by an earlier run that did not finish", resume)
    with tempfile.TemporaryDirectory(prefix=".launch-", dir=checkpoints.parent) as tmp:
        work = Path(tmp)
        data.save_to_disk(str(work / "data"))
        tokenizer.save_pretrained(str(work / "tokenizer"))
        spec = {
            "config": cfg.model_dump(mode="json"),
            "data": str(work / "data"),
            "tokenizer": str(work / "tokenizer"),
            "checkpoints": str(checkpoints),
            "resume": str(resume) if resume is not None else None,
            "threads": threads,
            "output": str(work / "output"),
            "parent_pid": os.getpid(),
        }
        (work / "spec.json").write_text(json.dumps(spec))
        device = "GPU" if torch.cuda.is_available() else f"CPU, {threads} thread(s) each"
        log.info("training in %d processes (%s), %d rows per process per step", n, device, cfg.train.batch_size // n)
        wall = launch(
            ["-m", WORKER_MODULE, str(work / "spec.json")],
            n,
            work,
            env={"OMP_NUM_THREADS": str(threads)},
            fix=failure_fix(checkpoints, resume),
            done=work / "output" / RESULT_FILE,
        )
        result = json.loads((work / "output" / RESULT_FILE).read_text())
        model_dir = work / "output" / MODEL_DIR
        architecture = (transformers.AutoConfig.from_pretrained(str(model_dir)).architectures or [""])[0]
        model_class = getattr(transformers, architecture, None)
        if model_class is None:
            raise ValueError(f"the trained model in {model_dir} names an unknown architecture {architecture!r}")
        model = model_class.from_pretrained(str(model_dir)).float().eval()
        if torch.cuda.is_available():  # where one process's trained model is: evaluation runs on the GPU too
            model.to("cuda")
        shutil.rmtree(work / "data", ignore_errors=True)
    log.info(
        "trained %d steps in %.1f s in %d processes (%.1f s with start-up); best %s=%s",
        result["steps"],
        result["train_seconds"],
        n,
        wall,
        cfg.evaluate.primary_metric,
        result["best_metric"],
    )
    import mlflow

    if mlflow.active_run() is not None:
        log_history_to_mlflow(result["log_history"])
    return TrainResult(
        model=model,
        best_metric=result["best_metric"],
        epochs_run=float(result["epochs_run"]),
        steps=int(result["steps"]),
        train_seconds=float(result["train_seconds"]),
        log_history=result["log_history"],
        extra={
            "resumed_from_step": float(result["resumed_from_step"]),
            "train_processes": float(n),
            "train_overhead_seconds": max(0.0, wall - float(result["train_seconds"])),
        },
    )
