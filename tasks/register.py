"""Stage 5: log the model, register it, alias it ``challenger``, and promote it to ``champion`` only
when it beats the current champion re-evaluated on the same eval split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import version as pkg_version
from typing import TYPE_CHECKING, Any

import pandas as pd

from tasks.config import PipelineConfig
from tasks.data import LABEL, TEXT
from tasks.evaluate import Evaluation, evaluate_model

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG = "tuneflow."
CARD_FILE = "model_card.md"
VALIDATION_TAG = "tuneflow.validation"  # passed | failed: the data checks of the run that produced the version


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    challenger_score: float
    champion_score: float | None = None
    champion_version: str | None = None


def decide(metric: str, challenger_score: float, champion_score: float | None, champion_version: str | None, min_improvement: float) -> Decision:
    """The promotion gate (higher is better for every supported primary metric).

    No champion: the challenger (which passed validation to get here) becomes champion. Otherwise it
    must beat the champion's score on the same eval split by at least ``min_improvement``.
    """
    if champion_score is None:
        if champion_version is None:
            return Decision(True, f"no champion yet; first validated model becomes champion ({metric}={challenger_score:.4f})", metric, challenger_score)
        return Decision(False, f"champion v{champion_version} could not be re-evaluated on this eval split; promote manually after review", metric, challenger_score, None, champion_version)
    delta = challenger_score - champion_score
    if delta >= min_improvement and delta > 0:
        return Decision(True, f"{metric} {challenger_score:.4f} beats champion v{champion_version} ({champion_score:.4f}) by {delta:+.4f} (>= {min_improvement})", metric, challenger_score, champion_score, champion_version)
    return Decision(False, f"{metric} {challenger_score:.4f} vs champion v{champion_version} {champion_score:.4f}: {delta:+.4f} is not an improvement of at least {min_improvement}; champion kept", metric, challenger_score, champion_score, champion_version)


def current_champion(name: str) -> ModelVersion | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def evaluate_version(name: str, version: str, eval_frame: pd.DataFrame, labels: list[str], max_length: int, batch_size: int) -> Evaluation:
    """Load a registered version offline and score it with the same code that scores the challenger."""
    import mlflow

    parts = mlflow.transformers.load_model(f"models:/{name}/{version}", return_type="components")
    return evaluate_model(parts["model"], parts["tokenizer"], list(eval_frame[TEXT]), list(eval_frame[LABEL]), labels, max_length, batch_size)


def evaluate_champion(cfg: PipelineConfig, eval_frame: pd.DataFrame) -> tuple[str | None, Evaluation | None, str | None]:
    """Returns (champion version, its evaluation, error) — the error when it exists but cannot be scored."""
    champ = current_champion(cfg.registry.model_name)
    if champ is None:
        return None, None, None
    max_length = int(champ.tags.get(f"{TAG}max_length", cfg.model.max_length))
    try:
        return champ.version, evaluate_version(cfg.registry.model_name, champ.version, eval_frame, cfg.data.labels, max_length, cfg.train.eval_batch_size), None
    except (ValueError, OSError) as exc:
        log.warning("champion v%s could not be scored on this eval split: %s", champ.version, exc)
        return champ.version, None, str(exc)


def pip_requirements() -> list[str]:
    """Explicit, because MLflow's inference looks for torchvision and fails without it."""
    reqs = [f"torch=={pkg_version('torch').split('+')[0]}"]
    reqs += [f"{p}=={pkg_version(p)}" for p in ("transformers", "tokenizers", "mlflow", "pandas", "numpy")]
    return reqs


