"""Registry contents are data, not code: a version that would run code when loaded (a cloudpickled pyfunc,
a transformers config with ``auto_map``) is refused by champion re-scoring, compare, promote and predict,
and the code never runs (a sentinel file it would create never appears)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from tuneflow.cli import main
from tuneflow.registry import decide
from tuneflow.trust import UntrustedModel, check_folder

SENTINEL_NAME = "pwned.txt"
TUNEFLOW_TAGS = {"tuneflow.decision": "promoted", "tuneflow.max_length": "32", "tuneflow.kind": "classification"}


def _touch(path: str) -> None:
    Path(path).write_text("code from the registry ran")


class Evil(mlflow.pyfunc.PythonModel):
    """Unpickling it runs ``_touch``: what a crafted pyfunc does to whoever loads it."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (_touch, (self.sentinel,))

    def predict(self, context, model_input):
        return model_input


def _register_from_run(name: str, run_id: str, path: str) -> str:
    client = MlflowClient()
    mv = client.create_model_version(name, f"runs:/{run_id}/{path}", run_id=run_id, tags=TUNEFLOW_TAGS)
    return str(mv.version)


@pytest.fixture
def evil_versions(workdir, register_tiny):
    """v1: a real tuneflow version. v2: a cloudpickled pyfunc. v3: v1's files with an auto_map and its code."""
    sentinel = workdir / SENTINEL_NAME
    good = register_tiny("evil-clf", decide("macro_f1", 0.5, None, None, 0.0))
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Evil(str(sentinel)))
    pickled = str(
        MlflowClient()
        .create_model_version(
            "evil-clf", info.model_uri, run_id=run.info.run_id, tags=TUNEFLOW_TAGS, model_id=info.model_id
        )
        .version
    )  # registered as tuneflow registers its versions (a logged model), with copied tags
    sentinel.unlink(missing_ok=True)  # MLflow loads the model once while logging it: that was the attacker's machine

    folder = workdir / "crafted"
    mlflow.artifacts.download_artifacts(f"models:/evil-clf/{good.version}", dst_path=str(folder))
    config = json.loads((folder / "model" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "evil.EvilModel"}
    (folder / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UntrustedModel, match="auto_map"):  # the finding, on the files themselves
        check_folder(folder, "classification", "crafted")
    (folder / "model" / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    with pytest.raises(UntrustedModel, match="evil.py"):
        check_folder(folder, "classification", "crafted")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), "model")
    remote = _register_from_run("evil-clf", run.info.run_id, "model")
    shutil.rmtree(folder)
    pickled_files = workdir / "pickled"
    mlflow.artifacts.download_artifacts(f"models:/evil-clf/{pickled}", dst_path=str(pickled_files))
    with pytest.raises(UntrustedModel, match="python_model.pkl|flavors"):
        check_folder(pickled_files, "classification", "pickled")
    shutil.rmtree(pickled_files)
    return sentinel, pickled, remote


@pytest.mark.usefixtures("prefect_harness")
def test_versions_that_carry_code_are_refused_everywhere_and_never_run(
    evil_versions, workdir, data_csv, tiny_model_dir, capsys
):
    import yaml

    from conftest import tiny_config_dict

    sentinel, pickled, remote = evil_versions
    client = MlflowClient()
    cfg_path = workdir / "evil.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config_dict(data_csv, tiny_model_dir, registry={"model_name": "evil-clf"})))
    src = workdir / "in.csv"
    pd.DataFrame({"text": ["free prize now", "lunch later"]}).to_csv(src, index=False)
    for bad in (pickled, remote):
        refused = f"refusing to load evil-clf v{bad}"
        client.set_registered_model_alias("evil-clf", "champion", bad)
        out_csv = workdir / "o.csv"
        assert main(["predict", "--model", "evil-clf@champion", "--input", str(src), "--output", str(out_csv)]) == 2
        err = capsys.readouterr().err
        assert refused in err and "Fix:" in err and not out_csv.exists()
        assert main(["verify", "evil-clf@champion"]) == 2
        assert refused in capsys.readouterr().err
        assert main(["compare", "evil-clf", "1", bad, "--config", str(cfg_path)]) == 2
        err = capsys.readouterr().err
        assert refused in err, err[-1500:]
        client.set_registered_model_alias("evil-clf", "champion", "1")
        assert main(["promote", "evil-clf", bad, "--reason", "try", "--config", str(cfg_path), "--force"]) == 2
        err = capsys.readouterr().err
        assert refused in err, err[-1500:]
        assert str(client.get_model_version_by_alias("evil-clf", "champion").version) == "1"
        # a retrain re-scores the champion: refused, so it is neither loaded nor replaced blindly
        client.set_registered_model_alias("evil-clf", "champion", bad)
        assert main(["run", "--config", str(cfg_path), "--set", "train.epochs=1", "--force"]) == 0
        out = capsys.readouterr().out
        assert "could not be re-evaluated" in out and "not promoted" in out
        assert str(client.get_model_version_by_alias("evil-clf", "champion").version) == bad  # untouched
        assert not sentinel.exists(), "code from the registry ran"
    # the real tuneflow version still loads and scores
    assert main(["verify", "evil-clf/1"]) == 0
    assert "safe to load" in capsys.readouterr().out
    assert main(["predict", "--model", "evil-clf/1", "--input", str(src), "--output", str(workdir / "ok.csv")]) == 0
    assert not sentinel.exists()


def test_a_version_without_tuneflow_tags_is_refused(workdir, register_tiny):
    from tuneflow.registry import get_version, score_version
    from tuneflow.trust import check_lineage

    register_tiny("plain-clf", decide("macro_f1", 0.5, None, None, 0.0))
    client = MlflowClient()
    client.delete_model_version_tag("plain-clf", "1", "tuneflow.decision")
    with pytest.raises(UntrustedModel, match="not registered by tuneflow"):
        check_lineage(get_version("plain-clf", "1"))
    assert score_version  # the same check guards every load (registry.score_version, predict.score_path)
