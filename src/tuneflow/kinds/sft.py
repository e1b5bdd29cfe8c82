"""Instruction SFT: a causal language model fine-tuned on prompt/response rows, with LoRA (PEFT) or fully.

Rows (``tuneflow.data``, any layout of ``tuneflow.chat_formats``): one conversation each; ``text`` is the
prompt (the last user turn), ``label`` the reference response (the last answer), ``context`` the turns before
the prompt (system, earlier turns) as JSON or None. A row becomes ``input_ids`` (the chat template applied to
the whole conversation) and ``labels`` (``encode_chat``): ``-100`` on system, user and tool turns, every
assistant turn trained up to and including the EOS token that ends it (so the model learns to stop; a pad
token equal to EOS does not mask it, padding is masked by position). Nothing after the last EOS is trained.
Training is TRL's ``SFTTrainer`` on these pre-tokenized rows (padding-free or packed batches; no example
attends to another), with PEFT's LoRA.

Evaluation: the loss on response tokens (token-weighted) and its perplexity, and greedy generations for
up to ``sft.generations`` eval prompts scored against the reference with chrF (sacrebleu), with the share
that stop with EOS before ``sft.max_new_tokens`` and the share that loop (``loops``); for a new model, the base
model's answers to the same prompts beside them (``base_generations``, cached once per base, prompts, settings).

Registration (docs/how-to/sft-versions.md): the model is evaluated and registered in ``registry.sft_dtype``,
merged (``registry.sft_weights: merged``) or as the adapter alone on its pinned base (``adapter``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tuneflow.chat_formats import prompt_messages
from tuneflow.config import GenerationSettings, PipelineConfig, SftConfig
from tuneflow.data import CONTEXT, LABEL, TEXT, Split
from tuneflow.evaluate import Evaluation
from tuneflow.files import write_json_atomic
from tuneflow.kinds.sft_facts import FACTS
from tuneflow.models import base_model_digest, resolve_base_model
from tuneflow.registry_base import BASE_PIN_KEY
from tuneflow.runtime import cache_dir
from tuneflow.train import mlflow_callback, run_trainer
from tuneflow.train_common import TrainResult

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import torch
    from datasets import DatasetDict
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE = -100  # label of a position that is not trained (prompt, padding)

# An answer "loops" when it repeats itself: a sentence of at least LOOP_SENTENCE_WORDS words occurs twice or more,
# or a run of LOOP_NGRAM words occurs LOOP_NGRAM_REPEATS times or more (a loop without sentence punctuation).
# Words are lowercased runs of letters/digits (apostrophes kept inside: "I'm"); punctuation is ignored.
LOOP_NGRAM = 4
LOOP_NGRAM_REPEATS = 3
LOOP_SENTENCE_WORDS = 3
_WORD = re.compile(r"\w+(?:'\w+)*")
_SENTENCE = re.compile(r"[^.!?\n]+")

# For base models whose tokenizer has no chat template: plain turns, each assistant turn ended by EOS.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'tool' %}### Tool:\n{{ m['content'] }}\n\n"
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


def chat_of(prompt: str, response: str, context: str | None) -> list[dict[str, str]]:
    """The whole conversation of a row: its context, its prompt and its response (the last answer)."""
    return [*prompt_messages(prompt, context), {"role": "assistant", "content": response}]


class TemplateError(ValueError):
    """A chat template that renders earlier turns differently once later turns follow: the turn boundaries (and
    so the trained tokens) cannot be read off its output."""


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation: ``-100`` on system, user and tool turns and on the template's
    markup, every assistant turn trained up to and including the EOS that ends it.

    The turn boundaries come from the template's own output: for the assistant turn ``i`` the template renders
    ``messages[:i]`` with the generation prompt (what the model sees when it answers) and ``messages[:i + 1]``;
    the text between the two is the answer. Each piece is tokenized on its own, so an answer starts on the same
    token boundary as in generation. This works with any template that renders a prefix of the conversation as a
    prefix of the text (TRL's ``assistant_only_loss`` instead needs ``{% generation %}`` markers in the
    template, which few templates have). Text after an answer's EOS (ChatML's newline) is context for the next
    turn, untrained; after the last answer it is left out.

    Raises:
        TemplateError: the template renders a prefix of the conversation differently.
    """
    eos = tokenizer.eos_token_id
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the rendered text tokenized so far
    for k, i in enumerate(answers):
        asked = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        answered = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not asked.startswith(done) or not answered.startswith(asked):
            raise TemplateError(
                f"the chat template renders turn {i + 1} of a conversation differently once later turns follow, so "
                "the assistant turns cannot be told apart. Fix: set sft.chat_template to a template that renders "
                "each turn the same whatever follows it"
            )
        before = _ids(tokenizer, asked[len(done) :])
        answer = _ids(tokenizer, answered[len(asked) :])
        if eos in answer:
            cut = len(answer) - answer[::-1].index(eos)  # up to the last EOS of the answer
            trained, after = answer[:cut], answer[cut:]
        else:  # a template that ends an answer without EOS: the model must still learn to stop
            trained, after = [*answer, eos], []
        if k == len(answers) - 1:
            after = []
        ids += before + trained + after
        labels += [IGNORE] * len(before) + trained + [IGNORE] * len(after)
        done = answered
    return ids, labels


