"""Notice new batches in a landing zone's ``incoming/`` and announce each settled burst once.

A scan lists ``<landing>/incoming`` (a local folder or any fsspec URL whose filesystem package is
installed), compares it with the previous scan and decides:

- a file still being written (its size or mtime changed since the last scan), a dotfile, or a
  ``*.tmp`` / ``*.part`` file is not picked up;
- a burst is settled when the set of new files and every size and mtime stayed the same for
  ``watch.quiet_seconds``; then all its files go into ONE event ``tuneflow.data.arrived``;
- a file whose sha256 was announced before is never announced again, whatever its name.

The state between scans (files pending, digests seen) is ``<landing>/.watch-state.json``, written
atomically (temp file + rename), so a restarted watcher neither repeats nor forgets an announcement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneflow.config import PipelineConfig
from tuneflow.files import file_lock

log = logging.getLogger(__name__)

EVENT = "tuneflow.data.arrived"  # the Prefect event a settled burst is announced as
QUARANTINED_EVENT = "tuneflow.batch.quarantined"  # emitted by a retrain whose gate quarantined batches
DEGRADED_EVENT = "tuneflow.champion.degraded"  # emitted by a monitor stage that found the champion degraded
DATASET_RESOURCE = "tuneflow.dataset."  # + the config's name: the resource data events are emitted on
MODEL_RESOURCE = "tuneflow.model."  # + the registered model's name: the resource model events are emitted on
REVIEW_EVENT = "tuneflow.review.requested"  # a challenger waits for a person (registry.approval: required)
STATE_FILE = ".watch-state.json"
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")
MAX_SEEN = 10_000  # digests remembered; older ones are dropped first


def resource_id(dataset: str) -> str:
    """The event resource a deployment trigger matches on: one per dataset (the config's ``name``)."""
    return DATASET_RESOURCE + dataset


def model_resource(model_name: str) -> str:
    """The event resource of a registered model (``tuneflow.champion.degraded`` is emitted on it)."""
    return MODEL_RESOURCE + model_name


@dataclass
class WatchState:
    """What the watcher remembers between scans."""

    pending: dict[str, list[int]] = field(default_factory=dict)  # name -> [size, mtime_ns] at last scan
    changed_at: float = 0.0  # when ``pending`` last changed (time.time())
    known: dict[str, list[Any]] = field(default_factory=dict)  # name -> [size, mtime_ns, sha256] already judged
    seen: list[str] = field(default_factory=list)  # sha256 of every announced file, oldest first

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WatchState:
        """Raises ValueError when a field has the wrong type (a corrupt or foreign file)."""
        for key, kind in (("pending", dict), ("known", dict), ("seen", list)):
            if not isinstance(data.get(key, kind()), kind):
                raise ValueError(f"'{key}' is not a {kind.__name__}")
        return cls(
            pending=data.get("pending", {}),
            changed_at=float(data.get("changed_at", 0.0)),
            known=data.get("known", {}),
            seen=list(data.get("seen", [])),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "changed_at": self.changed_at,
            "known": self.known,
            "seen": self.seen[-MAX_SEEN:],
        }


@dataclass
class Arrival:
    """One settled burst: what the event carries."""

    dataset: str
    landing: str
    files: list[dict[str, Any]]  # {"name", "sha256", "size"}

    @property
    def payload(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "landing": self.landing, "files": self.files}


def _fs(landing: str):
    from fsspec.core import url_to_fs

    return url_to_fs(landing)


def is_candidate(name: str) -> bool:
    """A file that is complete by name: not a dotfile, not *.tmp / *.part (the gate uses this rule too)."""
    return not name.startswith(".") and not name.lower().endswith(IGNORED_SUFFIXES)


def _mtime_ns(info: dict[str, Any]) -> int:
    """Filesystems name the modification time differently (local: mtime, s3: LastModified, gcs: updated)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return int(value.timestamp() * 1e9)
        try:
            return int(float(value) * 1e9)
        except (TypeError, ValueError):
            continue
    return 0  # no time at all: the size alone has to stay stable


def settle(
    paths: list[Path], quiet_seconds: float, sleep: Callable[[float], None] = time.sleep
) -> tuple[list[Path], list[Path]]:
    """Split local files into (settled, still being written) by the watcher's rule: a file is complete once its
    size and mtime stayed the same for ``quiet_seconds`` (the gate uses this rule too).

    A file last modified longer ago than that is settled without waiting (the usual case: the watcher announced
    it, or it was renamed in). For younger ones this waits, once for all of them, until each is that old (at most
    ``quiet_seconds``: an mtime in the future, from a share's clock, is not waited for longer) and looks again:
    the ones whose size or mtime changed meanwhile are still being written.
    """

    def key(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()  # follows a link: its target is what would be read
        except OSError:
            return None  # gone, or a dangling link: nothing to wait for, the gate reports what it finds
        return st.st_size, st.st_mtime_ns

    now = time.time()
    young = {p: k for p in paths if (k := key(p)) is not None and now - k[1] / 1e9 < quiet_seconds}
    if not young:
        return list(paths), []
    wait = min(quiet_seconds, max(k[1] / 1e9 + quiet_seconds - now for k in young.values()))
    log.info("waiting %.1f s for %d new file(s) to settle (watch.quiet_seconds %g)", wait, len(young), quiet_seconds)
    sleep(max(wait, 0.0))
    busy = [p for p, k in young.items() if key(p) != k]
    return [p for p in paths if p not in busy], busy


def list_incoming(landing: str) -> dict[str, list[int]]:
    """``{name: [size, mtime_ns]}`` of the files in ``<landing>/incoming`` the watcher may pick up."""
    fs, root = _fs(landing)
    incoming = f"{root.rstrip('/')}/incoming"
    if not fs.exists(incoming):
        return {}
    out = {}
    for info in fs.ls(incoming, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") != "file" or not is_candidate(name):
            continue
        out[name] = [int(info.get("size") or 0), _mtime_ns(info)]
    return out


def file_digest(landing: str, name: str) -> str:
    fs, root = _fs(landing)
    h = hashlib.sha256()
    with fs.open(f"{root.rstrip('/')}/incoming/{name}", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest_file(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rebuild_state(landing: str) -> WatchState:
    """A state rebuilt from the landing zone: every batch already in accepted/ or quarantine/ counts as seen
    (it was judged), nothing in incoming/ as known (it is announced once it settles)."""
    fs, root = _fs(landing)
    seen = []
    for folder in ("accepted", "quarantine"):
        path = f"{root.rstrip('/')}/{folder}"
        if not fs.exists(path):
            continue
        for info in fs.ls(path, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") == "file" and is_candidate(name) and not name.endswith(".report.json"):
                seen.append(_digest_file(fs, info["name"]))
    return WatchState(seen=seen)


def load_state(landing: str) -> WatchState:
    """The saved state; a missing one is empty, a corrupt one is set aside and rebuilt from the landing zone."""
    fs, root = _fs(landing)
    path = f"{root.rstrip('/')}/{STATE_FILE}"
    if not fs.exists(path):
        return WatchState()
    try:
        with fs.open(path, "r") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        return WatchState.from_json(data)
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        aside = f"{path}.corrupt-{int(time.time())}"
        fs.mv(path, aside)
        log.warning("watch state %s is unreadable (%s); kept as %s and rebuilt from the landing zone", path, exc, aside)
        return rebuild_state(landing)


def save_state(landing: str, state: WatchState) -> None:
    """Write the state atomically: a crash leaves the old file or the new one, never half of one."""
    fs, root = _fs(landing)
    path = f"{root.rstrip('/')}/{STATE_FILE}"
    fs.makedirs(root, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with fs.open(tmp, "w") as fh:
        json.dump(state.to_json(), fh)
    fs.mv(tmp, path)  # a rename on local disks (atomic); object stores replace the object whole


@contextmanager
def watch_lock(landing: str) -> Iterator[None]:
    """Two watchers of one local landing zone never scan at once (flock; released if the process dies).

    Object stores have no such lock: run one watcher per remote landing zone.
    """
    fs, root = _fs(landing)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        yield
        return
    with file_lock(Path(root) / ".watch.lock", what="another watcher"):
        yield


def scan(
    state: WatchState, listing: dict[str, list[int]], now: float, quiet_seconds: float, digest: Callable[[str], str]
) -> list[dict[str, Any]]:
    """One step of the watcher: update ``state`` from ``listing`` and return the files to announce.

    Pure except for ``digest`` (called only for files that have settled), so tests drive it with a
    fake clock.

    Returns:
        ``[{"name", "sha256", "size"}, ...]`` when a burst has settled with at least one unseen file; else [].
    """
    # Forget names that left incoming/ (the gate moved them): a new file may reuse the name.
    state.known = {n: v for n, v in state.known.items() if n in listing}
    new = {n: v for n, v in listing.items() if state.known.get(n, [None, None])[:2] != v}
    if new != state.pending:
        state.pending, state.changed_at = new, now
        return []
    if not new or now - state.changed_at < quiet_seconds:
        return []
    seen = set(state.seen)
    files = []
    for name, (size, mtime) in sorted(new.items()):
        sha = digest(name)
        state.known[name] = [size, mtime, sha]
        if sha in seen:
            log.info("%s was announced before (sha256 %s): not announcing it again", name, sha[:12])
            continue
        seen.add(sha)
        state.seen.append(sha)
        files.append({"name": name, "sha256": sha, "size": size})
    state.pending, state.changed_at = {}, now
    return files


def scan_landing(
    cfg: PipelineConfig, now: float | None = None, emit: Callable[[Arrival], None] | None = None
) -> Arrival | None:
    """Scan ``cfg.data.landing`` once; if a burst settled, announce it (``emit``) and remember it.

    The state is saved only after ``emit`` returned: if emitting fails, the burst is announced again
    on the next scan rather than lost.
    """
    if not cfg.data.landing:
        raise ValueError(
            f"config {cfg.name!r} has no data.landing; the watcher needs a landing zone. "
            "Fix: set data.landing to a folder with incoming/ (or drop this config from the watcher)"
        )
    landing = cfg.data.landing
    with watch_lock(landing):
        state = load_state(landing)
        files = scan(
            state,
            list_incoming(landing),
            time.time() if now is None else now,
            cfg.watch.quiet_seconds,
            lambda name: file_digest(landing, name),
        )
        arrival = Arrival(cfg.name, landing, files) if files else None
        if arrival is not None and emit is not None:
            emit(arrival)
        save_state(landing, state)
    return arrival


def watch_forever(
    configs: list[PipelineConfig], should_stop: Callable[[], bool], emit: Callable[[Arrival], None]
) -> None:
    """Scan every config's landing zone every ``watch.poll_seconds`` until ``should_stop()``.

    ``emit`` announces a settled burst (``tuneflow.flows.watch.emit_arrival`` sends it to Prefect).
    """
    next_at = {c.name: 0.0 for c in configs}
    while not should_stop():
        now = time.monotonic()
        for cfg in configs:
            if now >= next_at[cfg.name]:
                try:
                    scan_landing(cfg, emit=emit)
                except OSError as exc:  # a share briefly unreachable: the next poll tries again
                    log.warning(
                        "watching %s failed (%s); retrying in %.0f s", cfg.data.landing, exc, cfg.watch.poll_seconds
                    )
                except Exception:  # an emit refused, a bug: logged with its traceback, and the watcher goes on
                    log.exception(
                        "watching %s failed; the burst is announced again in %.0f s",
                        cfg.data.landing,
                        cfg.watch.poll_seconds,
                    )
                next_at[cfg.name] = now + cfg.watch.poll_seconds
        time.sleep(min(0.5, min(c.watch.poll_seconds for c in configs)))
