"""Stage 3, fine-tune: the kind's ``train`` (``tuneflow.kinds``: the Trainer for classification, TRL for sft)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneflow.config import PipelineConfig
from tuneflow.kinds import get_kind
from tuneflow.tokenization import Tokenized
from tuneflow.tracking import RunContext, log_training, stage_run
from tuneflow.train_common import TrainResult


# Not retried: a failed training run must be looked at; repeating it burns the same minutes again.
@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: PipelineConfig, tokenized: Tokenized, run: RunContext) -> TrainResult:
    with stage_run(run.parent_run_id, "train"):
        checkpoints = run.checkpoint_dir or run.work_dir / "checkpoints"
        result = get_kind(cfg.kind).train(cfg, tokenized.tokenizer, tokenized.datasets, checkpoints)
        log_training(cfg, result)
    return result
