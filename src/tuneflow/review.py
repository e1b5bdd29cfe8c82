"""Review the registry by hand: promote, roll back, compare versions, read the champion history.

Every score shown here is recomputed on the current eval split of the config's data (read, split by
text hash, same scoring code as the retrain flow), never read back from tags, so two versions are
always compared like with like.
"""

from __future__ import annotations

import getpass
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tuneflow.config import PipelineConfig
from tuneflow.data import LABEL, TEXT, read_table, sft_settings, split_by_text_hash
from tuneflow.evaluate import Evaluation
from tuneflow.history import ChampionChanged, Move, move_champion, read_entries, refuse_if_champion, rollback_target
from tuneflow.landing import ACCEPTED, load_accepted
from tuneflow.registry import champion_version, get_version
from tuneflow.registry_base import DATA_DIGEST_TAG, DECISION_TAG, VALIDATION_TAG, RegistryError, UntrustedModel
from tuneflow.reporting import metrics_table
from tuneflow.scoring import score_version
from tuneflow.validation import drop_out_of_bounds

log = logging.getLogger(__name__)

# A version registered by the retrain flow carries these; one without them was not produced (or not
# validated) by tuneflow, so promoting it needs --force.
REQUIRED_LINEAGE = (DATA_DIGEST_TAG, DECISION_TAG, VALIDATION_TAG)


@dataclass
class PromoteOutcome:
    move: Move
    table: str
    eval_rows: int
    eval_source: str  # what the eval split was, for people: "N rows of data.csv" or of which accepted batches


def cli_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return os.environ.get("USER", "unknown")


def _check_name(cfg: PipelineConfig, name: str, config_file: str) -> None:
    if cfg.registry.model_name != name:
        raise RegistryError(
            f"{config_file} is the config of '{cfg.registry.model_name}', not '{name}'; its eval split would be "
            "the wrong data. "
            f"Fix: pass --config with the config whose registry.model_name is {name}"
        )


def current_eval_frame(cfg: PipelineConfig, config_file: str = "the config") -> pd.DataFrame:
    """The eval split of the config's data as it is now: rows with a text and a configured label, split by text hash.

    Validation is not required here (the data only serves as a yardstick), but rows that cannot be
    scored (no text, unknown label) are left out.
    """
    if cfg.data.landing:
        loaded = load_accepted(cfg, Path(cfg.data.landing))  # what the retrain flow trains on
        if loaded is None:
            raise RegistryError(
                f"no accepted data in {cfg.data.landing}/accepted. Fix: run the retrain flow on a batch first"
            )
    else:
        loaded = read_table(cfg.data, config_file, sft=sft_settings(cfg))
    # the rows a retrain keeps (tolerated out-of-bounds rows and, for sft, repeated pairs dropped): the eval
    # split is then exactly the one the retrain scored its versions on
    frame = drop_out_of_bounds(loaded, cfg)[0].frame
    # kind sft has no label set: any row with a prompt and a response can be scored
    known = frame[LABEL].isin(cfg.data.labels) if cfg.data.labels else frame[LABEL].notna()
    usable = frame[frame[TEXT].notna() & known]
    if len(usable) < len(frame):
        log.info(
            "left out %d of %d rows without text or with a label outside %s",
            len(frame) - len(usable),
            len(frame),
            cfg.data.labels,
        )
    ev = split_by_text_hash(usable.reset_index(drop=True), cfg.data.eval_fraction, cfg.data.split_salt).eval
    if ev.empty:
        raise RegistryError(
            f"the eval split of {cfg.data.path or cfg.data.landing} is empty. Fix: add rows or raise "
            f"data.eval_fraction in {config_file}"
        )
    return ev


