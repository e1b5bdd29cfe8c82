"""The promotion gate and registration against a real (temporary, sqlite) MLflow registry."""

from __future__ import annotations

import random

import pandas as pd
import pytest
from mlflow import MlflowClient

from tuneflow.registry import decide, list_versions
from tuneflow.registry_base import RegistryError


def test_a_worse_or_equal_model_is_never_promoted():
    # Inputs built so that the challenger is at most the champion: whatever the margin, never promoted.
    rng = random.Random(7)
    for _ in range(2000):
        champion = rng.random()
        challenger = champion - rng.choice([0.0, 1e-9, rng.uniform(0, 0.05), rng.random() * champion])
        d = decide("macro_f1", challenger, champion, "3", rng.choice([0.0, 0.001, 0.01, 0.05]))
        assert d.promote is False, (challenger, champion)
        assert "champion kept" in d.reason and d.champion_score == champion and d.challenger_score == challenger


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "promoted"),
    [
        (0.90, 0.85, 0.0, True),  # better, no margin asked
        (0.90, 0.85, 0.05, True),  # better by exactly the margin (0.9 - 0.85 is 0.050000000000000044 in floats)
        (0.85, 0.80, 0.05, True),  # ... and 0.85 - 0.80 is 0.04999999999999993: exactly the margin too
        (0.8499, 0.80, 0.05, False),  # short of the margin by 1e-4: not promoted
        (0.90, 0.85, 0.06, False),  # better, but by less than the margin
        (0.851, 0.85, 0.0, True),
        (0.85, 0.85, 0.0, False),  # a tie keeps the champion
    ],
)
def test_a_better_model_is_promoted_only_past_the_margin(challenger, champion, margin, promoted):
    assert decide("macro_f1", challenger, champion, "3", margin).promote is promoted


def test_an_improvement_of_exactly_the_margin_promotes_in_either_direction_despite_float_rounding():
    # 0.85 - 0.80 is 0.04999999999999993 in floats: a user who asked for 0.05 gets 0.05 counted as 0.05
    assert decide("eval_loss", 0.80, 0.85, "3", 0.05).promote is True
    assert decide("eval_loss", 0.8001, 0.85, "3", 0.05).promote is False
    assert decide("eval_loss", 0.85, 0.85, "3", 0.0).promote is False  # a tie still keeps the champion


def test_first_model_is_promoted_and_unscorable_champion_is_not_replaced():
    assert decide("accuracy", 0.4, None, None, 0.0).promote is True
    d = decide("accuracy", 0.99, None, "5", 0.0)
    assert d.promote is False and "v5 could not be re-evaluated" in d.reason


def test_register_tags_aliases_and_lists_versions(workdir, register_tiny):
    import mlflow

    lineage = {"tuneflow.data_digest": "d" * 64, "tuneflow.config_digest": "c" * 16}
    client = MlflowClient()
    v1 = register_tiny("reg-clf", decide("macro_f1", 0.8, None, None, 0.0), lineage, "card 1", ["hi", "free prize"])
    v2 = register_tiny("reg-clf", decide("macro_f1", 0.7, 0.8, "1", 0.0), lineage, "card 2")
    assert str(client.get_model_version_by_alias("reg-clf", "champion").version) == str(v1.version) == "1"
    assert str(client.get_model_version_by_alias("reg-clf", "challenger").version) == str(v2.version) == "2"
    assert v2.tags["tuneflow.decision"] == "rejected" and v2.tags["tuneflow.champion_score"] == "0.800000"
    assert v2.tags["tuneflow.data_digest"] == "d" * 64 and v2.description == "card 2"
    rows = list_versions("reg-clf")
    assert [(r["version"], r["aliases"], r["decision"]) for r in rows] == [
        (2, "challenger", "rejected"),
        (1, "champion", "promoted"),
    ]
    model = mlflow.pyfunc.load_model("models:/reg-clf@champion")
    preds = model.predict(pd.DataFrame({"text": ["free prize", "lunch"]}))
    assert set(preds["label"]) <= {"ham", "spam"}
    # a plain list is refused, not parsed as Python literals as MLflow does for a list
    with pytest.raises(mlflow.exceptions.MlflowException, match="missing inputs \\['text'\\]"):
        model.predict(["free prize", "lunch"])


