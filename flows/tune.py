"""The tune flow: validate -> split -> search (Optuna trials) -> best trial -> score champion -> decide -> register.

The same stages as a retrain (``tuneflow.flows.retrain``) before and after the search: the data is validated and
split once, every trial trains on that split, and the best trial's model goes through the retrain's gate (scored
against the champion on the same eval split, registered, promoted only if better). The best settings are written
as a config file next to the given one (``<name>.tuned.yaml``).

With ``search.workers`` above 1 and a Prefect server (``PREFECT_API_URL``), the tune run starts ``workers - 1`` runs of
the deployment ``tune-worker/<name>`` (the flow ``tune_worker`` below, declared in ``deployments/prefect.yaml``): each
opens the same study and runs trials until it has its trials, as the tune run does; the tune run then waits for the
trials still running (a worker that died leaves a trial whose heartbeat stops: it is run again here), reports the
workers' states, and goes on to the best trial and the gate as with one worker.
"""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tuneflow.config import PipelineConfig, load_config
from tuneflow.data import check_split, split_data
from tuneflow.evaluate import EvaluateOutput
from tuneflow.flows.retrain import model_slot, promote, register, validate_or_report, with_tag
from tuneflow.landing import load_validated
from tuneflow.models import check_max_length
from tuneflow.registry import decide_promotion
from tuneflow.registry_base import (
    DATA_DIGEST_TAG,
    FINGERPRINT_TAG,
    FLOW_RUN_TAG,
    INPUT_FINGERPRINT_TAG,
    STUDY_TAG,
    TUNED_FROM_TAG,
)
from tuneflow.reporting import artifact_key, retrain_markdown, tune_markdown
from tuneflow.runtime import cache_dir, configure_environment, redact_url
from tuneflow.search import SearchError, SearchOutcome, SearchPlan, check_search, open_study, write_tuned_config
from tuneflow.tasks.evaluate import score_champion_task
from tuneflow.tasks.search import best_model_task, study_task, trials_task
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

WORKER_FLOW = "tune-worker"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@flow(name="tune")
def tune(
    config_path: str, trials: int | None = None, timeout_minutes: float | None = None, workers: int | None = None
) -> dict[str, Any]:
    """Search the settings of ``config_path``'s ``search`` section, then put the best model through the gate.

    Args:
        config_path: the pipeline config YAML with a ``search`` section.
        trials: trials of the study in all (default ``search.trials``); a resumed study counts its earlier ones.
        timeout_minutes: no new trial starts after this (default ``search.timeout_minutes``).
        workers: processes running trials at once (default ``search.workers``): above 1, runs of the deployment
            ``tune-worker/<name>`` on a Prefect server; without one, trials run one at a time here.

    Returns:
        The study, the best trial and its settings, the tuned config's path, the MLflow run, and (with a registry)
        the registered version and the gate's decision.
    """
    configure_environment()
    config = load_config(config_path)
    uri = configure_tracking()
    plan = check_search(config, uri, trials, timeout_minutes, workers)  # exit-2 mistakes, before any work
    deployment = worker_deployment(config.name, plan)  # before any work too: a missing deployment is a mistake
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

        started = time.perf_counter()
        helpers = start_workers(deployment, config, config_path, plan, pid, data.digest, trials, timeout_minutes)
        own = trials_task(config, data, split, plan, run, tags={FLOW_RUN_TAG: flow_run_id})
        ended = wait_for_workers(helpers)
        outcome = study_task(config, plan, own, run, time.perf_counter() - started)
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
    result = tune_result(cfg.registry.model_name, outcome, tuned, best.evaluation.metrics, decision, version, pid, url)
    return result | {"workers": ended} if ended else result


