"""Stage 4, evaluate: the new model on the eval split, then the current champion on the same rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneflow.config import PipelineConfig
from tuneflow.data import Split
from tuneflow.evaluate import Evaluation
from tuneflow.kinds import get_kind
from tuneflow.registry import ChampionScore
from tuneflow.scoring import score_champion
from tuneflow.tracking import RunContext, log_champion_score, log_evaluation, stage_run

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    cfg: PipelineConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: Split, run: RunContext
) -> Evaluation:
    with stage_run(run.parent_run_id, "evaluate"):
        evaluation = get_kind(cfg.kind).evaluate(
            model, tokenizer, split.eval, cfg, cfg.model.max_length, new_model=True
        )
        log_evaluation(evaluation, run.parent_run_id, run.work_dir)
    return evaluation


@task(name="score-champion", cache_policy=NO_CACHE)
def score_champion_task(cfg: PipelineConfig, split: Split, run: RunContext) -> ChampionScore:
    with stage_run(run.parent_run_id, "champion"):
        champion = score_champion(cfg, split.eval)
        log_champion_score(champion, run.parent_run_id, run.work_dir)
    return champion
