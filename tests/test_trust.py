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
from tuneflow.registry_base import UntrustedModel
from tuneflow.trust import check_folder

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


def test_a_version_without_tuneflow_tags_is_refused(workdir, register_tiny, tiny_model_dir):
    from tuneflow.predict import score_path
    from tuneflow.registry import get_version
    from tuneflow.scoring import score_version
    from tuneflow.trust import check_lineage

    from conftest import tiny_registry_config

    register_tiny("plain-clf", decide("macro_f1", 0.5, None, None, 0.0))
    client = MlflowClient()
    client.delete_model_version_tag("plain-clf", "1", "tuneflow.decision")
    mv = get_version("plain-clf", "1")
    with pytest.raises(UntrustedModel, match="not registered by tuneflow"):
        check_lineage(mv)
    # the same check guards every load: the gate's champion scoring and batch scoring refuse it too
    frame = pd.DataFrame({"text": ["free prize now", "lunch later"], "label": ["spam", "ham"]})
    with pytest.raises(UntrustedModel, match="not registered by tuneflow"):
        score_version(tiny_registry_config("plain-clf", tiny_model_dir), mv, frame)
    frame[["text"]].to_csv(workdir / "in.csv", index=False)
    with pytest.raises(UntrustedModel, match="not registered by tuneflow"):
        score_path("plain-clf/1", workdir / "in.csv", workdir / "out.csv")
    assert not (workdir / "out.csv").exists()


# --- What a real version's MLmodel and environment files hold, and every key that would send loading elsewhere


@pytest.fixture(scope="module")
def pristine_folders(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """One real registered version of each kind (classification, sft), downloaded once: kind -> folder."""
    from transformers import AutoTokenizer

    from sft_fixtures import build_tiny_llama, sft_config
    from tuneflow.config import PipelineConfig
    from tuneflow.kinds import get_kind
    from tuneflow.registry import register_version
    from tuneflow.tracking import configure_tracking, ensure_experiment

    from conftest import tiny_registry_config

    root = tmp_path_factory.mktemp("real-versions")
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    configure_tracking(root)
    ensure_experiment("real-versions")
    clf = tiny_registry_config("real-clf", tiny_model_dir)
    sft_cfg = PipelineConfig.model_validate(sft_config(build_tiny_llama(root / "llama"), root / "unused.csv"))
    out = {}
    try:
        for kind, cfg, metric in (("classification", clf, "macro_f1"), ("sft", sft_cfg, "eval_loss")):
            k = get_kind(kind)
            tok = k.prepare_tokenizer(AutoTokenizer.from_pretrained(cfg.model.base_model), cfg)
            with mlflow.start_run():
                decision = decide(metric, 0.5, None, None, 0.0)
                mv = register_version(k.load_model(cfg), tok, cfg, decision, {}, "card", ["hi"])
            uri = f"models:/{mv.name}/{mv.version}"
            out[kind] = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(root / kind)))
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    return out


@pytest.fixture
def real_folders(pristine_folders, tmp_path) -> dict[str, Path]:
    """A copy of each kind's real version, to tamper with."""
    return {k: Path(shutil.copytree(v, tmp_path / k)) for k, v in pristine_folders.items()}


def _mlmodel(folder: Path) -> dict:
    import yaml

    return yaml.safe_load((folder / "MLmodel").read_text())


def test_the_check_allows_exactly_the_mlmodel_keys_real_versions_have(real_folders):
    from tuneflow.trust import MLMODEL_KEYS, PYFUNC_KEYS, TRANSFORMERS_KEYS

    seen: dict[str, set[str]] = {"top": set(), "python_function": set(), "transformers": set()}
    for kind, folder in real_folders.items():
        check_folder(folder, kind, kind)  # real versions pass
        mlmodel = _mlmodel(folder)
        seen["top"] |= set(mlmodel)
        for flavor in ("python_function", "transformers"):
            seen[flavor] |= set(mlmodel["flavors"][flavor])
    # the lists in trust.py are the union of what MLflow writes for tuneflow's two kinds: nothing more
    assert seen == {"top": MLMODEL_KEYS, "python_function": PYFUNC_KEYS, "transformers": TRANSFORMERS_KEYS}


# (kind, flavor or None for the top, key, value, what the refusal must name)
TAMPERED_MLMODEL = [
    ("classification", "python_function", "data", "/tmp/elsewhere", "python_function.data"),
    ("sft", "python_function", "data", "model", "python_function.data"),
    ("classification", "python_function", "predict_fn", "__init__", "python_function.predict_fn"),
    ("classification", "python_function", "env", {"conda": "/etc/conda.yaml"}, "python_function.env"),
    ("classification", "python_function", "config", {"trust_remote_code": True}, "python_function.config"),
    ("classification", "transformers", "pipeline_model_type", "EvilForSequenceClassification", "EvilFor"),
    ("sft", "transformers", "pipeline_model_type", "BertForSequenceClassification", "BertFor"),
    ("classification", "transformers", "model_binary", "/tmp/elsewhere/model", "transformers.model_binary"),
    ("classification", "transformers", "model_binary", "../../model", "transformers.model_binary"),
    ("classification", "transformers", "local_base_model_path", "/tmp/base", "local_base_model_path"),
    ("sft", "transformers", "source_model_revision", "0" * 40, "source_model_revision"),
    ("sft", "transformers", "peft_adaptor", "peft", "peft_adaptor"),
    ("classification", "transformers", "feature_extractor_type", "BertTokenizer", "feature_extractor_type"),
    ("classification", "transformers", "processor_type", "AutoProcessor", "processor_type"),
    ("classification", "transformers", "components", ["tokenizer", "/tmp/x"], "transformers.components"),
    ("classification", "transformers", "tokenizer_type", "EvilTokenizer", "EvilTokenizer"),
    ("classification", "transformers", "tokenizer_type", "BertModel", "BertModel"),  # a class, not a tokenizer
    ("sft", "transformers", "torch_dtype", "os.system", "transformers.torch_dtype"),
    ("sft", None, "metadata", {"task": "llm/v1/chat", "prompt_template": "{prompt}"}, "metadata"),
    ("classification", None, "resources", {"x": 1}, "resources"),
]


