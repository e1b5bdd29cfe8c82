"""Evaluation: score a model on the held-out split, with the kind's metrics, and plot the confusion matrix.

The kind's ``evaluate`` (``tuneflow.kinds``) scores the new model and the current champion
(``tuneflow.registry.score_champion``) with the same code, so the promotion decision compares like with like.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # accuracy, macro_f1, precision_<label>, recall_<label>, f1_<label>
    confusion: list[list[int]]  # rows = true label, columns = predicted, in label order
    labels: list[str]
    predictions: list[int]


@dataclass
class EvaluateOutput:
    """The new model's evaluation next to the champion's, on the same eval split."""

    challenger: Evaluation
    champion_version: str | None = None
    champion: Evaluation | None = None
    champion_error: str | None = None  # the champion exists but could not be scored


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
