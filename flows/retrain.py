"""The retrain flows: validate -> split -> tokenize -> fine-tune -> evaluate -> score champion -> decide -> register.

``retrain_once`` (flow "retrain-once") takes a loaded config (``tuneflow run``); ``retrain`` (flow "retrain")
loads it from a path and waits for the model's slot first (schedules, new-data triggers, workers). Stages are
not retried: a failed validation or training run must be looked at, not repeated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, State

from tuneflow.approval import WAITING, WAITING_DECISION, needs_review
from tuneflow.config import PipelineConfig, load_config
from tuneflow.data import TEXT, DataError, Split, check_split, split_data
from tuneflow.evaluate import EvaluateOutput, Evaluation
from tuneflow.files import file_lock
from tuneflow.flows.review import await_review
from tuneflow.flows.slot import hold_slot
from tuneflow.landing import ACCEPTED, DataCheck, has_new_batches
from tuneflow.models import check_max_length
from tuneflow.monitor import MonitorOutcome
from tuneflow.registry import (
    Decision,
    current_champion,
    decide_promotion,
    decision_tags,
    refused_promotion,
    trained_digests,
    version_tags,
)
from tuneflow.registry_base import (
    DATA_DIGEST_TAG,
    DECISION_TAG,
    FINGERPRINT_TAG,
    INPUT_FINGERPRINT_TAG,
    MONITOR_DECISION_TAG,
    REVIEW_TAG,
)
from tuneflow.reporting import (
    artifact_key,
    held_markdown,
    model_card,
    nothing_new_markdown,
    quarantined_markdown,
    rejected_markdown,
    retrain_markdown,
    review_markdown,
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
from tuneflow.tokenization import Tokenized
from tuneflow.tracking import (
    RunContext,
    checkpoints_root,
    configure_tracking,
    ensure_experiment,
    log_dataset_inputs,
    log_unchanged,
    model_url,
    run_lineage,
    run_url,
    start_parent_run,
    sweep_after_register,
)
from tuneflow.train import TrainResult
from tuneflow.unchanged import data_fingerprint, input_fingerprint, remember_input, same_version, unchanged_result
from tuneflow.watch import DEGRADED_EVENT

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)


# Two flows, each named as its function: deployments belong to "retrain" (retrain/scheduled, retrain/on-new-data),
# which loads the config, takes the model's slot and calls this one's body; "retrain-once" is a run started
# directly (`tuneflow run`, Python).
@flow(name="retrain-once")
def retrain_once(
    config: PipelineConfig, config_file: str = "", force: bool = False, on_new_data: bool = False, cause: str = ""
) -> dict[str, Any] | State:
    """Retrain ``config.registry.model_name`` on ``config.data`` and promote it only if it is better.

    Args:
        config: the pipeline config (shown as a form in the Prefect UI).
        config_file: where the config came from, for error messages.
        force: retrain even when a registered version was trained on exactly this (same fingerprint).
        on_new_data: started by new data: with ``monitor.retrain_when: degraded`` the run stops after monitoring
            unless the champion degraded (then it emits ``tuneflow.champion.degraded``).
        cause: why this retrain runs (e.g. the decay that started it), recorded on the run and the version.

    Returns:
        MLflow run id and URL, eval metrics, registered version, decision and model URI; with quarantined batches
        trained around (``data.on_quarantine: train``) a ``Completed`` state "Completed with quarantined batches".
    """
    configure_environment()
    configure_tracking()
    experiment_id, flow_run_id = ensure_experiment(config.name), str(flow_run.get_id() or "")
    lineage = run_lineage(config, flow_run_id, cause)
    with start_parent_run(config, f"retrain-{flow_run.get_name() or 'local'}", lineage) as parent:
        pid = parent.info.run_id
        url = run_url(experiment_id, pid)
        get_run_logger().info("MLflow run %s: %s", pid, url)
        run = RunContext(pid, cache_dir() / "runs" / (flow_run_id or "local"), cache_dir())
        check_max_length(config.model)  # a max_length past the base model's positions: exit 2, before any work
        # A version trained on exactly these input bytes, config and base model was validated on them: stop here.
        input_fp = with_tag(lineage, INPUT_FINGERPRINT_TAG, input_fingerprint(config))
        if same := same_version(config, input_fp, INPUT_FINGERPRINT_TAG, force):
            return report_unchanged(config, same, "input", pid, url, experiment_id)
        checked = validate_or_report(config, run, config_file, pid, url)
        monitored = monitor_new_batches(config, checked, run, experiment_id)
        if on_new_data and config.monitor.retrain_when == "degraded":
            if (held := hold_unless_degraded(config, monitored, experiment_id, pid, url)) is not None:
                return held
        data = checked.data
        if checked.quarantined is not None:  # data.on_quarantine: train - said loudly, here and at the end
            get_run_logger().warning("%s", checked.quarantined)
        lineage[DATA_DIGEST_TAG] = data.digest
        fp = with_tag(lineage, FINGERPRINT_TAG, data_fingerprint(config, data.frame))
        if same := same_version(config, fp, force=force):
            remember_input(config, same, input_fp)  # these bytes validate to exactly that version's rows
            return report_unchanged(config, same, "data", pid, url, experiment_id)
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
        version = register(config, checked, tokenized, trained, split, scores, decision, lineage, run)
        if version is not None and needs_review(config.registry.approval, decision):  # a person signs off
            links = {"run": url, "challenger": model_url(config.registry.model_name, version)}
            if champion.version:
                links["champion"] = model_url(config.registry.model_name, champion.version)
            md = review_markdown(
                config, version, data, split, scores, decision, links, config.registry.approval_timeout_hours
            )
            decision, review_state = await_review(config, version, decision, md, flow_run_id)
            tag_review(pid, decision, review_state)
        else:
            decision, review_state = promote(config, version, decision, pid, actor=flow_run_id or f"run {pid}"), ""
        report_trained(config, cause, checked, split, tokenized, trained, scores, decision, version, pid, url)
    sweep_after_register(run.work_dir, config.registry.model_name)  # both kept after a failure
    result = trained_result(config, checked, tokenized, challenger, decision, version, pid, url, experiment_id)
    return with_review(result, review_state)


def with_tag(lineage: dict[str, str], tag: str, value: str | None) -> str | None:
    """``value``, also set as ``tag`` in ``lineage`` (the run's and the version's tags) unless it is None."""
    if value is not None:
        lineage[tag] = value
    return value


def report_unchanged(
    config: PipelineConfig, same: ModelVersion, what: str, pid: str, url: str, experiment_id: str
) -> dict[str, Any]:
    """A version was trained on exactly this ``what`` ("input" or "data"): say so (log, run tags, artifact)."""
    result = unchanged_result(config, str(same.version), what, pid, url, experiment_id)
    get_run_logger().info("%s", result["reason"])
    log_unchanged(str(same.version))
    create_markdown_artifact(
        key=artifact_key(config.name, "retrain"),
        markdown=unchanged_markdown(config, str(same.version), result["reason"], pid, url),
        description="Nothing changed since a registered version; nothing was trained.",
    )
    return result


def validate_or_report(config: PipelineConfig, run: RunContext, config_file: str, pid: str, url: str) -> DataCheck:
    """The validate stage; rejected data is also said in the run's artifact before the error goes up."""
    try:
        return validate_task(config, run, config_file or "the config")
    except DataError as exc:
        create_markdown_artifact(
            key=artifact_key(config.name, "retrain"),
            markdown=rejected_markdown(exc, pid, url),
            description="Data rejected; nothing was trained or registered.",
        )
        raise


