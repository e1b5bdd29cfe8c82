"""The retrain flows: validate -> split -> tokenize -> fine-tune -> evaluate -> score champion -> decide -> register.

``retrain`` takes a loaded config (``tuneflow run``); ``retrain_deployed`` loads it from a path and
waits for the model's slot first (schedules, new-data triggers, workers). Stages are not retried: a
failed validation or training run must be looked at, not repeated.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, State

from tuneflow.config import PipelineConfig, load_config
from tuneflow.data import TEXT, DataError, check_split, content_digest, split_data
from tuneflow.evaluate import EvaluateOutput
from tuneflow.files import file_lock
from tuneflow.flows.slot import hold_slot
from tuneflow.landing import ACCEPTED, DataCheck, has_new_batches, input_files_digest
from tuneflow.models import base_model_digest, check_max_length
from tuneflow.monitor import MonitorOutcome
from tuneflow.registry import (
    current_champion,
    decide_promotion,
    decision_tags,
    fingerprint,
    trained_digests,
    version_tags,
    version_with_fingerprint,
)
from tuneflow.registry_base import FINGERPRINT_TAG, INPUT_FINGERPRINT_TAG
from tuneflow.reporting import (
    artifact_key,
    held_markdown,
    model_card,
    nothing_new_markdown,
    quarantined_markdown,
    rejected_markdown,
    retrain_markdown,
    trigger_markdown,
    unchanged_markdown,
)
from tuneflow.runtime import cache_dir, configure_environment
from tuneflow.tasks.evaluate import evaluate_task, score_champion_task
from tuneflow.tasks.monitor import emit_degraded, monitor_task
from tuneflow.tasks.register import promote_task, register_task
from tuneflow.tasks.tokenize import tokenize_task
from tuneflow.tasks.train import train_task
from tuneflow.tasks.validate import validate_task
from tuneflow.tracking import (
    RunContext,
    checkpoints_root,
    configure_tracking,
    ensure_experiment,
    git_commit,
    log_dataset_inputs,
    log_unchanged,
    model_url,
    run_url,
    start_parent_run,
)
from tuneflow.watch import DEGRADED_EVENT

log = logging.getLogger(__name__)


# Two flows, two names: deployments belong to "retrain" (retrain/scheduled, retrain/on-new-data), which
# calls this one's body; "retrain-once" is a run started directly (`tuneflow run`, Python).
@flow(name="retrain-once")
def retrain(
    config: PipelineConfig, config_file: str = "", force: bool = False, on_new_data: bool = False, cause: str = ""
) -> dict[str, Any] | State:
    """Retrain ``config.registry.model_name`` on ``config.data`` and promote it only if it is better.

    Batches the landing-zone gate accepts are monitored first (the champion scored on them, drift).

    Args:
        config: the pipeline config (shown as a form in the Prefect UI).
        config_file: where the config came from, for error messages.
        force: retrain even when a registered version was trained on exactly this (same fingerprint).
        on_new_data: started by new data (retrain/on-new-data): with ``monitor.retrain_when: degraded`` the run
            stops after monitoring unless the champion degraded (then it emits ``tuneflow.champion.degraded``).
        cause: why this retrain runs (e.g. the decay that started it), recorded on the run and the version.

    Returns:
        MLflow run id and URL, eval metrics, registered version, decision and model URI; when batches were
        quarantined but the accepted ones trained (``data.on_quarantine: train``), a ``Completed`` state named
        "Completed with quarantined batches" holding that result (calling the flow still returns the dict).
    """
    configure_environment()
    configure_tracking()
    logger = get_run_logger()
    experiment_id = ensure_experiment(config.name)
    flow_run_id = str(flow_run.get_id() or "")
    config_digest = config.digest()
    lineage = {
        "tuneflow.config_digest": config_digest,
        "tuneflow.git_commit": git_commit(Path(__file__).resolve().parent),
        "tuneflow.prefect_flow_run_id": flow_run_id,
        "tuneflow.base_model": config.model.base_model,
    }
    if cause:
        lineage[CAUSE_TAG] = cause[:5000]
    with start_parent_run(config, f"retrain-{flow_run.get_name() or 'local'}", lineage) as parent:
        pid = parent.info.run_id
        url = run_url(experiment_id, pid)
        logger.info("MLflow run %s: %s", pid, url)
        run = RunContext(pid, cache_dir() / "runs" / (flow_run_id or "local"), cache_dir())

        def unchanged(same: Any, what: str) -> dict[str, Any]:
            reason = (
                f"nothing changed: v{same.version} was trained on exactly this {what}, config, base model and "
                "tuneflow version; nothing trained or registered (force: true / tuneflow run --force retrains)"
            )
            logger.info("%s", reason)
            log_unchanged(str(same.version))
            create_markdown_artifact(
                key=artifact_key(config.name, "retrain"),
                markdown=unchanged_markdown(config, str(same.version), reason, pid, url),
                description="Nothing changed since a registered version; nothing was trained.",
            )
            return {
                "status": "unchanged",
                "run_id": pid,
                "run_url": url,
                "experiment_id": experiment_id,
                "version": str(same.version),
                "model_uri": f"models:/{config.registry.model_name}/{same.version}",
                "reason": reason,
            }

        check_max_length(config.model)  # a max_length past the base model's positions: exit 2, before any work
        # The input files' bytes, before validating them: when a version was trained on exactly these files
        # with this config and base model, it was validated on them too; stop before the gate runs again.
        base_digest = base_model_digest(config.model)
        files_digest = input_files_digest(config)
        if files_digest is not None:
            lineage[INPUT_FINGERPRINT_TAG] = fingerprint(files_digest, config_digest, base_digest)
            if config.registry.enabled and not force:
                same = version_with_fingerprint(
                    config.registry.model_name, lineage[INPUT_FINGERPRINT_TAG], INPUT_FINGERPRINT_TAG
                )
                if same is not None:
                    return unchanged(same, "input")

        try:
            checked = validate_task(config, run, config_file or "the config")
        except DataError as exc:
            create_markdown_artifact(
                key=artifact_key(config.name, "retrain"),
                markdown=rejected_markdown(exc, pid, url),
                description="Data rejected; nothing was trained or registered.",
            )
            raise
        monitored = monitor_new_batches(config, checked, run, experiment_id)
        if on_new_data and config.monitor.retrain_when == "degraded":
            held = hold_unless_degraded(config, monitored, experiment_id, pid, url)
            if held is not None:
                return held
        data = checked.data
        if checked.quarantined is not None:  # data.on_quarantine: train - said loudly, here and at the end
            logger.warning("%s", checked.quarantined)
        lineage["tuneflow.data_digest"] = data.digest
        fp = fingerprint(content_digest(data.frame), config_digest, base_digest)
        lineage[FINGERPRINT_TAG] = fp
        same = version_with_fingerprint(config.registry.model_name, fp) if config.registry.enabled else None
        if same is not None and not force:
            if (
                INPUT_FINGERPRINT_TAG in lineage
                and (same.tags or {}).get(INPUT_FINGERPRINT_TAG) != lineage[INPUT_FINGERPRINT_TAG]
            ):
                # these bytes validate to exactly that version's rows (the latest bytes seen are remembered):
                # the next run on them stops before the gate
                mlflow.MlflowClient().set_model_version_tag(
                    config.registry.model_name, same.version, INPUT_FINGERPRINT_TAG, lineage[INPUT_FINGERPRINT_TAG]
                )
            return unchanged(same, "data")
        # Checkpoints live under the fingerprint: a rerun of exactly this work after a crash resumes from them.
        run = replace(run, checkpoint_dir=checkpoints_root(config.registry.model_name) / fp[:16])
        split = split_data(data, config.data)
        check_split(split, config.data, config.kind, str(config.data.path or config.data.landing))
        log_dataset_inputs(config, data, split)

        tokenized = tokenize_task(config, data, split, run)
        trained = train_task(config, tokenized, run)
        challenger = evaluate_task(config, trained.model, tokenized.tokenizer, split, run)
        champion = score_champion_task(config, split, run)
        decision = decide_promotion(config, challenger, champion)
        scores = EvaluateOutput(challenger, champion.version, champion.evaluation, champion.error)

        version = None
        if config.registry.enabled:
            card = model_card(config, decision, scores, split, data.digest, pid, checked.reports, trained)
            version = register_task(
                config,
                trained.model,
                tokenized.tokenizer,
                decision,
                card,
                version_tags(lineage, checked.trained_reports),
                list(split.eval[TEXT][:2]),
                run,
                challenger.metrics,
                split.train,
            )
            outcome = decision.promote and promote_task(config, version, decision, actor=flow_run_id or f"run {pid}")
            if isinstance(outcome, str):  # refused: the reason
                decision = replace(decision, promote=False, reason=f"{decision.reason}; NOT promoted: {outcome}")
                client = mlflow.MlflowClient()  # the parent run says so too, as the version's tags do
                for key, value in decision_tags(decision).items():
                    client.set_tag(pid, key, value)

        create_markdown_artifact(
            key=artifact_key(config.name, "retrain"),
            markdown=(f"> Retrain caused by: {cause}\n\n" if cause else "")
            + retrain_markdown(config, data, split, tokenized.cache_hit, trained, scores, decision, version, pid, url)
            + (quarantined_markdown(checked.quarantined) if checked.quarantined is not None else ""),
            description=f"Eval metrics and promotion decision for {config.registry.model_name}",
        )
    shutil.rmtree(run.work_dir, ignore_errors=True)  # plots and Data Docs are in MLflow now; kept after a failure
    # The model is registered: this model's checkpoints (also those of crashed runs on older data) are swept.
    shutil.rmtree(checkpoints_root(config.registry.model_name), ignore_errors=True)
    result: dict[str, Any] = {
        "run_id": pid,
        "run_url": url,
        "experiment_id": experiment_id,
        "metrics": challenger.metrics,
        "tokenize_cache_hit": tokenized.cache_hit,
    }
    if version is not None:
        result |= {
            "version": version,
            "model_uri": f"models:/{config.registry.model_name}/{version}",
            "promoted": decision.promote,
            "reason": decision.reason,
            "version_url": model_url(config.registry.model_name, version),
        }
    if checked.quarantined is not None:
        result["quarantined"] = [o.name for o in checked.quarantined.result.quarantined]
        # The run did its job, but a person must look at the quarantined batches: the state's name says so.
        return Completed(
            name="Completed with quarantined batches",
            message=f"{len(result['quarantined'])} batch(es) quarantined: {', '.join(result['quarantined'])}",
            data=result,
        )
    return result


CAUSE_TAG = "tuneflow.retrain_cause"


def monitor_new_batches(
    config: PipelineConfig, checked: DataCheck, run: RunContext, experiment_id: str
) -> MonitorOutcome | None:
    """The monitor stage on the batches this run's gate accepted; None when there are none (or it is off)."""
    if not (config.monitor.enabled and config.registry.enabled and checked.gate is not None):
        return None
    names = [o.path.name for o in checked.gate.accepted]
    if not names:
        return None
    accepted = Path(config.data.landing).resolve() / ACCEPTED
    return monitor_task(config, accepted, names, run, experiment_id)


