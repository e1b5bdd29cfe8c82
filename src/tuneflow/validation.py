"""Validation: check the data with a Great Expectations suite before anything is trained on it.

Each check is one Great Expectations expectation (built-in, or a subclass in ``tuneflow.expectations``)
plus a human rule, a threshold, a fix and a severity (``error`` stops the run, ``warn`` is reported,
``off`` skips it; defaults in ``tuneflow.config.DEFAULT_SEVERITY``). The checks are declarations, not code:
a ``tuneflow.kinds.facts.CheckRow`` each, in ``COMMON_CHECKS`` (every kind) or in a kind's own table
(``KindFacts.check_rows``); the kind lists which run, in report order. ``build_checks`` fills a row's
templates from the config (``check_context``). Adding a check means adding one row. Checks run on four small
tables derived from the batch, in the shape the kind names (``KindFacts.shape``; ``SHAPES``):

- ``schema``: the text and label columns as the file typed them (index = line in the file);
- ``rows``: one row per record (index = line) with derived columns: normalized text, token count,
  whether the text conflicts with another label, whether it was accepted before (kind sft: the
  normalized prompt + response pair, the templated token counts, whether the prompt has another response);
- ``classes``: rows and imbalance per configured label (shape ``labeled`` only);
- ``drift``: p-values of the batch against accepted data (only when there is accepted data).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tuneflow.chat_formats import LAYOUTS, column_names
from tuneflow.config import ESSENTIAL_CHECKS, PipelineConfig, Severity
from tuneflow.data import CONTEXT, LABEL, LINE, PROBLEM, TEXT, DataError, LoadedData, normalized, row_key
from tuneflow.kinds.catalog import facts_of
from tuneflow.kinds.facts import BLANK_REGEX, CheckRow, Table
from tuneflow.reporting import validation_html, validation_summary
from tuneflow.validation_report import CheckResult, ValidationReport

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TABLES: tuple[Table, ...] = ("schema", "rows", "classes", "drift")
NORM = "text_normalized"
TOKENS = "text_tokens"
CONFLICT = "label_conflict"
SEEN = "seen_before"
ROWS = "rows"
IMBALANCE = "imbalance"
LABEL_P = "label_drift_p_value"
LENGTH_P = "length_drift_p_value"
# kind sft
PAIR = "pair_normalized"  # what makes two rows the same row: normalized prompt, response and context
PROMPT_TOKENS = "prompt_tokens"  # the templated prompt (context + prompt + generation prompt)
PAIR_TOKENS = "pair_tokens"  # the templated prompt + response, as trained
RESPONSE_CONFLICT = "response_conflict"
LENGTH_OF = "length_of"  # index of kind sft's drift table: prompt length, response length
# beside each p-value in the drift table: what was compared, in words (not checked; for the observed value)
LABEL_NOTE = "label_drift_compared"
LENGTH_NOTE = "length_drift_compared"
SCHEMA_CHECKS = ("text_type", "label_type", "response_type")  # when one fails, the row checks are skipped
# Any tokenizer here makes at most one token per UTF-8 byte, plus a few special tokens; a text whose
# byte length plus this margin is within the token limit cannot exceed it and is not tokenized.
_TOKEN_MARGIN = 8
_LABEL_TYPES = ["str", "int", "int64", "int32", "bool", "bool_"]


@dataclass(frozen=True)
class Check:
    name: str
    table: Table
    rule: str
    threshold: str
    fix: str
    expectation: Callable[[], Any]  # builds the GE expectation (GE is imported lazily)
    needs_reference: bool = False
    needs_tokenizer: bool = False


class ValidationFailed(DataError):
    """The data broke at least one expectation of severity ``error``; nothing downstream may run on it."""

    def __init__(self, report: ValidationReport):
        super().__init__(validation_summary(report), check=report.failed[0].name if report.failed else "validation")
        self.report = report


def failure_report(source: str, error: DataError) -> ValidationReport:
    """A report for a file that could not even be read (so no expectation could run)."""
    return ValidationReport(
        source=source,
        row_count=0,
        checks=[
            CheckResult(
                name=error.check,
                expectation="(read)",
                column="(file)",
                rule="the file is a readable batch",
                success=False,
                observed=str(error),
                fix=str(error).rpartition("Fix:")[2].strip() or "see the message",
            )
        ],
        raw={},
    )


def _column_names(cfg: PipelineConfig) -> tuple[str, str]:
    """The names a user knows the text and label columns by: kind sft's prompt and response columns (or the
    turns of its messages column), else data.text_column / data.label_column."""
    if not facts_of(cfg.kind).reads_chat:
        return cfg.data.text_column, cfg.data.label_column
    return column_names(cfg.data.format if cfg.data.format in LAYOUTS else None, cfg.sft)


def check_context(cfg: PipelineConfig) -> dict[str, Any]:
    """What a ``CheckRow``'s templates and expectation arguments are filled from."""
    v, d = cfg.validation, cfg.data
    text_col, label_col = _column_names(cfg)
    partial = v.text_length_mostly < 1
    return {
        **facts_of(cfg.kind).words,
        "v": v,
        "d": d,
        "text_col": text_col,
        "label_col": label_col,
        "tokens": v.max_text_tokens or cfg.model.max_length,
        "limit": cfg.model.max_length,  # kind sft: what training truncates prompt + response to
        "limit_below": cfg.model.max_length - 1,
        "mostly_rule": f" for at least {v.text_length_mostly:.1%} of rows" if partial else "",
        "mostly_threshold": f", mostly {v.text_length_mostly}" if partial else "",
        "min_chars": v.min_text_chars,
        "max_chars": v.max_text_chars,
        "length_mostly": v.text_length_mostly,
        "unique_share": 1.0 - v.max_duplicate_rate,
        "new_share": 1.0 - v.max_repeat_share if v.max_repeat_share < 1 else 0.0,
        "min_rows": v.min_rows_per_class,
        "max_imbalance": v.max_class_imbalance,
        "drift_p": v.drift_p_value,
        "labels": list(d.labels),
        "label_set": ", ".join(d.labels),
        "str_types": ["str"],
        "label_types": _LABEL_TYPES,
        "blank_regex": BLANK_REGEX,
    }


