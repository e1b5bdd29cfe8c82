"""The promotion gate and registration against a real (temporary, sqlite) MLflow registry."""

from __future__ import annotations

import random

from mlflow import MlflowClient
from transformers import AutoTokenizer

from tasks.config import ModelConfig, PipelineConfig
from tasks.register import decide, list_versions, register
from tasks.train import load_base_model


def test_a_worse_or_equal_model_is_never_promoted():
    rng = random.Random(7)
    for _ in range(2000):
        champion = rng.random()
        challenger = rng.choice([champion, rng.random(), champion + rng.uniform(-0.01, 0.01)])
        margin = rng.choice([0.0, 0.001, 0.01, 0.05])
        d = decide("macro_f1", challenger, champion, "3", margin)
        assert d.promote == (challenger - champion >= margin and challenger > champion), (challenger, champion, margin)
        assert d.champion_score == champion and d.challenger_score == challenger
        if not d.promote:
            assert "champion kept" in d.reason


def test_first_model_is_promoted_and_unscorable_champion_is_not_replaced():
    assert decide("accuracy", 0.4, None, None, 0.0).promote is True
    d = decide("accuracy", 0.99, None, "5", 0.0)
    assert d.promote is False and "v5 could not be re-evaluated" in d.reason


def test_register_tags_aliases_and_lists_versions(workdir, tiny_model_dir):
    import mlflow

    cfg = PipelineConfig.model_validate({
        "name": "reg", "data": {"path": "x.csv", "labels": ["ham", "spam"]},
        "model": {"base_model": str(tiny_model_dir), "max_length": 32}, "registry": {"model_name": "reg-clf"},
    })
    model = load_base_model(ModelConfig(base_model=str(tiny_model_dir), max_length=32), ["ham", "spam"])
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    lineage = {"tuneflow.data_digest": "d" * 64, "tuneflow.config_digest": cfg.digest()}
    client = MlflowClient()
    with mlflow.start_run():
        v1 = register(model, tok, cfg, decide("macro_f1", 0.8, None, None, 0.0), lineage, "card 1", ["hi", "free prize"])
    with mlflow.start_run():
        v2 = register(model, tok, cfg, decide("macro_f1", 0.7, 0.8, "1", 0.0), lineage, "card 2", ["hi"])
    assert str(client.get_model_version_by_alias("reg-clf", "champion").version) == str(v1.version) == "1"
    assert str(client.get_model_version_by_alias("reg-clf", "challenger").version) == str(v2.version) == "2"
    assert v2.tags["tuneflow.decision"] == "rejected" and v2.tags["tuneflow.champion_score"] == "0.800000"
    assert v2.tags["tuneflow.data_digest"] == "d" * 64 and v2.description == "card 2"
    rows = list_versions("reg-clf")
    assert [(r["version"], r["aliases"], r["decision"]) for r in rows] == [(2, "challenger", "rejected"), (1, "champion", "promoted")]
    preds = mlflow.pyfunc.load_model("models:/reg-clf@champion").predict(["free prize", "lunch"])
    assert set(preds["label"]) <= {"ham", "spam"}
