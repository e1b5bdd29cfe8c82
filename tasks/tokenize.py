"""Stage 2: tokenize with a fast tokenizer, no padding (pad per batch at training time), cached on disk.

The cache key is the data's content digest + the tokenizer's full definition + max_length + the label
order, so an unchanged re-run loads the tokenized splits from disk, and any change re-tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from tasks.data import LABEL, TEXT, Split

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_MAP_BATCH = 1000


@dataclass
class Tokenized:
    datasets: DatasetDict  # "train" / "eval" with input_ids, attention_mask, labels
    cache_key: str
    cache_hit: bool
    path: Path


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Digest of the tokenizer's complete definition (vocab, normalizer, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; tuneflow needs one (use_fast=True)")
    spec = json.loads(backend.to_str())
    # Calling the tokenizer with truncation/padding stores those settings in the backend; they are
    # call arguments (max_length is in the cache key), not part of the tokenizer's identity.
    spec.pop("truncation", None)
    spec.pop("padding", None)
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()[:16]


def cache_key(data_digest: str, tokenizer: PreTrainedTokenizerBase, max_length: int, labels: list[str], split_digest: str) -> str:
    blob = json.dumps(
        {"data": data_digest, "split": split_digest, "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length, "labels": labels, "v": 1},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _to_dataset(frame: pd.DataFrame, label2id: dict[str, int]):
    from datasets import Dataset

    return Dataset.from_dict({TEXT: list(frame[TEXT]), "labels": [label2id[lab] for lab in frame[LABEL]]})


def tokenize_split(
    split: Split,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    labels: list[str],
    data_digest: str,
    split_digest: str,
    cache_dir: Path,
) -> Tokenized:
    """Tokenize both splits (truncate to ``max_length``, no padding) or load them from the cache.

    Args:
        split: train/eval frames with text and label-name columns.
        tokenizer: a fast tokenizer.
        max_length: truncation length in tokens.
        labels: label names in id order.
        data_digest: content digest of the full data.
        split_digest: digest of the split settings (fraction, salt).
        cache_dir: root of the tokenized-data cache.
    """
    from datasets import DatasetDict, load_from_disk

    key = cache_key(data_digest, tokenizer, max_length, labels, split_digest)
    path = cache_dir / key
    if (path / "dataset_dict.json").exists():
        log.info("tokenized data cache hit: %s", path)
        return Tokenized(load_from_disk(str(path)), key, True, path)

    label2id = {name: i for i, name in enumerate(labels)}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch[TEXT], truncation=True, max_length=max_length)

    dd = DatasetDict({name: _to_dataset(frame, label2id) for name, frame in (("train", split.train), ("eval", split.eval))})
    dd = dd.map(encode, batched=True, batch_size=_MAP_BATCH, remove_columns=[TEXT], desc="Tokenizing")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)  # atomic: a crashed run never leaves a half-written cache entry behind
    log.info("tokenized %d train / %d eval rows into %s", len(dd["train"]), len(dd["eval"]), path)
    return Tokenized(load_from_disk(str(path)), key, False, path)


# ---- Prefect task ------------------------------------------------------------------------------

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize_task(cfg, loaded, parent_run_id: str, cache_root: Path):
    """Split by text hash, then tokenize (or load the cached tokenization). Returns (split, tokenizer, tokenized)."""
    import mlflow

    from tasks.data import split_by_text_hash
    from tasks.tracking import stage_run
    from tasks.train import load_tokenizer

    with stage_run(parent_run_id, "tokenize"):
        split = split_by_text_hash(loaded.frame, cfg.data.eval_fraction, cfg.data.split_salt)
        tokenizer = load_tokenizer(cfg.model)
        split_digest = hashlib.sha256(f"{cfg.data.eval_fraction}|{cfg.data.split_salt}".encode()).hexdigest()[:12]
        tok = tokenize_split(split, tokenizer, cfg.model.max_length, cfg.data.labels, loaded.digest, split_digest, cache_root / "tokenized")
        lengths = tok.datasets["train"]["input_ids"]
        n_tokens = sum(len(x) for x in lengths)
        mlflow.log_params({"tokenize.cache_key": tok.cache_key, "tokenize.cache_hit": tok.cache_hit, "tokenize.tokenizer": tokenizer_fingerprint(tokenizer)})
        mlflow.log_metrics({
            "rows/train": len(split.train), "rows/eval": len(split.eval),
            "tokens/train": n_tokens, "tokens/train_mean_length": n_tokens / max(1, len(lengths)),
            "tokens/truncated_share": sum(len(x) >= cfg.model.max_length for x in lengths) / max(1, len(lengths)),
        })
        mlflow.MlflowClient().set_tag(parent_run_id, "tuneflow.tokenize_cache_hit", str(tok.cache_hit))
    return split, tokenizer, tok
