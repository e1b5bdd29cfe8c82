"""Champion history: every move of the ``champion`` alias, stored in the registry itself.

One registered-model tag per move, ``tuneflow.history.<6-digit seq>.<random>``, whose value is a JSON object
(time, action, by, actor, from, to, reason). One tag per move rather than one growing JSON-lines tag
because a tag value is capped in size (a few kB on MLflow's SQL store), while the number of tags is
not; the history then travels with the registry (a team server, a copied sqlite file) and the MLflow
UI shows it on the model's page.

Write order of a move (``move_champion``), so an interruption leaves the registry consistent:
1. check the target version exists and carries its model card (never alias a version without one);
2. write the history entry (write-ahead: an alias never moves without its audit record);
3. move the alias.
Moves are compare-and-swap: a move names the champion it expects to replace (the gate: the champion it
beat) and is refused with ``ChampionChanged`` when the alias moved meanwhile (another run promoted, or
someone rolled back). Check, entry and alias happen under a lock per model (``<cache>/locks``: exclusive
between processes on one machine); the random part of each entry's key keeps entries unique even
when two machines move at the same moment.
A crash between 2 and 3 leaves an entry whose move did not happen. ``applied_moves`` detects it (the
next entry, or the current champion, does not start from that entry's target) and ignores it for
rollback; ``tuneflow models NAME --history`` marks it "not applied".
A tag whose value is not a move (edited by hand) is ``Unreadable``: listed as such, never replayed, and
rollback refuses only when one sits where the champion may have moved.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuneflow.files import LockTimeout, file_lock
from tuneflow.registry import Decision, champion_version, get_version, version_description
from tuneflow.registry_base import CARD_TAG, CHAMPION, DECISION_REASON_TAG, DECISION_TAG, RegistryError
from tuneflow.runtime import cache_dir

log = logging.getLogger(__name__)

# + a sequence number and a random suffix: one move of champion as JSON (seq, time, action, by, actor, from, to, reason)
HISTORY_TAG = "tuneflow.history."
MAX_REASON_CHARS = 1000  # keeps one entry far below the registry's tag-value limit
ANY = object()  # move_champion's ``expected``: replace whatever the champion is


class ChampionChanged(RegistryError):
    """The champion is no longer the one a move expected to replace; nothing was moved."""

    def __init__(self, message: str, expected: str | None = None, current: str | None = None) -> None:
        super().__init__(message)
        self.expected = expected  # the champion the move was decided against
        self.current = current  # the champion it found


class ChampionLocked(RegistryError):
    """Another champion move held the model's lock for longer than the timeout; nothing was moved."""


CHAMPION_LOCK_TIMEOUT_S = 120.0  # a move holds the lock for a few registry calls: 2 minutes means it is stuck


def champion_lock_path(name: str) -> Path:
    """The per-model lock that serializes champion moves on this machine."""
    return cache_dir() / "locks" / f"champion-{name}.lock"


@dataclass(frozen=True)
class Move:
    seq: int
    time: str  # ISO 8601, UTC
    action: str  # gate | promote | rollback
    by: str  # gate | cli
    actor: str  # Prefect flow run id (gate) or OS user (cli)
    from_version: str | None
    to_version: str
    reason: str
    applied: bool = True

    def to_json(self) -> str:
        return json.dumps(
            {
                "seq": self.seq,
                "time": self.time,
                "action": self.action,
                "by": self.by,
                "actor": self.actor,
                "from": self.from_version,
                "to": self.to_version,
                "reason": self.reason,
            }
        )


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def has_card(mv: Any) -> bool:
    return bool((mv.description or "").strip())


@dataclass(frozen=True)
class Unreadable:
    """A history tag whose value is not a move (edited by hand, truncated): shown, never replayed."""

    key: str
    seq: int | None  # from the tag's key, when it has the usual form
    value: str
    problem: str


def _key_seq(key: str) -> int | None:
    head = key.removeprefix(HISTORY_TAG).split(".")[0]
    return int(head) if head.isdigit() else None


def _parse(key: str, value: str) -> Move | Unreadable:
    try:
        e = json.loads(value)
        return Move(
            int(e["seq"]), str(e["time"]), e["action"], e["by"], e["actor"], e["from"], str(e["to"]), e["reason"]
        )
    except ValueError as exc:
        return Unreadable(key, _key_seq(key), value, f"not JSON ({exc})")
    except (KeyError, TypeError) as exc:
        return Unreadable(key, _key_seq(key), value, f"not a move record (no field {exc})")


def read_entries(name: str) -> tuple[list[Move], list[Unreadable]]:
    """The recorded moves of ``champion`` (oldest first, each marked applied or not) and the unreadable entries."""
    tags = _client().get_registered_model(name).tags or {}
    parsed = [_parse(k, v) for k, v in tags.items() if k.startswith(HISTORY_TAG)]
    moves = sorted((m for m in parsed if isinstance(m, Move)), key=lambda m: (m.seq, m.time))
    bad = [u for u in parsed if isinstance(u, Unreadable)]
    return applied_moves(moves, champion_version(name)), bad


