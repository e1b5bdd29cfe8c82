"""Where a challenger waits for a person (``registry.approval: required``), and how a decision reaches it.

Three places to wait, chosen by how the retrain runs (``where_to_wait``):

- **deployed** (a run of deployment ``retrain/...``, by ``tuneflow serve`` or a worker): the retrain registers the
  challenger, starts a run of the small deployment ``review/<model name>`` and completes "Waiting for review". That
  run *suspends* itself at once (``suspend_flow_run``): its process exits, so while it waits nothing holds a worker,
  a process or the model's retrain slot, and a second retrain of the model runs meanwhile. On resume Prefect starts
  the review run again from the top (a suspended flow reruns); since the review flow does nothing before its
  suspend, nothing is recomputed and training never re-runs. Why not suspend the retrain itself: it would rerun
  from the start on resume (Prefect 3.9 reruns a suspended flow; only tasks with persisted, cached results would be
  skipped), holding the slot again and, with non-cacheable training, retraining.
- **in place** (``tuneflow run`` against a Prefect server, ``PREFECT_API_URL``): ``pause_flow_run`` blocks the run
  (and so its local retrain slot) until a decision or the timeout.
- **registry only** (``tuneflow run`` with Prefect's temporary server, which no other process can reach): the
  version is left waiting in the registry and ``tuneflow review approve|reject`` decides it directly.

A decision always comes in as ``ReviewInput`` (the Prefect UI's form, or ``tuneflow review`` calling
``resume_flow_run(run_input=...)``), and the waiting run applies it (``tuneflow.approval.decide``), so both ways end
the same. Timeouts are tuneflow's, not Prefect's: Prefect 3.9's server fails a pause or suspension past its timeout
("The flow was paused and never resumed": state Failed, and the failed-retrain alert), so Prefect is given the
deadline plus ``PREFECT_TIMEOUT_GRACE_S`` and, at the deadline, the waiting run is resumed with a rejection that it
records as a timeout: by a timer in the run that pauses in place; for suspended runs by flow ``review-timeouts``
(deployment ``review-timeouts/<model name>``, every ``TIMEOUT_SWEEP_SECONDS``), by ``tuneflow review list`` and
before every ``tuneflow review approve|reject``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.exceptions import ObjectNotFound
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Completed
from pydantic import Field

from tuneflow.approval import (
    APPROVED,
    TIMEOUT_REVIEWER,
    WAITING,
    Review,
    ReviewOutcome,
    close_overdue,
    decide,
    read_review,
    request_review,
    time_out,
)
from tuneflow.config import PipelineConfig
from tuneflow.registry import Decision, get_version
from tuneflow.tracking import model_url
from tuneflow.watch import REVIEW_EVENT, model_resource

log = logging.getLogger(__name__)

PAUSE_POLL_SECONDS = 5  # how soon a paused run notices its resume (Prefect's default: 10 s)
TIMEOUT_SWEEP_SECONDS = 300  # how often deployment review-timeouts/<model> rejects overdue reviews
# Prefect's server fails a pause or suspension past its own timeout (Failed, "never resumed"): it gets ours plus this,
# so tuneflow rejects first and the run ends in order; after it, a run nobody ended at all still ends.
PREFECT_TIMEOUT_GRACE_S = 3 * TIMEOUT_SWEEP_SECONDS


class ReviewInput(RunInput):
    """The form a reviewer fills in (Prefect UI) or ``tuneflow review`` sends."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: this version becomes champion; reject: the champion stays"
    )
    reviewer: str = Field(min_length=1, description="Your name: Prefect OSS records no identity")
    comment: str = Field("", description="Why; recorded in the champion history and the model card")


def review_form(description: str) -> type[ReviewInput]:
    """``ReviewInput`` with the comparison (markdown) shown above the form."""
    return ReviewInput.with_initial_data(description=description)


def where_to_wait() -> str:
    """ "deployed", "in place" or "registry only" (see the module's docstring)."""
    from prefect.runtime import deployment
    from prefect.settings import PREFECT_API_URL

    if deployment.id:
        return "deployed"
    # Prefect's temporary server (no PREFECT_API_URL) dies with this process: nobody else could resume the run
    return "in place" if PREFECT_API_URL.value() else "registry only"


def deployment_name(model_name: str) -> str:
    return f"review/{model_name}"


