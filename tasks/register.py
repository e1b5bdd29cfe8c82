"""Stage 5, register: log and register the new version (alias ``challenger``); promote it when decided."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneflow.config import PipelineConfig
from tuneflow.history import ChampionChanged, ChampionLocked, Move, promote_by_gate, record_refused_promotion
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
def promote_task(cfg: PipelineConfig, version: str, decision: Decision, actor: str) -> Move | str:
    """Move ``champion`` to ``version`` (a history entry first, then the alias). When the move is refused, the
    version stays challenger, its tags and card say why, and the short reason is returned instead of a move: the
    champion changed since the decision compared with it, or another move held the champion's lock too long."""
    try:
        return promote_by_gate(cfg.registry.model_name, version, decision, actor)
    except (ChampionChanged, ChampionLocked) as exc:
        why = (
            "the champion changed meanwhile"
            if isinstance(exc, ChampionChanged)
            else "another champion move held the champion's lock too long"
        )
        get_run_logger().warning("not promoted (%s): %s", why, exc)
        record_refused_promotion(cfg.registry.model_name, version, str(exc), why)
        return why
