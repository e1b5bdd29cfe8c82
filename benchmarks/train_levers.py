"""Training-speed levers, one at a time, side by side: real tokens per second of the transformers Trainer on the
SMS train split (tuneflow's split, dynamic padding, length-grouped batches, bf16 autocast unless a variant says
otherwise), each variant in its own process, interleaved over --repeats rounds (the median is reported).

Usage: .venv/bin/python benchmarks/train_levers.py [--steps 60] [--repeats 2] [--variants base,batch32,...]
       .venv/bin/python benchmarks/train_levers.py --eval   (the evaluate stage's scoring: batch size, bf16, order)

Variants (each changes one thing from `base`, the shipped training settings: batch 16, fused AdamW (transformers
5's default), SDPA attention, torch's default threads):
  base, batch32, batch64, unfused (AdamW's for-each implementation), eager (attention without SDPA), fp32 (no autocast),
  compile (torch.compile, its compile time counted in the steps), threads1, nogroup (random order, no
  length grouping).
Prints a markdown table: variant, train seconds for the steps, real tokens/s, ratio to base, final loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["base", "batch32", "batch64", "unfused", "eager", "fp32", "compile", "threads1", "nogroup"]


def worker(variant: str, steps: int) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from tuneflow.config import load_config
    from tuneflow.data import read_table, split_data
    from tuneflow.kinds.classification import Classification
    from tuneflow.models import resolve_base_model
    from tuneflow.validation import drop_out_of_bounds

    cfg = load_config(ROOT / "configs" / "sms-spam.yaml")
    loaded, _ = drop_out_of_bounds(read_table(cfg.data), cfg)
    split = split_data(loaded, cfg.data)
    path = str(resolve_base_model(cfg.model.base_model))
    tok = AutoTokenizer.from_pretrained(path)
    kind = Classification()
    from datasets import Dataset

    labels = cfg.data.labels
    enc = tok(list(split.train["text"]), truncation=True, max_length=cfg.model.max_length)
    ds = Dataset.from_dict(
        {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": [labels.index(x) for x in split.train["label"]],
        }
    )
    if variant == "threads1":
        torch.set_num_threads(1)
    batch = {"batch32": 32, "batch64": 64}.get(variant, cfg.train.batch_size)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), attn_implementation="eager" if variant == "eager" else "sdpa"
    )
    args = TrainingArguments(
        output_dir="/tmp/tuneflow-train-levers",
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=cfg.train.learning_rate,
        bf16=variant != "fp32",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=steps,
        train_sampling_strategy="random" if variant == "nogroup" else "group_by_length",
        optim="adamw_torch" if variant == "unfused" else "adamw_torch_fused",  # fused: transformers 5's default
        torch_compile=variant == "compile",
        seed=42,
        disable_tqdm=True,
    )
    tokens = 0

    def count(_module, _args, kwargs):
        nonlocal tokens
        tokens += int(kwargs["attention_mask"].sum())

    model.register_forward_pre_hook(count, with_kwargs=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=kind.collator(tok))
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    return {"variant": variant, "seconds": seconds, "tokens": tokens, "loss": out.training_loss, "batch": batch}


def eval_levers(repeats: int) -> None:
    """Scoring the eval split as the evaluate stage does (predict_ids: length-sorted, padded per batch) at
    several batch sizes, fp32 and bf16 autocast, and unsorted (file order) for comparison; macro-F1 unchanged?"""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneflow.config import load_config
    from tuneflow.data import read_table, split_data
    from tuneflow.kinds.classification import predict_ids
    from tuneflow.models import resolve_base_model
    from tuneflow.validation import drop_out_of_bounds

    cfg = load_config(ROOT / "configs" / "sms-spam.yaml")
    loaded, _ = drop_out_of_bounds(read_table(cfg.data), cfg)
    texts = list(split_data(loaded, cfg.data).eval["text"])
    path = str(resolve_base_model(cfg.model.base_model))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    print("| eval variant | rows | median s | rows/s |\n|---|---:|---:|---:|")
    reference = predict_ids(model, tok, texts, cfg.model.max_length, 64)
    for batch in (32, 64, 128):
        for bf16 in (False, True):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    preds = predict_ids(model, tok, texts, cfg.model.max_length, batch)
                times.append(time.perf_counter() - t0)
            same = (preds == reference).mean()
            med = statistics.median(times)
            print(
                f"| batch {batch}{' bf16' if bf16 else ''} (same predictions as fp32: {same:.1%}) | {len(texts)} | "
                f"{med:.2f} | {len(texts) / med:.0f} |"
            )
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(texts), 64):
                enc = tok(texts[start : start + 64], truncation=True, max_length=128, padding=True, return_tensors="pt")
                model(**enc)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"| batch 64, file order (not length-sorted) | {len(texts)} | {med:.2f} | {len(texts) / med:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval", action="store_true", help="time the evaluate stage's scoring instead")
    a = p.parse_args()
    if a.eval:
        eval_levers(max(a.repeats, 3))
        return
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.steps)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    variants = a.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for _ in range(a.repeats):
        for v in variants:
            # batch 32/64 take half/quarter the steps for the same rows
            steps = a.steps * 16 // {"batch32": 32, "batch64": 64}.get(v, 16)
            done = subprocess.run(
                [sys.executable, __file__, "--worker", v, "--steps", str(steps)],
                env=env,
                capture_output=True,
                text=True,
            )
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{v} failed:\n{done.stderr[-3000:]}")
            r = json.loads(line[7:])
            runs[v].append(r)
            print(f"{v}: {r['seconds']:.1f} s, {r['tokens'] / r['seconds']:.0f} tokens/s", flush=True)
    rate = {v: statistics.median(r["tokens"] / r["seconds"] for r in rs) for v, rs in runs.items()}
    base = rate.get("base") or next(iter(rate.values()))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    print("| variant | batch | rows | median s | real tokens/s | vs base | train loss (last run) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v, rs in runs.items():
        r = rs[-1]
        rows = r["batch"] * (a.steps * 16 // r["batch"])
        print(
            f"| {v} | {r['batch']} | {rows} | {statistics.median(x['seconds'] for x in rs):.1f} | {rate[v]:.0f} | "
            f"{rate[v] / base:.2f}x | {r['loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
