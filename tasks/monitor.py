"""Stage 1b, monitor: the champion scored on the batches the gate just accepted, drift, the decay decision."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuneflow.config import PipelineConfig
from tuneflow.monitor import MonitorOutcome, monitor_accepted, read_series
from tuneflow.reporting import artifact_key, monitor_markdown
from tuneflow.tracking import RunContext, run_url, stage_run
from tuneflow.watch import DEGRADED_EVENT, model_resource

log = logging.getLogger(__name__)


@task(name="monitor", cache_policy=NO_CACHE)
def monitor_task(
    cfg: PipelineConfig, accepted: Path, names: list[str], run: RunContext, experiment_id: str
) -> MonitorOutcome:
    """Score the champion on the newly accepted batches ``names`` (pooled while small) and record the point."""
    logger = get_run_logger()
    with stage_run(run.parent_run_id, "monitor"):
        outcome = monitor_accepted(cfg, accepted, names, experiment_id)
    url = run_url(experiment_id, outcome.run_id)
    if outcome.champion_version is None:
        return outcome  # no champion yet: nothing to monitor
    if outcome.point is None:
        logger.info(
            "monitoring: %d row(s) pooled (%s), fewer than monitor.min_rows %d; scored once the pool is big enough",
            outcome.pool_rows,
            ", ".join(outcome.pooled),
            cfg.monitor.min_rows,
        )
        return outcome
    p = outcome.point
    logger.info(
        "monitoring step %d: champion v%s on %d rows of %s: %s%s",
        p.step,
        p.champion_version,
        p.rows,
        ", ".join(p.batches),
        p.status,
        "".join(f"\n  - {r}" for r in p.reasons),
    )
    create_markdown_artifact(
        key=artifact_key(cfg.name, "monitor"),
        markdown=monitor_markdown(read_series(cfg.registry.model_name), cfg.registry.model_name, url),
        description=f"The champion of {cfg.registry.model_name} on each new batch, and drift",
    )
    return outcome


def emit_degraded(
    cfg: PipelineConfig, outcome: MonitorOutcome, experiment_id: str, flow_run_url: str
) -> dict[str, Any]:
    """Announce ``tuneflow.champion.degraded`` (deployment retrain/on-decay retrains on it; the decay alert posts
    its message). Returns the payload. Raises when Prefect could not send it: a lost decay must not pass
    silently."""
    from prefect.events import emit_event

    p = outcome.point
    assert p is not None
    name = cfg.registry.model_name
    payload = {
        "event": DEGRADED_EVENT,
        "dataset": cfg.name,
        "model": name,
        "champion_version": p.champion_version,
        "step": p.step,
        "batches": p.batches,
        "rows": p.rows,
        "metric": p.primary_metric,
        "score": p.score,
        "baseline": p.baseline,
        "drop": p.drop,
        "drifted": p.drifted,
        "reasons": p.reasons,
        "monitor_run_id": outcome.run_id,
        "monitor_run_url": run_url(experiment_id, outcome.run_id),
        "flow_run_url": flow_run_url,
        "message": f"{name} v{p.champion_version} degraded on {', '.join(p.batches)} ({p.rows} rows): "
        + "; ".join(p.reasons)
        + ". A retrain was requested (deployment retrain/on-decay).",
    }
    event = emit_event(
        event=DEGRADED_EVENT,
        resource={"prefect.resource.id": model_resource(name), "prefect.resource.name": name},
        payload=payload,
    )
    if event is None:
        raise RuntimeError(
            f"Prefect did not send {DEGRADED_EVENT}: events need a Prefect API. Fix: run under `tuneflow serve` "
            "or a worker with PREFECT_API_URL set"
        )
    log.info("emitted %s for %s: %s", DEGRADED_EVENT, name, "; ".join(p.reasons))
    return payload
