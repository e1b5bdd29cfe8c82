"""Tokenization: truncation without padding, and the on-disk cache keyed by data, tokenizer and length."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tuneflow.data import content_digest, split_by_text_hash
from tuneflow.tokenization import tokenize_split

from conftest import make_rows


@pytest.fixture
def split():
    frame = make_rows(60).assign(line=range(2, 122))
    frame.loc[0, "text"] = " ".join(["winner"] * 100)  # longer than max_length
    return split_by_text_hash(frame, 0.25, "s"), content_digest(frame)


def _tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_truncates_without_padding_and_maps_labels(split, tiny_model_dir, tmp_path):
    sp, digest = split
    out = tokenize_split(sp, _tok(tiny_model_dir), 16, ["ham", "spam"], digest, "x", tmp_path)
    train = out.datasets["train"]
    lengths = {len(ids) for ids in train["input_ids"]} | {len(ids) for ids in out.datasets["eval"]["input_ids"]}
    assert max(lengths) == 16  # the 100-word text is truncated
    assert len(lengths) > 3  # variable lengths: no padding here, the collator pads per batch
    assert train["labels"] == [{"ham": 0, "spam": 1}[x] for x in sp.train["label"]]
    assert len(train) + len(out.datasets["eval"]) == 120


def test_cache_hit_when_nothing_changed_and_miss_when_anything_did(split, tiny_model_dir, tmp_path):
    sp, digest = split
    tok = _tok(tiny_model_dir)
    first = tokenize_split(sp, tok, 16, ["ham", "spam"], digest, "x", tmp_path)
    again = tokenize_split(sp, _tok(tiny_model_dir), 16, ["ham", "spam"], digest, "x", tmp_path)
    assert tokenize_split(sp, tok, 16, ["ham", "spam"], digest, "x", tmp_path).cache_hit  # same, already-used tokenizer
    assert (first.cache_hit, again.cache_hit) == (False, True)
    assert again.cache_key == first.cache_key
    assert again.datasets["train"]["input_ids"] == first.datasets["train"]["input_ids"]

    changed_tok = _tok(tiny_model_dir)
    changed_tok.add_tokens(["brandnewtoken"])
    variants = {
        "max_length": tokenize_split(sp, tok, 24, ["ham", "spam"], digest, "x", tmp_path),
        "data": tokenize_split(sp, tok, 16, ["ham", "spam"], "other-digest", "x", tmp_path),
        "split": tokenize_split(sp, tok, 16, ["ham", "spam"], digest, "y", tmp_path),
        "labels": tokenize_split(sp, tok, 16, ["spam", "ham"], digest, "x", tmp_path),
        "tokenizer": tokenize_split(sp, changed_tok, 16, ["ham", "spam"], digest, "x", tmp_path),
    }
    for name, result in variants.items():
        assert not result.cache_hit, name
    assert len({r.cache_key for r in variants.values()} | {first.cache_key}) == 6
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_two_writers_of_the_same_entry_both_finish_and_leave_one_entry(split, tiny_model_dir, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    sp, digest = split
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda _: tokenize_split(sp, _tok(tiny_model_dir), 16, ["ham", "spam"], digest, "x", tmp_path),
                range(4),
            )
        )
    assert len({r.cache_key for r in results}) == 1
    assert all(len(r.datasets["train"]) == len(sp.train) for r in results)
    assert [p.name for p in tmp_path.iterdir()] == [results[0].cache_key]  # no temporary folder left


def test_the_key_follows_the_rows_kept_not_the_input_file(workdir, tiny_model_dir):
    """Raising validation.max_text_chars keeps rows that were dropped before: same file, other rows, no cache hit."""
    from tuneflow.config import PipelineConfig
    from tuneflow.data import read_table, split_data
    from tuneflow.tokenization import tokenize_data
    from tuneflow.validation import drop_out_of_bounds

    from conftest import tiny_config_dict

    frame = make_rows(40)
    frame.loc[0, "text"] = "spam " * 30  # 150 characters
    path = workdir / "d.csv"
    frame.to_csv(path, index=False)
    keys = []
    for limit in (100, 1000):
        cfg = PipelineConfig.model_validate(
            tiny_config_dict(path, tiny_model_dir, validation={"max_text_chars": limit, "text_length_mostly": 0.9})
        )
        loaded = read_table(cfg.data)
        kept, dropped = drop_out_of_bounds(loaded, cfg)
        tok = tokenize_data(cfg, kept, split_data(kept, cfg.data), workdir / ".cache")
        keys.append((kept.digest, dropped, tok.cache_key, tok.cache_hit))
    (digest_a, dropped_a, key_a, _), (digest_b, dropped_b, key_b, hit_b) = keys
    assert digest_a == digest_b and (dropped_a, dropped_b) == (1, 0)  # same input file, other rows
    assert key_a != key_b and hit_b is False


def test_old_entries_are_evicted_keeping_the_most_recently_used(split, tiny_model_dir, tmp_path):
    import os
    import time

    sp, digest = split
    tok = _tok(tiny_model_dir)
    keys, base = [], time.time() - 1000
    for i, length in enumerate((10, 11, 12, 13, 14)):
        keys.append(tokenize_split(sp, tok, length, ["ham", "spam"], digest, "x", tmp_path, keep=3).cache_key)
        os.utime(tmp_path / keys[-1], (base + i, base + i))  # distinct mtimes in the past, oldest first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keys[2:])
    # a cache hit counts as a use: the entry it hits is kept over newer-but-unused ones
    assert tokenize_split(sp, tok, 12, ["ham", "spam"], digest, "x", tmp_path, keep=3).cache_hit
    tokenize_split(sp, tok, 15, ["ham", "spam"], digest, "x", tmp_path, keep=3)
    names = {p.name for p in tmp_path.iterdir()}
    assert keys[2] in names and keys[3] not in names and len(names) == 3
