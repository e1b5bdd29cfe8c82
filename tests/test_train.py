"""Fine-tuning on a tiny random BERT: it learns, early stopping works, checkpoints are cleaned up."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from tuneflow.config import PipelineConfig
from tuneflow.data import content_digest, split_by_text_hash
from tuneflow.kinds import get_kind
from tuneflow.kinds.classification import load_base_model
from tuneflow.tokenization import tokenize_split

from conftest import make_rows, tiny_config_dict


def _setup(tiny_model_dir, tmp_path, **train):
    frame = make_rows(120).assign(line=range(2, 242))
    cfg = PipelineConfig.model_validate(tiny_config_dict(tmp_path / "unused.csv", tiny_model_dir, train=train))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    sp = split_by_text_hash(frame, 0.25, "s")
    data = tokenize_split(sp, tok, 32, cfg.data.labels, content_digest(frame), "x", tmp_path / "tok").datasets
    return cfg, tok, data


def test_training_learns_and_changes_parameters(tiny_model_dir, tmp_path):
    cfg, tok, data = _setup(tiny_model_dir, tmp_path, epochs=3)
    base = load_base_model(cfg.model, cfg.data.labels)
    result = get_kind(cfg.kind).train(cfg, tok, data, tmp_path / "work")
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    encoder_before = base.bert.encoder.layer[0].attention.self.query.weight
    encoder_after = result.model.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.allclose(encoder_before, encoder_after)
    assert result.best_metric is not None and result.best_metric > 0.8
    assert result.model.config.id2label == {0: "ham", 1: "spam"}
    assert not list((tmp_path / "work").glob("checkpoints-*"))  # checkpoints removed after training


def test_early_stopping_ends_a_run_that_does_not_improve(tiny_model_dir, tmp_path):
    cfg, tok, data = _setup(tiny_model_dir, tmp_path, epochs=6, learning_rate=0.0, early_stopping_patience=1)
    result = get_kind(cfg.kind).train(cfg, tok, data, tmp_path / "work")
    assert result.epochs_run == pytest.approx(2.0)  # epoch 2 did not beat epoch 1: stop
