"""The batch scoring flow: score a file or a folder with a registered model, record the batch in MLflow.

Parameters are plain strings and ints so the flow can be deployed (Prefect UI form, schedules) as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from tuneflow.runtime import configure_environment
from tuneflow.tasks.predict import log_summary_task, monitor_scored_task, score_task
from tuneflow.tracking import configure_tracking, run_url


@flow(name="predict", log_prints=True)
def predict(
    model: str, input_path: str, output_path: str, text_column: str = "text", batch_size: int = 64
) -> dict[str, Any]:
    """Score ``input_path`` (a CSV/JSONL/Parquet file, or a folder of them) with ``model``.

    Args:
        model: ``NAME@ALIAS`` (e.g. ``sms-spam-classifier@champion``) or ``NAME/VERSION``.
        input_path: a data file, or a folder whose data files are all scored.
        output_path: the CSV to write for a file input; a folder (``<stem>.scored.csv`` per file) for a folder input.
        text_column: the column holding the text.
        batch_size: texts per model call.

    Returns:
        rows, label counts, latency per row, model version, output paths and the MLflow run id.
    """
    import mlflow

    configure_environment()
    configure_tracking()
    logger = get_run_logger()
    summary = score_task(model, Path(input_path), Path(output_path), text_column, batch_size)
    run_id = log_summary_task(summary)
    monitoring = monitor_scored_task(summary, text_column)
    for m in monitoring:
        if m["status"] == "degraded":
            logger.warning(
                "the inputs of %s drifted from the model's training data: %s", m["file"], "; ".join(m["reasons"])
            )
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    logger.info(
        "scored %d rows from %d file(s) with %s (v%s), %.2f ms/row: %s; MLflow run %s",
        summary.rows,
        len(summary.inputs),
        summary.model_uri,
        summary.version,
        summary.ms_per_row,
        summary.label_counts,
        run_id,
    )
    return {
        "rows": summary.rows,
        "label_counts": summary.label_counts,
        "ms_per_row": summary.ms_per_row,
        "model_uri": summary.model_uri,
        "version": summary.version,
        "outputs": summary.outputs,
        "run_id": run_id,
        "run_url": run_url(experiment_id, run_id),
        "monitoring": monitoring,
    }
