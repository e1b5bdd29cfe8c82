"""Evaluation: score a model on the held-out split, with the kind's metrics, and plot the confusion matrix.

The kind's ``evaluate`` (``tuneflow.kinds``) scores the new model and the current champion
(``tuneflow.scoring.score_champion``) with the same code, so the promotion decision compares like with like.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # classification: accuracy, macro_f1, ...; sft: eval_loss, perplexity, chrf, ...
    confusion: list[list[int]] = field(default_factory=list)  # rows = true label, columns = predicted
    labels: list[str] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)
    samples: pd.DataFrame | None = None  # sft: prompt / reference / generation / chrf / stopped_with_eos


@dataclass
class EvaluateOutput:
    """The new model's evaluation next to the champion's, on the same eval split."""

    challenger: Evaluation
    champion_version: str | None = None
    champion: Evaluation | None = None
    champion_error: str | None = None  # the champion exists but could not be scored


ANNOTATED_LABELS = 30  # above this many labels the confusion matrix is drawn condensed
LABELLED_TICKS = 100  # ... and above this many without tick labels


def plot_confusion(evaluation: Evaluation, path: Path, title: str = "Confusion matrix (eval split)") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(evaluation.confusion)
    n = len(evaluation.labels)
    if n > ANNOTATED_LABELS:  # condensed: a bounded figure, rows as shares, no numbers in the cells
        fig, ax = plt.subplots(figsize=(12, 12), dpi=100)
        rows = cm.sum(axis=1, keepdims=True)
        ax.imshow(np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0), cmap="Blues", vmin=0, vmax=1)
        if n <= LABELLED_TICKS:
            ax.set_xticks(range(n), evaluation.labels, rotation=90, fontsize=5)
            ax.set_yticks(range(n), evaluation.labels, fontsize=5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        title += f": {n} labels, each row as shares (counts in confusion_matrix.json)"
    else:
        fig, ax = plt.subplots(figsize=(1.6 + 1.1 * n, 1.2 + 1.1 * n), dpi=120)
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(n), evaluation.labels, rotation=45, ha="right")
        ax.set_yticks(range(n), evaluation.labels)
        peak = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                color = "white" if cm[i, j] > peak / 2 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_training_loss(log_history: list[dict], path: Path) -> Path | None:
    """Training loss (and eval loss, when the trainer evaluated) against the step; None without logged losses."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Training loss", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
