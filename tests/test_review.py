"""Registry review against a real (temporary, sqlite) MLflow registry and the tiny model: champion
history, manual promotion, rollback, compare, the eval split they score on, and consistency after an
interrupted write."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

import tuneflow.history as history
from tuneflow.cli import main
from tuneflow.config import PipelineConfig
from tuneflow.data import split_by_text_hash
from tuneflow.landing import load_accepted
from tuneflow.registry import decide
from tuneflow.review import current_eval_frame

from conftest import make_rows, tiny_config_dict

NAME = "tiny-clf"
CORPUS = Path(__file__).parent / "data" / "bad"
VALIDATED = {
    "tuneflow.data_digest": "d" * 64,
    "tuneflow.validation": "passed",
    "tuneflow.prefect_flow_run_id": "flow-run-1",
}


class Crash(RuntimeError):
    """Stands for a process killed between two registry writes."""


@pytest.fixture
def setup(workdir, tiny_model_dir, register_tiny):
    """A config file on generated data, and a function that registers the tiny model as a new version."""
    data = workdir / "data.csv"
    make_rows(60).to_csv(data, index=False)
    cfg_dict = tiny_config_dict(data, tiny_model_dir)
    cfg_path = workdir / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict))
    cfg = PipelineConfig.model_validate(cfg_dict)

    def add(score: float, tags: dict | None = None) -> str:
        champ = history.champion_version(NAME)
        champ_score = None if champ is None else 0.5
        mv = register_tiny(
            cfg,
            decide("macro_f1", score, champ_score, champ, 0.0),
            VALIDATED if tags is None else tags,
            f"card for score {score}",
            ["hi", "free prize"],
        )
        return str(mv.version)

    return cfg_path, add


def champion() -> str | None:
    return history.champion_version(NAME)


def assert_consistent() -> None:
    assert history.registry_problems(NAME) == []


def test_gate_records_history_and_card_then_promote_and_rollback(setup, capsys):
    cfg_path, add = setup
    v1 = add(0.6)  # first model: champion
    v2 = add(0.9)  # beats 0.5: champion
    v3 = add(0.1)  # worse: challenger only
    assert champion() == v2
    client = MlflowClient()
    mv = client.get_model_version(NAME, v3)
    card = mlflow.artifacts.load_text(mv.tags["tuneflow.model_card"])
    assert card == mv.description == "card for score 0.1"
    moves = history.read_history(NAME)
    assert [(m.from_version, m.to_version, m.by, m.actor, m.applied) for m in moves] == [
        (None, v1, "gate", "flow-run-1", True),
        (v1, v2, "gate", "flow-run-1", True),
    ]

    # Manual promotion re-scores both versions on the current eval split and shows them.
    assert main(["promote", NAME, v3, "--reason", "hotfix for new slang", "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert f"candidate v{v3}" in out and f"champion v{v2}" in out and "| macro_f1 |" in out
    assert champion() == v3

    assert main(["models", NAME, "--history"]) == 0
    out = capsys.readouterr().out
    assert f"v{v2} -> v{v3}" in out and "hotfix for new slang" in out and "cli:" in out and "gate:flow-run-1" in out

    assert main(["compare", NAME, v1, v3, "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert f"| metric | v{v1} | v{v3} (champion) |" in out and "| accuracy |" in out

    # Rollback walks back the promotions in order, then says there is nothing left.
    assert main(["rollback", NAME, "--reason", "slang fix misfires"]) == 0
    assert champion() == v2
    assert main(["rollback", NAME]) == 0
    assert champion() == v1
    capsys.readouterr()
    assert main(["rollback", NAME]) == 2
    err = capsys.readouterr().err
    assert "first recorded champion" in err and "tuneflow promote" in err
    assert champion() == v1
    assert [m.action for m in history.read_history(NAME)] == ["gate", "gate", "promote", "rollback", "rollback"]
    assert_consistent()


def test_rollback_without_history_fails_clearly(setup, capsys):
    _, add = setup
    assert main(["rollback", NAME]) == 2
    assert "has no champion" in capsys.readouterr().err  # no such model yet
    v1 = add(0.1, tags={**VALIDATED})
    client = MlflowClient()
    for key in [k for k in client.get_registered_model(NAME).tags if k.startswith(history.HISTORY_TAG)]:
        client.delete_registered_model_tag(NAME, key)  # a champion set before tuneflow recorded moves
    assert main(["rollback", NAME]) == 2
    err = capsys.readouterr().err
    assert "no promotion history" in err and "Fix:" in err
    assert champion() == v1


def test_promote_refuses_unvalidated_versions_unless_forced(setup, capsys):
    cfg_path, add = setup
    add(0.6)
    bare = add(0.1, tags={})  # no lineage: not produced by a validated tuneflow run
    failed = add(0.1, tags={**VALIDATED, "tuneflow.validation": "failed"})
    assert main(["promote", NAME, bare, "--reason", "try", "--config", str(cfg_path)]) == 2
    assert "tuneflow.validation is missing" in capsys.readouterr().err
    assert main(["promote", NAME, failed, "--reason", "try", "--config", str(cfg_path)]) == 2
    assert "failed validation" in capsys.readouterr().err
    assert main(["promote", NAME, "99", "--reason", "try", "--config", str(cfg_path)]) == 2
    assert "version 99 not found" in capsys.readouterr().err
    assert champion() == "1"
    assert main(["promote", NAME, bare, "--reason", "reviewed by hand", "--force", "--config", str(cfg_path)]) == 0
    assert champion() == bare
    assert "forced past" in history.read_history(NAME)[-1].reason


def test_interrupted_writes_leave_the_registry_consistent(setup, monkeypatch, tmp_path):
    cfg_path, add = setup
    v1 = add(0.6)

    # Crash after the history entry, before the alias moves (registration of a better model).
    def crash(*a, **k):
        raise Crash("killed")

    monkeypatch.setattr(history, "set_champion_alias", crash)
    with pytest.raises(Crash):
        add(0.9)
    monkeypatch.undo()
    assert champion() == v1
    assert_consistent()  # the new version exists with its card; champion still points at v1
    moves = history.read_history(NAME)
    assert [m.applied for m in moves] == [True, False]

    # Crash before the history entry is written (manual promotion): nothing moved.
    cfg = PipelineConfig.model_validate(yaml.safe_load(cfg_path.read_text()))
    from tuneflow.review import promote, rollback

    monkeypatch.setattr(history, "write_entry", crash)
    with pytest.raises(Crash):
        promote(cfg, NAME, "2", "retry", config_file=str(cfg_path))
    monkeypatch.undo()
    assert champion() == v1
    assert_consistent()

    # After the interruptions, a promotion and a rollback still go back to the right version: the
    # unapplied entry is not taken for a champion.
    promote(cfg, NAME, "2", "retry after crash", config_file=str(cfg_path))
    assert champion() == "2"
    assert rollback(NAME).to_version == v1
    assert champion() == v1
    assert_consistent()
    from tuneflow.review import history_rows

    assert [("NOT APPLIED" in r["action"]) for r in history_rows(NAME)] == [False, True, False, False]


def test_review_commands_score_on_the_accepted_union(tmp_path, tiny_model_dir):
    landing = tmp_path / "sms"
    (landing / "accepted").mkdir(parents=True)
    for name in ("base.csv", "bom.csv", "crlf.csv"):  # batches the gate accepted (see test_landing.py)
        shutil.copy(CORPUS / name, landing / "accepted" / name)
    raw = tiny_config_dict(Path("unused"), tiny_model_dir)
    raw["data"] = {"landing": str(landing), "labels": ["ham", "spam"], "eval_fraction": 0.25}
    cfg = PipelineConfig.model_validate(raw)
    union = load_accepted(cfg, landing).frame
    expected = split_by_text_hash(union, cfg.data.eval_fraction, cfg.data.split_salt).eval
    assert set(expected["batch"]) == {"base.csv", "bom.csv", "crlf.csv"}  # every accepted batch is in play
    assert current_eval_frame(cfg)["text"].tolist() == expected["text"].tolist()


def test_compare_and_promote_score_on_the_eval_rows_the_retrain_scored_on(workdir, tiny_model_dir):
    import pandas as pd

    from tuneflow.data import read_table, split_data
    from tuneflow.review import current_eval_frame
    from tuneflow.validation import drop_out_of_bounds

    from conftest import make_rows, tiny_config_dict

    rows = make_rows(150)
    long = pd.DataFrame({"text": [f"free prize number {i} " + "x" * 60 for i in range(12)], "label": "spam"})
    path = workdir / "with-long.csv"
    pd.concat([rows, long], ignore_index=True).to_csv(path, index=False)
    cfg = PipelineConfig.model_validate(
        tiny_config_dict(path, tiny_model_dir, validation={"max_text_chars": 60, "text_length_mostly": 0.95})
    )
    retrain_eval = split_data(drop_out_of_bounds(read_table(cfg.data), cfg)[0], cfg.data).eval
    whole_eval = split_data(read_table(cfg.data), cfg.data).eval
    assert len(whole_eval) > len(retrain_eval)  # some tolerated long rows fall in the eval split
    assert sorted(current_eval_frame(cfg)["text"]) == sorted(retrain_eval["text"])


def test_promote_refuses_when_the_champion_moves_while_it_scores(setup, monkeypatch, capsys):
    """A gate promotion landing while `tuneflow promote` scores is not overwritten; the stale comparison is refused."""
    import tuneflow.review as review

    cfg_path, add = setup
    v1 = add(0.6)  # champion
    v2 = add(0.1)  # challengers only
    v3 = add(0.2)
    real_score = review.score_versions

    def score_while_a_retrain_promotes(*args, **kwargs):
        scored = real_score(*args, **kwargs)
        # another process's gate: it compared v3 with v1 and promotes it while this promotion is still scoring
        history.move_champion(NAME, v3, "gate", "gate", "other-run", "beats v1", expected=v1)
        return scored

    monkeypatch.setattr(review, "score_versions", score_while_a_retrain_promotes)
    assert main(["promote", NAME, v2, "--reason", "looks better", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"moved from v{v1} to v{v3} while" in err and "re-run" in err and f"tuneflow promote {NAME} {v2}" in err
    assert champion() == v3  # the gate's promotion stands
    assert [m.to_version for m in history.read_history(NAME)] == [v1, v3]  # the refusal recorded nothing
    assert_consistent()


def test_rollback_refuses_when_the_champion_moves_before_its_move(setup, monkeypatch, capsys):
    import tuneflow.review as review

    _, add = setup
    add(0.6)  # v1
    v2 = add(0.9)  # champion; a rollback would go back to v1
    v3 = add(0.1)
    real_target = review.rollback_target

    def target_then_a_promotion(name):
        found = real_target(name)
        history.move_champion(NAME, v3, "promote", "cli", "colleague", "hotfix", expected=v2)
        return found

    monkeypatch.setattr(review, "rollback_target", target_then_a_promotion)
    assert main(["rollback", NAME, "--reason", "v2 misfires"]) == 2
    err = capsys.readouterr().err
    assert f"moved from v{v2} to v{v3} while" in err and "re-run" in err
    assert champion() == v3


def test_compare_and_promote_name_the_accepted_batches_of_a_landing_config(
    workdir, tiny_model_dir, register_tiny, capsys
):
    landing = workdir / "sms"
    (landing / "accepted").mkdir(parents=True)
    for name in ("base.csv", "bom.csv", "crlf.csv"):
        shutil.copy(CORPUS / name, landing / "accepted" / name)
    raw = tiny_config_dict(Path("unused"), tiny_model_dir)
    raw["data"] = {"landing": str(landing), "labels": ["ham", "spam"], "eval_fraction": 0.25}
    cfg_path = workdir / "landing.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    v1 = str(register_tiny(NAME, decide("macro_f1", 0.6, None, None, 0.0), VALIDATED).version)
    v2 = str(register_tiny(NAME, decide("macro_f1", 0.4, 0.6, v1, 0.0), VALIDATED).version)
    rows = len(current_eval_frame(PipelineConfig.model_validate(raw)))

    assert main(["compare", NAME, v1, v2, "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    where = f"{rows} rows of 3 accepted batches in {landing / 'accepted'}: base.csv, bom.csv, crlf.csv"
    assert "None" not in out and where in out
    assert main(["promote", NAME, v2, "--reason", "check", "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and where in out
