"""Data: read the labelled file, digest its content, split train/eval by a hash of the text."""

from __future__ import annotations

import csv
import hashlib
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tuneflow.config import DataConfig
from tuneflow.files import FORMATS, PackageNotFound, package_folder, read_frame, split_package_spec

log = logging.getLogger(__name__)

TEXT = "text"
LABEL = "label"
LINE = "line"  # 1-based line (CSV/JSONL) or row (Parquet) number in the source file, for error messages


class DataError(ValueError):
    """Data that cannot be read or used; the message names the file, the column and the fix.

    ``check`` names the rule that failed, as in a validation report (a landing-zone gate files a batch
    that cannot be read under that name).
    """

    def __init__(self, message: str, check: str = "file_readable"):
        super().__init__(message)
        self.check = check


@dataclass(frozen=True)
class LoadedData:
    """Rows ready for validation: columns ``text``, ``label`` (label name as str) and ``line``.

    ``raw`` keeps the text and label columns as the file typed them (object dtype, indexed by line),
    for the schema checks; ``sources`` lists every file the rows came from.
    """

    frame: pd.DataFrame
    source: Path
    digest: str
    raw: pd.DataFrame | None = None
    sources: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame
    eval: pd.DataFrame


def resolve_path(spec: str) -> Path:
    """Resolve ``package:<dist_module>/<relative file>`` (a file shipped in an installed package) or a plain path."""
    package = split_package_spec(spec)
    if package is None:
        return Path(spec)
    module, rel = package
    try:
        return package_folder(module) / rel
    except PackageNotFound:
        raise DataError(
            f"data.path {spec!r}: Python package '{module}' is not installed. "
            f"Fix: run 'make setup' (it installs the sample data) or point data.path at a file"
        ) from None


def _csv_record_lines(path: Path, n_records: int) -> list[int] | None:
    """1-based line where each CSV record starts (quoted texts may span lines; blank lines are skipped)."""
    data = path.read_bytes()
    newlines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if newlines == n_records + 1 and b"\n\n" not in data and b"\n\r\n" not in data:
        return list(range(2, n_records + 2))  # one line per record: no need to parse
    lines: list[int] = []
    csv.field_size_limit(2**31 - 1)  # the default 128 kB limit is smaller than one long text
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            start = 1
            for row in reader:
                if row:
                    lines.append(start)
                start = reader.line_num + 1
    except csv.Error:
        return None  # pandas read it; fall back to record positions
    return lines[1:]  # the first record is the header


