"""Data: read the labelled file, digest its content, split train/eval by a hash of the text."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tuneflow.chat_formats import LAYOUTS, detect_layout, required_columns, to_rows
from tuneflow.config import DataConfig, PipelineConfig, SftConfig
from tuneflow.files import FORMATS, PackageNotFound, json_record_lines, package_folder, read_frame, split_package_spec
from tuneflow.kinds.catalog import facts_of

log = logging.getLogger(__name__)

TEXT = "text"
LABEL = "label"
LINE = "line"  # 1-based line (CSV/JSONL) or row (Parquet) number in the source file, for error messages
# kind sft: TEXT holds the prompt (the last user turn), LABEL the response (the last assistant turn), and
# CONTEXT the chat messages before the prompt (system and earlier turns) as JSON, or None.
CONTEXT = "context"
# kind sft: what is wrong with a record that cannot be a conversation (None: nothing), for check record_format
PROBLEM = "record_problem"
FILE_FORMATS = ("csv", "jsonl", "json", "parquet")


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


def _check_header(path: Path, config_file: str) -> None:
    """Two columns of one name make the header ambiguous: pandas would rename the second ('text.1') and the
    batch would be read from whichever column kept the name. A ``required_columns`` failure instead."""
    import csv

    with path.open(newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    seen: set[str] = set()
    repeated = sorted({c for c in header if c in seen or seen.add(c)})
    if repeated:
        raise DataError(
            f"the header of {path} names {', '.join(repr(c) for c in repeated)} more than once "
            f"(columns: {', '.join(header)}); which column holds the data is ambiguous. "
            "Fix: give every column its own name",
            check="required_columns",
        )


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


def normalized(texts: pd.Series, missing: str | None = None) -> pd.Series:
    """``normalize_text`` of each text; a value that is not a string (a blank cell, a number) gives ``missing``."""
    return texts.map(lambda t: normalize_text(t) if isinstance(t, str) else missing)


def sft_settings(cfg: PipelineConfig) -> SftConfig | None:
    """The sft section when the config's kind reads prompt/response rows, else None (for ``read_table``)."""
    return cfg.sft if facts_of(cfg.kind).reads_chat else None


def read_table(
    cfg: DataConfig,
    config_file: str = "the config",
    path: Path | None = None,
    digest: bool = True,
    sft: SftConfig | None = None,
) -> LoadedData:
    """Read the configured file and return ``text`` / ``label`` / ``line`` columns.

    Labels are returned as names (``label_values`` applied); checking them against the configured
    set is the validation stage's job, so that every problem is reported at once.

    Args:
        cfg: the data section.
        config_file: named in error messages.
        path: read this file instead of ``cfg.path`` (a landing-zone batch).
        digest: compute the content digest (a gate skips it per batch: it digests the union).
        sft: read prompt/response rows (kind sft) with these column settings instead of text/label.

    Raises:
        DataError: missing, empty, unreadable or non-UTF-8 file, or a missing column.
    """
    if path is None:
        if cfg.path is None:
            raise DataError(f"data.path is not set in {config_file}", check="file_exists")
        path = resolve_path(cfg.path)
    if cfg.format == "chatterbot":
        return _read_chatterbot(path, config_file, digest)
    fmt = _checked_file(path, cfg, config_file)
    raw = _read_raw(path, fmt)
    if fmt == "csv":
        _check_header(path, config_file)
    if sft is not None:
        return _sft_rows(raw, path, fmt, sft, config_file, digest, _layout(cfg.format, raw, path, sft, config_file))
    return _labeled_rows(raw, path, fmt, cfg, config_file, digest)


def _checked_file(path: Path, cfg: DataConfig, config_file: str) -> str:
    """The file's format, once it is known to exist, be a non-empty file and fit ``data.max_file_mb``."""
    fix_path = f"Fix: set data.path in {config_file} to an existing CSV, JSONL or Parquet file"
    if not path.exists():
        raise DataError(f"data file not found: {path}. {fix_path}", check="file_exists")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file. {fix_path}", check="file_exists")
    fmt = cfg.format if cfg.format in FILE_FORMATS else FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path} from its extension '{path.suffix}'. "
            f"Fix: rename it to .csv/.jsonl/.json/.parquet or set data.format in {config_file}",
            check="file_format",
        )
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty (0 bytes). Fix: point data.path at a file with rows")
    size_mb = path.stat().st_size / 1e6
    if size_mb > cfg.max_file_mb:
        raise DataError(
            f"data file {path} is {size_mb:,.0f} MB, above data.max_file_mb ({cfg.max_file_mb:,.0f} MB): it is read "
            "into memory whole, several times over while it is validated. Fix: split it into batches (a landing "
            f"zone trains on all accepted batches), or raise data.max_file_mb in {config_file} if this machine "
            "has the memory",
            check="file_size",
        )
    return fmt


