"""Training: what every kind's training shares (the result, MLflow metrics while training) and the transformers
``Trainer`` loop that kind classification uses (model, collator and metrics come from the kind)."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneflow.config import PipelineConfig

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tuneflow.kinds import FineTuningKind

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: PreTrainedModel
    best_metric: float | None
    epochs_run: float
    steps: int
    train_seconds: float
    log_history: list[dict[str, Any]]
    extra: dict[str, float] = field(default_factory=dict)  # kind-specific figures, logged as metrics


def mlflow_callback():
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
            mlflow.log_metrics(
                {k.replace("eval_", "eval/") if k.startswith("eval_") else f"train/{k}": v for k, v in values.items()},
                step=state.global_step,
            )

    return MlflowMetrics()


def run_trainer(trainer: Any, checkpoints: Path) -> tuple[Any, float]:
    """``trainer.train()`` and its wall time; its checkpoint folder is deleted afterwards, even on failure."""
    start = time.perf_counter()
    try:
        output = trainer.train()
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return output, time.perf_counter() - start


def train_with_trainer(
    cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, data: DatasetDict, work_dir: Path, kind: FineTuningKind
) -> TrainResult:
    """Fine-tune ``cfg.model.base_model`` on ``data["train"]``, evaluating on ``data["eval"]`` each epoch.

    Seeded; early stopping on the primary metric; the best epoch's weights are restored at the end.
    Checkpoints live in a temporary folder under ``work_dir`` and are deleted afterwards.
    """
    import torch
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    set_seed(t.seed)
    model = kind.load_model(cfg)
    primary = cfg.evaluate.primary_metric

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
    callbacks = [mlflow_callback()]
    if t.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
        data_collator=kind.collator(tokenizer),
        compute_metrics=kind.trainer_metrics(cfg),
        callbacks=callbacks,
    )
    output, seconds = run_trainer(trainer, out)
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
