"""Credentials in MLFLOW_TRACKING_URI and PREFECT_API_URL never reach what tuneflow prints, logs, tags or
puts in an artifact: a retrain against a real `mlflow server` and Prefect server on loopback, both reached
through URLs with a user and password, then every output, tag, param, artifact and log line is searched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config_dict
from servers import free_port, stop_group, wait_until_up

MLFLOW_SECRET = "mlf-s3cr3t-7f2a"
PREFECT_SECRET = "pfx-s3cr3t-91bc"

pytestmark = pytest.mark.integration


def _text_files(folder: Path):
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            yield path, path.read_bytes()


def test_no_credential_from_a_url_shows_up_anywhere(tmp_path, data_csv, tiny_model_dir, prefect_harness):
    import mlflow
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    port = free_port()
    log_path = tmp_path / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
             "--artifacts-destination", str(tmp_path / "srv-artifacts"), "--host", "127.0.0.1", "--port",
             str(port), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server, log_path)
        tracking = f"http://alice:{MLFLOW_SECRET}@127.0.0.1:{port}"
        api = str(get_current_settings().api.url).replace("http://", f"http://bob:{PREFECT_SECRET}@")
        cfg = tmp_path / "tiny.yaml"
        cfg.write_text(yaml.safe_dump(tiny_config_dict(data_csv, tiny_model_dir, train={"epochs": 1})))
        run_env = env | {"MLFLOW_TRACKING_URI": tracking, "PREFECT_API_URL": api}
        run_env.pop("PREFECT_UI_URL", None)
        done = subprocess.run(
            [sys.executable, "-m", "tuneflow.cli", "run", "--config", str(cfg)],
            cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        assert f"http://127.0.0.1:{port}/#/experiments/" in output  # the link is there, without credentials
        found = {"CLI output": output}

        client = MlflowClient(tracking, tracking)
        exp = client.get_experiment_by_name("tiny")
        runs = client.search_runs([exp.experiment_id])
        assert runs
        for r in runs:
            found[f"run {r.info.run_name} tags+params"] = repr(r.data.tags) + repr(r.data.params)
            local = Path(client.download_artifacts(r.info.run_id, "", str(tmp_path / "dl" / r.info.run_id)))
            for path, data in _text_files(local):
                found[f"artifact {path}"] = data.decode("utf-8", "replace")
        for mv in client.search_model_versions("name='tiny-clf'"):
            found[f"version {mv.version}"] = repr(mv.tags) + (mv.description or "")
            mlflow.set_tracking_uri(tracking)
            mlflow.set_registry_uri(tracking)
            local = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-clf/{mv.version}", dst_path=str(tmp_path)))
            for path, data in _text_files(local):
                if path.suffix != ".safetensors":
                    found[f"model file {path.name}"] = data.decode("utf-8", "replace")

        with get_client(sync_client=True) as prefect:
            for art in prefect.read_artifacts():
                found[f"prefect artifact {art.key}"] = str(art.data) + str(art.description)
            for line in prefect.read_logs():
                found[f"prefect log {line.id}"] = line.message
            for fr in prefect.read_flow_runs():
                found[f"flow run {fr.name}"] = repr(fr.parameters) + repr(fr.state)
        leaks = [where for where, text in found.items() if MLFLOW_SECRET in text or PREFECT_SECRET in text]
        snippets = [
            line[:300]
            for w in leaks
            for line in found[w].splitlines()
            if MLFLOW_SECRET in line or PREFECT_SECRET in line
        ]
        assert not leaks, (leaks, snippets[:5])
        assert len(found) > 20 and any(k.startswith("prefect artifact") for k in found)  # it did look at things
    finally:
        stop_group(server)