@flow(name=WORKER_FLOW)
def tune_worker(
    config_path: str,
    parent_run_id: str,
    data_digest: str,
    study: str,
    trials: int | None = None,
    timeout_minutes: float | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run trials of a tune run's study until it has its trials (started by the tune run; see ``start_workers``).

    Args:
        config_path: the tune run's config (this machine's checkout: the same file, the same data).
        parent_run_id: the tune run's MLflow parent run; each trial's run is nested under it.
        data_digest: the digest of the data the tune run validated; this run trains on nothing else.
        study: the tune run's study, ``<name> in <storage without password>``: this run must open the same one.
        trials, timeout_minutes, workers: as the tune run was given them.

    Returns:
        The study and the trials this run ran.
    """
    configure_environment()
    config = load_config(config_path)
    uri = configure_tracking()
    plan = check_search(config, uri, trials, timeout_minutes, workers)
    here = study_label(plan)
    if here != study:
        raise SearchError(
            f"this worker opens the study {here}, the tune run {study}: the config or the environment differs on this "
            "machine. Fix: give every worker the same checkout and the same search.storage"
        )
    ensure_experiment(config.name)
    flow_run_id = str(flow_run.get_id() or "")
    data = load_validated(config, config_path, data_digest)
    split = split_data(data, config.data)
    run = RunContext(parent_run_id, cache_dir() / "runs" / (flow_run_id or f"tune-worker-{parent_run_id}"), cache_dir())
    done = trials_task(config, data, split, plan, run, take_over=False, tags={FLOW_RUN_TAG: flow_run_id})
    shutil.rmtree(run.work_dir, ignore_errors=True)
    get_run_logger().info("study %s: this worker ran %d trial(s)", plan.study_name, done.ran)
    return {"study": plan.study_name, "ran": done.ran}


def study_label(plan: SearchPlan) -> str:
    return f"{plan.study_name!r} in {redact_url(plan.storage)}"


def worker_deployment(name: str, plan: SearchPlan) -> str | None:
    """The deployment whose runs help this tune run (``tune-worker/<name>``), or None: one worker, or no Prefect
    server to run them (then the trials run one at a time here, and the log says why).

    Raises:
        SearchError: several workers on a server that does not have the deployment.
    """
    from prefect.settings import PREFECT_API_URL

    if plan.workers < 2:
        return None
    if not PREFECT_API_URL.value():
        get_run_logger().warning(
            "search.workers is %d, but there is no Prefect server (PREFECT_API_URL unset: Prefect's temporary local "
            "server): the trials run one at a time in this process. On one machine, 2 processes were not faster "
            "than 1 (2 cores: benchmarks/RESULTS.md, 'Training in 1 vs 2 processes'); for trials on several "
            "machines run the deployment tune/%s on a team server (docs/how-to/tune.md, 'Several workers')",
            plan.workers,
            name,
        )
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deployment = f"{WORKER_FLOW}/{name}"
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(deployment)
    except ObjectNotFound as exc:
        raise SearchError(
            f"search.workers is {plan.workers}, but the Prefect server at {redact_url(str(PREFECT_API_URL.value()))} "
            f"has no deployment {deployment} to run the other workers' trials. Fix: declare it as "
            "deployments/prefect.yaml does and run `prefect deploy --all --prefect-file deployments/prefect.yaml`, "
            "or pass --workers 1"
        ) from exc
    return deployment


def start_workers(
    deployment: str | None,
    config: PipelineConfig,
    config_path: str,
    plan: SearchPlan,
    parent_run_id: str,
    digest: str,
    trials: int | None,
    timeout_minutes: float | None,
) -> list:
    """Start ``plan.workers - 1`` runs of ``deployment`` (none when it is None); returns their flow runs."""
    if deployment is None:
        return []
    from prefect.deployments import run_deployment

    # the study and its enqueued trials exist before any worker opens it: the lock that keeps two processes from
    # setting them up twice covers one machine only
    open_study(config, plan)
    logger = get_run_logger()
    parameters = {
        "config_path": config_path,
        "parent_run_id": parent_run_id,
        "data_digest": digest,
        "study": study_label(plan),
        "trials": trials,
        "timeout_minutes": timeout_minutes,
        "workers": plan.workers,
    }
    runs = []
    for i in range(1, plan.workers):
        # timeout=0: started, not awaited; the trials of this run go on meanwhile
        run = run_deployment(deployment, parameters=parameters, timeout=0, tags=[f"study:{plan.study_name}"])
        logger.info("started %s run %s (worker %d of %d)", deployment, run.name, i + 1, plan.workers)
        runs.append(run)
    return runs


def wait_for_workers(runs: list, poll_s: float = 2.0, grace_s: float = 300.0) -> dict[str, str]:
    """Wait for the worker runs and log how each ended. Called once the study has no trial left running, so a
    worker ends within moments; one not started yet is cancelled (the study needs it no more); one still running
    after ``grace_s`` is left to itself (the study is complete; its state is logged). Returns each run's name and
    final state."""
    ended: dict[str, str] = {}
    if not runs:
        return ended
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    logger = get_run_logger()
    deadline = time.monotonic() + grace_s
    with get_client(sync_client=True) as client:
        for run in runs:
            while True:
                now = client.read_flow_run(run.id)
                state = now.state_type.value
                if state in TERMINAL:
                    break
                if time.monotonic() > deadline:
                    logger.warning("worker run %s is still %s; the study is complete without it", now.name, state)
                    break
                if state == "SCHEDULED":  # not picked up by a worker yet (Late included)
                    client.set_flow_run_state(run.id, Cancelled(message="the study had its trials before it started"))
                time.sleep(poll_s)
            level = "info" if state in ("COMPLETED", "CANCELLED") else "warning"
            getattr(logger, level)(
                "worker run %s: %s%s", now.name, state, f" ({now.state.message})" if now.state.message else ""
            )
            ended[now.name] = state
    return ended


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
