"""MLflow setup: the local sqlite store by default, a team server through MLFLOW_TRACKING_URI.

Nothing here runs at import time; the CLI and the flow call ``configure_tracking`` at their start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"
DEFAULT_UI = "http://127.0.0.1:5000"


def local_store(root: Path | None = None) -> Path:
    return ((root or Path.cwd()) / STORE_DIR).resolve()


def configure_tracking(root: Path | None = None) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` if set, else at ``mlruns/mlflow.db`` under ``root`` (cwd).

    MLflow 3's plain-folder store is in maintenance mode, so the local default is a sqlite database
    with artifacts in ``mlruns/artifacts``.
    """
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        store = local_store(root)
        store.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "default"


def artifact_key(name: str, kind: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes), e.g. ``sms-spam-retrain``."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") + f"-{kind}"


def ensure_experiment(name: str) -> str:
    """Get or create the experiment; on the local sqlite store its artifacts go under ``mlruns/artifacts``."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        return exp.experiment_id
    location = None
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / "artifacts" / _slug(name)).as_uri()
    exp_id = mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def ui_base_url() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return os.environ.get("TUNEFLOW_MLFLOW_UI_URL", DEFAULT_UI).rstrip("/")


def run_url(experiment_id: str, run_id: str) -> str:
    return f"{ui_base_url()}/#/experiments/{experiment_id}/runs/{run_id}"


def model_url(name: str, version: str) -> str:
    return f"{ui_base_url()}/#/models/{name}/versions/{version}"


@contextmanager
def stage_run(parent_run_id: str, stage: str) -> Iterator[Any]:
    """A nested MLflow run for one stage; its wall time goes to the stage run and the parent run.

    The parent is passed explicitly because Prefect may run a task on another thread, and MLflow's
    active-run stack is per thread.
    """
    import mlflow

    start = time.perf_counter()
    with mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent_run_id, tags={"tuneflow.stage": stage}) as run:
        yield run
        seconds = time.perf_counter() - start
        mlflow.log_metric("stage_seconds", seconds)
        mlflow.MlflowClient().log_metric(parent_run_id, f"time/{stage}_seconds", seconds)


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


MAX_INPUT_TAG = 500  # MLflow 3 rejects a dataset input tag value longer than this (the whole run fails)


def _sources_tag(names: list[str]) -> str:
    """The source file names as JSON within MLflow's tag limit; a long list ends in "+N more".

    The names are relative to the dataset source (the accepted/ folder of a landing zone).
    """
    for keep in range(len(names), 0, -1):
        shown = names[:keep] + ([f"+{len(names) - keep} more"] if keep < len(names) else [])
        text = json.dumps(shown)
        if len(text) <= MAX_INPUT_TAG:
            return text
    return json.dumps([f"{len(names)} files"])


def log_dataset_inputs(cfg, loaded, split) -> None:
    """Log the train and eval inputs to the active run with the full-content digest and source files.

    MLflow's own pandas digest hashes only the first 10,000 rows; tuneflow passes its own digest over
    every row, so a model version leads to exactly the data that trained it.
    """
    import mlflow

    from tasks.data import LABEL, TEXT, content_digest

    sources = _sources_tag([p.name for p in loaded.sources] or [str(loaded.source)])
    for context, frame in (("training", split.train), ("evaluation", split.eval)):
        digest = content_digest(frame)
        ds = mlflow.data.from_pandas(frame[[TEXT, LABEL]], source=str(loaded.source), targets=LABEL,
                                     # MLflow caps a dataset digest at 36 characters; the full one is in the tags
                                     name=f"{cfg.name}-{'train' if context == 'training' else 'eval'}", digest=digest[:32])
        mlflow.log_input(ds, context=context, tags={
            "rows": str(len(frame)),
            "tuneflow.data_digest": loaded.digest,
            "tuneflow.split_digest": digest,
            "tuneflow.sources": sources,
        })