def _label_str(value) -> str | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    # A numeric label column with a missing value comes back as float (JSONL, Parquet from Spark/Polars):
    # 1.0 must still match label_values {"1": ...}.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _decode_error_position(path: Path) -> tuple[int, int]:
    """(byte offset, line) of the first byte that is not UTF-8; pandas reports chunk-relative offsets."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start, data.count(b"\n", 0, exc.start) + 1
    return 0, 1


def normalize_text(text: str) -> str:
    """Unicode NFKC, collapsed whitespace, lower case: what counts as 'the same text'.

    ``str.split()`` splits on the same Unicode whitespace as ``re``'s ``\\s`` and drops it at both
    ends; 5x faster than a regex substitution, which matters on million-row batches.
    """
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def read_table(
    cfg: DataConfig, config_file: str = "the config", path: Path | None = None, digest: bool = True
) -> LoadedData:
    """Read the configured file and return ``text`` / ``label`` / ``line`` columns.

    Labels are returned as names (``label_values`` applied); checking them against the configured
    set is the validation stage's job, so that every problem is reported at once.

    Args:
        cfg: the data section.
        config_file: named in error messages.
        path: read this file instead of ``cfg.path`` (a landing-zone batch).
        digest: compute the content digest (a gate skips it per batch: it digests the union).

    Raises:
        DataError: missing, empty, unreadable or non-UTF-8 file, or a missing column.
    """
    if path is None:
        if cfg.path is None:
            raise DataError(f"data.path is not set in {config_file}", check="file_exists")
        path = resolve_path(cfg.path)
    fix_path = f"Fix: set data.path in {config_file} to an existing CSV, JSONL or Parquet file"
    if not path.exists():
        raise DataError(f"data file not found: {path}. {fix_path}", check="file_exists")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file. {fix_path}", check="file_exists")
    fmt = cfg.format if cfg.format != "auto" else FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path} from its extension '{path.suffix}'. "
            f"Fix: rename it to .csv/.jsonl/.parquet or set data.format in {config_file}",
            check="file_format",
        )
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty (0 bytes). Fix: point data.path at a file with rows")
    try:
        raw = read_frame(path, fmt)
    except UnicodeDecodeError as exc:
        offset, line = _decode_error_position(path)
        raise DataError(
            f"data file {path} is not UTF-8 text (line {line}, byte offset {offset}). "
            f"Fix: re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.csv"
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(
            f"data file {path} is empty (no header, no rows). Fix: point data.path at a file with rows"
        ) from exc
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        # pyarrow's ArrowInvalid is a ValueError; a broken JSONL line raises ValueError too.
        raise DataError(
            f"cannot read {path} as {fmt}: {str(exc).splitlines()[0]}. Fix: check the file is valid {fmt}"
        ) from exc
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in raw.columns]
    if missing:
        which = " and ".join(f"'{c}'" for c in missing)
        raise DataError(
            f"column {which} not found in {path}; columns are: {', '.join(map(str, raw.columns)) or '(none)'}. "
            f"Fix: set data.text_column / data.label_column in {config_file}",
            check="required_columns",
        )
    if raw.empty:
        raise DataError(f"data file {path} has a header but no rows. Fix: point data.path at a file with rows")

    lines = _csv_record_lines(path, len(raw)) if fmt == "csv" else None
    if lines is None or len(lines) != len(raw):
        first = 2 if fmt == "csv" else 1  # CSV line 1 is the header
        lines = list(range(first, first + len(raw)))
    labels = raw[cfg.label_column].map(_label_str)
    if cfg.label_values is not None:
        mapping = {str(k): v for k, v in cfg.label_values.items()}
        labels = labels.map(lambda v: mapping.get(v, v) if v is not None else None)
    text = raw[cfg.text_column].map(lambda v: None if pd.isna(v) else str(v))
    frame = pd.DataFrame({TEXT: text.astype(object), LABEL: labels.astype(object), LINE: lines})
    typed = pd.DataFrame(
        {TEXT: raw[cfg.text_column].astype(object).to_numpy(), LABEL: raw[cfg.label_column].astype(object).to_numpy()},
        index=pd.Index(lines, name=LINE),
        dtype=object,  # pandas 3 would infer its str dtype, which GE's type check cannot read per value
    )
    return LoadedData(
        frame=frame, source=path, digest=content_digest(frame) if digest else "", raw=typed, sources=(path,)
    )


def _field(value: object) -> str:
    if value is None or value != value:  # None or NaN: a missing value
        return "-"
    text = str(value)
    return f"{len(text)}:{text}"  # length-prefixed: no separator ambiguity


def content_digest(frame: pd.DataFrame, chunk_rows: int = 65536) -> str:
    """A digest of every (text, label) row: stable under row order and file format, one streaming pass.

    Each row is hashed (BLAKE2b-256) and the hashes are added as four 64-bit lanes (numpy wraps
    modulo 2**64): a multiset hash, so row order does not matter, duplicates count, and memory stays
    bounded by one chunk. Unlike MLflow's own dataset digest it covers all rows, not the first 10,000.
    """
    blake = hashlib.blake2b
    lanes = np.zeros(4, dtype=np.uint64)
    texts, labels = frame[TEXT].tolist(), frame[LABEL].tolist()
    for start in range(0, len(texts), chunk_rows):
        hashes = b"".join(
            [
                blake(f"{_field(t)}|{_field(lab)}".encode(), digest_size=32).digest()
                for t, lab in zip(texts[start : start + chunk_rows], labels[start : start + chunk_rows], strict=True)
            ]
        )
        lanes += np.frombuffer(hashes, dtype="<u8").reshape(-1, 4).sum(axis=0, dtype=np.uint64)
    return hashlib.sha256(f"tuneflow-rows-v2|{len(texts)}|{lanes.tobytes().hex()}".encode()).hexdigest()


def _bucket(norm_text: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}\x00{norm_text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_text_hash(frame: pd.DataFrame, eval_fraction: float, salt: str) -> Split:
    """Split rows by a hash of the normalized text.

    A row keeps its split when new rows arrive, and exact duplicates (after normalization) always
    land on the same side, so the eval split never contains a text seen in training.
    """
    buckets = frame[TEXT].map(lambda t: _bucket(normalize_text(t), salt))
    is_eval = buckets < eval_fraction
    return Split(train=frame[~is_eval].reset_index(drop=True), eval=frame[is_eval].reset_index(drop=True))


def split_digest(cfg: DataConfig) -> str:
    """A digest of the split settings: the tokenization cache key changes when they do."""
    return hashlib.sha256(f"{cfg.eval_fraction}|{cfg.split_salt}".encode()).hexdigest()[:12]


def split_data(loaded: LoadedData, cfg: DataConfig) -> Split:
    """The train/eval split of the validated rows (``split_by_text_hash`` with the configured settings)."""
    return split_by_text_hash(loaded.frame, cfg.eval_fraction, cfg.split_salt)
