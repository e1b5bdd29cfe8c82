"""Instruction SFT: a causal language model fine-tuned on prompt/response rows, with LoRA (PEFT) or fully.

Rows (``tuneflow.data``): ``text`` is the prompt (the last user turn), ``label`` the reference response,
``context`` the chat messages before it (system, earlier turns) as JSON or None. A row becomes
``input_ids`` (the chat template applied to context + prompt + response) and ``labels``: ``-100`` on every
prompt position, the response tokens up to and including the EOS token that ends the assistant turn
(trained, so the model learns to stop; a pad token equal to EOS does not mask it, padding is masked by
position). Nothing after that EOS is trained. Training is TRL's ``SFTTrainer`` on these pre-tokenized
rows (padding-free or packed batches; no example attends to another), with PEFT's LoRA.

Evaluation: the loss on response tokens (token-weighted) and its perplexity, and greedy generations for
up to ``sft.generations`` eval prompts scored against the reference with chrF (sacrebleu), with the share
that stop with EOS before ``sft.max_new_tokens``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tuneflow.config import PipelineConfig, SftConfig
from tuneflow.data import CONTEXT, LABEL, TEXT, Split
from tuneflow.evaluate import Evaluation
from tuneflow.kinds.sft_facts import FACTS
from tuneflow.models import resolve_base_model
from tuneflow.train import mlflow_callback, run_trainer
from tuneflow.train_common import TrainResult

if TYPE_CHECKING:
    from collections.abc import Callable

    from datasets import DatasetDict
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE = -100  # label of a position that is not trained (prompt, padding)

# For base models whose tokenizer has no chat template: plain turns, each assistant turn ended by EOS.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, sft: SftConfig) -> PreTrainedTokenizerBase:
    """Set the chat template (``sft.chat_template``, else the tokenizer's own, else ``PLAIN_TEMPLATE``) and a
    pad token (EOS when there is none: padding is masked by position, never by token id)."""
    if sft.chat_template:
        tokenizer.chat_template = sft.chat_template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_TEMPLATE
    if tokenizer.eos_token_id is None:
        raise ValueError("the base model's tokenizer has no EOS token; an SFT model could never learn to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prompt_messages(prompt: str, context: str | None) -> list[dict[str, str]]:
    """The chat that asks for the response: the row's context (system, earlier turns), then the prompt."""
    earlier = json.loads(context) if isinstance(context, str) and context else []
    return [*earlier, {"role": "user", "content": prompt}]


def render_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, context: str | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, prompt + response ids) with the chat template; the response ends with one EOS and
    nothing after it (the template's trailing newline after the end-of-turn token is not trained)."""
    messages = prompt_messages(prompt, context)
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    n = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):  # where the two diverge (tokens may merge at the seam)
        if a != b:
            break
        n += 1
    eos = tokenizer.eos_token_id
    completion = full_ids[n:]
    if eos in completion:
        completion = completion[: len(completion) - completion[::-1].index(eos)]  # up to the last EOS
    else:
        completion = [*completion, eos]
    return prompt_ids[:n], prompt_ids[:n] + completion


def encode_row(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, context: str | None, max_length: int
) -> dict[str, list[int]] | None:
    """``input_ids`` and ``labels`` (``-100`` on the prompt) truncated to ``max_length``; None when the prompt
    alone fills ``max_length`` (nothing of the response would be trained: validation reports such rows)."""
    prompt_ids, ids = render_pair(tokenizer, prompt, response, context)
    if len(prompt_ids) >= max_length:
        return None
    ids = ids[:max_length]
    labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) :]
    return {"input_ids": ids, "labels": labels}


