"""The landing-zone gate on a corpus of bad batches: each is quarantined for exactly its fault, with
its report; unusual-but-fine batches are accepted; nothing is lost; two gates never accept twice.
Also the retrain's entry to it: whether there is anything new, and the data check of a single file."""

from __future__ import annotations

import ast
import json
import os
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from tuneflow.config import PipelineConfig
from tuneflow.landing import check_data, folders, has_new_batches, load_accepted, run_gate
from tuneflow.reporting import validation_summary
from tuneflow.validation import ValidationFailed

from conftest import make_rows, tiny_config_dict

CORPUS = Path(__file__).parent / "data" / "bad"
EXPECTED: dict[str, str] = json.loads((CORPUS / "EXPECTED.json").read_text())
# Made here rather than committed: a 10 MB text, and a link pointing out of the landing zone.
GENERATED = {"huge_text.csv": "text_length", "escape_link.csv": "file_inside_landing_zone"}


def gate_config(landing: Path, model_dir: Path) -> PipelineConfig:
    cfg = tiny_config_dict(
        Path("unused"),
        model_dir,
        validation={
            "min_rows_per_class": 3,
            "max_class_imbalance": 5,
            "max_text_chars": 1000,
            "max_text_tokens": 64,
            "drift_min_rows": 30,
            "severity": {
                "text_tokens": "error",
                "class_imbalance": "error",
                "drift_labels": "error",
                "drift_text_length": "error",
            },
        },
    )
    cfg["data"] = {"landing": str(landing), "labels": ["ham", "spam"], "eval_fraction": 0.25}
    return PipelineConfig.model_validate(cfg)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, tiny_model_dir, tokenizer):
    landing = tmp_path_factory.mktemp("landing") / "sms"
    incoming, accepted, quarantine = folders(landing)
    cfg = gate_config(landing, tiny_model_dir)
    shutil.copy(CORPUS / "base.csv", incoming)
    first = run_gate(cfg, landing, tokenizer)
    assert [o.status for o in first.outcomes] == ["accepted"], validation_summary(first.outcomes[0].report)

    for name in EXPECTED:
        shutil.copy(CORPUS / name, incoming / name)
    clean = [f"see you at lunch friend {i},ham" for i in range(10)] + [
        f"free cash prize claim now {i},spam" for i in range(10)
    ]
    (incoming / "huge_text.csv").write_text("text,label\n" + "y" * 10_000_000 + ",spam\n" + "\n".join(clean) + "\n")
    outside = tmp_path_factory.mktemp("outside") / "secret.csv"
    outside.write_text("text,label\nnot yours,ham\n")
    (incoming / "escape_link.csv").symlink_to(outside)
    result = run_gate(cfg, landing, tokenizer)
    return landing, {o.name: o for o in result.outcomes}


@pytest.mark.parametrize("name", sorted(EXPECTED | GENERATED))
def test_each_corpus_batch_ends_where_it_should(name, corpus_run):
    landing, outcomes = corpus_run
    expected = (EXPECTED | GENERATED)[name]
    outcome = outcomes[name]
    assert not (landing / "incoming" / name).exists()
    if expected == "accepted":
        assert outcome.status == "accepted", validation_summary(outcome.report)
        assert (landing / "accepted" / name).read_bytes() == (CORPUS / name).read_bytes()  # byte for byte
        assert not (landing / "quarantine" / name).exists()
        return
    assert outcome.status == "quarantined"
    assert [c.name for c in outcome.report.failed] == [expected], validation_summary(outcome.report)
    moved = landing / "quarantine" / name
    assert moved.exists() or moved.is_symlink()
    assert not (landing / "accepted" / name).exists()
    if name in EXPECTED:
        assert moved.read_bytes() == (CORPUS / name).read_bytes()
    report = json.loads((landing / "quarantine" / f"{name}.report.json").read_text())
    assert report["success"] is False and [c["name"] for c in report["checks"] if c["status"] == "FAIL"] == [expected]
    html = (landing / "quarantine" / f"{name}.report" / "index.html").read_text()
    assert "<html" in html.lower() or "<!doctype" in html.lower()