def _read_raw(path: Path, fmt: str) -> pd.DataFrame:
    """The file as pandas reads it; each way it can fail is a ``DataError`` with the fix."""
    try:
        return read_frame(path, fmt)
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
        where = _json_error_line(path, fmt, exc)
        if where is not None:
            line, why, text = where
            raise DataError(
                f"cannot read {path} as {fmt}: line {line} is not valid JSON ({why}): {text!r}. Fix: correct or "
                f"remove line {line}" + (" (each line of a JSONL file is one JSON object)" if fmt == "jsonl" else "")
            ) from exc
        raise DataError(
            f"cannot read {path} as {fmt}: {str(exc).splitlines()[0]}. Fix: check the file is valid {fmt}"
        ) from exc


def _json_error_line(path: Path, fmt: str, exc: Exception) -> tuple[int, str, str] | None:
    """The first line of a JSON / JSONL file that does not parse: (line number, why, the line cut to 80
    characters); None when the format is another or every line parses (pandas failed for another reason).
    A ``.json`` file was parsed whole by ``json.loads``: its error holds the line and the text; pandas' JSONL
    error names a character position only, so the lines are parsed one by one."""
    if fmt == "json" and isinstance(exc, json.JSONDecodeError):
        lines = exc.doc.splitlines()
        return exc.lineno, exc.msg, (lines[exc.lineno - 1] if 0 < exc.lineno <= len(lines) else "")[:80]
    if fmt != "jsonl":
        return None
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            return number, err.msg, line[:80]
    return None


def _labeled_rows(
    raw: pd.DataFrame, path: Path, fmt: str, cfg: DataConfig, config_file: str, digest: bool
) -> LoadedData:
    """``text`` / ``label`` / ``line`` rows of a classification file (labels mapped by ``data.label_values``)."""
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


def _lines(path: Path, fmt: str, n: int) -> list[int]:
    lines = _csv_record_lines(path, n) if fmt == "csv" else json_record_lines(path) if fmt == "json" else None
    if lines is None or len(lines) != n:
        first = 2 if fmt == "csv" else 1  # CSV line 1 is the header
        lines = list(range(first, first + n))
    return lines


def _str_or_none(value: object) -> str | None:
    if value is None or (not isinstance(value, (str, list, dict)) and pd.isna(value)):
        return None
    return value if isinstance(value, str) else str(value)


def _sft_frame(
    prompts: list,
    responses: list,
    contexts: list,
    lines: list[int],
    path: Path,
    digest: bool,
    problems: list[str | None] | None = None,
):
    frame = pd.DataFrame(
        {
            TEXT: pd.Series([_str_or_none(v) for v in prompts], dtype=object),
            LABEL: pd.Series([_str_or_none(v) for v in responses], dtype=object),
            CONTEXT: pd.Series(contexts, dtype=object),
            PROBLEM: pd.Series(problems or [None] * len(lines), dtype=object),
            LINE: lines,
        }
    )
    typed = pd.DataFrame({TEXT: list(prompts), LABEL: list(responses)}, index=pd.Index(lines, name=LINE), dtype=object)
    return LoadedData(
        frame=frame, source=path, digest=content_digest(frame) if digest else "", raw=typed, sources=(path,)
    )


def _layout(fmt: str, raw: pd.DataFrame, path: Path, sft: SftConfig, config_file: str) -> str | None:
    """The record layout of a kind sft file: data.format when it names one; for 'auto' the one its first record
    fits (said in the log); None (a file format was set): the configured columns, as before layouts existed."""
    if fmt in LAYOUTS:
        return fmt
    if fmt != "auto":
        return None
    first = raw.iloc[0].to_dict() if len(raw) else {str(c): "" for c in raw.columns}
    layout = detect_layout(first, sft)
    if layout is None:
        return None  # no layout fits: read as prompt/response columns, whose error names the columns and the fix
    log.info("data.format auto: reading %s as %s records (detected from its first record)", path, layout)
    return layout


def _sft_rows(
    raw: pd.DataFrame, path: Path, fmt: str, sft: SftConfig, config_file: str, digest: bool, layout: str | None
) -> LoadedData:
    import json

    columns = ", ".join(map(str, raw.columns)) or "(none)"
    lines = _lines(path, fmt, len(raw))
    if layout is None and sft.messages_column is not None:
        layout = "messages"
    if layout not in (None, "prompt_response"):
        missing = [c for c in required_columns(layout, sft) if c not in raw.columns]
        if missing:
            which = " and ".join(f"'{c}'" for c in missing)
            raise DataError(
                f"column {which} not found in {path} (read as {layout} records); columns are: {columns}. "
                f"Fix: set data.format in {config_file} to the file's layout, or name its columns "
                "(sft.messages_column, sft.prompt_column, sft.format_columns)",
                check="required_columns",
            )
        if raw.empty:
            raise DataError(f"data file {path} has a header but no rows. Fix: point data.path at a file with rows")
        rows = to_rows(raw.to_dict("records"), layout, sft)
        return _sft_frame(rows.prompts, rows.responses, rows.contexts, lines, path, digest, rows.problems)
    wanted = [sft.prompt_column, sft.response_column] + ([sft.system_column] if sft.system_column else [])
    missing = [c for c in wanted if c not in raw.columns]
    if missing:
        which = " and ".join(f"'{c}'" for c in missing)
        raise DataError(
            f"column {which} not found in {path}; columns are: {columns}. Fix: set sft.prompt_column / "
            f"sft.response_column{' / sft.system_column' if sft.system_column else ''} in {config_file}, "
            f"sft.messages_column for chat messages, or data.format to the records' layout ({', '.join(LAYOUTS)})",
            check="required_columns",
        )
    if raw.empty:
        raise DataError(f"data file {path} has a header but no rows. Fix: point data.path at a file with rows")
    contexts: list[str | None] = [None] * len(raw)
    if sft.system_column:
        contexts = [
            json.dumps([{"role": "system", "content": s}], ensure_ascii=False)
            if isinstance(s, str) and s.strip()
            else None
            for s in raw[sft.system_column]
        ]
    return _sft_frame(list(raw[sft.prompt_column]), list(raw[sft.response_column]), contexts, lines, path, digest)