def token_lengths(tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame) -> pd.DataFrame:
    """Per row: tokens of the templated prompt and of prompt + response (NaN where either is missing)."""
    contexts = frame[CONTEXT] if CONTEXT in frame.columns else pd.Series([None] * len(frame), index=frame.index)
    prompt_n, total_n = [], []
    for p, r, c in zip(frame[TEXT], frame[LABEL], contexts, strict=True):
        if not isinstance(p, str) or not isinstance(r, str):
            prompt_n.append(np.nan)
            total_n.append(np.nan)
            continue
        a, b = render_pair(tokenizer, p, r, c)
        prompt_n.append(len(a))
        total_n.append(len(b))
    return pd.DataFrame({"prompt_tokens": prompt_n, "pair_tokens": total_n}, index=frame.index)


def load_causal_lm(cfg: PipelineConfig) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(resolve_base_model(cfg.model.base_model)), dtype=torch.float32)


def _contexts(frame: pd.DataFrame) -> list[str | None]:
    return list(frame[CONTEXT]) if CONTEXT in frame.columns else [None] * len(frame)


def encode_frame(tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame, max_length: int) -> dict[str, list]:
    rows = [
        encode_row(tokenizer, p, r, c, max_length)
        for p, r, c in zip(frame[TEXT], frame[LABEL], _contexts(frame), strict=True)
    ]
    kept = [r for r in rows if r is not None]
    if len(kept) < len(rows):
        log.warning("left out %d rows whose prompt alone fills max_length=%d", len(rows) - len(kept), max_length)
    return {"input_ids": [r["input_ids"] for r in kept], "labels": [r["labels"] for r in kept]}


def response_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame, max_length: int, batch_size: int
) -> tuple[float, int]:
    """Mean cross-entropy per response token (prompt and padding excluded) and the number of those tokens."""
    import torch

    enc = encode_frame(tokenizer, frame, max_length)
    order = sorted(range(len(enc["input_ids"])), key=lambda i: len(enc["input_ids"][i]))
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(enc["input_ids"][i]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(enc["input_ids"][i])
                ids[row, :n] = torch.tensor(enc["input_ids"][i])
                labels[row, :n] = torch.tensor(enc["labels"][i])
                mask[row, :n] = 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
            shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(
                shift_logits, shift_labels.to(model.device), ignore_index=IGNORE, reduction="sum"
            )
            total += float(loss)
            count += int((shift_labels != IGNORE).sum())
    return (total / count if count else float("nan")), count


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    contexts: list[str | None] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
) -> tuple[list[str], list[bool]]:
    """Greedy answers to ``prompts`` (chat template, generation prompt), and whether each stopped with EOS."""
    import torch

    contexts = contexts or [None] * len(prompts)
    texts = [
        tokenizer.apply_chat_template(prompt_messages(p, c), add_generation_prompt=True, tokenize=False)
        for p, c in zip(prompts, contexts, strict=True)
    ]
    answers: list[str] = []
    stopped: list[bool] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(
                    texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(model.device)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
                for row in out[:, enc["input_ids"].shape[1] :].tolist():
                    ended = tokenizer.eos_token_id in row
                    if ended:
                        row = row[: row.index(tokenizer.eos_token_id)]
                    stopped.append(ended)
                    answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return answers, stopped


def evaluate_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    cfg: PipelineConfig,
    max_length: int,
) -> Evaluation:
    """Response-token loss and perplexity on every eval row; chrF and EOS share of greedy generations for up
    to ``sft.generations`` of them (the first ones of the eval split: the same rows for every model)."""
    from sacrebleu.metrics import CHRF

    tokenizer = prepare_tokenizer(tokenizer, cfg.sft)
    start = time.perf_counter()
    loss, tokens = response_loss(model, tokenizer, frame, max_length, cfg.train.eval_batch_size)
    metrics = {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "eval_response_tokens": float(tokens),
    }
    samples = None
    n = min(cfg.sft.generations, len(frame))
    if n:
        rows = frame.head(n)
        answers, stopped = generate(
            model,
            tokenizer,
            list(rows[TEXT]),
            _contexts(rows),
            cfg.sft.max_new_tokens,
            batch_size=min(cfg.train.eval_batch_size, 16),
        )
        chrf = CHRF()
        references = list(rows[LABEL])
        samples = pd.DataFrame(
            {
                "prompt": list(rows[TEXT]),
                "reference": references,
                "generation": answers,
                "chrf": [round(chrf.sentence_score(a, [r]).score, 2) for a, r in zip(answers, references, strict=True)],
                "stopped_with_eos": stopped,
            }
        )
        metrics["chrf"] = float(chrf.corpus_score(answers, [references]).score)
        metrics["eos_stop_share"] = float(np.mean(stopped))
        metrics["generations"] = float(n)
    log.info("evaluated in %.1f s: %s", time.perf_counter() - start, {k: round(v, 4) for k, v in metrics.items()})
    return Evaluation(metrics, samples=samples)


