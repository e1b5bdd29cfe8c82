"""The settings search of ``tuneflow tune``: an Optuna study whose trials each fine-tune on the same validated,
split data, tracked as MLflow runs nested under the search's parent run.

Prefect-free: the tune flow (``tuneflow.flows.tune``) puts it between the retrain's stages (validate and split
before, champion scoring, decision, registration and promotion after). Optuna is imported inside the functions
here, and nothing that ``tuneflow run`` imports imports this module.

- Each trial's settings come from ``search.space`` (``suggest``) and are applied to the config as a whole
  (``with_settings``), so a trial trains exactly what a retrain with that config would.
- Each evaluation during training is reported to the study; the median pruner stops a trial that is worse than
  the median of earlier trials at the same evaluation (``pruning_callback`` raises ``optuna.TrialPruned``).
- A trial that raises is recorded FAIL (in the study and as a FAILED MLflow run) and the study goes on.
- The study lives in its own SQL database (``study_storage``): never MLflow's, as both keep an ``alembic_version``
  table (mlflow#3374, optuna#2866). ``load_if_exists`` resumes a study; trials record heartbeats, and one whose
  process died is failed and retried once by the next process that runs the study.
- Several processes may run trials of one study (``search.workers``; ``run_trials``): a process asks for a trial
  only while the study has fewer than ``search.trials`` (a trial's number decides which one is surplus when two
  ask at once), so the study ends with exactly its trials and no trial runs twice.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tuneflow.config import SEARCH_FIELDS, ConfigError, PipelineConfig, higher_is_better
from tuneflow.data import Split
from tuneflow.evaluate import Evaluation
from tuneflow.files import file_lock, slug
from tuneflow.kinds import get_kind
from tuneflow.models import check_max_length
from tuneflow.registry_base import STAGE_TAG, STUDY_STORAGE_TAG, STUDY_TAG, TRIAL_STATE_TAG, TRIAL_TAG, TUNED_FROM_TAG
from tuneflow.runtime import redact_url
from tuneflow.tokenization import Tokenized
from tuneflow.train_common import TrainResult

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

OPTUNA_DB = "optuna.db"
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")
ALL_LINEAR = "all-linear"


class SearchError(ConfigError):
    """A search that cannot start or gave nothing to use; the message names the setting and the fix (exit 2)."""


@dataclass(frozen=True)
class SearchPlan:
    """What one ``tuneflow tune`` call runs: checked before any training."""

    study_name: str
    storage: str  # SQLAlchemy URL of the study's own database
    trials: int  # trials of the study in all
    timeout_s: float
    finished: int  # trials the study had finished before this call
    workers: int = 1  # processes running trials of the study at once (search.workers)


@dataclass
class Trials:
    """What one process's trials of the study left: how many it ran, and its best model (kept in memory)."""

    ran: int = 0
    best: TrialModel | None = None
    best_value: float | None = None


@dataclass
class TrialModel:
    """The best trial of this call, kept in memory so that the gate needs no retraining."""

    number: int
    config: PipelineConfig
    tokenized: Tokenized
    trained: TrainResult
    evaluation: Evaluation


@dataclass
class SearchOutcome:
    study_name: str
    storage: str  # redacted: shown and tagged
    metric: str
    direction: str
    best_number: int
    best_value: float
    best_settings: dict[str, Any]  # search.space names -> config values
    best_config: PipelineConfig
    rows: list[dict[str, Any]]  # one per trial of the study: number, state, value, settings, seconds, run id
    ran: int  # trials run by this call (this process)
    best: TrialModel | None = None  # None: the best trial ran in an earlier call (its model is not here)
    plots: list[Path] = field(default_factory=list)
    plot_notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row["state"]] = out.get(row["state"], 0) + 1
        return out


# ---------------------------------------------------------------------------------------------- the space


def encode_choice(value: Any) -> Any:
    """A choice as Optuna stores it (None, bool, int, float or str): a module list becomes 'q_proj,v_proj'."""
    return ",".join(value) if isinstance(value, list) else value


