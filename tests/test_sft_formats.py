"""Kind sft data layouts (Alpaca, ShareGPT, TRL prompt/completion, chat messages): each read from a file into the
same rows, detected from the first record, bad records as named findings with their lines; and the multi-turn
label mask (every assistant turn trained with its EOS, everything else masked), position by position."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from sft_fixtures import CHATML, build_tiny_llama, sft_config
from tuneflow.config import PipelineConfig, SftConfig
from tuneflow.data import CONTEXT, LABEL, TEXT, read_table, sft_settings, split_data
from tuneflow.kinds.sft import IGNORE, PLAIN_TEMPLATE, encode_chat, encode_row, prepare_tokenizer, token_lengths
from tuneflow.reporting import validation_summary
from tuneflow.validation import validate_frame

SYSTEM = "Be brief."
# three conversations, the same in every layout: a system turn, then one, two and three exchanges
CHATS = [
    [("system", SYSTEM), ("user", "What is your name?"), ("assistant", "My name is Tiny.")],
    [("user", "How are you?"), ("assistant", "I am fine."), ("user", "Why?"), ("assistant", "I like music.")],
    [
        ("user", "What is two plus two?"),
        ("assistant", "Two plus two is four."),
        ("user", "And three?"),
        ("assistant", "Five."),
        ("user", "Are you sure?"),
        ("assistant", "Yes, I am a computer."),
    ],
]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(tiny_llama)), SftConfig())


def make_cfg(tiny_llama: Path, data: Path, **overrides) -> PipelineConfig:
    return PipelineConfig.model_validate(sft_config(tiny_llama, data, **overrides))


def read(cfg: PipelineConfig) -> pd.DataFrame:
    return read_table(cfg.data, sft=sft_settings(cfg)).frame


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def messages(chat) -> list[dict]:
    return [{"role": r, "content": c} for r, c in chat]


def sharegpt(chat) -> dict:
    return {"conversations": [{"from": SHAREGPT_ROLE[r], "value": c} for r, c in chat]}


def prompt_completion(chat) -> dict:
    return {"prompt": messages(chat[:-1]), "completion": messages(chat[-1:])}


def rows(frame: pd.DataFrame) -> list[tuple]:
    return list(frame[[TEXT, LABEL, CONTEXT]].itertuples(index=False, name=None))


def test_every_layout_reads_into_the_same_rows(tmp_path, tiny_llama):
    files = {
        "messages": write_jsonl(tmp_path / "messages.jsonl", [{"messages": messages(c)} for c in CHATS]),
        "sharegpt": write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt(c) for c in CHATS]),
        "prompt_completion": write_jsonl(tmp_path / "pc.jsonl", [prompt_completion(c) for c in CHATS]),
    }
    parquet = tmp_path / "sharegpt.parquet"
    pd.DataFrame([sharegpt(c) for c in CHATS]).to_parquet(parquet)
    frames = {name: read(make_cfg(tiny_llama, path, **{"data.format": name})) for name, path in files.items()}
    frames["sharegpt (parquet)"] = read(make_cfg(tiny_llama, parquet, **{"data.format": "sharegpt"}))
    expected = [
        ("What is your name?", "My name is Tiny.", json.dumps([{"role": "system", "content": SYSTEM}])),
        ("Why?", "I like music.", json.dumps(messages(CHATS[1][:2]))),
        ("Are you sure?", "Yes, I am a computer.", json.dumps(messages(CHATS[2][:4]))),
    ]
    for name, frame in frames.items():
        assert rows(frame) == expected, name
        assert frame["line"].tolist() == [1, 2, 3] and frame["record_problem"].isna().all(), name
    digests = {
        read_table(make_cfg(tiny_llama, p, **{"data.format": n}).data, sft=SftConfig()).digest for n, p in files.items()
    }
    assert len(digests) == 1  # the same rows: the same content digest, whatever the layout

    # Alpaca (one JSON array) and prompt/response columns: single exchanges; instruction + input is the prompt
    alpaca = tmp_path / "alpaca.json"
    records = [
        {"instruction": "What is your name?", "input": "", "output": "My name is Tiny.", "system": SYSTEM},
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello."},
    ]
    alpaca.write_text(json.dumps(records, indent=2))
    got = read(make_cfg(tiny_llama, alpaca, **{"data.format": "alpaca", "sft.system_column": "system"}))
    csv = tmp_path / "pairs.csv"
    pd.DataFrame(
        {"prompt": ["What is your name?", "Translate.\n\nBonjour"], "response": ["My name is Tiny.", "Hello."]}
    ).assign(system=[SYSTEM, None]).to_csv(csv, index=False)
    assert rows(got) == rows(read(make_cfg(tiny_llama, csv, **{"sft.system_column": "system"})))
    assert got["line"].tolist() == [2, 8]  # the line where each record of the pretty-printed array starts


def test_custom_field_names(tmp_path, tiny_llama):
    path = write_jsonl(
        tmp_path / "renamed.jsonl",
        [{"dialog": [{"speaker": "human", "text": "Hi?"}, {"speaker": "gpt", "text": "Hello."}]}],
    )
    cols = {"conversations": "dialog", "role_key": "speaker", "content_key": "text"}
    frame = read(make_cfg(tiny_llama, path, **{"data.format": "sharegpt", "sft.format_columns": cols}))
    assert rows(frame) == [("Hi?", "Hello.", None)]


@pytest.mark.parametrize(
    ("layout", "record"),
    [
        ("sharegpt", sharegpt(CHATS[1])),
        ("alpaca", {"instruction": "Hi?", "input": "", "output": "Hello."}),
        ("prompt_completion", prompt_completion(CHATS[2])),
        ("messages", {"messages": messages(CHATS[0])}),
        ("prompt_response", {"prompt": "Hi?", "response": "Hello.", "conversations": "ignored"}),
    ],
)
def test_auto_detects_the_layout_from_the_first_record_and_says_so(tmp_path, tiny_llama, caplog, layout, record):
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    with caplog.at_level(logging.INFO, logger="tuneflow.data"):
        frame = read(make_cfg(tiny_llama, path))
    assert f"as {layout} records (detected from its first record)" in caplog.text
    assert frame[LABEL].notna().all()


def _report(path: Path, cfg: PipelineConfig, tokenizer):
    loaded = read_table(cfg.data, sft=sft_settings(cfg))
    return validate_frame(loaded.frame, cfg, path, raw=loaded.raw, tokenizer=tokenizer)


def test_bad_records_of_each_layout_are_named_findings_with_their_lines(tmp_path, tiny_llama, tokenizer):
    good = [sharegpt(c) for c in CHATS]
    bad_role = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "bot", "value": "Hello."}]}
    two_answers = {
        "conversations": [
            {"from": "human", "value": "Hi?"},
            {"from": "gpt", "value": "Hello."},
            {"from": "gpt", "value": "Hello again."},
        ]
    }
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [*good, bad_role, *good, two_answers])
    report = _report(path, make_cfg(tiny_llama, path, **{"data.format": "sharegpt"}), tokenizer)
    assert not report.success
    found = next(c for c in report.checks if c.name == "record_format")
    assert found.status == "FAIL" and found.observed.startswith("2 of 8 rows")
    assert [(o["line"], o["value"]) for o in found.offending] == [
        (4, "turn 2: unknown role 'bot' (human, gpt, system, tool)"),
        (8, "turns 2 and 3 are both 'gpt' turns (two answers in a row)"),
    ]
    assert "record_format" in validation_summary(report) and "line 8" in validation_summary(report)

    alpaca = tmp_path / "alpaca.json"
    records = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(6)]
    records[3] = {"instruction": "Where is the answer?", "input": ""}
    alpaca.write_text(json.dumps(records, indent=2))
    report = _report(alpaca, make_cfg(tiny_llama, alpaca, **{"data.format": "alpaca"}), tokenizer)
    found = next(c for c in report.checks if c.name == "record_format")
    assert found.examples == ["line 17: \"no 'output': an Alpaca record needs the answer to learn\""]
    assert next(c for c in report.checks if c.name == "label_not_null").column == "output"

    chats = [{"messages": messages(c)} for c in CHATS]
    chats.append({"messages": [{"role": "user", "content": "Hi?"}]})
    chats.append({"messages": [{"role": "assistant", "content": "I speak first."}]})
    path = write_jsonl(tmp_path / "chats.jsonl", chats)
    report = _report(path, make_cfg(tiny_llama, path, **{"data.format": "messages"}), tokenizer)
    found = next(c for c in report.checks if c.name == "record_format")
    assert found.examples == [
        "line 4: \"no 'assistant' turn: nothing to learn from\"",
        "line 5: \"turn 1 answers before any 'user' turn\"",
    ]

    pc = write_jsonl(
        tmp_path / "pc.jsonl", [prompt_completion(c) for c in CHATS] + [{"prompt": "Hi?", "completion": []}]
    )
    report = _report(pc, make_cfg(tiny_llama, pc, **{"data.format": "prompt_completion"}), tokenizer)
    found = next(c for c in report.checks if c.name == "record_format")
    assert [(o["line"], o["value"]) for o in found.offending] == [
        (4, "prompt and completion: one is turns, the other text")
    ]


def test_a_file_without_the_layouts_columns_is_a_clear_error(tmp_path, tiny_llama):
    from tuneflow.data import DataError

    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "Hi?", "answer": "Hello."}])
    with pytest.raises(DataError, match=r"column 'conversations' not found .* \(read as sharegpt records\)") as err:
        read(make_cfg(tiny_llama, path, **{"data.format": "sharegpt"}))
    assert err.value.check == "required_columns" and "Fix: set data.format" in str(err.value)
    with pytest.raises(DataError, match="data.format to the records' layout"):
        read(make_cfg(tiny_llama, path))  # auto: no layout fits
    with pytest.raises(ValueError, match="data.format alpaca holds conversations: use it with kind: sft"):
        raw = sft_config(tiny_llama, path, **{"data.format": "alpaca", "data.labels": ["a", "b"]})
        PipelineConfig.model_validate(raw | {"kind": "classification", "evaluate": {"primary_metric": "macro_f1"}})


def _pieces(tok, parts: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Expected ids and labels: each text piece tokenized on its own, trained or masked."""
    ids, labels = [], []
    for text, trained in parts:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def test_the_label_mask_of_a_three_turn_conversation_position_by_position(tokenizer):
    chat = [("system", SYSTEM)] + CHATS[2]  # three user turns, three answers
    ids, labels = encode_chat(tokenizer, messages(chat))
    want_ids, want_labels = _pieces(
        tokenizer,
        [
            (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            ("Two plus two is four.<|im_end|>", True),
            ("\n", False),
            ("<|im_start|>user\nAnd three?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Five.<|im_end|>", True),
            ("\n", False),
            ("<|im_start|>user\nAre you sure?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Yes, I am a computer.<|im_end|>", True),
        ],
    )
    assert len(ids) == len(labels) == len(want_ids)
    for position, (got_id, want_id, got, want) in enumerate(zip(ids, want_ids, labels, want_labels, strict=True)):
        assert (got_id, got) == (want_id, want), f"position {position}: {tokenizer.decode([got_id])!r}"
    # what is trained, read back: the three answers, each with its EOS, nothing else
    spans, current = [], []
    for i, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            current.append(i)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    spans.append(tokenizer.decode(current))
    assert spans == ["Two plus two is four.<|im_end|>", "Five.<|im_end|>", "Yes, I am a computer.<|im_end|>"]
    eos = tokenizer.eos_token_id
    assert sum(1 for i, label in zip(ids, labels, strict=True) if i == eos and label == eos) == 3


def test_tool_turns_are_masked_and_the_row_keeps_its_tool_prompt(tmp_path, tiny_llama, tokenizer):
    chat = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    path = write_jsonl(tmp_path / "tool.jsonl", [{"messages": chat}])
    frame = read(make_cfg(tiny_llama, path))
    assert frame[TEXT][0] == "sunny" and frame["record_problem"].isna().all()
    row = encode_row(tokenizer, frame[TEXT][0], frame[LABEL][0], frame[CONTEXT][0], 64)
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(chat, tokenize=False).rstrip("\n")
    trained = tokenizer.decode([i for i, x in zip(row["input_ids"], row["labels"], strict=True) if x != IGNORE])
    assert trained == "Let me look.<|im_end|>It is sunny.<|im_end|>"  # the tool result is not trained


def test_the_plain_template_masks_every_turn_but_the_answers(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(build_tiny_llama(tmp_path / "plain", chat_template=None)))
    tok = prepare_tokenizer(tok, SftConfig())
    assert tok.chat_template == PLAIN_TEMPLATE
    ids, labels = encode_chat(tok, messages(CHATS[1]))
    trained = tok.decode([i for i, x in zip(ids, labels, strict=True) if x != IGNORE])
    assert trained == "I am fine.<|im_end|>I like music.<|im_end|>"
    assert tok.decode(ids).startswith("### User:\nHow are you?\n\n### Assistant:\nI am fine.<|im_end|>")


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    from tuneflow.kinds.sft import TemplateError

    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    # numbers the turns from the end: every earlier turn renders differently once another one follows
    tok.chat_template = "{% for m in messages %}{{ loop.revindex }}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="Fix: set sft.chat_template"):
        encode_chat(tok, messages(CHATS[1]))


def test_token_lengths_and_the_split_count_the_whole_conversation(tmp_path, tiny_llama, tokenizer):
    assert tokenizer.chat_template == CHATML
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": messages(c)} for c in CHATS])
    cfg = make_cfg(tiny_llama, path)
    frame = read(cfg)
    lengths = token_lengths(tokenizer, frame)
    for i, chat in enumerate(CHATS):
        ids, labels = encode_chat(tokenizer, messages(chat))
        assert lengths["pair_tokens"][i] == len(ids)  # every turn counts
        assert lengths["prompt_tokens"][i] == labels.index(next(x for x in labels if x != IGNORE))
    # one row per conversation: a conversation lands on one side of the split, whole
    split = split_data(read_table(cfg.data, sft=sft_settings(cfg)), cfg.data)
    assert len(split.train) + len(split.eval) == len(CHATS)
    # a long earlier answer makes the conversation too long for max_length: the pair_tokens warning says so
    long_chat = [
        ("user", "Count."),
        ("assistant", " ".join(map(str, range(60)))),
        ("user", "Again?"),
        ("assistant", "No."),
    ]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": messages(c)} for c in [*CHATS, long_chat]])
    report = _report(path, make_cfg(tiny_llama, path), tokenizer)
    pair = next(c for c in report.checks if c.name == "pair_tokens")
    long_ids, _ = encode_chat(tokenizer, messages(long_chat))
    assert pair.status == "warn" and f"line 4: {len(long_ids)}" in pair.examples


def test_multi_turn_rows_reach_trl_with_their_labels_and_train(tmp_path, tiny_llama):
    from tuneflow.kinds import get_kind
    from tuneflow.kinds.sft import sft_trainer
    from tuneflow.models import load_tokenizer

    records = [sharegpt([(r, f"{c} ({i})") for r, c in CHATS[i % 3]]) for i in range(24)]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", records)
    cfg = make_cfg(tiny_llama, path, **{"sft.max_steps": 2, "model.max_length": 128})
    kind = get_kind("sft")
    tok = kind.prepare_tokenizer(load_tokenizer(cfg.model), cfg)
    split = split_data(read_table(cfg.data, sft=sft_settings(cfg)), cfg.data)
    data = kind.encode(split, tok, cfg.model.max_length, [])
    trainer = sft_trainer(cfg, tok, data, tmp_path / "out")
    train = trainer.train_dataset
    want = [
        encode_row(tok, p, r, c, cfg.model.max_length)["labels"]
        for p, r, c in zip(split.train[TEXT], split.train[LABEL], split.train[CONTEXT], strict=True)
    ]
    # TRL took the rows as they are: the labels of every multi-turn row are ours, one trained EOS per answer
    assert [list(x) for x in train["labels"]] == want
    answers = [1 + (c or "").count('"assistant"') for c in split.train[CONTEXT]]
    assert [sum(1 for x in row if x == tok.eos_token_id) for row in train["labels"]] == answers
    assert max(answers) == 3
    batch = trainer.data_collator([train[i] for i in range(3)])
    assert batch["labels"][0].tolist() == [x for i in range(3) for x in train[i]["labels"]]  # padding-free: one row
    output = trainer.train()
    assert output.global_step == 2 and output.training_loss == output.training_loss  # finite, not NaN
