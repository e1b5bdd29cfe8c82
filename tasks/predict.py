"""Batch scoring with a registered model (``NAME@ALIAS`` or ``NAME/VERSION``), offline.

``score_path`` scores one file or every CSV/JSONL/Parquet file of a folder; ``log_summary`` records the
batch (rows, label distribution, latency per row) in the MLflow experiment ``<model name>-predictions``.
``flows/predict.py`` sequences the two.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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


INPUT_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet", ".pq")


@dataclass
class BatchSummary:
    model_ref: str
    model_uri: str
    version: str
    inputs: list[str]
    outputs: list[str]
    rows: int
    label_counts: dict[str, int]
    seconds: float  # model scoring only (not loading, not file I/O)
    per_file: dict[str, int] = field(default_factory=dict)

    @property
    def ms_per_row(self) -> float:
        return 1000 * self.seconds / self.rows if self.rows else 0.0


def list_inputs(path: Path) -> list[Path]:
    """``path`` itself, or the CSV/JSONL/Parquet files directly inside the folder ``path`` (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES)
        if not files:
            raise DataError(f"folder {path} holds no {'/'.join(INPUT_SUFFIXES)} files. Fix: point the input at a data file or a folder of them")
        return files
    raise DataError(f"input not found: {path}. Fix: pass an existing file or folder")


def _score_frame(model, frame: pd.DataFrame, source: Path, text_column: str, batch_size: int, version: str) -> pd.DataFrame:
    if text_column not in frame.columns:
        raise DataError(f"column '{text_column}' not found in {source}; columns are: {', '.join(map(str, frame.columns))}. Fix: pass --text-column")
    texts = frame[text_column].fillna("").astype(str).tolist()
    preds = pd.concat(
        [model.predict(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)] or [pd.DataFrame(columns=["label", "score"])],
        ignore_index=True,
    )
    out = frame.copy()
    out["label"] = preds["label"].to_numpy()
    out["score"] = preds["score"].astype(float).round(6).to_numpy()
    out["model_version"] = version
    return out


def predict_file(ref: str, input_path: Path, output_path: Path, text_column: str = "text", batch_size: int = 64) -> PredictOutput:
    """Score every row of ``input_path`` and write input columns + ``label``, ``score``, ``model_version``."""
    summary = score_path(ref, input_path, output_path, text_column, batch_size)
    return PredictOutput(summary.rows, summary.model_uri, summary.version)


def score_path(ref: str, input_path: Path, output_path: Path, text_column: str = "text", batch_size: int = 64) -> BatchSummary:
    """Score a file (output: a CSV file) or a folder of files (output: a folder of ``<stem>.scored.csv``).

    Every input is read and checked before the model is loaded, so a bad file fails fast.
    """
    import mlflow

    files = list_inputs(Path(input_path))
    frames = {f: _read(f) for f in files}
    for f, frame in frames.items():
        if text_column not in frame.columns:
            raise DataError(f"column '{text_column}' not found in {f}; columns are: {', '.join(map(str, frame.columns))}. Fix: pass --text-column")
    uri, version = resolve_model(ref)
    model = mlflow.pyfunc.load_model(uri)
    folder = Path(input_path).is_dir()
    outputs, counts, per_file, seconds = [], {}, {}, 0.0
    for f, frame in frames.items():
        start = time.perf_counter()
        out = _score_frame(model, frame, f, text_column, batch_size, version)
        seconds += time.perf_counter() - start
        dst = Path(output_path) / f"{f.stem}.scored.csv" if folder else Path(output_path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        out.to_csv(dst, index=False)
        outputs.append(str(dst))
        per_file[str(f)] = len(out)
        for label, n in out["label"].value_counts().items():
            counts[str(label)] = counts.get(str(label), 0) + int(n)
    return BatchSummary(ref, uri, version, [str(f) for f in files], outputs, sum(per_file.values()), dict(sorted(counts.items())), seconds, per_file)


def log_summary(summary: BatchSummary) -> str:
    """Record a scored batch in the MLflow experiment ``<model name>-predictions``; returns the run id."""
    import mlflow

    from tasks.tracking import ensure_experiment

    name = summary.model_uri.removeprefix("models:/").rsplit("/", 1)[0]
    ensure_experiment(f"{name}-predictions")
    with mlflow.start_run(run_name=f"predict-v{summary.version}", tags={"tuneflow.model_version": summary.version, "tuneflow.model_ref": summary.model_ref}) as run:
        mlflow.log_params({"model_ref": summary.model_ref, "model_uri": summary.model_uri, "model_version": summary.version,
                           "inputs": ",".join(summary.inputs)[:500], "files": len(summary.inputs)})
        metrics = {"rows": summary.rows, "seconds": summary.seconds, "latency_ms_per_row": summary.ms_per_row}
        for label, n in summary.label_counts.items():
            metrics[f"label_count/{label}"] = n
            metrics[f"label_share/{label}"] = n / summary.rows if summary.rows else 0.0
        mlflow.log_metrics(metrics)
        mlflow.log_dict({**summary.__dict__, "ms_per_row": summary.ms_per_row}, "summary.json")
    return run.info.run_id


# ---- Prefect tasks -----------------------------------------------------------------------------

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="score", cache_policy=NO_CACHE)
def score_task(ref: str, input_path: Path, output_path: Path, text_column: str, batch_size: int) -> BatchSummary:
    return score_path(ref, input_path, output_path, text_column, batch_size)


@task(name="log-predictions", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)  # I/O to the tracking store: transient faults
def log_summary_task(summary: BatchSummary) -> str:
    return log_summary(summary)
