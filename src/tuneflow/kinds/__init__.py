"""Kinds of fine-tuning: the one seam between the stages and what a task is.

The stages (tokenize, train, evaluate, register, predict) call a ``FineTuningKind``; what differs by kind
and is needed before anything heavy loads (config cross-checks, data checks, metric names, the shape of its
rows, what its MLmodel holds) is the kind's ``KindFacts`` (``tuneflow.kinds.facts``, one ``<kind>_facts``
module per kind), read with ``tuneflow.kinds.catalog.facts_of``. The stages never branch on the kind's name.

A new kind is its module here that implements the protocol, its facts module (naming that implementation), and
its facts in the tuple of ``tuneflow.kinds.catalog.FACTS``; the config's ``Kind`` and ``KINDS`` below are derived
from that. This package imports nothing heavy: a kind's module is imported when ``get_kind`` first asks for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

from tuneflow.kinds.catalog import FACTS, all_checks, facts_of
from tuneflow.kinds.facts import KindFacts

__all__ = ["FACTS", "KINDS", "FineTuningKind", "KindFacts", "all_checks", "facts_of", "get_kind"]

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager
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
    facts: KindFacts  # what the stages read without the heavy stack (tuneflow.kinds.facts)
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
        self,
        cfg: PipelineConfig,
        tokenizer: PreTrainedTokenizerBase,
        data: DatasetDict,
        checkpoints: Path,
        callbacks: tuple[Any, ...] = (),
    ) -> TrainResult:
        """Fine-tune on ``data["train"]``; the result's model is what gets evaluated and registered.

        Checkpoints go to ``checkpoints`` (kept across a crash: training resumes from the newest complete one).
        ``callbacks``: more transformers ``TrainerCallback``s (e.g. the search's pruning on each evaluation)."""

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
        new_model: bool = False,
    ) -> Evaluation:
        """Score a model (the new one or the champion) on eval rows, with the same code for both; ``new_model``: the
        newly trained one (its evaluation may add what only a review of it needs, e.g. the base model's answers)."""

    def model_input(self, texts: list[str]) -> Any:
        """What the logged MLflow model's ``predict`` takes for a batch of input texts."""

    def input_example(self, texts: list[str]) -> Any:
        """The input example logged with the MLflow model, from a few eval texts."""

    def logging_options(self, cfg: PipelineConfig) -> dict[str, Any]:
        """Extra keyword arguments for ``mlflow.transformers.log_model`` (e.g. generation settings); the key
        ``extra_requirements`` names packages the version pins besides ``registry_base.REQUIREMENT_PACKAGES``."""

    def logging_context(self, model: Any, cfg: PipelineConfig) -> AbstractContextManager[None]:
        """What holds while ``model`` is written to MLflow (e.g. an adapter cast to the dtype it is saved in)."""

    def prediction_columns(self, output: Any) -> dict[str, Any]:
        """The columns batch scoring adds, from the logged MLflow model's output."""

    def empty_output(self) -> Any:
        """The model output of zero rows."""

    def monitor_rows(self, frame: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
        """The rows of a new batch the champion is scored on by monitoring (e.g. a bounded sample)."""

    def drift_labels(self, cfg: PipelineConfig) -> list[str] | None:
        """The label set whose distribution monitoring compares with the training data; None: no labels."""


# name -> the kind's module and class, imported on first use (its facts: tuneflow.kinds.catalog.FACTS)
KINDS: dict[str, str] = {name: facts.implementation for name, facts in FACTS.items()}  # name -> "module:Class"


def get_kind(name: str) -> FineTuningKind:
    """The kind called ``name`` (``PipelineConfig.kind``)."""
    try:
        module, cls = KINDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown fine-tuning kind {name!r}; the kinds are: {', '.join(KINDS)}") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
