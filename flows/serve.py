"""The deployments of a pipeline config, and ``tuneflow serve``: everything one machine needs.

Per config (``name`` is the config's name; a suffix ``-<name>`` is added when several configs are served):

    retrain/scheduled     the config's ``schedule`` (cron + time zone); only when the config has one
    retrain/on-new-data   trigger: event ``tuneflow.data.arrived`` on resource ``tuneflow.dataset.<name>``;
                          only for a landing-zone config (``data.landing``)
    retrain/on-decay      trigger: event ``tuneflow.champion.degraded`` on resource ``tuneflow.model.<model name>``
                          (monitoring found the champion degraded; ``monitor.retrain_when: degraded``);
                          only for a landing-zone config
    predict/batch         score a file or folder with ``<registry.model_name>@champion``
    review/<model name>   a challenger waiting for a person (``registry.approval: required``), started by the retrain
    review-timeouts/<model name>  every few minutes: reject reviews nobody decided in time

and, when a webhook URL is configured (``alerts``), the automations of ``tuneflow.flows.alerts``.

The same deployments for workers on other machines are in ``deployments/prefect.yaml`` (``prefect deploy``);
``deployments/serve.py`` is the script form of ``tuneflow serve``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tuneflow.config import PipelineConfig, load_config
from tuneflow.flows.alerts import ensure_alerts
from tuneflow.flows.predict import predict
from tuneflow.flows.retrain import ensure_concurrency_limit, limit_name, retrain
from tuneflow.flows.review import TIMEOUT_SWEEP_SECONDS, review, review_timeouts
from tuneflow.flows.watch import emit_arrival
from tuneflow.watch import DEGRADED_EVENT, EVENT, model_resource, resource_id, watch_forever

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

log = logging.getLogger(__name__)


def trigger_for(cfg: PipelineConfig, config_path: str):
    """The deployment trigger of ``retrain/on-new-data``: one run per ``tuneflow.data.arrived`` of this dataset."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"{cfg.name}: retrain on new data",
        description=f"Retrain {cfg.registry.model_name} when new batches land in {cfg.data.landing}/incoming",
        expect={EVENT},
        match={"prefect.resource.id": resource_id(cfg.name)},
        # A single-expression template keeps its JSON type (Prefect renders it with `| tojson`), so the
        # run's `trigger` parameter is the payload itself: files, sizes and sha256 digests.
        parameters={"config_path": config_path, "only_if_new_data": True, "trigger": "{{ event.payload }}"},
    )


def decay_trigger_for(cfg: PipelineConfig, config_path: str):
    """The deployment trigger of ``retrain/on-decay``: one run per ``tuneflow.champion.degraded`` of this model."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"{cfg.name}: retrain on decay",
        description=f"Retrain {cfg.registry.model_name} when monitoring finds its champion degraded on new data",
        expect={DEGRADED_EVENT},
        match={"prefect.resource.id": model_resource(cfg.registry.model_name)},
        parameters={"config_path": config_path, "trigger": "{{ event.payload }}"},
    )


def build_deployments(config_paths: list[str]) -> tuple[list[RunnerDeployment], list[PipelineConfig]]:
    """The deployments to serve for these configs (validated first: a bad config fails before anything starts)."""
    from prefect.schedules import Cron

    configs = [(str(Path(p).resolve()), load_config(p)) for p in config_paths]
    names = [c.name for _, c in configs]
    if len(set(names)) != len(names):
        raise ValueError(
            f"configs share a name ({names}); deployments and events are keyed by it. Fix: give each config its "
            "own name"
        )
    deployments, loaded = [], []
    for path, cfg in configs:
        sfx = f"-{cfg.name}" if len(configs) > 1 else ""
        tags = [f"tuneflow:{cfg.name}", f"model:{cfg.registry.model_name}"]
        loaded.append(cfg)
        if cfg.schedule is not None:
            deployments.append(
                retrain.to_deployment(
                    name=f"scheduled{sfx}",
                    parameters={"config_path": path},
                    tags=tags,
                    schedules=[Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)],
                    description=(
                        f"Retrain {cfg.registry.model_name} on schedule `{cfg.schedule.cron}` "
                        f"({cfg.schedule.timezone}) from {path}"
                    ),
                )
            )
        else:
            log.info("%s has no schedule section: no retrain/scheduled deployment", path)
        if cfg.data.landing:
            deployments.append(
                retrain.to_deployment(
                    name=f"on-new-data{sfx}",
                    parameters={"config_path": path, "only_if_new_data": True},
                    tags=tags,
                    triggers=[trigger_for(cfg, path)],
                    description=(
                        f"Retrain {cfg.registry.model_name} when {EVENT} is emitted for {resource_id(cfg.name)}"
                    ),
                )
            )
        if cfg.data.landing:
            deployments.append(
                retrain.to_deployment(
                    name=f"on-decay{sfx}",
                    parameters={"config_path": path},
                    tags=tags,
                    triggers=[decay_trigger_for(cfg, path)],
                    description=(
                        f"Retrain {cfg.registry.model_name} when tuneflow.champion.degraded is emitted for "
                        f"{model_resource(cfg.registry.model_name)} (monitor.retrain_when: degraded)"
                    ),
                )
            )
        deployments += review_deployments(cfg, tags)
        deployments.append(
            predict.to_deployment(
                name=f"batch{sfx}",
                parameters={"model": f"{cfg.registry.model_name}@champion"},
                tags=tags,
                description=f"Batch-score a file or folder with {cfg.registry.model_name}@champion",
            )
        )
    return deployments, loaded


def review_deployments(cfg: PipelineConfig, tags: list[str]) -> list[RunnerDeployment]:
    """``review/<model name>`` (a challenger waits for a person; started by the retrain, suspended while it waits)
    and ``review-timeouts/<model name>`` (rejects reviews nobody decided in time). Served whatever
    ``registry.approval`` says, so switching it to ``required`` needs no restart (a retrain reads its config anew)."""
    name = cfg.registry.model_name
    return [
        review.to_deployment(
            name=name,
            tags=tags,
            description=f"A person's decision on a challenger of {name} (registry.approval: required): started by "
            "the retrain, suspended until the form or 'tuneflow review approve|reject' resumes it",
        ),
        review_timeouts.to_deployment(
            name=name,
            parameters={"model_name": name},
            tags=tags,
            interval=TIMEOUT_SWEEP_SECONDS,
            description=f"Reject reviews of {name} nobody decided by their deadline (registry.approval_on_timeout)",
        ),
    ]


def serve(config_paths: list[str], watch: bool = True) -> None:
    """Serve the deployments of ``config_paths`` against ``PREFECT_API_URL`` and watch their landing zones.

    Blocks until interrupted (Ctrl-C / SIGTERM); flow runs execute as subprocesses of this process.
    """
    import prefect

    deployments, configs = build_deployments(config_paths)
    for cfg in configs:
        ensure_concurrency_limit(limit_name(cfg.registry.model_name))
        ensure_alerts(cfg)  # failed retrains and quarantined batches, posted to the configured webhook
    stop = threading.Event()
    watched = [c for c in configs if c.data.landing]
    if watch and watched:
        thread = threading.Thread(
            target=watch_forever, args=(watched, stop.is_set, emit_arrival), name="tuneflow-watch", daemon=True
        )
        thread.start()
        log.info("watching %s", ", ".join(f"{c.data.landing}/incoming" for c in watched))
    try:
        prefect.serve(*deployments)
    finally:
        stop.set()
