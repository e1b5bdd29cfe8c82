"""Does the settings search beat the shipped defaults? ``tuneflow tune`` on the SMS data, within a stated budget.

In a fresh folder (its own ``mlruns/``, ``optuna.db`` and ``.cache/``), one ``tuneflow tune`` of a copy of
``configs/sms-spam.yaml`` (``--trials``, ``--timeout``), run as a user runs it (a subprocess, wall clock). Its search
section enqueues the shipped settings as trial 0, so the defaults are trained in the same study, on the same
validated data and eval split, with the same seed, as every other trial: the comparison is macro-F1 of trial 0
against the best trial, both on that eval split, side by side from one run.

Mind the bias: the best trial is chosen on the eval split it is scored on (so is the gate's comparison), so its
margin over the defaults is an optimistic estimate; a margin within a few rows of the eval split is noise.

    .venv/bin/python benchmarks/tune_sms.py [--trials 12] [--timeout 45] [--config configs/sms-spam.yaml]

The same comparison for the SFT config at a smaller step budget (every trial, trial 0 included, trains the same
number of steps; ``--set`` edits the copied config, dotted keys, YAML values):

    .venv/bin/python benchmarks/tune_sms.py --config configs/chatterbot-sft.yaml --trials 5 --timeout 40 \
        --set sft.max_steps=40 --set sft.eval_steps=20 --set sft.generations=4 --set search.min_trial_minutes=2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/sms-spam.yaml")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--timeout", type=float, default=45.0, help="minutes; no new trial starts after this")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="edit the copied config")
    a = p.parse_args()
    import yaml

    from tuneflow.config import merge_tree, parse_overrides

    raw = merge_tree(yaml.safe_load((ROOT / a.config).read_text()), parse_overrides(a.set))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TUNEFLOW_"))}
    with tempfile.TemporaryDirectory(prefix="tune-sms-") as tmp:
        cwd = Path(tmp)
        config = cwd / Path(a.config).name
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        args = ["tune", "--config", str(config), "--trials", str(a.trials), "--timeout", str(a.timeout)]
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "tuneflow", *args], cwd=cwd, env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"tuneflow {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        print(done.stdout[done.stdout.find("=== tuneflow tune") :])
        import optuna

        name = (raw.get("search") or {}).get("study_name") or raw["name"]
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'mlruns' / 'optuna.db'}")
        trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    defaults, best = trials[0], study.best_trial
    if defaults.value is None:
        sys.exit(f"trial 0 (the shipped defaults) ended {defaults.state.name}: no comparison")
    metric = (raw.get("evaluate") or {}).get("primary_metric", "macro_f1")
    print(f"\n| trial | state | {metric} (eval split) | minutes | settings |\n|---|---|---|---|---|")
    for t in trials:
        value = f"{t.value:.4f}" if t.value is not None else ""
        minutes = f"{t.duration.total_seconds() / 60:.1f}" if t.duration else ""
        print(f"| {t.number} | {t.state.name} | {value} | {minutes} | {t.params} |")
    print(
        f"\n{a.trials} trials asked, budget {a.timeout:g} min: {len(trials)} ran ({states}), {wall / 60:.1f} min.\n"
        f"shipped defaults (trial 0): {metric} {defaults.value:.4f}; best (trial {best.number}): {best.value:.4f} "
        f"({best.value - defaults.value:+.4f}) with {best.params}."
    )
    if best.number == 0:
        print("The search did NOT beat the shipped defaults.")


if __name__ == "__main__":
    main()
