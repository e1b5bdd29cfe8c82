"""The landing zone: every new batch is validated on its own and against what was accepted before.

    <landing>/incoming/     batches arrive here (any name; CSV, JSONL or Parquet)
    <landing>/accepted/     batches that passed, byte for byte as delivered, never modified afterwards
    <landing>/quarantine/   batches that failed, each next to <name>.report.json and <name>.report/ (HTML)
    <landing>/.gate.lock    held while a gate runs: two gates never judge the same batch

Nothing is lost: the report is written before a batch moves, and a move is one ``os.rename`` on the
same filesystem, so after a crash at any point every batch is in exactly one of the three folders.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd

from tuneflow.config import PipelineConfig
from tuneflow.data import TEXT, DataError, LoadedData, content_digest, normalized, read_table, row_key, sft_settings
from tuneflow.files import file_lock, sha256_file, write_json_atomic
from tuneflow.kinds.catalog import facts_of
from tuneflow.reporting import validation_summary
from tuneflow.validation import (
    NORM,
    ValidationFailed,
    drop_out_of_bounds,
    failure_report,
    validate_frame,
    write_report_page,
)
from tuneflow.validation_report import ValidationReport
from tuneflow.watch import is_candidate, list_incoming, settle

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

INCOMING, ACCEPTED, QUARANTINE = "incoming", "accepted", "quarantine"
BATCH = "batch"


@dataclass
class BatchOutcome:
    name: str
    status: Literal["accepted", "quarantined"]
    path: Path  # where the batch is now
    report: ValidationReport


@dataclass
class GateResult:
    outcomes: list[BatchOutcome] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # files in incoming/ still being written: left for next run

    @property
    def accepted(self) -> list[BatchOutcome]:
        return [o for o in self.outcomes if o.status == "accepted"]

    @property
    def quarantined(self) -> list[BatchOutcome]:
        return [o for o in self.outcomes if o.status == "quarantined"]


class BatchRejected(DataError):
    """At least one incoming batch failed validation and was quarantined."""

    def __init__(self, result: GateResult, trained: bool = False):
        outcome = "the accepted data was trained on (data.on_quarantine: train)" if trained else "nothing was trained"
        parts = [f"{len(result.quarantined)} batch(es) quarantined, {len(result.accepted)} accepted; {outcome}."]
        if result.waiting:
            parts.append(f"Still being written, left in incoming/ for the next run: {', '.join(result.waiting)}.")
        for o in result.quarantined:
            parts.append(f"\n{o.path}\n{validation_summary(o.report)}")  # the summary ends with the report's path
        super().__init__(
            "\n".join(parts),
            check=result.quarantined[0].report.failed[0].name if result.quarantined[0].report.failed else "validation",
        )
        self.result = result


def folders(landing: Path) -> tuple[Path, Path, Path]:
    dirs = tuple(landing / name for name in (INCOMING, ACCEPTED, QUARANTINE))
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs  # type: ignore[return-value]


def gate_lock(landing: Path, timeout_s: float = 3600):
    """An exclusive lock on the landing zone: two gates never judge the same batch."""
    return file_lock(landing / ".gate.lock", timeout_s, what="another gate")


def _taken(folder: Path, name: str) -> bool:
    """Whether ``name`` or one of its reports is in ``folder``. A batch taken out of quarantine/ (to be fixed)
    leaves its reports behind, and a dangling link does not ``exists()``: both still hold the name."""
    return any(os.path.lexists(folder / n) for n in (name, f"{name}.report.json", f"{name}.report"))


def _free_name(folder: Path, name: str) -> str:
    """``name``, or ``stem.<n>.ext`` if taken: no batch and no report is ever overwritten."""
    if not _taken(folder, name):
        return name
    stem, dot, ext = name.partition(".")
    n = 2
    while _taken(folder, f"{stem}.{n}{dot}{ext}"):
        n += 1
    return f"{stem}.{n}{dot}{ext}"


def _is_outside(path: Path, landing: Path) -> bool:
    return path.is_symlink() and not path.resolve().is_relative_to(landing.resolve())


MANIFEST = ".manifest.json"  # in accepted/: the sha256 of each batch when it was accepted


def _snapshot(path: Path, dest: Path) -> Path | None:
    """A private copy of ``path``'s bytes (a new regular file, fsynced); None when it cannot be read."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(path, dest)  # follows a link: the bytes it points to now
    except OSError:
        return None
    with dest.open("rb") as fh:
        os.fsync(fh.fileno())
    return dest


