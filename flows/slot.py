"""A model's retrain slot: the one slot of a Prefect global concurrency limit, held by a lease this process renews.

Prefect's own ``concurrency(..., strict=True)`` cancels the run when a renewal fails, and an outage of the API
longer than about a minute makes it fail: a long training run was thrown away for a blip (measured in
docs/how-to/schedules.md, "A Prefect outage during a retrain"). Its non-strict mode keeps the run going but
stops renewing, so the slot silently frees itself and a second retrain of the model may start. ``hold_slot``
keeps the run going through an outage, renews again as soon as the server answers, takes the slot again if its
lease lapsed meanwhile, and stops the run only when another run took the slot in the gap.
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

import httpx

log = logging.getLogger(__name__)

# While the API answers, the lease is renewed every quarter of its duration (Prefect renews at three quarters):
# an outage shorter than about three quarters of the lease then never lets it lapse.
RENEW_FRACTION = 0.25
# While the API does not answer, try this often: the sooner the slot is ours again after an outage, the smaller
# the window in which a waiting run could take it.
RETRY_SECONDS = 3.0


class SlotLost(RuntimeError):
    """The slot's lease lapsed while Prefect's API was unreachable and another run holds the slot now."""


class _SlotLease:
    """The lease of one slot and the thread that keeps it."""

    def __init__(self, name: str, lease_seconds: float, holder) -> None:
        self.name, self.lease_seconds, self.holder = name, lease_seconds, holder
        self.lease_id: UUID | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._inside = threading.Lock()  # held while the body runs: no exception is sent to a thread that left it
        self._body_thread = threading.current_thread()
        self._body_running = False

    def client(self):
        from prefect.client.orchestration import get_client

        # A client of its own, not the flow run's (which get_client returns given the same settings): one that has
        # connected once retries a refused connection for about a minute (prefect 3.9, PREFECT_CLIENT_MAX_RETRIES),
        # which delayed noticing the outage, and taking the slot back after it, by that long (measured).
        return get_client(sync_client=True, httpx_settings={"timeout": 10.0})

    def take(self, wait: bool) -> bool:
        """Take the slot (waiting for it while another run holds it when ``wait``); False if held and not ``wait``."""
        while True:
            try:
                with self.client() as client:
                    response = client.increment_concurrency_slots_with_lease(
                        [self.name], 1, "concurrency", self.lease_seconds, self.holder
                    )
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423 or not wait:
                    if exc.response.status_code == 423:
                        return False
                    raise
                time.sleep(min(float(exc.response.headers.get("Retry-After") or 5), 30))
                continue
            body = response.json()
            if not body.get("limits"):
                raise RuntimeError(
                    f"the global concurrency limit {self.name!r} does not exist; create it with "
                    f"`prefect gcl create {self.name} --limit 1` (tuneflow serve and every retrain create it)"
                )
            self.lease_id = UUID(body["lease_id"])
            return True

    def release(self) -> None:
        if self.lease_id is None:
            return
        try:
            with self.client() as client:
                client.release_concurrency_slots_with_lease(self.lease_id)
        except httpx.HTTPError as exc:
            # Nothing to do about it here: the server frees the slot when the lease runs out.
            log.warning(
                "could not release the retrain slot %r (%s); the server frees it when its lease runs out (%.0f s)",
                self.name,
                exc,
                self.lease_seconds,
            )

    def keep(self) -> None:
        """The renewal loop (its own thread) until the body ends."""
        down_since: float | None = None
        last_ok = time.monotonic()
        interval = self.lease_seconds * RENEW_FRACTION
        while not self._stop.wait(RETRY_SECONDS if down_since is not None else interval):
            try:
                with self.client() as client:
                    client.renew_concurrency_lease(self.lease_id, self.lease_seconds)
                if down_since is not None:
                    log.warning(
                        "Prefect's API answers again after %.0f s; the server still knew the lease of the retrain slot "
                        "%r and renewed it: the slot is ours again, the run goes on",
                        time.monotonic() - down_since,
                        self.name,
                    )
            except httpx.HTTPError as exc:
                gone = isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 410
                if not gone:  # unreachable, or an error answer: keep trying
                    down_since = self._down(down_since, exc)
                    continue
                # 410: the lease is gone (it lapsed and the server revoked it, or a restarted server forgot it)
                try:
                    if not self.take(wait=False):
                        self._lose(time.monotonic() - last_ok)
                        return
                except httpx.HTTPError as retake_error:
                    down_since = self._down(down_since, retake_error)
                    continue
                log.warning(
                    "the lease of the retrain slot %r lapsed while Prefect's API was unreachable (not renewed for "
                    "%.0f s); no other run held the slot: the slot is ours again, the run goes on",
                    self.name,
                    time.monotonic() - last_ok,
                )
            down_since, last_ok = None, time.monotonic()

    def _down(self, since: float | None, exc: Exception) -> float:
        if since is None:
            log.warning(
                "Prefect's API does not answer (%s): the run continues, and keeps trying to renew the lease of the "
                "retrain slot %r every %.0f s (it lapses after %.0f s without renewal)",
                exc,
                self.name,
                RETRY_SECONDS,
                self.lease_seconds,
            )
            return time.monotonic()
        return since

    def _lose(self, unrenewed: float) -> None:
        """Another run took the slot while its lease had lapsed: stop the body."""
        self.lost = (
            f"the retrain slot {self.name!r} was lost: its lease lapsed while Prefect's API was unreachable (not "
            f"renewed for {unrenewed:.0f} s) and another run holds the slot now. This run stops so that two retrains "
            "never train at once; its training checkpoints stay, and a rerun of the same work resumes from the newest. "
            "(If no other retrain of this model runs, the Prefect server was restarted with in-memory leases and "
            "forgot this one: reset the limit's active slots under Concurrency in the UI, and run the server with "
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem)"
        )
        log.error("%s", self.lost)
        self.lease_id = None
        with self._inside:
            if self._body_running:
                _raise_in(self._body_thread, SlotLost)


def _raise_in(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` in ``thread`` at its next Python instruction (how Prefect cancels a run, too)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))


@contextmanager
def hold_slot(name: str, lease_seconds: float) -> Iterator[None]:
    """Wait for and hold the one slot of the global concurrency limit ``name`` while the block runs.

    The lease is renewed every ``lease_seconds / 4``. When Prefect's API does not answer, the block goes on and
    renewal is tried every few seconds; when the server answers again the lease is renewed, or, if it lapsed
    meanwhile, the slot taken again. Only when another run took the slot in between is the block stopped:
    ``SlotLost`` is raised in it (training stops where it is; its checkpoints stay for a rerun to resume).

    Raises:
        SlotLost: the lease lapsed during an outage and another run holds the slot now.
    """
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    lease = _SlotLease(name, lease_seconds, ConcurrencyLeaseHolder(type="flow_run", id=run_id) if run_id else None)
    lease.take(wait=True)
    keeper = threading.Thread(
        target=contextvars.copy_context().run,  # the run's context: its log lines reach the flow run's logs
        args=(lease.keep,),
        name=f"retrain-slot-{name}",
        daemon=True,
    )
    try:
        with lease._inside:
            lease._body_running = True
        keeper.start()
        try:
            yield
        except SlotLost as exc:
            raise SlotLost(lease.lost) from exc
        finally:
            with lease._inside:
                lease._body_running = False
    finally:
        lease._stop.set()
        keeper.join(timeout=10)
        lease.release()
