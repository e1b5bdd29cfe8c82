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
    """Log the model (transformers flavor), register it, tag it, alias it and apply the gate decision.

    Tags are written with the version in one call, and aliases only after that, so a version never
    carries an alias without its lineage tags.
    """
    import mlflow
    from mlflow import MlflowClient

    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-classification",
        pip_requirements=pip_requirements(),
        input_example=example[:2],
    )
    all_tags = {**tags, **decision_tags(decision), f"{TAG}max_length": str(cfg.model.max_length)}
    mv = mlflow.register_model(info.model_uri, cfg.registry.model_name, tags=all_tags)
    client = MlflowClient()
    client.update_model_version(cfg.registry.model_name, mv.version, description=description)
    client.set_registered_model_alias(cfg.registry.model_name, CHALLENGER, mv.version)
    if decision.promote:
        client.set_registered_model_alias(cfg.registry.model_name, CHAMPION, mv.version)
    return client.get_model_version(cfg.registry.model_name, mv.version)


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


def model_card(cfg: PipelineConfig, decision: Decision, metrics: dict[str, float], rows: dict[str, int], data_digest: str, run_id: str) -> str:
    lines = [
        f"## {cfg.registry.model_name}",
        f"Fine-tuned from `{cfg.model.base_model}` for text classification into {', '.join(f'`{x}`' for x in cfg.data.labels)}.",
        "",
        f"- **Decision:** {'promoted to champion' if decision.promote else 'not promoted'}: {decision.reason}",
        f"- **{decision.metric}:** {decision.challenger_score:.4f}"
        + (f" (champion v{decision.champion_version}: {decision.champion_score:.4f} on the same eval split)" if decision.champion_score is not None else ""),
        f"- **Accuracy:** {metrics.get('accuracy', float('nan')):.4f}",
        f"- **Data:** `{cfg.data.path}`, digest `{data_digest[:16]}`, {rows['train']} train / {rows['eval']} eval rows",
        f"- **Training run:** `{run_id}`; config `{cfg.name}` (digest `{cfg.digest()}`)",
    ]
    return "\n".join(lines)


@task(name="register", cache_policy=NO_CACHE)
def register_task(cfg, model, tokenizer, evaluation, split, loaded, parent_run_id: str, lineage: dict[str, str]) -> dict[str, Any]:
    """Apply the gate and register. Returns a summary with the version, decision and model URI."""
    import mlflow

    from tasks.tracking import stage_run

    with stage_run(parent_run_id, "register"):
        primary = cfg.evaluate.primary_metric
        champ_score = evaluation.champion.metrics[primary] if evaluation.champion else None
        decision = decide(primary, evaluation.challenger.metrics[primary], champ_score, evaluation.champion_version, cfg.registry.min_improvement)
        rows = {"train": len(split.train), "eval": len(split.eval)}
        card = model_card(cfg, decision, evaluation.challenger.metrics, rows, loaded.digest, parent_run_id)
        mv = register(model, tokenizer, cfg, decision, lineage, card, list(split.eval[TEXT][:2]))
        tags = decision_tags(decision) | {f"{TAG}registered_version": str(mv.version)}
        mlflow.set_tags(tags)
        client = mlflow.MlflowClient()
        for k, v in tags.items():
            client.set_tag(parent_run_id, k, v)
    return {"version": str(mv.version), "decision": decision, "model_uri": f"models:/{cfg.registry.model_name}/{mv.version}"}