def hold_unless_degraded(
    config: PipelineConfig, monitored: MonitorOutcome | None, experiment_id: str, pid: str, url: str
) -> dict[str, Any] | None:
    """``monitor.retrain_when: degraded`` on a new-data trigger: None (train now) when there is no champion yet;
    else the run's result without training: monitored only, or degraded (``tuneflow.champion.degraded`` emitted,
    which deployment retrain/on-decay turns into a retrain)."""
    logger = get_run_logger()
    name = config.registry.model_name
    champion = current_champion(name) if monitored is None else monitored.champion_version
    if champion is None:
        logger.info("monitor.retrain_when is degraded, but %s has no champion yet: training the first one", name)
        return None
    status, event = "monitored", None
    if monitored is None:
        status, reason = "nothing new", "no batch was accepted in this run: nothing to monitor or train"
    elif monitored.point is None:
        reason = (
            f"{monitored.pool_rows} new row(s) pooled until monitor.min_rows ({config.monitor.min_rows}); "
            "not trained (monitor.retrain_when: degraded)"
        )
    elif monitored.degraded:
        event = emit_degraded(config, monitored, experiment_id, str(flow_run.ui_url or ""))
        status, reason = "degraded", "the champion degraded: retrain requested (deployment retrain/on-decay)"
    else:
        point = monitored.point
        why = f" ({'; '.join(point.reasons)})" if point.reasons else ""
        reason = f"monitoring step {point.step}: {point.status}{why}; not trained (monitor.retrain_when: degraded)"
    logger.info("%s", reason)
    mlflow.MlflowClient().set_tag(pid, "tuneflow.monitor.decision", f"{status}: {reason}"[:5000])
    create_markdown_artifact(
        key=artifact_key(config.name, "retrain"),
        markdown=held_markdown(config, status, reason, monitored.point if monitored else None, event, pid, url),
        description="Monitored, not trained (monitor.retrain_when: degraded)",
    )
    result: dict[str, Any] = {"status": status, "run_id": pid, "run_url": url, "reason": reason}
    if monitored is not None and monitored.point is not None:
        result["monitor_step"] = monitored.point.step
    return result