def _manifest(accepted: Path) -> tuple[dict[str, str], str | None]:
    """The manifest: batch name -> sha256 when accepted, and the data shape the union was judged as. No
    manifest yet is an empty one (a new landing zone, or batches placed by hand).

    Raises:
        DataError (check ``accepted_integrity``): the manifest exists but cannot be read as one. Read as empty,
            every accepted batch (an edited one too) would be recorded as it is now, and the next accepted
            batch would write a manifest without the others' digests.
    """
    import json

    path = accepted / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise _corrupt_manifest(path, f"{type(exc).__name__}: {exc}") from exc
    batches = data.get("batches") if isinstance(data, dict) else None
    if not isinstance(batches, dict) or not all(isinstance(v, str) for v in batches.values()):
        raise _corrupt_manifest(path, "not an object with a 'batches' map of name to sha256")
    return {str(k): v for k, v in batches.items()}, data.get("data_shape")


def _corrupt_manifest(path: Path, why: str) -> DataError:
    return DataError(
        f"{path} cannot be read ({why}). It holds the sha256 each accepted batch had when it was judged; without "
        "it an edited batch cannot be told from a judged one, so nothing is judged, trained or recorded, and the "
        f"file is left as it is. Fix: restore {path.name} from a backup; or, to trust every file in {path.parent} "
        f"as it is now, move it aside (mv {path} {path}.corrupt): the next run records each batch as it is, with "
        "a warning per batch, and judges their union again before training",
        check="accepted_integrity",
    )


def _write_manifest(accepted: Path, batches: dict[str, str], shape: str | None) -> None:
    write_json_atomic(accepted / MANIFEST, {"batches": batches, "data_shape": shape})


def data_shape(cfg: PipelineConfig) -> str:
    """What the union was validated as: columns, labels and their mapping, format, kind (sft: its columns)."""
    import hashlib
    import json

    d = cfg.data
    shape = {
        "kind": cfg.kind,
        "columns": [d.text_column, d.label_column],
        "labels": list(d.labels),
        "label_values": d.label_values,
        "format": d.format,
    }
    shape |= facts_of(cfg.kind).shape_part(cfg)
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_accepted(accepted: Path, batch: Path, shape: str) -> None:
    """Add ``batch`` and its sha256 to the manifest (called under the gate's lock); the first batch of a
    landing zone also records the data shape it was validated as."""
    batches, recorded = _manifest(accepted)
    first = not batches
    batches[batch.name] = sha256_file(batch)
    _write_manifest(accepted, batches, shape if first else recorded)


def recheck_union(
    cfg: PipelineConfig,
    landing: Path,
    union: LoadedData,
    tokenizer: PreTrainedTokenizerBase | None,
    config_file: str = "the config file",
) -> ValidationReport | None:
    """When the columns, labels or label mapping of the config changed since the accepted batches were judged,
    judge their union again with the config as it is now (before anything trains on it). Returns the report
    when it re-checked (the caller stops the run if it failed), else None."""
    _, accepted, _ = folders(landing)
    shape = data_shape(cfg)
    if _manifest(accepted)[1] == shape:
        return None
    log.warning("the config's columns, labels or label mapping changed since %s was judged: judging it again", accepted)
    report = validate_frame(union.frame, cfg, accepted, tokenizer=tokenizer, config_file=config_file)
    if report.success:
        with gate_lock(landing):
            _write_manifest(accepted, _manifest(accepted)[0], shape)
    return report


def adopt_unrecorded(accepted: Path) -> None:
    """Batches put into accepted/ by hand (or by a tuneflow before the manifest) are recorded as they are now."""
    if not accepted.is_dir():
        return
    manifest, shape = _manifest(accepted)
    new = [p for p in _accepted_files(accepted) if p.name not in manifest and not p.is_symlink()]
    for p in new:
        log.warning("accepted/%s has no recorded sha256 (placed by hand?): recording it as it is now", p.name)
        manifest[p.name] = sha256_file(p)
    if new:
        _write_manifest(accepted, manifest, shape)


def _accepted_files(accepted: Path) -> list[Path]:
    return sorted(p for p in accepted.iterdir() if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))


