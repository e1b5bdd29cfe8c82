"""The tune flow: validate -> split -> search (Optuna trials) -> best trial -> score champion -> decide -> register.

The same stages as a retrain (``tuneflow.flows.retrain``) before and after the search: the data is validated and
split once, every trial trains on that split, and the best trial's model goes through the retrain's gate (scored
against the champion on the same eval split, registered, promoted only if better). The best settings are written
as a config file next to the given one (``<name>.tuned.yaml``).
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tuneflow.config import load_config
from tuneflow.data import check_split, split_data
from tuneflow.evaluate import EvaluateOutput
from tuneflow.flows.retrain import model_slot, promote, register, validate_or_report, with_tag
from tuneflow.models import check_max_length
from tuneflow.registry import decide_promotion
from tuneflow.registry_base import DATA_DIGEST_TAG, FINGERPRINT_TAG, INPUT_FINGERPRINT_TAG, STUDY_TAG, TUNED_FROM_TAG
from tuneflow.reporting import artifact_key, retrain_markdown, tune_markdown
from tuneflow.runtime import cache_dir, configure_environment
from tuneflow.search import SearchOutcome, check_search, write_tuned_config
from tuneflow.tasks.evaluate import score_champion_task
from tuneflow.tasks.search import best_model_task, search_task
from tuneflow.tracking import (
    RunContext,
    configure_tracking,
    ensure_experiment,
    log_dataset_inputs,
    model_url,
    run_lineage,
    run_url,
    start_parent_run,
)
from tuneflow.unchanged import data_fingerprint, input_fingerprint


@flow(name="tune")
def tune(config_path: str, trials: int | None = None, timeout_minutes: float | None = None) -> dict[str, Any]:
    """Search the settings of ``config_path``'s ``search`` section, then put the best model through the gate.

    Args:
        config_path: the pipeline config YAML with a ``search`` section.
        trials: trials of the study in all (default ``search.trials``); a resumed study counts its earlier ones.
        timeout_minutes: no new trial starts after this (default ``search.timeout_minutes``).

    Returns:
        The study, the best trial and its settings, the tuned config's path, the MLflow run, and (with a registry)
        the registered version and the gate's decision.
    """
    configure_environment()
    config = load_config(config_path)
    uri = configure_tracking()
    plan = check_search(config, uri, trials, timeout_minutes)  # exit-2 mistakes, before any work
    check_max_length(config.model)
    experiment_id, flow_run_id = ensure_experiment(config.name), str(flow_run.get_id() or "")
    lineage = run_lineage(config, flow_run_id) | {STUDY_TAG: plan.study_name}
    with start_parent_run(config, f"tune-{flow_run.get_name() or 'local'}", lineage) as parent:
        pid = parent.info.run_id
        url = run_url(experiment_id, pid)
        get_run_logger().info("MLflow run %s: %s", pid, url)
        run = RunContext(pid, cache_dir() / "runs" / (flow_run_id or f"tune-{pid}"), cache_dir())
        checked = validate_or_report(config, run, config_path, pid, url)
        data = checked.data
        split = split_data(data, config.data)
        check_split(split, config.data, config.kind, str(config.data.path or config.data.landing))
        log_dataset_inputs(config, data, split)

        outcome = search_task(config, data, split, plan, run)
        tuned = write_tuned_config(Path(config_path), config, outcome)
        best = best_model_task(outcome, data, split, run)
        cfg = outcome.best_config.model_copy(update={"search": None})  # what the tuned file says
        # The gate, as for any retrain; the model's slot only now: a long search must not hold up scheduled runs.
        with model_slot(cfg.registry.model_name, logger=get_run_logger()):
            champion = score_champion_task(cfg, split, run)
            decision = decide_promotion(cfg, best.evaluation, champion)
            scores = EvaluateOutput(best.evaluation, champion.version, champion.evaluation, champion.error)
            version_lineage = run_lineage(cfg, flow_run_id) | {
                STUDY_TAG: outcome.study_name,
                TUNED_FROM_TAG: str(outcome.best_number),
                DATA_DIGEST_TAG: data.digest,
            }
            # the fingerprints a retrain tags its version with: `tuneflow run` of the tuned file on this data is then
            # answered "nothing changed" instead of training the same model again
            with_tag(version_lineage, FINGERPRINT_TAG, data_fingerprint(cfg, data.frame))
            with_tag(version_lineage, INPUT_FINGERPRINT_TAG, input_fingerprint(cfg))
            version = register(
                cfg, checked, best.tokenized, best.trained, split, scores, decision, version_lineage, run
            )
            decision = promote(cfg, version, decision, pid, actor=flow_run_id or f"run {pid}")
        gate = retrain_markdown(
            cfg, data, split, best.tokenized.cache_hit, best.trained, scores, decision, version, pid, url
        )
        report_tune(config.name, outcome, gate, str(tuned))
    shutil.rmtree(run.work_dir, ignore_errors=True)
    return tune_result(cfg.registry.model_name, outcome, tuned, best.evaluation.metrics, decision, version, pid, url)


def report_tune(name: str, outcome: SearchOutcome, gate: str, tuned: str) -> None:
    """The flow run's artifact: the study's table and plots (inline PNG), the best trial, the gate's outcome."""
    images = {
        path.stem.replace("_", " "): base64.b64encode(path.read_bytes()).decode("ascii")
        for path in outcome.plots
        if path.is_file()
    }
    cfg = outcome.best_config
    create_markdown_artifact(
        key=artifact_key(name, "tune"),
        markdown=tune_markdown(cfg, outcome, gate, tuned, images),
        description=f"Settings search of {name}: trials, plots, best trial and the gate's decision",
    )


def tune_result(
    model_name: str,
    outcome: SearchOutcome,
    tuned: Path,
    metrics: dict[str, float],
    decision: Any,
    version: str | None,
    pid: str,
    url: str,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "study": outcome.study_name,
        "storage": outcome.storage,
        "trials": outcome.counts(),
        "ran": outcome.ran,
        "best_trial": outcome.best_number,
        "best_value": outcome.best_value,
        "best_settings": outcome.best_settings,
        "tuned_config": str(tuned),
        "metrics": metrics,
        "run_id": pid,
        "run_url": url,
    }
    if version is not None:
        result |= {
            "version": version,
            "model_uri": f"models:/{model_name}/{version}",
            "promoted": decision.promote,
            "reason": decision.reason,
            "version_url": model_url(model_name, version),
        }
    return result
