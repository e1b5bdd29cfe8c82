"""The MLflow UI, checked as a person would: a real `mlflow server` on the test store, headless
Chromium (Debian's package, never a downloaded browser) opens the model version page; the aliases,
the model card and its metrics must be on the rendered page. The screenshot is kept in
test-artifacts/ (git-ignored). Run with: pytest -m ui"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tuneflow.config import PipelineConfig
from tuneflow.data import Split
from tuneflow.evaluate import EvaluateOutput, Evaluation
from tuneflow.registry import decide
from tuneflow.reporting import model_card

from servers import CHROMIUM, chromium, free_port, stop_group, wait_until_up

pytestmark = pytest.mark.ui

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
NAME = "ui-clf"


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium); .ci/run installs it",
)
def test_model_version_page_shows_aliases_card_and_metrics(workdir, tiny_model_dir, register_tiny, tmp_path):
    cfg = PipelineConfig.model_validate(
        {
            "name": "ui",
            "data": {"path": "sms.csv", "labels": ["ham", "spam"]},
            "model": {"base_model": str(tiny_model_dir), "max_length": 32},
            "registry": {"model_name": NAME},
        }
    )
    metrics = {
        "accuracy": 0.9731,
        "macro_f1": 0.9517,
        "precision_ham": 0.98,
        "recall_ham": 0.99,
        "f1_ham": 0.985,
        "precision_spam": 0.93,
        "recall_spam": 0.9,
        "f1_spam": 0.915,
    }
    ev = EvaluateOutput(Evaluation(metrics, [[1, 0], [0, 1]], ["ham", "spam"], []), None, None, None)
    split = Split(
        pd.DataFrame({"text": ["a", "b"], "label": ["ham", "spam"]}), pd.DataFrame({"text": ["c"], "label": ["spam"]})
    )
    decision = decide("macro_f1", 0.9517, None, None, 0.0)
    card = model_card(cfg, decision, ev, split, "e" * 64, "run-ui", None, None)
    mv = register_tiny(cfg, decision, {"tuneflow.validation": "passed"}, card)

    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = tmp_path / "server.log"
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                mlflow.get_tracking_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/health", server, log_path)

        url = f"{base}/#/models/{NAME}/versions/{mv.version}"
        shot = ARTIFACTS / "mlflow-model-version.png"
        shot.unlink(missing_ok=True)
        chromium([f"--screenshot={shot}", url], tmp_path / "profile-shot")
        dom = chromium(["--dump-dom", url], tmp_path / "profile-dom").stdout
        (ARTIFACTS / "mlflow-model-version.html").write_text(dom)
        assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot written"
        flat = re.sub(r"\s+", "", dom)
        expected = {
            "alias champion": 'role="status"class="[^"]*"title="champion"',
            "alias challenger": 'role="status"class="[^"]*"title="challenger"',
            "card title (markdown rendered)": f"<h1>Modelcard:{NAME}</h1>",
            "card sections": "<h2>Promotiondecision</h2>.*<h2>Evalmetrics.*<h2>Data</h2>.*<h2>Knownlimits</h2>",
            "metrics table": r"<td>accuracy</td><td>0\.9731</td></tr><tr><td>macro_f1</td><td>0\.9517</td>",
        }
        for what, pattern in expected.items():
            assert re.search(pattern, flat), (
                f"{what} not on the rendered page {url}; see {ARTIFACTS}/mlflow-model-version.*"
            )
    finally:
        stop_group(server)
        shutil.rmtree(tmp_path / "profile-shot", ignore_errors=True)
        shutil.rmtree(tmp_path / "profile-dom", ignore_errors=True)
