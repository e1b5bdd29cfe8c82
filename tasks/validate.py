"""Stage 1: validate the data with a Great Expectations suite before anything is trained on it.

Each check is a Great Expectations expectation plus a human rule and fix. Adding a check means adding
one ``Check`` to ``build_checks``. Row-level checks run on the rows (index = line in the source file);
per-class checks run on a small table of row counts per configured label.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from tasks.config import PipelineConfig
from tasks.data import LABEL, LINE, TEXT, DataError, normalize_text

log = logging.getLogger(__name__)

Table = Literal["rows", "classes"]
NORM = "text_normalized"
ROWS = "rows"


@dataclass(frozen=True)
class Check:
    name: str
    table: Table
    rule: str
    fix: str
    expectation: Callable[[], Any]  # builds the GE expectation (GE is imported lazily)


@dataclass
class CheckResult:
    name: str
    expectation: str
    column: str
    rule: str
    success: bool
    observed: Any
    examples: list[str] = field(default_factory=list)
    fix: str = ""


@dataclass
class ValidationReport:
    source: str
    row_count: int
    checks: list[CheckResult]
    raw: dict[str, Any]

    @property
    def success(self) -> bool:
        return all(c.success for c in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def summary(self) -> str:
        lines = [
            f"Data validation {'passed' if self.success else 'FAILED'} for {self.source} "
            f"({self.row_count} rows): {len(self.checks) - len(self.failed)}/{len(self.checks)} expectations met."
        ]
        for c in self.failed:
            lines.append(f"  x {c.name} [{c.expectation} on '{c.column}']: {c.rule}")
            lines.append(f"      observed: {c.observed}")
            if c.examples:
                lines.append(f"      offending: {'; '.join(c.examples)}")
            lines.append(f"      fix: {c.fix}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "row_count": self.row_count,
            "success": self.success,
            "checks": [c.__dict__ for c in self.checks],
            "great_expectations": self.raw,
        }


class ValidationFailed(DataError):
    """The data broke at least one expectation; nothing downstream may run on it."""

    def __init__(self, report: ValidationReport):
        super().__init__(report.summary())
        self.report = report


def build_checks(cfg: PipelineConfig) -> list[Check]:
    import great_expectations.expectations as gxe

    v, d = cfg.validation, cfg.data
    return [
        Check("text_not_null", "rows", "every row has a text", f"fill or drop rows with an empty '{d.text_column}'",
              lambda: gxe.ExpectColumnValuesToNotBeNull(column=TEXT)),
        Check("text_not_blank", "rows", "no text is only whitespace", f"drop rows whose '{d.text_column}' is blank",
              lambda: gxe.ExpectColumnValuesToNotMatchRegex(column=TEXT, regex=r"^\s*$")),
        Check("text_length", "rows", f"text length is {v.min_text_chars}..{v.max_text_chars} characters"
              + (f" for at least {v.text_length_mostly:.1%} of rows" if v.text_length_mostly < 1 else ""),
              "drop or shorten those rows, or change validation.min_text_chars / max_text_chars",
              lambda: gxe.ExpectColumnValueLengthsToBeBetween(column=TEXT, min_value=v.min_text_chars, max_value=v.max_text_chars, mostly=v.text_length_mostly)),
        Check("label_not_null", "rows", "every row has a label", f"fill or drop rows with an empty '{d.label_column}'",
              lambda: gxe.ExpectColumnValuesToNotBeNull(column=LABEL)),
        Check("label_in_set", "rows", f"labels are one of {d.labels}",
              "fix those rows, or add the label to data.labels (or map it with data.label_values)",
              lambda: gxe.ExpectColumnValuesToBeInSet(column=LABEL, value_set=list(d.labels))),
        Check("duplicate_rate", "rows", f"at most {v.max_duplicate_rate:.0%} of rows repeat another row's text",
              "deduplicate the file, or raise validation.max_duplicate_rate",
              lambda: gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(column=NORM, min_value=1.0 - v.max_duplicate_rate)),
        Check("rows_per_class", "classes", f"every label has at least {v.min_rows_per_class} rows",
              "add rows for those labels, or lower validation.min_rows_per_class",
              lambda: gxe.ExpectColumnValuesToBeBetween(column=ROWS, min_value=v.min_rows_per_class)),
    ]


def _tables(frame: pd.DataFrame, cfg: PipelineConfig) -> dict[Table, pd.DataFrame]:
    rows = frame.set_index(LINE)[[TEXT, LABEL]].copy()
    rows[NORM] = rows[TEXT].map(lambda t: normalize_text(t) if isinstance(t, str) else None)
    counts = frame[LABEL].value_counts()
    classes = pd.DataFrame({ROWS: [int(counts.get(lab, 0)) for lab in cfg.data.labels]}, index=pd.Index(cfg.data.labels, name=LABEL))
    return {"rows": rows, "classes": classes}


def _observed(result: dict[str, Any]) -> Any:
    if "observed_value" in result:
        return result["observed_value"]
    if "unexpected_count" in result:
        # GE reports unexpected_percent as None when every value is null
        return f"{result['unexpected_count']} of {result.get('element_count')} rows ({result.get('unexpected_percent') or 0.0:.1f}%)"
    return None


def _examples(result: dict[str, Any], table: Table, limit: int) -> list[str]:
    values = result.get("partial_unexpected_list") or []
    index = result.get("partial_unexpected_index_list") or []
    where = "line" if table == "rows" else "label"
    out = []
    for idx, value in list(zip(index, values))[:limit]:
        if isinstance(idx, dict):  # GE gives {index name: value, ...} for a named index
            idx = idx.get(LINE, idx.get(LABEL, idx))
        shown = repr(value) if not isinstance(value, float) or value == value else "null"
        if isinstance(value, str) and len(value) > 60:
            shown = repr(value[:57] + "...")
        out.append(f"{where} {idx}: {shown}")
    return out


def validate_frame(frame: pd.DataFrame, cfg: PipelineConfig, source: str | Path) -> ValidationReport:
    """Run every check on ``frame`` (columns text/label/line) and return the report (never raises)."""
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    checks = build_checks(cfg)
    tables = _tables(frame, cfg)
    source_ = ctx.data_sources.add_pandas("tuneflow")
    results: dict[str, CheckResult] = {}
    raw: dict[str, Any] = {}
    limit = cfg.validation.max_failed_examples
    for table in ("rows", "classes"):
        table_checks = [c for c in checks if c.table == table]
        by_type: dict[tuple[str, str], Check] = {}
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{cfg.name}-{table}"))
        for check in table_checks:
            exp = check.expectation()
            exp.meta = {"check": check.name}
            suite.add_expectation(exp)
            by_type[(check.name, table)] = check
        batch = source_.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{cfg.name}-{table}", data=batch, suite=suite))
        run = vd.run(
            batch_parameters={"dataframe": tables[table]},
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": max(limit, 20)},
        )
        raw[table] = run.to_json_dict()
        for r in run.results:
            cfg_ = r.expectation_config
            check = by_type[(cfg_.meta["check"], table)]
            if r.exception_info and r.exception_info.get("raised_exception"):
                raise RuntimeError(f"Great Expectations could not run {check.name}: {r.exception_info.get('exception_message')}")
            results[check.name] = CheckResult(
                name=check.name,
                expectation=cfg_.type,
                column=str(cfg_.kwargs.get("column")),
                rule=check.rule,
                success=bool(r.success),
                observed=_observed(r.result),
                examples=[] if r.success else _examples(r.result, table, limit),
                fix=check.fix,
            )
    ordered = [results[c.name] for c in checks]  # GE returns results grouped by column; keep ours
    return ValidationReport(source=str(source), row_count=len(frame), checks=ordered, raw=json.loads(json.dumps(raw, default=str)))


# ---- Prefect task ------------------------------------------------------------------------------

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


def display_columns(report: ValidationReport, cfg: PipelineConfig) -> None:
    """Show the user's column names (not tuneflow's internal ones) in the report."""
    names = {TEXT: cfg.data.text_column, LABEL: cfg.data.label_column, NORM: f"{cfg.data.text_column} (normalized)", ROWS: f"rows per {cfg.data.label_column}"}
    for c in report.checks:
        c.column = names.get(c.column, c.column)


def drop_out_of_bounds(loaded, cfg: PipelineConfig):
    """Drop the rows outside the text length bounds that ``validation.text_length_mostly`` tolerated.

    The data digest still covers the whole file: it identifies the input, not what was kept.
    """
    from dataclasses import replace

    v = cfg.validation
    lengths = loaded.frame[TEXT].str.len()
    keep = lengths.between(v.min_text_chars, v.max_text_chars)
    dropped = int((~keep).sum())
    if dropped:
        log.warning("dropping %d rows outside %d..%d characters (tolerated by validation.text_length_mostly=%s)", dropped, v.min_text_chars, v.max_text_chars, v.text_length_mostly)
    return replace(loaded, frame=loaded.frame[keep].reset_index(drop=True)), dropped


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(cfg: PipelineConfig, parent_run_id: str, config_file: str = "the config"):
    """Read the data and validate it; log the full result to MLflow; raise ValidationFailed on failure."""
    import mlflow

    from tasks.data import read_table
    from tasks.tracking import stage_run

    with stage_run(parent_run_id, "validate"):
        loaded = read_table(cfg.data, config_file)
        report = validate_frame(loaded.frame, cfg, loaded.source)
        display_columns(report, cfg)
        mlflow.log_dict(report.to_json(), "validation/report.json")
        mlflow.log_params({"data.source": str(loaded.source), "data.rows": len(loaded.frame), "data.digest": loaded.digest})
        mlflow.log_metrics({"validation/checks_failed": len(report.failed), "validation/checks": len(report.checks)})
        mlflow.set_tag("tuneflow.validation", "passed" if report.success else "failed")
        mlflow.MlflowClient().set_tag(parent_run_id, "tuneflow.validation", "passed" if report.success else "failed")
        if not report.success:
            raise ValidationFailed(report)
        loaded, dropped = drop_out_of_bounds(loaded, cfg)
        mlflow.log_metric("validation/rows_dropped", dropped)
    return loaded, report
