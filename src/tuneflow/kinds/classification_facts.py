"""Kind classification as data (see ``tuneflow.kinds.facts``): light, read by the config at load time."""

from __future__ import annotations

from typing import Any

from tuneflow.kinds.facts import CheckRow, Expected, KindFacts


def _check_config(cfg: Any) -> None:
    if len(cfg.data.labels) < 2:
        raise ValueError(
            f"data.labels lists {len(cfg.data.labels)} label(s); kind classification needs at least two, "
            "e.g. labels: [ham, spam]"
        )


CHECK_ROWS = {
    r.name: r
    for r in (
        CheckRow(
            "label_type",
            "schema",
            "labels are strings or integers",
            "str / int",
            "store '{d.label_column}' as text or integer codes (not floats); map codes with data.label_values",
            "ExpectColumnValuesToBeInTypeList",
            "label",
            {"type_list": "label_types"},
            essential=True,
        ),
        CheckRow(
            "text_tokens",
            "rows",
            "texts fit in {tokens} tokens of the model's tokenizer",
            "<= {tokens} tokens",
            "longer texts are truncated in training: shorten them, or raise model.max_length / "
            "validation.max_text_tokens",
            "ExpectColumnValuesToBeBetween",
            "text_tokens",
            {"max_value": "tokens"},
            severity="warn",
            needs_tokenizer=True,
        ),
        CheckRow(
            "label_in_set",
            "rows",
            "labels are one of {d.labels}",
            "{label_set}",
            "fix those rows, or add the label to data.labels (or map it with data.label_values)",
            "ExpectColumnValuesToBeInSet",
            "label",
            {"value_set": "labels"},
            essential=True,
        ),
        CheckRow(
            "label_conflict",
            "rows",
            "the same text never has two different labels",
            "0 rows",
            "decide the right label for those texts and fix the rows (here or in the accepted data)",
            "ExpectTextsToHaveOneLabel",
        ),
        CheckRow(
            "rows_per_class",
            "classes",
            "every label has at least {v.min_rows_per_class} rows",
            ">= {v.min_rows_per_class} rows",
            "add rows for those labels, or lower validation.min_rows_per_class",
            "ExpectColumnValuesToBeBetween",
            "rows",
            {"min_value": "min_rows"},
        ),
        CheckRow(
            "class_imbalance",
            "classes",
            "the largest class has at most {v.max_class_imbalance:g}x the rows of each other class",
            "<= {v.max_class_imbalance:g}x",
            "add rows for the small classes, or raise validation.max_class_imbalance",
            "ExpectColumnValuesToBeBetween",
            "imbalance",
            {"max_value": "max_imbalance"},
            severity="warn",
        ),
        CheckRow(
            "drift_labels",
            "drift",
            "the label distribution matches the accepted data",
            "p >= {v.drift_p_value}",
            "check the source of this batch; if the shift is real, set validation.severity.drift_labels: warn",
            "ExpectLabelDistributionToMatchAccepted",
            args={"min_value": "drift_p"},
            severity="warn",
            needs_reference=True,
        ),
    )
}

FACTS = KindFacts(
    name="classification",
    metrics=("macro_f1", "accuracy"),
    default_metric="macro_f1",
    shown_metrics=("accuracy", "macro_f1"),
    checks=(
        "text_type",
        "label_type",
        "text_not_null",
        "text_not_blank",
        "text_length",
        "text_tokens",
        "text_encoding",
        "label_not_null",
        "label_in_set",
        "duplicate_rate",
        "label_conflict",
        "repeats_accepted",
        "rows_per_class",
        "class_imbalance",
        "drift_labels",
        "drift_text_length",
    ),
    check_rows=CHECK_ROWS,
    words={
        "text": "text",
        "texts": "texts",
        "label": "label",
        "in_texts": "",
        "repeat_of": "text",
        "repeat_pair": "",
        "length_drift": "the text-length distribution matches the accepted data",
        "dup_column": "text_normalized",
    },
    shape="labeled",
    expected=Expected(
        "text-classification",
        "TextClassificationPipeline",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION",
        None,
        None,
        {"truncation": bool, "max_length": int},
    ),
    card="classification",
    implementation="classification:Classification",
    labels_in_both_splits=True,
    digest_has_kind=False,  # kind joined the config after the first classification versions were registered
    check_config=_check_config,
)
