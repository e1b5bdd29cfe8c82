"""Stage 4: score a model on the held-out split; metrics with scikit-learn, a confusion-matrix plot.

The same ``evaluate_model`` scores the new model and the current champion, so the promotion gate
compares like with like.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # accuracy, macro_f1, precision_<label>, recall_<label>, f1_<label>
    confusion: list[list[int]]  # rows = true label, columns = predicted, in label order
    labels: list[str]
    predictions: list[int]


def classification_metrics(y_true: Any, y_pred: Any, labels: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    ids = list(range(len(labels)))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
    }
    for i, name in enumerate(labels):
        out[f"precision_{name}"] = float(p[i])
        out[f"recall_{name}"] = float(r[i])
        out[f"f1_{name}"] = float(f[i])
        out[f"support_{name}"] = float(support[i])
    return out


def predict_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int = 64,
) -> np.ndarray:
    """Predicted class ids, batched by similar length with per-batch padding (order preserved)."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    preds = np.empty(len(texts), dtype=np.int64)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            preds[idx] = model(**enc).logits.argmax(-1).cpu().numpy()
    return preds


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    label_names: list[str],
    labels: list[str],
    max_length: int,
    batch_size: int = 64,
) -> Evaluation:
    """Score ``model`` on ``texts`` whose true labels are ``label_names``.

    The model's own ``id2label`` maps its outputs to names, so a champion trained with another label
    order is still scored correctly.

    Raises:
        ValueError: the model does not know every label in ``labels``.
    """
    from sklearn.metrics import confusion_matrix

    id2label = {int(k): v for k, v in model.config.id2label.items()}
    unknown = sorted(set(labels) - set(id2label.values()))
    if unknown:
        raise ValueError(f"model predicts {sorted(id2label.values())}, which lacks labels {unknown}")
    ours = {name: i for i, name in enumerate(labels)}
    raw = predict_ids(model, tokenizer, texts, max_length, batch_size)
    y_pred = [ours.get(id2label[int(p)], -1) for p in raw]
    y_true = [ours[name] for name in label_names]
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    return Evaluation(classification_metrics(y_true, y_pred, labels), cm.tolist(), labels, y_pred)


def plot_confusion(evaluation: Evaluation, path: Path, title: str = "Confusion matrix (eval split)") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(evaluation.confusion)
    n = len(evaluation.labels)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * n, 1.2 + 1.1 * n), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), evaluation.labels, rotation=45, ha="right")
    ax.set_yticks(range(n), evaluation.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    peak = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > peak / 2 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def metrics_table(rows: dict[str, dict[str, float] | None], labels: list[str]) -> str:
    """A markdown table with one column per model (e.g. challenger, champion)."""
    names = ["accuracy", "macro_f1"] + [f"{m}_{lab}" for lab in labels for m in ("precision", "recall", "f1")]
    cols = list(rows)
    out = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in names:
        cells = [f"{rows[c][name]:.4f}" if rows[c] and name in rows[c] else "-" for c in cols]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ---- Prefect task ------------------------------------------------------------------------------

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@dataclass
class EvaluateOutput:
    challenger: Evaluation
    champion_version: str | None
    champion: Evaluation | None
    champion_error: str | None


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg, model, tokenizer, split, parent_run_id: str, work_dir: Path) -> EvaluateOutput:
    """Score the new model and the current champion on the same eval split; log metrics and plots."""
    import mlflow

    from tasks.data import LABEL, TEXT
    from tasks.register import evaluate_champion
    from tasks.tracking import stage_run

    with stage_run(parent_run_id, "evaluate"):
        texts, names = list(split.eval[TEXT]), list(split.eval[LABEL])
        ev = evaluate_model(model, tokenizer, texts, names, cfg.data.labels, cfg.model.max_length, cfg.train.eval_batch_size)
        mlflow.log_metrics({f"eval/{k}": v for k, v in ev.metrics.items()})
        client = mlflow.MlflowClient()
        for k, v in ev.metrics.items():
            client.log_metric(parent_run_id, f"eval/{k}", v)
        png = plot_confusion(ev, work_dir / "confusion_matrix.png")
        mlflow.log_artifact(str(png), "plots")
        client.log_artifact(parent_run_id, str(png), "plots")
        mlflow.log_dict({"labels": ev.labels, "matrix": ev.confusion}, "confusion_matrix.json")
        champ_version, champ, champ_error = evaluate_champion(cfg, split.eval)
        if champ is not None:
            mlflow.log_metrics({f"champion/{k}": v for k, v in champ.metrics.items()})
            mlflow.set_tag("tuneflow.champion_version", champ_version)
            cpng = plot_confusion(champ, work_dir / "champion_confusion_matrix.png", f"Champion v{champ_version} on this eval split")
            mlflow.log_artifact(str(cpng), "plots")
    return EvaluateOutput(ev, champ_version, champ, champ_error)
