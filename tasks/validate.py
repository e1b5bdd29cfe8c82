"""Stage 1, validate: ``tuneflow.landing.check_data`` (a landing zone's new batches, or the single file)."""

from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuneflow.config import PipelineConfig
from tuneflow.kinds import get_kind
from tuneflow.kinds.catalog import facts_of
from tuneflow.landing import DataCheck, check_data
from tuneflow.models import load_tokenizer
from tuneflow.reporting import artifact_key, validation_artifact
from tuneflow.tracking import RunContext, log_validation, stage_run
from tuneflow.watch import QUARANTINED_EVENT, resource_id

log = logging.getLogger(__name__)


# Not retried: a batch that fails validation fails again; it must be looked at, not repeated.
@task(name="validate", cache_policy=NO_CACHE)
def validate_task(cfg: PipelineConfig, run: RunContext, config_file: str) -> DataCheck:
    """Judge the data; raises ``DataError`` (ValidationFailed / BatchRejected) when it must not be trained on."""
    with stage_run(run.parent_run_id, "validate"):
        # the checks that count tokens need the base model's tokenizer, as the kind prepares it
        checks = facts_of(cfg.kind).token_checks
        wanted = any(cfg.validation.severity_of(c) != "off" for c in checks)
        tokenizer = get_kind(cfg.kind).prepare_tokenizer(load_tokenizer(cfg.model), cfg) if wanted else None
        check = check_data(cfg, config_file, run.work_dir / "data_docs", tokenizer)
        log_validation(check, run.parent_run_id)
        if check.reports:
            create_markdown_artifact(
                key=artifact_key(cfg.name, "validation"),
                markdown=validation_artifact(check.reports),
                description="Every expectation of every batch: result, observed value, threshold",
            )
        if check.gate is not None and check.gate.quarantined:
            from prefect.runtime import flow_run

            files = [
                {"name": o.name, "path": str(o.path), "checks": [c.name for c in o.report.failed]}
                for o in check.gate.quarantined
            ]
            emit_quarantined(cfg, files, trained=check.error is None, flow_run_url=str(flow_run.ui_url or ""))
        if check.error is not None:
            raise check.error
    return check


def emit_quarantined(cfg: PipelineConfig, files: list[dict[str, Any]], trained: bool, flow_run_url: str) -> None:
    """Announce quarantined batches (``tuneflow.batch.quarantined``); best effort: an alert must never fail a run."""
    from prefect.events import emit_event

    listed = "; ".join(f"{f['name']} ({', '.join(f['checks']) or 'validation'})" for f in files)
    outcome = "the accepted batches were trained on" if trained else "nothing was trained"
    message = (
        f"{len(files)} batch(es) of {cfg.name} quarantined in {cfg.data.landing}/quarantine: {listed}; {outcome}. "
        "Each has its report beside it (<name>.report.json and <name>.report/ in HTML)."
    )
    try:
        emit_event(
            event=QUARANTINED_EVENT,
            resource={"prefect.resource.id": resource_id(cfg.name), "prefect.resource.name": cfg.name},
            payload={
                "dataset": cfg.name,
                "model": cfg.registry.model_name,
                "files": files,
                "trained": trained,
                "message": message,
                "flow_run_url": flow_run_url,
            },
        )
    except Exception:  # noqa: BLE001 - an alert must never fail the run that reports it
        log.exception("could not emit %s", QUARANTINED_EVENT)
