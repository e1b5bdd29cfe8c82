"""MLflow setup: the local sqlite store by default, a team server through MLFLOW_TRACKING_URI.

Nothing here runs at import time; the CLI and the flow call ``configure_tracking`` at their start.
The ``log_*`` functions record one stage's results in the active (stage) run and the parent run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneflow.data import LABEL, TEXT, LoadedData, Split, content_digest
from tuneflow.evaluate import Evaluation, plot_confusion, plot_training_loss
from tuneflow.files import slug
from tuneflow.models import resolve_base_model
from tuneflow.registry import ChampionScore, Decision, decision_tags
from tuneflow.registry_base import BASE_MODEL_TAG, CONFIG_DIGEST_TAG, FLOW_RUN_TAG, GIT_COMMIT_TAG, TAG
from tuneflow.tokenization import Tokenized, tokenizer_fingerprint

if TYPE_CHECKING:
    from tuneflow.config import PipelineConfig
    from tuneflow.landing import DataCheck
    from tuneflow.train_common import TrainResult
    from tuneflow.validation import ValidationReport

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"
DEFAULT_UI = "http://127.0.0.1:5000"


def local_store(root: Path | None = None) -> Path:
    return ((root or Path.cwd()) / STORE_DIR).resolve()


def configure_tracking(root: Path | None = None) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` if set, else at ``mlruns/mlflow.db`` under ``root`` (cwd).

    MLflow 3's plain-folder store is in maintenance mode, so the local default is a sqlite database
    with artifacts in ``mlruns/artifacts``.
    """
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        store = local_store(root)
        store.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@dataclass(frozen=True)
class RunContext:
    """Where a retrain's stages record and keep things: the MLflow parent run and the run's folders."""

    parent_run_id: str
    work_dir: Path  # scratch of this run (plots, Data Docs); removed after a successful run
    cache_root: Path  # derived data kept across runs (tokenized splits)
    # training checkpoints, under the run's fingerprint: a rerun of the same work after a crash resumes there
    checkpoint_dir: Path | None = None


def checkpoints_root(model_name: str) -> Path:
    """Where retrains of ``model_name`` keep checkpoints (one folder per fingerprint) until a run succeeds."""
    from tuneflow.runtime import cache_dir

    return cache_dir() / "checkpoints" / slug(model_name)


def sweep_after_register(work_dir: Path, model_name: str) -> None:
    """After a successful run: its scratch (plots and Data Docs are in MLflow now) and this model's checkpoints
    (also those of crashed runs on older data). Both stay after a failure."""
    import shutil

    shutil.rmtree(work_dir, ignore_errors=True)
    shutil.rmtree(checkpoints_root(model_name), ignore_errors=True)


