"""The whole retrain flow, end to end: tiny model, real temporary MLflow store, Prefect's test harness."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from tuneflow.config import PipelineConfig

from conftest import make_rows, tiny_config_dict

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _run(cfg_dict: dict) -> dict:
    from tuneflow.flows.retrain import retrain_once

    return retrain_once(PipelineConfig.model_validate(cfg_dict), config_file="test.yaml")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_retrain_registers_champion_and_keeps_it_against_a_worse_model(workdir, data_csv, tiny_model_dir):
    client = MlflowClient()
    first = _run(tiny_config_dict(data_csv, tiny_model_dir))

    # A registered version with alias champion, lineage tags and the gate decision.
    assert first["promoted"] is True
    champ = client.get_model_version_by_alias("tiny-clf", "champion")
    assert str(champ.version) == first["version"] == "1"
    for tag in (
        "data_digest",
        "config_digest",
        "git_commit",
        "prefect_flow_run_id",
        "decision",
        "decision_reason",
        "challenger_score",
    ):
        assert champ.tags.get(f"tuneflow.{tag}"), tag
    assert first["metrics"]["macro_f1"] > 0.9, first["metrics"]

    # Logged metrics, per-stage nested runs and the confusion-matrix plot on the parent run.
    run = client.get_run(first["run_id"])
    assert run.data.metrics["eval/macro_f1"] == pytest.approx(first["metrics"]["macro_f1"])
    for stage in ("validate", "tokenize", "train", "evaluate", "champion", "register"):
        assert f"time/{stage}_seconds" in run.data.metrics
    children = mlflow.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{first['run_id']}'", output_format="list"
    )
    assert sorted(r.data.tags["tuneflow.stage"] for r in children) == [
        "champion",
        "evaluate",
        "register",
        "tokenize",
        "train",
        "validate",
    ]
    train_run = next(r for r in children if r.data.tags["tuneflow.stage"] == "train")
    assert len(client.get_metric_history(train_run.info.run_id, "train/loss")) >= 2  # logged as training went
    assert "plots/confusion_matrix.png" in [a.path for a in client.list_artifacts(first["run_id"], "plots")]

    # The Prefect markdown artifact of the flow run: metrics table, decision and the MLflow run link.
    from prefect.artifacts import Artifact

    artifact = Artifact.get("tiny-retrain")
    assert artifact is not None and str(artifact.flow_run_id) == champ.tags["tuneflow.prefect_flow_run_id"]
    assert (
        "| macro_f1 |" in artifact.data
        and first["run_id"] in artifact.data
        and "promoted to `champion`" in artifact.data
    )

    # The champion loads offline through pyfunc and predicts label names.
    preds = mlflow.pyfunc.load_model("models:/tiny-clf@champion").predict(
        pd.DataFrame({"text": ["winner prize claim cash", "lunch dinner home later"]})
    )
    assert set(preds["label"]) <= {"ham", "spam"}

    # Second run: nothing changed in the data, so tokenization is a cache hit; a worse model (learning
    # rate 0: an untrained head) is registered as challenger but does not become champion.
    worse = _run(tiny_config_dict(data_csv, tiny_model_dir, train={"learning_rate": 0.0, "epochs": 1}))
    assert worse["tokenize_cache_hit"] is True
    assert worse["promoted"] is False
    assert str(client.get_model_version_by_alias("tiny-clf", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("tiny-clf", "challenger").version) == worse["version"] == "2"
    v2 = client.get_model_version("tiny-clf", "2")
    assert v2.tags["tuneflow.decision"] == "rejected"
    assert float(v2.tags["tuneflow.champion_score"]) == pytest.approx(first["metrics"]["macro_f1"], abs=1e-4)

    # Model card (description + model_card.md artifact of the run that logged the model) and the gate's
    # history entries: one champion move so far, by the first flow run.
    card = v2.description
    assert mlflow.artifacts.load_text(v2.tags["tuneflow.model_card"]) == card
    for needle in (
        "champion v1",
        "Not promoted",
        "## Validation",
        ": passed, ",
        "Trained 1 epochs",
        "| ham |",
        "Known limits",
    ):
        assert needle in card, needle
    assert v2.tags["tuneflow.validation"] == "passed"
    from tuneflow.history import read_history

    assert [(m.from_version, m.to_version, m.by, m.actor) for m in read_history("tiny-clf")] == [
        (None, "1", "gate", champ.tags["tuneflow.prefect_flow_run_id"])
    ]


def test_better_model_is_promoted(workdir, data_csv, tiny_model_dir):
    weak = _run(tiny_config_dict(data_csv, tiny_model_dir, train={"learning_rate": 0.0, "epochs": 1}))
    assert weak["promoted"] is True  # first model: no champion yet
    strong = _run(tiny_config_dict(data_csv, tiny_model_dir))
    assert strong["promoted"] is True, strong["reason"]
    assert str(MlflowClient().get_model_version_by_alias("tiny-clf", "champion").version) == strong["version"]


BAD_INPUTS = {
    "missing_file": (None, "data file not found"),
    "empty_file": (b"", "is empty"),
    "missing_label_column": (b"text,category\nhello there,ham\n", "column 'label' not found"),
    "label_outside_set": ("csv_with_bad_label", "label_in_set"),
    "all_null_text": ("csv_null_text", "text_not_null"),
    "non_utf8": (b"text,label\ncaf\xe9 au lait,ham\n", "not UTF-8"),
}


def _write_bad(kind: str, content, path: Path) -> None:
    if content is None:
        return
    if content == "csv_with_bad_label":
        df = make_rows(40)
        df.loc[3, "label"] = "eggs"
        df.to_csv(path, index=False)
    elif content == "csv_null_text":
        df = make_rows(40)
        df["text"] = ""
        df.to_csv(path, index=False)
    else:
        path.write_bytes(content)


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_stops_before_training_and_registers_nothing(kind, workdir, tiny_model_dir):
    from tuneflow.data import DataError

    content, expected = BAD_INPUTS[kind]
    path = workdir / f"{kind}.csv"
    _write_bad(kind, content, path)
    before = _sha(path) if path.exists() else None
    with pytest.raises(DataError) as err:
        _run(tiny_config_dict(path, tiny_model_dir))
    msg = str(err.value)
    assert expected in msg and path.name in msg
    assert re.search(r"(^|\s)[Ff]ix: \S", msg), msg  # every message says what to do: "Fix: ..." or "fix: ..."
    assert MlflowClient().search_registered_models() == []
    assert (_sha(path) if path.exists() else None) == before
    assert not (workdir / ".cache" / "tuneflow" / "tokenized").exists()  # stopped before tokenization


def test_landing_zone_flow_trains_on_accepted_batches_and_stops_on_a_bad_one(workdir, tiny_model_dir):
    from tuneflow.landing import BatchRejected

    landing = workdir / "data" / "tiny"
    (landing / "incoming").mkdir(parents=True)
    make_rows(150, seed=1).to_csv(landing / "incoming" / "batch-001.csv", index=False)
    cfg = tiny_config_dict(Path("unused"), tiny_model_dir)
    cfg["data"] = {"landing": str(landing), "labels": ["ham", "spam"], "eval_fraction": 0.25}
    first = _run(cfg)
    assert (landing / "accepted" / "batch-001.csv").exists() and first["version"] == "1"

    # Lineage: the run's dataset inputs carry the full-content digest the version is tagged with.
    client = MlflowClient()
    version = client.get_model_version("tiny-clf", "1")
    inputs = client.get_run(first["run_id"]).inputs.dataset_inputs
    contexts = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in inputs}
    assert set(contexts) == {"training", "evaluation"}
    for i in contexts.values():
        tags = {t.key: t.value for t in i.tags}
        assert tags["tuneflow.data_digest"] == version.tags["tuneflow.data_digest"]
        assert "batch-001.csv" in tags["tuneflow.sources"]
    assert (
        int({t.key: t.value for t in contexts["training"].tags}["rows"])
        + int({t.key: t.value for t in contexts["evaluation"].tags}["rows"])
        == 300
    )

    bad = make_rows(40, seed=2)
    bad.loc[0, "label"] = "eggs"
    bad.to_csv(landing / "incoming" / "batch-002.csv", index=False)
    with pytest.raises(BatchRejected, match="label_in_set"):
        _run(cfg)
    assert (landing / "quarantine" / "batch-002.csv").exists()
    assert (landing / "quarantine" / "batch-002.csv.report" / "index.html").exists()
    assert [str(v.version) for v in client.search_model_versions("name='tiny-clf'")] == ["1"]  # nothing registered


def test_new_good_batches_are_trained_even_when_a_bad_one_arrives_beside_them(workdir, tiny_model_dir):
    from prefect.client.orchestration import get_client

    from tuneflow.flows.retrain import retrain_once
    from tuneflow.landing import BatchRejected

    landing = workdir / "data" / "tiny"
    (landing / "incoming").mkdir(parents=True)
    make_rows(150, seed=1).to_csv(landing / "incoming" / "batch-001.csv", index=False)
    bad = make_rows(40, seed=2)
    bad.loc[0, "label"] = "eggs"
    bad.to_csv(landing / "incoming" / "batch-002.csv", index=False)
    cfg = tiny_config_dict(Path("unused"), tiny_model_dir)
    cfg["data"] = {"landing": str(landing), "labels": ["ham", "spam"], "eval_fraction": 0.25}

    state = retrain_once(PipelineConfig.model_validate(cfg), config_file="test.yaml", return_state=True)
    result = state.result()
    assert state.name == "Completed with quarantined batches" and "batch-002.csv" in state.message
    assert result["version"] == "1" and result["quarantined"] == ["batch-002.csv"]
    assert (landing / "accepted" / "batch-001.csv").exists() and (landing / "quarantine" / "batch-002.csv").exists()
    version = MlflowClient().get_model_version("tiny-clf", "1")
    assert version.tags["tuneflow.validation"] == "passed"  # it was trained on validated batches only
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    (retrain_md,) = [
        a.data for a in artifacts if a.key == "tiny-retrain" and a.flow_run_id == state.state_details.flow_run_id
    ]
    assert "Quarantined batches" in retrain_md and "label_in_set" in retrain_md

    # policy stop: a bad batch beside a good one stops the run, nothing is trained
    make_rows(60, seed=3).to_csv(landing / "incoming" / "batch-003.csv", index=False)
    bad.to_csv(landing / "incoming" / "batch-004.csv", index=False)
    cfg["data"]["on_quarantine"] = "stop"
    with pytest.raises(BatchRejected, match="nothing was trained"):
        _run(cfg)
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='tiny-clf'")] == ["1"]


def test_an_unchanged_retrain_stops_before_validating_and_the_same_rows_rewritten_stop_after_it(
    workdir, data_csv, tiny_model_dir
):
    import csv

    import pandas as pd

    client = MlflowClient()
    cfg = tiny_config_dict(data_csv, tiny_model_dir, train={"epochs": 1})

    def stages(run_id: str) -> list[str]:
        runs = client.search_runs(
            [client.get_run(run_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
        )
        return sorted(r.data.tags["mlflow.runName"] for r in runs)

    assert _run(cfg)["version"] == "1"
    same = _run(cfg)  # the same file bytes, config and base model: stops before the gate
    assert same["status"] == "unchanged" and same["version"] == "1" and "exactly this input" in same["reason"]
    assert stages(same["run_id"]) == []
    # The same rows in other bytes (every field quoted): validated again, then stopped by the rows' fingerprint
    pd.read_csv(data_csv).to_csv(data_csv, index=False, quoting=csv.QUOTE_ALL)
    again = _run(cfg)
    assert again["status"] == "unchanged" and "exactly this data" in again["reason"]
    assert stages(again["run_id"]) == ["validate"]
    assert "exactly this input" in _run(cfg)["reason"]  # and now these bytes are known to be v1's input
    # One changed row: trained
    frame = pd.read_csv(data_csv)
    frame.loc[0, "text"] = frame.loc[0, "text"] + " extra words here"
    frame.to_csv(data_csv, index=False)
    assert _run(cfg)["version"] == "2"


def test_a_champion_moved_during_the_run_is_not_replaced_and_the_run_says_so(
    workdir, data_csv, tiny_model_dir, monkeypatch
):
    import tuneflow.flows.retrain as flow_module

    client = MlflowClient()
    weak = tiny_config_dict(data_csv, tiny_model_dir, train={"learning_rate": 0.0, "epochs": 1})
    assert _run(weak)["version"] == "1"
    assert _run(weak | {"train": weak["train"] | {"seed": 7}})["version"] == "2"
    decide = flow_module.decide_promotion
    moved_to = []

    def decide_then_someone_promotes_v2(*args, **kwargs):
        decision = decide(*args, **kwargs)  # scored against the champion of now
        other = "1" if decision.champion_version == "2" else "2"
        client.set_registered_model_alias("tiny-clf", "champion", other)  # a manual move meanwhile
        moved_to.append(other)
        return decision

    monkeypatch.setattr(flow_module, "decide_promotion", decide_then_someone_promotes_v2)
    strong = _run(tiny_config_dict(data_csv, tiny_model_dir))
    assert strong["version"] == "3" and strong["promoted"] is False
    assert "the champion changed meanwhile" in strong["reason"]
    assert str(client.get_model_version_by_alias("tiny-clf", "champion").version) == moved_to[0]  # not undone
    tags = client.get_run(strong["run_id"]).data.tags
    assert tags["tuneflow.decision"] == "rejected" and "changed meanwhile" in tags["tuneflow.decision_reason"]


def test_hundreds_of_labels_run_to_the_end_with_a_condensed_confusion_plot(workdir, tiny_model_dir):
    import pandas as pd
    from PIL import Image

    labels = [f"topic{i:03d}" for i in range(300)]
    rows = [{"text": f"message {j} about topic{i:03d} number {i * 40 + j}", "label": label}
            for i, label in enumerate(labels) for j in range(40)]  # fmt: skip
    path = workdir / "many.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    cfg = tiny_config_dict(path, tiny_model_dir, train={"epochs": 1, "batch_size": 64, "logging_steps": 50})
    cfg["data"]["labels"] = labels
    cfg["validation"] |= {"max_class_imbalance": 20.0}
    result = _run(cfg)
    assert result["version"] == "1"
    parent = MlflowClient().get_run(result["run_id"])
    assert sum(k.startswith("eval/f1_topic") for k in parent.data.metrics) == 300  # every per-class metric
    png = Path(mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="plots/confusion_matrix.png"))
    assert Image.open(png).size == (1200, 1200)  # condensed to a bounded figure, not 330 inches square


def test_a_champion_lock_held_too_long_leaves_the_new_version_challenger_and_the_run_says_so(
    workdir, data_csv, tiny_model_dir, monkeypatch
):
    import tuneflow.history as history
    from tuneflow.files import file_lock

    client = MlflowClient()
    weak = tiny_config_dict(data_csv, tiny_model_dir, train={"learning_rate": 0.0, "epochs": 1})
    assert _run(weak)["version"] == "1"
    monkeypatch.setattr(history, "CHAMPION_LOCK_TIMEOUT_S", 0.5)
    with file_lock(history.champion_lock_path("tiny-clf"), what="a stuck move"):  # another move on this machine
        strong = _run(tiny_config_dict(data_csv, tiny_model_dir))
    assert strong["version"] == "2" and strong["promoted"] is False  # registered, not lost after training
    assert "held the champion's lock too long" in strong["reason"]
    assert str(client.get_model_version_by_alias("tiny-clf", "champion").version) == "1"
    mv = client.get_model_version("tiny-clf", "2")
    assert mv.tags["tuneflow.decision"] == "rejected" and "Fix:" in mv.tags["tuneflow.decision_reason"]
    assert "Not promoted (another champion move held the champion's lock too long)" in mv.description