def verify_accepted(accepted: Path, files: list[Path]) -> None:
    """Every accepted batch is a regular file whose bytes are those recorded when it was accepted.

    Raises:
        DataError (check ``accepted_integrity``): the batch, what changed, and the fix.
    """
    manifest = _manifest(accepted)[0]
    for p in files:
        if p.is_symlink() or not p.is_file():
            raise DataError(
                f"{p} is not a regular file (a link?); accepted/ holds the judged bytes only. "
                "Fix: replace it with a copy of the data and move it to incoming/ to be judged",
                check="accepted_integrity",
            )
        recorded = manifest.get(p.name)
        if recorded is None:
            log.warning("%s has no recorded sha256 yet (placed by hand?); the next gate records it", p)
            continue
        now = sha256_file(p)
        if now != recorded:
            raise DataError(
                f"{p} changed after it was accepted (sha256 {recorded[:12]}... when judged, {now[:12]}... now); "
                "nothing is trained on it. Fix: move it back to incoming/ to be judged again, or restore the "
                "judged file",
                check="accepted_integrity",
            )


def load_accepted(cfg: PipelineConfig, landing: Path) -> LoadedData | None:
    """The union of accepted batches, deduplicated by normalized text (kind sft: prompt, response and context;
    first delivery wins)."""
    _, accepted, _ = folders(landing)
    files = _accepted_files(accepted)
    if not files:
        return None
    verify_accepted(accepted, files)
    frames = []
    for p in files:
        frame = read_table(cfg.data, path=p, digest=False, sft=sft_settings(cfg)).frame
        frames.append(frame.assign(**{BATCH: p.name}))
    union = pd.concat(frames, ignore_index=True)
    union[NORM] = normalized(union[TEXT])
    union = union[~row_key(union, union[NORM]).duplicated(keep="first")].reset_index(drop=True)
    return LoadedData(frame=union, source=accepted, digest=content_digest(union), sources=tuple(files))


def judge_batch(
    path: Path,
    cfg: PipelineConfig,
    reference: pd.DataFrame | None,
    landing: Path,
    tokenizer: PreTrainedTokenizerBase | None,
    docs_dir: Path,
    read_from: Path | None = None,
    config_file: str = "the config file",
) -> tuple[ValidationReport, LoadedData | None]:
    """Validate one incoming file (its bytes read from ``read_from``, a private snapshot, when given); never
    raises for bad data (the report says what is wrong)."""
    if _is_outside(path, landing):
        err = DataError(
            f"{path} is a symbolic link to {path.resolve()}, outside the landing zone. "
            "Fix: copy the file into incoming/ instead of linking it",
            check="file_inside_landing_zone",
        )
        return failure_report(str(path), err), None
    try:
        loaded = read_table(
            cfg.data, config_file=config_file, path=read_from or path, digest=False, sft=sft_settings(cfg)
        )
    except DataError as err:
        if read_from is not None:  # name the batch, not the snapshot
            err = DataError(str(err).replace(str(read_from), str(path)), check=err.check)
        return failure_report(str(path), err), None
    try:
        loaded.frame[NORM] = normalized(loaded.frame[TEXT])
        report = validate_frame(
            loaded.frame,
            cfg,
            path,
            raw=loaded.raw,
            reference=reference,
            tokenizer=tokenizer,
            docs_dir=docs_dir,
            config_file=config_file,
        )
    except Exception as exc:  # MemoryError included: any failure to judge quarantines, never blocks incoming/
        # A batch the gate cannot judge (a Great Expectations error, memory, a bug) would otherwise stay in
        # incoming/ and fail every later run; it goes to quarantine with the error in its report.
        log.exception("could not judge batch %s", path.name)
        err = DataError(
            f"the gate could not judge {path.name}: {type(exc).__name__}: {exc}. "
            "Fix: look at the error (a tuneflow or Great Expectations bug, or too little memory for this batch); "
            "split the batch or fix the cause, then move it back to incoming/",
            check="gate_error",
        )
        return failure_report(str(path), err), None
    return report, loaded


