"""What validation found: a check's result and a batch's report, as plain data.

A leaf module (no tuneflow import but the config's types), so that ``validation`` (which fills reports) and
``reporting`` (which renders them: ``reporting.validation_summary`` for text, ``validation_html`` for the page)
both depend on it and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuneflow.config import Severity


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
    severity: Severity = "error"
    threshold: str = ""
    # the offending rows as a person reads them: {"line", "text", "label", "value"} (rows of the batch), or
    # {"label", "value"} (a label's row count); a few, as many as validation.max_failed_examples
    offending: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.success:
            return "skipped" if str(self.observed).startswith("skipped") else "pass"
        return "FAIL" if self.severity == "error" else "warn"


@dataclass
class ValidationReport:
    source: str
    row_count: int
    checks: list[CheckResult]
    raw: dict[str, Any]
    docs_index: str | None = None  # the report page (index.html, self-contained) beside the full Data Docs

    @property
    def success(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list[CheckResult]:
        """Failed checks of severity ``error``: these stop the run."""
        return [c for c in self.checks if not c.success and c.severity == "error"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success and c.severity != "error"]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "row_count": self.row_count,
            "success": self.success,
            "checks": [{**c.__dict__, "status": c.status} for c in self.checks],
            "great_expectations": self.raw,
        }
