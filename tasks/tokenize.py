"""Stage 2, tokenize: ``tuneflow.tokenization.tokenize_data`` (cached on disk by content)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneflow.config import PipelineConfig
from tuneflow.data import LoadedData, Split
from tuneflow.tokenization import Tokenized, tokenize_data
from tuneflow.tracking import RunContext, log_tokenization, stage_run


# tuneflow's own content-keyed cache (tuneflow.tokenization) decides what is reused, not Prefect's.
@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize_task(cfg: PipelineConfig, data: LoadedData, split: Split, run: RunContext) -> Tokenized:
    with stage_run(run.parent_run_id, "tokenize"):
        tokenized = tokenize_data(cfg, data, split, run.cache_root)
        log_tokenization(tokenized, cfg.model.max_length, run.parent_run_id)
    return tokenized