def decode_choice(name: str, value: Any) -> Any:
    if name == "lora_target_modules" and value != ALL_LINEAR:
        return str(value).split(",")
    return value


def suggest(trial: optuna.Trial, cfg: PipelineConfig) -> dict[str, Any]:
    """Draw this trial's settings from ``search.space``: names of ``SEARCH_FIELDS`` -> config values."""
    assert cfg.search is not None
    space = cfg.search.space
    out: dict[str, Any] = {}
    for name in space.chosen():
        value = getattr(space, name)
        if isinstance(value, list):
            choice = trial.suggest_categorical(name, [encode_choice(v) for v in value])
            out[name] = decode_choice(name, choice)
        elif name == "epochs":
            out[name] = trial.suggest_int(name, value.low, value.high)
        else:
            out[name] = trial.suggest_float(name, value.low, value.high, log=name == "learning_rate")
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def with_settings(cfg: PipelineConfig, settings: dict[str, Any]) -> PipelineConfig:
    """``cfg`` with a trial's settings; validated as a whole (a batch size must still divide across processes)."""
    tree = cfg.model_dump(mode="json", exclude_unset=False)
    for name, value in settings.items():
        set_dotted(tree, SEARCH_FIELDS[name], value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValueError as exc:
        raise SearchError(f"the settings {settings} do not make a valid config: {exc}") from exc


def trial_config(cfg: PipelineConfig, settings: dict[str, Any]) -> PipelineConfig:
    """What a trial trains with: ``cfg`` with ``settings``, evaluating along the way so the pruner has values
    (kind sft evaluates only when ``sft.eval_steps`` is set: then every ``train.logging_steps`` steps)."""
    trial = with_settings(cfg, settings)
    if trial.sft.eval_steps is None:
        trial.sft.eval_steps = trial.train.logging_steps
    return trial


# ---------------------------------------------------------------------------------------------- storage, checks


SERVER_SCHEMES = ("http", "https", "databricks", "file", "mlflow-artifacts")
STUDY_DATABASE = "optuna"  # the study's database beside MLflow's on the same SQL server


def study_storage(cfg: PipelineConfig, tracking_uri: str, workers: int = 1) -> str:
    """The study database: ``search.storage``; else beside MLflow's store: ``optuna.db`` next to a sqlite file, the
    database ``optuna`` on the same server when MLflow's store is a database URL (``postgresql://.../mlflow``).
    Behind an MLflow HTTP server (team mode) tuneflow cannot see MLflow's database: one process keeps the study in
    this machine's ``mlruns/optuna.db``; several workers need ``search.storage``.

    Raises:
        SearchError: it is MLflow's own database (both keep an ``alembic_version`` table), or several workers would
            each have their own sqlite file.
    """
    assert cfg.search is not None
    scheme = tracking_uri.split("://", 1)[0].lower() if "://" in tracking_uri else "file"
    if cfg.search.storage:
        url = cfg.search.storage
    elif scheme == "sqlite":
        url = f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / OPTUNA_DB}"
    elif scheme not in SERVER_SCHEMES:  # MLflow's store is a SQL database: a sibling on the same server
        from sqlalchemy.engine import make_url

        url = make_url(tracking_uri).set(database=STUDY_DATABASE).render_as_string(hide_password=False)
    elif workers > 1:
        raise SearchError(
            f"search.workers is {workers}, but MLflow is a server ({redact_url(tracking_uri)}) whose database tuneflow "
            "cannot see, so the study would be a sqlite file on each worker's machine. Fix: set search.storage to "
            "a database every worker reaches, of its own on the same PostgreSQL server as MLflow's, e.g. "
            "postgresql+psycopg://tuneflow@db.internal:5432/optuna (password from PGPASSWORD or ~/.pgpass; "
            "tuneflow creates the database if it is missing), or set search.workers to 1"
        )
    else:  # one process: the study stays on this machine
        from tuneflow.tracking import local_store

        local_store().mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{local_store() / OPTUNA_DB}"
    if url.rstrip("/") == tracking_uri.rstrip("/"):
        raise SearchError(
            f"search.storage {redact_url(url)!r} is MLflow's own database; Optuna and MLflow both keep an "
            "alembic_version table and must not share one. Fix: point search.storage at another database "
            "(e.g. sqlite:///mlruns/optuna.db, or a database of its own on the same PostgreSQL server)"
        )
    return url


