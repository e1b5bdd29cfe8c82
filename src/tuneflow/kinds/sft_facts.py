"""Kind sft as data (see ``tuneflow.kinds.facts``): light, read by the config at load time.

TEXT holds the prompt (the last user turn), LABEL the response (the last assistant turn)."""

from __future__ import annotations

from typing import Any

from tuneflow.kinds.facts import CheckRow, Expected, KindFacts

_REEXPORT = "re-export the data as UTF-8 from its source (text decoded with the wrong codec looks like 'Ã©')"


def _check_config(cfg: Any) -> None:
    if cfg.train.processes > 1:
        raise ValueError(
            f"train.processes is {cfg.train.processes}, but kind sft trains in one process (multi-process "
            "training is done for kind classification only). Fix: remove train.processes or set it to 1"
        )
    if cfg.registry.sft_weights == "adapter" and not cfg.sft.lora.enabled:
        raise ValueError(
            "registry.sft_weights is 'adapter', but sft.lora.enabled is false: full fine-tuning changes every weight, "
            "so there is no adapter to register. Fix: set sft.lora.enabled: true, or registry.sft_weights: merged"
        )
    search = cfg.search
    if search is not None and not cfg.sft.lora.enabled:
        named = set(search.space.chosen()) | {k for settings in search.enqueue for k in settings}
        lora = sorted(n for n in named if n.startswith("lora_"))
        if lora:
            raise ValueError(
                f"search.space names {lora}, but sft.lora.enabled is false (full fine-tuning has no adapters). "
                "Fix: remove them from the search, or set sft.lora.enabled: true"
            )


def _cache_key_part(tokenizer: Any) -> dict[str, Any]:
    # the rows are rendered with the chat template: a new template is new input ids
    # "labels": which tokens are trained (every assistant turn of a conversation, each with its EOS): rows cached
    # before multi-turn loss trained only the last answer
    return {"kind": "sft", "chat_template": getattr(tokenizer, "chat_template", None), "labels": "assistant-turns"}


def _shape_part(cfg: Any) -> dict[str, Any]:
    s = cfg.sft
    shape: dict[str, Any] = {"sft": [s.prompt_column, s.response_column, s.system_column, s.messages_column]}
    renamed = s.format_columns.model_dump(exclude_defaults=True)  # only when set: recorded shapes stay as they were
    return shape | ({"format_columns": renamed} if renamed else {})


CHECK_ROWS = {
    r.name: r
    for r in (
        CheckRow(
            "record_format",
            "rows",
            "every record is a conversation: known roles, a system turn only first, a user turn before the first "
            "answer, no two answers in a row, ending with an answer (Alpaca: an output)",
            "0 rows",
            "fix or drop those records (each line says what is wrong); data.format names the layout",
            "ExpectColumnValuesToBeNull",
            "record_problem",
            essential=True,
        ),
        CheckRow(
            "response_type",
            "schema",
            "responses are strings",
            "str",
            "store '{label_col}' as text (quote numbers in CSV, strings in JSONL/Parquet)",
            "ExpectColumnValuesToBeInTypeList",
            "label",
            {"type_list": "str_types"},
            essential=True,
        ),
        CheckRow(
            "response_not_blank",
            "rows",
            "no response is only whitespace",
            "0 rows",
            "drop rows whose '{label_col}' is blank, or write their response",
            "ExpectColumnValuesToNotMatchRegex",
            "label",
            {"regex": "blank_regex"},
        ),
        CheckRow(
            "response_encoding",
            "rows",
            "no control characters or broken encoding (mojibake) in responses",
            "0 rows",
            _REEXPORT + "; the model would learn to write it",
            "ExpectTextToBeCleanUnicode",
            "label",
        ),
        CheckRow(
            "prompt_tokens",
            "rows",
            "the prompt with its context (in a conversation: everything before its first answer) and the chat "
            "template is shorter than {limit} tokens (else no response token fits and the row trains nothing)",
            "< {limit} tokens",
            "shorten those prompts (or their system message / earlier turns), or raise model.max_length",
            "ExpectColumnValuesToBeBetween",
            "prompt_tokens",
            {"max_value": "limit_below"},
            needs_tokenizer=True,
        ),
        CheckRow(
            "pair_tokens",
            "rows",
            "the whole conversation (prompt and response, and any earlier turns) fits in {limit} tokens with the "
            "chat template",
            "<= {limit} tokens",
            "longer responses are cut in training (the model never sees their end and learns no stop): "
            "shorten them, or raise model.max_length",
            "ExpectColumnValuesToBeBetween",
            "pair_tokens",
            {"max_value": "limit"},
            severity="warn",
            needs_tokenizer=True,
        ),
        CheckRow(
            "response_conflict",
            "rows",
            "the same prompt (in the same context) never has two different responses",
            "0 rows",
            "keep one answer per prompt (here or in the accepted data) if the answers contradict each other; "
            "if several answers are fine, set validation.severity.response_conflict: off",
            "ExpectPromptsToHaveOneResponse",
            severity="warn",
        ),
    )
}

FACTS = KindFacts(
    name="sft",
    metrics=("eval_loss", "perplexity", "chrf"),
    default_metric="eval_loss",
    shown_metrics=("eval_loss", "perplexity", "chrf", "looping_share", "base_chrf", "base_looping_share"),
    checks=(
        "record_format",
        "text_type",
        "response_type",
        "text_not_null",
        "text_not_blank",
        "text_length",
        "text_encoding",
        "label_not_null",
        "response_not_blank",
        "response_encoding",
        "prompt_tokens",
        "pair_tokens",
        "duplicate_rate",
        "response_conflict",
        "repeats_accepted",
        "drift_text_length",
    ),
    check_rows=CHECK_ROWS,
    words={
        "text": "prompt",
        "texts": "prompts",
        "label": "response",
        "in_texts": " in prompts",
        "repeat_of": "prompt and response",
        "repeat_pair": " (the same prompt and response)",
        "length_drift": "the prompt- and response-length distributions match the accepted data",
        "dup_column": "pair_normalized",
    },
    shape="chat",
    expected=Expected(
        "text-generation",
        "TextGenerationPipeline",
        "MODEL_FOR_CAUSAL_LM",
        "llm/v1/chat",
        {"task": "llm/v1/chat"},
        # sft.max_new_tokens and sft.generation (the sampling ones only with do_sample)
        {
            "max_new_tokens": int,
            "do_sample": bool,
            "repetition_penalty": float,
            "no_repeat_ngram_size": int,
            "temperature": float,
            "top_p": float,
            "top_k": int,
        },
        adapters=True,
    ),
    card="sft",
    implementation="sft:Sft",
    reads_chat=True,
    dedupe_pairs=True,
    tunable=frozenset(
        {"learning_rate", "epochs", "batch_size", "warmup_ratio", "weight_decay", "base_models"}
        | {"lora_r", "lora_alpha", "lora_target_modules"}
    ),
    check_config=_check_config,
    cache_key_part=_cache_key_part,
    shape_part=_shape_part,
)
