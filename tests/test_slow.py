"""The real default: MiniLM-L6 fine-tuned on the SMS Spam Collection (minutes on 2 cores)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from tuneflow.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_default_config_trains_a_real_model_to_at_least_090_macro_f1(workdir):
    from pathlib import Path

    from tuneflow.flows.retrain import retrain_once

    repo = Path(__file__).resolve().parents[1]
    # One epoch (about 75 s of training here; 0.967 macro-F1 measured). A third of an epoch once ended
    # in the all-ham solution (0.47), so this does not cut the schedule shorter.
    cfg = load_config(repo / "configs/sms-spam.yaml", ["train.epochs=1"])
    result = retrain_once(cfg, config_file="configs/sms-spam.yaml")
    assert result["metrics"]["macro_f1"] >= 0.90, result["metrics"]
    champion = MlflowClient().get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert str(champion.version) == result["version"]


def test_sft_config_fine_tunes_smollm2_and_the_eval_loss_falls(workdir):
    """SmolLM2-135M-Instruct (the shipped GGUF, converted once) with LoRA on chatterbot pairs, a few steps."""
    from pathlib import Path

    from tuneflow.data import read_table, resolve_path, sft_settings, split_data
    from tuneflow.flows.retrain import retrain_once
    from tuneflow.kinds import get_kind
    from tuneflow.models import load_tokenizer

    repo = Path(__file__).resolve().parents[1]
    overrides = ["sft.max_steps=12", "sft.generations=4", "sft.max_new_tokens=24"]
    cfg = load_config(repo / "configs/chatterbot-sft.yaml", overrides)
    kind = get_kind("sft")
    tokenizer = kind.prepare_tokenizer(load_tokenizer(cfg.model), cfg)
    loaded = read_table(cfg.data, sft=sft_settings(cfg), path=resolve_path(cfg.data.path))
    eval_rows = split_data(loaded, cfg.data).eval
    base = kind.evaluate(kind.load_model(cfg), tokenizer, eval_rows, cfg, cfg.model.max_length).metrics
    result = retrain_once(cfg, config_file="configs/chatterbot-sft.yaml")
    assert result["metrics"]["eval_loss"] < base["eval_loss"], (result["metrics"], base)
    assert result["promoted"] is True


def test_sft_demo_with_adapter_versions_end_to_end(workdir):
    """The demo config with registry.sft_weights: adapter: trained, registered as an adapter under 20 MB pinned to the
    converted SmolLM2 folder, promoted, and answering through `tuneflow predict` offline as its components do."""
    from pathlib import Path

    import mlflow
    import pandas as pd

    from tuneflow.flows.retrain import retrain_once
    from tuneflow.kinds.sft import generate, prepare_tokenizer
    from tuneflow.predict import score_path

    repo = Path(__file__).resolve().parents[1]
    overrides = ["sft.max_steps=6", "sft.generations=4", "sft.max_new_tokens=24", "registry.sft_weights=adapter"]
    cfg = load_config(repo / "configs/chatterbot-sft.yaml", overrides)
    result = retrain_once(cfg, config_file="configs/chatterbot-sft.yaml")
    assert result["promoted"] is True
    name = cfg.registry.model_name
    mv = MlflowClient().get_model_version_by_alias(name, "champion")
    assert "adapter weights" in mv.description and "Size of this version" in mv.description
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}", dst_path=str(workdir / "dl")))
    size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    assert size < 20e6, size
    assert not (local / "model").exists()

    prompts = ["Hello, how are you?", "What is your favorite book?"]
    inputs = workdir / "prompts.csv"
    pd.DataFrame({"prompt": prompts}).to_csv(inputs, index=False)
    score_path(f"{name}@champion", inputs, workdir / "out.csv", text_column="prompt")
    served = list(pd.read_csv(workdir / "out.csv")["generation"].fillna(""))
    parts = mlflow.transformers.load_model(str(local), return_type="components")
    tok = prepare_tokenizer(parts["tokenizer"], cfg.sft)
    assert served == generate(parts["model"], tok, prompts, max_new_tokens=cfg.sft.max_new_tokens)[0]
