"""A person signs off (registry.approval: required): the decision logic and its record, on a temporary MLflow
registry. Approve, reject, timeout, superseded, compare-and-swap on champion, and every refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from mlflow import MlflowClient

from tuneflow.approval import (
    APPROVED,
    REJECTED,
    SUPERSEDED,
    TIMEOUT_REVIEWER,
    WAITING,
    check_decidable,
    close_overdue,
    decide,
    needs_review,
    request_review,
    review_rows,
    reviews,
)
from tuneflow.history import move_champion, read_history
from tuneflow.registry import Decision, champion_version
from tuneflow.registry import decide as gate
from tuneflow.registry_base import DECISION_TAG, REVIEW_TAG, RegistryError

NAME = "rev-clf"
HELD = Decision(False, "held for the test", "macro_f1", 0.5)  # registers without the gate's move


def passed_gate(champion: str | None) -> Decision:
    return gate("macro_f1", 0.9, 0.6 if champion else None, champion, 0.0)


@pytest.fixture
def champion_and_waiting(workdir, register_tiny):
    """v1 champion (by the gate), v2 registered and waiting for review (it beat v1)."""
    register_tiny(NAME, gate("macro_f1", 0.6, None, None, 0.0))
    register_tiny(NAME, HELD)
    request_review(NAME, "2", passed_gate("1"), "run-2", timeout_hours=1)
    return NAME


def tags(version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(NAME, version).tags


def card(version: str) -> str:
    return MlflowClient().get_model_version(NAME, version).description


def test_only_a_passed_gate_with_approval_required_waits():
    passed, failed = passed_gate("1"), gate("macro_f1", 0.5, 0.6, "1", 0.0)
    assert needs_review("required", passed) is True
    assert needs_review("required", failed) is False  # rejected without asking anyone
    assert needs_review("auto", passed) is False


def test_a_waiting_version_is_challenger_and_champion_stays(champion_and_waiting):
    assert champion_version(NAME) == "1"
    t = tags("2")
    assert t[REVIEW_TAG] == WAITING and t[DECISION_TAG] == "waiting for review"
    assert t["tuneflow.review.expected_champion"] == "1" and t["tuneflow.review.flow_run"] == "run-2"
    assert MlflowClient().get_registered_model(NAME).aliases["challenger"] in (2, "2")
    assert card("2").startswith("<!-- tuneflow:review -->\n## Review\n**Waiting for review**")
    assert [r.version for r in reviews(NAME)] == ["2"]


def test_approval_moves_champion_and_records_who_and_why(champion_and_waiting):
    out = decide(NAME, "2", "approve", "Ada", "checked the spam recall", via="tuneflow review (test)")
    assert champion_version(NAME) == "2"
    assert out.review.state == APPROVED and out.review.reviewer == "Ada"
    assert out.move is not None and (out.move.from_version, out.move.to_version) == ("1", "2")
    last = read_history(NAME)[-1]
    assert (last.action, last.by, last.actor) == ("approve", "review", "Ada")
    assert "checked the spam recall" in last.reason and "flow run run-2" in last.reason
    t = tags("2")
    assert t[DECISION_TAG] == "promoted" and t["tuneflow.review.comment"] == "checked the spam recall"
    assert "**Approved** by Ada" in card("2") and card("2").count("## Review") == 1
    assert reviews(NAME) == []


def test_rejection_leaves_champion(champion_and_waiting):
    out = decide(NAME, "2", "reject", "Bob", "too many false positives on short texts")
    assert champion_version(NAME) == "1"
    assert out.move is None and out.review.state == REJECTED
    assert tags("2")[DECISION_TAG] == "rejected"
    assert "**Rejected** by Bob" in card("2")
    assert [m.to_version for m in read_history(NAME)] == ["1"]


def test_a_decision_is_final_and_every_bad_input_moves_nothing(champion_and_waiting, register_tiny):
    decide(NAME, "2", "reject", "Bob", "no")
    with pytest.raises(RegistryError, match="already rejected by Bob"):
        decide(NAME, "2", "approve", "Ada", "yes")
    with pytest.raises(RegistryError, match="not waiting for review"):
        decide(NAME, "1", "approve", "Ada", "yes")  # the champion, registered by the gate
    with pytest.raises(RegistryError, match="no registered model named 'nope'"):
        decide("nope", "2", "approve", "Ada", "")
    # a version number that exists only in another model: named in the error
    register_tiny("other-clf", HELD)
    register_tiny("other-clf", HELD)
    register_tiny("other-clf", HELD)
    request_review("other-clf", "3", passed_gate(None), "", timeout_hours=1)
    with pytest.raises(RegistryError, match="rev-clf has no version 3; waiting with that number: other-clf v3"):
        decide(NAME, "3", "approve", "Ada", "")
    register_tiny(NAME, HELD)
    request_review(NAME, "3", passed_gate("1"), "", timeout_hours=1)
    with pytest.raises(RegistryError, match="reviewer"):
        decide(NAME, "3", "approve", "  ", "")
    assert champion_version(NAME) == "1" and [m.to_version for m in read_history(NAME)] == ["1"]
    assert tags("3")[REVIEW_TAG] == WAITING


def test_a_newer_approval_supersedes_an_older_waiting_review(champion_and_waiting, register_tiny):
    register_tiny(NAME, HELD)
    request_review(NAME, "3", passed_gate("1"), "run-3", timeout_hours=1)
    out = decide(NAME, "3", "approve", "Ada", "newer and better")
    assert champion_version(NAME) == "3"
    assert [(r.version, r.state) for r in out.superseded] == [("2", SUPERSEDED)]
    assert "v3 was approved first" in tags("2")["tuneflow.review.comment"]
    with pytest.raises(RegistryError, match="superseded"):
        check_decidable(NAME, "2")
    assert champion_version(NAME) == "3"


def test_an_approval_after_the_champion_moved_closes_as_superseded(champion_and_waiting, register_tiny):
    register_tiny(NAME, HELD)  # v3, moved to by hand while v2 waits
    move_champion(NAME, "3", "promote", "cli", "carol", "hotfix")
    out = decide(NAME, "2", "approve", "Ada", "looks good")
    assert out.move is None and out.review.state == SUPERSEDED
    assert champion_version(NAME) == "3"  # compare-and-swap: the stale approval moved nothing
    assert "moved from v1 to v3" in out.review.comment


def test_timeout_rejects_and_never_approves(champion_and_waiting):
    assert close_overdue(NAME) == []  # deadline in an hour
    later = datetime.now(UTC) + timedelta(hours=2)
    [out] = close_overdue(NAME, now=later)
    assert out.review.state == REJECTED and out.review.reviewer == TIMEOUT_REVIEWER
    assert champion_version(NAME) == "1"
    assert "timed out" in tags("2")["tuneflow.decision_reason"]


def test_an_approval_past_the_deadline_is_refused_and_the_review_times_out(champion_and_waiting):
    later = datetime.now(UTC) + timedelta(hours=2)
    with pytest.raises(RegistryError, match="timed out .* nothing moved"):
        decide(NAME, "2", "approve", "Ada", "late", now=later)
    assert champion_version(NAME) == "1" and tags("2")[REVIEW_TAG] == REJECTED


def test_review_rows_show_the_flow_runs_state_and_overdue_reviews(champion_and_waiting):
    items = reviews(NAME)
    later = datetime.now(UTC) + timedelta(hours=2)
    [row] = review_rows(items, {"run-2": "Crashed"}, now=later)
    assert row["state"] == "waiting (overdue)" and row["flow run"] == "run-2 (Crashed)"
    [row] = review_rows(items, {}, now=later - timedelta(hours=2))
    assert row["state"] == "waiting" and row["flow run"] == "run-2 (unknown)"


def test_config_approval_defaults_to_auto_and_a_timeout_never_approves(tmp_path, tiny_model_dir):
    from pydantic import ValidationError

    from tuneflow.config import PipelineConfig

    from conftest import tiny_config_dict

    base = tiny_config_dict(tmp_path / "d.csv", tiny_model_dir)
    cfg = PipelineConfig.model_validate(base)
    assert (cfg.registry.approval, cfg.registry.approval_on_timeout) == ("auto", "reject")
    required = PipelineConfig.model_validate({**base, "registry": {**base["registry"], "approval": "required"}})
    assert required.digest() == cfg.digest()  # who signs off does not change what is trained
    for bad in ({"approval": "sometimes"}, {"approval_on_timeout": "approve"}, {"approval_timeout_hours": 0}):
        with pytest.raises(ValidationError):
            PipelineConfig.model_validate({**base, "registry": {**base["registry"], **bad}})


def test_cli_review_list_approve_reject_and_its_refusals(workdir, register_tiny, capsys, monkeypatch):
    """No Prefect server: the reviews wait in the registry only, and the CLI decides them there."""
    from tuneflow.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    register_tiny(NAME, gate("macro_f1", 0.6, None, None, 0.0))
    register_tiny(NAME, HELD)
    register_tiny(NAME, HELD)
    request_review(NAME, "2", passed_gate("1"), "", timeout_hours=1)
    request_review(NAME, "3", passed_gate("1"), "", timeout_hours=1)
    capsys.readouterr()

    assert main(["review", "list"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{NAME} ") == 2 and "vs champion" in out and "v1" in out

    bad = [
        (["review", "approve", NAME, "1", "--reviewer", "Ada"], "not waiting for review"),
        (["review", "approve", "nope", "2", "--reviewer", "Ada"], "no registered model named 'nope'"),
        (["review", "approve", NAME, "9", "--reviewer", "Ada"], "has no version 9"),
        (["review", "approve", NAME, "2", "--reviewer", " "], "reviewer"),
    ]
    for argv, message in bad:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert champion_version(NAME) == "1"

    assert main(["review", "approve", NAME, "3", "--reviewer", "Ada", "--comment", "better recall"]) == 0
    out = capsys.readouterr().out
    assert "superseded: rev-clf v2" in out and "v3 approved by Ada: better recall; champion is v3" in out
    assert main(["review", "reject", NAME, "2", "--reviewer", "Bob"]) == 2  # superseded: final
    assert "superseded" in capsys.readouterr().err
    assert main(["review", "approve", NAME, "3", "--reviewer", "Bob"]) == 2  # already approved
    assert "already approved by Ada" in capsys.readouterr().err
    assert champion_version(NAME) == "3"

    assert main(["models", NAME, "--history"]) == 0
    out = capsys.readouterr().out
    assert "approve" in out and "review:Ada" in out and "better recall" in out
    assert main(["review", "list"]) == 0 and "no reviews waiting" in capsys.readouterr().out
    assert main(["review", "list", "--all"]) == 0
    out = capsys.readouterr().out
    assert "approved" in out and "superseded" in out


def test_cli_a_review_whose_flow_run_is_unreachable_is_refused_without_a_server(
    champion_and_waiting, capsys, monkeypatch
):
    from tuneflow.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["review", "approve", NAME, "2", "--reviewer", "Ada"]) == 2
    assert "set PREFECT_API_URL" in capsys.readouterr().err
    assert champion_version(NAME) == "1" and tags("2")[REVIEW_TAG] == WAITING


def test_the_form_description_compares_both_versions_on_one_split_with_the_change_and_the_links(
    tmp_path, tiny_model_dir
):
    from pathlib import Path

    import pandas as pd

    from tuneflow.config import PipelineConfig
    from tuneflow.data import LoadedData, Split
    from tuneflow.evaluate import EvaluateOutput, Evaluation
    from tuneflow.reporting import review_markdown

    from conftest import tiny_config_dict

    cfg = PipelineConfig.model_validate(tiny_config_dict(tmp_path / "d.csv", tiny_model_dir))
    new = {"accuracy": 0.95, "macro_f1": 0.93, "recall_spam": 0.90}
    old = {"accuracy": 0.94, "macro_f1": 0.90, "recall_spam": 0.80}
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": ["ham", "spam", "ham"]})
    split = Split(frame.iloc[:2], frame.iloc[2:])
    data = LoadedData(frame, Path("d.csv"), "f" * 64, sources=(Path("d.csv"),))
    scores = EvaluateOutput(Evaluation(new), "4", Evaluation(old))
    links = {
        "challenger": "http://ml/#/models/tiny-clf/versions/5",
        "champion": "http://ml/#/models/tiny-clf/versions/4",
    }
    md = review_markdown(cfg, "5", data, split, scores, passed_gate("4"), links, 72)
    assert "## Review tiny-clf v5 against champion v4" in md
    assert "| metric | challenger v5 | champion v4 | change |" in md
    assert "| recall_spam | 0.9000 | 0.8000 | 0.1000 |" in md and "| macro_f1 | 0.9300 | 0.9000 | 0.0300 |" in md
    assert "Metrics on the same eval split (1 rows)" in md and "3 rows from 1 file(s)" in md
    assert links["challenger"] in md and links["champion"] in md and "72 h rejects it" in md
    assert "Sample generations" not in md  # a kind that generates shows its samples (Evaluation.samples)