def read_history(name: str) -> list[Move]:
    """All readable recorded moves of ``champion`` for ``name``, oldest first, each marked applied or not."""
    return read_entries(name)[0]


def hides_a_move(entry: Unreadable, moves: list[Move], current: str | None) -> bool:
    """Whether an unreadable entry may stand for a move that happened.

    Every move records the champion it replaced: when the readable entries around it connect (the one before
    ends where the one after, or the current champion, starts), no move happened there. One before every
    readable entry at most hides a champion below the first recorded one, which rollback never reaches.
    """
    if entry.seq is None:
        return True  # cannot be placed in the sequence
    before = [m for m in moves if m.seq < entry.seq]
    if not before:
        return False
    after = next((m.from_version for m in moves if m.seq > entry.seq), current)
    return before[-1].to_version != after


def applied_moves(moves: list[Move], current: str | None) -> list[Move]:
    """Mark each move applied when the next move (or, for the last, the current champion) starts from its target.

    Every move records the champion it replaced, so a move that was written but whose alias update was
    interrupted is followed by a move that starts from the old champion, not from its target.
    """
    out = []
    for i, m in enumerate(moves):
        after = moves[i + 1].from_version if i + 1 < len(moves) else current
        out.append(
            Move(m.seq, m.time, m.action, m.by, m.actor, m.from_version, m.to_version, m.reason, after == m.to_version)
        )
    return out


def champion_stack(moves: list[Move]) -> list[str]:
    """Replay the applied moves: promotions push a champion, rollbacks pop one. The last item is the champion."""
    stack: list[str] = []
    for m in moves:
        if not m.applied:
            continue
        if m.action == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != m.to_version:
                stack.append(m.to_version)
        else:
            if not stack and m.from_version:
                stack.append(m.from_version)  # history started while a champion already existed
            stack.append(m.to_version)
    return stack


def rollback_target(name: str) -> tuple[str, str]:
    """(current champion, the champion before it) from the history.

    Raises:
        RegistryError: no champion, no history, nothing earlier to go back to, or an unreadable entry where the
            champion may have moved (``hides_a_move``).
    """
    current = champion_version(name)
    fix = (
        f"Fix: pick a version with 'tuneflow models {name}' and run 'tuneflow promote {name} VERSION --reason \"...\"'"
    )
    if current is None:
        raise RegistryError(f"{name} has no champion, so there is nothing to roll back. {fix}")
    moves, unreadable = read_entries(name)
    hiding = [u for u in unreadable if hides_a_move(u, moves, current)]
    if hiding:
        raise RegistryError(
            f"the champion history of {name} has unreadable entries where the champion may have moved: "
            + "; ".join(f"tag {u.key}: {u.problem}" for u in hiding)
            + f". Without them it cannot say which champion came before v{current}. Fix: restore or delete the "
            f"tag (MlflowClient().set_registered_model_tag / delete_registered_model_tag), or pick a version with "
            f"'tuneflow models {name}' and run 'tuneflow promote {name} VERSION --reason \"...\"'"
        )
    if not moves:
        raise RegistryError(
            f"{name} has no promotion history (champion v{current} was set before tuneflow recorded moves). {fix}"
        )
    stack = champion_stack(moves)
    if not stack or stack[-1] != current:
        raise RegistryError(
            f"champion of {name} is v{current}, but the history ends at v{stack[-1] if stack else '?'}: the "
            "alias was moved "
            f"outside tuneflow, so the history cannot say what came before. {fix}"
        )
    if len(stack) < 2:
        raise RegistryError(
            f"champion v{current} of {name} is the first recorded champion; there is no earlier champion to "
            f"roll back to. {fix}"
        )
    return current, stack[-2]


def write_entry(name: str, move: Move) -> None:
    """Step 2 of a move: the write-ahead history record (its own function so tests can interrupt a move here)."""
    key = f"{HISTORY_TAG}{move.seq:06d}.{uuid.uuid4().hex[:8]}"  # unique even if two writers pick one seq
    _client().set_registered_model_tag(name, key, move.to_json())


def set_champion_alias(name: str, version: str) -> None:
    """Step 3 of a move (its own function so tests can interrupt a move before it)."""
    _client().set_registered_model_alias(name, CHAMPION, version)


def refuse_if_champion(name: str, version: str, current: str | None) -> None:
    """A move to the version that already is the champion is refused (``RegistryError``): there is nothing to do."""
    if current == str(version):
        raise RegistryError(f"{name} v{version} already is the champion; nothing to do")


