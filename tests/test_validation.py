"""validate_frame with real Great Expectations on small generated frames."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tuneflow.config import DEFAULT_SEVERITY, SFT_CHECKS, PipelineConfig
from tuneflow.data import DataError
from tuneflow.reporting import validation_summary
from tuneflow.validation import ValidationFailed, validate_frame

SOURCE = "data/sms-train.csv"
# every classification check runs (or reports why it was skipped), in this order
CHECKS = [c for c in DEFAULT_SEVERITY if c not in SFT_CHECKS]


def make_cfg(**validation) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "t",
            "data": {"path": SOURCE, "text_column": "text", "label_column": "label", "labels": ["ham", "spam"]},
            "validation": validation,
            "model": {"base_model": "unused"},
            "registry": {"model_name": "m"},
        }
    )


def make_frame(per_class: int = 40, extra=()) -> pd.DataFrame:
    """Distinct texts, ``per_class`` rows per label, then ``extra`` (text, label) rows; lines start at 2."""
    rows = [(f"{lab} message number {i}", lab) for lab in ("ham", "spam") for i in range(per_class)] + list(extra)
    return pd.DataFrame(
        {"text": [t for t, _ in rows], "label": [lab for _, lab in rows], "line": range(2, len(rows) + 2)}
    ).astype({"text": object, "label": object})


def with_null(frame: pd.DataFrame, column: str, row: int) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[row, column] = None
    return frame


@pytest.fixture(scope="module")
def good_report():
    return validate_frame(make_frame(), make_cfg(), SOURCE)


def test_clean_frame_passes(good_report):
    assert good_report.success and good_report.failed == []
    assert [c.name for c in good_report.checks] == CHECKS
    assert good_report.row_count == 80 and good_report.source == SOURCE
    assert all(c.examples == [] for c in good_report.checks)
    assert "passed" in validation_summary(good_report) and "12/12" in validation_summary(good_report)


# name: (frame, validation settings, failing check, text expected in the examples or None)
FAILURES = {
    "bad_label": (make_frame(extra=[("hello there", "eggs")]), {}, "label_in_set", "line 82: 'eggs'"),
    "null_text": (with_null(make_frame(), "text", 3), {}, "text_not_null", "line 5: None"),
    "null_label": (with_null(make_frame(), "label", 10), {}, "label_not_null", "line 12: None"),
    "blank_text": (make_frame(extra=[(" \t ", "ham")]), {}, "text_not_blank", "line 82: ' \\t '"),
    "invisible_text": (make_frame(extra=[("\u200b\u2060\ufeff ", "ham")]), {}, "text_not_blank", "line 82: "),
    "too_long": (make_frame(extra=[("x" * 50, "spam")]), {"max_text_chars": 40}, "text_length", "line 82: 'xxxx"),
    "too_short": (make_frame(extra=[("hi", "spam")]), {"min_text_chars": 3}, "text_length", "line 82: 'hi'"),
    "few_rows": (make_frame().iloc[:45], {}, "rows_per_class", "label spam: 5"),
    # 30 copies of an existing text, differing only in case/whitespace: 80 unique of 110 rows
    "duplicates": (
        make_frame(extra=[(f" HAM  message{' ' * (i % 3 + 1)}number 1", "ham") for i in range(30)]),
        {},
        "duplicate_rate",
        None,
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_each_failure_is_found_by_its_check(case):
    frame, settings, check, example = FAILURES[case]
    report = validate_frame(frame, make_cfg(**settings), SOURCE)
    assert not report.success
    assert [c.name for c in report.failed] == [check]  # every other check still passes
    failed = report.failed[0]
    assert failed.fix and failed.rule
    if example is None:
        # in the rule's own terms ("at most 10 % of rows repeat"), not GE's share of unique values (80/110)
        assert failed.observed == "30 of 110 rows (27.3%) repeat another row"
    else:
        assert any(e.startswith(example) for e in failed.examples), failed.examples


def test_all_null_text_is_reported_not_raised():
    report = validate_frame(make_frame().assign(text=None), make_cfg(), SOURCE)
    assert "text_not_null" in [c.name for c in report.failed]


@pytest.fixture(scope="module")
def multi_failure_report():
    frame = make_frame(extra=[("hello there", "eggs"), ("y" * 70, "ham"), ("   ", "spam")])
    return validate_frame(frame, make_cfg(max_text_chars=50, max_failed_examples=1), SOURCE)


def test_validation_failed_message(multi_failure_report):
    err = ValidationFailed(multi_failure_report)
    assert isinstance(err, DataError) and err.report is multi_failure_report
    msg = str(err)
    assert "FAILED" in msg and "sms-train.csv" in msg and "(83 rows)" in msg and "9/12 expectations met" in msg
    names = {c.name for c in multi_failure_report.failed}
    assert names == {"label_in_set", "text_length", "text_not_blank"}
    for name in names:
        assert f"x {name} [" in msg
    assert msg.count("fix: ") == 3
    assert "fix: fix those rows, or add the label to data.labels" in msg
    assert "offending: line 82: 'eggs'" in msg and "offending: line 83: 'yyy" in msg


def test_long_examples_are_shortened(multi_failure_report):
    (example,) = next(c for c in multi_failure_report.failed if c.name == "text_length").examples
    assert example == "line 83: " + repr("y" * 57 + "...")


def test_text_length_mostly_tolerates_a_small_share():
    one_long = make_frame(extra=[("x" * 50, "spam")])  # 1 of 81 rows (1.2 %)
    report = validate_frame(one_long, make_cfg(max_text_chars=40, text_length_mostly=0.95), SOURCE)
    assert report.success
    length = next(c for c in report.checks if c.name == "text_length")
    assert "at least 95.0% of rows" in length.rule and length.observed.startswith("1 of 81 rows")

    many_long = make_frame(extra=[("x" * 50, "spam")] * 10)  # 10 of 90 rows (11 %)
    report = validate_frame(many_long, make_cfg(max_text_chars=40, text_length_mostly=0.95), SOURCE)
    assert [c.name for c in report.failed] == ["text_length"]


def test_report_to_json_is_serialisable(good_report, multi_failure_report):
    for report in (good_report, multi_failure_report):
        data = json.loads(json.dumps(report.to_json()))
        assert data["source"] == SOURCE and data["success"] is report.success
        assert [c["name"] for c in data["checks"]] == CHECKS
        assert set(data["great_expectations"]) == {"schema", "rows", "classes"}
    failed = {
        c["name"]: c for c in json.loads(json.dumps(multi_failure_report.to_json()))["checks"] if not c["success"]
    }
    assert failed["label_in_set"]["examples"] == ["line 82: 'eggs'"]


def test_data_docs_are_written_to_a_relative_folder(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)  # a landing zone configured as data/sms resolves against the cwd
    report = validate_frame(make_frame(), make_cfg(), SOURCE, docs_dir=Path("docs"))
    assert (tmp_path / "docs" / "index.html").exists() and report.docs_index.endswith("index.html")


def test_observed_values_read_in_the_rules_terms():
    few = validate_frame(make_frame().iloc[:45], make_cfg(), SOURCE).failed[0]
    assert few.name == "rows_per_class" and few.observed == "rows per label: 'ham': 40, 'spam': 5"
    assert few.offending == [{"label": "spam", "value": "5"}]
    skewed = validate_frame(make_frame().iloc[:50], make_cfg(max_class_imbalance=3), SOURCE)
    imbalance = next(c for c in skewed.checks if c.name == "class_imbalance")
    assert imbalance.status == "warn" and imbalance.observed == "largest class 'ham' (40 rows) vs 'spam' 4.0x"


def test_offending_rows_carry_line_text_and_label():
    frame = make_frame(extra=[("hello there", "eggs"), ("second bad one", "bacon")])
    failed = validate_frame(frame, make_cfg(), SOURCE).failed[0]
    assert failed.name == "label_in_set"
    assert failed.offending == [
        {"line": 82, "text": "hello there", "label": "eggs"},
        {"line": 83, "text": "second bad one", "label": "bacon"},
    ]
    too_long = validate_frame(make_frame(extra=[("x" * 50, "spam")]), make_cfg(max_text_chars=40), SOURCE).failed[0]
    assert too_long.offending == [{"line": 82, "text": "x" * 50, "label": "spam"}]


@pytest.mark.parametrize(
    ("check", "extra", "data_fix"),
    [
        ("text_encoding", [("caf\u00c3\u00a9 at noon?", "ham")], "re-export the data as UTF-8"),  # 1 of 101 rows
        ("duplicate_rate", [("ham message number 1", "ham")] * 40, "deduplicate the file"),
    ],
)
def test_a_failure_that_may_be_tolerated_names_the_setting_that_tolerates_it(check, extra, data_fix):
    frame = make_frame(per_class=50, extra=extra)
    report = validate_frame(frame, make_cfg(), SOURCE, config_file="configs/corpus.yaml")
    (failed,) = report.failed
    assert failed.name == check and data_fix in failed.fix  # the data fix first, then the knowing way to accept it
    assert f"validation.severity.{check}: warn in configs/corpus.yaml" in failed.fix
    assert f"validation.severity.{check}: warn in configs/corpus.yaml" in validation_summary(report)
    tolerated = validate_frame(frame, make_cfg(severity={check: "warn"}), SOURCE)
    assert tolerated.success and [c.name for c in tolerated.warnings] == [check]  # the setting does what it says
    assert "validation.severity" not in tolerated.warnings[0].fix  # already tolerated: nothing more to set


def test_a_failure_that_cannot_be_tolerated_names_only_the_data_fix():
    report = validate_frame(make_frame(extra=[("hello there", "eggs")]), make_cfg(), SOURCE)
    (failed,) = report.failed
    assert failed.name == "label_in_set" and "validation.severity" not in failed.fix  # essential: must stay error
