"""Tokenization of the default data: computed (cold cache) vs loaded from the cache (warm), side by side.

Usage: .venv/bin/python benchmarks/tokenize_cache.py [REPEATS]
The tokenizer is loaded (and transformers imported) before timing, so only the stage's own work counts.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(repeats: int = 5) -> None:
    from tuneflow.runtime import configure_environment

    configure_environment()
    from datasets.utils.logging import disable_progress_bar

    from tuneflow.config import load_config
    from tuneflow.data import read_table, split_by_text_hash
    from tuneflow.models import load_tokenizer
    from tuneflow.tokenization import tokenize_split

    disable_progress_bar()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/sms-spam.yaml")
    loaded = read_table(cfg.data)
    split = split_by_text_hash(loaded.frame, cfg.data.eval_fraction, cfg.data.split_salt)
    tok = load_tokenizer(cfg.model)
    cold, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            args = (split, tok, cfg.model.max_length, cfg.data.labels, loaded.digest, "bench", Path(d))
            t = time.perf_counter()
            assert not tokenize_split(*args).cache_hit
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert tokenize_split(*args).cache_hit
            warm.append(time.perf_counter() - t)
    c, w = statistics.median(cold), statistics.median(warm)
    print(
        f"rows: {len(split.train)} train + {len(split.eval)} eval, max_length {cfg.model.max_length}, {repeats} "
        "repeats (median)"
    )
    print("| variant | seconds | ratio |")
    print("|---|---:|---:|")
    print(f"| tokenize + write cache (cold) | {c:.3f} | 1.0x |")
    print(f"| load from cache (warm) | {w:.3f} | {c / w:.1f}x faster |")


if __name__ == "__main__":
    main(*(int(x) for x in sys.argv[1:2]))