def ensure_experiment(name: str) -> str:
    """Get or create the experiment; on the local sqlite store its artifacts go under ``mlruns/artifacts``."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        return exp.experiment_id
    location = None
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / "artifacts" / slug(name)).as_uri()
    exp_id = mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def ui_base_url() -> str:
    from tuneflow.runtime import redact_url

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return redact_url(uri).rstrip("/")  # links are printed, logged and put in artifacts: no credentials
    return os.environ.get("TUNEFLOW_MLFLOW_UI_URL", DEFAULT_UI).rstrip("/")


def run_url(experiment_id: str, run_id: str) -> str:
    return f"{ui_base_url()}/#/experiments/{experiment_id}/runs/{run_id}"


def model_url(name: str, version: str) -> str:
    return f"{ui_base_url()}/#/models/{name}/versions/{version}"


@contextmanager
def stage_run(parent_run_id: str, stage: str) -> Iterator[Any]:
    """A nested MLflow run for one stage; its wall time goes to the stage run and the parent run.

    The parent is passed explicitly because Prefect may run a task on another thread, and MLflow's
    active-run stack is per thread.
    """
    import mlflow

    start = time.perf_counter()
    with mlflow.start_run(
        run_name=stage, nested=True, parent_run_id=parent_run_id, tags={"tuneflow.stage": stage}
    ) as run:
        yield run
        seconds = time.perf_counter() - start
        mlflow.log_metric("stage_seconds", seconds)
        mlflow.MlflowClient().log_metric(parent_run_id, f"time/{stage}_seconds", seconds)


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


MAX_INPUT_TAG = 500  # MLflow 3 rejects a dataset input tag value longer than this (the whole run fails)


def _sources_tag(names: list[str]) -> str:
    """The source file names as JSON within MLflow's tag limit; a long list ends in "+N more".

    The names are relative to the dataset source (the accepted/ folder of a landing zone).
    """
    for keep in range(len(names), 0, -1):
        shown = names[:keep] + ([f"+{len(names) - keep} more"] if keep < len(names) else [])
        text = json.dumps(shown)
        if len(text) <= MAX_INPUT_TAG:
            return text
    return json.dumps([f"{len(names)} files"])


def log_dataset_inputs(cfg: PipelineConfig, loaded: LoadedData, split: Split) -> None:
    """Log the train and eval inputs to the active run with the full-content digest and source files.

    MLflow's own pandas digest hashes only the first 10,000 rows; tuneflow passes its own digest over
    every row, so a model version leads to exactly the data that trained it.
    """
    import mlflow

    sources = _sources_tag([p.name for p in loaded.sources] or [str(loaded.source)])
    for context, frame in (("training", split.train), ("evaluation", split.eval)):
        digest = content_digest(frame)
        with warnings.catch_warnings():
            # MLflow 3.17 registers its local-file source class twice ("file" and "local" schemes) and
            # warns on every resolution that a path "can be interpreted in multiple ways"; both are the
            # same class, so there is nothing for a user to act on.
            warnings.filterwarnings(
                "ignore", message="The specified dataset source can be interpreted in multiple ways"
            )
            ds = mlflow.data.from_pandas(
                frame[[TEXT, LABEL]],
                source=str(loaded.source),
                targets=LABEL,
                # MLflow caps a dataset digest at 36 characters; the full one is in the tags
                name=f"{cfg.name}-{'train' if context == 'training' else 'eval'}",
                digest=digest[:32],
            )
        mlflow.log_input(
            ds,
            context=context,
            tags={
                "rows": str(len(frame)),
                "tuneflow.data_digest": loaded.digest,
                "tuneflow.split_digest": digest,
                "tuneflow.sources": sources,
            },
        )


# the machine and process of a retrain (parent run): a later retrain there marks it KILLED if that process is gone
HOST_TAG, PID_TAG = "tuneflow.host", "tuneflow.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def end_dead_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs of ``experiment_id`` left RUNNING by a retrain process on this machine that is gone
    (kill -9, power loss), and their stage runs; returns their ids. Runs of other machines are left alone."""
    from mlflow import MlflowClient

    client, host = MlflowClient(), socket.gethostname()
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    dead = [
        r.info.run_id
        for r in running
        if r.data.tags.get(HOST_TAG) == host
        and r.data.tags.get(PID_TAG, "").isdigit()
        and int(r.data.tags[PID_TAG]) != os.getpid()
        and not _alive(int(r.data.tags[PID_TAG]))
    ]
    for r in running:
        if r.info.run_id in dead or r.data.tags.get("mlflow.parentRunId") in dead:
            client.set_terminated(r.info.run_id, status="KILLED")
            client.set_tag(r.info.run_id, "tuneflow.ended_by", "a later retrain: its process was gone")
    if dead:
        log.warning("marked %d run(s) KILLED whose retrain process is gone: %s", len(dead), ", ".join(dead))
    return dead


def start_parent_run(cfg: PipelineConfig, run_name: str, lineage: dict[str, str]) -> Any:
    """Open the retrain's parent run (a context manager) with its lineage tags; the config as params and JSON."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(cfg.name)
    if experiment is not None:
        end_dead_runs(experiment.experiment_id)  # a retrain killed earlier left its runs RUNNING
    owner = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    run = mlflow.start_run(run_name=run_name, tags={**lineage, **owner})
    mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.model_dump(mode="json")).items()})
    mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
    return run


CAUSE_TAG = "tuneflow.retrain_cause"  # why a retrain ran (e.g. the decay that triggered it); copied to the version


def run_lineage(config: PipelineConfig, flow_run_id: str = "", cause: str = "") -> dict[str, str]:
    """The lineage tags of a retrain's parent run (and later of its version)."""
    lineage = {
        CONFIG_DIGEST_TAG: config.digest(),
        GIT_COMMIT_TAG: git_commit(Path(__file__).resolve().parent),
        FLOW_RUN_TAG: flow_run_id,
        BASE_MODEL_TAG: config.model.base_model,
    }
    if cause:
        lineage[CAUSE_TAG] = cause[:5000]
    return lineage


def _log_report(report: ValidationReport, prefix: str) -> None:
    import mlflow

    mlflow.log_dict(report.to_json(), f"{prefix}/report.json")
    if report.docs_index:
        mlflow.log_artifacts(str(Path(report.docs_index).parent), f"{prefix}/data_docs")


def log_validation(check: DataCheck, parent_run_id: str) -> None:
    """Each batch's report (JSON + Data Docs), the verdict counts, and the ``tuneflow.validation`` tag."""
    import mlflow

    if check.gate is not None:
        for o in check.gate.outcomes:
            _log_report(o.report, f"validation/{o.status}/{o.path.name}")
        mlflow.log_metrics(
            {
                "validation/batches_accepted": len(check.gate.accepted),
                "validation/batches_quarantined": len(check.gate.quarantined),
            }
        )
    else:
        for report in check.reports:
            _log_report(report, "validation")
    mlflow.log_metrics(
        {
            "validation/checks_failed": sum(len(r.failed) for r in check.reports),
            "validation/warnings": sum(len(r.warnings) for r in check.reports),
        }
    )
    verdict = "passed" if check.error is None else "failed"
    mlflow.set_tag("tuneflow.validation", verdict)
    mlflow.MlflowClient().set_tag(parent_run_id, "tuneflow.validation", verdict)
    if check.data is not None:
        data = check.data
        mlflow.log_params(
            {
                "data.source": str(data.source),
                "data.rows": len(data.frame),
                "data.digest": data.digest,
                "data.files": len(data.sources),
            }
        )
        mlflow.log_metric("validation/rows_dropped", check.rows_dropped)
        mlflow.MlflowClient().set_tag(parent_run_id, "tuneflow.data_digest", data.digest)


