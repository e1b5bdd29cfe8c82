"""The registry: the champion lookup, the promotion decision, registering a version, scoring a version.

A retrain logs its model, registers it with its model card and lineage tags, aliases it ``challenger``,
and (``tuneflow.history.move_champion``) moves ``champion`` to it only when ``decide`` says it beats the
current champion re-scored on the same eval split.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from importlib.metadata import version as pkg_version
from typing import TYPE_CHECKING, Any

import pandas as pd

from tuneflow.config import PipelineConfig, higher_is_better
from tuneflow.evaluate import Evaluation
from tuneflow.kinds import get_kind
from tuneflow.models import base_model_card, compact_tokenizer_file
from tuneflow.reference import REFERENCE_TAG, log_reference
from tuneflow.registry_base import (
    CARD_TAG,
    CHALLENGER,
    CHAMPION,
    CHAMPION_BEFORE_TAG,
    CHAMPION_SCORE_TAG,
    DATA_DIGEST_TAG,
    DECISION_REASON_TAG,
    DECISION_TAG,
    FINGERPRINT_TAG,
    KIND_TAG,
    MAX_LENGTH_TAG,
    OPTIONAL_REQUIREMENT_PACKAGES,
    PRIMARY_METRIC_TAG,
    REQUIREMENT_PACKAGES,
    SCORE_TAG,
    VALIDATION_TAG,
    RegistryError,
)

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CARD_FILE = "model_card.md"
# MLflow's schema holds a version's description in a 5,000-character column on PostgreSQL and MySQL
MAX_DESCRIPTION = 5000


def version_description(card: str, card_uri: str, limit: int = MAX_DESCRIPTION) -> str:
    """The model card as a version description: whole when it fits ``limit``, else without its longest sections
    (the later one first among equals) until it fits, and a line naming the sections left out and where the whole
    card is. The full card is always the run's ``model_card.md``."""
    if len(card) <= limit:
        return card

    def footer(left_out: list[str]) -> str:
        names = ", ".join(left_out) or "the end of the introduction"
        where = f"The full model card is the artifact `{CARD_FILE}` of the run ({card_uri})."
        return f"\n\n*Left out here: {names}. {where}*"

    intro, *sections = card.split("\n## ")
    headings = [s.split("\n", 1)[0] for s in sections]
    room = limit - len(footer(headings))  # the footer when every section is left out
    kept = dict(enumerate(sections))
    while kept and len(intro) + sum(4 + len(s) for s in kept.values()) > room:
        del kept[max(kept, key=lambda i: (len(kept[i]), i))]
    body = intro[: max(0, room)] + "".join("\n## " + kept[i] for i in sorted(kept))
    return body.rstrip() + footer([h for i, h in enumerate(headings) if i not in kept])


_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # MLflow's error codes for "no such alias"


# Scores are differences of float sums: 1e-9 is far below any margin a person sets, far above rounding error
MARGIN_TOLERANCE = 1e-9
MAX_ERROR_IN_REASON = 400  # a champion's scoring error, quoted in the decision reason (a tag) and the card


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    challenger_score: float
    champion_score: float | None = None
    champion_version: str | None = None


def decide(
    metric: str,
    challenger_score: float,
    champion_score: float | None,
    champion_version: str | None,
    min_improvement: float,
    champion_error: str | None = None,
) -> Decision:
    """The promotion gate, in the metric's own direction (``eval_loss`` and ``perplexity``: lower is better).

    No champion: the challenger (which passed validation to get here) becomes champion. Otherwise it
    must beat the champion's score on the same eval split by at least ``min_improvement``; a champion that
    could not be scored (``champion_error`` says why) is never replaced automatically.
    """
    if champion_score is None:
        if champion_version is None:
            return Decision(
                True,
                f"no champion yet; first validated model becomes champion ({metric}={challenger_score:.4f})",
                metric,
                challenger_score,
            )
        return Decision(
            False,
            f"champion v{champion_version} could not be re-evaluated on this eval split"
            + (f" ({champion_error[:MAX_ERROR_IN_REASON]})" if champion_error else "")
            + "; promote manually after review",
            metric,
            challenger_score,
            None,
            champion_version,
        )
    # improvement in the metric's better direction; NaN (a broken score) never promotes
    delta = challenger_score - champion_score if higher_is_better(metric) else champion_score - challenger_score
    # 0.85 - 0.80 is 0.04999999999999993 in floats: an improvement of exactly the margin counts as reaching it
    reaches = delta >= min_improvement or math.isclose(delta, min_improvement, rel_tol=1e-9, abs_tol=MARGIN_TOLERANCE)
    if reaches and delta > 0:
        return Decision(
            True,
            f"{metric} {challenger_score:.4f} beats champion v{champion_version} ({champion_score:.4f}) by "
            f"{delta:+.4f} (>= {min_improvement}; {'higher' if higher_is_better(metric) else 'lower'} is better)",
            metric,
            challenger_score,
            champion_score,
            champion_version,
        )
    return Decision(
        False,
        f"{metric} {challenger_score:.4f} vs champion v{champion_version} {champion_score:.4f}: {delta:+.4f} is "
        f"not an improvement of at least {min_improvement} ({'higher' if higher_is_better(metric) else 'lower'} "
        "is better); champion kept",
        metric,
        challenger_score,
        champion_score,
        champion_version,
    )