def register(
    config: PipelineConfig,
    checked: DataCheck,
    tokenized: Tokenized,
    trained: TrainResult,
    split: Split,
    scores: EvaluateOutput,
    decision: Decision,
    lineage: dict[str, str],
    run: RunContext,
) -> str | None:
    """The register stage: the new version with its card and tags (None without a registry)."""
    if not config.registry.enabled:
        return None
    card = model_card(config, decision, scores, split, checked.data.digest, run.parent_run_id, checked.reports, trained)
    return register_task(
        config,
        trained.model,
        tokenized.tokenizer,
        decision,
        card,
        version_tags(lineage, checked.trained_reports),
        list(split.eval[TEXT][:2]),
        run,
        scores.challenger.metrics,
        split.train,
    )


def promote(config: PipelineConfig, version: str | None, decision: Decision, pid: str, actor: str) -> Decision:
    """The promote stage when the decision says so; a refusal (e.g. the champion moved meanwhile) turns the
    decision into "not promoted" with the reason, on the run too."""
    if version is None or not decision.promote:
        return decision
    outcome = promote_task(config, version, decision, actor=actor)
    return refused_promotion(decision, outcome, pid) if isinstance(outcome, str) else decision


def tag_review(pid: str, decision: Decision, state: str) -> None:
    """The parent run's decision tags after a review (``state``: waiting, approved, rejected, superseded)."""
    client = mlflow.MlflowClient()
    tags = decision_tags(decision) | {REVIEW_TAG: state}
    if state == WAITING:
        tags[DECISION_TAG] = WAITING_DECISION
    for key, value in tags.items():
        client.set_tag(pid, key, value)


def with_review(result: dict[str, Any] | State, state: str) -> dict[str, Any] | State:
    """The result with the review's state; a run that leaves its challenger waiting completes "Waiting for review"."""
    if not state:
        return result
    if isinstance(result, State):
        result.data["review"] = state
        return result
    result["review"] = state
    if state != WAITING:
        return result
    return Completed(
        name="Waiting for review",
        message=f"{result['model_uri']} waits for review: tuneflow review list",
        data=result,
    )