def start_prefect_while_importing() -> None:
    """For ``tuneflow run`` without ``PREFECT_API_URL``: start Prefect's temporary server now, in a thread, while
    this process imports what the run needs (torch, transformers' Trainer, Great Expectations), then wait for
    both. Prefect would otherwise start that server at the flow's first API call and the run would wait for
    it (a process, uvicorn, the database: several seconds) before doing anything else. The flow run is
    recorded exactly as before; with a server configured this does nothing."""
    import threading

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's client uses too (one per port; None: its own)
    failed: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()
    # what every run imports anyway: the Trainer pulls in torch and transformers; every run validates (GE)
    import great_expectations  # noqa: F401
    from transformers import Trainer  # noqa: F401

    thread.join()
    if failed:
        raise failed[0]


def local_slot_path(model_name: str) -> Path:
    """The lock file that lets one retrain of ``model_name`` run at a time on this machine."""
    return cache_dir() / "locks" / f"retrain-{model_name}.lock"


@contextmanager
def model_slot(model_name: str) -> Iterator[None]:
    """One retrain of ``model_name`` at a time, for ``tuneflow run``: the Prefect slot of deployed runs
    (``retrain-<model name>``) when a Prefect server is configured (``PREFECT_API_URL``), and always the
    machine-local lock that deployed runs also take, so a CLI run and a deployed run never overlap."""
    server = bool(os.environ.get("PREFECT_API_URL"))
    if server:
        ensure_concurrency_limit(limit_name(model_name))
    lock = local_slot_path(model_name)
    log.info("waiting for the retrain slot of %s (one retrain of a model at a time)", model_name)
    with (
        hold_slot(limit_name(model_name), SLOT_LEASE_SECONDS) if server else nullcontext(),
        file_lock(lock, what=f"another retrain of {model_name} (lock {lock})"),
    ):
        log.info("got the retrain slot of %s", model_name)
        yield


