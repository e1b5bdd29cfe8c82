"""Sequence classification: an encoder with a classification head, trained on (text, label) rows.

Everything that is specific to this kind of fine-tuning is here, behind the ``FineTuningKind``
interface of ``tuneflow.kinds``: the model class, how rows become model inputs, the collator, the
metrics, how a model is scored on the eval split, and what the logged MLflow model outputs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tuneflow.config import ModelConfig, PipelineConfig
from tuneflow.data import LABEL, TEXT, Split
from tuneflow.evaluate import Evaluation
from tuneflow.kinds.classification_facts import FACTS
from tuneflow.models import resolve_base_model
from tuneflow.train import train_with_trainer
from tuneflow.train_common import TrainResult

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from datasets import DatasetDict
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_MAP_BATCH = 1000
# The one column the logged model takes: MLflow's text-classification pyfunc passes a row {"text": t} to the
# transformers pipeline as it is (its keys may only be "text" and "text_pair")
PIPELINE_TEXT = "text"


def load_base_model(cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
    """The base encoder with a new classification head for ``labels`` (in id order)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # The classification head is new by design; the "newly initialized weights" warning is noise here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            str(resolve_base_model(cfg.base_model)),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    finally:
        hf_logging.set_verbosity(verbosity)


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
            enc = tokenizer(
                [texts[i] for i in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            enc = {
                k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")
            }
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


class Classification:
    """The ``classification`` kind (``kind: classification``, the default)."""

    name = "classification"
    facts = FACTS
    mlflow_task = "text-classification"  # the transformers pipeline task of the logged MLflow model

    def load_model(self, cfg: PipelineConfig) -> PreTrainedModel:
        return load_base_model(cfg.model, cfg.data.labels)

    def encode(
        self, split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int, labels: list[str]
    ) -> DatasetDict:
        """Token ids (truncated to ``max_length``, not padded: batches are padded at training time) and label ids."""
        from datasets import Dataset, DatasetDict

        label2id = {name: i for i, name in enumerate(labels)}

        def encode(batch: dict[str, list]) -> dict[str, list]:
            return tokenizer(batch[TEXT], truncation=True, max_length=max_length)

        dd = DatasetDict(
            {
                name: Dataset.from_dict({TEXT: list(frame[TEXT]), "labels": [label2id[lab] for lab in frame[LABEL]]})
                for name, frame in (("train", split.train), ("eval", split.eval))
            }
        )
        return dd.map(encode, batched=True, batch_size=_MAP_BATCH, remove_columns=[TEXT], desc="Tokenizing")

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase, cfg: PipelineConfig) -> PreTrainedTokenizerBase:
        return tokenizer

    def train(
        self,
        cfg: PipelineConfig,
        tokenizer: PreTrainedTokenizerBase,
        data: DatasetDict,
        checkpoints: Path,
        callbacks: tuple[Any, ...] = (),
    ) -> TrainResult:
        """The transformers ``Trainer``: per-epoch evaluation, early stopping, best epoch restored."""
        return train_with_trainer(cfg, tokenizer, data, checkpoints, self, callbacks)

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def trainer_metrics(self, cfg: PipelineConfig) -> Callable[[Any], dict[str, float]]:
        """``compute_metrics`` for the Trainer's per-epoch evaluation (early stopping, best checkpoint)."""
        labels = cfg.data.labels

        def compute_metrics(pred: Any) -> dict[str, float]:
            m = classification_metrics(pred.label_ids, pred.predictions.argmax(-1), labels)
            return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

        return compute_metrics

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        frame: pd.DataFrame,
        cfg: PipelineConfig,
        max_length: int,
        new_model: bool = False,
    ) -> Evaluation:
        return evaluate_model(
            model,
            tokenizer,
            list(frame[TEXT]),
            list(frame[LABEL]),
            cfg.data.labels,
            max_length,
            cfg.train.eval_batch_size,
        )

    def model_input(self, texts: list[str]) -> pd.DataFrame:
        """A ``text`` column, not a list of strings: MLflow's text-classification pyfunc (mlflow 3.17) turns a list
        into rows ``{0: text}`` and runs ``ast.literal_eval`` on every text, so a very long text raised
        ``MemoryError`` and a text that reads as a Python literal (``{'text': 'free prize'}``) was scored as that
        literal's content. Rows ``{"text": ...}`` go to the pipeline as they are; versions logged before (input
        schema: an unnamed string column) take this input too."""
        return pd.DataFrame({PIPELINE_TEXT: texts})

    def input_example(self, texts: list[str]) -> pd.DataFrame:
        """Logs the input schema as one ``text`` column, so the served model takes (and requires) that column and
        never the list form above (``mlflow models serve`` refuses ``{"inputs": [...]}`` with HTTP 400)."""
        return self.model_input(texts[:2])

    def logging_options(self, cfg: PipelineConfig) -> dict[str, Any]:
        """Texts are cut to ``model.max_length`` tokens when the registered model scores them (predict, serve),
        as in training: a longer one would fail the whole request, or be read past what the model learned."""
        return {"model_config": {"truncation": True, "max_length": cfg.model.max_length}}

    def logging_context(self, model: Any, cfg: PipelineConfig) -> AbstractContextManager[None]:
        return nullcontext()

    def prediction_columns(self, output: pd.DataFrame) -> dict[str, Any]:
        """The columns ``tuneflow predict`` adds, from the MLflow model's output (``label``, ``score``)."""
        return {"label": output["label"].to_numpy(), "score": output["score"].astype(float).round(6).to_numpy()}

    def empty_output(self) -> pd.DataFrame:
        return pd.DataFrame(columns=["label", "score"])

    def monitor_rows(self, frame: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
        return frame  # scoring every row of a batch is cheap (a forward pass each)

    def drift_labels(self, cfg: PipelineConfig) -> list[str] | None:
        return list(cfg.data.labels)
