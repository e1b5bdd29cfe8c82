"""The tuneflow command: config errors, model listing, batch scoring with NAME@ALIAS, serve without a server.

Every path is absolute or under a test folder: the tests pass from any working directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from tuneflow.cli import main
from tuneflow.registry import decide

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_run_with_unknown_config_key_fails_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ntrain:\n  epoch: 2\n")
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.epoch: unknown key" in err and "did you mean 'epochs'" in err and str(cfg) in err


def test_run_with_wrong_type_names_field_and_value(capsys):
    cfg = CONFIGS / "sms-spam.yaml"
    assert main(["run", "--config", str(cfg), "--set", "train.batch_size=big"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: value 'big'" in err and str(cfg) in err


def test_models_and_predict_with_champion(workdir, register_tiny, capsys, prefect_harness):
    register_tiny("cli-clf", decide("macro_f1", 0.9, None, None, 0.0))

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "cli-clf" in out and "champion" in out

    src = workdir / "in.csv"
    pd.DataFrame({"id": [1, 2, 3], "text": ["free prize now", "lunch later", "winner cash"]}).to_csv(src, index=False)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    dst = workdir / "out" / "scored.csv"
    assert main(["predict", "--model", "cli-clf@champion", "--input", str(src), "--output", str(dst)]) == 0
    scored = pd.read_csv(dst)
    assert list(scored.columns) == ["id", "text", "label", "score", "model_version"]
    assert set(scored["label"]) <= {"ham", "spam"} and scored["score"].between(0, 1).all()
    assert (scored["model_version"] == 1).all() and len(scored) == 3
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before

    assert main(["predict", "--model", "cli-clf@nope", "--input", str(src), "--output", str(dst)]) == 2
    assert "not found in the registry" in capsys.readouterr().err


def test_serve_without_a_server_says_how_to_start_one(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["serve", "--config", str(CONFIGS / "sms-spam-landing.yaml")]) == 2
    assert "prefect server start" in capsys.readouterr().err


def test_cli_run_waits_for_the_models_slot_held_by_another_retrain(workdir, data_csv, tiny_model_dir, prefect_harness):
    import threading
    import time

    import yaml

    from tuneflow.files import file_lock
    from tuneflow.flows.retrain import local_slot_path

    from conftest import tiny_config_dict

    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(data_csv, tiny_model_dir, train={"epochs": 1})))
    codes = []
    with file_lock(local_slot_path("tiny-clf")):  # another retrain of the model (deployed or CLI) holds the slot
        runner = threading.Thread(target=lambda: codes.append(main(["run", "--config", str(path)])))
        runner.start()
        time.sleep(3)
        assert runner.is_alive() and not codes  # waiting, not training alongside
        from mlflow import MlflowClient

        assert not MlflowClient().search_registered_models()  # nothing registered while it waits
    runner.join(timeout=300)
    assert codes == [0]


def test_settings_that_would_crash_later_are_refused_before_any_work(tmp_path, capsys):
    cfg = CONFIGS / "sms-spam.yaml"
    cases = {
        "train.seed=-1": "train.seed",
        "train.epochs=.inf": "train.epochs",
        "train.learning_rate=.nan": "train.learning_rate",
        "validation.severity={label_in_set: off}": "must stay 'error'",
        "validation.severity={text_not_null: warn}": "must stay 'error'",
    }
    for override, says in cases.items():
        assert main(["run", "--config", str(cfg), "--set", override]) == 2, override
        err = capsys.readouterr().err
        assert says in err and str(cfg) in err, (override, err)


def test_a_max_length_past_the_base_models_positions_stops_with_the_limit(
    workdir, data_csv, tiny_model_dir, prefect_harness, capsys
):
    import yaml

    from conftest import tiny_config_dict

    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(data_csv, tiny_model_dir, model={"max_length": 512})))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.max_length is 512" in err and "has 128 positions" in err and "at most 128" in err
    from mlflow import MlflowClient

    assert not MlflowClient().search_registered_models()


def test_a_split_without_a_class_or_rows_stops_before_training(workdir, tiny_model_dir, prefect_harness, capsys):
    import yaml

    from conftest import make_rows, tiny_config_dict

    data = workdir / "few.csv"
    make_rows(12).to_csv(data, index=False)  # 24 rows: too few for a 5 % eval split with both labels
    path = workdir / "few.yaml"
    cfg = tiny_config_dict(data, tiny_model_dir, data={"eval_fraction": 0.05}, validation={"min_rows_per_class": 5})
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "split of" in err and ("is empty" in err or "has no row labeled" in err) and "Fix:" in err
    from mlflow import MlflowClient

    assert not MlflowClient().search_registered_models()


def test_cli_run_without_a_server_starts_one_temporary_server_and_records_the_flow_run(
    workdir, data_csv, tiny_model_dir
):
    """`tuneflow run` with no PREFECT_API_URL starts Prefect's temporary server while it imports (in a thread):
    the flow uses that server (one server, not two) and its run is recorded in the server's database."""
    import os
    import sqlite3
    import subprocess
    import sys

    import yaml

    from conftest import tiny_config_dict

    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(data_csv, tiny_model_dir, train={"epochs": 1})))
    home = workdir / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"}
    done = subprocess.run(
        [sys.executable, "-m", "tuneflow", "run", "--config", str(path)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert out.count("Starting temporary server") == 1, out[-3000:]
    with sqlite3.connect(home / "prefect.db") as db:
        runs = db.execute(
            "select flow.name, flow_run.state_type from flow_run join flow on flow.id = flow_run.flow_id"
        ).fetchall()
    assert runs == [("retrain-once", "COMPLETED")]

    # Nothing changed: answered from the registry before Prefect starts or torch is imported, as the flow answers
    again = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tuneflow", "run", "--config", str(path)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "transformers", "prefect", "great_expectations"} & imported, sorted(imported)
    assert "Starting temporary server" not in again.stdout + again.stderr
    lines = again.stdout.strip().splitlines()
    assert lines[0] == (
        "=== tuneflow retrain: nothing changed: v1 was trained on exactly this input, config, base model and "
        "tuneflow version; nothing trained or registered (force: true / tuneflow run --force retrains) ==="
    )
    assert lines[1] == "version:      models:/tiny-clf/1" and lines[2].startswith("MLflow run:   http")
    with sqlite3.connect(home / "prefect.db") as db:
        assert db.execute("select count(*) from flow_run").fetchone() == (1,)  # no flow run: Prefect never started
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(lines[2].rsplit("/", 1)[-1])  # recorded as the flow's unchanged run is
    v1 = client.get_model_version("tiny-clf", "1")
    assert run.data.tags["tuneflow.outcome"] == "unchanged" and run.data.tags["tuneflow.same_as_version"] == "1"
    assert run.data.tags["tuneflow.input_fingerprint"] == v1.tags["tuneflow.input_fingerprint"]
    assert run.data.tags["tuneflow.config_digest"] == v1.tags["tuneflow.config_digest"]


def test_a_batch_waiting_in_the_landing_zone_skips_the_unchanged_shortcut(workdir, tiny_model_dir, register_tiny):
    """The CLI's shortcut answers "nothing changed" only for exactly the accepted files a version was trained on; a
    batch in incoming/ must be judged by the flow's gate first, so the shortcut steps aside."""
    from tuneflow.cli import _unchanged_without_prefect
    from tuneflow.config import PipelineConfig
    from tuneflow.landing import folders
    from tuneflow.registry_base import INPUT_FINGERPRINT_TAG
    from tuneflow.unchanged import input_fingerprint

    from conftest import make_rows, tiny_registry_config

    landing = workdir / "landing"
    incoming, accepted, _ = folders(landing)
    make_rows(10).to_csv(accepted / "batch-1.csv", index=False)
    base = tiny_registry_config("tiny-clf", tiny_model_dir).model_dump()
    base["data"] = {"landing": str(landing), "labels": ["ham", "spam"]}
    cfg = PipelineConfig.model_validate(base)
    fp = input_fingerprint(cfg)
    assert fp is not None
    register_tiny(cfg, decide("macro_f1", 0.9, None, None, 0.0), tags={INPUT_FINGERPRINT_TAG: fp})

    answered = _unchanged_without_prefect(cfg)
    assert answered is not None and answered["status"] == "unchanged" and answered["version"] == "1"

    make_rows(5, seed=1).to_csv(incoming / "batch-2.csv", index=False)
    assert input_fingerprint(cfg) is None
    assert _unchanged_without_prefect(cfg) is None  # the flow runs: its gate judges batch-2 first
    (incoming / "batch-2.csv").rename(accepted / "batch-2.csv")
    assert input_fingerprint(cfg) not in (None, fp)  # accepted data changed: no version matches
    assert _unchanged_without_prefect(cfg) is None
