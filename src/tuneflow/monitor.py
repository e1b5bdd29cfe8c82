"""Monitoring: the champion scored on every accepted batch, drift against its training data, the decay decision.

When the landing-zone gate accepts labelled batches, ``monitor_accepted`` scores the current champion on those
batches alone (``tuneflow.scoring.score_version``: the code that scores it for the promotion gate) and measures
their drift against the sample of training rows registered with the champion (``tuneflow.drift``). Batches with
fewer than ``monitor.min_rows`` rows wait in a pool until the pool is big enough.

Every monitored pool is one point of a time series in MLflow: one monitoring run per model (run name
``monitor-<model>``, tag ``tuneflow.monitor_of``) in the config's experiment, step = the point's sequence number.
Per point: metrics (``champion/<metric>``, ``drop``, ``drift/<stat>`` and its threshold, ``degraded``), a tag
``tuneflow.monitor.point.<step>`` with the point as JSON (batches, digest, champion version, decision and its
reasons), the drift report page ``reports/step-<step>.html`` and the series plot ``series.png``. The champion's
model card gets an "In production" section with the last points.

``monitor_predictions`` adds unlabelled points (``tuneflow predict``): the predicted-label distribution and the
drift of the inputs, no score.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from tuneflow.config import MonitorConfig, PipelineConfig, higher_is_better
from tuneflow.data import LABEL, TEXT, read_table, sft_settings
from tuneflow.drift import STAT_HELP, DriftResult, measure_drift
from tuneflow.kinds import get_kind
from tuneflow.reference import load_reference
from tuneflow.registry import MAX_DESCRIPTION, current_champion, version_description
from tuneflow.registry_base import CARD_TAG, MONITOR_OF_TAG, PENDING_TAG, POINT_TAG, SCORE_TAG, RegistryError, kind_of
from tuneflow.reporting import monitor_html, production_section
from tuneflow.scoring import score_version

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CARD_SECTION = "## In production"
CARD_POINTS = 5

Status = Literal["ok", "degraded", "not monitored"]


@dataclass
class MonitorPoint:
    """One monitored pool of batches (or one scored file, source ``predict``)."""

    step: int
    at: str  # ISO time, UTC
    source: Literal["gate", "predict"]
    batches: list[str]
    rows: int
    digest: str
    champion_version: str | None
    status: Status
    reasons: list[str] = field(default_factory=list)  # why degraded, or why not monitored
    primary_metric: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # the champion on these rows
    baseline: float | None = None  # the champion's registered eval score
    drop: float | None = None  # baseline - score (lower-is-better metrics: score - baseline)
    drift: dict[str, Any] | None = None  # DriftResult.to_json(), None when not measured
    prediction_counts: dict[str, int] = field(default_factory=dict)  # source predict: predicted labels
    report: str = ""  # artifact path of the drift report page on the monitoring run

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> MonitorPoint:
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def drift_result(self) -> DriftResult | None:
        return DriftResult.from_json(self.drift) if self.drift is not None else None

    @property
    def score(self) -> float | None:
        return self.metrics.get(self.primary_metric)

    @property
    def drifted(self) -> list[str]:
        """The names of the drift statistics past their thresholds."""
        result = self.drift_result
        return [s.name for s in result.drifted] if result is not None else []


@dataclass
class MonitorOutcome:
    """What the monitor stage did with the batches a gate accepted."""

    champion_version: str | None  # None: no champion yet, nothing was monitored
    point: MonitorPoint | None  # None: nothing scored (no champion, or the batches were pooled)
    pooled: list[str]  # batch names waiting for more rows
    pool_rows: int
    run_id: str = ""

    @property
    def degraded(self) -> bool:
        return self.point is not None and self.point.status == "degraded"


# -- the monitoring run and its series ------------------------------------------------------------------------


def find_monitoring_run(model_name: str, experiment_ids: list[str] | None = None) -> Any | None:
    """The monitoring run of ``model_name`` (in ``experiment_ids``; default: every experiment), or None."""
    from mlflow import MlflowClient

    client = MlflowClient()
    ids = experiment_ids or [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=f"tags.`{MONITOR_OF_TAG}` = '{model_name}'", max_results=1)
    return runs[0] if runs else None


def monitoring_run(model_name: str, experiment_id: str) -> Any:
    """The monitoring run of ``model_name`` with its tags (created in ``experiment_id`` when there is none)."""
    from mlflow import MlflowClient

    found = find_monitoring_run(model_name)
    if found is not None:
        return found
    client = MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=f"monitor-{model_name}",
        tags={MONITOR_OF_TAG: model_name, "mlflow.note.content": f"Monitoring of {model_name}: one step per batch"},
    )
    client.set_terminated(run.info.run_id, "FINISHED")  # a record, not a process: nothing ever "runs" here
    return run


def read_series(model_name: str) -> list[MonitorPoint]:
    """Every recorded point of ``model_name``, oldest first ([] when it was never monitored)."""
    run = find_monitoring_run(model_name)
    if run is None:
        return []
    return series_of(run.data.tags)


def series_of(tags: dict[str, str]) -> list[MonitorPoint]:
    points = [MonitorPoint.from_json(v) for k, v in tags.items() if k.startswith(POINT_TAG)]
    return sorted(points, key=lambda p: p.step)


def _pending(tags: dict[str, str]) -> list[str]:
    raw = tags.get(PENDING_TAG, "[]")
    try:
        names = json.loads(raw)
    except ValueError:
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


# -- scoring and the decision -----------------------------------------------------------------------------------


def read_batches(cfg: PipelineConfig, accepted: Path, names: list[str]) -> pd.DataFrame:
    """The rows of accepted batches ``names`` (missing ones skipped: a batch moved away by hand)."""
    frames = []
    for name in names:
        path = accepted / name
        if path.is_file():
            frames.append(read_table(cfg.data, path=path, digest=False, sft=sft_settings(cfg)).frame)
        else:
            log.warning("accepted batch %s is gone; it is left out of monitoring", path)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[TEXT, LABEL])


def rows_digest(frame: pd.DataFrame) -> str:
    """sha256 of the rows' text (and label, when there is one), in order: which rows a point was measured on."""
    import hashlib

    h = hashlib.sha256()
    cols = [c for c in (TEXT, LABEL) if c in frame.columns]
    for row in frame[cols].astype(str).itertuples(index=False):
        h.update("\x1f".join(row).encode() + b"\x1e")
    return h.hexdigest()[:32]


