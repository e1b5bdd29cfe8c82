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
# A person's sign-off (registry.approval: required): the review of a version, one tag per fact
REVIEW_TAG = "tuneflow.review"  # waiting | approved | rejected | superseded
REVIEW_FLOW_RUN_TAG = "tuneflow.review.flow_run"  # the Prefect flow run that waits for the decision ("" none)
REVIEW_REQUESTED_TAG = "tuneflow.review.requested"  # ISO 8601 UTC
REVIEW_DEADLINE_TAG = "tuneflow.review.deadline"  # ISO 8601 UTC: past it, registry.approval_on_timeout applies
REVIEW_EXPECTED_TAG = "tuneflow.review.expected_champion"  # the champion it was compared with ("" none)
REVIEW_REVIEWER_TAG = "tuneflow.review.reviewer"  # who decided (as given: Prefect OSS records no identity)
REVIEW_COMMENT_TAG = "tuneflow.review.comment"  # why, in the reviewer's words
REVIEW_TIME_TAG = "tuneflow.review.time"  # when it was decided, ISO 8601 UTC

# The same, over the input files' bytes before validation: lets an unchanged retrain stop before validating
INPUT_FINGERPRINT_TAG = "tuneflow.input_fingerprint"  # the fingerprint over the input files' bytes
CONFIG_DIGEST_TAG = "tuneflow.config_digest"  # the digest of the config settings that shape the model
GIT_COMMIT_TAG = "tuneflow.git_commit"  # the commit of the checkout that trained the version
FLOW_RUN_TAG = "tuneflow.prefect_flow_run_id"  # the Prefect flow run that trained it
BASE_MODEL_TAG = "tuneflow.base_model"  # model.base_model of the config

# Version tags kept by other parts: the champion's moves, the monitoring reference
HISTORY_TAG = "tuneflow.history."  # + number (4 digits) on the registered model: one champion move, as JSON
REFERENCE_TAG = "tuneflow.monitor_reference"  # on a version: the runs:/ URI of its monitoring reference

# MLflow run tags (the retrain's parent run, its stage runs, monitoring and prediction runs)
STAGE_TAG = "tuneflow.stage"  # a stage's nested run: validate | tokenize | train | evaluate | ...
SPLIT_DIGEST_TAG = "tuneflow.split_digest"  # the digest of the train/eval split the run used
SOURCES_TAG = "tuneflow.sources"  # the files a run's data came from
HOST_TAG = "tuneflow.host"  # the machine and process of a retrain, to tell a run whose process is gone
PID_TAG = "tuneflow.pid"  # the process id of a retrain (with HOST_TAG)
ENDED_BY_TAG = "tuneflow.ended_by"  # why tuneflow ended a run it did not start
CAUSE_TAG = "tuneflow.retrain_cause"  # schedule | new data | decay | manual
CONFIG_DIGEST_TAG = "tuneflow.config_digest"  # the digest of the settings that change what is trained
GIT_COMMIT_TAG = "tuneflow.git_commit"  # the tuneflow commit that ran, when installed from git
FLOW_RUN_TAG = "tuneflow.prefect_flow_run_id"  # the Prefect flow run of the retrain
BASE_MODEL_TAG = "tuneflow.base_model"  # model.base_model as configured
TOKENIZE_CACHE_HIT_TAG = "tuneflow.tokenize_cache_hit"  # True: the tokenized splits came from the cache
CHAMPION_VERSION_TAG = "tuneflow.champion_version"  # the champion a retrain compared with
OUTCOME_TAG = "tuneflow.outcome"  # unchanged: the retrain stopped early, nothing changed
SAME_AS_VERSION_TAG = "tuneflow.same_as_version"  # the version an unchanged retrain matched
MODEL_VERSION_TAG = "tuneflow.model_version"  # a prediction run: the version that scored
MODEL_REF_TAG = "tuneflow.model_ref"  # a prediction run: the reference asked for (NAME@ALIAS, NAME/VERSION)
MONITOR_OF_TAG = "tuneflow.monitor_of"  # on the monitoring run: the registered model it follows
POINT_TAG = "tuneflow.monitor.point."  # + step (6 digits): the point as JSON
PENDING_TAG = "tuneflow.monitor.pending"  # JSON list of accepted batch names waiting for min_rows
MONITOR_DECISION_TAG = "tuneflow.monitor.decision"  # a retrain's parent run: what monitoring decided

# tuneflow tune: a search's runs and the version it registers
STUDY_TAG = "tuneflow.study"  # the Optuna study a search run or tuned version belongs to
TRIAL_TAG = "tuneflow.trial"  # a trial's number in its study
TRIAL_STATE_TAG = "tuneflow.trial_state"  # COMPLETE | PRUNED | FAIL
TUNED_FROM_TAG = "tuneflow.tuned_from_trial"  # on a version: the trial whose settings trained it
STUDY_STORAGE_TAG = "tuneflow.study_storage"  # the search's parent run: the study database (no password)

# What every version's requirements.txt pins; OPTIONAL ones a version may pin besides (an adapter-only sft version:
# peft). The trust check refuses anything else.
REQUIREMENT_PACKAGES = ("torch", "transformers", "tokenizers", "mlflow", "pandas", "numpy")
OPTIONAL_REQUIREMENT_PACKAGES = ("peft",)
# The MLmodel metadata key of an adapter-only version: {model: the base_model spec, digest: the base folder's sha256}
BASE_PIN_KEY = "tuneflow_base"


class RegistryError(ValueError):
    """A registry operation was refused; the message says why and what to do."""


class UntrustedModel(RegistryError):
    """A registered version failed the checks that make it safe to load; nothing of it was loaded."""


class DownloadError(RegistryError):
    """A registered version's files could not be downloaded; nothing was checked or loaded."""


def kind_of(mv: ModelVersion) -> str:
    """The kind of fine-tuning that produced a version (versions from before kinds are classification)."""
    return (mv.tags or {}).get(KIND_TAG, "classification")
