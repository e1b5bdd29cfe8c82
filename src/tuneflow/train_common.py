"""What every training path shares, and nothing of the project below it: the result (``TrainResult``), the error a
person acts on (``TrainingError``), the checkpoint helpers (complete marker, newest complete checkpoint, resume
point) and the Trainer log replayed into MLflow. ``tuneflow.train``, ``tuneflow.multiproc`` and the kinds import it;
it imports no module of tuneflow (heavy libraries only inside functions)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped for a reason a person has to act on; the message names what happened and the fix
    (``tuneflow run`` prints it and exits 2)."""


@dataclass
class TrainResult:
    model: PreTrainedModel
    best_metric: float | None
    epochs_run: float
    steps: int
    train_seconds: float
    log_history: list[dict[str, Any]]
    extra: dict[str, float] = field(default_factory=dict)  # kind-specific figures, logged as metrics


def trainer_log_metrics(logs: dict[str, Any]) -> dict[str, float]:
    """One Trainer log entry as MLflow metrics: ``eval_x`` -> ``eval/x``, anything else ``train/x``."""
    values = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return {k.replace("eval_", "eval/") if k.startswith("eval_") else f"train/{k}": v for k, v in values.items()}


def log_history_to_mlflow(log_history: list[dict[str, Any]]) -> None:
    """Log a finished run's Trainer log history into the active MLflow run, as ``mlflow_callback`` logs it live
    (training processes started by ``tuneflow.multiproc`` log nothing themselves: their parent replays this)."""
    import mlflow

    for entry in log_history:
        logs = {k: v for k, v in entry.items() if k != "step"}
        if logs:
            mlflow.log_metrics(trainer_log_metrics(logs), step=int(entry.get("step", 0)))


COMPLETE_MARKER = "tuneflow-complete"  # written into a checkpoint folder once everything in it is on disk


def mark_complete(folder: Path) -> None:
    """Flush every file of a saved checkpoint, then write its marker: a folder without one is never resumed from
    (a kill -9 or a power cut while transformers wrote it leaves a partial folder, which is ignored and removed).

    The marker lists every file with its size: transformers deletes older checkpoints itself (``save_total_limit``,
    keeping the best one), and a kill during that deletion leaves a marked folder with some files gone; the list
    tells it apart from a whole one."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER and not path.name.startswith(f".{COMPLETE_MARKER}"):
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
                files[path.relative_to(folder).as_posix()] = os.fstat(fh.fileno()).st_size
    marker = folder / COMPLETE_MARKER
    tmp = folder / f".{COMPLETE_MARKER}.{os.getpid()}"
    with tmp.open("w") as fh:
        json.dump({"written": time.time(), "files": files}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(marker)


def checkpoint_damage(folder: Path) -> str | None:
    """Why the checkpoint ``folder`` cannot be resumed from (None: it is whole): no marker (its save never
    finished), or a file its marker lists that is missing or of another size (a deletion cut short)."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file() or not (folder / "trainer_state.json").is_file():
        return "its save never finished"
    try:
        listed = json.loads(marker.read_text()).get("files", {})
    except (ValueError, AttributeError):
        listed = {}  # a marker written before markers listed their files: its folder counts as whole
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing (a deletion cut short)"
        if (found := path.stat().st_size) != size:
            return f"{name} is {found} bytes, not the {size} it was saved with"
    return None


def checkpoint_step(folder: Path) -> int:
    """The step of a ``checkpoint-<step>`` folder; -1 for any other name."""
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint under ``checkpoints``; partial ones (see ``checkpoint_damage``) are removed."""
    if not checkpoints.is_dir():
        return None
    complete = []
    for folder in checkpoints.iterdir():
        if not folder.is_dir() or checkpoint_step(folder) < 0:
            continue
        damage = checkpoint_damage(folder)
        if damage is None:
            complete.append(folder)
        else:
            log.warning("removing the partial checkpoint %s (%s)", folder, damage)
            shutil.rmtree(folder, ignore_errors=True)
    return max(complete, key=checkpoint_step, default=None)


def checkpoint_processes(folder: Path) -> int | None:
    """How many training processes wrote the checkpoint ``folder``: transformers saves one RNG state per process
    (``rng_state_<rank>.pth``) when there are several, ``rng_state.pth`` when there is one; None: neither."""
    ranks = list(folder.glob("rng_state_*.pth"))
    if ranks:
        return len(ranks)
    return 1 if (folder / "rng_state.pth").is_file() else None


def resume_point(checkpoints: Path, processes: int) -> Path | None:
    """The newest complete checkpoint under ``checkpoints`` to resume from (None: start from scratch).

    Raises:
        TrainingError: it was written by another number of training processes (``train.processes``): its
            per-process RNG states would not match, and a resume would silently differ from the run it continues.
    """
    resume = latest_checkpoint(checkpoints)
    if resume is None:
        return None
    written = checkpoint_processes(resume)
    if written is not None and written != processes:
        raise TrainingError(
            f"the checkpoint {resume} left by an earlier run that did not finish was written by {written} training "
            f"process(es), but train.processes is {processes}; a resume across a different number of processes is "
            f"refused (its RNG states would not match). Fix: rerun with train.processes={written} (--set "
            f"train.processes={written}) to resume, or delete {checkpoints} to start this training over"
        )
    return resume
