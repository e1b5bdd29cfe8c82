"""The registered size of kind sft versions: the files of each named model's newest version (its MLflow logged
model), with its eval metrics. Run in the folder whose ``mlruns/`` holds them, after registering the demo three
ways (docs/how-to/sft-versions.md gives the commands):

    .venv/bin/python benchmarks/sft_version_sizes.py demo-fp32 demo-bf16 demo-adapter
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlparse

from tuneflow.runtime import configure_environment
from tuneflow.tracking import configure_tracking

METRICS = ("eval_loss", "chrf", "looping_share", "base_chrf", "base_looping_share")


def main(names: list[str]) -> None:
    import mlflow
    from mlflow import MlflowClient

    configure_environment()
    configure_tracking(Path.cwd())
    client = MlflowClient()
    print("| model | version | files | registered MB | .safetensors MB | " + " | ".join(METRICS) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(METRICS))
    for name in names:
        mv = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        logged = mlflow.get_logged_model(mv.model_id or mv.source.removeprefix("models:/"))
        files = [f for f in Path(urlparse(logged.artifact_location).path).rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files) / 1e6
        weights = sum(f.stat().st_size for f in files if f.suffix == ".safetensors") / 1e6
        metrics = client.get_run(mv.run_id).data.metrics
        shown = " | ".join(f"{metrics.get(f'eval/{m}', float('nan')):.4f}" for m in METRICS)
        print(f"| {name} | {mv.version} | {len(files)} | {size:.1f} | {weights:.1f} | {shown} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["demo-fp32", "demo-bf16", "demo-adapter"])
