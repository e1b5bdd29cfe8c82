"""Stage 1, validate: ``tuneflow.landing.check_data`` (a landing zone's new batches, or the single file)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuneflow.config import PipelineConfig
from tuneflow.kinds import get_kind
from tuneflow.landing import DataCheck, check_data
from tuneflow.models import load_tokenizer
from tuneflow.reporting import artifact_key, validation_artifact
from tuneflow.tracking import RunContext, log_validation, stage_run

# The checks that count tokens, per kind (they need the base model's tokenizer, with its chat template for sft).
TOKEN_CHECKS = {"classification": ("text_tokens",), "sft": ("prompt_tokens", "pair_tokens")}


# Not retried: a batch that fails validation fails again; it must be looked at, not repeated.
@task(name="validate", cache_policy=NO_CACHE)
def validate_task(cfg: PipelineConfig, run: RunContext, config_file: str) -> DataCheck:
    """Judge the data; raises ``DataError`` (ValidationFailed / BatchRejected) when it must not be trained on."""
    with stage_run(run.parent_run_id, "validate"):
        checks = TOKEN_CHECKS[cfg.kind]
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
        if check.error is not None:
            raise check.error
    return check
