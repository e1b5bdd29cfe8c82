"""The registry's names, a leaf that imports nothing of tuneflow: aliases, every ``tuneflow.*`` tag a registered
version carries, what a version may pin, ``kind_of`` and the registry's errors. ``registry`` (I/O), ``scoring``,
``trust``, ``history``, ``review``, ``monitor``, ``predict``, ``tracking`` and the flows import them from here, so
none of them needs another's module for a name."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

CHAMPION = "champion"  # the version in use: moved by the promotion gate, `tuneflow promote` and `rollback`, never else
CHALLENGER = "challenger"  # the newest registered version, promoted or not

TAG = "tuneflow."  # the prefix of every tag tuneflow sets
VALIDATION_TAG = "tuneflow.validation"  # passed | failed: the data checks of the run that produced the version
CARD_TAG = "tuneflow.model_card"  # runs:/<run id>/model_card.md: the whole model card, as a file of the run
KIND_TAG = "tuneflow.kind"  # the kind of fine-tuning (classification | sft): the kind that re-scores and predicts
DECISION_TAG = "tuneflow.decision"  # promoted | rejected
DECISION_REASON_TAG = "tuneflow.decision_reason"  # why the gate promoted or rejected the version
PRIMARY_METRIC_TAG = "tuneflow.primary_metric"  # the metric the gate compared (evaluate.primary_metric)
SCORE_TAG = "tuneflow.challenger_score"  # a version's primary metric on its eval split when it was registered
CHAMPION_SCORE_TAG = "tuneflow.champion_score"  # the champion's score on the same eval split; empty: no champion
CHAMPION_BEFORE_TAG = "tuneflow.champion_version_before"  # the champion the version was compared with
MAX_LENGTH_TAG = "tuneflow.max_length"  # the max_length a version was trained (and is scored) with
DATA_DIGEST_TAG = "tuneflow.data_digest"  # the digest of the rows a version was trained on
FINGERPRINT_TAG = "tuneflow.fingerprint"  # data digest + config digest + base model files + tuneflow version
# The same, over the input files' bytes before validation: lets an unchanged retrain stop before validating
INPUT_FINGERPRINT_TAG = "tuneflow.input_fingerprint"
CONFIG_DIGEST_TAG = "tuneflow.config_digest"  # the digest of the config settings that shape the model
GIT_COMMIT_TAG = "tuneflow.git_commit"  # the commit of the checkout that trained the version
FLOW_RUN_TAG = "tuneflow.prefect_flow_run_id"  # the Prefect flow run that trained it
BASE_MODEL_TAG = "tuneflow.base_model"  # model.base_model of the config

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