def _expectation(row: CheckRow, ctx: dict[str, Any]) -> Callable[[], Any]:
    """Builds the row's GE expectation when called (Great Expectations is imported lazily: 3.5 s)."""

    def build() -> Any:
        import great_expectations.expectations as gxe

        from tuneflow import expectations as tfx

        cls = getattr(gxe, row.expectation, None) or getattr(tfx, row.expectation)
        kwargs = {name: ctx[key] for name, key in row.args.items()}
        if row.column is not None:
            kwargs["column"] = row.column.format(**ctx)
        return cls(**kwargs)

    return build


def build_checks(cfg: PipelineConfig) -> list[Check]:
    """The checks of ``cfg.kind``, in report order (every severity, ``off`` included)."""
    ctx = check_context(cfg)
    return [
        Check(
            row.name,
            row.table,
            row.rule.format(**ctx),
            row.threshold.format(**ctx),
            row.fix.format(**ctx),
            _expectation(row, ctx),
            needs_reference=row.needs_reference,
            needs_tokenizer=row.needs_tokenizer,
        )
        for row in facts_of(cfg.kind).rows()
    ]


def _token_counts(texts: pd.Series, tokenizer: PreTrainedTokenizerBase, limit: int) -> pd.Series:
    """Token counts for the texts that could exceed ``limit``; NaN (not checked) for the rest."""
    from tokenizers import Tokenizer

    counts = pd.Series(np.nan, index=texts.index, dtype="float64")
    nbytes = texts.map(lambda t: len(t.encode("utf-8")) if isinstance(t, str) else 0)
    candidates = texts[nbytes + _TOKEN_MARGIN > limit]
    if len(candidates):
        # A private copy of the Rust tokenizer: no truncation or padding state leaks in or out, and
        # encode_batch_fast (no offsets) is about 2x faster than the transformers call.
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        # Past 64 bytes per allowed token, a prefix is enough to know the text is over the limit.
        clipped = [t[: limit * 64] for t in candidates]
        # tuneflow turns the tokenizers' thread pool off process-wide (TOKENIZERS_PARALLELISM=false,
        # because forking after it was used warns and disables it); this call forks nothing, and the
        # second core shortens the gate's longest step.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        try:
            encodings = backend.encode_batch_fast(clipped, add_special_tokens=True)
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
        counts.loc[candidates.index] = [len(e) for e in encodings]
    return counts