@pytest.mark.parametrize(("kind", "flavor", "key", "value", "named"), TAMPERED_MLMODEL)
def test_every_mlmodel_key_that_sends_loading_elsewhere_is_refused(real_folders, kind, flavor, key, value, named):
    import yaml

    folder = real_folders[kind]
    mlmodel = _mlmodel(folder)
    (mlmodel["flavors"][flavor] if flavor else mlmodel)[key] = value
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(UntrustedModel, match="Fix:") as refused:
        check_folder(folder, kind, "tampered")
    assert named in str(refused.value) and "MLmodel" in str(refused.value)


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text().rstrip("\n") + "\n" + text + "\n")


TAMPERED_ENV = [
    ("requirements.txt", "evil-package==1.0", "evil-package==1.0"),
    ("requirements.txt", "-e git+https://example.com/evil.git#egg=evil", "-e git+https"),
    ("requirements.txt", "--index-url http://example.com/simple", "--index-url"),
    ("requirements.txt", "torch @ https://example.com/torch.whl", "torch @ https"),
    ("requirements.txt", "git+https://example.com/evil.git", "git+https"),
    ("requirements.txt", "-r other.txt", "-r other.txt"),
    ("conda.yaml", "- pip:\n  - evil-package==1.0", "conda.yaml"),
    ("python_env.yaml", "- evil-package==1.0", "python_env.yaml"),
]


@pytest.mark.parametrize(("name", "line", "named"), TAMPERED_ENV)
def test_unexpected_requirement_lines_are_refused(real_folders, name, line, named):
    folder = real_folders["classification"]
    if name == "conda.yaml":  # a second pip list in the dependencies
        _append(folder / name, "")
        text = (folder / name).read_text().replace("name: mlflow-env", "")
        (folder / name).write_text(text.replace("dependencies:\n", f"dependencies:\n{line}\n", 1))
    else:
        _append(folder / name, line)
    with pytest.raises(UntrustedModel, match="Fix:") as refused:
        check_folder(folder, "classification", "tampered")
    assert named in str(refused.value) and name in str(refused.value)


# --- tuneflow verify when the download fails, and verify --download


def test_verify_ends_in_one_clear_error_when_the_download_fails(workdir, register_tiny, capsys):
    import os
    import subprocess
    import sys

    from servers import free_port

    register_tiny("gone-clf", decide("macro_f1", 0.5, None, None, 0.0))
    assert main(["verify", "gone-clf/7"]) == 2  # unknown version
    err = capsys.readouterr().err
    assert "gone-clf version 7 not found" in err and "Fix:" in err
    # the version's files deleted from the artifact store: a download problem, not an untrusted model
    for mlmodel in list((workdir / "mlruns").rglob("MLmodel")):
        shutil.rmtree(mlmodel.parent)
    kept = workdir / "kept"
    for extra in ([], ["--download", str(kept)]):
        assert main(["verify", "gone-clf/1", *extra]) == 2
        err = capsys.readouterr().err
        assert "could not download gone-clf v1" in err and "Fix:" in err and "refusing" not in err, err
        assert len([line for line in err.splitlines() if "Fix:" in line]) == 1 and not kept.exists()  # one paragraph
    # the registry unreachable (a tracking server nobody listens on): one paragraph, exit 2, no traceback
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    done = subprocess.run(
        [sys.executable, "-m", "tuneflow", "verify", "gone-clf@champion"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Fix:" in done.stderr and "could not read" in done.stderr


def test_verify_download_keeps_the_checked_files_and_a_changed_byte_is_refused(workdir, register_tiny, capsys):
    from tuneflow.trust import RECORD, check_kept

    register_tiny("kept-clf", decide("macro_f1", 0.5, None, None, 0.0))
    kept = workdir / "kept"
    assert main(["verify", "kept-clf@champion", "--download", str(kept)]) == 0
    assert f"kept in {kept}" in capsys.readouterr().out
    record = json.loads((kept / RECORD).read_text())
    assert (record["model"], record["version"], record["kind"]) == ("kept-clf", "1", "classification")
    assert record["files"]["model/model.safetensors"] and (kept / "MLmodel").is_file()
    assert check_kept(kept)["version"] == "1"
    assert main(["verify", "kept-clf@champion", "--download", str(kept)]) == 2  # never mixed with older files
    assert "not an empty folder" in capsys.readouterr().err
    with (kept / "model" / "model.safetensors").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(UntrustedModel, match="model/model.safetensors changed"):
        check_kept(kept)
    assert main(["serve-model", str(kept)]) == 2
    assert "model/model.safetensors changed" in capsys.readouterr().err
    # a check that fails leaves nothing behind to serve
    (workdir / "bad").mkdir()
    client = MlflowClient()
    client.set_model_version_tag("kept-clf", "1", "tuneflow.kind", "unknown")
    assert main(["verify", "kept-clf/1", "--download", str(workdir / "bad")]) == 2
    assert not (workdir / "bad").exists()