def test_reports_name_the_batch_the_rule_and_the_offending_lines(corpus_run):
    _, outcomes = corpus_run
    summary = validation_summary(outcomes["bad_label.csv"].report)
    assert "bad_label.csv" in summary and "label_in_set" in summary and "'eggs'" in summary and "line " in summary
    assert "fix:" in summary
    assert "Expected 2 fields" in validation_summary(outcomes["ragged_row.csv"].report)
    assert outcomes["escape_link.csv"].path.is_symlink()  # the link moved, its target was never read or touched


def test_training_data_is_the_deduplicated_union_of_accepted_batches(corpus_run, tiny_model_dir):
    landing, _ = corpus_run
    cfg = gate_config(landing, tiny_model_dir)
    union = load_accepted(cfg, landing)
    assert {p.name for p in union.sources} == {"base.csv", "bom.csv", "crlf.csv"}
    assert len(union.frame) == 200 + 40 + 40
    assert union.frame["text_normalized"].is_unique


def test_two_gates_at_once_accept_a_batch_once(tmp_path, tiny_model_dir, tokenizer):
    landing = tmp_path / "sms"
    incoming, accepted, quarantine = folders(landing)
    shutil.copy(CORPUS / "base.csv", incoming)
    cfg = gate_config(landing, tiny_model_dir)
    results, errors = [], []

    def gate():
        try:
            results.append(run_gate(cfg, landing, tokenizer))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=gate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert sorted(len(r.accepted) for r in results) == [0, 1]
    assert [p.name for p in accepted.glob("[!.]*")] == ["base.csv"] and not list(incoming.iterdir())


def test_a_repeated_delivery_is_quarantined_not_overwritten(tmp_path, tiny_model_dir, tokenizer):
    landing = tmp_path / "sms"
    incoming, accepted, quarantine = folders(landing)
    cfg = gate_config(landing, tiny_model_dir)
    shutil.copy(CORPUS / "base.csv", incoming)
    run_gate(cfg, landing, tokenizer)
    shutil.copy(CORPUS / "base.csv", incoming)
    again = run_gate(cfg, landing, tokenizer)
    assert [c.name for c in again.outcomes[0].report.failed] == ["repeats_accepted"]
    repeat = again.outcomes[0].report.failed[0]
    # the offending rows as a person reads them: line, text and label; never a derived flag or 'None'
    assert repeat.column == "text (normalized) in accepted data" and repeat.examples
    assert all(e.startswith("line ") and ": 'True'" not in e and not e.endswith("True") for e in repeat.examples)
    texts = set(pd.read_csv(CORPUS / "base.csv")["text"])
    line, _, shown = repeat.examples[0].partition(": ")
    assert shown.rsplit(" (", 1)[1] in ("'ham')", "'spam')") and ast.literal_eval(shown.rsplit(" (", 1)[0]) in texts
    assert (accepted / "base.csv").read_bytes() == (CORPUS / "base.csv").read_bytes()
    assert (quarantine / "base.csv").exists()


