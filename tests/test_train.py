"""Fine-tuning on a tiny random BERT: it learns, early stopping works, checkpoints are cleaned up."""

from __future__ import annotations

import math

import pytest
import torch

from tuneflow.kinds import get_kind
from tuneflow.kinds.classification import load_base_model
from tuneflow.train import by_length

from conftest import tiny_training_setup


def test_training_learns_and_changes_parameters(tiny_model_dir, tmp_path):
    cfg, tok, data = tiny_training_setup(tiny_model_dir, tmp_path, epochs=3)
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
    cfg, tok, data = tiny_training_setup(
        tiny_model_dir, tmp_path, epochs=6, learning_rate=0.0, early_stopping_patience=1
    )
    result = get_kind(cfg.kind).train(cfg, tok, data, tmp_path / "work")
    assert result.epochs_run == pytest.approx(2.0)  # epoch 2 did not beat epoch 1: stop


def test_one_epoch_is_not_evaluated_twice_and_epochs_are_evaluated_by_length(tiny_model_dir, tmp_path):
    # one epoch has one model to pick: the evaluate stage scores it, training does not score it first
    cfg, tok, data = tiny_training_setup(tiny_model_dir, tmp_path, epochs=1, early_stopping_patience=1)
    one = get_kind(cfg.kind).train(cfg, tok, data, tmp_path / "one")
    assert one.epochs_run == pytest.approx(1.0) and one.best_metric is None
    assert not [h for h in one.log_history if "eval_loss" in h]
    # more epochs: each is scored (the best is kept), on the eval rows ordered by length (less padding)
    cfg, tok, data = tiny_training_setup(tiny_model_dir, tmp_path, epochs=2)
    two = get_kind(cfg.kind).train(cfg, tok, data, tmp_path / "two")
    assert len([h for h in two.log_history if "eval_loss" in h]) == 2 and two.best_metric is not None
    ordered = by_length(data["eval"])
    lengths = [len(x) for x in ordered["input_ids"]]
    assert lengths == sorted(lengths) and sorted(ordered["labels"]) == sorted(data["eval"]["labels"])


def test_a_run_resumed_in_the_middle_of_a_later_epoch_ends_with_the_same_weights(tiny_config, tmp_path, monkeypatch):
    import shutil

    import torch
    from safetensors.torch import load_file

    import tuneflow.train as train_module
    from tuneflow.data import read_table, split_data
    from tuneflow.kinds import get_kind
    from tuneflow.models import load_tokenizer

    cfg = tiny_config.model_copy(deep=True)
    cfg.train.epochs, cfg.train.checkpoint_minutes = 3, 0
    kind, tok = get_kind("classification"), load_tokenizer(cfg.model)
    split = split_data(read_table(cfg.data), cfg.data)
    data = kind.encode(split, tok, cfg.model.max_length, cfg.data.labels)
    per_epoch = -(-len(data["train"]) // cfg.train.batch_size)
    resume_at = 2 * per_epoch + 3  # in the middle of the third epoch: its order must not depend on the restart
    crashed = tmp_path / "crashed"
    mark = train_module.mark_complete

    def keep_a_copy(folder):  # what a kill -9 right after that save would leave behind
        mark(folder)
        if folder.name == f"checkpoint-{resume_at}":
            shutil.copytree(folder, crashed / folder.name)

    monkeypatch.setattr(train_module, "mark_complete", keep_a_copy)
    whole = kind.train(cfg, tok, data, tmp_path / "whole")
    assert (crashed / f"checkpoint-{resume_at}").is_dir()
    resumed = kind.train(cfg, tok, data, crashed)
    assert resumed.extra["resumed_from_step"] == resume_at
    # the last step's weights (the returned model is the best epoch's, which may come before the restart)
    last = f"checkpoint-{whole.steps}/model.safetensors"
    a, b = load_file(tmp_path / "whole" / last), load_file(crashed / last)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run trained on other batches"
