"""The classification kind (tuneflow.kinds.classification): metrics against hand-computed values, and
scores that do not depend on the label order a model was trained with."""

from __future__ import annotations

import copy

import pytest
import torch

from tuneflow.config import ModelConfig
from tuneflow.kinds.classification import classification_metrics, evaluate_model, load_base_model

from conftest import make_rows


def test_classification_metrics_match_hand_computed_values():
    m = classification_metrics([0, 0, 0, 1], [0, 0, 1, 1], ["ham", "spam"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision_spam"] == pytest.approx(0.5) and m["recall_spam"] == pytest.approx(1.0)
    assert m["f1_ham"] == pytest.approx(0.8) and m["f1_spam"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["support_ham"] == 3


def test_scores_do_not_depend_on_the_models_label_order(tiny_model_dir):
    """A champion trained with another label order must be scored by label name, not by id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = load_base_model(ModelConfig(base_model=str(tiny_model_dir), max_length=32), ["ham", "spam"])
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        flipped.classifier.weight.copy_(model.classifier.weight.flip(0))
        flipped.classifier.bias.copy_(model.classifier.bias.flip(0))
    flipped.config.id2label = {0: "spam", 1: "ham"}
    flipped.config.label2id = {"spam": 0, "ham": 1}
    rows = make_rows(30)
    args = (list(rows["text"]), list(rows["label"]), ["ham", "spam"], 32)
    a, b = evaluate_model(model, tok, *args), evaluate_model(flipped, tok, *args)
    assert a.predictions == b.predictions and a.metrics == b.metrics
    assert sum(map(sum, a.confusion)) == 60

    with pytest.raises(ValueError, match=r"lacks labels \['eggs'\]"):
        evaluate_model(model, tok, *args[:2], ["ham", "spam", "eggs"], 32)


def test_a_kind_is_its_module_its_facts_and_one_entry_in_the_catalog():
    """The config's kinds, get_kind's table and the facts are one list: a kind in FACTS validates as `kind:` and
    loads its implementation, which answers to its own name and facts; a name not in FACTS is refused by both."""
    import typing

    import pydantic

    from tuneflow.config import Kind, PipelineConfig
    from tuneflow.kinds import FACTS, get_kind

    assert set(typing.get_args(Kind)) == set(FACTS) == {"classification", "sft"}
    for name, facts in FACTS.items():
        kind = get_kind(name)
        assert kind.name == name and kind.facts is facts
    with pytest.raises(ValueError, match="unknown fine-tuning kind 'regression'"):
        get_kind("regression")
    with pytest.raises(pydantic.ValidationError, match="classification' or 'sft'"):
        PipelineConfig.model_validate(
            {"name": "x", "kind": "regression", "data": {"path": "x.csv"}, "model": {"base_model": "m"}}
        )
