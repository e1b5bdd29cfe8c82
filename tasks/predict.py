"""Batch scoring: ``tuneflow.predict.score_path``, then the batch's record in MLflow."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneflow.predict import BatchSummary, log_summary, monitor_scored, score_path


@task(name="score", cache_policy=NO_CACHE)
def score_task(ref: str, input_path: Path, output_path: Path, text_column: str, batch_size: int) -> BatchSummary:
    return score_path(ref, input_path, output_path, text_column, batch_size)


# I/O to the tracking store: transient faults (a busy sqlite file, a server restart) are retried.
@task(name="log-predictions", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def log_summary_task(summary: BatchSummary) -> str:
    return log_summary(summary)


@task(name="monitor-predictions", cache_policy=NO_CACHE)
def monitor_scored_task(summary: BatchSummary, text_column: str) -> list[dict]:
    """Each scored file as an unlabelled point of the model's monitoring history (predicted labels, drift)."""
    return monitor_scored(summary, text_column)
