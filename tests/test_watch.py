"""The watcher's decisions without a server: settling, partial files, dedup by digest, state on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tuneflow.config import PipelineConfig
from tuneflow.watch import STATE_FILE, WatchState, list_incoming, scan, scan_landing

from conftest import make_rows, tiny_config_dict


def _cfg(landing: str, model_dir: Path, quiet: float = 5.0) -> PipelineConfig:
    raw = tiny_config_dict(Path("unused"), model_dir)
    raw["data"] = {"landing": landing, "labels": ["ham", "spam"]}
    raw["watch"] = {"quiet_seconds": quiet, "poll_seconds": 0.1}
    return PipelineConfig.model_validate(raw)


@pytest.fixture
def landing(tmp_path) -> Path:
    (tmp_path / "incoming").mkdir()
    return tmp_path


def _drop(landing: Path, name: str, seed: int = 0) -> Path:
    path = landing / "incoming" / name
    make_rows(20, seed=seed).to_csv(path, index=False)
    return path


def _scans(cfg, times, sent):
    return [scan_landing(cfg, now=t, emit=sent.append) for t in times]


def test_a_burst_is_announced_once_after_the_quiet_period(landing, tiny_model_dir):
    cfg, sent = _cfg(str(landing), tiny_model_dir), []
    for i in range(5):
        _drop(landing, f"batch-{i}.csv", seed=i)
    out = _scans(cfg, [100.0, 102.0, 104.9], sent)
    assert out == [None, None, None] and sent == []  # quiet period (5 s) not over yet
    out = _scans(cfg, [105.0, 106.0, 200.0], sent)
    assert len(sent) == 1 and out[0] is sent[0] and out[1:] == [None, None]
    files = sent[0].files
    assert [f["name"] for f in files] == [f"batch-{i}.csv" for i in range(5)]
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in files)
    assert sent[0].payload["dataset"] == "tiny" and sent[0].payload["landing"] == str(landing)


def test_a_file_still_growing_resets_the_quiet_period(landing, tiny_model_dir):
    cfg, sent = _cfg(str(landing), tiny_model_dir), []
    path = _drop(landing, "a.csv")
    _scans(cfg, [0.0, 4.0], sent)
    with open(path, "a") as fh:
        fh.write("more text here,ham\n")
    _scans(cfg, [6.0, 10.0], sent)  # changed at 6: not settled at 10
    assert sent == []
    _scans(cfg, [11.0], sent)
    assert [f["name"] for f in sent[0].files] == ["a.csv"]


def test_a_touched_file_counts_as_still_being_written(landing, tiny_model_dir):
    cfg, sent = _cfg(str(landing), tiny_model_dir), []
    path = _drop(landing, "a.csv")
    _scans(cfg, [0.0], sent)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, new mtime
    _scans(cfg, [5.0], sent)
    assert sent == []
    _scans(cfg, [10.0], sent)
    assert len(sent) == 1


def test_dotfiles_and_partial_uploads_are_ignored(landing, tiny_model_dir):
    cfg, sent = _cfg(str(landing), tiny_model_dir), []
    for name in (".hidden.csv", "upload.csv.part", "upload.csv.tmp", "x.CSV.PART"):
        _drop(landing, name)
    (landing / "incoming" / "subdir").mkdir()
    assert list_incoming(str(landing)) == {}
    _scans(cfg, [0.0, 10.0, 20.0], sent)
    assert sent == []
    os.rename(landing / "incoming" / "upload.csv.part", landing / "incoming" / "upload.csv")  # upload finished
    _scans(cfg, [21.0, 30.0], sent)
    assert [f["name"] for f in sent[0].files] == ["upload.csv"]


def test_the_same_content_is_never_announced_twice(landing, tiny_model_dir):
    cfg, sent = _cfg(str(landing), tiny_model_dir), []
    _drop(landing, "a.csv", seed=1)
    _scans(cfg, [0.0, 10.0], sent)
    assert len(sent) == 1
    # The gate moves the batch away; the same bytes come back, under the old name and under a new one.
    data = (landing / "incoming" / "a.csv").read_bytes()
    (landing / "incoming" / "a.csv").unlink()
    _scans(cfg, [11.0], sent)
    (landing / "incoming" / "a.csv").write_bytes(data)
    (landing / "incoming" / "copy-of-a.csv").write_bytes(data)
    _scans(cfg, [12.0, 30.0, 60.0], sent)
    assert len(sent) == 1
    # A new file next to the old bytes: only the new one is announced.
    _drop(landing, "b.csv", seed=2)
    _scans(cfg, [61.0, 70.0], sent)
    assert len(sent) == 2 and [f["name"] for f in sent[1].files] == ["b.csv"]


def test_state_survives_a_restart_and_is_written_atomically(landing, tiny_model_dir):
    cfg, sent = _cfg(str(landing), tiny_model_dir), []
    _drop(landing, "a.csv")
    _scans(cfg, [0.0, 10.0], sent)
    state = json.loads((landing / STATE_FILE).read_text())
    assert len(state["seen"]) == 1 and "a.csv" in state["known"]
    assert not list(landing.glob(f"{STATE_FILE}.*"))  # no temp file left behind
    # A new watcher process (fresh objects, same folder) remembers what was announced.
    _scans(_cfg(str(landing), tiny_model_dir), [20.0, 40.0], sent)
    assert len(sent) == 1


def test_a_failed_emit_announces_the_burst_again_next_time(landing, tiny_model_dir):
    cfg = _cfg(str(landing), tiny_model_dir, quiet=0)
    _drop(landing, "a.csv")

    def broken(_):
        raise RuntimeError("server down")

    scan_landing(cfg, now=0.0, emit=broken)
    with pytest.raises(RuntimeError):
        scan_landing(cfg, now=1.0, emit=broken)
    sent = []
    scan_landing(cfg, now=2.0, emit=sent.append)
    scan_landing(cfg, now=3.0, emit=sent.append)
    assert len(sent) == 1


def test_scan_logic_with_a_fake_listing():
    state, hashed = WatchState(), []

    def digest(name):
        hashed.append(name)
        return {"a": "1" * 64, "b": "1" * 64}[name]  # same bytes under two names

    assert scan(state, {"a": [10, 1]}, 0.0, 1.0, digest) == []
    assert scan(state, {"a": [10, 1], "b": [10, 2]}, 0.5, 1.0, digest) == []  # b joined the burst
    assert scan(state, {"a": [10, 1], "b": [10, 2]}, 1.2, 1.0, digest) == []  # 0.7 s quiet only
    out = scan(state, {"a": [10, 1], "b": [10, 2]}, 1.5, 1.0, digest)
    assert [f["name"] for f in out] == ["a"]  # b has a's digest
    assert scan(state, {"a": [10, 1], "b": [10, 2]}, 9.0, 1.0, digest) == [] and hashed == ["a", "b"]  # not re-hashed


def test_a_url_landing_zone_is_refused_when_the_config_loads(tiny_model_dir):
    # The watcher could list an fsspec URL, but the gate moves files on a filesystem: a URL would become a
    # local folder named 's3:'. Refused up front, with the fix (mount it).
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="mount the bucket"):
        _cfg("memory://tuneflow-test", tiny_model_dir)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"seen": 5}', '{"known": "x"}', "\udcff"])
def test_a_corrupt_state_file_is_set_aside_and_rebuilt_from_the_landing_zone(landing, tiny_model_dir, content):
    cfg, sent = _cfg(str(landing), tiny_model_dir, quiet=0), []
    (landing / "accepted").mkdir()
    judged = _drop(landing, "a.csv", seed=1)
    os.rename(judged, landing / "accepted" / "a.csv")  # judged before the state was lost
    (landing / STATE_FILE).write_text(content, encoding="utf-8", errors="surrogateescape")
    _drop(landing, "same-bytes.csv", seed=1)  # the accepted file's content again: not announced
    _drop(landing, "new.csv", seed=2)
    _scans(cfg, [0.0, 1.0, 2.0], sent)
    assert [[f["name"] for f in a.files] for a in sent] == [["new.csv"]]
    assert len(list(landing.glob(f"{STATE_FILE}.corrupt-*"))) == 1  # kept for a post-mortem
    assert json.loads((landing / STATE_FILE).read_text())["seen"]  # a good state again


def test_the_watcher_loop_survives_any_error_and_announces_after_it(landing, tiny_model_dir):
    from tuneflow.watch import watch_forever

    cfg, sent, calls = _cfg(str(landing), tiny_model_dir, quiet=0), [], {"n": 0}
    _drop(landing, "a.csv")

    def flaky(arrival):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the server refused the event")  # not an OSError
        sent.append(arrival)

    watch_forever([cfg], should_stop=lambda: bool(sent) or calls["n"] > 20, emit=flaky)
    assert calls["n"] == 2 and [f["name"] for f in sent[0].files] == ["a.csv"]