def move_champion(
    name: str,
    version: str,
    action: str,
    by: str,
    actor: str,
    reason: str,
    expected: str | None | object = ANY,
    lock_timeout_s: float | None = None,
) -> Move:
    """Point ``champion`` at ``version`` and record who, when, from which version and why.

    Args:
        expected: the champion this move replaces (None: there must be none); ``ANY`` skips the check.
        lock_timeout_s: how long to wait for another move's lock (default ``CHAMPION_LOCK_TIMEOUT_S``).

    Raises:
        ChampionChanged: the champion is not ``expected`` any more (nothing moved, nothing recorded).
        ChampionLocked: another move held the lock past the timeout (nothing moved, nothing recorded).
        RegistryError: the version does not exist, has no model card, or already is the champion.
    """
    client = _client()
    mv = get_version(name, version)
    if not has_card(mv):
        raise RegistryError(
            f"{name} v{version} has no model card (empty description); refusing to make it champion. Fix: "
            "register it through 'tuneflow run'"
        )
    with _champion_lock(name, version, CHAMPION_LOCK_TIMEOUT_S if lock_timeout_s is None else lock_timeout_s):
        current = champion_version(name)
        if expected is not ANY and current != expected:
            raise ChampionChanged(
                f"champion of {name} is v{current or '-'} now, not v{expected or '-'} as when v{version} was "
                f"compared with it; v{version} stays challenger. Fix: retrain (it is scored against the new "
                f"champion) or promote it by hand after review: tuneflow promote {name} {version} --reason ...",
                None if expected is None else str(expected),
                current,
            )
        refuse_if_champion(name, version, current)
        tags = client.get_registered_model(name).tags or {}
        # numbered past every entry, unreadable ones too (their key still carries their number)
        seqs = [e.seq for k, v in tags.items() if k.startswith(HISTORY_TAG) for e in [_parse(k, v)]]
        seq = 1 + max((q for q in seqs if q is not None), default=0)
        move = Move(
            seq,
            datetime.now(UTC).isoformat(timespec="seconds"),
            action,
            by,
            actor,
            current,
            str(version),
            reason[:MAX_REASON_CHARS],
        )
        write_entry(name, move)
        set_champion_alias(name, str(version))
    log.info("champion of %s: v%s -> v%s (%s by %s/%s): %s", name, current or "-", version, action, by, actor, reason)
    return move


@contextmanager
def _champion_lock(name: str, version: str, timeout_s: float) -> Iterator[None]:
    path = champion_lock_path(name)
    try:
        with file_lock(path, timeout_s=timeout_s, what=f"another champion move of {name}"):
            yield
    except LockTimeout as exc:
        holder = exc.holder or "a process that did not say which (an older tuneflow)"
        raise ChampionLocked(
            f"could not move the champion of {name} to v{version}: another champion move of {name} on this machine "
            f"has held the lock {path} for {timeout_s:.0f} s; nothing was moved. Held by: {holder}. Fix: wait for "
            "that move (a retrain's gate, tuneflow promote or rollback) to finish and run this again; if that "
            "process hangs, end it: the lock frees itself when its process exits (deleting the file does not help)"
        ) from None


def promote_by_gate(name: str, version: str, decision: Decision, actor: str) -> Move:
    """The retrain's promotion: move ``champion`` to the new version with the decision as the reason, only
    if the champion is still the one the decision compared with (``ChampionChanged`` otherwise)."""
    return move_champion(name, str(version), "gate", "gate", actor, decision.reason, expected=decision.champion_version)


def record_refused_promotion(name: str, version: str, why: str, short: str = "champion changed meanwhile") -> None:
    """A refused gate promotion (``ChampionChanged``, ``ChampionLocked``): the version's decision tags and card say
    why (``why`` in full, ``short`` in the card's headline)."""
    client = _client()
    mv = get_version(name, version)
    client.set_model_version_tag(name, version, DECISION_TAG, "rejected")
    client.set_model_version_tag(name, version, DECISION_REASON_TAG, why[:MAX_REASON_CHARS])
    card = (mv.description or "").replace("**Promoted to champion**", f"**Not promoted ({short})**")
    refused = f"Promotion refused: {why}\n\n"  # first, so a shortened card keeps it
    description = version_description(refused + card, (mv.tags or {}).get(CARD_TAG, "its run"))
    client.update_model_version(name, version, description=description)


def registry_problems(name: str) -> list[str]:
    """Consistency check: every alias points at an existing version, every version has its card."""
    from mlflow.exceptions import MlflowException

    client = _client()
    rm = client.get_registered_model(name)
    problems = []
    versions = {str(mv.version): mv for mv in client.search_model_versions(f"name='{name}'")}
    for alias, ver in (rm.aliases or {}).items():
        if str(ver) not in versions:
            problems.append(f"alias {alias} points at missing version {ver}")
    for v, mv in versions.items():
        if not has_card(mv):
            problems.append(f"version {v} has no model card description")
        uri = (mv.tags or {}).get(CARD_TAG)
        if not uri:
            problems.append(f"version {v} has no {CARD_TAG} tag")
            continue
        try:
            import mlflow

            mlflow.artifacts.load_text(uri)
        except (MlflowException, OSError) as exc:
            problems.append(f"version {v}: model card artifact {uri} unreadable: {exc}")
    return problems
