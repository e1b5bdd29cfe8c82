"""The recipe tuneflow replaces, as a plain script: the Hugging Face text-classification tutorial's Trainer
code, written the way the seed article (and most notebooks) write it. Every text padded to 128 tokens, fp32,
batch 8, learning rate 2e-5, one Trainer, no validation of the data, no tracking, no registry.

Usage (the side-by-side benchmark runs it for you):
    python benchmarks/plain_recipe.py TRAIN_CSV EVAL_CSV BASE_MODEL_DIR --epochs 1 --out result.json
TRAIN_CSV / EVAL_CSV: columns text,label (label: ham/spam). Prints and writes train/eval seconds and macro-F1.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from sklearn.metrics import f1_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("train_csv")
    p.add_argument("eval_csv")
    p.add_argument("base_model")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", default="recipe-output")
    a = p.parse_args()
    started = time.perf_counter()

    labels = ["ham", "spam"]
    label2id = {lab: i for i, lab in enumerate(labels)}
    train_df, eval_df = pd.read_csv(a.train_csv), pd.read_csv(a.eval_csv)
    tokenizer = AutoTokenizer.from_pretrained(a.base_model)

    def encode(batch):
        enc = tokenizer(batch["text"], padding="max_length", truncation=True, max_length=128)
        enc["labels"] = [label2id[lab] for lab in batch["label"]]
        return enc

    train_ds = Dataset.from_pandas(train_df).map(encode, batched=True, remove_columns=["text", "label"])
    eval_ds = Dataset.from_pandas(eval_df).map(encode, batched=True, remove_columns=["text", "label"])
    model = AutoModelForSequenceClassification.from_pretrained(
        a.base_model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )

    def compute_metrics(pred):
        return {"macro_f1": f1_score(pred.label_ids, np.argmax(pred.predictions, axis=-1), average="macro")}

    args = TrainingArguments(
        output_dir=a.workdir,
        num_train_epochs=a.epochs,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=2e-5,
        weight_decay=0.01,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=50,
        report_to="none",
        use_cpu=True,
        seed=42,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, compute_metrics=compute_metrics
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = trainer.evaluate()
    eval_s = time.perf_counter() - t0
    trainer.save_model(f"{a.workdir}/model")
    result = {
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "macro_f1": metrics["eval_macro_f1"],
        "train_rows": len(train_df),
        "eval_rows": len(eval_df),
        "padded_tokens_per_epoch": 128 * len(train_df),
        "torch_threads": torch.get_num_threads(),
        "script_seconds": time.perf_counter() - started,
    }
    print(json.dumps(result))
    with open(a.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
