"""Custom Great Expectations 1.x expectations for text-classification and prompt/response (sft) data.

GE 1.x customizes an expectation by subclassing a built-in one with fixed parameters and a
description. Each class here checks a column that ``tuneflow.validation`` derives from the batch (and from
the data accepted before it), so the pass/fail logic, the result format and the Data Docs rendering
all stay Great Expectations'.
"""

from __future__ import annotations

import great_expectations.expectations as gxe

# C0 control characters other than tab/newline/carriage return, DEL, the replacement character, and
# the usual UTF-8-read-as-Latin-1/CP1252 sequences ("Ã©" for "é", "â€™" for "’", "Â " for a no-break space).
BROKEN_TEXT_REGEX = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]|Ã[\x80-\xbf]|â€|Â[\x80-\xbf\xa0]"


class ExpectTextToBeCleanUnicode(gxe.ExpectColumnValuesToNotMatchRegex):
    """Texts contain no control characters, replacement characters or mojibake."""

    regex: str = BROKEN_TEXT_REGEX
    description: str = "Texts contain no control characters or broken encoding (mojibake)"


class ExpectTextsToHaveOneLabel(gxe.ExpectColumnValuesToBeInSet):
    """No normalized text appears with two different labels (in the batch or in accepted data)."""

    column: str = "label_conflict"
    value_set: list = [False]
    description: str = "The same text never carries conflicting labels"


class ExpectPromptsToHaveOneResponse(gxe.ExpectColumnValuesToBeInSet):
    """No normalized prompt (in the same context) appears with two different responses (in the batch or in
    accepted data)."""

    column: str = "response_conflict"
    value_set: list = [False]
    description: str = "The same prompt never has two different responses"


class ExpectRowsToBeNewData(gxe.ExpectColumnValuesToBeInSet):
    """Rows are not repeats of already-accepted data (``mostly`` sets the tolerated share)."""

    column: str = "seen_before"
    value_set: list = [False]
    description: str = "Rows are new, not repeats of already-accepted data"


class ExpectLabelDistributionToMatchAccepted(gxe.ExpectColumnValuesToBeBetween):
    """Chi-square test of the batch's label counts against accepted data: p-value above the threshold."""

    column: str = "label_drift_p_value"
    description: str = "Label distribution matches accepted data (chi-square p-value)"


class ExpectTextLengthDistributionToMatchAccepted(gxe.ExpectColumnValuesToBeBetween):
    """Two-sample Kolmogorov-Smirnov test of text lengths against accepted data: p-value above the threshold."""

    column: str = "length_drift_p_value"
    description: str = "Text-length distribution matches accepted data (Kolmogorov-Smirnov p-value)"