def run_gate(
    cfg: PipelineConfig,
    landing: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    config_file: str = "the config file",
) -> GateResult:
    """Judge every settled file in ``incoming/`` (oldest name first), then move it to accepted/ or quarantine/.

    Later batches are compared with the earlier ones accepted in the same run. ``config_file`` is named in the
    reports' fixes.
    """
    incoming, accepted, quarantine = folders(landing)
    result = GateResult()
    with gate_lock(landing):
        shutil.rmtree(landing / ".work", ignore_errors=True)  # scratch of an earlier gate
        adopt_unrecorded(accepted)
        current = load_accepted(cfg, landing)
        reference = current.frame if current is not None else None
        # Same rules as the watcher: dotfiles and *.tmp / *.part are files still being written, and so is a
        # file whose size or mtime changed within watch.quiet_seconds (a run started by hand or by a schedule
        # would otherwise move it away while a writer still appends, and judge a truncated batch).
        candidates = sorted(p for p in incoming.iterdir() if is_candidate(p.name) and (p.is_file() or p.is_symlink()))
        ready, busy = settle(candidates, cfg.watch.quiet_seconds)
        for path in busy:
            log.warning(
                "%s is still being written (its size or mtime changed within watch.quiet_seconds, %g s): "
                "left for the next run",
                path,
                cfg.watch.quiet_seconds,
            )
            result.waiting.append(path.name)
        for path in ready:
            work = landing / ".work" / path.name
            shutil.rmtree(work, ignore_errors=True)
            # The bytes judged are the bytes kept: a private copy (a new file, links followed) is judged and
            # becomes the accepted batch, so a link, a hard link or a writer that keeps the file open cannot
            # change what was accepted.
            snapshot = None if _is_outside(path, landing) else _snapshot(path, work / "batch" / path.name)
            report, loaded = judge_batch(
                path, cfg, reference, landing, tokenizer, work / "docs", snapshot, config_file=config_file
            )
            if report.success and loaded is not None and snapshot is not None:
                dest = accepted / _free_name(accepted, path.name)
                os.rename(path, dest)  # one atomic move: the batch is never in two places, never gone
                os.rename(snapshot, dest)  # ... then the judged copy replaces it (a link, another name's inode)
                record_accepted(accepted, dest, data_shape(cfg))
                new = loaded.frame.assign(**{BATCH: dest.name})
                reference = new if reference is None else pd.concat([reference, new], ignore_index=True)
                result.outcomes.append(BatchOutcome(path.name, "accepted", dest, report))
                log.info("accepted batch %s -> %s", path.name, dest)
            else:
                name = _free_name(quarantine, path.name)
                # Report first, then the move: a crash in between leaves the batch in incoming/ (judged
                # again next time) and at worst an orphan report, never a batch without its report.
                site = quarantine / f"{name}.report"
                shutil.rmtree(site, ignore_errors=True)
                if report.docs_index:
                    shutil.copytree(work / "docs", site)
                # the page names where the batch now is (a file that could not be read has no Data Docs)
                write_report_page(report, site, batch=str(quarantine / name))
                write_json_atomic(quarantine / f"{name}.report.json", report.to_json())
                os.rename(path, quarantine / name)
                result.outcomes.append(BatchOutcome(path.name, "quarantined", quarantine / name, report))
                log.warning("quarantined batch %s: %s", path.name, ", ".join(c.name for c in report.failed))
            if report.docs_index is None and (work / "docs" / "index.html").exists():
                report.docs_index = str(work / "docs" / "index.html")
    return result


def has_new_batches(cfg: PipelineConfig, trained: set[str] | None = None) -> bool:
    """Whether there is anything not yet trained on: a batch in ``incoming/``, or (given ``trained``, the data
    digests registered versions were trained on) accepted data whose union no version was trained on, e.g.
    after a retrain that failed once its gate had accepted the batches. Always True for a single file."""
    if not cfg.data.landing:
        return True
    if list_incoming(cfg.data.landing):
        return True
    if trained is None:
        return False
    accepted = load_accepted(cfg, Path(cfg.data.landing))
    return accepted is not None and accepted.digest not in trained


@dataclass
class DataCheck:
    """What the validate stage found: the reports, and the data to train on or the error that stops the run."""

    reports: list[ValidationReport]
    data: LoadedData | None  # validated rows (out-of-bounds rows dropped); None when rejected
    error: DataError | None
    gate: GateResult | None = None  # the landing-zone verdicts; None for a single file
    rows_dropped: int = 0
    quarantined: BatchRejected | None = None  # batches quarantined in a run that trained anyway (on_quarantine)

    @property
    def trained_reports(self) -> list[ValidationReport]:
        """The reports of the data trained on: without the batches quarantined in a run that trained anyway."""
        if self.quarantined is None or self.gate is None:
            return self.reports
        return [o.report for o in self.gate.accepted]