def decide_promotion(cfg: PipelineConfig, challenger: Evaluation, champion: ChampionScore) -> Decision:
    """``decide`` on the configured primary metric, the new model against the re-scored champion."""
    primary = cfg.evaluate.primary_metric
    champion_score = champion.evaluation.metrics[primary] if champion.evaluation is not None else None
    return decide(
        primary,
        challenger.metrics[primary],
        champion_score,
        champion.version,
        cfg.registry.min_improvement,
        champion.error,
    )


def version_by_alias(name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at, or None when there is no such alias (or no such model yet)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            return None
        raise


def current_champion(name: str) -> ModelVersion | None:
    """The version aliased ``champion``, or None when there is none (or no such model yet)."""
    return version_by_alias(name, CHAMPION)


def champion_version(name: str) -> str | None:
    champ = current_champion(name)
    return None if champ is None else str(champ.version)


def get_version(name: str, version: str) -> ModelVersion:
    """A registered version.

    Raises:
        RegistryError: no such model or version.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(
            f"{name} version {version} not found in the registry. "
            f"Fix: pick a version listed by 'tuneflow models {name}'"
        ) from exc


@dataclass
class ChampionScore:
    """The current champion scored on this run's eval split (version None: there is no champion)."""

    version: str | None
    evaluation: Evaluation | None
    error: str | None  # it exists but cannot be scored here (e.g. it lacks a label)


def pip_requirements(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Explicit, because MLflow's inference looks for torchvision and fails without it; ``extra``: packages of
    ``OPTIONAL_REQUIREMENT_PACKAGES`` this version needs besides (an adapter-only version: peft)."""
    unknown = sorted(set(extra) - set(OPTIONAL_REQUIREMENT_PACKAGES))
    if unknown:
        raise ValueError(
            f"requirements {unknown} are not ones a tuneflow version may pin (the trust check refuses them)"
        )
    # no local tag: torch's +cpu
    return [f"{p}=={pkg_version(p).split('+')[0]}" for p in (*REQUIREMENT_PACKAGES, *extra)]


def register_version(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: PipelineConfig,
    decision: Decision,
    tags: dict[str, str],
    description: str,
    example: list[str],
    metrics: dict[str, float] | None = None,
    reference: pd.DataFrame | None = None,
) -> ModelVersion:
    """Log the model (transformers flavor) and its card into the active run, register it, alias it ``challenger``.

    Write order, so an interruption anywhere leaves the registry consistent (see ``tuneflow.history``):
    1. model and ``model_card.md`` go to the active run (no registry entry yet);
    2. the version is created with its lineage/decision tags AND the card as description in one call,
       so a version never exists without its card or tags;
    3. alias ``challenger``. Moving ``champion`` is a separate step (``tuneflow.history.move_champion``).

    ``metrics`` (the eval metrics) go on the run the version points to and on MLflow's logged model, so the
    registry page links to a run that shows them. ``reference`` (the train split) is sampled into the version's
    drift reference (``tuneflow.reference``), which monitoring compares new batches with.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    kind = get_kind(cfg.kind)
    options = kind.logging_options(cfg)
    extra = options.pop("extra_requirements", [])
    with kind.logging_context(model, cfg), compact_tokenizer_file(tokenizer):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task=kind.mlflow_task,
            pip_requirements=pip_requirements(extra),
            input_example=kind.input_example(example),
            # Without a card MLflow asks the Hugging Face Hub for one (offline: a warning on every run).
            model_card=base_model_card(cfg.model, description),
            **options,
        )
    run_id = mlflow.active_run().info.run_id
    if metrics:
        mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, model_id=info.model_id)
    mlflow.log_text(description, CARD_FILE)
    name = cfg.registry.model_name
    if reference is not None:
        tags = {**tags, REFERENCE_TAG: log_reference(reference, cfg)}
    all_tags = {
        **tags,
        **decision_tags(decision),
        MAX_LENGTH_TAG: str(cfg.model.max_length),
        KIND_TAG: cfg.kind,
        CARD_TAG: f"runs:/{run_id}/{CARD_FILE}",
    }
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = client.create_model_version(
        name,
        info.model_uri,
        run_id=run_id,
        tags=all_tags,
        description=version_description(description, all_tags[CARD_TAG]),
        model_id=info.model_id,
    )
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return client.get_model_version(name, mv.version)