def _sft_token_counts(rows: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, limit: int) -> pd.DataFrame:
    """Templated token counts (``tuneflow.kinds.sft.token_lengths``) of the rows whose prompt + response could
    exceed ``limit``; NaN (not checked) for the rest and for rows without a prompt or a response.

    The tokenizer must carry its chat template (``tuneflow.kinds.sft.prepare_tokenizer``). Rendering the
    template without tokenizing costs about a fifth of a count; a row whose rendered text has at most
    ``limit - _TOKEN_MARGIN`` UTF-8 bytes cannot reach ``limit`` tokens and is not counted.
    """
    from tuneflow.kinds.sft import prompt_messages, token_lengths

    counts = pd.DataFrame(np.nan, index=rows.index, columns=[PROMPT_TOKENS, PAIR_TOKENS], dtype="float64")
    clip = limit * 64  # past 64 characters per allowed token, a prefix is enough to know a text is over
    picked = []
    for i, (p, r, c) in enumerate(zip(rows[TEXT], rows[LABEL], rows[CONTEXT], strict=True)):
        if isinstance(p, str) and isinstance(r, str):
            chat = [*prompt_messages(p[:clip], c), {"role": "assistant", "content": r[:clip]}]
            if len(tokenizer.apply_chat_template(chat, tokenize=False).encode("utf-8")) + _TOKEN_MARGIN > limit:
                picked.append(i)
    if picked:
        candidates = rows.iloc[picked][[TEXT, LABEL, CONTEXT]].reset_index(drop=True)
        candidates[TEXT] = candidates[TEXT].str.slice(0, clip)
        candidates[LABEL] = candidates[LABEL].str.slice(0, clip)
        lengths = token_lengths(tokenizer, candidates)
        counts.iloc[picked] = lengths[[PROMPT_TOKENS, PAIR_TOKENS]].to_numpy(dtype="float64")
    return counts


