"""Nothing changed, nothing trained: a retrain's fingerprints, the registered version that already has one, and
what a retrain that stops there records and answers.

The retrain flow and ``tuneflow run`` (which answers before starting Prefect or importing the training stack)
both compute the fingerprints here, so both find the same version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuneflow.config import PipelineConfig
from tuneflow.landing import input_files_digest
from tuneflow.models import base_model_digest
from tuneflow.registry import fingerprint, version_with_fingerprint
from tuneflow.registry_base import FINGERPRINT_TAG, INPUT_FINGERPRINT_TAG

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities.model_registry import ModelVersion


def input_fingerprint(config: PipelineConfig) -> str | None:
    """The fingerprint over the bytes of the files the retrain would read (None when they cannot stand for the
    data: a landing zone with a batch in ``incoming/``, or nothing to read)."""
    files_digest = input_files_digest(config)
    if files_digest is None:
        return None
    return fingerprint(files_digest, config.digest(), base_model_digest(config.model))


def data_fingerprint(config: PipelineConfig, frame: pd.DataFrame) -> str:
    """The fingerprint over the validated rows the retrain would train on."""
    from tuneflow.data import content_digest

    return fingerprint(content_digest(frame), config.digest(), base_model_digest(config.model))


def same_version(
    config: PipelineConfig, fp: str | None, tag: str = FINGERPRINT_TAG, force: bool = False
) -> ModelVersion | None:
    """The registered version trained with fingerprint ``fp`` (tag ``tag``): None when forced, without a registry
    or without a fingerprint."""
    if force or fp is None or not config.registry.enabled:
        return None
    return version_with_fingerprint(config.registry.model_name, fp, tag)


def remember_input(config: PipelineConfig, same: ModelVersion, input_fp: str | None) -> None:
    """These bytes validate to exactly ``same``'s rows: tag them as its input, so the next run on them stops
    before the gate (the latest bytes seen are remembered)."""
    if input_fp is None or (same.tags or {}).get(INPUT_FINGERPRINT_TAG) == input_fp:
        return
    import mlflow

    mlflow.MlflowClient().set_model_version_tag(
        config.registry.model_name, same.version, INPUT_FINGERPRINT_TAG, input_fp
    )


def unchanged_result(
    config: PipelineConfig, version: str, what: str, run_id: str, url: str, experiment_id: str
) -> dict[str, Any]:
    """The answer of a retrain that found ``version`` trained on exactly its ``what`` ("input" or "data")."""
    reason = (
        f"nothing changed: v{version} was trained on exactly this {what}, config, base model and "
        "tuneflow version; nothing trained or registered (force: true / tuneflow run --force retrains)"
    )
    return {
        "status": "unchanged",
        "run_id": run_id,
        "run_url": url,
        "experiment_id": experiment_id,
        "version": version,
        "model_uri": f"models:/{config.registry.model_name}/{version}",
        "reason": reason,
    }


def record_unchanged_run(config: PipelineConfig, version: str, input_fp: str) -> dict[str, Any]:
    """For ``tuneflow run`` without Prefect: the parent run a retrain stopped by the input fingerprint records
    (lineage, config, ``tuneflow.outcome=unchanged``), and its answer."""
    from tuneflow.tracking import (
        configure_tracking,
        ensure_experiment,
        log_unchanged,
        run_lineage,
        run_url,
        start_parent_run,
    )

    configure_tracking()
    experiment_id = ensure_experiment(config.name)
    lineage = run_lineage(config) | {INPUT_FINGERPRINT_TAG: input_fp}
    with start_parent_run(config, "retrain-unchanged", lineage) as parent:
        log_unchanged(version)
    pid = parent.info.run_id
    return unchanged_result(config, version, "input", pid, run_url(experiment_id, pid), experiment_id)
