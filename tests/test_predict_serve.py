"""Using the champion: the batch scoring flow (Prefect test harness, real MLflow store) and
`tuneflow serve-model` (MLflow's scoring server on a checked folder) on a loopback port, offline, with the
local environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tuneflow.registry import decide

from servers import free_port, stop_group, wait_until_up

NAME = "serve-clf"
LONG = " ".join(["free"] * 5000)  # 5,000 words: MLflow's literal parsing of a list input raised MemoryError on it
LITERAL = "{'text': 'free prize'}"  # reads as a Python dict: MLflow's literal parsing scored it as "free prize"


def pipeline_scores(uri: str, texts: list[str]) -> list[float]:
    """What the logged model's own transformers pipeline gives ``texts`` (cut to max_length 32, as logged)."""
    from transformers import pipeline

    parts = mlflow.transformers.load_model(uri, return_type="components")
    pipe = pipeline("text-classification", model=parts["model"], tokenizer=parts["tokenizer"])
    return [r["score"] for r in pipe(texts, truncation=True, max_length=32)]


@pytest.fixture
def champion(register_tiny) -> str:
    mv = register_tiny(NAME, decide("macro_f1", 0.9, None, None, 0.0), {"tuneflow.validation": "passed"}, "## card")
    return str(mv.version)


def test_predict_flow_scores_a_folder_and_logs_a_summary(champion, workdir, prefect_harness, capsys):
    from tuneflow.cli import main
    from tuneflow.flows.predict import predict

    inbox = workdir / "inbox"
    inbox.mkdir()
    pd.DataFrame({"id": [1, 2, 3], "text": ["free prize now", "lunch later", "winner cash"]}).to_csv(
        inbox / "a.csv", index=False
    )
    pd.DataFrame({"text": ["see you at home", "claim voucher"]}).to_json(
        inbox / "b.jsonl", orient="records", lines=True
    )
    (inbox / "notes.txt").write_text("not data")

    out = predict(f"{NAME}@champion", str(inbox), str(workdir / "scored"))
    assert out["rows"] == 5 and out["version"] == champion and sum(out["label_counts"].values()) == 5
    a = pd.read_csv(workdir / "scored" / "a.scored.csv")
    b = pd.read_csv(workdir / "scored" / "b.scored.csv")
    assert list(a.columns) == ["id", "text", "label", "score", "model_version"] and len(a) == 3 and len(b) == 2
    assert set(a["label"]) | set(b["label"]) <= {"ham", "spam"} and (a["model_version"] == int(champion)).all()
    assert not (workdir / "scored" / "notes.scored.csv").exists()
    # two inputs with one stem keep their own outputs
    pd.DataFrame({"text": ["one"]}).to_json(inbox / "a.jsonl", orient="records", lines=True)
    predict(f"{NAME}@champion", str(inbox), str(workdir / "scored2"))
    assert len(pd.read_csv(workdir / "scored2" / "a.csv.scored.csv")) == 3
    assert len(pd.read_csv(workdir / "scored2" / "a.jsonl.scored.csv")) == 1

    run = mlflow.get_run(out["run_id"])
    assert mlflow.get_experiment(run.info.experiment_id).name == f"{NAME}-predictions"
    assert run.data.metrics["rows"] == 5 and run.data.metrics["latency_ms_per_row"] > 0
    assert sum(v for k, v in run.data.metrics.items() if k.startswith("label_count/")) == 5
    assert run.data.params["model_version"] == champion

    # The CLI runs the same flow; an empty folder fails with the fix.
    (workdir / "empty").mkdir()
    assert (
        main(
            [
                "predict",
                "--model",
                f"{NAME}@champion",
                "--input",
                str(workdir / "empty"),
                "--output",
                str(workdir / "o"),
            ]
        )
        == 2
    )
    assert "holds no" in capsys.readouterr().err