def _with_context(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the chat columns a reader of prompt/response columns leaves out (context, record problem)."""
    missing = {c: None for c in (CONTEXT, PROBLEM) if c not in table.columns}
    return table.assign(**missing) if missing else table


def _prompt_responses(table: pd.DataFrame) -> pd.DataFrame:
    """Per row: the prompt key (the normalized prompt and the row's context: the same question asked after
    other turns is another question) and the normalized response; None where the row lacks either."""
    response = normalized(table[LABEL])
    prompt = table[NORM].where(table[NORM].notna() & response.notna(), None)
    return pd.DataFrame({"prompt": prompt + "\x1f" + table[CONTEXT].fillna(""), "response": response})


def _sft_columns(
    rows: pd.DataFrame,
    reference: pd.DataFrame | None,
    tokenizer: PreTrainedTokenizerBase | None,
    limit: int,
    wanted: set[str],
) -> None:
    """Kind sft's derived columns of ``rows`` (text, label, normalized text and context, index = line): the
    pair key, the templated token counts, whether the prompt has another response, and whether the pair was
    accepted before."""
    rows[PAIR] = row_key(rows, rows[NORM])  # what the landing zone deduplicates accepted data by
    if tokenizer is not None and wanted & {PROMPT_TOKENS, PAIR_TOKENS}:
        counts = _sft_token_counts(rows, tokenizer, limit)
        rows[PROMPT_TOKENS], rows[PAIR_TOKENS] = counts[PROMPT_TOKENS], counts[PAIR_TOKENS]
    mine = _prompt_responses(rows)
    if reference is not None:
        reference = _with_context(reference)
    theirs = _prompt_responses(reference) if reference is not None else mine.iloc[:0]
    answers = pd.concat([mine, theirs], ignore_index=True).dropna().groupby("prompt")["response"].nunique()
    rows[RESPONSE_CONFLICT] = mine["prompt"].isin(set(answers[answers > 1].index))
    if reference is not None:
        rows[SEEN] = rows[PAIR].isin(set(row_key(reference, reference[NORM])))


def _labeled_columns(
    rows: pd.DataFrame,
    frame: pd.DataFrame,
    cfg: PipelineConfig,
    reference: pd.DataFrame | None,
    tokenizer: PreTrainedTokenizerBase | None,
    wanted: set[str],
) -> dict[Table, pd.DataFrame]:
    """Shape ``labeled`` (text, label): the token counts, whether a text has another label, whether it was
    accepted before, and the per-label table."""
    v = cfg.validation
    if "text_tokens" in wanted and tokenizer is not None:
        rows[TOKENS] = _token_counts(rows[TEXT], tokenizer, v.max_text_tokens or cfg.model.max_length)
    pairs = rows[[NORM, LABEL]].dropna()
    ref_pairs = reference[[NORM, LABEL]].dropna() if reference is not None else pairs.iloc[:0]
    both = pd.concat([pairs, ref_pairs], ignore_index=True)
    label_sets = both.groupby(NORM)[LABEL].nunique()
    rows[CONFLICT] = rows[NORM].isin(set(label_sets[label_sets > 1].index))
    if reference is not None:
        rows[SEEN] = rows[NORM].isin(set(reference[NORM]))
    counts = frame[LABEL].value_counts()
    per_label = np.array([int(counts.get(lab, 0)) for lab in cfg.data.labels])
    largest = per_label.max() if len(per_label) else 0
    # An empty class has no ratio (NaN: GE skips it); rows_per_class reports it instead.
    imbalance = [float(largest / n) if n else np.nan for n in per_label]
    classes = pd.DataFrame({ROWS: per_label, IMBALANCE: imbalance}, index=pd.Index(cfg.data.labels, name=LABEL))
    return {"rows": rows, "classes": classes}


def _labeled_drift(frame: pd.DataFrame, reference: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """Shape ``labeled``: the batch's label distribution and text lengths against the accepted data."""
    from scipy.stats import chi2_contingency, ks_2samp

    counts, ref_counts = frame[LABEL].value_counts(), reference[LABEL].value_counts()
    per_label = np.array([int(counts.get(lab, 0)) for lab in cfg.data.labels])
    table = np.array([per_label, [int(ref_counts.get(lab, 0)) for lab in cfg.data.labels]])
    table = table[:, table.sum(axis=0) > 0]
    # No test without two labels seen and rows on both sides (label_in_set reports unknown labels).
    testable = table.shape[1] > 1 and (table.sum(axis=1) > 0).all()
    label_p = float(chi2_contingency(table)[1]) if testable else 1.0
    lengths = frame[TEXT].dropna().str.len()
    length_p = float(ks_2samp(lengths, reference[TEXT].str.len()).pvalue) if len(lengths) else 1.0
    batch_n, accepted_n = max(int(per_label.sum()), 1), max(len(reference), 1)
    shares = [
        f"{lab!r} {n / batch_n:.0%} vs {int(ref_counts.get(lab, 0)) / accepted_n:.0%}"
        for lab, n in zip(cfg.data.labels, per_label, strict=True)
    ]
    label_note = (
        f"labels in the batch vs accepted data: {', '.join(shares)}" if testable else "no two labels to compare"
    )
    return pd.DataFrame(
        {
            LABEL_P: [label_p],
            LENGTH_P: [length_p],
            LABEL_NOTE: [label_note],
            LENGTH_NOTE: [_length_note("text length", lengths, reference[TEXT].dropna().str.len())],
        },
        index=pd.Index(["batch"], name="vs_accepted"),
    )


def _chat_columns(
    rows: pd.DataFrame,
    frame: pd.DataFrame,
    cfg: PipelineConfig,
    reference: pd.DataFrame | None,
    tokenizer: PreTrainedTokenizerBase | None,
    wanted: set[str],
) -> dict[Table, pd.DataFrame]:
    """Shape ``chat`` (prompt, response, context): ``_sft_columns``; the context is not checked."""
    _sft_columns(rows, reference, tokenizer, cfg.model.max_length, wanted)
    return {"rows": rows.drop(columns=CONTEXT)}  # the chat JSON: not checked, kept out of the reports


def _chat_drift(frame: pd.DataFrame, reference: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """Shape ``chat``: prompt and response lengths, one row each: a failed check names the side that drifted."""
    from scipy.stats import ks_2samp

    p_values, notes = [], []
    for column, what in ((TEXT, "prompt length"), (LABEL, "response length")):
        lengths, accepted = frame[column].dropna().str.len(), reference[column].dropna().str.len()
        p_values.append(float(ks_2samp(lengths, accepted).pvalue) if len(lengths) and len(accepted) else 1.0)
        notes.append(_length_note(what, lengths, accepted))
    return pd.DataFrame(
        {LENGTH_P: p_values, LENGTH_NOTE: notes},
        index=pd.Index(["prompt length", "response length"], name=LENGTH_OF),
    )


@dataclass(frozen=True)
class Shape:
    """How a kind's rows are validated: the file columns kept, the derived columns and tables, the drift
    table, the column that makes two rows the same row, and how the derived columns are named to a user."""

    columns: tuple[str, ...]
    derive: Callable[..., dict[Table, pd.DataFrame]]
    drift: Callable[[pd.DataFrame, pd.DataFrame, PipelineConfig], pd.DataFrame]
    row_key: str
    user_columns: Callable[[str, str], dict[str, str]] = lambda text, label: {}


SHAPES: dict[str, Shape] = {
    "labeled": Shape((TEXT, LABEL), _labeled_columns, _labeled_drift, NORM),
    "chat": Shape(
        (TEXT, LABEL, CONTEXT, PROBLEM),
        _chat_columns,
        _chat_drift,
        PAIR,
        lambda text, label: {
            PROBLEM: "the record (what is wrong with it)",
            PAIR: f"{text} + {label} (normalized)",
            PROMPT_TOKENS: f"{text} tokens (chat template)",
            PAIR_TOKENS: f"{text} + {label} tokens (chat template)",
            RESPONSE_CONFLICT: f"{label} per {text} (normalized)",
            SEEN: f"{text} + {label} (normalized) in accepted data",
            LENGTH_P: f"{text} / {label} length drift (p-value)",
        },
    ),
}


def shape_of(cfg: PipelineConfig) -> Shape:
    return SHAPES[facts_of(cfg.kind).shape]


def _tables(
    frame: pd.DataFrame,
    cfg: PipelineConfig,
    raw: pd.DataFrame | None,
    reference: pd.DataFrame | None,
    tokenizer: PreTrainedTokenizerBase | None,
    wanted: set[str],
) -> dict[Table, pd.DataFrame]:
    v = cfg.validation
    shape = shape_of(cfg)
    if CONTEXT in shape.columns:
        frame = _with_context(frame)
    columns = list(shape.columns)
    if NORM in frame.columns:  # computed once by the caller (the gate keeps it for the next batch)
        rows = frame.set_index(LINE)[[*columns, NORM]].copy()
    else:
        rows = frame.set_index(LINE)[columns].copy()
        rows[NORM] = normalized(rows[TEXT])
    tables: dict[Table, pd.DataFrame] = {
        "schema": raw if raw is not None else frame.set_index(LINE)[[TEXT, LABEL]].astype(object)
    }
    tables |= shape.derive(rows, frame, cfg, reference, tokenizer, wanted)
    if reference is not None and len(frame) >= v.drift_min_rows and len(reference) >= v.drift_min_rows:
        tables["drift"] = shape.drift(frame, reference, cfg)
    return tables


def _length_note(what: str, batch: pd.Series, accepted: pd.Series) -> str:
    if not len(batch) or not len(accepted):
        return f"{what}: nothing to compare"
    return f"{what}: median {batch.median():.0f} characters in the batch vs {accepted.median():.0f} in accepted data"


# drift check -> (p-value column, note column, the test), for the observed value in the rule's terms
_DRIFT_TESTS = {
    "drift_labels": (LABEL_P, LABEL_NOTE, "chi-square"),
    "drift_text_length": (LENGTH_P, LENGTH_NOTE, "Kolmogorov-Smirnov"),
}


def _p(value: float) -> str:
    return f"{value:.3g}" if value >= 0.01 else f"{value:.2e}"


def _observed(result: dict[str, Any]) -> Any:
    if "observed_value" in result:
        return result["observed_value"]
    if "unexpected_count" in result:
        # GE reports unexpected_percent as None when every value is null
        return (
            f"{result['unexpected_count']} of {result.get('element_count')} rows "
            f"({result.get('unexpected_percent') or 0.0:.1f}%)"
        )
    return None


def _in_rule_terms(name: str, result: dict[str, Any], tables: dict[Table, pd.DataFrame], cfg: PipelineConfig) -> Any:
    """The observed value in the words of the check's rule: GE measures some rules by a proxy (the share of
    unique values for "at most 10 % of rows repeat", the rows of a per-label table for "every label has at
    least 5 rows"); a person reads the quantity the rule names."""
    if name == "duplicate_rate":
        values = tables["rows"][shape_of(cfg).row_key].dropna()
        repeats = len(values) - values.nunique()
        share = repeats / len(values) if len(values) else 0.0
        return f"{repeats} of {len(values)} rows ({share:.1%}) repeat another row"
    if name in _DRIFT_TESTS and "drift" in tables:
        # one test of the whole batch (kind sft: one per side), not "1 of 1 rows" of the one-row table GE checks
        column, note, test = _DRIFT_TESTS[name]
        limit = cfg.validation.drift_p_value
        drift = tables["drift"]
        return "; ".join(
            f"{test} p = {_p(p)} {'<' if p < limit else '>='} {limit:g} ({what})"
            for p, what in zip(drift[column], drift[note], strict=True)
        )
    if name in ("rows_per_class", "class_imbalance") and "classes" in tables:
        counts = tables["classes"][ROWS]
        per_label = ", ".join(f"{label!r}: {int(n)}" for label, n in counts.items())
        if name == "rows_per_class":
            return f"rows per label: {per_label}"
        largest = counts.idxmax()
        ratios = ", ".join(
            f"{label!r} {counts.max() / n:.1f}x" if n else f"{label!r} has no rows"
            for label, n in counts.items()
            if label != largest
        )
        return f"largest class {largest!r} ({int(counts.max())} rows) vs {ratios}"
    return _observed(result)


def _unexpected(result: dict[str, Any], limit: int) -> list[tuple[Any, Any]]:
    """The first ``limit`` (index, value) pairs GE reports as unexpected; a named index (GE gives
    {index name: value, ...}) is reduced to its line, label or length name."""
    values = result.get("partial_unexpected_list") or []
    index = result.get("partial_unexpected_index_list") or []
    pairs = list(zip(index, values, strict=False))[:limit]  # GE may cap the two lists differently
    return [
        (idx.get(LINE, idx.get(LABEL, idx.get(LENGTH_OF, idx))) if isinstance(idx, dict) else idx, value)
        for idx, value in pairs
    ]


def _text_and_label(rows: pd.DataFrame, line: Any) -> tuple[Any, Any]:
    """The text and label of the row at ``line`` (the first one: a union of batches repeats line numbers)."""
    row = rows.loc[line]
    if isinstance(row, pd.DataFrame):
        row = row.iloc[0]
    return row[TEXT], row[LABEL]


def _offending(result: dict[str, Any], table: Table, limit: int, rows: pd.DataFrame) -> list[dict[str, Any]]:
    """The offending rows with their line, text and label (and the checked value when it is not the text or
    the label itself), or the offending labels with their value: for the report page."""
    out: list[dict[str, Any]] = []
    for idx, value in _unexpected(result, limit):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        shown = None if isinstance(value, bool | np.bool_) else "null" if value is None or value != value else value
        if table in ("rows", "schema") and idx in rows.index:
            text, label = _text_and_label(rows, idx)
            entry: dict[str, Any] = {
                "line": int(idx) if isinstance(idx, int | np.integer) else str(idx),
                "text": None if text is None or text != text else str(text),
                "label": None if label is None or label != label else str(label),
            }
            if shown is not None and shown not in (entry["text"], entry["label"]):
                entry["value"] = str(shown)
            out.append(entry)
        else:
            out.append({"label": str(idx), "value": "" if shown is None else str(shown)})
    return out


def _examples(result: dict[str, Any], table: Table, limit: int, rows: pd.DataFrame | None = None) -> list[str]:
    """``line N: value`` per offending row. A derived flag (a repeat, a conflict: True) is no value a person
    can act on: the row's text (and label) is shown instead."""
    where = {"rows": "line", "schema": "line", "classes": "label", "drift": ""}[table]
    out = []
    for idx, value in _unexpected(result, limit):
        if isinstance(value, bool | np.bool_) and rows is not None and idx in rows.index:
            text, label = _text_and_label(rows, idx)
            text = text if not isinstance(text, str) or len(text) <= 60 else text[:57] + "..."
            out.append(f"{where} {idx}: {text!r} ({label!r})")
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # a count read back from a float column
        shown = repr(value) if not isinstance(value, float) or value == value else "null"
        if isinstance(value, str) and len(value) > 60:
            shown = repr(value[:57] + "...")
        out.append(f"{where} {idx}: {shown}".strip())
    return out


def _user_column(column: str, cfg: PipelineConfig) -> str:
    """The name a user knows a checked column by (the file's column names, not the derived ones)."""
    text, label = _column_names(cfg)
    names = {
        TEXT: text,
        LABEL: label,
        NORM: f"{text} (normalized)",
        ROWS: "rows per label",
        IMBALANCE: "largest class / this class",
        SEEN: f"{text} (normalized) in accepted data",
        CONFLICT: f"{label} per {text} (normalized)",
        LABEL_P: f"{label} distribution vs accepted data (p-value)",
        LENGTH_P: f"{text} length vs accepted data (p-value)",
    }
    names |= shape_of(cfg).user_columns(text, label)
    return names.get(column, column)


def _fix(check: Check, severity: Severity, config_file: str) -> str:
    """The check's fix; for a check that refuses the data but may be tolerated (not essential), also the setting
    that accepts such data knowingly: a corpus refused for 1 % mojibake rows needs more than "re-export it"."""
    if severity != "error" or check.name in ESSENTIAL_CHECKS or "validation.severity." in check.fix:
        return check.fix
    return (
        f"{check.fix}; or, to accept such data knowingly, set validation.severity.{check.name}: warn in "
        f"{config_file} (reported as a warning instead of refused)"
    )


def _docs_context(docs_dir: Path | None):
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    if docs_dir is not None:
        # The ephemeral context's site lives in a temp dir; point it at docs_dir instead.
        ctx.update_data_docs_site(
            "local_site",
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                # GE requires an absolute base_directory when the context has no root directory
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str((docs_dir / DATA_DOCS).resolve()),
                },
            },
        )
    return ctx


