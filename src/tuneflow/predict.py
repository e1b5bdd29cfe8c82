"""Batch scoring with a registered model (``NAME@ALIAS`` or ``NAME/VERSION``), offline.

``score_path`` scores one file or every CSV/JSONL/Parquet file of a folder; ``log_summary`` records the
batch (rows, label distribution, latency per row) in the MLflow experiment ``<model name>-predictions``.
``tuneflow.flows.predict`` sequences the two.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from tuneflow.config import MonitorConfig
from tuneflow.data import LABEL, TEXT, DataError
from tuneflow.files import FORMATS, read_frame
from tuneflow.kinds import FineTuningKind, get_kind
from tuneflow.monitor import monitor_predictions
from tuneflow.registry import get_version, version_by_alias
from tuneflow.registry_base import MODEL_REF_TAG, MODEL_VERSION_TAG, RegistryError, kind_of
from tuneflow.tracking import ensure_experiment

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


class PredictError(ValueError):
    """The model reference cannot be resolved or loaded."""


def resolve_model(ref: str) -> ModelVersion:
    """The registered version behind ``NAME@ALIAS`` / ``NAME/VERSION`` (``models:/`` prefix optional).

    Raises:
        PredictError: a malformed reference, or no such model, alias or version.
    """
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = version_by_alias(name, alias)
        if mv is None:
            raise PredictError(
                f"model {ref!r} not found in the registry: {name} has no alias {alias!r}. Fix: check 'tuneflow models'"
            )
        return mv
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        try:
            return get_version(name, version)
        except RegistryError as exc:
            raise PredictError(f"model {ref!r} not found in the registry: {exc}") from exc
    raise PredictError(f"model reference {ref!r}: expected NAME@ALIAS (e.g. {ref}@champion) or NAME/VERSION")


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    try:
        # An unknown extension is read as CSV (the output is CSV too)
        return read_frame(path, FORMATS.get(path.suffix.lower(), "csv"))
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read {path}: {exc}. Fix: pass a UTF-8 CSV, JSONL or Parquet file") from exc


INPUT_SUFFIXES = tuple(FORMATS)


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
            raise DataError(
                f"folder {path} holds no {'/'.join(INPUT_SUFFIXES)} files. Fix: point the input at a data file "
                "or a folder of them"
            )
        return files
    raise DataError(f"input not found: {path}. Fix: pass an existing file or folder")


def _score_frame(
    model, kind: FineTuningKind, frame: pd.DataFrame, text_column: str, batch_size: int, version: str
) -> pd.DataFrame:
    texts = frame[text_column].fillna("").astype(str).tolist()
    columns = {c: list(v) for c, v in kind.prediction_columns(kind.empty_output()).items()}
    for i in range(0, len(texts), batch_size):
        output = model.predict(kind.model_input(texts[i : i + batch_size]))
        for column, values in kind.prediction_columns(output).items():
            columns[column].extend(list(values))
    out = frame.copy()
    for column, values in columns.items():
        out[column] = values
    out["model_version"] = version
    return out


def scored_name(path: Path, files: list[Path]) -> str:
    """``<stem>.scored.csv``, or ``<name>.scored.csv`` when another input shares the stem (``a.csv`` and
    ``a.jsonl`` must not overwrite each other's output)."""
    shared = sum(1 for f in files if f.stem == path.stem) > 1
    return f"{path.name if shared else path.stem}.scored.csv"


def score_path(
    ref: str, input_path: Path, output_path: Path, text_column: str = "text", batch_size: int = 64
) -> BatchSummary:
    """Score a file (output: a CSV file) or a folder of files (output: a folder of ``<stem>.scored.csv``).

    Every input is read and checked before the model is loaded, so a bad file fails fast.
    """
    import mlflow

    files = list_inputs(Path(input_path))
    frames = {f: _read(f) for f in files}
    for f, frame in frames.items():
        if text_column not in frame.columns:
            raise DataError(
                f"column '{text_column}' not found in {f}; columns are: {', '.join(map(str, frame.columns))}. "
                "Fix: pass --text-column"
            )
    mv = resolve_model(ref)
    uri, version = f"models:/{mv.name}/{mv.version}", str(mv.version)
    kind = get_kind(kind_of(mv))
    from tuneflow.trust import checked_version

    with checked_version(mv) as local:  # refuses versions that carry code or pickles, before loading anything
        model = mlflow.pyfunc.load_model(str(local))
        folder = Path(input_path).is_dir()
        outputs, counts, per_file, seconds = [], {}, {}, 0.0
        for f, frame in frames.items():
            start = time.perf_counter()
            out = _score_frame(model, kind, frame, text_column, batch_size, version)
            seconds += time.perf_counter() - start
            dst = Path(output_path) / scored_name(f, files) if folder else Path(output_path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            out.to_csv(dst, index=False)
            outputs.append(str(dst))
            per_file[str(f)] = len(out)
            for label, n in out["label"].value_counts().items() if "label" in out.columns else []:
                counts[str(label)] = counts.get(str(label), 0) + int(n)
    return BatchSummary(
        ref,
        uri,
        version,
        [str(f) for f in files],
        outputs,
        sum(per_file.values()),
        dict(sorted(counts.items())),
        seconds,
        per_file,
    )


def log_summary(summary: BatchSummary) -> str:
    """Record a scored batch in the MLflow experiment ``<model name>-predictions``; returns the run id."""
    import mlflow

    name = summary.model_uri.removeprefix("models:/").rsplit("/", 1)[0]
    ensure_experiment(f"{name}-predictions")
    with mlflow.start_run(
        run_name=f"predict-v{summary.version}",
        tags={MODEL_VERSION_TAG: summary.version, MODEL_REF_TAG: summary.model_ref},
    ) as run:
        mlflow.log_params(
            {
                "model_ref": summary.model_ref,
                "model_uri": summary.model_uri,
                "model_version": summary.version,
                "inputs": ",".join(summary.inputs)[:500],
                "files": len(summary.inputs),
            }
        )
        metrics = {"rows": summary.rows, "seconds": summary.seconds, "latency_ms_per_row": summary.ms_per_row}
        for label, n in summary.label_counts.items():
            metrics[f"label_count/{label}"] = n
            metrics[f"label_share/{label}"] = n / summary.rows if summary.rows else 0.0
        mlflow.log_metrics(metrics)
        mlflow.log_dict({**summary.__dict__, "ms_per_row": summary.ms_per_row}, "summary.json")
    return run.info.run_id


def monitor_scored(summary: BatchSummary, text_column: str = "text") -> list[dict[str, Any]]:
    """Record every scored file in the model's monitoring history (``tuneflow.monitor``): the predicted-label
    distribution and the drift of its texts against the version's training data. Returns, per file, its
    step, status and reasons (``degraded``: its inputs drifted)."""
    name = summary.model_uri.removeprefix("models:/").rsplit("/", 1)[0]
    mv = get_version(name, summary.version)
    out = []
    for source, scored in zip(summary.inputs, summary.outputs, strict=True):
        frame = pd.read_csv(scored, dtype=str, keep_default_na=False)
        cols = {text_column: TEXT} | ({"label": LABEL} if "label" in frame.columns else {})
        frame = frame.rename(columns=cols)[list(cols.values())]
        point = monitor_predictions(MonitorConfig(), mv, frame, Path(source).name)
        out.append({"file": source, "step": point.step, "status": point.status, "reasons": point.reasons})
    return out