def log_tokenization(tok: Tokenized, max_length: int, parent_run_id: str) -> None:
    import mlflow

    mlflow.log_params(
        {
            "tokenize.cache_key": tok.cache_key,
            "tokenize.cache_hit": tok.cache_hit,
            "tokenize.tokenizer": tokenizer_fingerprint(tok.tokenizer),
        }
    )
    mlflow.log_metrics(tok.stats(max_length))
    mlflow.MlflowClient().set_tag(parent_run_id, "tuneflow.tokenize_cache_hit", str(tok.cache_hit))


def log_training(cfg: PipelineConfig, result: TrainResult) -> None:
    import mlflow

    mlflow.log_params(
        {"base_model": cfg.model.base_model, "base_model_path": str(resolve_base_model(cfg.model.base_model))}
    )
    mlflow.log_metrics(
        {"train_seconds": result.train_seconds, "epochs_run": result.epochs_run, "steps": result.steps, **result.extra}
    )
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_training_loss(result.log_history, Path(tmp) / "training_loss.png")
        if png is not None:
            mlflow.log_artifact(str(png), "plots")


def log_metrics_batch(client: Any, run_id: str, metrics: dict[str, float]) -> None:
    """Metrics on another run than the active one, in batch calls (per-class metrics of hundreds of labels
    would otherwise be one request each)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):  # MLflow's limit per batch call
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_evaluation(evaluation: Evaluation, parent_run_id: str, plots_dir: Path) -> None:
    """Eval metrics (``eval/...``) and the confusion-matrix plot, on the stage run and the parent run."""
    import mlflow

    metrics = {f"eval/{k}": v for k, v in evaluation.metrics.items()}
    mlflow.log_metrics(metrics)
    client = mlflow.MlflowClient()
    log_metrics_batch(client, parent_run_id, metrics)
    if evaluation.confusion:
        png = plot_confusion(evaluation, plots_dir / "confusion_matrix.png")
        mlflow.log_artifact(str(png), "plots")
        client.log_artifact(parent_run_id, str(png), "plots")
        mlflow.log_dict({"labels": evaluation.labels, "matrix": evaluation.confusion}, "confusion_matrix.json")
    if evaluation.samples is not None:  # kind sft: prompt / reference / generation, browsable in the MLflow UI
        mlflow.log_table(evaluation.samples, "eval_generations.json")
        mlflow.log_table(evaluation.samples, "eval_generations.json", run_id=parent_run_id)


def log_champion_score(champion: ChampionScore, parent_run_id: str, plots_dir: Path) -> None:
    """The champion's metrics on this eval split (``champion/...``) and its confusion matrix, on the stage run;
    the metrics and ``tuneflow.champion_version`` on the parent run too."""
    import mlflow

    if champion.evaluation is None:
        return
    metrics = {f"champion/{k}": v for k, v in champion.evaluation.metrics.items()}
    mlflow.log_metrics(metrics)
    mlflow.set_tag("tuneflow.champion_version", champion.version)
    client = mlflow.MlflowClient()
    log_metrics_batch(client, parent_run_id, metrics)
    client.set_tag(parent_run_id, "tuneflow.champion_version", champion.version)
    if champion.evaluation.samples is not None:
        mlflow.log_table(champion.evaluation.samples, "champion_generations.json")
    if not champion.evaluation.confusion:
        return
    png = plot_confusion(
        champion.evaluation,
        plots_dir / "champion_confusion_matrix.png",
        f"Champion v{champion.version} on this eval split",
    )
    mlflow.log_artifact(str(png), "plots")


def log_decision(decision: Decision, version: str | None, parent_run_id: str) -> None:
    """The promotion decision (and the registered version) as tags of the stage run and the parent run."""
    import mlflow

    tags = decision_tags(decision) | ({f"{TAG}registered_version": version} if version is not None else {})
    mlflow.set_tags(tags)
    client = mlflow.MlflowClient()
    for k, v in tags.items():
        client.set_tag(parent_run_id, k, v)


def log_unchanged(version: str) -> None:
    """Tags of a retrain that found a version trained on exactly its data, config and base model."""
    import mlflow

    mlflow.set_tags({"tuneflow.outcome": "unchanged", "tuneflow.same_as_version": version})