def render_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, context: str | None = None
) -> tuple[list[int], list[int]]:
    """(the ids before the first trained token, all ids) of a row's conversation (``encode_chat``)."""
    ids, labels = encode_chat(tokenizer, chat_of(prompt, response, context))
    first = next((n for n, x in enumerate(labels) if x != IGNORE), len(ids))
    return ids[:first], ids


def encode_row(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, context: str | None, max_length: int
) -> dict[str, list[int]] | None:
    """``input_ids`` and ``labels`` (``encode_chat``) truncated to ``max_length``; None when the tokens before
    the first answer fill ``max_length`` (nothing would be trained: validation reports such rows)."""
    ids, labels = encode_chat(tokenizer, chat_of(prompt, response, context))
    first = next((n for n, x in enumerate(labels) if x != IGNORE), len(ids))
    if first >= max_length:
        return None
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def token_lengths(tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame) -> pd.DataFrame:
    """Per row: tokens before the first trained token (the templated prompt: for a multi-turn row, everything
    before its first answer) and of the whole conversation (NaN where the prompt or response is missing)."""
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


def loops(answer: str) -> bool:
    """Whether ``answer`` loops (see ``LOOP_NGRAM``): "I'm going to Japan. I'm going to Japan." does, and so does
    "a b c d x a b c d y a b c d"; "I am fine, thank you." does not."""
    words = [w.lower() for w in _WORD.findall(answer)]
    grams = Counter(tuple(words[i : i + LOOP_NGRAM]) for i in range(len(words) - LOOP_NGRAM + 1))
    if grams and max(grams.values()) >= LOOP_NGRAM_REPEATS:
        return True
    sentences = Counter(tuple(w.lower() for w in _WORD.findall(part)) for part in _SENTENCE.findall(answer))
    return any(n >= 2 and len(sentence) >= LOOP_SENTENCE_WORDS for sentence, n in sentences.items())


def load_causal_lm(cfg: PipelineConfig) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(resolve_base_model(cfg.model.base_model)), dtype=torch.float32)


def registry_dtype(cfg: PipelineConfig) -> torch.dtype:
    """The dtype a fine-tuned model is evaluated and registered in (``registry.sft_dtype``)."""
    import torch

    return base_dtype(cfg) if cfg.registry.sft_dtype == "base" else getattr(torch, cfg.registry.sft_dtype)


