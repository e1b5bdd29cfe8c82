"""Training: MLflow metrics while training, checkpoint saves and the transformers ``Trainer`` loop that kind
classification uses (model, collator and metrics come from the kind). The result and the checkpoint helpers every
training path shares are in the leaf ``tuneflow.train_common``."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuneflow.config import PipelineConfig
from tuneflow.multiproc import train_in_processes
from tuneflow.train_common import (
    COMPLETE_MARKER,
    TrainResult,
    checkpoint_step,
    mark_complete,
    resume_point,
    trainer_log_metrics,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class TrainerKind(Protocol):
    """What the Trainer loop asks of its kind (a ``tuneflow.kinds.FineTuningKind`` has it): declared here, so that
    this module sits below the kinds that call it and imports none of them."""

    def load_model(self, cfg: PipelineConfig) -> PreTrainedModel: ...

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Any: ...

    def trainer_metrics(self, cfg: PipelineConfig) -> Callable[[Any], dict[str, float]]: ...


def epoch_seeded_trainer(base: type) -> type:
    """``base`` (a transformers ``Trainer`` class) whose length-grouped sampler draws each epoch's order from
    (seed, epoch) alone. transformers' ``LengthGroupedSampler`` draws from the global RNG when an epoch starts,
    so a run resumed in the middle of a later epoch trained on another order from there on; with this, a
    resumed run sees the batches the uninterrupted one saw (``tests/test_train.py`` checks the weights)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        def __init__(self, sampler: LengthGroupedSampler, seed: int) -> None:
            self.batch_size, self.lengths, self.generator = sampler.batch_size, sampler.lengths, None
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            generator = torch.Generator()
            generator.manual_seed(self.seed * 1_000_003 + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    class EpochSeededTrainer(base):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler:
                return EpochSeededLengthGroupedSampler(sampler, self.args.data_seed or self.args.seed)
            return sampler

    return EpochSeededTrainer


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
            mlflow.log_metrics(trainer_log_metrics(logs), step=state.global_step)

    return MlflowMetrics()


def checkpoint_callback(every_minutes: float):
    """Saves a checkpoint at least every ``every_minutes`` (on top of the kind's own saves; 0: every step) and
    marks each saved checkpoint complete once transformers has written all of it."""
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        def __init__(self) -> None:
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            due = time.monotonic() - self.last >= every_minutes * 60
            if args.world_size > 1:
                # Several processes (tuneflow.multiproc): all save or none does, or the ranks that save wait for
                # the others at transformers' barrier forever. Each rank's clock differs: the latest one decides.
                import torch
                import torch.distributed as dist

                flag = torch.tensor([int(due)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                due = bool(flag.item())
            if due:
                control.should_save = True
            self._before_save(args, state, control)

        def on_epoch_end(self, args, state, control, **kwargs):
            self._before_save(args, state, control)

        def _before_save(self, args, state, control) -> None:
            # The epoch's save can rewrite, in place, the folder a step save of the same step just wrote: it is
            # no longer complete until that save ends, so its marker goes first.
            if control.should_save and state.is_world_process_zero:
                (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE_MARKER).unlink(missing_ok=True)

        def on_save(self, args, state, control, **kwargs):
            if args.world_size > 1:
                # transformers 5 has no barrier after each rank wrote its own RNG state (rng_state_<rank>.pth):
                # the folder is complete once every rank got here.
                import torch.distributed as dist

                dist.barrier()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir() and state.is_world_process_zero:
                mark_complete(folder)
            self.last = time.monotonic()

    return Checkpoints()


def run_trainer(
    trainer: Any, checkpoints: Path, every_minutes: float, resume: Path | None | str = "latest"
) -> tuple[Any, float, int]:
    """``trainer.train()``, resumed from the newest complete checkpoint under ``checkpoints`` when a killed run
    left one; returns the output, the wall time and the step it resumed from (0: from scratch).

    ``resume``: ``"latest"`` looks for that checkpoint here; a training process of ``tuneflow.multiproc`` is given
    the one its parent chose (a folder, or None), so that no two processes scan and clean the folder at once.

    Checkpoints (weights, optimizer, scheduler, RNG states, data position) stay after training: the flow
    sweeps them once the run has succeeded, so a crash in evaluation or registration does not retrain either.
    """
    checkpoints.mkdir(parents=True, exist_ok=True)
    if resume == "latest":
        resume = resume_point(checkpoints, 1)
        if resume is not None:
            log.warning(
                "resuming training from %s (step %d) left by an earlier run that did not finish",
                resume,
                checkpoint_step(resume),
            )
    resumed = checkpoint_step(Path(resume)) if resume is not None else 0
    trainer.add_callback(checkpoint_callback(every_minutes))
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    return output, time.perf_counter() - start, resumed


def by_length(dataset: Dataset) -> Dataset:
    """The eval rows ordered by token count: each eval batch is padded to its longest row, so similar lengths
    together pad far less than the file's order (the metrics do not depend on the order)."""
    import numpy as np

    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(np.argsort(lengths, kind="stable"))


def train_with_trainer(
    cfg: PipelineConfig,
    tokenizer: PreTrainedTokenizerBase,
    data: DatasetDict,
    checkpoints: Path,
    kind: TrainerKind,
    callbacks: tuple[Any, ...] = (),
) -> TrainResult:
    """Fine-tune ``cfg.model.base_model`` on ``data["train"]``, evaluating on ``data["eval"]`` each epoch.

    Seeded; early stopping on the primary metric; the best epoch's weights are restored at the end.
    Checkpoints go to ``checkpoints`` each epoch and at least every ``train.checkpoint_minutes``; a rerun after
    a crash resumes from the newest complete one (``run_trainer``). With ``train.processes`` > 1 the same
    Trainer runs in that many processes (``tuneflow.multiproc``), and this process collects their result.
    ``callbacks`` (more ``TrainerCallback``s) run in this process only: not with ``train.processes`` > 1.
    """
    if cfg.train.processes > 1:
        if callbacks:
            log.warning("train.processes is %d: the extra Trainer callbacks do not run", cfg.train.processes)
        return train_in_processes(cfg, tokenizer, data, checkpoints)
    trainer, output, seconds, resumed = fit_with_trainer(
        cfg, tokenizer, data, checkpoints, kind, extra_callbacks=callbacks
    )
    state = trainer.state
    model = trainer.model.float().eval()  # bf16 autocast leaves fp32 weights; make sure for saving
    primary = cfg.evaluate.primary_metric
    log.info("trained %d steps in %.1f s; best %s=%s", state.global_step, seconds, primary, state.best_metric)
    return TrainResult(
        model=model,
        best_metric=state.best_metric,
        epochs_run=float(state.epoch or 0),
        steps=int(output.global_step),
        train_seconds=seconds,
        log_history=list(state.log_history),
        extra={"resumed_from_step": float(resumed)},
    )


def fit_with_trainer(
    cfg: PipelineConfig,
    tokenizer: PreTrainedTokenizerBase,
    data: DatasetDict,
    checkpoints: Path,
    kind: TrainerKind,
    resume: Path | None | str = "latest",
    threads: int | None = None,
    extra_callbacks: tuple[Any, ...] = (),
) -> tuple[Any, Any, float, int]:
    """Build the Trainer and train; returns (trainer, train output, seconds, step resumed from).

    In a process started by torchrun (``WORLD_SIZE`` > 1) transformers trains data-parallel (DDP): with
    ``split_batches`` each batch of ``train.batch_size`` rows, drawn by the same sampler as in one process, is
    split evenly across the processes, so steps, learning rate schedule and data order match one process.
    """
    import torch
    from transformers import Trainer, set_seed

    if threads or cfg.train.threads:
        torch.set_num_threads(threads or cfg.train.threads)
    set_seed(cfg.train.seed)
    trainer = epoch_seeded_trainer(Trainer)(
        model=kind.load_model(cfg),
        args=training_arguments(cfg, checkpoints),
        train_dataset=data["train"],
        eval_dataset=by_length(data["eval"]),
        processing_class=tokenizer,
        data_collator=kind.collator(tokenizer),
        compute_metrics=kind.trainer_metrics(cfg),
        callbacks=trainer_callbacks(cfg, extra_callbacks),
    )
    output, seconds, resumed = run_trainer(trainer, checkpoints, cfg.train.checkpoint_minutes, resume)
    return trainer, output, seconds, resumed


def selects_best(cfg: PipelineConfig) -> bool:
    """More than one epoch: the best epoch's model is kept. One epoch (or less) has one model to pick: evaluating
    it during training would only repeat the evaluate stage."""
    return cfg.train.epochs > 1


def training_arguments(cfg: PipelineConfig, checkpoints: Path) -> Any:
    """The ``TrainingArguments`` of ``cfg.train`` (checkpoints under ``checkpoints``, resumable)."""
    import torch
    from transformers import TrainingArguments

    t = cfg.train
    select_best = selects_best(cfg)
    return TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy="epoch" if select_best else "no",
        save_strategy="epoch",
        save_total_limit=2,
        save_only_model=False,  # optimizer, scheduler and RNG states too: a killed run resumes where it was
        load_best_model_at_end=select_best,
        metric_for_best_model=cfg.evaluate.primary_metric,
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        bf16=t.bf16,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        report_to="none",
        dataloader_num_workers=0,
        **({"disable_tqdm": False} | distributed_arguments()),
    )


def distributed_arguments() -> dict[str, Any]:
    """The ``TrainingArguments`` of a process started by torchrun (``WORLD_SIZE`` > 1); none in one process."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    return {
        "accelerator_config": {"split_batches": True},
        "ddp_backend": "nccl" if torch.cuda.is_available() else "gloo",
        # transformers 5.24 multiplies each rank's loss by the number of processes whenever the model's
        # forward takes **kwargs (it assumes the loss divides by a token count summed over all ranks); a
        # classification loss is a per-rank mean, so that doubled the gradients (and the logged loss) at 2.
        "average_tokens_across_devices": False,
        # every parameter of a classification model takes part in each step; True costs a graph walk per step
        "ddp_find_unused_parameters": False,
        # progress as log lines (rank 0's PrinterCallback): the parent streams them line by line
        "disable_tqdm": True,
    }


def trainer_callbacks(cfg: PipelineConfig, extra: tuple[Any, ...] = ()) -> list[Any]:
    """Metrics to MLflow, ``extra``, and early stopping when configured (and there is a best epoch to keep)."""
    from transformers import EarlyStoppingCallback

    callbacks = [mlflow_callback(), *extra]
    if cfg.train.early_stopping_patience > 0 and selects_best(cfg):
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    return callbacks
