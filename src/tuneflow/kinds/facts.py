"""What a kind of fine-tuning is, as data: light enough for ``tuneflow.config`` to read at load time.

Each kind module has a facts module beside it (``<kind>_facts.py``) with one ``KindFacts``: its metrics, its
config cross-checks, its data checks (a table of ``CheckRow``; the rows every kind shares are ``COMMON_CHECKS``
here), the shape its rows are validated as, what its logged MLmodel holds, its cache-key part and its card.
The stages read these facts (``tuneflow.kinds.facts_of(cfg.kind)``); none tests a kind's name.

Nothing here imports torch, transformers, pandas or another tuneflow module: the config imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warn", "off"]
Table = Literal["schema", "rows", "classes", "drift"]


@dataclass(frozen=True)
class CheckRow:
    """One data check, declared: the validation code builds its Great Expectations expectation and report.

    ``rule``, ``threshold``, ``fix`` and ``column`` are ``str.format`` templates over the check context
    (``tuneflow.validation.check_context``: ``v`` = cfg.validation, ``d`` = cfg.data, the kind's words, the
    user's column names, limits); ``args`` maps each keyword of the expectation to a key of that context.
    """

    name: str
    table: Table
    rule: str
    threshold: str
    fix: str
    expectation: str  # a class of great_expectations.expectations, or of tuneflow.expectations
    column: str | None = None  # None: the expectation's own (derived) column
    args: Mapping[str, str] = field(default_factory=dict)
    severity: Severity = "error"  # the default; validation.severity.<name> overrides it
    essential: bool = False  # training cannot use a failing row at all: cannot be set to warn or off
    needs_reference: bool = False  # compares with accepted data: skipped without any
    needs_tokenizer: bool = False  # counts tokens: skipped without the base model's tokenizer


@dataclass(frozen=True)
class Expected:
    """What a kind's MLmodel holds: the MLflow task and pipeline, the auto-mapping whose classes are allowed,
    the inference task and metadata of a chat model, and the serving options (name -> type) tuneflow logs."""

    task: str
    pipeline: str
    mapping: str
    inference_task: str | None
    metadata: dict[str, str] | None
    config: dict[str, type]
    adapters: bool = False  # its versions may be adapter-only (PEFT adapter + a pinned local base folder)


@dataclass(frozen=True)
class KindFacts:
    name: str
    metrics: tuple[str, ...]  # what evaluate.primary_metric may be
    default_metric: str  # evaluate.primary_metric when the config does not set it
    shown_metrics: tuple[str, ...]  # the eval metrics the CLI prints after a retrain
    checks: tuple[str, ...]  # the kind's data checks, in report order (names of COMMON_CHECKS or check_rows)
    check_rows: Mapping[str, CheckRow]  # the checks only this kind has
    words: Mapping[str, str]  # how the checks' rules name what they check (keys: see COMMON_CHECKS' templates)
    shape: Literal["labeled", "chat"]  # validation's derived columns (tuneflow.validation.SHAPES)
    expected: Expected  # what the trust check expects in a version's MLmodel
    card: str  # the model card's renderer (tuneflow.reporting.CARDS)
    implementation: str  # its FineTuningKind, "module:Class" in tuneflow.kinds (imported by get_kind on first use)
    reads_chat: bool = False  # data is read as prompt/response rows with the config's sft section
    labels_in_both_splits: bool = False  # every configured label must be in both the train and eval split
    dedupe_pairs: bool = False  # rows that repeat a prompt/response pair are dropped before training
    digest_has_kind: bool = True  # False: the config digest leaves out `kind` and `sft` (versions before kinds)
    # the settings `tuneflow tune` may search for this kind (names of tuneflow.config.SEARCH_FIELDS)
    tunable: frozenset[str] = frozenset(
        {"learning_rate", "epochs", "batch_size", "warmup_ratio", "weight_decay", "base_models"}
    )
    check_config: Callable[[Any], None] = lambda cfg: None  # cross-field checks of a PipelineConfig (ValueError)
    cache_key_part: Callable[[Any], dict[str, Any]] = lambda tokenizer: {}  # added to the tokenization cache key
    shape_part: Callable[[Any], dict[str, Any]] = lambda cfg: {}  # added to a landing zone's recorded data shape

    def rows(self) -> list[CheckRow]:
        """The kind's checks, in report order."""
        table = {**COMMON_CHECKS, **self.check_rows}
        return [table[name] for name in self.checks]

    @property
    def token_checks(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rows() if r.needs_tokenizer)


# Blank: nothing but whitespace and invisible format characters (zero-width spaces and joiners, direction
# marks, word joiner, BOM, soft hyphen), which a text made only of looks empty and tokenizes to nothing.
BLANK_REGEX = r"^[\s\u00ad\u034f\u061c\u115f\u1160\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufeff]*$"

_REEXPORT = "re-export the data as UTF-8 from its source (text decoded with the wrong codec looks like 'Ã©')"


def _rows(*rows: CheckRow) -> dict[str, CheckRow]:
    return {r.name: r for r in rows}


# The checks every kind has. The kind's words fill in: text / texts (what TEXT holds), label (what LABEL holds),
# in_texts (where the encoding check looks), repeat_of / repeat_pair (what makes a repeat),
# length_drift (the length-drift rule), dup_column (the column duplicate_rate counts).
COMMON_CHECKS = _rows(
    CheckRow(
        "text_type",
        "schema",
        "{texts} are strings",
        "str",
        "store '{text_col}' as text (quote numbers in CSV, strings in JSONL/Parquet)",
        "ExpectColumnValuesToBeInTypeList",
        "text",
        {"type_list": "str_types"},
        essential=True,
    ),
    CheckRow(
        "text_not_null",
        "rows",
        "every row has a {text}",
        "0 nulls",
        "fill or drop rows with an empty '{text_col}'",
        "ExpectColumnValuesToNotBeNull",
        "text",
        essential=True,
    ),
    CheckRow(
        "text_not_blank",
        "rows",
        "no {text} is only whitespace",
        "0 rows",
        "drop rows whose '{text_col}' is blank",
        "ExpectColumnValuesToNotMatchRegex",
        "text",
        {"regex": "blank_regex"},
    ),
    CheckRow(
        "text_length",
        "rows",
        "{text} length is {v.min_text_chars}..{v.max_text_chars} characters{mostly_rule}",
        "{v.min_text_chars}..{v.max_text_chars} chars{mostly_threshold}",
        "drop or shorten those rows, or change validation.min_text_chars / max_text_chars",
        "ExpectColumnValueLengthsToBeBetween",
        "text",
        {"min_value": "min_chars", "max_value": "max_chars", "mostly": "length_mostly"},
    ),
    CheckRow(
        "text_encoding",
        "rows",
        "no control characters or broken encoding (mojibake){in_texts}",
        "0 rows",
        _REEXPORT,
        "ExpectTextToBeCleanUnicode",
        "text",
    ),
    CheckRow(
        "label_not_null",
        "rows",
        "every row has a {label}",
        "0 nulls",
        "fill or drop rows with an empty '{label_col}'",
        "ExpectColumnValuesToNotBeNull",
        "label",
        essential=True,
    ),
    CheckRow(
        "duplicate_rate",
        "rows",
        "at most {v.max_duplicate_rate:.0%} of rows repeat another row's {repeat_of}",
        "<= {v.max_duplicate_rate:.0%}",
        "deduplicate the file, or raise validation.max_duplicate_rate",
        "ExpectColumnProportionOfUniqueValuesToBeBetween",
        "{dup_column}",
        {"min_value": "unique_share"},
    ),
    CheckRow(
        "repeats_accepted",
        "rows",
        "at most {v.max_repeat_share:.0%} of rows repeat already-accepted data{repeat_pair}",
        "<= {v.max_repeat_share:.0%}",
        "send only new rows (was this batch delivered twice?), or raise validation.max_repeat_share",
        "ExpectRowsToBeNewData",
        args={"mostly": "new_share"},
        needs_reference=True,
    ),
    CheckRow(
        "drift_text_length",
        "drift",
        "{length_drift}",
        "p >= {v.drift_p_value}",
        "check the source of this batch (truncated or concatenated texts?); if real, relax validation.drift_p_value",
        "ExpectTextLengthDistributionToMatchAccepted",
        args={"min_value": "drift_p"},
        severity="warn",
        needs_reference=True,
    ),
)