@pytest.mark.parametrize("crash_at", ["report", "move"])
def test_a_crash_mid_gate_loses_nothing_and_duplicates_nothing(
    crash_at, tmp_path, tiny_model_dir, tokenizer, monkeypatch
):
    import tuneflow.landing as gate

    landing = tmp_path / "sms"
    incoming, accepted, quarantine = folders(landing)
    cfg = gate_config(landing, tiny_model_dir)
    names = ["base.csv", "bad_label.csv", "crlf.csv", "null_text.csv"]
    for name in names:
        shutil.copy(CORPUS / name, incoming)
    real_write, real_rename = gate.write_json_atomic, gate.os.rename
    calls = {"n": 0}

    def crash_on_second(real):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated crash")
            return real(*args, **kwargs)

        return wrapper

    if crash_at == "report":
        monkeypatch.setattr(gate, "write_json_atomic", crash_on_second(real_write))
    else:
        monkeypatch.setattr(gate.os, "rename", crash_on_second(real_rename))
    with pytest.raises(KeyboardInterrupt):
        run_gate(cfg, landing, tokenizer)

    def where(name: str) -> list[str]:
        return [d.name for d in (incoming, accepted, quarantine) if (d / name).exists()]

    for name in names:
        assert len(where(name)) == 1, (name, where(name))  # never gone, never in two places
        if where(name) == ["quarantine"]:
            assert (quarantine / f"{name}.report.json").exists()  # never a quarantined batch without report
    monkeypatch.undo()
    run_gate(cfg, landing, tokenizer)  # the next gate finishes the job
    assert sorted(p.name for p in accepted.glob("[!.]*")) == ["base.csv", "crlf.csv"]
    assert {p.name for p in quarantine.iterdir() if not p.name.endswith((".report", ".report.json"))} == {
        "bad_label.csv",
        "null_text.csv",
    }
    assert not list(incoming.iterdir())


def test_files_still_being_written_are_left_in_incoming(tmp_path, tiny_model_dir, tokenizer):
    landing = tmp_path / "sms"
    incoming, accepted, quarantine = folders(landing)
    for name in (".base.csv", "base.csv.part", "base.csv.tmp"):
        shutil.copy(CORPUS / "base.csv", incoming / name)
    result = run_gate(gate_config(landing, tiny_model_dir), landing, tokenizer)
    assert result.outcomes == [] and len(list(incoming.iterdir())) == 3


def test_has_new_batches_only_for_complete_files_in_incoming(tmp_path, tiny_model_dir, data_csv):
    single = PipelineConfig.model_validate(tiny_config_dict(data_csv, tiny_model_dir))
    assert has_new_batches(single) is True  # a single file is always there to train on

    landing = tmp_path / "sms"
    cfg = gate_config(landing, tiny_model_dir)
    assert has_new_batches(cfg) is False  # not even created yet
    incoming, accepted, _ = folders(landing)
    shutil.copy(CORPUS / "base.csv", accepted)
    assert has_new_batches(cfg) is False  # accepted batches are not new (without a registry to ask)
    union = load_accepted(cfg, landing).digest
    assert has_new_batches(cfg, trained={union}) is False  # a version was trained on exactly this
    assert has_new_batches(cfg, trained={"another-digest"}) is True  # accepted, but never trained on
    assert has_new_batches(cfg, trained=set()) is True
    for name in ("base.csv.part", ".base.csv", "upload.tmp"):
        shutil.copy(CORPUS / "base.csv", incoming / name)
    (incoming / "subdir").mkdir()
    assert has_new_batches(cfg, trained={union}) is False  # still being written, or not a file
    shutil.copy(CORPUS / "crlf.csv", incoming / "crlf.csv")
    assert has_new_batches(cfg) is True


def test_check_data_of_a_good_single_file_returns_the_rows(workdir, data_csv, tiny_model_dir, tokenizer):
    cfg = PipelineConfig.model_validate(tiny_config_dict(data_csv, tiny_model_dir))
    check = check_data(cfg, "tiny.yaml", workdir / "docs", tokenizer)
    assert check.error is None and check.gate is None
    assert check.data is not None and len(check.data.frame) == 300 and check.rows_dropped == 0
    (report,) = check.reports
    assert report.success and report.source == str(data_csv)


