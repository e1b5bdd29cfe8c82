"""Chat data layouts (kind sft): Alpaca, ShareGPT, TRL's prompt/completion, chat messages and prompt/response
columns, each mapped to the same rows (a leaf: imports nothing of tuneflow).

A row is one conversation: the prompt (the turn before the last answer, normally the last user turn), the
response (the last assistant turn) and the context (every turn before the prompt, as JSON, or None). The gate,
split, digest and landing zone read these rows whatever the layout was. Training trains every assistant turn
of a row (``tuneflow.kinds.sft``), the ones in the context too.

A record that cannot be a conversation (an unknown role, two answers in a row, an Alpaca record without an
output, ...) is not an error of the file: its row carries a ``problem`` (what is wrong, in words) and the
``record_format`` check reports it with its line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LAYOUTS = ("prompt_response", "messages", "alpaca", "sharegpt", "prompt_completion")
CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's roles (``from``) -> chat roles; "user" and "assistant" appear in some ShareGPT exports too
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}


@dataclass(frozen=True)
class ChatRows:
    """One entry per record: prompt, response, context JSON, and what is wrong with the record (None: nothing)."""

    prompts: list[Any]
    responses: list[Any]
    contexts: list[str | None]
    problems: list[str | None]


class LayoutError(ValueError):
    """The file as a whole does not hold the layout's columns (``columns`` names what it holds)."""


def _missing(value: object) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


def _as_list(value: object) -> object:
    if isinstance(value, str):
        try:
            value = json.loads(value)  # a CSV cell (or a string column) holding the JSON of the turns
        except ValueError:
            return value
    if hasattr(value, "tolist"):  # a Parquet list column comes back as a numpy array
        value = value.tolist()
    return value


def context_json(turns: Sequence[Mapping[str, Any]], prompt_role: str = "user") -> str | None:
    """The context of a row: the turns before its prompt. A prompt that is not a user turn (a tool result the
    answer follows) is recorded with its role."""
    earlier = [{"role": t["role"], "content": t["content"]} for t in turns]
    if prompt_role != "user":
        return json.dumps({"turns": earlier, "prompt_role": prompt_role}, ensure_ascii=False)
    return json.dumps(earlier, ensure_ascii=False) if earlier else None


def prompt_messages(prompt: str, context: str | None) -> list[dict[str, str]]:
    """The chat that asks for the response: the row's context (system, earlier turns), then the prompt."""
    parsed = json.loads(context) if isinstance(context, str) and context else []
    if isinstance(parsed, dict):
        return [*parsed["turns"], {"role": parsed.get("prompt_role", "user"), "content": prompt}]
    return [*parsed, {"role": "user", "content": prompt}]


def conversation(
    turns: object, names: Mapping[str, str] | None = None
) -> tuple[str | None, str | None, str | None, str | None]:
    """(prompt, response, context JSON, problem) of one conversation: a list of {role, content} turns.

    ``names`` maps a chat role back to the record's own word for it (ShareGPT: gpt, human), for the problem
    text. A conversation must hold known roles, a system turn only first, a user turn before the first answer,
    no two answers in a row, and end with an answer to a user (or tool) turn.
    """
    names = names or {}

    def say(role: str) -> str:
        return repr(names.get(role, role))

    if not isinstance(turns, list) or not turns:
        return None, None, None, "not a non-empty list of turns"
    roles: list[str] = []
    for i, t in enumerate(turns, 1):
        if not isinstance(t, dict) or not isinstance(t.get("role"), str):
            return None, None, None, f"turn {i} is not a {{role, content}} object"
        if t["role"] not in CHAT_ROLES:
            return None, None, None, f"turn {i}: unknown role {t['role']!r} ({', '.join(CHAT_ROLES)})"
        if not isinstance(t.get("content"), str):
            return None, None, None, f"turn {i} ({say(t['role'])}) has no text content"
        roles.append(t["role"])
    for i, (a, b) in enumerate(zip(roles, roles[1:], strict=False), 1):
        if a == b == "assistant":
            return None, None, None, f"turns {i} and {i + 1} are both {say('assistant')} turns (two answers in a row)"
    if "system" in roles[1:]:
        return None, None, None, f"turn {roles.index('system', 1) + 1} is a {say('system')} turn after the first turn"
    if "assistant" not in roles:
        return None, None, None, f"no {say('assistant')} turn: nothing to learn from"
    first_answer = roles.index("assistant")
    if "user" not in roles[:first_answer]:
        return None, None, None, f"turn {first_answer + 1} answers before any {say('user')} turn"
    if roles[-1] != "assistant":
        return None, None, None, f"the last turn is a {say(roles[-1])} turn, not an answer ({say('assistant')})"
    prompt, answer = turns[-2], turns[-1]
    return prompt["content"], answer["content"], context_json(turns[:-2], prompt["role"]), None


def _messages_rows(values: Sequence[object]) -> ChatRows:
    out = [conversation(_as_list(v)) for v in values]
    return ChatRows(*(list(x) for x in zip(*out, strict=True))) if out else ChatRows([], [], [], [])


