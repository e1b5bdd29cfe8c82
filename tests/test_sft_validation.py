"""Validation of kind sft (prompt/response rows) with real Great Expectations and a tiny Llama's chat template:
which checks run, what each one finds (and names by line), token counts with the template, conflicts and
repeats against accepted data, and the landing-zone gate filing a bad batch in quarantine/."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from sft_fixtures import build_tiny_llama, sft_config, sft_frame
from tuneflow.config import CLASSIFICATION_CHECKS, PipelineConfig, SftConfig
from tuneflow.data import TEXT, DataError, normalize_text, read_table, sft_settings
from tuneflow.kinds.sft import prepare_tokenizer, token_lengths
from tuneflow.landing import BatchRejected, check_data
from tuneflow.reporting import validation_summary
from tuneflow.validation import NORM, _sft_token_counts, validate_frame
from tuneflow.validation_report import ValidationReport

SFT_CHECKS_IN_ORDER = [
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
]
LONG = " ".join(str(i) for i in range(80))  # about 150 tokens of the tiny tokenizer: over max_length 64


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(tiny_llama)), SftConfig())


def make_cfg(tiny_llama: Path, data: Path, **overrides) -> PipelineConfig:
    return PipelineConfig.model_validate(sft_config(tiny_llama, data, **overrides))


def pairs(n: int = 24, extra=()) -> pd.DataFrame:
    """``n`` distinct prompt/response rows (CSV lines 2..n+1), then ``extra`` (prompt, response) rows."""
    frame = sft_frame(n)
    return pd.concat([frame, pd.DataFrame(list(extra), columns=["prompt", "response"])], ignore_index=True)


def run(path: Path, cfg: PipelineConfig, tokenizer=None, reference: pd.DataFrame | None = None) -> ValidationReport:
    loaded = read_table(cfg.data, path=path, sft=sft_settings(cfg))
    return validate_frame(loaded.frame, cfg, path, raw=loaded.raw, reference=reference, tokenizer=tokenizer)


def check(report: ValidationReport, name: str):
    return next(c for c in report.checks if c.name == name)


def accepted(path: Path, cfg: PipelineConfig) -> pd.DataFrame:
    """Accepted data as the landing gate passes it: the rows with their normalized prompt."""
    frame = read_table(cfg.data, path=path, sft=sft_settings(cfg)).frame
    frame[NORM] = frame[TEXT].map(normalize_text)
    return frame


def test_a_clean_batch_passes_the_sft_checks(tmp_path, tiny_llama, tokenizer):
    path = tmp_path / "pairs.csv"
    pairs().to_csv(path, index=False)
    report = run(path, make_cfg(tiny_llama, path), tokenizer)
    assert report.success and not report.warnings, validation_summary(report)
    assert [c.name for c in report.checks] == SFT_CHECKS_IN_ORDER
    assert not CLASSIFICATION_CHECKS & {c.name for c in report.checks}
    assert set(report.raw) == {"schema", "rows"}  # no classes table; no drift without accepted data
    assert "13/13 expectations met" in validation_summary(report)
    # Rules and columns name the prompt and the response, as the user's file does.
    assert check(report, "text_not_null").column == "prompt" and check(report, "label_not_null").column == "response"
    assert check(report, "label_not_null").rule == "every row has a response"
    assert "'prompt'" in check(report, "text_not_blank").fix and "'response'" in check(report, "response_not_blank").fix
    # max_length 64 is shorter than any templated pair in bytes: every row was counted, and fits
    assert check(report, "prompt_tokens").observed.startswith("0 of 24 rows")
    assert check(report, "repeats_accepted").observed == "skipped: no accepted data to compare with"


def test_without_a_tokenizer_the_token_checks_are_skipped(tmp_path, tiny_llama):
    path = tmp_path / "pairs.csv"
    pairs(extra=[(LONG, "Yes.")]).to_csv(path, index=False)
    report = run(path, make_cfg(tiny_llama, path))
    assert report.success, validation_summary(report)
    for name in ("prompt_tokens", "pair_tokens"):
        assert check(report, name).observed == "skipped: no tokenizer given" and check(report, name).status == "skipped"


# name: (extra rows after 24 clean ones, so the first is CSV line 26; the failing check; its example)
FAILURES = {
    "blank_response": ([("Are you there?", "  \t")], "response_not_blank", "line 26: '  \\t'"),
    "empty_response": ([("Are you there?", None)], "label_not_null", "line 26: None"),
    "mojibake_response": ([("Where is the café?", "The cafÃ© is here.")], "response_encoding", "line 26: 'The caf"),
    "blank_prompt": ([("   ", "Nothing was asked.")], "text_not_blank", "line 26: '   '"),
    "mojibake_prompt": ([("Where is the cafÃ©?", "Here.")], "text_encoding", "line 26: 'Where is"),
    "prompt_over_max_length": ([(LONG, "Yes.")], "prompt_tokens", "line 26: "),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_each_failure_is_found_by_its_check(case, tmp_path, tiny_llama, tokenizer):
    extra, name, example = FAILURES[case]
    path = tmp_path / "batch.csv"
    pairs(extra=extra).to_csv(path, index=False)
    report = run(path, make_cfg(tiny_llama, path), tokenizer)
    assert not report.success
    assert [c.name for c in report.failed] == [name], validation_summary(report)
    failed = report.failed[0]
    assert failed.rule and failed.fix and failed.observed.startswith("1 of 25 rows")
    assert any(e.startswith(example) for e in failed.examples), failed.examples


def test_a_prompt_over_max_length_counts_its_templated_tokens(tmp_path, tiny_llama, tokenizer):
    path = tmp_path / "batch.csv"
    pairs(extra=[(LONG, "Yes.")]).to_csv(path, index=False)
    report = run(path, make_cfg(tiny_llama, path), tokenizer)
    prompt_tokens = check(report, "prompt_tokens")
    (example,) = prompt_tokens.examples
    assert int(example.removeprefix("line 26: ")) >= 64 and prompt_tokens.threshold == "< 64 tokens"
    assert prompt_tokens.column == "prompt tokens (chat template)"
    assert [c.name for c in report.warnings] == ["pair_tokens"]  # its pair is over the limit as well


def test_a_long_response_only_warns(tmp_path, tiny_llama, tokenizer):
    path = tmp_path / "batch.csv"
    pairs(extra=[("Count for me.", LONG)]).to_csv(path, index=False)
    report = run(path, make_cfg(tiny_llama, path), tokenizer)
    assert report.success, validation_summary(report)
    assert [c.name for c in report.warnings] == ["pair_tokens"]
    (example,) = check(report, "pair_tokens").examples
    assert example.startswith("line 26: ") and int(example.removeprefix("line 26: ")) > 64
    assert "warning: pair_tokens" in validation_summary(report)


def test_one_prompt_with_two_responses_warns_and_is_no_duplicate(tmp_path, tiny_llama, tokenizer):
    path = tmp_path / "batch.csv"
    # line 26 asks line 2's prompt (in other case and spacing) and gets another answer
    pairs(extra=[("what is your  NAME? (0)", "They call me Tiny.")]).to_csv(path, index=False)
    report = run(path, make_cfg(tiny_llama, path), tokenizer)
    assert report.success and [c.name for c in report.warnings] == ["response_conflict"], validation_summary(report)
    conflict = check(report, "response_conflict")
    assert [e.split(":")[0] for e in conflict.examples] == ["line 2", "line 26"]
    assert conflict.column == "response per prompt (normalized)"
    assert check(report, "duplicate_rate").observed == "0 of 25 rows (0.0%) repeat another row"  # a new row


def test_repeated_pairs_count_in_duplicate_rate(tmp_path, tiny_llama, tokenizer):
    path = tmp_path / "batch.csv"
    # 8 repeats of line 2's pair, differing only in case and whitespace: 24 unique pairs in 32 rows
    repeats = [(f"WHAT is your name?{' ' * (i % 3 + 1)}(0)", " My name is Tiny. (0)") for i in range(8)]
    pairs(extra=repeats).to_csv(path, index=False)
    report = run(path, make_cfg(tiny_llama, path), tokenizer)
    assert [c.name for c in report.failed] == ["duplicate_rate"] and not report.warnings, validation_summary(report)
    duplicates = report.failed[0]
    assert duplicates.observed == "8 of 32 rows (25.0%) repeat another row"  # 24 unique of 32
    assert duplicates.column == "prompt + response (normalized)" and "prompt and response" in duplicates.rule


def test_a_numeric_response_fails_the_schema_and_skips_the_row_checks(tmp_path, tiny_llama, tokenizer):
    path = tmp_path / "batch.jsonl"
    rows = pairs().to_dict("records") + [{"prompt": "What is two plus two?", "response": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run(path, make_cfg(tiny_llama, path), tokenizer)
    assert [c.name for c in report.failed] == ["response_type"], validation_summary(report)
    assert report.failed[0].examples == ["line 25: 4"]
    assert check(report, "response_not_blank").observed == "skipped: response_type failed"


def test_repeats_and_conflicts_against_accepted_data(tmp_path, tiny_llama, tokenizer):
    old, new = tmp_path / "accepted.csv", tmp_path / "batch.csv"
    pairs(12).to_csv(old, index=False)
    fresh = sft_frame(40).iloc[24:]  # rows the accepted data does not have
    repeated = sft_frame(12).iloc[:2]  # two accepted pairs again
    answered_otherwise = pd.DataFrame([("What colour is the sky? (0)", "Grey.")], columns=["prompt", "response"])
    pd.concat([fresh, repeated, answered_otherwise], ignore_index=True).to_csv(new, index=False)
    cfg = make_cfg(tiny_llama, new)
    report = run(new, cfg, tokenizer, reference=accepted(old, cfg))
    assert report.success, validation_summary(report)
    repeats = check(report, "repeats_accepted")
    assert repeats.status == "pass" and repeats.observed.startswith("2 of 19 rows")
    assert repeats.column == "prompt + response (normalized) in accepted data"
    # lines 18 and 19 repeat accepted pairs (no conflict); line 20 answers an accepted prompt otherwise
    assert [c.name for c in report.warnings] == ["response_conflict"]
    assert [e.split(":")[0] for e in check(report, "response_conflict").examples] == ["line 20"]

    strict = make_cfg(tiny_llama, new, **{"validation.max_repeat_share": 0.05})
    report = run(new, strict, tokenizer, reference=accepted(old, strict))
    assert [c.name for c in report.failed] == ["repeats_accepted"]
    assert [e.split(":")[0] for e in report.failed[0].examples] == ["line 18", "line 19"]


def test_response_length_drift_is_named(tmp_path, tiny_llama, tokenizer):
    old, new = tmp_path / "accepted.csv", tmp_path / "batch.csv"
    pairs(40).to_csv(old, index=False)
    # the same kind of prompts, answered at ten times the length
    long_answers = sft_frame(80).iloc[40:].assign(response=lambda f: f["response"] + " and so on" * 16)
    long_answers.to_csv(new, index=False)
    cfg = make_cfg(tiny_llama, new, **{"validation.drift_min_rows": 20, "model.max_length": 256})
    report = run(new, cfg, tokenizer, reference=accepted(old, cfg))
    assert report.success and [c.name for c in report.warnings] == ["drift_text_length"], validation_summary(report)
    drift = check(report, "drift_text_length")
    assert "response" in drift.rule
    (example,) = drift.examples
    assert example.startswith("response length: ") and float(example.partition(": ")[2]) < 0.001
    # observed: each side's p-value against the threshold and what was compared, not "1 of 2 rows"
    prompt, response = drift.observed.split("; ")
    assert prompt.startswith("Kolmogorov-Smirnov p = ") and " >= 0.001 (prompt length: median " in prompt
    assert " < 0.001 (response length: median " in response and "rows" not in drift.observed


def test_messages_rows_name_the_messages_column_and_keep_contexts_apart(tmp_path, tiny_llama, tokenizer):
    path = tmp_path / "chats.jsonl"

    def chat(system: str | None, prompt: str, response: str) -> dict:
        turns = [{"role": "system", "content": system}] if system else []
        return {"messages": [*turns, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}

    rows = [chat(None, p, r) for p, r in pairs(12).itertuples(index=False)]
    # The same question under two system messages, answered two ways: two contexts, no conflict
    rows += [chat("Answer in French.", "How are you?", "Je vais bien."), chat("Be brief.", "How are you?", "Fine.")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(tiny_llama, path, **{"sft.messages_column": "messages"})
    report = run(path, cfg, tokenizer)
    assert report.success and not report.warnings, validation_summary(report)
    assert check(report, "text_not_null").column == "messages (last user turn)"
    assert check(report, "label_not_null").column == "messages (last assistant turn)"
    assert "'messages (last assistant turn)'" in check(report, "response_not_blank").fix


def test_files_that_cannot_be_read_as_sft_rows(tmp_path, tiny_llama):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("question,answer\nHi?,Hello.\n")
    with pytest.raises(DataError, match="'prompt' and 'response' not found") as err:
        read_table(make_cfg(tiny_llama, wrong).data, path=wrong, sft=sft_settings(make_cfg(tiny_llama, wrong)))
    assert err.value.check == "required_columns"


def test_only_rows_that_could_exceed_the_limit_are_counted(tiny_llama, tokenizer):
    rows = pd.DataFrame(
        {
            "text": ["Hi?", "Hi?", LONG, "Tell me more.", None],
            "label": ["Hello.", LONG, "Yes.", "word " * 20, "orphan"],
            "context": [None, None, None, json.dumps([{"role": "system", "content": "Be nice."}]), None],
        }
    )
    limit = 128
    counts = _sft_token_counts(rows, tokenizer, limit)
    exact = token_lengths(tokenizer, rows)
    counted = counts["pair_tokens"].notna()
    assert counted.tolist() == [False, True, True, True, False]  # a short pair is not tokenized at all
    assert counts[counted].equals(exact[counted])
    assert (exact.loc[~counted, "pair_tokens"].dropna() <= limit).all()


def test_the_landing_gate_quarantines_a_bad_sft_batch_with_its_report(tmp_path, tiny_llama, tokenizer):
    landing = tmp_path / "chat"
    incoming = landing / "incoming"
    incoming.mkdir(parents=True)
    pairs(24).to_csv(incoming / "a_good.csv", index=False)
    pd.concat([sft_frame(40).iloc[24:], pd.DataFrame([("Hello?", " ")], columns=["prompt", "response"])]).to_csv(
        incoming / "b_blank.csv", index=False
    )
    raw = sft_config(tiny_llama, Path("unused"))
    raw["data"] = {"landing": str(landing), "eval_fraction": 0.25}
    cfg = PipelineConfig.model_validate(raw)
    result = check_data(cfg, "sft.yaml", tmp_path / "docs", tokenizer)
    # data.on_quarantine: train (default): the good batch is trained on, the bad one reported
    assert result.error is None and isinstance(result.quarantined, BatchRejected) and result.data is not None
    assert {o.name: o.status for o in result.gate.outcomes} == {"a_good.csv": "accepted", "b_blank.csv": "quarantined"}
    assert (landing / "accepted" / "a_good.csv").exists() and not list(incoming.iterdir())
    quarantine = landing / "quarantine"
    assert (quarantine / "b_blank.csv").exists()
    report = json.loads((quarantine / "b_blank.csv.report.json").read_text())
    assert [c["name"] for c in report["checks"] if c["status"] == "FAIL"] == ["response_not_blank"]
    assert [c["name"] for c in report["checks"]] == SFT_CHECKS_IN_ORDER
    blank = next(c for c in report["checks"] if c["name"] == "response_not_blank")
    assert blank["examples"] == ["line 18: ' '"]
    # judged against the batch accepted before it: nothing repeated, nothing answered otherwise
    assert next(c for c in report["checks"] if c["name"] == "repeats_accepted")["status"] == "pass"
    html = (quarantine / "b_blank.csv.report" / "index.html").read_text()
    assert "<html" in html.lower() or "<!doctype" in html.lower()
    assert "response_not_blank" in str(result.quarantined) and "line 18" in str(result.quarantined)