def test_check_data_of_a_bad_single_file_returns_the_error_instead_of_raising(workdir, tiny_model_dir, tokenizer):
    rows = make_rows(40)
    rows.loc[3, "label"] = "eggs"
    path = workdir / "bad.csv"
    rows.to_csv(path, index=False)
    cfg = PipelineConfig.model_validate(tiny_config_dict(path, tiny_model_dir))
    check = check_data(cfg, "tiny.yaml", workdir / "docs", tokenizer)
    assert check.data is None and isinstance(check.error, ValidationFailed)
    assert "label_in_set" in str(check.error) and "'eggs'" in str(check.error)
    (report,) = check.reports
    assert not report.success and [c.name for c in report.failed] == ["label_in_set"]
    assert (workdir / "docs" / "index.html").exists()  # the Data Docs of the rejected file are there to read


def test_a_batch_the_gate_cannot_judge_is_quarantined_not_left_to_block_incoming(
    tmp_path, tiny_model_dir, tokenizer, monkeypatch
):
    import json

    import tuneflow.landing as gate

    landing = tmp_path / "sms"
    incoming, accepted, quarantine = folders(landing)
    cfg = gate_config(landing, tiny_model_dir)
    shutil.copy(CORPUS / "base.csv", incoming / "a-good.csv")
    shutil.copy(CORPUS / "crlf.csv", incoming / "b-poison.csv")
    real = gate.validate_frame

    def fails_on_poison(frame, cfg, source, **kwargs):  # what Great Expectations raising inside a check looks like
        if str(source).endswith("b-poison.csv"):
            raise RuntimeError("Great Expectations could not run text_encoding: simulated")
        return real(frame, cfg, source, **kwargs)

    monkeypatch.setattr(gate, "validate_frame", fails_on_poison)
    result = run_gate(cfg, landing, tokenizer)
    assert [(o.name, o.status) for o in result.outcomes] == [
        ("a-good.csv", "accepted"),
        ("b-poison.csv", "quarantined"),
    ]
    assert not list(incoming.iterdir())  # nothing left to fail the next run
    report = json.loads((quarantine / "b-poison.csv.report.json").read_text())
    (check,) = [c for c in report["checks"] if c["status"] == "FAIL"]
    assert check["name"] == "gate_error" and "RuntimeError" in check["observed"] and "simulated" in check["observed"]
    assert (quarantine / "b-poison.csv.report" / "index.html").exists()


@pytest.mark.parametrize("how", ["symlink", "hardlink", "open_writer"])
def test_accepted_bytes_cannot_change_after_they_were_judged(how, tmp_path, tiny_model_dir, tokenizer):
    landing = tmp_path / "sms"
    incoming, accepted, _ = folders(landing)
    source = landing / "elsewhere.csv"  # inside the landing zone, outside incoming/
    shutil.copy(CORPUS / "base.csv", source)
    judged = source.read_bytes()
    batch = incoming / "base.csv"
    writer = None
    if how == "symlink":
        batch.symlink_to(source)
    elif how == "hardlink":
        os.link(source, batch)
    else:
        shutil.copy(source, batch)
        writer = batch.open("ab")  # a writer that keeps its file open after the gate moved it
    cfg = gate_config(landing, tiny_model_dir)
    assert [o.status for o in run_gate(cfg, landing, tokenizer).outcomes] == ["accepted"]
    kept = accepted / "base.csv"
    assert not kept.is_symlink() and kept.stat().st_nlink == 1 and kept.read_bytes() == judged
    if writer is not None:
        writer.write(b"free prize now,ham\n" * 50)
        writer.close()
    else:
        source.write_bytes(judged + b"free prize now,ham\n" * 50)  # the other name of the bytes changes
    assert kept.read_bytes() == judged
    assert len(load_accepted(cfg, landing).frame) > 0