def register(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: PipelineConfig,
    decision: Decision,
    tags: dict[str, str],
    description: str,
    example: list[str],
) -> ModelVersion:
    """Log the model (transformers flavor) and its card, register it, alias it and apply the gate decision.

    Write order, so an interruption anywhere leaves the registry consistent (see tasks/history.py):
    1. model and ``model_card.md`` go to the active run (no registry entry yet);
    2. the version is created with its lineage/decision tags AND the card as description in one call,
       so a version never exists without its card or tags;
    3. alias ``challenger``; 4. if promoted, ``move_champion`` (history entry, then alias ``champion``).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.history import CARD_TAG, move_champion

    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-classification",
        pip_requirements=pip_requirements(),
        input_example=example[:2],
    )
    run_id = mlflow.active_run().info.run_id
    mlflow.log_text(description, CARD_FILE)
    name = cfg.registry.model_name
    all_tags = {
        **tags,
        **decision_tags(decision),
        f"{TAG}max_length": str(cfg.model.max_length),
        CARD_TAG: f"runs:/{run_id}/{CARD_FILE}",
    }
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = client.create_model_version(name, info.model_uri, run_id=run_id, tags=all_tags, description=description, model_id=info.model_id)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    if decision.promote:
        actor = tags.get(f"{TAG}prefect_flow_run_id") or f"run {run_id}"
        move_champion(name, str(mv.version), "gate", "gate", actor, decision.reason)
    return client.get_model_version(name, mv.version)


def decision_tags(decision: Decision) -> dict[str, str]:
    return {
        f"{TAG}decision": "promoted" if decision.promote else "rejected",
        f"{TAG}decision_reason": decision.reason,
        f"{TAG}primary_metric": decision.metric,
        f"{TAG}challenger_score": f"{decision.challenger_score:.6f}",
        f"{TAG}champion_score": "" if decision.champion_score is None else f"{decision.champion_score:.6f}",
        f"{TAG}champion_version_before": decision.champion_version or "",
    }


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
            rows.append({
                "name": rm.name,
                "version": int(mv.version),
                "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                "metric": t.get(f"{TAG}primary_metric", ""),
                "score": t.get(f"{TAG}challenger_score", ""),
                "decision": t.get(f"{TAG}decision", ""),
                "data_digest": t.get(f"{TAG}data_digest", "")[:12],
                "created": pd.Timestamp(mv.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M"),
            })
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))


# ---- Prefect task ------------------------------------------------------------------------------

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


def _distribution(frame: pd.DataFrame, labels: list[str]) -> dict[str, int]:
    counts = frame[LABEL].value_counts()
    return {lab: int(counts.get(lab, 0)) for lab in labels}


def model_card(
    cfg: PipelineConfig,
    decision: Decision,
    evaluation: Any,
    split: Any,
    data_digest: str,
    run_id: str,
    validation: Any | None = None,
    training: Any | None = None,
) -> str:
    """The version's model card (markdown): the registry description and ``model_card.md``.

    Args:
        evaluation: ``EvaluateOutput`` (challenger, champion_version, champion, champion_error).
        split: ``Split`` with ``train``/``eval`` frames (``text``, ``label``).
        validation: ``ValidationReport`` of the data (``None``: not available).
        training: ``TrainResult`` (``train_seconds``, ``epochs_run``; ``None``: not available).
    """
    from tasks.evaluate import metrics_table

    labels = cfg.data.labels
    t = cfg.train
    cols: dict[str, dict[str, float] | None] = {"this version": evaluation.challenger.metrics}
    if evaluation.champion_version:
        cols[f"champion v{evaluation.champion_version}"] = evaluation.champion.metrics if evaluation.champion else None
    train_dist, eval_dist = _distribution(split.train, labels), _distribution(split.eval, labels)
    lines = [
        f"# Model card: {cfg.registry.model_name}",
        "",
        f"Fine-tuned from `{cfg.model.base_model}` for **text classification** into "
        f"{len(labels)} labels: {', '.join(f'`{x}`' for x in labels)} (id order).",
        "",
        "## Promotion decision",
        f"**{'Promoted to champion' if decision.promote else 'Not promoted'}**: {decision.reason}",
        "",
        f"## Eval metrics (same eval split of {len(split.eval)} rows for every column)",
        "",
        metrics_table(cols, labels),
    ]
    if evaluation.champion_version and evaluation.champion is None:
        lines += ["", f"Champion v{evaluation.champion_version} could not be scored: {evaluation.champion_error}"]
    lines += [
        "",
        "## Data",
        f"- Source: `{cfg.data.path or cfg.data.landing}`; content digest `{data_digest}`",
        f"- Split by text hash (eval_fraction {cfg.data.eval_fraction}, salt `{cfg.data.split_salt}`): "
        f"{len(split.train)} train / {len(split.eval)} eval rows",
        "",
        "| label | train | eval |",
        "|---|---|---|",
        *[f"| {lab} | {train_dist[lab]} | {eval_dist[lab]} |" for lab in labels],
        "",
        "## Validation",
    ]
    reports = validation if isinstance(validation, list) else [] if validation is None else [validation]
    if validation is None:
        lines.append("- Not recorded for this version.")
    elif not reports:
        lines.append("- No new batch in this run: the training data is the accepted batches, each validated when it arrived.")
    for report in reports:
        passed = sum(c.success for c in report.checks)
        lines.append(f"- `{report.source}`: {'passed' if report.success else 'FAILED'}, {passed}/{len(report.checks)} "
                     f"Great Expectations checks met on {report.row_count} rows")
        lines += [f"  - {c.status} `{c.name}`: {c.rule} (observed: {c.observed})" for c in report.checks]
    lines += [
        "",
        "## Training",
        f"- Config `{cfg.name}` (digest `{cfg.digest()}`): max_length {cfg.model.max_length}, epochs <= {t.epochs:g}, "
        f"batch {t.batch_size}, learning rate {t.learning_rate:g}, weight decay {t.weight_decay:g}, seed {t.seed}, "
        f"bf16 {t.bf16}, early stopping patience {t.early_stopping_patience}",
    ]
    if training is not None:
        lines.append(f"- Trained {training.epochs_run:g} epochs in {training.train_seconds:.1f} s")
    lines += [
        f"- MLflow run `{run_id}`",
        "",
        "## Intended use",
        f"Classify short texts like those in `{cfg.data.path or cfg.data.landing}` into {', '.join(labels)}, in batch "
        "(`tuneflow predict`) or behind `mlflow models serve`. Review with `tuneflow compare` before a manual promotion.",
        "",
        "## Known limits",
        f"- Texts longer than {cfg.model.max_length} tokens are truncated; only the start is read.",
        f"- It can only answer one of {', '.join(labels)}; other kinds of text still get one of these labels.",
        "- Scores are softmax probabilities, not calibrated; the metrics above hold for data like the eval split only.",
        "- Trained on the data above alone: texts from another source, language or period may score worse.",
    ]
    return "\n".join(lines)


@task(name="register", cache_policy=NO_CACHE)
def register_task(
    cfg,
    model,
    tokenizer,
    evaluation,
    split,
    loaded,
    parent_run_id: str,
    lineage: dict[str, str],
    report=None,
    training=None,
) -> dict[str, Any]:
    """Apply the gate and register. Returns a summary with the version, decision and model URI.

    ``report`` (a ValidationReport, or the list of this run's reports) and ``training`` (TrainResult)
    go into the model card and tags.
    """
    import mlflow

    from tasks.tracking import stage_run

    with stage_run(parent_run_id, "register"):
        primary = cfg.evaluate.primary_metric
        champ_score = evaluation.champion.metrics[primary] if evaluation.champion else None
        decision = decide(primary, evaluation.challenger.metrics[primary], champ_score, evaluation.champion_version, cfg.registry.min_improvement)
        card = model_card(cfg, decision, evaluation, split, loaded.digest, parent_run_id, report, training)
        version_tags = dict(lineage)
        if report is not None:
            reports = report if isinstance(report, list) else [report]
            # Only validated data reaches registration; a landing-zone run without new batches trains on
            # batches accepted (validated) earlier.
            version_tags[VALIDATION_TAG] = "passed" if all(r.success for r in reports) else "failed"
        mv = register(model, tokenizer, cfg, decision, version_tags, card, list(split.eval[TEXT][:2]))
        tags = decision_tags(decision) | {f"{TAG}registered_version": str(mv.version)}
        mlflow.set_tags(tags)
        client = mlflow.MlflowClient()
        for k, v in tags.items():
            client.set_tag(parent_run_id, k, v)
    return {"version": str(mv.version), "decision": decision, "model_uri": f"models:/{cfg.registry.model_name}/{mv.version}"}