def await_review(
    config: PipelineConfig, version: str, decision: Decision, description: str, flow_run_id: str
) -> tuple[Decision, str]:
    """The promote stage with ``registry.approval: required``: the challenger waits for a person.

    Returns:
        the decision as it stands (promote only once approved) and the review's state (``waiting`` when this run
        does not wait itself).
    """
    logger = get_run_logger()
    name, hours = config.registry.model_name, config.registry.approval_timeout_hours
    mode = where_to_wait()
    review_run = ""
    if mode == "deployed":
        try:
            review_run = start_review_run(name, version, description, max(1, int(hours * 3600)))
        except ObjectNotFound:
            logger.warning(
                "no deployment %s on the server: %s v%s waits in this run instead, which holds a worker and the "
                "retrain slot meanwhile. Fix: serve it (tuneflow serve) or deploy it (deployments/prefect.yaml)",
                deployment_name(name),
                name,
                version,
            )
            mode = "in place"
    if review_run:
        review = request_review(name, version, decision, review_run, hours)
    else:
        review = request_review(name, version, decision, flow_run_id if mode == "in place" else "", hours)
    announce(config, review, decision)
    waiting = replace(decision, promote=False, reason=f"{decision.reason}; waiting for review")
    if mode != "in place":
        logger.info(
            "%s v%s waits for review until %s (%s): tuneflow review approve|reject %s %s --reviewer NAME",
            name,
            version,
            review.deadline,
            f"review run {review.flow_run_id}" if review.flow_run_id else "no Prefect server: decide with the CLI",
            name,
            version,
        )
        return waiting, WAITING
    outcome = wait_in_place(review, description, max(1, int(hours * 3600)))
    state = outcome.review.state
    if state == APPROVED:
        return replace(decision, reason=f"{decision.reason}; approved by {outcome.review.reviewer}"), state
    return replace(
        decision, promote=False, reason=f"{decision.reason}; {state} in review: {outcome.review.comment}"
    ), state


def wait_in_place(review: Review, description: str, timeout_s: int) -> ReviewOutcome:
    """Pause this flow run until a decision arrives or ``timeout_s`` passes (then: rejected).

    Prefect 3.9's server fails a pause past its timeout by itself ("The flow was paused and never resumed"), which
    would end the run Failed (and post the failed-retrain alert) for what is an ordinary rejection. So Prefect's
    timeout is ours plus ``PREFECT_TIMEOUT_GRACE_S``, and at our deadline a timer resumes the run with a rejection,
    which ``apply_answer`` records as a timeout.
    """
    import threading

    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    timer = threading.Timer(timeout_s, end_timed_out_run, args=(review,))
    timer.daemon = True
    timer.start()
    try:
        answer = pause_flow_run(
            wait_for_input=review_form(description),
            timeout=timeout_s + PREFECT_TIMEOUT_GRACE_S,
            poll_interval=min(PAUSE_POLL_SECONDS, max(1, timeout_s // 2)),
            key=f"review-v{review.version}",
        )
    except FlowPauseTimeout:  # the timer could not resume the run (e.g. the API was down at that moment)
        _running_again()
        current = _current(review)
        return time_out(current) if current.state == WAITING else ReviewOutcome(current)
    finally:
        timer.cancel()
    return apply_answer(review, answer)


def apply_answer(review: Review, answer: ReviewInput) -> ReviewOutcome:
    """Apply a decision received by a waiting run. A review already closed meanwhile (superseded by another approval,
    closed with the CLI) is returned as it is; other waiting runs that the approval made stale are ended."""
    current = _current(review)
    if current.state == WAITING and current.overdue():
        return time_out(current)
    if current.state != WAITING:
        get_run_logger().info("%s v%s was already %s: %s", review.name, review.version, current.state, current.comment)
        return ReviewOutcome(current)
    outcome = decide(
        review.name,
        review.version,
        answer.decision,
        answer.reviewer,
        answer.comment,
        via=f"flow run {flow_run.get_id()}",
    )
    end_runs(outcome.superseded)
    get_run_logger().info(
        "%s v%s %s by %s: %s", review.name, review.version, outcome.review.state, answer.reviewer, answer.comment
    )
    return outcome


def _current(review: Review) -> Review:
    current = read_review(get_version(review.name, review.version))
    assert current is not None
    return current


def _running_again() -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.get_id(), Running(), force=True)


def end_runs(closed: list[Review]) -> None:
    """Resume the waiting runs of reviews closed in the registry (superseded), so they end instead of waiting; each
    finds its review closed and completes. A run that is gone or no longer paused is left as it is."""
    for r in closed:
        if r.flow_run_id:
            try:
                resume(r.flow_run_id, "reject", "tuneflow", f"superseded: {r.comment}")
            except RunNotWaiting as exc:
                log.info("the run %s of %s v%s was not resumed: %s", r.flow_run_id, r.name, r.version, exc)


class RunNotWaiting(RuntimeError):
    """The flow run of a review does not wait for a decision any more (gone, crashed, timed out, finished)."""


def resume(flow_run_id: str, verdict: str, reviewer: str, comment: str) -> None:
    """Resume a waiting run with a decision, as the Prefect UI's form does.

    Raises:
        RunNotWaiting: the run is gone, not paused (crashed, finished) or past its timeout; nothing was sent.
    """
    from prefect.exceptions import FlowPauseTimeout, NotPausedError, ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    try:
        wait_until_paused(flow_run_id)
        resume_flow_run(UUID(flow_run_id), run_input={"decision": verdict, "reviewer": reviewer, "comment": comment})
    except ObjectNotFound as exc:
        raise RunNotWaiting(f"flow run {flow_run_id} is gone from the Prefect server") from exc
    except NotPausedError as exc:
        state = run_states([flow_run_id])[flow_run_id]
        raise RunNotWaiting(f"flow run {flow_run_id} does not wait for a decision (state {state})") from exc
    except FlowPauseTimeout as exc:
        raise RunNotWaiting(f"flow run {flow_run_id} waited past its timeout and can no longer resume") from exc


def wait_until_paused(flow_run_id: str, timeout_s: float = 120) -> None:
    """A review run that has not suspended yet (scheduled, starting: the retrain completes before its review run
    runs) is waited for, so the decision reaches it; a run that is paused or final returns at once."""
    import time

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(UUID(flow_run_id)).state
            if state is None or state.is_paused() or state.is_final():
                return
            time.sleep(1)


def run_states(ids: list[str]) -> dict[str, str]:
    """The state name of each flow run ("gone" when the server has no such run)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    out = {}
    with get_client(sync_client=True) as client:
        for i in ids:
            try:
                run = client.read_flow_run(UUID(i))
                out[i] = run.state.name if run.state else "?"
            except (ObjectNotFound, ValueError):
                out[i] = "gone"
    return out


def start_review_run(name: str, version: str, description: str, timeout_s: int) -> str:
    """Start a run of deployment ``review/<name>`` for ``version`` (not waited for); returns its id."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        deployment_name(name),
        parameters={"model_name": name, "version": str(version), "description": description, "timeout_s": timeout_s},
        flow_run_name=f"review-{name}-v{version}",
        timeout=0,
        as_subflow=False,
    )
    return str(run.id)


