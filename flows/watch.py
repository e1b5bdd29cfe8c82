"""The watch flow: scan a landing zone for settled bursts of new files and emit ``tuneflow.data.arrived``.

``tuneflow serve`` runs the same scan in a thread (no flow run per poll); this flow is for team mode,
where a worker runs the deployment ``watch/landing`` (deployments/prefect.yaml) on an interval.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from tasks.config import load_config
from tasks.watch import emit_arrival, scan_landing
from tuneflow.runtime import configure_environment


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
            logger.info("announced %d new file(s) in %s: %s", len(arrival.files), cfg.data.landing,
                        ", ".join(f["name"] for f in arrival.files))
            announced.append(arrival.payload)
        if time.monotonic() + cfg.watch.poll_seconds > end:
            break
        time.sleep(cfg.watch.poll_seconds)
    return {"announced": announced}