def baseline_score(mv: ModelVersion) -> float | None:
    """The champion's eval score when it was registered (``tuneflow.registry.SCORE_TAG``)."""
    raw = (mv.tags or {}).get(SCORE_TAG, "")
    try:
        return float(raw)
    except ValueError:
        return None


def score_rows(cfg: PipelineConfig, mv: ModelVersion, frame: pd.DataFrame) -> dict[str, float]:
    """The champion's metrics on the rows of ``frame`` its kind scores (kind sft: a seeded sample)."""
    return score_version(cfg, mv, get_kind(kind_of(mv)).monitor_rows(frame, cfg)).metrics


def decide(cfg: PipelineConfig, point: MonitorPoint) -> None:
    """Set ``point.status`` and its reasons: degraded on a drop past ``max_drop`` or (by default) on drift."""
    m = cfg.monitor
    reasons = []
    if point.drop is not None and point.drop > m.max_drop:
        reasons.append(
            f"{point.primary_metric} {point.score:.4f} on the batch vs {point.baseline:.4f} registered: "
            f"worse by {point.drop:.4f} > monitor.max_drop {m.max_drop}"
        )
    result = point.drift_result
    if result is not None and m.drift_triggers_retrain:
        for s in result.drifted:
            reasons.append(f"{s.name} drift: {STAT_HELP[s.name]} {s.value:.4f} > threshold {s.threshold:.4f}")
    point.reasons = reasons
    point.status = "degraded" if reasons else "ok"


def measure_point(
    cfg: PipelineConfig, mv: ModelVersion, frame: pd.DataFrame, names: list[str], step: int
) -> MonitorPoint:
    """Score the champion ``mv`` on ``frame`` and measure drift; never raises for a champion that cannot be
    scored (the point is "not monitored" with the reason)."""
    point = MonitorPoint(
        step=step,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        source="gate",
        batches=list(names),
        rows=len(frame),
        digest=rows_digest(frame),
        champion_version=str(mv.version),
        status="not monitored",
        primary_metric=cfg.evaluate.primary_metric,
    )
    if kind_of(mv) != cfg.kind:
        point.reasons = [f"champion v{mv.version} is of kind {kind_of(mv)}, this config is {cfg.kind}"]
        return point
    try:
        point.metrics = score_rows(cfg, mv, frame)
    except (RegistryError, ValueError, OSError) as exc:  # untrusted, missing labels, unreadable files
        point.reasons = [f"champion v{mv.version} could not be scored: {exc}"]
        return point
    point.baseline = baseline_score(mv)
    if point.baseline is not None and point.score is not None:
        diff = point.baseline - point.score
        point.drop = diff if higher_is_better(point.primary_metric) else -diff
    reference, why_not = load_reference(mv)
    if reference is not None:
        point.drift = drift_of(cfg.monitor, frame, reference, get_kind(cfg.kind).drift_labels(cfg)).to_json()
    else:
        log.info("drift not measured: %s", why_not)
    decide(cfg, point)
    if reference is None:
        point.reasons.append(f"drift not measured: {why_not}")
    return point


