"""Kinds of fine-tuning: the one seam between the stages and what a task is.

The stages (tokenize, train, evaluate, register, predict) call a ``FineTuningKind``; they never branch
on the kind. A new kind is one module here that implements the protocol, plus its name in
``tuneflow.config.Kind`` and in ``KINDS`` below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import pandas as pd
    from datasets import DatasetDict
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tuneflow.config import PipelineConfig
    from tuneflow.data import Split
    from tuneflow.evaluate import Evaluation
    from tuneflow.train_common import TrainResult


class FineTuningKind(Protocol):
    name: str
    mlflow_task: str  # the transformers pipeline task the MLflow model is logged with

    def load_model(self, cfg: PipelineConfig) -> PreTrainedModel:
        """The base model, ready to fine-tune (e.g. with a new head)."""

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase, cfg: PipelineConfig) -> PreTrainedTokenizerBase:
        """The base model's tokenizer as this kind uses it (e.g. a chat template and pad token set)."""

    def encode(
        self, split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int, labels: list[str]
    ) -> DatasetDict:
        """Both splits as model inputs (``train`` / ``eval``), unpadded."""

    def train(
        self, cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, data: DatasetDict, checkpoints: Path
    ) -> TrainResult:
        """Fine-tune on ``data["train"]``; the result's model is what gets evaluated and registered.

        Checkpoints go to ``checkpoints`` (kept across a crash: training resumes from the newest complete one)."""

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        """Pads each training batch to its longest row."""

    def trainer_metrics(self, cfg: PipelineConfig) -> Callable[[Any], dict[str, float]]:
        """The Trainer's ``compute_metrics``; must report ``evaluate.primary_metric``."""

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        frame: pd.DataFrame,
        cfg: PipelineConfig,
        max_length: int,
    ) -> Evaluation:
        """Score a model (the new one or the champion) on eval rows, with the same code for both."""

    def model_input(self, texts: list[str]) -> Any:
        """What the logged MLflow model's ``predict`` takes for a batch of input texts."""

    def input_example(self, texts: list[str]) -> Any:
        """The input example logged with the MLflow model, from a few eval texts."""

    def logging_options(self, cfg: PipelineConfig) -> dict[str, Any]:
        """Extra keyword arguments for ``mlflow.transformers.log_model`` (e.g. generation settings)."""

    def prediction_columns(self, output: Any) -> dict[str, Any]:
        """The columns batch scoring adds, from the logged MLflow model's output."""

    def empty_output(self) -> Any:
        """The model output of zero rows."""

    def monitor_rows(self, frame: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
        """The rows of a new batch the champion is scored on by monitoring (e.g. a bounded sample)."""

    def drift_labels(self, cfg: PipelineConfig) -> list[str] | None:
        """The label set whose distribution monitoring compares with the training data; None: no labels."""


def get_kind(name: str) -> FineTuningKind:
    """The kind called ``name`` (``PipelineConfig.kind``)."""
    try:
        return KINDS[name]()
    except KeyError:
        raise ValueError(f"unknown fine-tuning kind {name!r}; the kinds are: {', '.join(KINDS)}") from None


# Imported after the protocol: a kind module may import from this package's other modules.
from tuneflow.kinds.classification import Classification  # noqa: E402
from tuneflow.kinds.sft import Sft  # noqa: E402

KINDS: dict[str, type[FineTuningKind]] = {"classification": Classification, "sft": Sft}
