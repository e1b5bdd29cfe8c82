"""The data gate on 10k, 100k and 1M generated rows (every expectation on, token-length check with the
default model's tokenizer, 10k rows of accepted data to compare with), and the content digest's speed.

Usage: .venv/bin/python benchmarks/gate_scaling.py [ROWS ...]   (default 10000 100000 1000000)
Each size: write a CSV batch into a fresh landing zone, time run_gate (read, validate, Data Docs,
move), and time content_digest over the same rows. Results are printed as a markdown table.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

WORDS = (
    "call me later lunch home tonight free prize claim cash urgent txt offer win now your the to and "
    "you for this is a ok see soon thanks love meeting class reply stop www mobile"
).split()


def generate(n: int, seed: int) -> pd.DataFrame:
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 30))) + f" {seed}-{i}" for i in range(n)]
    labels = ["spam" if rng.random() < 0.3 else "ham" for _ in range(n)]
    return pd.DataFrame({"text": texts, "label": labels}, dtype=object)  # as tasks.data.read_table returns


def main(sizes: list[int]) -> None:
    from tuneflow.runtime import configure_environment

    configure_environment()
    from tuneflow.config import load_config
    from tuneflow.data import content_digest
    from tuneflow.landing import folders, run_gate
    from tuneflow.models import load_tokenizer

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs/sms-spam.yaml")
    tokenizer = load_tokenizer(cfg.model)
    print("| rows | batch MB | gate s | rows/s | s per 1M rows | digest s | digest MB/s | result |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            landing = Path(tmp) / "bench"
            incoming, accepted, _ = folders(landing)
            generate(10_000, seed=0).to_csv(accepted / "base.csv", index=False)
            frame = generate(n, seed=n)
            frame.to_csv(incoming / "batch.csv", index=False)
            mb = (incoming / "batch.csv").stat().st_size / 1e6
            run_cfg = cfg.model_copy(
                update={
                    "data": cfg.data.model_copy(
                        update={"path": None, "landing": str(landing), "label_values": None, "label_column": "label"}
                    ),
                    # the batch was written just now and is complete: measure judging, not the settle wait
                    "watch": cfg.watch.model_copy(update={"quiet_seconds": 0}),
                }
            )
            t = time.perf_counter()
            result = run_gate(run_cfg, landing, tokenizer)
            gate_s = time.perf_counter() - t
            outcome = result.outcomes[0]
            t = time.perf_counter()
            content_digest(frame)
            digest_s = time.perf_counter() - t
            status = outcome.status + (
                "" if outcome.report.success else f" ({', '.join(c.name for c in outcome.report.failed)})"
            )
            print(
                f"| {n:,} | {mb:.1f} | {gate_s:.1f} | {n / gate_s:,.0f} | {gate_s * 1e6 / n:.1f} | "
                f"{digest_s:.2f} | {mb / digest_s:.0f} | {status} |",
                flush=True,
            )
            shutil.rmtree(landing, ignore_errors=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [10_000, 100_000, 1_000_000])