# The slot is a lease the holder renews every 15 s (flows/slot.py); when its process dies (a worker killed, a
# machine lost) the server frees it once the lease runs out. Prefect's default lease is 300 s, its minimum 60 s
# (prefect 3.9): with 60 s a crashed retrain blocks the model's next retrain for about a minute instead of five.
# An outage of Prefect's API does not stop the run; see hold_slot.
SLOT_LEASE_SECONDS = 60


def limit_name(model_name: str) -> str:
    """The global concurrency limit that lets one retrain of ``model_name`` run at a time."""
    return f"retrain-{model_name}"


def ensure_concurrency_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit ``name`` if it does not exist (an existing one is kept as is).

    Prefect skips, with only a warning, a ``concurrency()`` block whose limit does not exist, so the
    limit is created before every acquisition rather than trusted to be there.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            log.info("created global concurrency limit %s (limit %d)", name, limit)
        except ObjectAlreadyExists:  # another run created it a moment ago
            pass


@flow(name="retrain")
def retrain_deployed(
    config_path: str,
    overrides: list[str] | None = None,
    only_if_new_data: bool = False,
    trigger: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
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
        force: retrain even when a registered version was trained on exactly this.

    Returns:
        the retrain result, or ``{"status": "nothing new", ...}``.
    """
    configure_environment()
    logger = get_run_logger()
    config = load_config(config_path, overrides or [])
    if trigger:
        create_markdown_artifact(
            key=artifact_key(config.name, "retrain-trigger"),
            markdown=trigger_markdown(trigger),
            description="The event that started this run",
        )
    slot = limit_name(config.registry.model_name)
    final: State | None = None
    ensure_concurrency_limit(slot)
    logger.info("waiting for the retrain slot %r (one retrain of %s at a time)", slot, config.registry.model_name)
    with (
        hold_slot(slot, SLOT_LEASE_SECONDS),
        file_lock(local_slot_path(config.registry.model_name)),
    ):
        logger.info("got the retrain slot %r", slot)
        if only_if_new_data:
            configure_tracking()
        if only_if_new_data and not has_new_batches(config, trained_digests(config.registry.model_name)):
            logger.info(
                "nothing new in %s: no batch in incoming/, and a registered version was trained on the accepted data",
                config.data.landing,
            )
            create_markdown_artifact(
                key=artifact_key(config.name, "retrain"),
                markdown=nothing_new_markdown(config),
                description="Nothing new to train on; nothing was trained or registered.",
            )
            result = {"status": "nothing new", "model_name": config.registry.model_name}
        else:
            cause = decay_cause(trigger) if trigger else ""
            out = retrain.fn(config, config_file=config_path, force=force, on_new_data=only_if_new_data, cause=cause)
            if isinstance(out, State):  # trained, with quarantined batches: keep the state's name and message
                result = {"status": "trained", **out.data}
                final = Completed(name=out.name, message=out.message, data=result)
            else:
                result = {"status": "trained", **out}  # "status" from out wins: "unchanged" when nothing changed
    # The run's end time comes later (results, logs, state): this line marks when the slot was freed.
    logger.info("released the retrain slot %r", slot)
    return final if final is not None else result


def decay_cause(trigger: dict[str, Any]) -> str:
    """One line naming the decay that started a retrain (empty for other triggers)."""
    if trigger.get("event") != DEGRADED_EVENT:
        return ""
    return (
        f"{DEGRADED_EVENT}: v{trigger.get('champion_version')} on {', '.join(trigger.get('batches') or [])} "
        f"(monitoring step {trigger.get('step')}): {'; '.join(trigger.get('reasons') or [])}"
    )
