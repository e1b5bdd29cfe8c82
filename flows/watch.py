"""The watch flow: scan a landing zone for settled bursts of new files and emit ``tuneflow.data.arrived``.

``tuneflow serve`` runs the same scan in a thread (no flow run per poll); this flow is for team mode,
where a worker runs the deployment ``watch/landing`` (deployments/prefect.yaml) on an interval.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import flow, get_run_logger

from tuneflow.config import load_config
from tuneflow.runtime import configure_environment
from tuneflow.watch import EVENT, Arrival, resource_id, scan_landing

log = logging.getLogger(__name__)


def emit_arrival(arrival: Arrival) -> None:
    """Send ``tuneflow.data.arrived`` to the Prefect API (``PREFECT_API_URL``)."""
    from prefect.events import emit_event

    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": resource_id(arrival.dataset), "prefect.resource.name": arrival.dataset},
        payload=arrival.payload,
    )
    if event is None:
        raise RuntimeError(
            "Prefect did not send the event: events need a Prefect API. "
            "Fix: start `prefect server start` and set PREFECT_API_URL"
        )
    log.info("emitted %s for %s: %s", EVENT, arrival.dataset, ", ".join(f["name"] for f in arrival.files))


@flow(name="watch", log_prints=True)
def watch(config_path: str, duration_seconds: float = 0.0) -> dict[str, Any]:
    """Scan ``data.landing`` of the config every ``watch.poll_seconds`` for ``duration_seconds`` (0: scan once).

    A burst that is still settling when the flow ends is picked up by the next run: the pending files
    and their sizes are kept in ``<landing>/.watch-state.json``.

    Returns:
        the announced bursts (files with sha256 digests).
    """
    configure_environment()
    logger = get_run_logger()
    cfg = load_config(config_path)
    end = time.monotonic() + duration_seconds
    announced = []
    while True:
        arrival = scan_landing(cfg, emit=emit_arrival)
        if arrival is not None:
            logger.info(
                "announced %d new file(s) in %s: %s",
                len(arrival.files),
                cfg.data.landing,
                ", ".join(f["name"] for f in arrival.files),
            )
            announced.append(arrival.payload)
        if time.monotonic() + cfg.watch.poll_seconds > end:
            break
        time.sleep(cfg.watch.poll_seconds)
    return {"announced": announced}