def validate_frame(
    frame: pd.DataFrame,
    cfg: PipelineConfig,
    source: str | Path,
    *,
    raw: pd.DataFrame | None = None,
    reference: pd.DataFrame | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    docs_dir: Path | None = None,
    config_file: str = "the config file",
) -> ValidationReport:
    """Run every enabled check of ``cfg.kind`` on ``frame`` (columns text/label/line; kind sft: the prompt,
    the response, the line and the chat context) and return the report (never raises).

    Args:
        frame: the batch, as read by ``tuneflow.data.read_table`` (with ``sft=sft_settings(cfg)`` for kind sft).
        cfg: the checks come from ``cfg.kind``, thresholds and severities from ``cfg.validation``.
        source: named in the report.
        raw: the text/label columns as typed in the file (for the schema checks); defaults to ``frame``'s.
        reference: already-accepted data (columns text, label, text_normalized; kind sft also context), for
            the repeat, conflict and drift checks; None for a single-file dataset.
        tokenizer: for the token-length checks; without one they are skipped. Kind sft counts tokens with the
            chat template: pass a tokenizer prepared by ``tuneflow.kinds.sft.prepare_tokenizer``.
        docs_dir: when set, Great Expectations Data Docs (HTML) are written there.
        config_file: named in the fixes (where to set a check's severity).
    """
    checks = [c for c in build_checks(cfg) if cfg.validation.severity_of(c.name) != "off"]
    fixes = {c.name: _fix(c, cfg.validation.severity_of(c.name), config_file) for c in checks}
    tables = _tables(frame, cfg, raw, reference, tokenizer, {c.name for c in checks})
    results: dict[str, CheckResult] = {}
    for check in checks:
        reason = _cannot_run(check, tables, reference, tokenizer, cfg)
        if reason:
            results[check.name] = _skipped(check, reason, fixes[check.name], cfg)
    ctx = _docs_context(docs_dir)
    source_ = ctx.data_sources.add_pandas("tuneflow")
    raw_results: dict[str, Any] = {}
    for table in TABLES:
        table_checks = [c for c in checks if c.table == table and c.name not in results]
        if not table_checks:
            continue
        broken_schema = [r.name for r in results.values() if r.name in SCHEMA_CHECKS and not r.success]
        if table != "schema" and broken_schema:
            # Row checks on a mistyped column only repeat the root cause in other words.
            reason = f"skipped: {' and '.join(broken_schema)} failed"
            results.update({c.name: _skipped(c, reason, fixes[c.name], cfg) for c in table_checks})
            continue
        raw_results[table], found = _run_table(
            ctx, source_, table, table_checks, tables, fixes, cfg, data_docs=docs_dir
        )
        results.update({r.name: r for r in found})
    ordered = [results[c.name] for c in checks]  # GE returns results grouped by column; keep ours
    report = ValidationReport(
        source=str(source),
        row_count=len(frame),
        checks=ordered,
        raw=json.loads(json.dumps(raw_results, default=str)),
    )
    if docs_dir is not None:
        write_report_page(report, docs_dir)
    return report


