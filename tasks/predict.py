"""Batch scoring with a registered model (``NAME@ALIAS`` or ``NAME/VERSION``), offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks.data import DataError


class PredictError(ValueError):
    """The model reference cannot be resolved or loaded."""


@dataclass
class PredictOutput:
    rows: int
    model_uri: str
    version: str


def resolve_model(ref: str) -> tuple[str, str]:
    """``NAME@ALIAS`` / ``NAME/VERSION`` -> (models:/ URI, version number)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    ref = ref.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
        elif "/" in ref:
            name, version = ref.rsplit("/", 1)
            client.get_model_version(name, version)
        else:
            raise PredictError(f"model reference {ref!r}: expected NAME@ALIAS (e.g. {ref}@champion) or NAME/VERSION")
    except MlflowException as exc:
        raise PredictError(f"model {ref!r} not found in the registry: {exc.message}. Fix: check 'tuneflow models'") from exc
    return f"models:/{name}/{version}", str(version)


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True, dtype=False)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}. Fix: pass a UTF-8 CSV, JSONL or Parquet file") from exc


def predict_file(ref: str, input_path: Path, output_path: Path, text_column: str = "text", batch_size: int = 64) -> PredictOutput:
    """Score every row of ``input_path`` and write input columns + ``label``, ``score``, ``model_version``."""
    import mlflow

    frame = _read(input_path)
    if text_column not in frame.columns:
        raise DataError(f"column '{text_column}' not found in {input_path}; columns are: {', '.join(map(str, frame.columns))}. Fix: pass --text-column")
    uri, version = resolve_model(ref)
    model = mlflow.pyfunc.load_model(uri)
    texts = frame[text_column].fillna("").astype(str).tolist()
    preds = pd.concat(
        [model.predict(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)] or [pd.DataFrame(columns=["label", "score"])],
        ignore_index=True,
    )
    out = frame.copy()
    out["label"] = preds["label"].to_numpy()
    out["score"] = preds["score"].astype(float).round(6).to_numpy()
    out["model_version"] = version
    output_path.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(output_path, index=False)
    return PredictOutput(len(out), uri, version)