def check_data(
    cfg: PipelineConfig, config_file: str, docs_dir: Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> DataCheck:
    """Validate the configured data: every new batch of a landing zone, or the single file of ``data.path``.

    A landing zone trains on the union of its accepted batches; a single file must pass every check of
    severity ``error``. Never raises for bad data: the error is returned with the reports, so the caller
    can record them before it stops the run.

    Args:
        cfg: the pipeline config.
        config_file: named in error messages.
        docs_dir: where Great Expectations Data Docs of a single file are written.
        tokenizer: for the token-length check (None skips it).
    """
    gate = None
    if cfg.data.landing:
        landing = Path(cfg.data.landing).resolve()
        gate = run_gate(cfg, landing, tokenizer, config_file)
        reports = [o.report for o in gate.outcomes]
        error: DataError | None = BatchRejected(gate) if gate.quarantined else None
        if error is not None and gate.accepted and cfg.data.on_quarantine == "train":
            # New good batches are trained on now, not held back by a bad one beside them; the quarantined
            # batches are reported (DataCheck.quarantined) by the flow's artifact, state and the CLI.
            quarantined, error = BatchRejected(gate, trained=True), None
        else:
            quarantined = None
        loaded = None if error else load_accepted(cfg, landing)
        if loaded is not None:
            recheck = recheck_union(cfg, landing, loaded, tokenizer, config_file)
            if recheck is not None:
                reports.append(recheck)
                if not recheck.success:
                    error, loaded, quarantined = ValidationFailed(recheck), None, None
        if error is None and loaded is None and gate.waiting:
            error = DataError(
                f"no data in {landing / ACCEPTED}, and {', '.join(gate.waiting)} in {landing / INCOMING} is still "
                f"being written (its size or mtime changed within watch.quiet_seconds, {cfg.watch.quiet_seconds:g} "
                "s). Fix: run again once the writer is done (write under a dot-name and rename it when complete)",
                check="file_exists",
            )
        elif error is None and loaded is None:
            error = DataError(
                f"no data in {landing / ACCEPTED} and no new batch in {landing / INCOMING}. "
                f"Fix: drop a CSV/JSONL/Parquet batch into {landing / INCOMING}",
                check="file_exists",
            )
    else:
        loaded = read_table(cfg.data, config_file, sft=sft_settings(cfg))
        report = validate_frame(
            loaded.frame,
            cfg,
            loaded.source,
            raw=loaded.raw,
            tokenizer=tokenizer,
            docs_dir=docs_dir,
            config_file=config_file,
        )
        reports = [report]
        error = None if report.success else ValidationFailed(report)
        quarantined = None
    if error is not None:
        return DataCheck(reports, None, error, gate)
    kept, dropped = drop_out_of_bounds(loaded, cfg)
    return DataCheck(reports, kept, None, gate, dropped, quarantined)


def load_validated(cfg: PipelineConfig, config_file: str, digest: str) -> LoadedData:
    """The data another process validated (``check_data``) and that this one trains on as well (a tune-worker),
    read without judging anything again: a landing zone's accepted batches, or the single file; the rows outside
    the tolerated bounds dropped as ``check_data`` drops them.

    Raises:
        DataError: the data read here is not the data validated (``digest``, its ``LoadedData.digest``): a batch
            was accepted or the file changed since, or this machine sees other files.
    """
    if cfg.data.landing:
        landing = Path(cfg.data.landing).resolve()
        loaded = load_accepted(cfg, landing)
        where = str(landing / ACCEPTED)
    else:
        loaded = read_table(cfg.data, config_file, sft=sft_settings(cfg))
        where = str(cfg.data.path)
    if loaded is None or loaded.digest != digest:
        raise DataError(
            f"the data in {where} is not the data the tune run validated (digest "
            f"{loaded.digest[:12] if loaded else 'none'}... here, {digest[:12]}... there): a batch was accepted or the "
            "file changed since, or this machine sees other files. Fix: start the tune run again; give every worker "
            "the same data (a shared mount at the same path)",
            check="file_exists",
        )
    return drop_out_of_bounds(loaded, cfg)[0]


def input_files_digest(cfg: PipelineConfig) -> str | None:
    """A digest of the files a retrain would read, before reading them (names and bytes): the accepted batches
    of a landing zone, or the single data file (a folder: every file in it). None when it cannot stand for
    the data: a landing zone with a batch waiting in ``incoming/`` (it must be judged first), or nothing to read.

    Validation is a function of these bytes, the config and the base model: a version trained on the same
    three was validated on exactly this, so an unchanged retrain can stop before validating again."""
    import hashlib

    if cfg.data.landing:
        landing = Path(cfg.data.landing)
        if list_incoming(cfg.data.landing):
            return None
        _, accepted, _ = folders(landing)
        files = _accepted_files(accepted) if accepted.is_dir() else []
    elif cfg.data.path:
        from tuneflow.data import resolve_path

        try:
            path = resolve_path(cfg.data.path)
        except Exception:  # noqa: BLE001 - validation reports a missing file properly; no shortcut here
            return None
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    else:
        return None
    if not files:
        return None
    # per-file digests, shared with verify_accepted in the same run (each file is read once)
    listing = "\0".join(f"{p.name}\0{sha256_file(p)}" for p in files)
    return hashlib.sha256(f"format={cfg.data.format}\0{listing}".encode()).hexdigest()
