"""What deployed retrains share: the per-model concurrency slot and the "anything new?" check."""

from __future__ import annotations

import logging
from typing import Any

from tasks.config import PipelineConfig

log = logging.getLogger(__name__)


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


def has_new_batches(cfg: PipelineConfig) -> bool:
    """Whether the landing zone has a batch in ``incoming/`` (always True for a single-file config)."""
    from tasks.watch import list_incoming

    if not cfg.data.landing:
        return True
    return bool(list_incoming(cfg.data.landing))


def trigger_markdown(trigger: dict[str, Any]) -> str:
    """The triggering event as a table (shown as an artifact of the run it started)."""
    files = trigger.get("files") or []
    rows = "\n".join(f"| `{f.get('name')}` | {f.get('size', '')} | `{f.get('sha256', '')}` |" for f in files)
    return (
        f"# Started by `tuneflow.data.arrived` for `{trigger.get('dataset', '?')}`\n\n"
        f"Landing zone: `{trigger.get('landing', '?')}`; {len(files)} file(s):\n\n"
        f"| file | bytes | sha256 |\n|---|---|---|\n{rows}\n"
    )
