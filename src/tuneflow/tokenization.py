"""Tokenization: a fast tokenizer, no padding (pad per batch at training time), cached on disk.

The cache key is the content digest of the rows kept for training + the tokenizer's full definition
(and chat template) + max_length + the label order, so an unchanged re-run loads the tokenized splits
from disk, and any change re-tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneflow.config import PipelineConfig
from tuneflow.data import LoadedData, Split, content_digest, split_digest
from tuneflow.files import slug
from tuneflow.kinds import get_kind
from tuneflow.kinds.catalog import facts_of
from tuneflow.models import load_tokenizer

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class Tokenized:
    datasets: DatasetDict  # "train" / "eval" with input_ids, attention_mask, labels
    cache_key: str
    cache_hit: bool
    path: Path
    tokenizer: PreTrainedTokenizerBase | None = None

    def stats(self, max_length: int) -> dict[str, float]:
        """Rows and real (unpadded) tokens of the training split, and the share of truncated rows."""
        lengths = [len(x) for x in self.datasets["train"]["input_ids"]]
        n = max(1, len(lengths))
        return {
            "rows/train": len(self.datasets["train"]),
            "rows/eval": len(self.datasets["eval"]),
            "tokens/train": sum(lengths),
            "tokens/train_mean_length": sum(lengths) / n,
            "tokens/truncated_share": sum(x >= max_length for x in lengths) / n,
        }


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


def cache_key(
    data_digest: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    labels: list[str],
    split_digest: str,
    kind: str = "classification",
) -> str:
    spec = {
        "data": data_digest,
        "split": split_digest,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "labels": labels,
        "v": 1,
    }
    spec |= facts_of(kind).cache_key_part(tokenizer)  # nothing for classification: keeps its existing keys
    blob = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def tokenize_split(
    split: Split,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    labels: list[str],
    data_digest: str,
    split_digest: str,
    cache_dir: Path,
    kind: str = "classification",
    keep: int | None = None,
) -> Tokenized:
    """Tokenize both splits (truncate to ``max_length``, no padding) or load them from the cache.

    Args:
        split: train/eval frames with text and label-name columns.
        tokenizer: a fast tokenizer.
        max_length: truncation length in tokens.
        labels: label names in id order.
        data_digest: content digest of the rows that are tokenized (after rows tolerated by validation were
            dropped: a change of those bounds must not reuse an entry made from other rows).
        split_digest: digest of the split settings (fraction, salt).
        cache_dir: root of the tokenized-data cache.
        kind: the kind of fine-tuning (``tuneflow.kinds``), which turns rows into model inputs.
        keep: after storing a new entry, keep only this many newest entries in ``cache_dir`` (None: all).
    """
    from datasets import load_from_disk

    key = cache_key(data_digest, tokenizer, max_length, labels, split_digest, kind)
    path = cache_dir / key
    if (path / "dataset_dict.json").exists():
        log.info("tokenized data cache hit: %s", path)
        os.utime(path)  # eviction keeps the most recently used entries
        return Tokenized(load_from_disk(str(path)), key, True, path, tokenizer)

    dd = get_kind(kind).encode(split, tokenizer, max_length, labels)
    # Each writer has its own temporary folder, renamed into place in one step: a crashed run never
    # leaves a half-written entry, and two runs tokenizing the same data never delete each other's work.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    dd.save_to_disk(str(tmp))
    try:
        tmp.rename(path)
    except OSError:
        if not (path / "dataset_dict.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another run stored the same entry first: use it
    log.info("tokenized %d train / %d eval rows into %s", len(dd["train"]), len(dd["eval"]), path)
    if keep is not None:
        evict(cache_dir, keep, current=path)
    return Tokenized(load_from_disk(str(path)), key, False, path, tokenizer)


def evict(cache_dir: Path, keep: int, current: Path | None = None, stale_tmp_s: float = 3600) -> list[Path]:
    """Delete all but the ``keep`` newest entries of ``cache_dir`` (never ``current``), and temporary folders
    of writers that died more than ``stale_tmp_s`` ago. Returns what was deleted."""
    import time

    entries = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    old = [p for p in entries[keep:] if p != current]
    now = time.time()
    old += [p for p in cache_dir.glob(".*.tmp") if now - p.stat().st_mtime > stale_tmp_s]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    if old:
        log.info("evicted %d old tokenized-data entries from %s (keeping the newest %d)", len(old), cache_dir, keep)
    return old


KEEP_ENTRIES = 4  # tokenized-data entries kept per pipeline config


def tokenize_data(cfg: PipelineConfig, data: LoadedData, split: Split, cache_root: Path) -> Tokenized:
    """Tokenize both splits with the base model's tokenizer, or load them from ``cache_root/tokenized/<name>``
    (the newest ``KEEP_ENTRIES`` entries per config are kept)."""
    tokenizer = get_kind(cfg.kind).prepare_tokenizer(load_tokenizer(cfg.model), cfg)
    # ``data.digest`` identifies the input files; the key needs the rows actually kept for training.
    return tokenize_split(
        split,
        tokenizer,
        cfg.model.max_length,
        cfg.data.labels,
        content_digest(data.frame),
        split_digest(cfg.data),
        cache_root / "tokenized" / slug(cfg.name),
        cfg.kind,
        keep=KEEP_ENTRIES,
    )
