"""Writes tests/data/bad/: one small batch per data fault, and EXPECTED.json (file -> failed check).

Run from the repository root: python tests/data/make_bad_corpus.py. The output is committed; the
two cases that cannot be committed sensibly (a 10 MB text, a symlink out of the folder) are made by
the test itself. Every batch is otherwise clean, so exactly the named check fails. ``base.csv`` is the
accepted data the batches are judged against; ``bom.csv`` and ``crlf.csv`` are unusual, not wrong, and
must be accepted.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parent / "bad"
HAM = "lunch later home tonight dinner movie call back soon thanks meeting class love sleep".split()
SPAM = "winner prize claim free cash urgent txt offer ringtone awarded guaranteed voucher".split()
SHARED = "you the to and a is now for your this".split()


def rows(tag: str, n_ham: int = 20, n_spam: int = 20, words: tuple[int, int] = (4, 10)) -> pd.DataFrame:
    """Distinct texts; ``tag`` keeps every file's texts apart from every other file's."""
    rng = random.Random(tag)
    out = []
    for label, pool, n in (("ham", HAM, n_ham), ("spam", SPAM, n_spam)):
        for i in range(n):
            k = rng.randint(*words)
            text = " ".join(rng.choice(pool if rng.random() < 0.6 else SHARED) for _ in range(k))
            out.append({"text": f"{text} {tag} {label} {i}", "label": label})
    rng.shuffle(out)
    return pd.DataFrame(out)


def csv(name: str, frame: pd.DataFrame) -> str:
    frame.to_csv(OUT / name, index=False)
    return name


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    expected: dict[str, str] = {}
    base = rows("base", 100, 100)
    csv("base.csv", base)

    def bad(name: str, check: str, frame: pd.DataFrame | None = None, raw: bytes | None = None) -> None:
        if raw is not None:
            (OUT / name).write_bytes(raw)
        elif name.endswith(".jsonl"):
            frame.to_json(OUT / name, orient="records", lines=True, force_ascii=False)
        elif name.endswith(".parquet"):
            frame.to_parquet(OUT / name, index=False)
        else:
            csv(name, frame)
        expected[name] = check

    f = rows("nulltext"); f.loc[3, "text"] = None; bad("null_text.csv", "text_not_null", f)
    f = rows("blank"); f.loc[5, "text"] = "   \t  "; bad("blank_text.csv", "text_not_blank", f)
    f = rows("long"); f.loc[1, "text"] = "x" * 1200; bad("too_long.csv", "text_length", f)
    f = rows("tokens"); f.loc[2, "text"] = " ".join(["winner"] * 100); bad("too_many_tokens.csv", "text_tokens", f)
    f = rows("badlabel"); f.loc[7, "label"] = "eggs"; bad("bad_label.csv", "label_in_set", f)
    f = rows("nulllabel"); f.loc[4, "label"] = None; bad("null_label.csv", "label_not_null", f)
    bad("few_rows_class.csv", "rows_per_class", rows("few", 6, 2))
    bad("class_imbalance.csv", "class_imbalance", rows("imbal", 24, 4))
    f = rows("dups"); f = pd.concat([f, f.iloc[:12]], ignore_index=True); bad("duplicates.csv", "duplicate_rate", f)
    f = rows("conflict"); f = pd.concat([f, pd.DataFrame([{"text": f.loc[0, "text"].upper(), "label": "spam" if f.loc[0, "label"] == "ham" else "ham"}])], ignore_index=True)
    bad("conflicting_labels.csv", "label_conflict", f)
    bad("repeats_accepted.csv", "repeats_accepted", base.sample(40, random_state=1))
    f = rows("ctrl"); f.loc[6, "text"] = "call me\x07 back\x1b[0m now"; bad("control_chars.csv", "text_encoding", f)
    f = rows("moji"); f.loc[8, "text"] = "cafÃ© tonight? itâ€™s on me"; bad("mojibake.csv", "text_encoding", f)
    bad("drift_labels.csv", "drift_labels", rows("driftlab", 45, 9))
    bad("drift_text_length.csv", "drift_text_length", rows("driftlen", 20, 20, words=(25, 40)))
    bad("ragged_row.csv", "file_readable", raw=b"text,label\nhello there friend,ham\nfree cash now,spam,extra\nok bye,ham\n")
    good = rows("jsonl").to_json(orient="records", lines=True).splitlines()
    good.insert(5, '{"text": "broken line", "label": ')
    bad("invalid_line.jsonl", "file_readable", raw=("\n".join(good) + "\n").encode())
    f = rows("floatlabel"); f["label"] = (f["label"] == "spam").astype(float); bad("float_label.parquet", "label_type", f)
    f = rows("numtext"); f["text"] = range(len(f)); bad("numeric_text.jsonl", "text_type", f)
    bad("not_data.csv", "file_readable", raw=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00\xff\xfe binary")
    bad("not_parquet.parquet", "file_readable", raw=b"text,label\nthis is a csv pretending,ham\n")
    bad("latin1.csv", "file_readable", raw="text,label\ncaf\u00e9 au lait tonight,ham\n".encode("latin-1"))
    bad("missing_column.csv", "required_columns", rows("nocol").rename(columns={"label": "category"}))
    bad("empty.csv", "file_readable", raw=b"")
    bad("header_only.csv", "file_readable", raw=b"text,label\n")
    bad("wrong_extension.txt", "file_format", raw=b"text,label\nhello,ham\n")

    # Unusual but fine: must be accepted.
    (OUT / "bom.csv").write_bytes(b"\xef\xbb\xbf" + rows("bom").to_csv(index=False).encode())
    (OUT / "crlf.csv").write_bytes(rows("crlf").to_csv(index=False, lineterminator="\r\n").encode())
    expected["bom.csv"] = "accepted"
    expected["crlf.csv"] = "accepted"
    (OUT / "EXPECTED.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