def _cannot_run(
    check: Check,
    tables: dict[Table, pd.DataFrame],
    reference: pd.DataFrame | None,
    tokenizer: PreTrainedTokenizerBase | None,
    cfg: PipelineConfig,
) -> str | None:
    """Why ``check`` is skipped on this batch (no accepted data, too few rows to compare, no tokenizer)."""
    if check.needs_reference and reference is None:
        return "skipped: no accepted data to compare with"
    if check.table == "drift" and "drift" not in tables:
        return f"skipped: fewer than {cfg.validation.drift_min_rows} rows"
    if check.needs_tokenizer and tokenizer is None:
        return "skipped: no tokenizer given"
    return None


def _skipped(check: Check, reason: str, fix: str, cfg: PipelineConfig) -> CheckResult:
    return CheckResult(
        name=check.name,
        expectation="",
        column=check.table,
        rule=check.rule,
        success=True,
        observed=reason,
        fix=fix,
        severity=cfg.validation.severity_of(check.name),
        threshold=check.threshold,
    )


def _run_table(
    ctx: Any,
    source: Any,
    table: Table,
    checks: list[Check],
    tables: dict[Table, pd.DataFrame],
    fixes: dict[str, str],
    cfg: PipelineConfig,
    *,
    data_docs: Path | None,
) -> tuple[dict[str, Any], list[CheckResult]]:
    """Run one table's checks as one Great Expectations suite; the raw GE result and a result per check."""
    import great_expectations as gx

    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{cfg.name}-{table}"))
    built: dict[str, Any] = {}
    for check in checks:
        exp = built[check.name] = check.expectation()
        exp.meta = {"check": check.name, "rule": check.rule, "fix": fixes[check.name]}
        suite.add_expectation(exp)
    batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{cfg.name}-{table}", data=batch, suite=suite))
    limit = cfg.validation.max_failed_examples
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": max(limit, 20)}
    params = {"dataframe": tables[table]}
    if data_docs is not None:
        cp = ctx.checkpoints.add(
            gx.Checkpoint(
                name=f"{cfg.name}-{table}",
                validation_definitions=[vd],
                result_format=result_format,
                actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["local_site"])],
            )
        )
        run = next(iter(cp.run(batch_parameters=params).run_results.values()))
    else:
        run = vd.run(batch_parameters=params, result_format=result_format)
    by_name = {c.name: c for c in checks}
    found = []
    for r in run.results:
        check = by_name[r.expectation_config.meta["check"]]
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise RuntimeError(
                f"Great Expectations could not run {check.name}: {r.exception_info.get('exception_message')}"
            )
        column = r.expectation_config.kwargs.get("column")
        if column is None:
            # GE leaves out a column that is the expectation's default (tuneflow.expectations' derived
            # columns): name it, never 'None'
            column = getattr(built[check.name], "column", None)
        found.append(
            CheckResult(
                name=check.name,
                expectation=r.expectation_config.type,
                column=_user_column(str(column), cfg),
                rule=check.rule,
                success=bool(r.success),
                observed=_in_rule_terms(check.name, r.result, tables, cfg),
                examples=[] if r.success else _examples(r.result, table, limit, tables["rows"]),
                fix=fixes[check.name],
                severity=cfg.validation.severity_of(check.name),
                threshold=check.threshold,
                offending=[] if r.success else _offending(r.result, table, limit, tables["rows"]),
            )
        )
    return run.to_json_dict(), found