def _read_chatterbot(path: Path, config_file: str, digest: bool) -> LoadedData:
    """A chatterbot-corpus YAML file (or a folder of them): each conversation [a, b, c] gives rows a->b, b->c."""
    import yaml

    if not path.exists():
        raise DataError(f"data path not found: {path}. Fix: set data.path in {config_file}", check="file_exists")
    files = sorted(path.glob("*.yml")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no .yml files in {path}. Fix: point data.path at chatterbot-corpus YAML", check="file_exists")
    prompts: list[str] = []
    responses: list[str] = []
    for f in files:
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {f} as chatterbot YAML: {exc}. Fix: check the file") from exc
        conversations = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(conversations, list):
            raise DataError(
                f"{f} has no 'conversations' list. Fix: use chatterbot-corpus YAML (categories, conversations)",
                check="file_format",
            )
        for conv in conversations:
            if isinstance(conv, list):
                for a, b in zip(conv, conv[1:], strict=False):
                    prompts.append(a)
                    responses.append(b)
    if not prompts:
        raise DataError(f"{path} holds no conversations. Fix: point data.path at chatterbot-corpus YAML")
    n = len(prompts)
    return _sft_frame(prompts, responses, [None] * n, list(range(1, n + 1)), path, digest)


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
    # kind sft: a row's chat context is part of it (rows without one hash as before)
    contexts = frame[CONTEXT].tolist() if CONTEXT in frame.columns else [None] * len(texts)
    for start in range(0, len(texts), chunk_rows):
        end = start + chunk_rows
        hashes = b"".join(
            [
                blake(
                    (f"{_field(t)}|{_field(lab)}" + (f"|{_field(c)}" if isinstance(c, str) else "")).encode(),
                    digest_size=32,
                ).digest()
                for t, lab, c in zip(texts[start:end], labels[start:end], contexts[start:end], strict=True)
            ]
        )
        lanes += np.frombuffer(hashes, dtype="<u8").reshape(-1, 4).sum(axis=0, dtype=np.uint64)
    return hashlib.sha256(f"tuneflow-rows-v2|{len(texts)}|{lanes.tobytes().hex()}".encode()).hexdigest()


def row_key(frame: pd.DataFrame, texts: pd.Series) -> pd.Series:
    """What makes two rows the same row: the normalized text (``texts``; classification), or for prompt/response
    rows (a ``context`` column) the normalized prompt, response and context together."""
    if CONTEXT not in frame.columns:
        return texts
    response = normalized(frame[LABEL], missing="")
    return texts.fillna("") + "\x1f" + response + "\x1f" + frame[CONTEXT].fillna("")


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


def check_split(split: Split, cfg: DataConfig, kind: str, source: str) -> None:
    """Both splits must be usable before anything trains: the eval split not empty, and for classification
    every configured label in both (an eval split without a class caps macro-F1 silently; a train split
    without one trains a class the model never saw).

    Raises:
        DataError: which split lacks what, and about how many rows would fix it.
    """
    import math

    need = math.ceil(3 / cfg.eval_fraction)  # rows of a label for about 3 of them in eval (hash split)
    if split.eval.empty or split.train.empty:
        which = "eval" if split.eval.empty else "train"
        raise DataError(
            f"the {which} split of {source} is empty ({len(split.train)} train / {len(split.eval)} eval rows, "
            f"data.eval_fraction {cfg.eval_fraction}). Fix: add rows (at least about {need}) or change "
            "data.eval_fraction",
            check="split",
        )
    if not facts_of(kind).labels_in_both_splits:
        return
    for name, part in (("eval", split.eval), ("train", split.train)):
        present = set(part[LABEL].astype(str))
        missing = [label for label in cfg.labels if label not in present]
        if missing:
            raise DataError(
                f"the {name} split of {source} has no row labeled {', '.join(repr(m) for m in missing)} "
                f"({len(part)} rows; the split is by text hash, data.eval_fraction {cfg.eval_fraction}). Every "
                f"label must be in both splits. Fix: add rows of {', '.join(repr(m) for m in missing)} (about "
                f"{need} or more each) or change data.eval_fraction",
                check="split",
            )