def test_an_accepted_batch_changed_afterwards_stops_the_run_and_is_named(tmp_path, tiny_model_dir, tokenizer):
    from tuneflow.data import DataError

    landing = tmp_path / "sms"
    incoming, accepted, _ = folders(landing)
    shutil.copy(CORPUS / "base.csv", incoming)
    cfg = gate_config(landing, tiny_model_dir)
    run_gate(cfg, landing, tokenizer)
    with (accepted / "base.csv").open("a") as fh:
        fh.write("free prize now,spam\n")
    with pytest.raises(DataError, match="base.csv changed after it was accepted") as err:
        load_accepted(cfg, landing)
    assert err.value.check == "accepted_integrity" and "Fix:" in str(err.value)
    # a batch put into accepted/ by hand is recorded as it is (with a warning) by the next gate
    shutil.copy(CORPUS / "base.csv", accepted / "base.csv")
    shutil.copy(CORPUS / "base.csv", accepted / "by-hand.csv")
    run_gate(cfg, landing, tokenizer)
    assert "by-hand.csv" in json.loads((accepted / ".manifest.json").read_text())["batches"]


def test_a_changed_label_set_rejudges_the_accepted_union_before_training(tmp_path, tiny_model_dir, tokenizer):
    from tuneflow.landing import check_data

    landing = tmp_path / "sms"
    incoming, accepted, _ = folders(landing)
    shutil.copy(CORPUS / "base.csv", incoming)
    cfg = gate_config(landing, tiny_model_dir)
    assert check_data(cfg, "cfg.yaml", tmp_path / "docs", tokenizer).error is None
    assert check_data(cfg, "cfg.yaml", tmp_path / "docs", tokenizer).error is None  # unchanged: not re-judged
    changed = cfg.model_copy(deep=True)
    changed.data.labels = ["ham", "junk"]  # 'spam' rows in accepted/ are no longer a label of the config
    check = check_data(changed, "cfg.yaml", tmp_path / "docs", tokenizer)
    assert check.error is not None and check.error.check == "label_in_set" and check.data is None
    assert "label_in_set" in str(check.error) and str(accepted) in str(check.error)


def quarantined_report_page(tmp_path: Path, model_dir: Path, tokenizer) -> tuple[Path, Path]:
    """A batch that breaks three rules (an unknown label, too many repeats, too few rows of one label) judged
    by the gate: returns its quarantine report folder and the batch's new path."""
    landing = tmp_path / "landing"
    incoming, _, quarantine = folders(landing)
    cfg = gate_config(landing, model_dir)
    lines = [f"see you at the cinema tonight {i},ham" for i in range(14)]
    lines += ["Call me back  NOW,ham"] * 6 + ["call me back now,ham"]  # 6 repeats after normalization
    lines += ["win a free cruise today,spam", "<b>click</b> & claim your prize,spma"]
    (incoming / "batch-7.csv").write_text("text,label\n" + "\n".join(lines) + "\n")
    (outcome,) = run_gate(cfg, landing, tokenizer).outcomes
    assert outcome.status == "quarantined"
    return quarantine / "batch-7.csv.report", quarantine / "batch-7.csv"


def test_the_quarantine_report_page_is_self_contained_and_reads_in_the_rules_terms(tmp_path, tiny_model_dir, tokenizer):
    site, batch = quarantined_report_page(tmp_path, tiny_model_dir, tokenizer)
    page = (site / "index.html").read_text()
    # nothing fetched: no script, no stylesheet link, no URL with a scheme anywhere on the page
    lowered = page.lower()
    assert "<script" not in lowered and "<link" not in lowered and "://" not in page and "@import" not in lowered
    assert "batch-7.csv" in page and str(batch) in page
    # each failed check: its rule, the observed value in the rule's terms, the offending rows, the fix
    assert "label_in_set" in page and "labels are one of [&#x27;ham&#x27;, &#x27;spam&#x27;]" in page
    assert "<td class='text'>24</td><td class='text'>&lt;b&gt;click&lt;/b&gt; &amp; claim your prize</td>" in page
    assert "add the label to data.labels" in page
    assert "duplicate_rate" in page and "6 of 23 rows (26.1%) repeat another row" in page
    assert "at most 20% of rows repeat" in page and "deduplicate the file" in page
    assert "rows_per_class" in page and "rows per label: &#x27;ham&#x27;: 21, &#x27;spam&#x27;: 1" in page
    assert "largest class &#x27;ham&#x27; (21 rows) vs &#x27;spam&#x27; 21.0x" in page
    # ... and the full Data Docs beside it, linked relatively
    assert "href='data_docs/index.html'" in page and (site / "data_docs" / "index.html").exists()
    report = json.loads((site.parent / "batch-7.csv.report.json").read_text())
    failed = {c["name"]: c for c in report["checks"] if c["status"] == "FAIL"}
    assert set(failed) == {"label_in_set", "duplicate_rate", "rows_per_class", "class_imbalance"}
    assert failed["label_in_set"]["offending"] == [
        {"line": 24, "text": "<b>click</b> & claim your prize", "label": "spma"}
    ]


