"""Wall time of a retrain, split by stage, read back from the MLflow runs (no timing code of its own).

Usage: .venv/bin/python benchmarks/stage_times.py [EXPERIMENT] [N_RUNS]
Prints a markdown table of the last N_RUNS finished retrain runs of EXPERIMENT (default sms-spam).
"""

from __future__ import annotations

import sys

STAGES = ["validate", "tokenize", "train", "evaluate", "champion", "register"]


def main(experiment: str = "sms-spam", n_runs: int = 2) -> None:
    import mlflow

    from tuneflow.tracking import configure_tracking

    configure_tracking()
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string="attributes.status = 'FINISHED' and tags.`tuneflow.prefect_flow_run_id` != ''",
        order_by=["attributes.start_time DESC"],
        max_results=n_runs,
        output_format="list",
    )
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    print("| run | " + " | ".join(STAGES) + " | stages total | run wall time | tokenize cache | macro-F1 |")
    print("|---|" + "---:|" * (len(STAGES) + 3) + "---:|")
    for r in reversed(runs):
        m = r.data.metrics
        times = [m.get(f"time/{s}_seconds", float("nan")) for s in STAGES]
        wall = (r.info.end_time - r.info.start_time) / 1000
        print(
            f"| {r.info.run_name} | "
            + " | ".join(f"{t:.1f} s" for t in times)
            + f" | {sum(times):.1f} s | {wall:.1f} s | {r.data.tags.get('tuneflow.tokenize_cache_hit', '?')} | "
            f"{m.get('eval/macro_f1', float('nan')):.4f} |"
        )


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["sms-spam"]), *(int(x) for x in sys.argv[2:3]))