def _sharegpt_turns(value: object, role_key: str, content_key: str) -> tuple[object, str | None]:
    """The ShareGPT turns as chat turns, or the problem."""
    value = _as_list(value)
    if not isinstance(value, list):
        return None, "conversations is not a list of turns"
    turns = []
    for i, t in enumerate(value, 1):
        if not isinstance(t, dict) or role_key not in t:
            return None, f"turn {i} is not a {{{role_key}, {content_key}}} object"
        role = SHAREGPT_ROLES.get(t[role_key]) if isinstance(t[role_key], str) else None
        if role is None:
            known = ", ".join(k for k in SHAREGPT_ROLES if k not in ("user", "assistant"))
            return None, f"turn {i}: unknown role {t[role_key]!r} ({known})"
        turns.append({"role": role, "content": t.get(content_key)})
    return turns, None


def _sharegpt_rows(values: Sequence[object], role_key: str, content_key: str) -> ChatRows:
    names = {"user": "human", "assistant": "gpt"}
    rows = []
    for v in values:
        turns, problem = _sharegpt_turns(v, role_key, content_key)
        rows.append((None, None, None, problem) if problem else conversation(turns, names))
    return ChatRows(*(list(x) for x in zip(*rows, strict=True))) if rows else ChatRows([], [], [], [])


def _alpaca_rows(records: Sequence[Mapping[str, Any]], cols: Any, system_column: str | None) -> ChatRows:
    prompts, responses, contexts, problems = [], [], [], []
    for r in records:
        instruction, extra, output = r.get(cols.instruction), r.get(cols.input), r.get(cols.output)
        if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
            instruction = f"{instruction}\n\n{extra}"  # Alpaca's input is the material the instruction is about
        prompts.append(None if _missing(instruction) else instruction)
        responses.append(None if _missing(output) else output)
        system = r.get(system_column) if system_column else None
        contexts.append(context_json([{"role": "system", "content": system}]) if isinstance(system, str) else None)
        problems.append(f"no '{cols.output}': an Alpaca record needs the answer to learn" if _missing(output) else None)
    return ChatRows(prompts, responses, contexts, problems)


def _prompt_completion_rows(prompts: Sequence[object], completions: Sequence[object]) -> ChatRows:
    """TRL's prompt/completion layout: conversational (lists of turns) or standard (two strings)."""
    rows = []
    for p, c in zip(prompts, completions, strict=True):
        p, c = _as_list(p), _as_list(c)
        if isinstance(p, list) and isinstance(c, list):
            rows.append(conversation([*p, *c]))
        elif isinstance(p, list) or isinstance(c, list):
            rows.append((None, None, None, "prompt and completion: one is turns, the other text"))
        else:
            problem = "no completion" if _missing(c) else None
            rows.append((None if _missing(p) else p, None if _missing(c) else c, None, problem))
    return ChatRows(*(list(x) for x in zip(*rows, strict=True))) if rows else ChatRows([], [], [], [])


def detect_layout(first: Mapping[str, Any], sft: Any) -> str | None:
    """The layout of a file from its first record's fields (None: no layout fits). The configured columns
    (``sft.messages_column``, then ``sft.prompt_column`` + ``sft.response_column``) come first, as before
    layouts were detected."""
    keys = {k for k, v in first.items() if not _missing(v)}
    cols = sft.format_columns
    if sft.messages_column is not None:
        return "messages"
    if {sft.prompt_column, sft.response_column} <= keys:
        return "prompt_response"
    if cols.conversations in keys:
        return "sharegpt"
    if cols.instruction in keys:
        return "alpaca"
    if {sft.prompt_column, cols.completion} <= keys:
        return "prompt_completion"
    if "messages" in keys:
        return "messages"
    return None


def required_columns(layout: str, sft: Any) -> list[str]:
    """The columns a file of ``layout`` must have (a record may still lack a value: its row reports it)."""
    cols = sft.format_columns
    return {
        "prompt_response": [sft.prompt_column, sft.response_column]
        + ([sft.system_column] if sft.system_column else []),
        "messages": [sft.messages_column or "messages"],
        "alpaca": [cols.instruction, cols.output],
        "sharegpt": [cols.conversations],
        "prompt_completion": [sft.prompt_column, cols.completion],
    }[layout]


def column_names(layout: str | None, sft: Any) -> tuple[str, str]:
    """The names a user knows the prompt and response by, in ``layout`` (None: prompt/response columns)."""
    cols = sft.format_columns
    if layout == "messages" or (layout is None and sft.messages_column is not None):
        m = sft.messages_column or "messages"
        return f"{m} (last user turn)", f"{m} (last assistant turn)"
    if layout == "sharegpt":
        return f"{cols.conversations} (last human turn)", f"{cols.conversations} (last gpt turn)"
    if layout == "alpaca":
        return f"{cols.instruction} (+ {cols.input})", cols.output
    if layout == "prompt_completion":
        return sft.prompt_column, cols.completion
    return sft.prompt_column, sft.response_column


def to_rows(records: Sequence[Mapping[str, Any]], layout: str, sft: Any) -> ChatRows:
    """The rows of ``records`` (dicts, one per record, in file order) read as ``layout``."""
    cols = sft.format_columns
    if layout == "messages":
        return _messages_rows([r.get(sft.messages_column or "messages") for r in records])
    if layout == "sharegpt":
        return _sharegpt_rows([r.get(cols.conversations) for r in records], cols.role_key, cols.content_key)
    if layout == "alpaca":
        return _alpaca_rows(records, cols, sft.system_column)
    if layout == "prompt_completion":
        return _prompt_completion_rows(
            [r.get(sft.prompt_column) for r in records], [r.get(cols.completion) for r in records]
        )
    raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