def base_dtype(cfg: PipelineConfig) -> torch.dtype:
    """The dtype the base model's ``config.json`` names (float32 when it names none)."""
    import torch

    config = json.loads((resolve_base_model(cfg.model.base_model) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"the base model's config.json names dtype {name!r}, not a float dtype torch has. Fix: correct 'dtype' "
            "in its config.json (e.g. float32), or set registry.sft_dtype to bfloat16, float16 or float32"
        )
    return dtype


def _lora_parameters(model: Any) -> list[Any]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def cast_as_loaded(model: Any, dtype: torch.dtype) -> Any:
    """``model.to(dtype)`` except for the buffers that are not saved (the rotary embedding's ``inv_freq``): they
    stay as they are, in float32, as transformers computes them when it loads the registered weights. Cast with
    the rest, the in-memory model scored another eval loss than the same weights reloaded (5.67342 vs 5.67349 on
    the tiny test model), and a retrain on unchanged data could beat its own reloaded champion by that."""
    persistent = set(model.state_dict())
    kept = {name: buf for name, buf in model.named_buffers() if name not in persistent}
    model = model.to(dtype)
    for name, buf in kept.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf
    return model


def adapter_model(cfg: PipelineConfig, trained: Any, dtype: torch.dtype) -> Any:
    """The trained adapter on a fresh base, exactly as MLflow will load the adapter-only version: the adapter rounded
    to ``dtype`` (as it is saved), reloaded by PEFT (which computes a bf16/fp16 adapter in float32) onto the base in
    the base's own dtype. Not the base in bf16: its layer outputs, rounded to bf16 before the small LoRA term is
    added and rounded again, lost about half of what 3 steps had trained on the demo (eval loss on one chat 2.349
    vs 2.326 with the float32 base; the merged bf16 model kept it: 2.329)."""
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for p in _lora_parameters(trained):
        p.data = p.data.to(dtype)
    with tempfile.TemporaryDirectory(prefix="tuneflow-adapter-") as tmp:
        trained.save_pretrained(tmp)
        base = AutoModelForCausalLM.from_pretrained(
            str(resolve_base_model(cfg.model.base_model)), dtype=base_dtype(cfg)
        )
        return PeftModel.from_pretrained(base, tmp).eval()


@contextmanager
def adapter_saved_as(model: Any, dtype: torch.dtype) -> Iterator[None]:
    """While inside: the adapter's weights in ``dtype`` (what is written: half of float32 for bf16). PEFT computes a
    loaded bf16 adapter in float32; its values are bf16 already (``adapter_model``), so the casts lose nothing."""
    params = _lora_parameters(model)
    before = [p.dtype for p in params]
    for p in params:
        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, d in zip(params, before, strict=True):
            p.data = p.data.to(d)


def weight_bytes(model: Any, adapter_only: bool, dtype: torch.dtype) -> int:
    """Bytes of the weights a version holds in ``dtype``: the adapter's or the whole model's (shared tensors once)."""
    params = [p for n, p in model.named_parameters() if ("lora_" in n) == adapter_only]
    return sum(p.numel() for p in params) * dtype.itemsize


def generation_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    """The repetition controls to pass to ``generate`` (left out when off, so nothing changes the default)."""
    out: dict[str, Any] = {}
    if settings.repetition_penalty != 1.0:
        out["repetition_penalty"] = settings.repetition_penalty
    if settings.no_repeat_ngram_size:
        out["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
    return out


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
    settings: GenerationSettings | None = None,
) -> tuple[list[str], list[bool]]:
    """Greedy answers to ``prompts`` (chat template, generation prompt), and whether each stopped with EOS;
    ``settings``: the repetition controls (sampling settings are for serving only)."""
    import torch

    contexts = contexts or [None] * len(prompts)
    extra = generation_kwargs(settings or GenerationSettings())
    if extra:
        # transformers' repetition controls count the left padding of a batch as tokens of the answer (the pad token
        # is EOS here): one prompt at a time, as the served model answers each request
        batch_size = 1
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
                    **extra,
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


def base_generation_key(
    cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, prompts: list[str], contexts: list
) -> str:
    """What the base model's answers depend on: its bytes, the prompts, the template and the generation settings."""
    blob = {
        "base": base_model_digest(cfg.model),
        "prompts": prompts,
        "contexts": contexts,
        "chat_template": tokenizer.chat_template,
        "max_new_tokens": cfg.sft.max_new_tokens,
        "generation": generation_kwargs(cfg.sft.generation),
        "dtype": "float32",
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def base_generations(
    cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, prompts: list[str], contexts: list[str | None]
) -> tuple[list[str], list[bool], bool]:
    """The base model's greedy answers to ``prompts`` (float32, the same template and settings as the fine-tune's),
    generated once and then read from ``<cache>/base-generations/<key>.json``; the third value: read from the cache."""
    path = cache_dir() / "base-generations" / f"{base_generation_key(cfg, tokenizer, prompts, contexts)}.json"
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        return cached["answers"], cached["stopped"], True
    start = time.perf_counter()
    answers, stopped = generate(
        load_causal_lm(cfg),
        tokenizer,
        prompts,
        contexts,
        cfg.sft.max_new_tokens,
        batch_size=min(cfg.train.eval_batch_size, 16),
        settings=cfg.sft.generation,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"base_model": cfg.model.base_model, "answers": answers, "stopped": stopped})
    log.info(
        "base model's answers to %d eval prompts: %.1f s (cached in %s)",
        len(prompts),
        time.perf_counter() - start,
        path,
    )
    return answers, stopped, False


def evaluate_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    cfg: PipelineConfig,
    max_length: int,
    with_base: bool = False,
) -> Evaluation:
    """Response-token loss and perplexity on every eval row; chrF, EOS share and looping share (``loops``) of greedy
    generations for up to ``sft.generations`` of them (the first ones of the eval split: the same rows for every
    model). ``with_base`` (the new model's evaluation, with ``sft.compare_base``): the base model's answers to the
    same prompts beside them (``base_generations``)."""
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
            settings=cfg.sft.generation,
        )
        chrf = CHRF()
        references = list(rows[LABEL])
        looping = [loops(a) for a in answers]
        samples = pd.DataFrame(
            {
                "prompt": list(rows[TEXT]),
                "reference": references,
                "generation": answers,
                "chrf": [round(chrf.sentence_score(a, [r]).score, 2) for a, r in zip(answers, references, strict=True)],
                "stopped_with_eos": stopped,
                "loops": looping,
            }
        )
        metrics["chrf"] = float(chrf.corpus_score(answers, [references]).score)
        metrics["eos_stop_share"] = float(np.mean(stopped))
        metrics["looping_share"] = float(np.mean(looping))
        metrics["generations"] = float(n)
        if with_base and cfg.sft.compare_base:
            base_answers, _, _ = base_generations(cfg, tokenizer, list(rows[TEXT]), _contexts(rows))
            base_looping = [loops(a) for a in base_answers]
            samples["base_generation"] = base_answers
            samples["base_chrf"] = [
                round(chrf.sentence_score(a, [r]).score, 2) for a, r in zip(base_answers, references, strict=True)
            ]
            samples["base_loops"] = base_looping
            metrics["base_chrf"] = float(chrf.corpus_score(base_answers, [references]).score)
            metrics["base_looping_share"] = float(np.mean(base_looping))
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
    return token_mean_eval(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=data["eval"] if s.eval_steps else None,
        processing_class=tokenizer,
        peft_config=_peft_config(cfg) if s.lora.enabled else None,
        callbacks=[mlflow_callback(), *callbacks],
    )