def test_serve_model_answers_with_a_label_and_removes_its_download(champion, workdir):
    """`tuneflow serve-model NAME@champion`: MLflow's scoring server on loopback, offline, local environment."""
    (workdir / "tmp").mkdir()
    proc, base, log = _serve_model(f"{NAME}@champion", workdir, "serve.log")
    try:
        wait_until_up(f"{base}/ping", proc, workdir / "serve.log")

        def invoke(payload: dict) -> list[dict]:
            req = urllib.request.Request(
                f"{base}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["predictions"]

        # the third text is 400 tokens, past the tiny model's 128 positions: cut to max_length as in training, not
        # an HTTP 500 for the whole request
        preds = invoke({"inputs": ["WINNER! claim your prize", "see you at lunch", " ".join(["free"] * 400)]})
        assert (
            len(preds) == 3
            and {p["label"] for p in preds} <= {"ham", "spam"}
            and all(0 <= p["score"] <= 1 for p in preds)
        )
        # 5,000 words, and a text that reads as a Python literal, each alone in a request (MLflow parsed a list's
        # texts as literals until one was not): scored as written
        truth = pipeline_scores(f"models:/{NAME}/{champion}", [LONG, LITERAL, "free prize"])
        assert invoke({"inputs": [LONG]})[0]["score"] == pytest.approx(truth[0], abs=1e-6)
        assert invoke({"inputs": [LITERAL]})[0]["score"] == pytest.approx(truth[1], abs=1e-6)
        assert truth[1] != pytest.approx(truth[2], abs=1e-9)  # the literal and its content score differently here
        # the column form (what versions registered before take safely) gives the same
        assert invoke({"dataframe_records": [{"text": LITERAL}]})[0]["score"] == pytest.approx(truth[1], abs=1e-6)
    finally:
        stop_group(proc)
        log.close()
    assert list((workdir / "tmp").iterdir()) == []  # the checked download went with the server


def test_texts_longer_than_max_length_are_cut_as_in_training(workdir, register_tiny, prefect_harness):
    from tuneflow.predict import score_path

    register_tiny("long-clf", decide("macro_f1", 0.9, None, None, 0.0))  # max_length 32, 128 positions
    src = workdir / "long.csv"
    words = " ".join(["free"] * 400)  # 400 tokens: past the model's 128 positions
    pd.DataFrame({"text": [words, "lunch later", " ".join(["prize"] * 60)]}).to_csv(src, index=False)
    summary = score_path("long-clf@champion", src, workdir / "long.scored.csv")
    scored = pd.read_csv(workdir / "long.scored.csv")
    assert summary.rows == 3 and scored["label"].notna().all()
    # 60 tokens: past max_length 32, inside the positions; scored as its first 32 tokens, as trained
    short = workdir / "first32.csv"
    pd.DataFrame({"text": [" ".join(["prize"] * 30)]}).to_csv(short, index=False)
    score_path("long-clf@champion", short, workdir / "first32.scored.csv")
    cut = pd.read_csv(workdir / "first32.scored.csv")
    assert cut["score"].iloc[0] == pytest.approx(scored["score"].iloc[2], abs=1e-6)


def _serve_model(target: str, workdir: Path, log_name: str) -> tuple[subprocess.Popen, str, object]:
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}",
        "TMPDIR": str(workdir / "tmp"),  # where serve-model downloads: the test sees it emptied after
    }
    log = (workdir / log_name).open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneflow", "serve-model", target, "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}", log


