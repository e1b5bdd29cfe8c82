"""Training in 1 vs N processes (train.processes), read back from the MLflow runs (no timing code of its own).

Usage, in the folder whose mlruns/ holds the runs (run the retrains with --force: train.processes is not part of
the fingerprint, so a second run on the same data would otherwise stop as "unchanged"):

    tuneflow run --config configs/sms-spam.yaml --set train.epochs=1 --force
    tuneflow run --config configs/sms-spam.yaml --set train.epochs=1 --set train.processes=2 --force
    .venv/bin/python benchmarks/train_processes.py [EXPERIMENT] [N_RUNS]

Prints a markdown table of the last N_RUNS finished retrains of EXPERIMENT (default sms-spam): processes,
the Trainer's own seconds (``train_seconds``: in N processes, rank 0's ``trainer.train()``), the train stage's
wall time (with process start, imports, model load and save in the ranks), steps and eval macro-F1.
"""

from __future__ import annotations

import sys


def main(experiment: str = "sms-spam", n_runs: int = 2) -> None:
    import mlflow

    from tuneflow.tracking import configure_tracking

    configure_tracking()
    parents = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string="attributes.status = 'FINISHED' and tags.`tuneflow.prefect_flow_run_id` != ''",
        order_by=["attributes.start_time DESC"],
        max_results=4 * n_runs,
        output_format="list",
    )
    parents = [r for r in parents if "mlflow.parentRunId" not in r.data.tags][:n_runs]
    print("| run | processes | train s (Trainer) | train stage s | steps | eval macro-F1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for parent in reversed(parents):
        (train,) = mlflow.search_runs(
            experiment_ids=[parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.mlflow.runName = 'train'",
            output_format="list",
        )
        m = train.data.metrics
        print(
            f"| {parent.info.run_name} | {int(m.get('train_processes', 1))} | {m['train_seconds']:.1f} | "
            f"{m['stage_seconds']:.1f} | {int(m['steps'])} | {parent.data.metrics['eval/macro_f1']:.4f} |"
        )


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["sms-spam"]), *(int(a) for a in sys.argv[2:3]))
