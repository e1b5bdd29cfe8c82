"""The promotion gate and registration against a real (temporary, sqlite) MLflow registry."""

from __future__ import annotations

import random

import pandas as pd
import pytest
from mlflow import MlflowClient

from tuneflow.registry import decide, list_versions


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
        (0.90, 0.85, 0.05, True),  # better by exactly... 0.05 in floats is 0.0500000000000000
        (0.90, 0.85, 0.06, False),  # better, but by less than the margin
        (0.851, 0.85, 0.0, True),
        (0.85, 0.85, 0.0, False),  # a tie keeps the champion
    ],
)
def test_a_better_model_is_promoted_only_past_the_margin(challenger, champion, margin, promoted):
    assert decide("macro_f1", challenger, champion, "3", margin).promote is promoted


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

    from tuneflow.registry import CARD_TAG, MAX_DESCRIPTION

    sections = [f"## Section {i}\n\n" + ("metric | value\n" * 60) for i in range(12)]
    card = "# tiny-long v?\n\nShort intro.\n\n" + "\n".join(sections)
    assert len(card) > 2 * MAX_DESCRIPTION
    mv = register_tiny("tiny-long", decide("macro_f1", 0.9, None, None, 0.0), card=card)
    assert len(mv.description) <= MAX_DESCRIPTION
    assert mv.description.startswith("# tiny-long v?\n\nShort intro.") and "## Section 0" in mv.description
    assert "## Section 11" not in mv.description and "the full model card is the artifact" in mv.description
    assert mlflow.artifacts.load_text(mv.tags[CARD_TAG]) == card
    short = "# card\n\nfits"
    assert register_tiny("tiny-short", decide("macro_f1", 0.9, None, None, 0.0), card=short).description == short