def announce(config: PipelineConfig, review: Review, decision: Decision) -> None:
    """Emit ``tuneflow.review.requested`` (the "review needed" alert posts its message)."""
    from prefect.events import emit_event

    from tuneflow.runtime import redact_url

    name = review.name
    ui = os.environ.get("PREFECT_UI_URL", "").rstrip("/")
    run_link = f"{ui}/runs/flow-run/{review.flow_run_id}" if ui and review.flow_run_id else review.flow_run_id
    payload = {
        "model": name,
        "version": review.version,
        "champion_version": review.expected_champion,
        "deadline": review.deadline,
        "flow_run_id": review.flow_run_id,
        "flow_run_url": redact_url(run_link) if run_link else "",
        "version_url": model_url(name, review.version),
        "champion_url": model_url(name, review.expected_champion) if review.expected_champion else "",
        "message": f"review needed: {name} v{review.version} passed the metric gate ({decision.reason}) and waits for "
        f"a person until {review.deadline} (then it is rejected). Decide in the Prefect UI"
        + (f" ({run_link})" if run_link else "")
        + f" or: tuneflow review approve|reject {name} {review.version} --reviewer NAME --comment ...",
    }
    emit_event(REVIEW_EVENT, resource={"prefect.resource.id": model_resource(name)}, payload=payload)


@flow(name="review")
def review(model_name: str, version: str, description: str = "", timeout_s: int = 72 * 3600) -> Any:
    """Wait for a person's decision on ``model_name`` v``version`` without holding anything: suspended until the
    form (or ``tuneflow review``) resumes it; then apply the decision.

    Args:
        model_name: the registered model.
        version: the challenger waiting for review.
        description: the comparison shown above the form (markdown).
        timeout_s: how long it may wait (flow review-timeouts rejects it afterwards).
    """
    from prefect.flow_runs import suspend_flow_run

    answer = suspend_flow_run(
        wait_for_input=review_form(description), timeout=timeout_s + PREFECT_TIMEOUT_GRACE_S, key="review"
    )
    waiting = read_review(get_version(model_name, version))
    if waiting is None:
        raise ValueError(f"{model_name} v{version} never waited for review; nothing to decide")
    outcome = apply_answer(waiting, answer)
    return finished(outcome)


def finished(outcome: ReviewOutcome) -> Any:
    """The review run's final state, named after the outcome: Approved, Rejected, Rejected (timed out), Superseded."""
    r = outcome.review
    data = {"model": r.name, "version": r.version, "review": r.state, "reviewer": r.reviewer, "comment": r.comment}
    name = r.state.capitalize() + (" (timed out)" if r.reviewer == TIMEOUT_REVIEWER else "")
    return Completed(name=name, message=f"{r.name} v{r.version} {r.state}: {r.comment}", data=data)


@flow(name="review-timeouts")
def review_timeouts(model_name: str) -> list[str]:
    """Reject every review of ``model_name`` nobody decided in time (``registry.approval_on_timeout``) and end its
    waiting run; returns the versions closed."""
    closed = close_overdue(model_name)
    for outcome in closed:
        end_timed_out_run(outcome.review)
    if closed:
        get_run_logger().info("timed out: %s", ", ".join(f"v{o.review.version}" for o in closed))
    return [o.review.version for o in closed]


def end_timed_out_run(r: Review) -> None:
    """Resume the waiting run of a review past its deadline with a rejection: the run records the timeout (if nobody
    did yet) and ends "Rejected (timed out)". A run that is gone or no longer waits is left as it is."""
    if not r.flow_run_id:
        return
    try:
        resume(r.flow_run_id, "reject", TIMEOUT_REVIEWER, f"nobody decided by {r.deadline}")
    except RunNotWaiting as exc:
        log.info("the run of %s v%s was not resumed: %s", r.name, r.version, exc)