def ensure_database(url: str) -> None:
    """Create the study's PostgreSQL database when it does not exist yet (on the same server as MLflow's, the user
    needs the CREATEDB right); other URLs are left to Optuna (a sqlite file is created by itself).

    Raises:
        SearchError: the server cannot be reached, or the database is missing and cannot be created; names the URL
            (without its password) and the fix.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql") or not parsed.database:
        return
    shown = redact_url(url)
    engine = create_engine(parsed, pool_pre_ping=False)
    try:
        with engine.connect():
            return
    except DBAPIError as exc:
        if "does not exist" not in str(exc.orig):
            raise SearchError(
                f"cannot reach the study database {shown}: {str(exc.orig).strip()[:300]}. Fix: check the host, port, "
                "user and password of search.storage (the password from PGPASSWORD or ~/.pgpass), and that the "
                "PostgreSQL server accepts connections from this machine"
            ) from exc
    finally:
        engine.dispose()
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = parsed.database.replace('"', '""')
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        log.info("created the study database %s", shown)
    except DBAPIError as exc:
        if "already exists" in str(exc.orig):  # another worker created it meanwhile
            return
        raise SearchError(
            f"the study database {shown} does not exist and could not be created: {str(exc.orig).strip()[:300]}. "
            f"Fix: create it once on the server (createdb -h {parsed.host or 'localhost'} -p {parsed.port or 5432} "
            f"-U {parsed.username or 'postgres'} {parsed.database}), give the user the right to "
            f"(ALTER ROLE {parsed.username or '<user>'} CREATEDB), or point search.storage at an existing database"
        ) from exc
    finally:
        admin.dispose()


def setup_lock(url: str):
    """A machine-wide lock per study database (a sqlite file: beside it; else in the temp folder), held while its
    tables or a study and its enqueued trials are set up, not while trials run. Workers on other machines (team
    mode) start after the database exists."""
    import hashlib
    import tempfile

    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = db.with_name(f"{db.name}.lock")
    else:
        lock = Path(tempfile.gettempdir()) / f"tuneflow-optuna-{hashlib.sha256(url.encode()).hexdigest()[:16]}.lock"
    return file_lock(lock, timeout_s=600, what="another process setting up the study database")


def rdb_storage(url: str, heartbeat_seconds: int | None = None) -> optuna.storages.RDBStorage:
    """The study database, its tables created under a machine-wide lock: two workers opening a new database at once
    both ran Optuna's schema setup and one failed (sqlite: UNIQUE constraint failed: alembic_version.version_num).

    ``heartbeat_seconds``: running trials record heartbeats; one silent for twice as long is failed and retried once.
    """
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # ExperimentalWarning (optuna 5.1) for heartbeats and their retry callback
    with setup_lock(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        heartbeat: dict[str, Any] = {}
        if heartbeat_seconds is not None:
            heartbeat = {
                "heartbeat_interval": heartbeat_seconds,
                "grace_period": 2 * heartbeat_seconds,
                "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1),
            }
        return RDBStorage(url, **heartbeat)


def study_progress(storage: str, study_name: str) -> tuple[int, float | None]:
    """An existing study's finished trials, and the median minutes of its completed or pruned ones (None: none)."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=rdb_storage(storage))
    except KeyError:
        return 0, None
    trials = study.get_trials(deepcopy=False)
    done = [
        t.duration.total_seconds() / 60
        for t in trials
        if t.state.name in ("COMPLETE", "PRUNED") and t.duration is not None
    ]
    return finished_count(trials), (statistics.median(done) if done else None)