def report_trained(
    config: PipelineConfig,
    cause: str,
    checked: DataCheck,
    split: Split,
    tokenized: Tokenized,
    trained: TrainResult,
    scores: EvaluateOutput,
    decision: Decision,
    version: str | None,
    pid: str,
    url: str,
) -> None:
    """The run's artifact: eval metrics and the promotion decision (and the cause, and quarantined batches)."""
    create_markdown_artifact(
        key=artifact_key(config.name, "retrain"),
        markdown=(f"> Retrain caused by: {cause}\n\n" if cause else "")
        + retrain_markdown(
            config, checked.data, split, tokenized.cache_hit, trained, scores, decision, version, pid, url
        )
        + (quarantined_markdown(checked.quarantined) if checked.quarantined is not None else ""),
        description=f"Eval metrics and promotion decision for {config.registry.model_name}",
    )


def trained_result(
    config: PipelineConfig,
    checked: DataCheck,
    tokenized: Tokenized,
    challenger: Evaluation,
    decision: Decision,
    version: str | None,
    pid: str,
    url: str,
    experiment_id: str,
) -> dict[str, Any] | State:
    """What a run that trained returns; with quarantined batches, a ``Completed`` state that says so."""
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
    if checked.quarantined is None:
        return result
    result["quarantined"] = [o.name for o in checked.quarantined.result.quarantined]
    # The run did its job, but a person must look at the quarantined batches: the state's name says so.
    return Completed(
        name="Completed with quarantined batches",
        message=f"{len(result['quarantined'])} batch(es) quarantined: {', '.join(result['quarantined'])}",
        data=result,
    )


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
    mlflow.MlflowClient().set_tag(pid, MONITOR_DECISION_TAG, f"{status}: {reason}"[:5000])
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
def model_slot(model_name: str, server: bool | None = None, logger: Any = None) -> Iterator[None]:
    """One retrain of ``model_name`` at a time: the Prefect slot of deployed runs (``retrain-<model name>``) when
    ``server`` (default: when a Prefect server is configured, ``PREFECT_API_URL``), and always the machine-local
    lock, so a CLI run and a deployed run never overlap. ``logger``: where waiting, getting and releasing the slot
    are said (the flow run's logger in a deployed run)."""
    logger = logger or log
    server = bool(os.environ.get("PREFECT_API_URL")) if server is None else server
    if server:
        ensure_concurrency_limit(limit_name(model_name))
    lock = local_slot_path(model_name)
    logger.info("waiting for the retrain slot of %s (one retrain of a model at a time)", model_name)
    with (
        hold_slot(limit_name(model_name), SLOT_LEASE_SECONDS) if server else nullcontext(),
        file_lock(lock, what=f"another retrain of {model_name} (lock {lock})"),
    ):
        logger.info("got the retrain slot of %s", model_name)
        yield
    # The run's end time comes later (results, logs, state): this line marks when the slot was freed.
    logger.info("released the retrain slot of %s", model_name)


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
def retrain(
    config_path: str,
    overrides: list[str] | None = None,
    only_if_new_data: bool = False,
    trigger: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any] | State:
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
    config = load_config(config_path, overrides or [])
    if trigger:
        create_markdown_artifact(
            key=artifact_key(config.name, "retrain-trigger"),
            markdown=trigger_markdown(trigger),
            description="The event that started this run",
        )
    with model_slot(config.registry.model_name, server=True, logger=get_run_logger()):
        if only_if_new_data and (nothing := nothing_new(config)) is not None:
            return nothing
        cause = decay_cause(trigger) if trigger else ""
        out = retrain_once.fn(config, config_file=config_path, force=force, on_new_data=only_if_new_data, cause=cause)
    if isinstance(out, State):  # trained, with quarantined batches: keep the state's name and message
        return Completed(name=out.name, message=out.message, data={"status": "trained", **out.data})
    return {"status": "trained", **out}  # "status" from out wins: "unchanged" when nothing changed


def nothing_new(config: PipelineConfig) -> dict[str, Any] | None:
    """None when the landing zone has a new batch (or accepted data no version was trained on); else the
    "nothing new" result, said in the run's log and artifact."""
    configure_tracking()
    if has_new_batches(config, trained_digests(config.registry.model_name)):
        return None
    get_run_logger().info(
        "nothing new in %s: no batch in incoming/, and a registered version was trained on the accepted data",
        config.data.landing,
    )
    create_markdown_artifact(
        key=artifact_key(config.name, "retrain"),
        markdown=nothing_new_markdown(config),
        description="Nothing new to train on; nothing was trained or registered.",
    )
    return {"status": "nothing new", "model_name": config.registry.model_name}


def decay_cause(trigger: dict[str, Any]) -> str:
    """One line naming the decay that started a retrain (empty for other triggers)."""
    if trigger.get("event") != DEGRADED_EVENT:
        return ""
    return (
        f"{DEGRADED_EVENT}: v{trigger.get('champion_version')} on {', '.join(trigger.get('batches') or [])} "
        f"(monitoring step {trigger.get('step')}): {'; '.join(trigger.get('reasons') or [])}"
    )
