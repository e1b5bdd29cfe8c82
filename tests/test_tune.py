"""tuneflow tune: the search section's checks (exit 2 before any training), the study on tiny models (trials nested
under the parent run, pruning, a crashing trial, resuming), and the tune flow end to end through the gate."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow import MlflowClient

from tuneflow.config import PipelineConfig, load_config
from tuneflow.data import read_table, split_data
from tuneflow.search import SearchError, check_search, open_study, run_search, study_storage
from tuneflow.tokenization import tokenize_data

from conftest import tiny_config_dict

# 4 epochs: the tiny model separates the classes by its 2nd or 3rd (at 2 it often still predicts one class)
FAST = {"epochs": 4, "early_stopping_patience": 0, "learning_rate": 5e-3}


def _cfg(data_csv: Path, model_dir: Path, search: dict, **sections) -> PipelineConfig:
    sections["train"] = {**FAST, **sections.get("train", {})}
    return PipelineConfig.model_validate(tiny_config_dict(data_csv, model_dir, search=search, **sections))


def _search(cfg: PipelineConfig, workdir: Path, trials: int | None = None, timeout: float | None = None):
    """run_search as the flow runs it (validated file, one split, tokenized per base model), under a parent run."""
    plan = check_search(cfg, mlflow.get_tracking_uri(), trials, timeout)
    data = read_table(cfg.data)
    split = split_data(data, cfg.data)
    cache: dict = {}

    def tokenize(c: PipelineConfig):
        return cache.setdefault(c.model.base_model, tokenize_data(c, data, split, workdir / ".cache"))

    with mlflow.start_run(run_name="tune-test") as parent:
        outcome = run_search(cfg, split, tokenize, plan, parent.info.run_id, workdir / "work")
    return outcome, parent.info.run_id


def _children(parent_id: str) -> list:
    exp = MlflowClient().get_run(parent_id).info.experiment_id
    return mlflow.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list")


# ------------------------------------------------------------------------------------------- checks, before training


def _write(workdir: Path, cfg: dict) -> Path:
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ({"space": {"learning_rate": {"low": 1e-3, "high": 1e-5}}}, "an inverted range"),
        ({"space": {"epochs": {"low": 2, "high": 2}}}, "an empty range"),
        ({"space": {"batch_size": []}}, "an empty list"),
        ({"space": {"lora_r": [8, 16]}}, "which kind 'classification' does not have"),
        ({"space": {"base_models": ["/no/such/model"]}}, "is not a model folder"),
        ({"space": {"learning_rate": {"low": 1e-4, "high": 1e-2}}, "timeout_minutes": 0.5}, "could not finish one"),
        ({"space": {}}, "sets nothing to search"),
        (None, "has no search section"),
    ],
)
def test_bad_search_settings_exit_2_with_the_fix_before_any_training(
    workdir, data_csv, tiny_model_dir, capsys, search, expected
):
    from tuneflow.cli import main

    cfg = tiny_config_dict(data_csv, tiny_model_dir)
    if search is not None:
        cfg["search"] = search
    assert main(["tune", "--config", str(_write(workdir, cfg))]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Fix:" in err, err
    assert not (workdir / "mlruns" / "optuna.db").exists() or search is not None  # no study made for a bad config
    assert not list(workdir.glob("*.tuned.yaml"))


def test_the_study_never_shares_mlflows_database(workdir, data_csv, tiny_model_dir):
    cfg = _cfg(data_csv, tiny_model_dir, {"space": {"batch_size": [8, 16]}})
    uri = mlflow.get_tracking_uri()
    assert study_storage(cfg, uri) == f"sqlite:///{workdir / 'mlruns' / 'optuna.db'}"  # next to mlflow.db
    same = cfg.model_copy(update={"search": cfg.search.model_copy(update={"storage": uri})})
    with pytest.raises(SearchError, match="alembic_version"):
        study_storage(same, uri)


def test_zero_trials_from_the_command_line_exit_2(workdir, data_csv, tiny_model_dir, capsys):
    from tuneflow.cli import main

    cfg = tiny_config_dict(data_csv, tiny_model_dir, search={"space": {"batch_size": [8, 16]}})
    assert main(["tune", "--config", str(_write(workdir, cfg)), "--trials", "0"]) == 2
    assert "at least one trial" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the study


def test_three_trials_run_each_a_run_nested_under_the_parent(workdir, data_csv, tiny_model_dir):
    search = {"trials": 3, "space": {"learning_rate": {"low": 1e-3, "high": 1e-2}, "batch_size": [16, 32]}}
    cfg = _cfg(data_csv, tiny_model_dir, search)
    outcome, parent = _search(cfg, workdir)

    assert [r["number"] for r in outcome.rows] == [0, 1, 2] and outcome.ran == 3
    assert all(r["state"] in ("COMPLETE", "PRUNED") for r in outcome.rows)
    best = max((r for r in outcome.rows if r["state"] == "COMPLETE"), key=lambda r: r["value"])
    assert outcome.best_number == best["number"] and outcome.best_value == best["value"]
    assert outcome.best is not None and outcome.best.number == best["number"]  # the best model kept for the gate
    assert outcome.best_config.train.batch_size == best["settings"]["batch_size"]
    assert 1e-3 <= outcome.best_config.train.learning_rate <= 1e-2

    runs = {r.data.tags["tuneflow.trial"]: r for r in _children(parent)}
    assert sorted(runs) == ["0", "1", "2"]  # each trial a run nested under the parent, none lost its parent
    for row in outcome.rows:
        run = runs[str(row["number"])]
        assert run.data.tags["mlflow.parentRunId"] == parent and row["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["tuneflow.trial_state"] == row["state"]
        assert run.data.params["search.batch_size"] == str(row["settings"]["batch_size"])
        assert run.data.metrics["trial_seconds"] > 0
        assert len(MlflowClient().get_metric_history(run.info.run_id, "train/loss")) >= 1  # the curve
    done = runs[str(best["number"])]
    assert done.data.metrics["eval/macro_f1"] == pytest.approx(best["value"])
    assert (
        optuna.load_study(study_name="tiny", storage=study_storage(cfg, mlflow.get_tracking_uri())).best_trial.number
        == best["number"]
    )


def test_a_poor_trial_is_pruned_at_an_evaluation(workdir, data_csv, tiny_model_dir):
    # the first trial learns (lr 5e-3); the second hardly moves its weights (lr 1e-7): at the first evaluation it is
    # worse than the median of the finished trials there, so the median pruner stops it before its last epoch
    search = {
        "trials": 2,
        "space": {"learning_rate": {"low": 1e-8, "high": 1e-2}},
        "enqueue": [{"learning_rate": 5e-3}, {"learning_rate": 1e-7}],
        "pruner": {"startup_trials": 1},
    }
    cfg = _cfg(data_csv, tiny_model_dir, search)
    outcome, parent = _search(cfg, workdir)

    states = {r["number"]: r for r in outcome.rows}
    assert states[0]["state"] == "COMPLETE" and states[1]["state"] == "PRUNED", outcome.rows
    assert states[1]["pruned_at_evaluation"] < 4  # stopped before its last epoch's evaluation
    run = next(r for r in _children(parent) if r.data.tags["tuneflow.trial"] == "1")
    assert run.data.tags["tuneflow.trial_state"] == "PRUNED" and run.info.status == "FINISHED"
    assert outcome.best_number == 0


def test_a_crashing_trial_is_recorded_failed_and_the_study_goes_on(workdir, data_csv, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken-model"  # found, its tokenizer loads, its weights do not
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    search = {
        "trials": 2,
        "space": {"base_models": [str(broken), str(tiny_model_dir)]},
        "enqueue": [{"base_models": str(broken)}, {"base_models": str(tiny_model_dir)}],
    }
    cfg = _cfg(data_csv, tiny_model_dir, search)
    outcome, parent = _search(cfg, workdir)

    states = {r["number"]: r for r in outcome.rows}
    assert states[0]["state"] == "FAIL", outcome.rows
    assert states[0]["error"].startswith("SafetensorError"), states[0]["error"]  # why, kept in the study
    assert states[1]["state"] == "COMPLETE" and outcome.best_number == 1
    assert outcome.best_config.model.base_model == str(tiny_model_dir)
    failed = next(r for r in _children(parent) if r.data.tags["tuneflow.trial"] == "0")
    assert failed.info.status == "FAILED" and failed.data.tags["tuneflow.trial_state"] == "FAIL"


# study.ask() below stands in for a worker's trial; optuna warns that heartbeats are meant for Study.optimize
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_an_interrupted_study_resumes_with_its_trials(workdir, data_csv, tiny_model_dir):
    search = {
        "trials": 3,
        "space": {"learning_rate": {"low": 1e-3, "high": 1e-2}},
        "min_trial_minutes": 0.001,
        "heartbeat_seconds": 1,
    }
    cfg = _cfg(data_csv, tiny_model_dir, search)
    # a budget that runs out during the first trial: the search stops after it (as a stopped search would)
    first, _ = _search(cfg, workdir, timeout=0.001)
    assert [r["state"] for r in first.rows] == ["COMPLETE"] and first.ran == 1
    kept = first.rows[0]

    # a worker that died in the middle of a trial: its trial RUNNING, its heartbeat stopped
    plan = check_search(cfg, mlflow.get_tracking_uri())
    study = open_study(cfg, plan)
    dead = study.ask()
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)  # past the grace period (2 x heartbeat_seconds)

    second, _ = _search(cfg, workdir)  # same study name: loaded, not created
    rows = {r["number"]: r for r in second.rows}
    assert rows[0]["value"] == kept["value"] and rows[0]["settings"] == kept["settings"]  # not run again
    assert rows[dead.number]["state"] == "FAIL"  # the dead worker's trial, failed by its stale heartbeat ...
    retried = [r for r in second.rows if r["number"] > dead.number and r["state"] == "COMPLETE"]
    assert retried and len(second.rows) == 4  # ... and the study reached its 3 finished trials besides
    assert sum(r["state"] == "COMPLETE" for r in second.rows) == 3


# ------------------------------------------------------------------------------------------- the flow


@pytest.mark.usefixtures("prefect_harness")
def test_tune_flow_writes_the_tuned_config_and_goes_through_the_gate(workdir, data_csv, tiny_model_dir):
    from prefect.artifacts import Artifact

    from tuneflow.flows.tune import tune

    search = {"trials": 3, "space": {"learning_rate": {"low": 1e-3, "high": 1e-2}, "batch_size": [16, 32]}}
    raw = tiny_config_dict(data_csv, tiny_model_dir, search=search, train=FAST)
    configs = workdir / "configs"
    configs.mkdir()
    path = configs / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))

    first = tune(str(path))
    assert first["promoted"] is True and first["version"] == "1"  # no champion yet: the best becomes it
    assert first["metrics"]["macro_f1"] == pytest.approx(first["best_value"]) and first["best_value"] > 0.8
    tuned = configs / "tiny.tuned.yaml"
    assert first["tuned_config"] == str(tuned)
    text = tuned.read_text()
    assert f"trial {first['best_trial']}" in text and "study 'tiny'" in text
    loaded = load_config(tuned)  # loads as a config: the best settings, no search section
    assert loaded.search is None
    assert loaded.train.learning_rate == first["best_settings"]["learning_rate"]
    assert loaded.train.batch_size == first["best_settings"]["batch_size"]
    mv = MlflowClient().get_model_version("tiny-clf", "1")
    assert mv.tags["tuneflow.config_digest"] == loaded.digest()  # registered as what the tuned file trains
    assert mv.tags["tuneflow.study"] == "tiny" and mv.tags["tuneflow.tuned_from_trial"] == str(first["best_trial"])

    from tuneflow.flows.retrain import retrain_once

    again = retrain_once(loaded, config_file=str(tuned))  # the tuned file on the same data: nothing to train
    assert again["status"] == "unchanged" and again["version"] == "1", again

    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(first["run_id"], "search")}
    assert {"search/trials.json", "search/optimization_history.png", "search/importances.png"} <= artifacts
    trials = [r for r in _children(first["run_id"]) if r.data.tags.get("tuneflow.stage") == "trial"]
    assert len(trials) == 3
    artifact = Artifact.get("tiny-tune")
    assert artifact is not None and f"Best: trial {first['best_trial']}" in artifact.data
    assert "data:image/png;base64," in artifact.data and "promoted to `champion`" in artifact.data

    # The gate decides as for any retrain: with a margin the same settings cannot reach, the champion stays. The
    # study already has its 3 trials: none runs again, and the best (from the call before) is trained again.
    raw["registry"]["min_improvement"] = 0.5
    path.write_text(yaml.safe_dump(raw))
    second = tune(str(path))
    assert second["ran"] == 0 and second["best_trial"] == first["best_trial"]
    assert second["promoted"] is False and "not an improvement of at least 0.5" in second["reason"]
    assert str(client.get_model_version_by_alias("tiny-clf", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("tiny-clf", "challenger").version) == "2"


def test_an_sft_study_searches_lora_and_prunes_on_the_eval_loss(workdir, tmp_path):
    from sft_fixtures import build_tiny_llama, sft_config, sft_frame
    from tuneflow.data import sft_settings

    base = build_tiny_llama(tmp_path / "tiny-llama")
    data = workdir / "pairs.csv"
    sft_frame(96).to_csv(data, index=False)
    raw = sft_config(base, data, **{"train.epochs": 2})
    # the second trial barely trains (lr 1e-8): its eval loss at the first evaluation is worse than the first's
    raw["search"] = {
        "trials": 2,
        "space": {
            "learning_rate": {"low": 1e-8, "high": 1e-2},
            "lora_r": [2, 4],
            "lora_target_modules": [["q_proj", "v_proj"], "all-linear"],
        },
        "enqueue": [
            {"learning_rate": 5e-3, "lora_r": 4, "lora_target_modules": "all-linear"},
            {"learning_rate": 1e-8, "lora_r": 2, "lora_target_modules": ["q_proj", "v_proj"]},
        ],
        "pruner": {"startup_trials": 1},
    }
    cfg = PipelineConfig.model_validate(raw)
    plan = check_search(cfg, mlflow.get_tracking_uri())
    loaded = read_table(cfg.data, sft=sft_settings(cfg))
    split = split_data(loaded, cfg.data)
    with mlflow.start_run() as parent:
        outcome = run_search(
            cfg, split, lambda c: tokenize_data(c, loaded, split, workdir / ".cache"), plan, parent.info.run_id, workdir
        )
    rows = {r["number"]: r for r in outcome.rows}
    assert rows[0]["state"] == "COMPLETE" and rows[1]["state"] == "PRUNED", outcome.rows
    assert rows[1]["settings"]["lora_target_modules"] == ["q_proj", "v_proj"]  # a module list, as configured
    assert outcome.direction == "minimize" and outcome.best_config.sft.lora.r == 4
    assert outcome.best_config.sft.lora.target_modules == "all-linear"


def test_tuneflow_run_does_not_import_optuna():
    """The plain run (and its unchanged fast path) stays as fast as before: Optuna is imported by tune only."""
    import subprocess
    import sys

    code = "import sys, tuneflow.cli, tuneflow.flows.retrain; print('optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "False"


WORKER = """
import sys
from pathlib import Path