def test_an_unreadable_batch_gets_the_same_page(tmp_path, tiny_model_dir, tokenizer):
    landing = tmp_path / "landing"
    incoming, _, quarantine = folders(landing)
    (incoming / "notes.csv").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (outcome,) = run_gate(gate_config(landing, tiny_model_dir), landing, tokenizer).outcomes
    page = (quarantine / "notes.csv.report" / "index.html").read_text()
    assert outcome.status == "quarantined" and "<script" not in page.lower() and "://" not in page
    check = outcome.report.failed[0]
    assert check.name in page and "could not be read" in page and str(quarantine / "notes.csv") in page


def test_a_suffixed_quarantine_name_never_overwrites_an_older_report(tmp_path, tiny_model_dir, tokenizer):
    # batch.csv was quarantined twice (batch.csv, batch.2.csv); someone took batch.2.csv out to fix it and
    # left its reports. A third bad batch.csv must get a name of its own, not batch.2.csv's reports.
    landing = tmp_path / "sms"
    incoming, _, quarantine = folders(landing)
    cfg = gate_config(landing, tiny_model_dir)
    for _ in range(2):
        (incoming / "batch.csv").write_bytes(b"")  # unreadable: quarantined without running a check
        run_gate(cfg, landing, tokenizer)
    assert (quarantine / "batch.2.csv").exists()
    (quarantine / "batch.2.csv").rename(tmp_path / "being-fixed.csv")
    kept = [quarantine / "batch.2.csv.report.json", quarantine / "batch.2.csv.report" / "index.html"]
    older = {p: p.read_bytes() + b"<!-- the older report -->" for p in kept}
    for p, content in older.items():
        p.write_bytes(content)
    (incoming / "batch.csv").write_bytes(b"")
    (outcome,) = run_gate(cfg, landing, tokenizer).outcomes
    assert outcome.path == quarantine / "batch.3.csv" and (quarantine / "batch.3.csv.report.json").exists()
    assert {p: p.read_bytes() for p in older} == older  # the older reports are untouched


@pytest.mark.parametrize("content", [b'{"batches": {"base.csv": "9f2c', b"[1, 2]", b'{"batches": 5}', b"\xff\xfe"])
def test_a_corrupt_manifest_stops_the_gate_and_overwrites_nothing(content, tmp_path, tiny_model_dir, tokenizer):
    from tuneflow.data import DataError

    landing = tmp_path / "sms"
    incoming, accepted, _ = folders(landing)
    cfg = gate_config(landing, tiny_model_dir)
    shutil.copy(CORPUS / "base.csv", incoming)
    run_gate(cfg, landing, tokenizer)
    manifest = accepted / ".manifest.json"
    manifest.write_bytes(content)
    with (accepted / "base.csv").open("a") as fh:
        fh.write("free prize now,ham\n")  # edited after it was judged: must not be adopted as it is now
    shutil.copy(CORPUS / "crlf.csv", incoming)  # a new batch whose acceptance would rewrite the manifest
    for read in (lambda: run_gate(cfg, landing, tokenizer), lambda: load_accepted(cfg, landing)):
        with pytest.raises(DataError) as err:
            read()
        assert err.value.check == "accepted_integrity"
        message = str(err.value)
        assert str(manifest) in message and "Fix: restore .manifest.json from a backup" in message
        assert f"mv {manifest} {manifest}.corrupt" in message
    assert manifest.read_bytes() == content  # left exactly as found
    assert (incoming / "crlf.csv").exists() and sorted(p.name for p in accepted.iterdir()) == [
        ".manifest.json",
        "base.csv",
    ]