def _labels(base: str) -> set[str]:
    req = urllib.request.Request(
        f"{base}/invocations",
        data=json.dumps({"inputs": ["WINNER! claim your prize", "see you at lunch"]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return {p["label"] for p in json.loads(r.read())["predictions"]}


def test_serve_model_serves_the_checked_bytes_even_after_the_alias_moved(champion, workdir, tiny_model_dir, capsys):
    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    from tuneflow.cli import main
    from tuneflow.kinds.classification import load_base_model
    from tuneflow.registry import register_version

    from conftest import tiny_registry_config

    (workdir / "tmp").mkdir()
    kept = workdir / "kept"
    assert main(["verify", f"{NAME}@champion", "--download", str(kept)]) == 0
    capsys.readouterr()
    # then champion moves to a version with other labels
    cfg = tiny_registry_config(NAME, tiny_model_dir)
    with mlflow.start_run():
        v2 = register_version(
            load_base_model(cfg.model, ["no", "yes"]),
            AutoTokenizer.from_pretrained(str(tiny_model_dir)),
            cfg,
            decide("macro_f1", 0.95, None, None, 0.0),
            {},
            "card",
            ["hi"],
        )
    MlflowClient().set_registered_model_alias(NAME, "champion", v2.version)

    proc, base, log = _serve_model(str(kept), workdir, "serve-kept.log")
    try:
        wait_until_up(f"{base}/ping", proc, workdir / "serve-kept.log")
        assert _labels(base) <= {"ham", "spam"}  # v1's labels: the folder verify checked, not today's champion (v2)
    finally:
        stop_group(proc)
        log.close()
    assert (kept / "MLmodel").is_file()  # the kept folder stays as checked


def test_long_and_literal_looking_texts_are_scored_as_written(
    workdir, register_tiny, tiny_model_dir, prefect_harness, monkeypatch
):
    from tuneflow.cli import main
    from tuneflow.kinds.classification import Classification
    from tuneflow.predict import score_path
    from tuneflow.registry import get_version
    from tuneflow.scoring import score_version

    new = register_tiny("lit-clf", decide("macro_f1", 0.9, None, None, 0.0))
    inbox = workdir / "inbox"
    inbox.mkdir()
    pd.DataFrame({"text": [LONG, "lunch later"]}).to_csv(inbox / "long.csv", index=False)
    pd.DataFrame({"text": [LITERAL]}).to_csv(inbox / "literal.csv", index=False)  # a batch of literals only
    assert main(["predict", "--model", "lit-clf@champion", "--input", str(inbox), "--output", "out"]) == 0
    truth = pipeline_scores(f"models:/lit-clf/{new.version}", [LONG, "lunch later", LITERAL, "free prize"])
    scored = [*pd.read_csv("out/long.scored.csv")["score"], *pd.read_csv("out/literal.scored.csv")["score"]]
    assert scored == pytest.approx(truth[:3], abs=1e-6)
    assert truth[2] != pytest.approx(truth[3], abs=1e-9)  # the literal and its content score differently here

    # A version logged before the model took a text column (its input schema: one unnamed string column)
    monkeypatch.setattr(Classification, "input_example", lambda self, texts: texts[:2])
    old = register_tiny("lit-clf", decide("macro_f1", 0.1, 0.9, "1", 0.0))
    assert "'text'" not in str(mlflow.models.get_model_info(f"models:/lit-clf/{old.version}").signature.inputs)
    score_path(f"lit-clf/{old.version}", inbox / "literal.csv", workdir / "old-literal.csv")
    score_path(f"lit-clf/{old.version}", inbox / "long.csv", workdir / "old-long.csv")
    old_scored = [*pd.read_csv("old-long.csv")["score"], *pd.read_csv("old-literal.csv")["score"]]
    assert old_scored == pytest.approx(truth[:3], abs=1e-6)

    # The champion as the gate and monitoring score it: the same texts, no error
    from conftest import tiny_registry_config

    frame = pd.DataFrame({"text": [LONG, LITERAL], "label": ["spam", "ham"]})
    evaluation = score_version(tiny_registry_config("lit-clf", tiny_model_dir), get_version("lit-clf", "1"), frame)
    assert len(evaluation.predictions) == 2


def test_predict_against_an_unreachable_registry_is_one_error_with_the_fix(workdir):
    """A tracking server nobody listens on: exit 2 and what to check, not a traceback from inside the flow."""
    pd.DataFrame({"text": ["see you at lunch"]}).to_csv(workdir / "in.csv", index=False)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    done = subprocess.run(
        [sys.executable, "-m", "tuneflow", "predict", "--model", f"{NAME}@champion", "--input", "in.csv"]
        + ["--output", "out.csv"],
        env=env,
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not read" in errors[0] and "Fix:" in errors[0], done.stderr[-3000:]
    assert not (workdir / "out.csv").exists()
