"""The tuneflow command: config errors, model listing, batch scoring with NAME@ALIAS."""

from __future__ import annotations

import hashlib

import mlflow
import pandas as pd
from transformers import AutoTokenizer

from tasks.config import ModelConfig, PipelineConfig
from tasks.register import decide, register
from tasks.train import load_base_model
from tuneflow.cli import main


def test_run_with_unknown_config_key_fails_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ntrain:\n  epoch: 2\n")
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.epoch: unknown key" in err and "did you mean 'epochs'" in err and str(cfg) in err


def test_run_with_wrong_type_names_field_and_value(capsys):
    assert main(["run", "--config", "configs/sms-spam.yaml", "--set", "train.batch_size=big"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: value 'big'" in err


def test_models_and_predict_with_champion(workdir, tiny_model_dir, capsys, prefect_harness):
    cfg = PipelineConfig.model_validate({
        "name": "cli", "data": {"path": "x.csv", "labels": ["ham", "spam"]},
        "model": {"base_model": str(tiny_model_dir), "max_length": 32}, "registry": {"model_name": "cli-clf"},
    })
    model = load_base_model(ModelConfig(base_model=str(tiny_model_dir), max_length=32), ["ham", "spam"])
    with mlflow.start_run():
        register(model, AutoTokenizer.from_pretrained(str(tiny_model_dir)), cfg, decide("macro_f1", 0.9, None, None, 0.0), {}, "card", ["hi"])

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
