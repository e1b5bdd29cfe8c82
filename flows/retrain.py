"""The retrain flow: validate -> tokenize -> fine-tune -> evaluate -> register (with the promotion gate).

It only sequences stages and records the run; each stage lives in ``tasks/``. Stages are not retried:
a failed validation or training run must be looked at, not repeated.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tasks.config import PipelineConfig
from tasks.data import DataError
from tasks.evaluate import evaluate_task, metrics_table
from tasks.register import register_task
from tasks.tokenize import tokenize_task
from tasks.tracking import artifact_key, configure_tracking, ensure_experiment, flatten, git_commit, log_dataset_inputs, model_url, run_url
from tasks.train import train_task
from tasks.validate import validate_task
from tuneflow.runtime import cache_dir, configure_environment

log = logging.getLogger(__name__)


@flow(name="retrain")
def retrain(config: PipelineConfig, config_file: str = "") -> dict[str, Any]:
    """Retrain ``config.registry.model_name`` on ``config.data`` and promote it only if it is better.

    Args:
        config: the pipeline config (shown as a form in the Prefect UI).
        config_file: where the config came from, for error messages.

    Returns:
        MLflow run id and URL, eval metrics, registered version, gate decision and model URI.
    """
    import mlflow

    configure_environment()
    logger = get_run_logger()
    configure_tracking()
    experiment_id = ensure_experiment(config.name)
    cache_root = cache_dir()
    work_dir = cache_root / "runs" / str(flow_run.get_id() or "local")
    lineage = {
        "tuneflow.config_digest": config.digest(),
        "tuneflow.git_commit": git_commit(Path(__file__).resolve().parent),
        "tuneflow.prefect_flow_run_id": str(flow_run.get_id() or ""),
        "tuneflow.base_model": config.model.base_model,
    }
    with mlflow.start_run(run_name=f"retrain-{flow_run.get_name() or 'local'}", tags=lineage) as parent:
        pid = parent.info.run_id
        url = run_url(experiment_id, pid)
        logger.info("MLflow run %s: %s", pid, url)
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(config.model_dump(mode="json")).items()})
        mlflow.log_dict(config.model_dump(mode="json"), "config.json")
        try:
            loaded, reports = validate_task(config, pid, config_file or "the config", work_dir)
        except DataError as exc:
            create_markdown_artifact(
                key=artifact_key(config.name, "retrain"),
                markdown=f"# Retrain stopped: the data was rejected\n\n```\n{exc}\n```\n\nMLflow run: [{pid}]({url})",
                description="Data rejected; nothing was trained or registered.",
            )
            raise
        lineage["tuneflow.data_digest"] = loaded.digest
        mlflow.set_tag("tuneflow.data_digest", loaded.digest)
        split, tokenizer, tokenized = tokenize_task(config, loaded, pid, cache_root)
        log_dataset_inputs(config, loaded, split)
        trained = train_task(config, tokenizer, tokenized, pid, work_dir)
        evaluation = evaluate_task(config, trained.model, tokenizer, split, pid, work_dir)
        result: dict[str, Any] = {
            "run_id": pid,
            "run_url": url,
            "experiment_id": experiment_id,
            "metrics": evaluation.challenger.metrics,
            "tokenize_cache_hit": tokenized.cache_hit,
        }
        if config.registry.enabled:
            reg = register_task(config, trained.model, tokenizer, evaluation, split, loaded, pid, lineage, report=reports, training=trained)
            decision = reg["decision"]
            result |= {
                "version": reg["version"],
                "model_uri": reg["model_uri"],
                "promoted": decision.promote,
                "reason": decision.reason,
                "version_url": model_url(config.registry.model_name, reg["version"]),
            }
        champion = {"champion" + (f" v{evaluation.champion_version}" if evaluation.champion_version else ""): evaluation.champion.metrics if evaluation.champion else None}
        table = metrics_table({"this model": evaluation.challenger.metrics, **champion}, config.data.labels)
        decision_md = (
            f"**Registered** `{config.registry.model_name}` version {result['version']} "
            f"({'promoted to `champion`' if result['promoted'] else 'alias `challenger`, champion kept'}): {result['reason']}"
            if config.registry.enabled else "Registration is off (registry.enabled: false)."
        )
        create_markdown_artifact(
            key=artifact_key(config.name, "retrain"),
            markdown=(
                f"# Retrain `{config.name}`\n\n{decision_md}\n\n"
                f"Data `{loaded.source}` ({len(loaded.frame)} rows from {len(loaded.sources)} file(s), digest `{loaded.digest[:16]}`), "
                f"{len(split.train)} train / {len(split.eval)} eval rows; "
                f"tokenization {'loaded from cache' if tokenized.cache_hit else 'computed'}; "
                f"{trained.epochs_run:g} epochs in {trained.train_seconds:.0f} s.\n\n{table}\n\n"
                f"MLflow run: [{pid}]({url})"
            ),
            description=f"Eval metrics and promotion decision for {config.registry.model_name}",
        )
    shutil.rmtree(work_dir, ignore_errors=True)  # plots and Data Docs are in MLflow now; kept after a failure
    return result


@flow(name="retrain")
def retrain_from_file(config_path: str, overrides: list[str] | None = None, only_if_new_data: bool = False,
                      trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    """The deployed retrain: load the config from a path, wait for the model's slot, retrain.

    At most one retrain of a model runs at a time, whatever started it (schedule, new-data trigger,
    UI): each run first takes the one slot of the global concurrency limit ``retrain-<model name>``
    and waits for it while another holds it. A waiting triggered run whose data a run before it
    already used (``incoming/`` empty when it gets the slot) completes as "nothing new" without
    training, so triggers queued behind one run collapse into one retrain that sees all their files.

    Args:
        config_path: the pipeline config YAML, as seen by the machine that runs the flow.
        overrides: ``KEY=VALUE`` config overrides (like ``tuneflow run --set``).
        only_if_new_data: skip (complete as "nothing new") when the landing zone has no new batch.
        trigger: the event that started the run (``tuneflow.data.arrived`` payload: dataset, landing,
            files with sha256), filled in by the deployment trigger; shown as a parameter in the UI.

    Returns:
        the retrain result, or ``{"status": "nothing new", ...}``.
    """
    from prefect.concurrency.sync import concurrency

    from tasks.config import load_config
    from tasks.schedule import ensure_concurrency_limit, has_new_batches, limit_name, trigger_markdown

    configure_environment()
    logger = get_run_logger()
    config = load_config(config_path, overrides or [])
    if trigger:
        create_markdown_artifact(key=artifact_key(config.name, "retrain-trigger"), markdown=trigger_markdown(trigger),
                                 description="The event that started this run")
    slot = limit_name(config.registry.model_name)
    ensure_concurrency_limit(slot)
    logger.info("waiting for the retrain slot %r (one retrain of %s at a time)", slot, config.registry.model_name)
    with concurrency(slot, occupy=1, strict=True):
        logger.info("got the retrain slot %r", slot)
        if only_if_new_data and not has_new_batches(config):
            logger.info("nothing new in %s/incoming: an earlier run already trained on this data", config.data.landing)
            create_markdown_artifact(
                key=artifact_key(config.name, "retrain"),
                markdown=f"# Retrain `{config.name}`: nothing new\n\n`{config.data.landing}/incoming` was empty when this "
                         "run got its slot: the run before it already trained on these files.",
                description="Nothing new to train on; nothing was trained or registered.",
            )
            result = {"status": "nothing new", "model_name": config.registry.model_name}
        else:
            result = {"status": "trained", **retrain.fn(config, config_file=config_path)}
    # The run's end time comes later (results, logs, state): this line marks when the slot was freed.
    logger.info("released the retrain slot %r", slot)
    return result


if __name__ == "__main__":
    import sys

    from tuneflow.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