def _peft_config(cfg: PipelineConfig):
    from peft import LoraConfig

    lora = cfg.sft.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def sft_trainer(
    cfg: PipelineConfig,
    tokenizer: PreTrainedTokenizerBase,
    data: DatasetDict,
    output_dir: Path,
    callbacks: tuple[Any, ...] = (),
) -> Any:
    """TRL's ``SFTTrainer`` on the pre-tokenized train rows (labels already masked), LoRA when configured; the eval
    rows' response loss every ``sft.eval_steps`` steps when set."""
    import torch
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    t, s = cfg.train, cfg.sft
    if t.threads:
        torch.set_num_threads(t.threads)
    set_seed(t.seed)
    tokenizer = prepare_tokenizer(tokenizer, s)
    model = load_causal_lm(cfg)
    train = data["train"]
    if s.max_train_rows is not None and len(train) > s.max_train_rows:
        train = train.shuffle(seed=t.seed).select(range(s.max_train_rows))
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=s.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        seed=t.seed,
        data_seed=t.seed,
        # the evaluate stage scores the model (and the champion) afterwards; sft.eval_steps adds the eval loss
        # along the way (what tuneflow tune prunes trials on)
        eval_strategy="steps" if s.eval_steps else "no",
        eval_steps=s.eval_steps,
        per_device_eval_batch_size=t.eval_batch_size,
        save_strategy="no",  # checkpoints: at least every train.checkpoint_minutes (run_trainer), for resuming
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        bf16=t.bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        # rows arrive tokenized and truncated, with labels: TRL neither re-tokenizes nor re-masks them
        max_length=cfg.model.max_length if s.packing else None,
        packing=s.packing,
        padding_free=s.padding_free or s.packing,
        completion_only_loss=True,
        # TRL turns gradient checkpointing on by default: it recomputes activations to save memory. A 135M
        # model does not need that on a 24 GiB machine, and without it a step is ~15 % faster at the same
        # loss (benchmarks/RESULTS.md).
        gradient_checkpointing=False,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=data["eval"] if s.eval_steps else None,
        processing_class=tokenizer,
        peft_config=_peft_config(cfg) if s.lora.enabled else None,
        callbacks=[mlflow_callback(), *callbacks],
    )


def train_sft(
    cfg: PipelineConfig,
    tokenizer: PreTrainedTokenizerBase,
    data: DatasetDict,
    checkpoints: Path,
    callbacks: tuple[Any, ...] = (),
) -> TrainResult:
    """Train with ``sft_trainer``; returns the model with LoRA merged into the base weights (a plain causal LM,
    what gets registered: it loads offline without PEFT or the base model's folder)."""
    trainer = sft_trainer(cfg, tokenizer, data, checkpoints, callbacks)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    output, seconds, resumed = run_trainer(trainer, checkpoints, cfg.train.checkpoint_minutes)
    model = trainer.model
    if cfg.sft.lora.enabled:
        model = model.merge_and_unload()
    model = model.float().eval()
    train = trainer.train_dataset
    tokens = int(sum(sum(1 for x in row if x != IGNORE) for row in train["labels"]))
    log.info("trained %d steps in %.1f s (%d of %d parameters trained)", output.global_step, seconds, trainable, total)
    return TrainResult(
        model=model,
        best_metric=None,
        epochs_run=float(trainer.state.epoch or 0),
        steps=int(output.global_step),
        train_seconds=seconds,
        log_history=list(trainer.state.log_history),
        extra={
            "resumed_from_step": float(resumed),
            "trainable_parameters": float(trainable),
            "total_parameters": float(total),
            "train_rows": float(len(train)),
            "response_tokens_per_epoch": float(tokens),
            "train_tokens_per_second": float(tokens * (trainer.state.epoch or 0) / seconds) if seconds else 0.0,
        },
    )