def token_mean_eval(trainer_class: type) -> type:
    """``trainer_class`` whose evaluation loss is the mean over every response token of the eval split, the metric
    the evaluate stage scores (``response_loss``). transformers' evaluation loop averages each batch's token mean,
    weighted by rows: a batch of short answers counts as much as one of long ones (on chatterbot rows 1.66 against
    1.45 per token, the same model)."""

    class TokenMeanEval(trainer_class):
        _eval_sums: list | None = None

        def evaluation_loop(self, dataloader, *args, metric_key_prefix: str = "eval", **kwargs):
            self._eval_sums = [0.0, 0]
            try:
                output = super().evaluation_loop(dataloader, *args, metric_key_prefix=metric_key_prefix, **kwargs)
                total, count = self._eval_sums
            finally:
                self._eval_sums = None
            if count:
                output.metrics[f"{metric_key_prefix}_loss"] = total / count
            return output

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            if self._eval_sums is not None and loss is not None and "labels" in inputs:
                tokens = int((inputs["labels"][:, 1:] != IGNORE).sum())  # the loss's tokens: labels shift by one
                self._eval_sums[0] += float(loss) * tokens
                self._eval_sums[1] += tokens
            return loss, logits, labels

    TokenMeanEval.__name__ = TokenMeanEval.__qualname__ = f"TokenMeanEval{trainer_class.__name__}"
    return TokenMeanEval