def test_a_file_still_being_written_is_left_for_the_next_run(tmp_path, tiny_model_dir, tokenizer, caplog):
    landing = tmp_path / "sms"
    incoming, accepted, _ = folders(landing)
    cfg = gate_config(landing, tiny_model_dir)  # watch.quiet_seconds 0.2 (conftest)
    lines = (CORPUS / "base.csv").read_bytes().splitlines(keepends=True)
    batch = incoming / "base.csv"
    batch.write_bytes(b"".join(lines[:101]))  # the header and the first 100 rows: a batch that would pass
    done = threading.Event()

    def writer():  # still appending, a row every 50 ms while the gate runs, then the rest at once
        with batch.open("ab") as fh:
            for line in lines[101:]:
                fh.write(line)
                fh.flush()
                done.wait(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with caplog.at_level("WARNING", logger="tuneflow.landing"):
            check = check_data(cfg, "cfg.yaml", tmp_path / "docs", tokenizer)  # a run's validate stage
    finally:
        done.set()
        thread.join()
    assert check.gate.outcomes == [] and check.gate.waiting == ["base.csv"] and batch.exists()
    assert "base.csv is still being written" in caplog.text and "left for the next run" in caplog.text
    assert check.data is None and "base.csv" in str(check.error) and "still being written" in str(check.error)
    # once the writer is done the next run judges the whole file (it waits out the window once)
    assert [o.status for o in run_gate(cfg, landing, tokenizer).outcomes] == ["accepted"]
    assert (accepted / "base.csv").read_bytes() == (CORPUS / "base.csv").read_bytes()


def test_a_file_older_than_the_settle_window_is_judged_without_waiting(tmp_path, tiny_model_dir, tokenizer):
    import time

    landing = tmp_path / "sms"
    incoming, _, _ = folders(landing)
    cfg = gate_config(landing, tiny_model_dir)
    cfg.watch.quiet_seconds = 600
    shutil.copy(CORPUS / "base.csv", incoming)
    hour_ago = time.time() - 3600
    os.utime(incoming / "base.csv", (hour_ago, hour_ago))  # e.g. renamed in after a copy under a dot-name
    started = time.monotonic()
    assert [o.status for o in run_gate(cfg, landing, tokenizer).outcomes] == ["accepted"]
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("name", "test", "what"),
    [
        ("drift_text_length.csv", "Kolmogorov-Smirnov", "text length: median "),
        ("drift_labels.csv", "chi-square", "labels in the batch vs accepted data: "),
    ],
)
def test_a_drift_check_reads_as_its_p_value_against_the_threshold(name, test, what, corpus_run):
    landing, outcomes = corpus_run
    check = next(c for c in outcomes[name].report.failed if c.name.startswith("drift_"))
    page = (landing / "quarantine" / f"{name}.report" / "index.html").read_text()
    observed = str(check.observed)
    # a test of the whole batch against the accepted data, not "1 of 1 rows (100.0%)" of a one-row table
    assert "rows" not in observed and observed.startswith(f"{test} p = ") and " &lt; 0.001" in html_escape(observed)
    assert what in observed
    assert f"<tr><th>observed</th><td>{html_escape(observed)}</td></tr>" in page and "1 of 1 rows" not in page
    assert f"observed: {observed}" in validation_summary(outcomes[name].report)


def html_escape(text: str) -> str:
    import html

    return html.escape(text)