def version_tags(lineage: dict[str, str], reports: list[Any] | None) -> dict[str, str]:
    """A new version's tags: the run's lineage, and whether its data passed validation.

    Only validated data reaches registration; a landing-zone run without new batches (no reports)
    trains on batches accepted, and so validated, earlier.
    """
    tags = dict(lineage)
    if reports is not None:
        tags[VALIDATION_TAG] = "passed" if all(r.success for r in reports) else "failed"
    return tags


def decision_tags(decision: Decision) -> dict[str, str]:
    return {
        DECISION_TAG: "promoted" if decision.promote else "rejected",
        DECISION_REASON_TAG: decision.reason,
        PRIMARY_METRIC_TAG: decision.metric,
        SCORE_TAG: f"{decision.challenger_score:.6f}",
        CHAMPION_SCORE_TAG: "" if decision.champion_score is None else f"{decision.champion_score:.6f}",
        CHAMPION_BEFORE_TAG: decision.champion_version or "",
    }


def refused_promotion(decision: Decision, why: str, run_id: str) -> Decision:
    """A promotion the registry refused (``why``): the decision says so, and the parent run's tags too (as the
    version's tags do)."""
    from dataclasses import replace

    from mlflow import MlflowClient

    refused = replace(decision, promote=False, reason=f"{decision.reason}; NOT promoted: {why}")
    client = MlflowClient()
    for key, value in decision_tags(refused).items():
        client.set_tag(run_id, key, value)
    return refused


def fingerprint(rows_digest: str, config_digest: str, base_digest: str) -> str:
    """What makes two retrains the same: the rows trained on, every setting that shapes the model, the base
    model's bytes and the tuneflow version (its code)."""
    import hashlib

    blob = f"{rows_digest}|{config_digest}|{base_digest}|tuneflow {pkg_version('tuneflow')}"
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def version_with_fingerprint(name: str, fp: str, tag: str = FINGERPRINT_TAG) -> ModelVersion | None:
    """The newest registered version of ``name`` trained with fingerprint ``fp`` (tag ``tag``), if any."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        versions = MlflowClient().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    same = [mv for mv in versions if (mv.tags or {}).get(tag) == fp]
    return max(same, key=lambda mv: int(mv.version), default=None)


def trained_digests(name: str) -> set[str]:
    """The data digests (``tuneflow.data_digest``) of every registered version of ``name``: data trained on."""
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"name='{name}'")
    return {d for mv in versions if (d := (mv.tags or {}).get(DATA_DIGEST_TAG))}


def list_versions(name: str | None = None) -> list[dict[str, Any]]:
    """Registered versions (newest first) with aliases, primary metric, data digest and decision."""
    from mlflow import MlflowClient

    client = MlflowClient()
    models = [client.get_registered_model(name)] if name else client.search_registered_models()
    rows = []
    for rm in models:
        aliases: dict[str, list[str]] = {}
        for alias, ver in (rm.aliases or {}).items():
            aliases.setdefault(str(ver), []).append(alias)
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            t = mv.tags or {}
            rows.append(
                {
                    "name": rm.name,
                    "version": int(mv.version),
                    "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                    "metric": t.get(PRIMARY_METRIC_TAG, ""),
                    "score": t.get(SCORE_TAG, ""),
                    "decision": t.get(DECISION_TAG, ""),
                    "data_digest": t.get(DATA_DIGEST_TAG, "")[:12],
                    "created": pd.Timestamp(mv.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M"),
                }
            )
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))
