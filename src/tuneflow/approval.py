"""A person signs off: a challenger that passed the metric gate waits for review (``registry.approval: required``).

The record lives in the registry, so every way of deciding (the Prefect UI form, ``tuneflow review``, a timeout)
reads and writes the same facts, and the MLflow UI shows them on the version's page:

- version tags ``tuneflow.review`` (waiting | approved | rejected | superseded), ``tuneflow.review.flow_run`` (the
  Prefect flow run that waits), ``.requested``, ``.deadline``, ``.expected_champion`` (the champion the gate compared
  it with), and once decided ``.reviewer``, ``.comment``, ``.time``; ``tuneflow.decision`` follows
  (waiting for review -> promoted | rejected);
- a "Review" section first in the version's card (its registry description);
- an approval is a move of ``champion`` in the champion history (action ``approve``, by ``review``, actor the
  reviewer, the reason carrying the comment and the flow run): compare-and-swap on the champion the gate compared
  with, exactly as the gate's own move. A champion that moved meanwhile (another review approved first, a rollback,
  a manual promotion) makes the approval stale: the review closes as ``superseded`` and nothing moves.

Prefect is not imported here: the flows pause and resume runs (``tuneflow.flows.review``), this module decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from tuneflow.history import MAX_REASON_CHARS, ChampionChanged, Move, move_champion
from tuneflow.registry import Decision, champion_version, get_version, version_description
from tuneflow.registry_base import (
    CARD_TAG,
    DECISION_REASON_TAG,
    DECISION_TAG,
    REVIEW_COMMENT_TAG,
    REVIEW_DEADLINE_TAG,
    REVIEW_EXPECTED_TAG,
    REVIEW_FLOW_RUN_TAG,
    REVIEW_REQUESTED_TAG,
    REVIEW_REVIEWER_TAG,
    REVIEW_TAG,
    REVIEW_TIME_TAG,
    RegistryError,
)

log = logging.getLogger(__name__)

WAITING, APPROVED, REJECTED, SUPERSEDED = "waiting", "approved", "rejected", "superseded"
WAITING_DECISION = "waiting for review"  # tuneflow.decision while a version waits
TIMEOUT_REVIEWER = "tuneflow (timeout)"
SECTION_START, SECTION_END = "<!-- tuneflow:review -->", "<!-- /tuneflow:review -->"

Verdict = Literal["approve", "reject"]


@dataclass(frozen=True)
class Review:
    """The review of one version, as its tags record it."""

    name: str
    version: str
    state: str  # waiting | approved | rejected | superseded
    flow_run_id: str  # "" when no flow run waits (a local run without a Prefect server)
    requested: str
    deadline: str
    expected_champion: str | None
    reviewer: str = ""
    comment: str = ""
    time: str = ""

    def overdue(self, now: datetime | None = None) -> bool:
        """A waiting review past its deadline."""
        return self.state == WAITING and bool(self.deadline) and _parse_time(self.deadline) <= (now or _now())


@dataclass
class ReviewOutcome:
    """What a decision did: the review as recorded afterwards, the champion move (approvals), and the other waiting
    reviews it made stale (closed as superseded; their flow runs are for the caller to end)."""

    review: Review
    move: Move | None = None
    superseded: list[Review] = field(default_factory=list)


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _parse_time(value: str) -> datetime:
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def needs_review(approval: str, decision: Decision) -> bool:
    """Whether the gate's decision waits for a person: only a challenger that passed the gate (one that failed it is
    rejected without asking anyone) and only with ``registry.approval: required``."""
    return approval == "required" and decision.promote


def read_review(mv: Any) -> Review | None:
    """The review recorded on a version (None: it never waited for one)."""
    t = mv.tags or {}
    if REVIEW_TAG not in t:
        return None
    return Review(
        name=mv.name,
        version=str(mv.version),
        state=t[REVIEW_TAG],
        flow_run_id=t.get(REVIEW_FLOW_RUN_TAG, ""),
        requested=t.get(REVIEW_REQUESTED_TAG, ""),
        deadline=t.get(REVIEW_DEADLINE_TAG, ""),
        expected_champion=t.get(REVIEW_EXPECTED_TAG) or None,
        reviewer=t.get(REVIEW_REVIEWER_TAG, ""),
        comment=t.get(REVIEW_COMMENT_TAG, ""),
        time=t.get(REVIEW_TIME_TAG, ""),
    )


def reviews(name: str | None = None, state: str | None = WAITING) -> list[Review]:
    """The reviews in the registry (of one model, or of all), oldest version first; ``state`` None: every state."""
    client = _client()
    names = [name] if name else [rm.name for rm in client.search_registered_models()]
    found = []
    for n in names:
        for mv in client.search_model_versions(f"name='{n}'"):
            r = read_review(mv)
            if r is not None and (state is None or r.state == state):
                found.append(r)
    return sorted(found, key=lambda r: (r.name, int(r.version)))


def request_review(
    name: str, version: str, decision: Decision, flow_run_id: str, timeout_hours: float, now: datetime | None = None
) -> Review:
    """Mark a registered version as waiting for review: its tags, its decision and its card say so.

    The version already carries alias ``challenger`` (registration); ``champion`` does not move.
    """
    now = now or _now()
    client = _client()
    tags = {  # one tag per call: tuneflow.review last, so a version reads "waiting" only with every fact in place
        REVIEW_FLOW_RUN_TAG: flow_run_id,
        REVIEW_REQUESTED_TAG: _iso(now),
        REVIEW_DEADLINE_TAG: _iso(now + timedelta(hours=timeout_hours)),
        REVIEW_EXPECTED_TAG: decision.champion_version or "",
        DECISION_TAG: WAITING_DECISION,
        DECISION_REASON_TAG: f"{decision.reason}; waiting for review (registry.approval: required)"[:MAX_REASON_CHARS],
        REVIEW_TAG: WAITING,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    review = read_review(get_version(name, version))
    assert review is not None
    _write_card(
        name,
        version,
        f"**Waiting for review** since {review.requested} (decide by {review.deadline}; then rejected)"
        + (f", flow run `{flow_run_id}`" if flow_run_id else "")
        + f". Approve or reject in the Prefect UI or with `tuneflow review approve|reject {name} {version} "
        '--reviewer NAME --comment "..."`.',
        headline="**Waiting for review**",
    )
    log.info("%s v%s waits for review until %s (flow run %s)", name, version, review.deadline, flow_run_id or "-")
    return review


def check_decidable(name: str, version: str) -> Review:
    """The waiting review of ``name`` v``version``.

    Raises:
        RegistryError: unknown model or version (naming other models whose v``version`` waits), a version that never
            waited for review, or one already approved, rejected or superseded. Nothing is changed.
    """
    from mlflow.exceptions import MlflowException

    try:
        _client().get_registered_model(name)
    except MlflowException:
        raise RegistryError(
            f"no registered model named {name!r}. Fix: pick one from 'tuneflow review list' or 'tuneflow models'"
        ) from None
    try:
        mv = get_version(name, version)
    except RegistryError:
        elsewhere = [r for r in reviews(None) if r.version == str(version) and r.name != name]
        hint = (
            "; waiting with that number: " + ", ".join(f"{r.name} v{r.version}" for r in elsewhere) if elsewhere else ""
        )
        raise RegistryError(
            f"{name} has no version {version}{hint}. Fix: pick a waiting review from 'tuneflow review list'"
        ) from None
    review = read_review(mv)
    if review is None:
        raise RegistryError(
            f"{name} v{version} is not waiting for review (decision: {(mv.tags or {}).get(DECISION_TAG) or 'none'}); "
            "only a challenger that passed the metric gate with registry.approval: required waits. Fix: pick one "
            f"from 'tuneflow review list', or promote it by hand: tuneflow promote {name} {version} --reason ..."
        )
    if review.state == SUPERSEDED:
        raise RegistryError(
            f"{name} v{version} was superseded ({review.comment}); its comparison is stale. Fix: retrain, so the "
            f"challenger is scored against the current champion, or promote it by hand after 'tuneflow compare'"
        )
    if review.state != WAITING:
        raise RegistryError(
            f"{name} v{version} was already {review.state} by {review.reviewer or '?'} at {review.time or '?'}"
            + (f" ({review.comment})" if review.comment else "")
            + "; a decision is final. Fix: promote or roll back by hand (tuneflow promote / rollback)"
        )
    return review


def decide(
    name: str,
    version: str,
    verdict: Verdict,
    reviewer: str,
    comment: str = "",
    via: str = "",
    now: datetime | None = None,
) -> ReviewOutcome:
    """Approve or reject a waiting review; an approval moves ``champion`` (compare-and-swap).

    Args:
        verdict: "approve" or "reject".
        reviewer: who decided (Prefect OSS records no identity: the form and the CLI ask for it).
        via: how the decision came (e.g. "Prefect UI / flow run ..." or "tuneflow review (user@host)"), in the record.

    Returns:
        the outcome; an approval whose champion moved meanwhile is closed as superseded (``review.state``).

    Raises:
        RegistryError: not decidable (``check_decidable``), no reviewer, or an unknown verdict (nothing changed); past
            its deadline (then it is rejected as timed out; champion does not move).
        ChampionLocked: another champion move held the lock too long; the review still waits.
    """
    review = check_decidable(name, version)
    now = now or _now()
    if review.overdue(now):
        time_out(review, now)
        raise RegistryError(
            f"the review of {name} v{version} timed out at {review.deadline} and is now rejected "
            "(registry.approval_on_timeout: reject); nothing moved. Fix: retrain, or promote it by hand: "
            f"tuneflow promote {name} {version} --reason ..."
        )
    if verdict not in ("approve", "reject"):
        raise RegistryError(f"unknown decision {verdict!r}. Fix: approve or reject")
    if not reviewer.strip():
        raise RegistryError('a decision needs the reviewer\'s name. Fix: pass --reviewer "NAME"')
    flow_note = f"flow run {review.flow_run_id}" if review.flow_run_id else "no flow run"
    if verdict == "reject":
        _record(review, REJECTED, reviewer, comment, now, f"rejected by {reviewer}: {comment or '(no comment)'}")
        return ReviewOutcome(read_review(get_version(name, version)))  # type: ignore[arg-type]
    reason = (
        f"approved by {reviewer}: {comment or '(no comment)'} [review of v{version} requested {review.requested}, "
        f"{flow_note}" + (f", via {via}" if via else "") + "]"
    )
    try:
        move = move_champion(name, version, "approve", "review", reviewer, reason, expected=review.expected_champion)
    except ChampionChanged as exc:
        closed = supersede(
            review,
            f"the champion moved from v{exc.expected or '-'} to v{exc.current or '-'} before "
            f"the approval by {reviewer}",
            now,
        )
        return ReviewOutcome(closed)
    _record(review, APPROVED, reviewer, comment, now, reason)
    stale = [r for r in reviews(name) if r.version != str(version)]
    closed = [
        supersede(r, f"v{version} was approved first (champion v{move.from_version or '-'} -> v{version})", now)
        for r in stale
        if r.expected_champion != str(version)
    ]
    return ReviewOutcome(read_review(get_version(name, version)), move, closed)  # type: ignore[arg-type]


def time_out(review: Review, now: datetime | None = None) -> ReviewOutcome:
    """Apply ``registry.approval_on_timeout`` (reject; never a silent approval) to a review nobody decided in time."""
    now = now or _now()
    _record(
        review,
        REJECTED,
        TIMEOUT_REVIEWER,
        f"nobody decided by {review.deadline}",
        now,
        f"rejected: the review timed out at {review.deadline} (registry.approval_on_timeout: reject)",
    )
    return ReviewOutcome(read_review(get_version(review.name, review.version)))  # type: ignore[arg-type]


def close_overdue(name: str | None = None, now: datetime | None = None) -> list[ReviewOutcome]:
    """Time out every waiting review past its deadline (the flow run that waited may be gone)."""
    now = now or _now()
    return [time_out(r, now) for r in reviews(name) if r.overdue(now)]


def supersede(review: Review, why: str, now: datetime | None = None) -> Review:
    """Close a waiting review whose comparison went stale; champion does not move."""
    _record(review, SUPERSEDED, "tuneflow", why, now or _now(), f"superseded: {why}")
    return read_review(get_version(review.name, review.version))  # type: ignore[return-value]


def _record(review: Review, state: str, reviewer: str, comment: str, now: datetime, reason: str) -> None:
    client = _client()
    tags = {  # tuneflow.review last: a reader that sees the state also sees who, when and why
        REVIEW_REVIEWER_TAG: reviewer,
        REVIEW_COMMENT_TAG: comment[:MAX_REASON_CHARS],
        REVIEW_TIME_TAG: _iso(now),
        DECISION_TAG: "promoted" if state == APPROVED else "rejected",
        DECISION_REASON_TAG: reason[:MAX_REASON_CHARS],
        REVIEW_TAG: state,
    }
    for key, value in tags.items():
        client.set_model_version_tag(review.name, review.version, key, value)
    outcome = {APPROVED: "Approved", REJECTED: "Rejected", SUPERSEDED: "Superseded"}[state]
    _write_card(
        review.name,
        review.version,
        f"**{outcome}** by {reviewer} at {_iso(now)}: {comment or '(no comment)'}\n\n"
        f"- Requested {review.requested}"
        + (f" by flow run `{review.flow_run_id}`" if review.flow_run_id else "")
        + f"; compared with champion v{review.expected_champion or '-'}\n"
        f"- Champion now: v{champion_version(review.name) or '-'}",
        headline="**Promoted to champion**" if state == APPROVED else f"**Not promoted ({state} in review)**",
    )
    log.info("%s v%s review %s by %s: %s", review.name, review.version, state, reviewer, comment)


HEADLINES = ("**Promoted to champion**", "**Waiting for review**")


def _write_card(name: str, version: str, body: str, headline: str) -> None:
    """Put the review section first in the version's card (replacing an earlier one) and set the decision headline."""
    mv = get_version(name, version)
    card = mv.description or ""
    if SECTION_START in card and SECTION_END in card:
        card = card.split(SECTION_START)[0] + card.split(SECTION_END, 1)[1].lstrip("\n")
    for h in HEADLINES:
        card = card.replace(h, headline)
    section = f"{SECTION_START}\n## Review\n{body}\n{SECTION_END}\n\n"
    description = version_description(section + card, (mv.tags or {}).get(CARD_TAG, "its run"))
    _client().update_model_version(name, version, description=description)


def review_rows(
    items: list[Review], run_states: dict[str, str] | None = None, now: datetime | None = None
) -> list[dict]:
    """Reviews for display (``tuneflow review list``): the flow run's state from ``run_states`` (id -> state name,
    "gone" when the server has no such run), overdue ones marked."""
    now = now or _now()
    states = run_states or {}
    rows = []
    for r in items:
        run = "-" if not r.flow_run_id else f"{r.flow_run_id[:8]} ({states.get(r.flow_run_id, 'unknown')})"
        rows.append(
            {
                "model": r.name,
                "version": r.version,
                "state": r.state + (" (overdue)" if r.overdue(now) else ""),
                "vs champion": f"v{r.expected_champion or '-'}",
                "requested": r.requested,
                "deadline": r.deadline,
                "flow run": run,
                "decided": f"{r.reviewer}: {r.comment}" if r.reviewer else "",
            }
        )
    return rows