import mlflow

from tuneflow.runtime import configure_environment

configure_environment()
from tuneflow.config import load_config
from tuneflow.data import read_table, split_data
from tuneflow.search import check_search, run_search
from tuneflow.tokenization import tokenize_data
from tuneflow.tracking import configure_tracking, ensure_experiment

cfg = load_config(sys.argv[1])
uri = configure_tracking(Path.cwd())
ensure_experiment(cfg.name)
plan = check_search(cfg, uri)
data = read_table(cfg.data)
split = split_data(data, cfg.data)
with mlflow.start_run(run_name="worker-" + sys.argv[2]) as parent:
    out = run_search(cfg, split, lambda c: tokenize_data(c, data, split, Path(".cache")), plan, parent.info.run_id,
                     Path("work-" + sys.argv[2]))
print("RAN", out.ran, parent.info.run_id)
"""


def test_two_worker_processes_share_one_study_and_no_trial_runs_twice(workdir, data_csv, tiny_model_dir):
    """Two processes run trials of one study at once (sqlite here; PostgreSQL in team mode: test_team_mode.py):
    together they stop at exactly the study's trial count, and each trial ran once."""
    import subprocess
    import sys

    search = {"trials": 4, "space": {"learning_rate": {"low": 1e-3, "high": 1e-2}, "batch_size": [8, 16]}}
    path = _write(workdir, tiny_config_dict(data_csv, tiny_model_dir, search=search, train=FAST))
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(i)], stdout=subprocess.PIPE, text=True)
        for i in (1, 2)
    ]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    ran = {line.split()[2]: int(line.split()[1]) for out in outs for line in out.splitlines() if line.startswith("RAN")}
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir / 'mlruns' / 'optuna.db'}")
    # a trial asked for when the study had them all (two workers asking at once) is surplus: it never ran
    trials = [t for t in study.get_trials() if "surplus" not in t.user_attrs]
    assert len(trials) == 4 and sum(ran.values()) == 4, (ran, [(t.number, t.state, t.user_attrs) for t in trials])
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # seeded per trial: no worker drew another's
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    runs = [r for parent in ran for r in _children(parent)]
    assert sorted(int(r.data.tags["tuneflow.trial"]) for r in runs) == sorted(t.number for t in trials)  # once each
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in runs}


