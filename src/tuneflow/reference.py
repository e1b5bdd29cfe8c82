"""The drift reference of a registered version: a seeded sample of the rows it was trained on.

Logged next to the model when a version is registered (``monitor/reference.parquet`` on its run, the version
tag ``tuneflow.monitor_reference``), read back by monitoring. Parquet is data, never code: reading it runs
nothing, and the file is checked for its size and columns first.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from tuneflow.config import PipelineConfig
from tuneflow.data import LABEL, TEXT
from tuneflow.registry_base import REFERENCE_TAG

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

REFERENCE_PATH = "monitor/reference.parquet"  # on a version's run: the seeded sample of its training rows
MAX_REFERENCE_BYTES = 50 << 20  # a reference file larger than this is not read (not what tuneflow writes)


def reference_sample(train: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """A seeded sample of at most ``monitor.reference_rows`` training rows (text and label/response only)."""
    cols = [c for c in (TEXT, LABEL) if c in train.columns]
    frame = train[cols].reset_index(drop=True)
    if len(frame) > cfg.monitor.reference_rows:
        frame = frame.sample(n=cfg.monitor.reference_rows, random_state=0).reset_index(drop=True)
    return frame.astype(str)


def log_reference(train: pd.DataFrame, cfg: PipelineConfig) -> str:
    """Log the reference sample into the active MLflow run; returns its ``runs:/`` URI (a version tag)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(REFERENCE_PATH).name
        reference_sample(train, cfg).to_parquet(path, index=False)
        mlflow.log_artifact(str(path), str(Path(REFERENCE_PATH).parent))
    return f"runs:/{mlflow.active_run().info.run_id}/{REFERENCE_PATH}"


def load_reference(mv: ModelVersion) -> tuple[pd.DataFrame | None, str]:
    """The version's reference sample, or None and why not. Read as Parquet (data, never code), checked for
    its columns and size."""
    import mlflow

    uri = (mv.tags or {}).get(REFERENCE_TAG)
    if not uri:
        return None, f"v{mv.version} has no training-data sample (registered before monitoring existed)"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except Exception as exc:  # noqa: BLE001 - any store error: drift is skipped and the reason recorded
            return None, f"v{mv.version}'s training-data sample could not be read ({type(exc).__name__}: {exc})"
        if not local.is_file() or local.stat().st_size > MAX_REFERENCE_BYTES:
            return None, f"v{mv.version}'s training-data sample is not a file tuneflow wrote ({uri})"
        try:
            frame = pd.read_parquet(local)
        except (OSError, ValueError) as exc:
            return None, f"v{mv.version}'s training-data sample is not readable Parquet ({exc})"
    if TEXT not in frame.columns:
        return None, f"v{mv.version}'s training-data sample has no '{TEXT}' column"
    return frame.astype(str), ""
