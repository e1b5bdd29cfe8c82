"""Stage 3, fine-tune: ``tuneflow.train.train_model`` with the kind's model, collator and metrics."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneflow.config import PipelineConfig
from tuneflow.tokenization import Tokenized
from tuneflow.tracking import RunContext, log_training, stage_run
from tuneflow.train import TrainResult, train_model


# Not retried: a failed training run must be looked at; repeating it burns the same minutes again.
@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: PipelineConfig, tokenized: Tokenized, run: RunContext) -> TrainResult:
    with stage_run(run.parent_run_id, "train"):
        result = train_model(cfg, tokenized.tokenizer, tokenized.datasets, run.work_dir)
        log_training(cfg, result)
    return result