def test_a_long_model_card_fits_the_description_column_and_stays_whole_as_the_artifact(workdir, register_tiny):
    import mlflow

    from tuneflow.registry import MAX_DESCRIPTION
    from tuneflow.registry_base import CARD_TAG

    sections = [f"## Section {i}\n\n" + ("metric | value\n" * 60) for i in range(12)]
    card = "# tiny-long v?\n\nShort intro.\n\n" + "\n".join(sections)
    assert len(card) > 2 * MAX_DESCRIPTION
    mv = register_tiny("tiny-long", decide("macro_f1", 0.9, None, None, 0.0), card=card)
    assert len(mv.description) <= MAX_DESCRIPTION
    assert mv.description.startswith("# tiny-long v?\n\nShort intro.") and "## Section 0" in mv.description
    assert "## Section 11" not in mv.description and "The full model card is the artifact" in mv.description
    assert "Left out here: Section" in mv.description and "Section 11" in mv.description.rsplit("\n", 1)[-1]
    assert mlflow.artifacts.load_text(mv.tags[CARD_TAG]) == card
    # the longest section (sample generations) is left out; the shorter ones after it are kept
    samples = "## Sample generations\n\n" + "a generated answer\n" * 400
    card = "# tiny-long v?\n\nShort intro.\n\n## Promotion\n\nok\n" + samples + "\n## Training\n\n- LoRA r=4\n"
    mv = register_tiny("tiny-samples", decide("macro_f1", 0.9, None, None, 0.0), card=card)
    assert len(mv.description) <= MAX_DESCRIPTION and "- LoRA r=4" in mv.description
    assert "## Sample generations" not in mv.description and "Left out here: Sample generations." in mv.description
    short = "# card\n\nfits"
    assert register_tiny("tiny-short", decide("macro_f1", 0.9, None, None, 0.0), card=short).description == short


def _champion_artifacts(tiny_config, register_tiny):
    """(the registered champion, the folder of its logged model's artifacts in the local store)."""
    from pathlib import Path
    from urllib.parse import urlparse

    champ = register_tiny(tiny_config, decide("macro_f1", 0.6, None, None, 0.0))
    model_id = champ.source.removeprefix("models:/")  # MLflow 3: a version's source is its logged model
    return champ, Path(urlparse(MlflowClient().get_logged_model(model_id).artifact_location).path)


@pytest.mark.parametrize("damage", ["weights cut in half", "artifacts deleted"])
def test_a_champion_that_cannot_be_loaded_is_not_replaced_and_the_retrain_goes_on(
    workdir, tiny_config, register_tiny, damage
):
    """Artifacts garbage-collected or half-synced: the champion is scored as nothing, so the challenger is
    registered but not promoted (as for an untrusted champion), and the reason says why, instead of the retrain
    failing after training."""
    import shutil

    from tuneflow.data import read_table, split_data
    from tuneflow.evaluate import Evaluation
    from tuneflow.registry import decide_promotion
    from tuneflow.scoring import score_champion

    champ, root = _champion_artifacts(tiny_config, register_tiny)
    if damage == "artifacts deleted":
        shutil.rmtree(root)
    else:
        for weights in root.rglob("*.safetensors"):  # an interrupted copy or sync of the store
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    eval_frame = split_data(read_table(tiny_config.data), tiny_config.data).eval

    scored = score_champion(tiny_config, eval_frame)
    assert scored.version == str(champ.version) and scored.evaluation is None and scored.error
    challenger = Evaluation({"macro_f1": 0.99, "accuracy": 0.99})
    decision = decide_promotion(tiny_config, challenger, scored)
    assert decision.promote is False and "promote manually" in decision.reason
    assert scored.error[:40] in decision.reason  # the summary, tags and card say why, not only the log
    if damage == "weights cut in half":  # compare and promote score the same way: a refusal, not a traceback
        from tuneflow.review import compare

        with pytest.raises(RegistryError, match="could not be loaded"):
            compare(tiny_config, "tiny-clf", str(champ.version), str(champ.version))
