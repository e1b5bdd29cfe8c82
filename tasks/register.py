"""Stage 5, register: log and register the new version (alias ``challenger``); promote it when decided."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneflow.config import PipelineConfig
from tuneflow.history import ChampionChanged, Move, promote_by_gate, record_refused_promotion
from tuneflow.registry import Decision, register_version
from tuneflow.tracking import RunContext, log_decision, stage_run

if TYPE_CHECKING:
    import pandas as pd
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# Not retried: a half-done registration is resumed by nobody; its write order keeps the registry consistent.
@task(name="register", cache_policy=NO_CACHE)
def register_task(
    cfg: PipelineConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    decision: Decision,
    card: str,
    tags: dict[str, str],
    example: list[str],
    run: RunContext,
    metrics: dict[str, float] | None = None,
    reference: pd.DataFrame | None = None,
) -> str:
    """Returns the registered version number."""
    with stage_run(run.parent_run_id, "register"):
        mv = register_version(model, tokenizer, cfg, decision, tags, card, example, metrics, reference)
        log_decision(decision, str(mv.version), run.parent_run_id)
    return str(mv.version)


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(cfg: PipelineConfig, version: str, decision: Decision, actor: str) -> Move | None:
    """Move ``champion`` to ``version`` (a history entry first, then the alias); None when the champion
    changed since the decision compared with it (the version stays challenger and says why)."""
    try:
        return promote_by_gate(cfg.registry.model_name, version, decision, actor)
    except ChampionChanged as exc:
        get_run_logger().warning("not promoted: %s", exc)
        record_refused_promotion(cfg.registry.model_name, version, str(exc))
        return None