def drift_of(
    m: MonitorConfig, frame: pd.DataFrame, reference: pd.DataFrame, labels: list[str] | None = None
) -> DriftResult:
    """Drift of ``frame`` against ``reference``; the label distributions are compared when ``labels`` is given
    (classification; for unlabelled monitoring the label column holds predictions)."""
    return measure_drift(
        frame[TEXT].astype(str).tolist(),
        reference[TEXT].astype(str).tolist(),
        cur_labels=frame[LABEL].astype(str).tolist() if labels and LABEL in frame.columns else None,
        ref_labels=reference[LABEL].astype(str).tolist() if labels and LABEL in reference.columns else None,
        labels=labels,
        chunks=m.drift_chunks,
        sigmas=m.drift_sigmas,
        max_rows=m.max_rows,
        overrides=dict(m.thresholds),
    )


# -- recording --------------------------------------------------------------------------------------------------


def plot_series(points: list[MonitorPoint], path: Path, model_name: str) -> Path:
    """Champion score per step (with its registered score and the max_drop line) and drift / threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), dpi=100, sharex=True)
    scored = [p for p in points if p.score is not None]
    if scored:
        top.plot([p.step for p in scored], [p.score for p in scored], "o-", label="champion on the batch")
        base = [p for p in scored if p.baseline is not None]
        if base:
            top.plot([p.step for p in base], [p.baseline for p in base], "--", color="gray", label="registered")
        bad = [p for p in scored if p.status == "degraded"]
        if bad:
            top.plot([p.step for p in bad], [p.score for p in bad], "x", color="red", ms=12, label="degraded")
        top.set_ylabel(scored[-1].primary_metric)
        top.legend(loc="best", fontsize=8)
    top.set_title(f"{model_name}: the champion on each new batch")
    for stat in ("labels", "length", "text"):
        xs, ys = [], []
        for p in points:
            result = p.drift_result
            for s in result.stats if result else []:
                if s.name == stat and s.threshold > 0:
                    xs.append(p.step)
                    ys.append(s.value / s.threshold)
        if xs:
            bottom.plot(xs, ys, "o-", label=stat)
    bottom.axhline(1.0, color="red", lw=1, ls="--", label="threshold")
    bottom.set_ylabel("drift / threshold")
    bottom.set_xlabel("batch (monitoring step)")
    bottom.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def point_metrics(point: MonitorPoint) -> dict[str, float]:
    """The point's MLflow metrics (logged at ``step``): what the run's charts show."""
    out: dict[str, float] = {"rows": float(point.rows), "degraded": float(point.status == "degraded")}
    for name, value in point.metrics.items():
        if name in (point.primary_metric, "accuracy", "chrf") or name.startswith("recall_"):
            out[f"champion/{name}"] = float(value)
    if point.drop is not None:
        out["drop"] = float(point.drop)
    result = point.drift_result
    for s in result.stats if result else []:
        out[f"drift/{s.name}"] = s.value
        out[f"drift/{s.name}_threshold"] = s.threshold
    total = sum(point.prediction_counts.values())
    for label, n in point.prediction_counts.items():
        out[f"predicted_share/{label}"] = n / total if total else 0.0
    return out


def record_point(point: MonitorPoint, run_id: str, model_name: str, earlier: list[MonitorPoint]) -> list[MonitorPoint]:
    """Log ``point`` on the monitoring run: metrics at its step, its JSON tag, its report page, the plot of
    ``earlier`` points and this one. Returns that series."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    now = int(datetime.now(UTC).timestamp() * 1000)
    point.report = f"reports/step-{point.step:06d}.html"
    metrics = [Metric(k, v, now, point.step) for k, v in point_metrics(point).items()]
    client.log_batch(run_id, metrics=metrics)
    client.set_tag(run_id, f"{POINT_TAG}{point.step:06d}", point.to_json())
    series = [*earlier, point]
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / Path(point.report).name
        page.write_text(monitor_html(point, model_name), encoding="utf-8")
        client.log_artifact(run_id, str(page), "reports")
        client.log_artifact(run_id, str(plot_series(series, Path(tmp) / "series.png", model_name)))
    return series