def test_a_trial_asked_for_when_the_study_has_its_trials_is_surplus_and_a_retry_is_not():
    """Two workers that ask for the last trial at once both get one; trial numbers decide which one runs."""
    from tuneflow.search import counted, finished_count, is_surplus, wants_trial

    study = optuna.create_study()
    first, second, third = study.ask(), study.ask(), study.ask()  # three asked, the study wants two
    trials = study.get_trials(deepcopy=False)
    assert not is_surplus(trials, first.number, 2) and not is_surplus(trials, second.number, 2)
    assert is_surplus(trials, third.number, 2)
    assert not wants_trial(trials, 2) and wants_trial(trials, 4)
    # a dead worker's trial queued again (as RetryHeartbeatStaleTrialCallback queues it) stands for it: no surplus
    study.tell(second, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial({}, skip_if_exists=False)
    retry = study.get_trials(deepcopy=False)[-1]
    study._storage.set_trial_system_attr(retry._trial_id, "failed_trial", second.number)
    study._storage.set_trial_system_attr(retry._trial_id, "retry_history", [second.number])
    trials = study.get_trials(deepcopy=False)
    assert not is_surplus(trials, retry.number, 2)
    assert [t.number for t in counted(trials)] == [first.number, third.number, retry.number]
    assert finished_count(trials) == 0  # the failed trial counts through its retry, once that finishes


def test_the_study_database_sits_beside_mlflows_and_several_workers_behind_a_server_need_one(data_csv, tiny_model_dir):
    cfg = _cfg(data_csv, tiny_model_dir, {"space": {"batch_size": [8, 16]}})
    # MLflow's store a PostgreSQL database: the study in the database optuna on the same server
    sibling = study_storage(cfg, "postgresql://tf:pw@db.internal:5432/mlflow")
    assert sibling == "postgresql://tf:pw@db.internal:5432/optuna"
    # behind an MLflow server tuneflow cannot see MLflow's database: one process keeps the study on its machine,
    # several workers must be told where it is
    assert study_storage(cfg, "http://mlflow.internal:5000").startswith("sqlite:///")
    with pytest.raises(SearchError, match="search.workers is 2.*Fix: set search.storage"):
        study_storage(cfg, "http://mlflow.internal:5000", workers=2)
    shared = cfg.model_copy(update={"search": cfg.search.model_copy(update={"storage": "postgresql://tf@db/optuna"})})
    assert study_storage(shared, "http://mlflow.internal:5000", workers=2) == "postgresql://tf@db/optuna"


@pytest.mark.usefixtures("prefect_harness")
def test_several_workers_on_a_server_without_the_tune_worker_deployment_stop_before_training(
    workdir, data_csv, tiny_model_dir
):
    from tuneflow.flows.tune import tune

    search = {"trials": 2, "workers": 2, "space": {"batch_size": [8, 16]}}
    path = _write(workdir, tiny_config_dict(data_csv, tiny_model_dir, search=search, train=FAST))
    with pytest.raises(SearchError, match="no deployment tune-worker/tiny.*Fix: .*prefect deploy"):
        tune(str(path))
    assert not list(MlflowClient().search_experiments(filter_string="name = 'tiny'"))  # nothing ran, nothing logged


def test_each_trial_draws_from_its_own_seed_so_workers_never_repeat_each_other():
    """Two samplers with the same search.seed (two worker processes) on one study: each trial's settings depend on
    its number, not on which process asked, so the two never draw the same settings for different trials."""
    from tuneflow.search import per_trial_seed

    study = optuna.create_study(sampler=per_trial_seed(optuna.samplers.TPESampler, 0))
    other = optuna.load_study(study_name=study.study_name, storage=study._storage)
    other.sampler = per_trial_seed(optuna.samplers.TPESampler, 0)
    drawn = []
    for s in (study, other, study, other):  # alternate, as two workers would
        trial = s.ask()
        drawn.append(trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True))
    assert len(set(drawn)) == 4
    again = optuna.create_study(sampler=per_trial_seed(optuna.samplers.TPESampler, 0))
    assert again.ask().suggest_float("learning_rate", 1e-5, 1e-2, log=True) == drawn[0]  # reproducible per trial


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_the_tune_process_takes_over_the_trial_of_a_worker_that_died(workdir, data_csv, tiny_model_dir):
    """The study counts its trials (one finished, one running on a worker that died): no new trial is asked for, but
    the process that reports the study waits for the running one; its heartbeat stops, so it is failed and run again
    here, and the study ends with its trials."""
    search = {"trials": 2, "space": {"learning_rate": {"low": 1e-3, "high": 1e-2}}, "heartbeat_seconds": 1}
    cfg = _cfg(data_csv, tiny_model_dir, search | {"min_trial_minutes": 0.001})
    first, _ = _search(cfg, workdir, trials=1)
    assert first.ran == 1
    study = open_study(cfg, check_search(cfg, mlflow.get_tracking_uri()))
    dead = study.ask()  # the dead worker's trial: RUNNING with its settings, one heartbeat, then silence
    drawn = dead.suggest_float("learning_rate", 1e-3, 1e-2, log=True)
    study._storage.record_heartbeat(dead._trial_id)

    second, _ = _search(cfg, workdir)
    rows = {r["number"]: r for r in second.rows}
    assert second.ran == 1 and rows[dead.number]["state"] == "FAIL", second.rows
    (retry,) = [r for n, r in rows.items() if n > dead.number]
    assert retry["state"] == "COMPLETE" and retry["settings"] == {"learning_rate": drawn}


@pytest.mark.slow
def test_several_workers_without_a_server_run_the_trials_one_at_a_time_and_say_why(
    workdir, data_csv, tiny_model_dir, tmp_path
):
    """`tuneflow tune --workers 2` with Prefect's temporary local server: no worker run can be started there, so the
    trials run one at a time in the process, and the log says so, citing the measurement."""
    import os
    import subprocess
    import sys

    search = {"trials": 2, "space": {"batch_size": [8, 16]}, "min_trial_minutes": 0.01}
    path = _write(workdir, tiny_config_dict(data_csv, tiny_model_dir, search=search, train=FAST))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run(
        [sys.executable, "-m", "tuneflow.cli", "tune", "--config", str(path), "--workers", "2"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "search.workers is 2, but there is no Prefect server" in out and "Training in 1 vs 2 processes" in out
    assert "2 run now" in done.stdout  # both trials in this process