def eval_source(cfg: PipelineConfig, eval_frame: pd.DataFrame, shown: int = 5) -> str:
    """What an eval split from ``current_eval_frame`` is: "N rows of PATH", or of which accepted batches."""
    if not cfg.data.landing:
        return f"{len(eval_frame)} rows of {cfg.data.path}"
    batches = sorted(eval_frame["batch"].unique()) if "batch" in eval_frame else []
    names = ", ".join(batches[:shown]) + (f" and {len(batches) - shown} more" if len(batches) > shown else "")
    where = Path(cfg.data.landing) / ACCEPTED
    return f"{len(eval_frame)} rows of {len(batches)} accepted batches in {where}" + (f": {names}" if names else "")


def score_versions(
    cfg: PipelineConfig, name: str, versions: list[str], eval_frame: pd.DataFrame
) -> dict[str, Evaluation]:
    """Score each version on ``eval_frame`` with its own ``max_length`` (from its tags)."""
    from mlflow.exceptions import MlflowException
    from safetensors import SafetensorError

    out = {}
    for v in versions:
        mv = get_version(name, v)
        try:
            out[str(v)] = score_version(cfg, mv, eval_frame)
        except UntrustedModel:
            raise
        except (ValueError, OSError) as exc:
            raise RegistryError(
                f"{name} v{v} cannot be scored on this eval split: {exc}. Fix: compare with a config whose "
                "labels the model knows"
            ) from exc
        except (MlflowException, RuntimeError, SafetensorError) as exc:
            raise RegistryError(
                f"{name} v{v} could not be loaded: {type(exc).__name__}: {exc}. Its artifacts may have been "
                "deleted or half-copied, or the store is unreachable. Fix: check the artifact store (tuneflow "
                f"verify {name}/{v}), or compare and promote other versions"
            ) from exc
    return out


def promotion_blockers(mv: Any) -> list[str]:
    """Why a version should not become champion without --force (empty: nothing against it)."""
    tags = mv.tags or {}
    problems = [
        f"tag {t} is missing (not registered by a validated tuneflow run)" for t in REQUIRED_LINEAGE if not tags.get(t)
    ]
    if tags.get(VALIDATION_TAG) and tags[VALIDATION_TAG] != "passed":
        problems.append(f"its data failed validation ({VALIDATION_TAG}={tags[VALIDATION_TAG]})")
    return problems


def promote(
    cfg: PipelineConfig,
    name: str,
    version: str,
    reason: str,
    force: bool = False,
    config_file: str = "the config",
    actor: str | None = None,
) -> PromoteOutcome:
    """Manual promotion: re-score the champion and the candidate on the current eval split, then move ``champion``.

    Raises:
        ChampionChanged: the champion moved while the versions were scored (nothing moved; the comparison
            is stale).
        RegistryError: unknown version, already champion, no reason, a version that failed or lacks
            validation (unless ``force``), or a config of another model.
    """
    _check_name(cfg, name, config_file)
    if not reason.strip():
        raise RegistryError('a promotion needs a reason. Fix: pass --reason "why this version"')
    mv = get_version(name, version)
    current = champion_version(name)
    refuse_if_champion(name, version, current)  # before minutes of scoring; the move checks it again under the lock
    blockers = promotion_blockers(mv)
    if blockers and not force:
        raise RegistryError(
            f"refusing to promote {name} v{version}: "
            + "; ".join(blockers)
            + ". Fix: promote a validated version, or pass --force after review"
        )
    eval_frame = current_eval_frame(cfg, config_file)
    scored = score_versions(cfg, name, [str(version)] + ([current] if current else []), eval_frame)
    cols: dict[str, dict[str, float] | None] = {f"candidate v{version}": scored[str(version)].metrics}
    if current:
        cols[f"champion v{current}"] = scored[current].metrics
    primary = cfg.evaluate.primary_metric
    note = f"{primary} v{version}={scored[str(version)].metrics[primary]:.4f}" + (
        f" vs v{current}={scored[current].metrics[primary]:.4f}" if current else ""
    )
    full_reason = (
        f"{reason} [{note} on {eval_source(cfg, eval_frame)}"
        + ("; forced past: " + "; ".join(blockers) if blockers else "")
        + "]"
    )
    # compare-and-swap, as the gate: a champion that moved while scoring (a retrain's gate, a colleague) stays
    try:
        move = move_champion(name, str(version), "promote", "cli", actor or cli_actor(), full_reason, expected=current)
    except ChampionChanged as exc:
        raise _moved_meanwhile(
            name, exc, f"v{version} was compared with it", f"tuneflow promote {name} {version} --reason ..."
        ) from exc
    return PromoteOutcome(move, metrics_table(cols, cfg.data.labels), len(eval_frame), eval_source(cfg, eval_frame))