def next_step(series: list[MonitorPoint]) -> int:
    return series[-1].step + 1 if series else 1


def update_card(model_name: str, version: str, points: list[MonitorPoint]) -> None:
    """Put the champion's last monitored points into its model card (the version's description)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = client.get_model_version(model_name, version)
    description = mv.description or ""
    head, sep, rest = description.partition(f"\n\n{CARD_SECTION}")
    if sep:  # drop the old section, keep what followed it
        after = rest.split("\n## ", 1)
        head += "\n## " + after[1] if len(after) > 1 else ""
    section = production_section([p for p in points if p.champion_version == version][-CARD_POINTS:])
    body = version_description(head, (mv.tags or {}).get(CARD_TAG, ""), MAX_DESCRIPTION - len(section) - 2)
    client.update_model_version(model_name, version, description=f"{body}\n\n{section}")


def monitor_accepted(cfg: PipelineConfig, accepted: Path, names: list[str], experiment_id: str) -> MonitorOutcome:
    """The monitor stage: score the champion on the batches the gate just accepted (pooled with earlier small
    ones), measure drift, record the point. Never raises for a champion that cannot be scored."""
    from mlflow import MlflowClient

    name = cfg.registry.model_name
    champion = current_champion(name)
    if champion is None:  # nothing to monitor: these batches train the first version
        log.info("monitoring: %s has no champion yet; nothing to score on %s", name, ", ".join(names))
        return MonitorOutcome(None, None, [], 0)
    version = str(champion.version)
    run = monitoring_run(name, experiment_id)
    run_id, tags = run.info.run_id, run.data.tags
    pool = [n for n in _pending(tags) if n not in names] + list(names)
    frame = read_batches(cfg, accepted, pool)
    client = MlflowClient()
    if len(frame) < cfg.monitor.min_rows:
        client.set_tag(run_id, PENDING_TAG, json.dumps(pool))
        log.info(
            "monitoring: %d row(s) in %s, fewer than monitor.min_rows %d: pooled with the next batches",
            len(frame),
            ", ".join(pool),
            cfg.monitor.min_rows,
        )
        return MonitorOutcome(version, None, pool, len(frame), run_id)
    earlier = series_of(tags)
    point = measure_point(cfg, champion, frame, pool, next_step(earlier))
    series = record_point(point, run_id, name, earlier)
    client.set_tag(run_id, PENDING_TAG, "[]")
    if point.status != "not monitored":
        update_card(name, version, series)
    log.info("monitoring step %d (%s): %s %s", point.step, ", ".join(pool), point.status, "; ".join(point.reasons))
    return MonitorOutcome(version, point, [], len(frame), run_id)


def monitor_predictions(m: MonitorConfig, mv: ModelVersion, frame: pd.DataFrame, source: str) -> MonitorPoint:
    """An unlabelled point: ``frame`` holds the scored inputs (``text``) and the predicted ``label`` (kind
    classification); its predicted-label distribution and input drift against ``mv``'s training data."""
    from mlflow import MlflowClient

    experiment_id = MlflowClient().get_run(mv.run_id).info.experiment_id
    run = monitoring_run(mv.name, experiment_id)
    earlier = series_of(run.data.tags)
    point = MonitorPoint(
        step=next_step(earlier),
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        source="predict",
        batches=[source],
        rows=len(frame),
        digest=rows_digest(frame),
        champion_version=str(mv.version),
        status="not monitored",
        primary_metric="",
    )
    classification = LABEL in frame.columns  # kind classification's predictions; sft output has no label
    if classification:
        point.prediction_counts = {str(k): int(v) for k, v in frame[LABEL].value_counts().sort_index().items()}
    reference, why_not = load_reference(mv)
    if reference is None:
        point.reasons = [f"drift not measured: {why_not}"]
    elif len(frame) < 2:
        point.reasons = ["fewer than 2 rows: nothing to compare"]
    else:
        labels = sorted(set(reference[LABEL]) | set(frame[LABEL].astype(str))) if classification else None
        point.drift = drift_of(m, frame, reference, labels).to_json()
        drifted = point.drift_result.drifted
        point.status = "degraded" if drifted else "ok"
        point.reasons = [
            f"{'predicted-labels' if s.name == 'labels' else s.name} drift: {s.value:.4f} > threshold {s.threshold:.4f}"
            for s in drifted
        ]
    record_point(point, run.info.run_id, mv.name, earlier)
    return point
