"""The search stage of ``tuneflow tune``: this process's trials of the study (``tuneflow.search.run_trials``) over the
validated split, the study as all its workers left it, and the best trial's model ready for the gate (kept from its
trial, or trained again when the trial ran in an earlier call or in another worker)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneflow.config import PipelineConfig
from tuneflow.data import LoadedData, Split
from tuneflow.search import (
    SearchOutcome,
    SearchPlan,
    TrialModel,
    Trials,
    log_search,
    run_trials,
    search_outcome,
    study_plots,
)
from tuneflow.tokenization import Tokenized, tokenize_data
from tuneflow.tracking import RunContext, log_evaluation, log_training, stage_run


def _tokenizer(data: LoadedData, split: Split, run: RunContext) -> Callable[[PipelineConfig], Tokenized]:
    """The split tokenized for a trial's config: once per base model (and cached on disk by content)."""
    tokenized: dict[str, Tokenized] = {}

    def tokenize(trial_cfg: PipelineConfig) -> Tokenized:
        base = trial_cfg.model.base_model
        if base not in tokenized:
            tokenized[base] = tokenize_data(trial_cfg, data, split, run.cache_root)
        return tokenized[base]

    return tokenize


# Not retried: a study resumes by itself (load_if_exists); rerunning the task would only repeat its trials.
@task(name="trials", cache_policy=NO_CACHE)
def trials_task(
    cfg: PipelineConfig,
    data: LoadedData,
    split: Split,
    plan: SearchPlan,
    run: RunContext,
    take_over: bool = True,
    tags: dict[str, str] | None = None,
) -> Trials:
    """This process's trials of the study (``tuneflow.search.run_trials``); each trial is an MLflow run nested under
    the parent run (not under a stage run: the trials are what a person browses). ``take_over``: then wait for the
    other workers' trials and run again one whose worker died (the tune run does; a tune-worker does not)."""
    get_run_logger().info(
        "study %s: %d trial(s) in all, %d finished before; budget %.0f min (storage %s); %d worker(s)",
        plan.study_name,
        plan.trials,
        plan.finished,
        plan.timeout_s / 60,
        plan.storage.split("://")[0],
        plan.workers,
    )
    return run_trials(
        cfg, split, _tokenizer(data, split, run), plan, run.parent_run_id, run.work_dir / "trials", take_over, tags
    )


@task(name="search", cache_policy=NO_CACHE)
def study_task(cfg: PipelineConfig, plan: SearchPlan, own: Trials, run: RunContext, seconds: float) -> SearchOutcome:
    """The study as all its workers left it, on the parent run: its table, Optuna's plots, the best trial."""
    logger = get_run_logger()
    outcome = search_outcome(cfg, plan, own)
    outcome.plots, outcome.plot_notes = study_plots(cfg, plan, run.work_dir / "search")
    log_search(outcome, run.parent_run_id)
    import mlflow

    mlflow.MlflowClient().log_metric(run.parent_run_id, "time/search_seconds", seconds)
    logger.info(
        "best: trial %d, %s %.4f with %s (%d trial(s) run by this process)",
        outcome.best_number,
        outcome.metric,
        outcome.best_value,
        outcome.best_settings,
        outcome.ran,
    )
    return outcome


@task(name="best-trial", cache_policy=NO_CACHE)
def best_model_task(outcome: SearchOutcome, data: LoadedData, split: Split, run: RunContext) -> TrialModel:
    """The best trial's model, evaluated on the eval split and logged as the evaluate stage logs it. Kept from its
    trial when it ran in this process; else (a resumed study whose best trial ran before, or a trial of a tune-worker)
    trained again with its settings on the same data and seed (for kind sft without the trial's evaluations along the
    way)."""
    from tuneflow.kinds import get_kind

    cfg = outcome.best_config
    best = outcome.best
    if best is None:
        get_run_logger().info(
            "the best trial %d ran in an earlier call or another worker: training it again", outcome.best_number
        )
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