def _moved_meanwhile(name: str, exc: ChampionChanged, while_: str, rerun: str) -> ChampionChanged:
    return ChampionChanged(
        f"the champion of {name} moved from v{exc.expected or '-'} to v{exc.current or '-'} while {while_}; "
        f"nothing was moved (the comparison is stale). Fix: look at 'tuneflow models {name} --history' and "
        f"re-run {rerun} if it is still wanted",
        exc.expected,
        exc.current,
    )


def rollback(name: str, reason: str = "", actor: str | None = None) -> Move:
    """Move ``champion`` back to the champion before the current one, as recorded in the history.

    Raises:
        ChampionChanged: the champion moved between reading the history and the move (nothing moved).
        RegistryError: no champion, no history, nothing earlier, or the earlier version is gone.
    """
    current, previous = rollback_target(name)
    reason = reason or f"rollback from v{current}"
    unreadable = read_entries(name)[1]  # those that could hide a move made rollback_target refuse
    if unreadable:
        reason += (
            f" (target v{previous} from the readable history; skipped unreadable entries "
            + ", ".join(u.key for u in unreadable)
            + ": no move happened there, the entries around them connect)"
        )
    try:
        return move_champion(name, previous, "rollback", "cli", actor or cli_actor(), reason, current)
    except ChampionChanged as exc:
        raise _moved_meanwhile(name, exc, f"rolling back to v{previous}", f"tuneflow rollback {name}") from exc


def compare(cfg: PipelineConfig, name: str, v1: str, v2: str, config_file: str = "the config") -> tuple[str, str]:
    """A markdown table of both versions' metrics, recomputed on the current eval split; and what that split
    was (``eval_source``)."""
    _check_name(cfg, name, config_file)
    eval_frame = current_eval_frame(cfg, config_file)
    scored = score_versions(cfg, name, [v1, v2], eval_frame)
    champ = champion_version(name)
    label = {v: f"v{v}" + (" (champion)" if v == champ else "") for v in (str(v1), str(v2))}
    table = metrics_table({label[str(v)]: scored[str(v)].metrics for v in (v1, v2)}, cfg.data.labels)
    return table, eval_source(cfg, eval_frame)


def history_rows(name: str) -> list[dict[str, str]]:
    """The champion history for display, oldest first; an unreadable entry (a hand-edited tag) is a row that
    says so, named by its tag, in its place in the sequence."""
    moves, unreadable = read_entries(name)
    rows = [
        (
            (m.seq, 0),
            {
                "time": m.time,
                "move": f"v{m.from_version or '-'} -> v{m.to_version}",
                "action": m.action + ("" if m.applied else " (NOT APPLIED: interrupted before the alias moved)"),
                "by": f"{m.by}:{m.actor}",
                "reason": m.reason,
            },
        )
        for m in moves
    ]
    rows += [
        (
            (u.seq if u.seq is not None else float("inf"), 1),
            {
                "time": "?",
                "move": "?",
                "action": "UNREADABLE (not used by rollback)",
                "by": "?",
                "reason": f"tag {u.key}: {u.problem}; value {u.value[:80]!r}",
            },
        )
        for u in unreadable
    ]
    return [row for _, row in sorted(rows, key=lambda r: r[0])]