@contextmanager
def compiled_for_training(model: Any, enabled: bool) -> Iterator[None]:
    """With ``enabled`` (``sft.compile``), the decoder stack of ``model`` (PEFT or plain) ``torch.compile``d in place
    (inductor, ``dynamic=True``: padding-free batches change length every step) while the block runs. In place,
    the module's parameters and state-dict keys stay as they are, so checkpoints, resuming, merging and saving see
    the plain model. Afterwards the compiled call is dropped: evaluation, ``merge_and_unload`` and generation change
    the shapes and the weights, which would only recompile (``nn.Module.compile`` has no public inverse)."""
    if not enabled:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stack = base.base_model  # the decoder stack (LlamaModel, ...); the LM head and the loss stay eager
    stack.compile(dynamic=True)
    log.info("sft.compile: the decoder stack is compiled on the first steps (inductor)")
    try:
        yield
    finally:
        stack._compiled_call_impl = None


def train_sft(
    cfg: PipelineConfig,
    tokenizer: PreTrainedTokenizerBase,
    data: DatasetDict,
    checkpoints: Path,
    callbacks: tuple[Any, ...] = (),
) -> TrainResult:
    """Train with ``sft_trainer``; returns what gets evaluated and registered, in ``registry.sft_dtype``: with
    ``registry.sft_weights: merged`` the model with LoRA merged into the base weights (a plain causal LM that loads
    offline without PEFT or the base model's folder), with ``adapter`` the adapter on the base (a PEFT model)."""
    trainer = sft_trainer(cfg, tokenizer, data, checkpoints, callbacks)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    with compiled_for_training(trainer.model, cfg.sft.compile):
        output, seconds, resumed = run_trainer(trainer, checkpoints, cfg.train.checkpoint_minutes)
    dtype = registry_dtype(cfg)
    adapter_only = cfg.registry.sft_weights == "adapter"
    if adapter_only:  # what gets evaluated is what gets registered: the adapter on the pinned base
        model = adapter_model(cfg, trainer.model, dtype)
    else:
        model = trainer.model.merge_and_unload() if cfg.sft.lora.enabled else trainer.model
        model = cast_as_loaded(model, dtype).eval()
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
            "registered_weight_bytes": float(weight_bytes(model, adapter_only, dtype)),
            "base_weight_bytes": float(weight_bytes(model, False, base_dtype(cfg))) if adapter_only else 0.0,
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
        new_model: bool = False,
    ) -> Evaluation:
        return evaluate_sft(model, tokenizer, frame, cfg, max_length, with_base=new_model)

    def model_input(self, texts: list[str]) -> Any:
        """What the logged chat model's ``predict`` takes for a batch of prompts (one chat per prompt)."""
        return [{"messages": [{"role": "user", "content": t}]} for t in texts]

    def input_example(self, texts: list[str]) -> Any:
        return {"messages": [{"role": "user", "content": texts[0] if texts else "Hello!"}]}

    def logging_options(self, cfg: PipelineConfig) -> dict[str, Any]:
        """The served chat model's generation settings (``sft.max_new_tokens``, ``sft.generation``: greedy unless
        ``do_sample``); an adapter-only version also names its base folder and pins it by content digest."""
        g = cfg.sft.generation
        model_config: dict[str, Any] = {"max_new_tokens": cfg.sft.max_new_tokens, "do_sample": g.do_sample}
        model_config |= generation_kwargs(g)
        if g.do_sample:
            model_config |= {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k}
        options: dict[str, Any] = {"model_config": model_config}
        if cfg.registry.sft_weights == "adapter":
            base = resolve_base_model(cfg.model.base_model)
            options |= {
                "base_model_path": str(base),
                "metadata": {BASE_PIN_KEY: {"model": cfg.model.base_model, "digest": base_model_digest(cfg.model)}},
                "extra_requirements": ["peft"],
            }
        return options

    @contextmanager
    def logging_context(self, model: Any, cfg: PipelineConfig) -> Iterator[None]:
        """An adapter is written in ``registry.sft_dtype`` (PEFT holds a loaded bf16 adapter in float32)."""
        if cfg.registry.sft_weights == "adapter":
            with adapter_saved_as(model, registry_dtype(cfg)):
                yield
        else:
            yield

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