class Sft:
    """The ``sft`` kind (``kind: sft``): instruction SFT of a causal language model."""

    name = "sft"
    facts = FACTS
    mlflow_task = "llm/v1/chat"  # served as a chat endpoint; loaded by pyfunc offline

    def load_model(self, cfg: PipelineConfig) -> PreTrainedModel:
        return load_causal_lm(cfg)

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase, cfg: PipelineConfig) -> PreTrainedTokenizerBase:
        return prepare_tokenizer(tokenizer, cfg.sft)

    def encode(
        self, split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int, labels: list[str]
    ) -> DatasetDict:
        """``input_ids`` and ``labels`` (``-100`` on prompt positions), truncated to ``max_length``, unpadded."""
        from datasets import Dataset, DatasetDict

        return DatasetDict(
            {
                name: Dataset.from_dict(encode_frame(tokenizer, frame, max_length))
                for name, frame in (("train", split.train), ("eval", split.eval))
            }
        )

    def train(
        self,
        cfg: PipelineConfig,
        tokenizer: PreTrainedTokenizerBase,
        data: DatasetDict,
        checkpoints: Path,
        callbacks: tuple[Any, ...] = (),
    ) -> TrainResult:
        return train_sft(cfg, tokenizer, data, checkpoints, callbacks)

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)

    def trainer_metrics(self, cfg: PipelineConfig) -> Callable[[Any], dict[str, float]]:
        raise NotImplementedError("kind sft is scored by the evaluate stage, not inside the trainer")

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        frame: pd.DataFrame,
        cfg: PipelineConfig,
        max_length: int,
    ) -> Evaluation:
        return evaluate_sft(model, tokenizer, frame, cfg, max_length)

    def model_input(self, texts: list[str]) -> Any:
        """What the logged chat model's ``predict`` takes for a batch of prompts (one chat per prompt)."""
        return [{"messages": [{"role": "user", "content": t}]} for t in texts]

    def input_example(self, texts: list[str]) -> Any:
        return {"messages": [{"role": "user", "content": texts[0] if texts else "Hello!"}]}

    def logging_options(self, cfg: PipelineConfig) -> dict[str, Any]:
        """Greedy, bounded generation for the served chat model (what evaluation measured)."""
        return {"model_config": {"max_new_tokens": cfg.sft.max_new_tokens, "do_sample": False}}

    def prediction_columns(self, output: Any) -> dict[str, Any]:
        """``generation`` (the assistant's answer) and ``finish_reason`` from chat-completion responses."""
        rows = output if isinstance(output, list) else output.to_dict("records")
        answers = [r["choices"][0]["message"]["content"] for r in rows]
        reasons = [r["choices"][0].get("finish_reason") for r in rows]
        return {"generation": answers, "finish_reason": reasons}

    def empty_output(self) -> Any:
        return []

    def monitor_rows(self, frame: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
        """A seeded sample of ``monitor.sft_rows`` rows: loss and generations cost seconds per row on a CPU."""
        if len(frame) <= cfg.monitor.sft_rows:
            return frame
        return frame.sample(n=cfg.monitor.sft_rows, random_state=0).reset_index(drop=True)

    def drift_labels(self, cfg: PipelineConfig) -> list[str] | None:
        return None  # the "label" of a row is a free-text response