DATA_DOCS = "data_docs"  # Great Expectations' Data Docs site, inside a report folder beside its index.html


def write_report_page(report: ValidationReport, folder: Path, *, batch: str | None = None) -> None:
    """Write the report a person is sent to, ``folder/index.html``: one self-contained page (no script, style
    or font from the network) with every failed and warned check, its rule, the observed value in the rule's
    terms, the offending rows and the fix; it links the full Data Docs in ``folder/data_docs/`` when built."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = f"{DATA_DOCS}/index.html" if (folder / DATA_DOCS / "index.html").exists() else None
    page = folder / "index.html"
    page.write_text(validation_html(report, data_docs=docs, batch=batch), encoding="utf-8")
    report.docs_index = str(page)


def drop_out_of_bounds(loaded: LoadedData, cfg: PipelineConfig) -> tuple[LoadedData, int]:
    """Drop the rows outside the text length bounds that ``validation.text_length_mostly`` tolerated, and
    (kind sft) repeated prompt/response pairs that ``validation.max_duplicate_rate`` tolerated: a pair
    repeated a thousand times would outweigh everything else in the loss.

    The data digest still covers the whole file: it identifies the input, not what was kept.
    """
    v = cfg.validation
    frame = loaded.frame
    lengths = frame[TEXT].str.len()
    keep = lengths.between(v.min_text_chars, v.max_text_chars)
    dropped = int((~keep).sum())
    if dropped:
        log.warning(
            "dropping %d rows outside %d..%d characters (tolerated by validation.text_length_mostly=%s)",
            dropped,
            v.min_text_chars,
            v.max_text_chars,
            v.text_length_mostly,
        )
    frame = frame[keep]
    if facts_of(cfg.kind).dedupe_pairs:
        texts = normalized(frame[TEXT])
        repeated = row_key(frame, texts).duplicated(keep="first")
        if repeated.any():
            log.warning(
                "dropping %d repeated prompt/response pairs (tolerated by validation.max_duplicate_rate=%s)",
                int(repeated.sum()),
                v.max_duplicate_rate,
            )
            dropped += int(repeated.sum())
            frame = frame[~repeated]
    return replace(loaded, frame=frame.reset_index(drop=True)), dropped