SURPLUS = "surplus"  # user attr of a trial asked for when the study already had its trials: it never ran


def counted(trials: list[Any]) -> list[Any]:
    """The trials that count towards ``search.trials``, whatever their state: not a trial failed for a stale
    heartbeat (its worker died) and queued again (its retry counts instead), not a surplus trial."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return [t for t in trials if t.number not in retried and SURPLUS not in t.user_attrs]


def finished_count(trials: list[Any]) -> int:
    """Finished trials that count towards ``search.trials`` (``counted``): a dead worker's trial does not, its retry
    does once it finishes."""
    return sum(t.state.name in FINISHED_STATES for t in counted(trials))


def is_surplus(trials: list[Any], trial_number: int, wanted: int) -> bool:
    """Whether a new trial (not a retry) is past the study's ``wanted`` trials: two workers that asked for a trial
    at once when one was left both got one; the lower number runs, the other is surplus. Decided by trial numbers,
    which the database hands out once each, so every worker comes to the same answer."""
    me = next(t for t in trials if t.number == trial_number)
    if "failed_trial" in me.system_attrs:  # a retry stands for a counted trial
        return False
    return sum(t.number < trial_number for t in counted(trials)) >= wanted


def wants_trial(trials: list[Any], wanted: int) -> bool:
    """A process should ask for a trial: one is queued (enqueued settings, a dead worker's retry), or fewer than
    ``wanted`` trials are counted (finished, running or queued)."""
    return any(t.state.name == "WAITING" for t in trials) or len(counted(trials)) < wanted


def check_search(
    cfg: PipelineConfig,
    tracking_uri: str,
    trials: int | None = None,
    timeout_minutes: float | None = None,
    workers: int | None = None,
) -> SearchPlan:
    """Everything that can be checked before any training: a search section with something to search, every
    candidate base model found (and long enough for model.max_length), a separate study database, and a budget
    that fits one trial (the median of the study's finished trials, else ``search.min_trial_minutes``).

    Raises:
        SearchError: the setting and the fix. ModelError: a candidate base model cannot be found.
    """
    search = cfg.search
    if search is None:
        raise SearchError(
            "the config has no search section: nothing to search. Fix: add e.g.\n"
            "search:\n  trials: 12\n  space:\n    learning_rate: {low: 1.0e-5, high: 1.0e-4}\n    batch_size: [16, 32]"
        )
    if not search.space.chosen():
        raise SearchError(
            "search.space sets nothing to search. Fix: add a setting to search.space, e.g. "
            "learning_rate: {low: 1.0e-5, high: 1.0e-4}"
        )
    trials = search.trials if trials is None else trials
    if trials < 1:
        raise SearchError(f"--trials is {trials}: a search runs at least one trial. Fix: pass --trials 1 or more")
    timeout = search.timeout_minutes if timeout_minutes is None else timeout_minutes
    if not (timeout > 0 and math.isfinite(timeout)):
        raise SearchError(f"--timeout is {timeout} minutes. Fix: pass a time budget above 0 minutes")
    workers = search.workers if workers is None else workers
    if workers < 1:
        raise SearchError(f"--workers is {workers}: trials need at least one process. Fix: pass --workers 1 or more")
    for spec in search.space.base_models or []:
        check_max_length(cfg.model.model_copy(update={"base_model": spec}))  # resolves it: ModelError if missing
    storage = study_storage(cfg, tracking_uri, workers)
    ensure_database(storage)
    study_name = search.study_name or cfg.name
    finished, measured = study_progress(storage, study_name)
    need = measured if measured is not None else search.min_trial_minutes
    if timeout < need:
        where = (
            f"the median of the {finished} finished trial(s) of study {study_name!r}"
            if measured is not None
            else "search.min_trial_minutes"
        )
        raise SearchError(
            f"the time budget is {timeout:g} minutes, but one trial takes about {need:.2f} minutes ({where}): the "
            f"search could not finish one trial. Fix: raise --timeout / search.timeout_minutes to at least "
            f"{math.ceil(need * 10) / 10:g}, or shrink the trials (fewer epochs, a smaller space)"
        )
    if finished >= trials:
        log.info("study %s already has %d finished trials (of %d): no new trial runs", study_name, finished, trials)
    return SearchPlan(study_name, storage, trials, timeout * 60, finished, workers)


def per_trial_seed(sampler_class: type, seed: int) -> optuna.samplers.BaseSampler:
    """``sampler_class`` whose random state is seeded from (``seed``, trial number) before each trial.

    With one seed for the whole sampler, every worker process draws the same random sequence: on the team stack two
    workers ran trials with identical settings during TPE's random startup trials. Seeded per trial, each trial draws
    from its own sequence, and a trial draws the same settings whichever worker runs it (given the same study).
    """

    class PerTrialSeed(sampler_class):
        def before_trial(self, study: optuna.Study, trial: Any) -> None:
            trial_seed = (seed * 1_000_003 + trial.number) % 2**32
            # optuna 5.1 keeps the state in LazyRandomState ``_rng`` (TPE: also its RandomSampler's, for startup trials)
            self._rng.rng.seed(trial_seed)
            inner = getattr(self, "_random_sampler", None)
            if inner is not None:
                inner._rng.rng.seed(trial_seed)
            super().before_trial(study, trial)

    PerTrialSeed.__name__ = PerTrialSeed.__qualname__ = f"PerTrialSeed{sampler_class.__name__}"
    return PerTrialSeed(seed=seed)


def open_study(cfg: PipelineConfig, plan: SearchPlan) -> optuna.Study:
    """Create the study, or load it when it exists (a resumed search); the enqueued trials once."""
    import optuna

    assert cfg.search is not None
    search = cfg.search
    storage = rdb_storage(plan.storage, search.heartbeat_seconds)
    sampler = per_trial_seed(
        optuna.samplers.TPESampler if search.sampler == "tpe" else optuna.samplers.RandomSampler, search.seed
    )
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=search.pruner.startup_trials, n_warmup_steps=search.pruner.warmup_evaluations
    )
    with setup_lock(plan.storage):  # two workers starting together: one creates, one loads; each trial queued once
        study = optuna.create_study(
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            study_name=plan.study_name,
            direction="maximize" if higher_is_better(cfg.evaluate.primary_metric) else "minimize",
            load_if_exists=True,
        )
        for settings in search.enqueue:
            study.enqueue_trial({k: encode_choice(v) for k, v in settings.items()}, skip_if_exists=True)
    return study


# ---------------------------------------------------------------------------------------------- trials


def trainer_value(metric: str, logs: dict[str, float]) -> float | None:
    """The primary metric in a Trainer evaluation's logs (``eval_<metric>``); perplexity from the eval loss;
    None when the evaluation does not give it (chrF is computed only by the evaluate stage)."""
    key = metric if metric.startswith("eval_") else f"eval_{metric}"  # eval_loss is logged as it is
    if key in logs:
        return float(logs[key])
    if metric == "perplexity" and "eval_loss" in logs:
        return math.exp(min(float(logs["eval_loss"]), 50.0))
    return None


def pruning_callback(trial: optuna.Trial, metric: str):
    """A ``TrainerCallback`` that reports each evaluation's ``metric`` to the study (step = the evaluation's number,
    1, 2, ...: the same for every trial whatever its batch size) and stops the trial when the pruner says so."""
    import optuna
    from transformers import TrainerCallback

    class Pruning(TrainerCallback):
        def __init__(self) -> None:
            self.evaluations = 0

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = trainer_value(metric, metrics or {})
            if value is None or not math.isfinite(value):
                return
            self.evaluations += 1
            trial.report(value, self.evaluations)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"{metric} {value:.4f} at evaluation {self.evaluations} (step {state.global_step}) is worse than "
                    "the median of the earlier trials there"
                )

    return Pruning()


def _better(value: float, than: float | None, maximize: bool) -> bool:
    return than is None or (value > than if maximize else value < than)


class _Surplus(Exception):  # noqa: N818 - not an error: a trial the study did not need
    """Raised in a surplus trial before it does anything: Optuna records it FAIL; ``counted`` leaves it out."""


def run_trials(
    cfg: PipelineConfig,
    split: Split,
    tokenize: Callable[[PipelineConfig], Tokenized],
    plan: SearchPlan,
    parent_run_id: str,
    work_dir: Path,
    take_over: bool = True,
    tags: dict[str, str] | None = None,
) -> Trials:
    """Run trials of the study until it has ``plan.trials`` (other processes may run trials of it meanwhile); no new
    trial starts after ``plan.timeout_s`` (the first one always does).

    Args:
        cfg: the pipeline config with its search section.
        split: the validated data's train/eval split; every trial trains and is scored on it.
        tokenize: the split tokenized for a trial's config (the caller caches it per base model).
        plan: from ``check_search``.
        parent_run_id: the MLflow run every trial's run is nested under.
        work_dir: scratch for the trials' checkpoints (each removed when its trial ends).
        take_over: then wait for the trials other processes are running, and run again a trial whose process died
            (its heartbeat stops; after twice ``search.heartbeat_seconds`` it is failed and queued once more): what
            the process that reports the study does; a tune-worker stops when there is nothing left to ask for.
        tags: more tags on each trial's MLflow run (e.g. the Prefect flow run that ran it).
    """
    import mlflow
    import optuna

    study = open_study(cfg, plan)
    metric = cfg.evaluate.primary_metric
    maximize = higher_is_better(metric)
    kept = Trials()

    def objective(trial: optuna.Trial) -> float:
        if is_surplus(study.get_trials(deepcopy=False), trial.number, plan.trials):
            trial.set_user_attr(SURPLUS, True)
            raise _Surplus(
                f"trial {trial.number}: the study already has its {plan.trials} trials (another worker asked for one "
                "at the same moment); not run"
            )
        kept.ran += 1  # trials of this process (other workers may run trials of the study meanwhile)
        settings = suggest(trial, cfg)
        tcfg = trial_config(cfg, settings)
        started = time.perf_counter()
        run_tags = {**(tags or {}), STAGE_TAG: "trial", STUDY_TAG: plan.study_name, TRIAL_TAG: str(trial.number)}
        pruned: optuna.TrialPruned | None = None
        folder = work_dir / f"trial-{trial.number}"
        with mlflow.start_run(
            run_name=f"trial-{trial.number}", nested=True, parent_run_id=parent_run_id, tags=run_tags
        ) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params({f"search.{k}": json.dumps(v) for k, v in settings.items()})
            try:
                tokenized = tokenize(tcfg)
                kind = get_kind(tcfg.kind)
                trained = kind.train(
                    tcfg, tokenized.tokenizer, tokenized.datasets, folder, (pruning_callback(trial, metric),)
                )
                evaluation = kind.evaluate(trained.model, tokenized.tokenizer, split.eval, tcfg, tcfg.model.max_length)
            except optuna.TrialPruned as exc:
                pruned = exc
                mlflow.set_tag(TRIAL_STATE_TAG, "PRUNED")
            except Exception as exc:
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
                mlflow.set_tag(TRIAL_STATE_TAG, "FAIL")
                raise  # the run ends FAILED; optimize(catch=...) records the trial FAIL and goes on
            finally:
                shutil.rmtree(folder, ignore_errors=True)
                mlflow.log_metric("trial_seconds", time.perf_counter() - started)
            if pruned is None:
                value = float(evaluation.metrics[metric])
                mlflow.log_metrics({f"eval/{k}": float(v) for k, v in evaluation.metrics.items() if _finite(v)})
                mlflow.log_metric("train_seconds", trained.train_seconds)
                mlflow.set_tag(TRIAL_STATE_TAG, "COMPLETE")
        if pruned is not None:
            raise pruned
        log.info("trial %d: %s %.4f with %s", trial.number, metric, value, settings)
        if _better(value, kept.best_value, maximize) and math.isfinite(value):
            kept.best = TrialModel(trial.number, tcfg, tokenized, trained, evaluation)
            kept.best_value = value
        return value

    started = time.perf_counter()
    deadline = time.monotonic() + plan.timeout_s
    first = True
    poll_s = min(2.0, cfg.search.heartbeat_seconds / 2) if cfg.search else 2.0
    while True:
        trials = study.get_trials(deepcopy=False)
        if wants_trial(trials, plan.trials) and (first or time.monotonic() < deadline):
            # one trial per call: whether to ask for another is decided on the study as it is then, not on a count
            # this process kept (Optuna's n_trials), so several workers together stop at plan.trials
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            first = False
        elif take_over and any(t.state.name == "RUNNING" for t in trials):
            # trials of other workers: wait for them; one whose worker died goes stale and is queued again
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            time.sleep(poll_s)
        else:
            break
    log.info("study %s: %d trial(s) here in %.0f s", plan.study_name, kept.ran, time.perf_counter() - started)
    return kept


def search_outcome(cfg: PipelineConfig, plan: SearchPlan, *parts: Trials) -> SearchOutcome:
    """The study as it stands: its trials' table, the best trial and its settings (with its model when one of
    ``parts``, this process's trials, ran it).

    Raises:
        SearchError: no trial of the study completed (the first failures are quoted).
    """
    import optuna

    study = optuna.load_study(study_name=plan.study_name, storage=rdb_storage(plan.storage))
    metric = cfg.evaluate.primary_metric
    rows = study_rows(study)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if not complete:
        failures = "; ".join(f"trial {r['number']}: {r['error']}" for r in rows if r.get("error"))[:1500]
        raise SearchError(
            f"no trial of study {plan.study_name!r} completed ({len(rows)} trial(s): "
            f"{', '.join(f'{n} {s}' for s, n in _count(rows).items()) or 'none'}). "
            + (f"Failures: {failures}. " if failures else "")
            + "Fix: look at the failed trials' runs in MLflow; widen the space or raise the budget"
        )
    best = study.best_trial
    settings = {name: decode_choice(name, value) for name, value in best.params.items()}
    model = next((p.best for p in parts if p.best is not None and p.best.number == best.number), None)
    return SearchOutcome(
        study_name=plan.study_name,
        storage=redact_url(plan.storage),
        metric=metric,
        direction="maximize" if higher_is_better(metric) else "minimize",
        best_number=best.number,
        best_value=float(best.value),
        best_settings=settings,
        best_config=with_settings(cfg, settings),
        rows=rows,
        ran=sum(p.ran for p in parts),
        best=model,
    )


def run_search(
    cfg: PipelineConfig,
    split: Split,
    tokenize: Callable[[PipelineConfig], Tokenized],
    plan: SearchPlan,
    parent_run_id: str,
    work_dir: Path,
) -> SearchOutcome:
    """Run the study's remaining trials (``plan.trials`` in all) within ``plan.timeout_s`` and report it
    (``run_trials`` then ``search_outcome``).

    Raises:
        SearchError: no trial of the study completed (the first failures are quoted).
    """
    return search_outcome(cfg, plan, run_trials(cfg, split, tokenize, plan, parent_run_id, work_dir))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _count(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["state"]] = out.get(r["state"], 0) + 1
    return out


def study_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, its settings, seconds, MLflow run id, error (a failed one)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if SURPLUS in t.user_attrs:  # asked for when the study had its trials: never ran
            continue
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "seconds": round(t.duration.total_seconds(), 1) if t.duration is not None else None,
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""),
            "settings": {k: decode_choice(k, v) for k, v in t.params.items()},
        }
        if t.state.name == "PRUNED" and t.intermediate_values:
            row["pruned_at_evaluation"] = max(t.intermediate_values)
        if "error" in t.user_attrs:
            row["error"] = t.user_attrs["error"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- results


def study_plots(cfg: PipelineConfig, plan: SearchPlan, folder: Path) -> tuple[list[Path], list[str]]:
    """Optuna's optimisation history and parameter importances as PNG (matplotlib), and why one is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    study = optuna.load_study(study_name=plan.study_name, storage=rdb_storage(plan.storage))
    folder.mkdir(parents=True, exist_ok=True)
    paths, notes = [], []
    for name, draw in (("optimization_history", ovm.plot_optimization_history), ("importances", _importances(ovm))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning: the matplotlib backend is "experimental"
            try:
                ax = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                notes.append(f"{name}: not drawn ({exc})")
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7, 4)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths, notes


def _importances(ovm: Any) -> Callable[[Any], Any]:
    def draw(study: Any) -> Any:
        complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        varied = {k for t in complete for k in t.params if len({json.dumps(u.params.get(k)) for u in complete}) > 1}
        if len(complete) < 2 or not varied:
            raise ValueError("needs two completed trials whose settings differ")
        return ovm.plot_param_importances(study)

    return draw


def log_search(outcome: SearchOutcome, parent_run_id: str) -> None:
    """The study on the parent run: its table (``search/trials.json``), plots, best trial and value, tags."""
    import mlflow
    import pandas as pd

    client = mlflow.MlflowClient()
    table = pd.DataFrame(
        [
            {
                **{k: v for k, v in r.items() if k != "settings"},
                **{f"search.{k}": json.dumps(v) for k, v in r["settings"].items()},
            }
            for r in outcome.rows
        ]
    )
    client.log_table(parent_run_id, table, "search/trials.json")
    for path in outcome.plots:
        client.log_artifact(parent_run_id, str(path), "search")
    for k, v in {
        STUDY_TAG: outcome.study_name,
        STUDY_STORAGE_TAG: outcome.storage,
        TUNED_FROM_TAG: str(outcome.best_number),
    }.items():
        client.set_tag(parent_run_id, k, v)
    counts = outcome.counts()
    metrics = {f"search/{state.lower()}_trials": float(n) for state, n in counts.items()}
    metrics |= {"search/best_value": outcome.best_value, "search/best_trial": float(outcome.best_number)}
    client.log_batch(parent_run_id, metrics=_metrics(metrics))
    client.log_dict(parent_run_id, {"settings": outcome.best_settings}, "search/best_settings.json")


def _metrics(values: dict[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, 0) for k, v in values.items()]


def tuned_config_path(config_path: Path, cfg: PipelineConfig) -> Path:
    """``<folder of the config>/<name>.tuned.yaml``."""
    return config_path.parent / f"{slug(cfg.name)}.tuned.yaml"


def tuned_config_text(config_path: Path, outcome: SearchOutcome) -> str:
    """The config file as written, with the best trial's settings and without the search section, under a
    comment naming the study and the trial (YAML comments of the original are not kept)."""
    raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    raw.pop("search", None)
    for name, value in outcome.best_settings.items():
        set_dotted(raw, SEARCH_FIELDS[name], value)
    header = (
        f"# Tuned by `tuneflow tune --config {config_path}`: study {outcome.study_name!r} ({outcome.storage}),\n"
        f"# trial {outcome.best_number}, {outcome.metric} {outcome.best_value:.4f} on the eval split.\n"
        f"# Settings found: {json.dumps(outcome.best_settings)}\n"
        "# Everything else as in that file, without its search section. Use: tuneflow run --config <this file>\n"
    )
    return header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def write_tuned_config(config_path: Path, cfg: PipelineConfig, outcome: SearchOutcome) -> Path:
    """Write the tuned config next to ``config_path`` (through a temporary file and a rename)."""
    path = tuned_config_path(config_path, cfg)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tuned_config_text(config_path, outcome), encoding="utf-8")
    tmp.replace(path)
    return path


__all__ = [
    "SearchError",
    "SearchOutcome",
    "SearchPlan",
    "TrialModel",
    "Trials",
    "check_search",
    "log_search",
    "run_search",
    "run_trials",
    "search_outcome",
    "study_plots",
    "study_storage",
    "write_tuned_config",
]
