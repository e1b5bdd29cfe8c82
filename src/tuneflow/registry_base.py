"""The registry's names, a leaf that imports nothing of tuneflow: aliases, every ``tuneflow.*`` tag a registered
version carries, what a version may pin, ``kind_of`` and the registry's errors. ``registry`` (I/O), ``scoring``,
``trust``, ``history``, ``review``, ``monitor``, ``predict``, ``tracking`` and the flows import them from here, so
none of them needs another's module for a name."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

CHAMPION = "champion"
CHALLENGER = "challenger"

TAG = "tuneflow."  # the prefix of every tag tuneflow sets
VALIDATION_TAG = "tuneflow.validation"  # passed | failed: the data checks of the run that produced the version
CARD_TAG = "tuneflow.model_card"
KIND_TAG = "tuneflow.kind"
DECISION_TAG = "tuneflow.decision"  # promoted | rejected
DECISION_REASON_TAG = "tuneflow.decision_reason"
MAX_LENGTH_TAG = "tuneflow.max_length"  # the max_length a version was trained (and is scored) with
DATA_DIGEST_TAG = "tuneflow.data_digest"  # the digest of the rows a version was trained on
SCORE_TAG = "tuneflow.challenger_score"  # a version's primary metric on its eval split when it was registered
FINGERPRINT_TAG = "tuneflow.fingerprint"
# A person's sign-off (registry.approval: required): the review of a version, one tag per fact
REVIEW_TAG = "tuneflow.review"  # waiting | approved | rejected | superseded
REVIEW_FLOW_RUN_TAG = "tuneflow.review.flow_run"  # the Prefect flow run that waits for the decision ("" none)
REVIEW_REQUESTED_TAG = "tuneflow.review.requested"  # ISO 8601 UTC
REVIEW_DEADLINE_TAG = "tuneflow.review.deadline"  # ISO 8601 UTC: past it, registry.approval_on_timeout applies
REVIEW_EXPECTED_TAG = "tuneflow.review.expected_champion"  # the champion it was compared with ("" none)
REVIEW_REVIEWER_TAG = "tuneflow.review.reviewer"
REVIEW_COMMENT_TAG = "tuneflow.review.comment"
REVIEW_TIME_TAG = "tuneflow.review.time"  # when it was decided, ISO 8601 UTC

# The same, over the input files' bytes before validation: lets an unchanged retrain stop before validating
INPUT_FINGERPRINT_TAG = "tuneflow.input_fingerprint"

# What every version's requirements.txt pins, and all it may pin (the trust check refuses anything else).
REQUIREMENT_PACKAGES = ("torch", "transformers", "tokenizers", "mlflow", "pandas", "numpy")


class RegistryError(ValueError):
    """A registry operation was refused; the message says why and what to do."""


class UntrustedModel(RegistryError):
    """A registered version failed the checks that make it safe to load; nothing of it was loaded."""


class DownloadError(RegistryError):
    """A registered version's files could not be downloaded; nothing was checked or loaded."""


def kind_of(mv: ModelVersion) -> str:
    """The kind of fine-tuning that produced a version (versions from before kinds are classification)."""
    return (mv.tags or {}).get(KIND_TAG, "classification")
