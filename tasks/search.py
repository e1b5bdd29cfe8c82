"""The search stage of ``tuneflow tune``: ``tuneflow.search.run_search`` over the validated split, and the best trial's
model ready for the gate (kept from its trial, or trained again when the trial ran in an earlier call)."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneflow.config import PipelineConfig
from tuneflow.data import LoadedData, Split
from tuneflow.search import SearchOutcome, SearchPlan, TrialModel, log_search, run_search, study_plots
from tuneflow.tokenization import Tokenized, tokenize_data
from tuneflow.tracking import RunContext, log_evaluation, log_training, stage_run


# Not retried: a study resumes by itself (load_if_exists); rerunning the task would only repeat its trials.
@task(name="search", cache_policy=NO_CACHE)
def search_task(
    cfg: PipelineConfig, data: LoadedData, split: Split, plan: SearchPlan, run: RunContext
) -> SearchOutcome:
    """Run the study; each trial is an MLflow run nested under the parent run (not under a stage run: the trials are
    what a person browses). The split is tokenized once per base model (and cached on disk by content)."""
    logger = get_run_logger()
    tokenized: dict[str, Tokenized] = {}

    def tokenize(trial_cfg: PipelineConfig) -> Tokenized:
        base = trial_cfg.model.base_model
        if base not in tokenized:
            tokenized[base] = tokenize_data(trial_cfg, data, split, run.cache_root)
        return tokenized[base]

    logger.info(
        "study %s: %d trial(s) in all, %d finished before; budget %.0f min (storage %s)",
        plan.study_name,
        plan.trials,
        plan.finished,
        plan.timeout_s / 60,
        plan.storage.split("://")[0],
    )
    started = time.perf_counter()
    outcome = run_search(cfg, split, tokenize, plan, run.parent_run_id, run.work_dir / "trials")
    outcome.plots, outcome.plot_notes = study_plots(cfg, plan, run.work_dir / "search")
    log_search(outcome, run.parent_run_id)
    import mlflow

    mlflow.MlflowClient().log_metric(run.parent_run_id, "time/search_seconds", time.perf_counter() - started)
    logger.info(
        "best: trial %d, %s %.4f with %s",
        outcome.best_number,
        outcome.metric,
        outcome.best_value,
        outcome.best_settings,
    )
    return outcome


@task(name="best-trial", cache_policy=NO_CACHE)
def best_model_task(outcome: SearchOutcome, data: LoadedData, split: Split, run: RunContext) -> TrialModel:
    """The best trial's model, evaluated on the eval split and logged as the evaluate stage logs it. Kept from its
    trial when it ran in this call; else (a resumed study whose best trial ran before) trained again with its
    settings on the same data and seed (for kind sft without the trial's evaluations along the way)."""
    from tuneflow.kinds import get_kind

    cfg = outcome.best_config
    best = outcome.best
    if best is None:
        get_run_logger().info("the best trial %d ran in an earlier call: training it again", outcome.best_number)
        with stage_run(run.parent_run_id, "train"):
            tokenized = tokenize_data(cfg, data, split, run.cache_root)
            kind = get_kind(cfg.kind)
            trained = kind.train(cfg, tokenized.tokenizer, tokenized.datasets, Path(run.work_dir) / "best")
            log_training(cfg, trained)
        with stage_run(run.parent_run_id, "evaluate"):
            evaluation = kind.evaluate(trained.model, tokenized.tokenizer, split.eval, cfg, cfg.model.max_length)
            log_evaluation(evaluation, run.parent_run_id, run.work_dir)
        return TrialModel(outcome.best_number, cfg, tokenized, trained, evaluation)
    with stage_run(run.parent_run_id, "evaluate"):  # scored in its trial: the same numbers, on the parent run
        log_evaluation(best.evaluation, run.parent_run_id, run.work_dir)
    return best
