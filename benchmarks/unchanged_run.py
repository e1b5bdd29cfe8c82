"""Nothing changed, nothing paid: an unchanged ``tuneflow run`` against a forced one, side by side.

In a fresh folder (its own ``mlruns/`` and ``.cache/``): one ``tuneflow run`` that trains v1, then ``--repeat``
unchanged runs (answered from the registry before Prefect or torch), then one ``tuneflow run --force`` (the same
work retrained). Each is a subprocess, timed wall clock, as a user runs it.

    .venv/bin/python benchmarks/unchanged_run.py [--config configs/sms-spam.yaml] [--repeat 3] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str], cwd: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TUNEFLOW_"))}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tuneflow", "run", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"tuneflow run {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, done.stdout.strip().splitlines()[-3] if "nothing changed" in done.stdout else "trained"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/sms-spam.yaml")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    config = str((ROOT / a.config).resolve())
    base = ["--config", config, *(x for o in a.overrides for x in ("--set", o))]
    with tempfile.TemporaryDirectory(prefix="unchanged-run-") as tmp:
        cwd = Path(tmp)
        first, _ = timed(base, cwd)
        print(f"first run (trains v1):   {first:7.1f} s", flush=True)
        unchanged = []
        for _ in range(a.repeat):
            wall, line = timed(base, cwd)
            assert "nothing changed: v1 was trained on exactly this input" in line, line
            unchanged.append(wall)
            print(f"unchanged run:           {wall:7.1f} s", flush=True)
        forced, _ = timed([*base, "--force"], cwd)
        print(f"forced run (--force):    {forced:7.1f} s", flush=True)
    median = statistics.median(unchanged)
    print(
        f"\n{a.config} {' '.join(a.overrides)}: unchanged {median:.2f} s (median of {a.repeat}: "
        f"{', '.join(f'{u:.2f}' for u in unchanged)}) vs forced {forced:.1f} s = {100 * median / forced:.1f} %"
    )


if __name__ == "__main__":
    main()
