"""The Prefect UI's review form, used as a person would: a real `prefect server` (with its UI) on loopback, a
`tuneflow run` with registry.approval: required that pauses for review, headless Chromium (Debian's package) opens
the waiting run, reads the comparison above the form, fills it in and submits; the run completes and champion
moves. The screenshot of the filled form is kept in the test's tmp dir. Run with: pytest -m ui"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml
from mlflow import MlflowClient

from test_deployments import REPO, _base_env

from conftest import make_rows, tiny_config_dict
from servers import CHROMIUM, DevTools, drawn_share, free_port, stop_group, wait_until_up

pytestmark = [pytest.mark.ui, pytest.mark.timeout(600)]

MODEL = "tiny-clf"
FILL = """(() => {
  const form = document.querySelector('[role=dialog]');
  const set = (el, value, event) => { el.value = value; el.dispatchEvent(new Event(event, {bubbles: true})); };
  set(form.querySelector('select'), 'approve', 'change');
  const [reviewer, comment] = form.querySelectorAll('textarea');
  set(reviewer, 'Ada Lovelace', 'input');
  set(comment, 'spam recall up, ham precision kept', 'input');
  return form.querySelectorAll('textarea').length;
})()"""


def _button(label: str, scope: str = "document") -> str:
    return f"[...{scope}.querySelectorAll('button')].find(b => b.innerText.trim() === {label!r})"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium; .ci/run installs it")
def test_approving_in_the_prefect_ui_form_resumes_the_run_and_moves_champion(tmp_path, tiny_model_dir):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _base_env(tmp_path / "prefect-home")
    procs = []
    try:
        with open(tmp_path / "server.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    env=env | {"PREFECT_UI_API_URL": api},  # the UI's own calls go to this server
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_until_up(f"{api}/health", procs[0], tmp_path / "server.log")

        data = tmp_path / "data.csv"
        make_rows(150).to_csv(data, index=False)
        cfg = tiny_config_dict(data, tiny_model_dir, train={"epochs": 2}, registry={"approval": "required"})
        (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
        mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        run_env = env | {
            "PREFECT_API_URL": api,
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "TUNEFLOW_CACHE_DIR": str(tmp_path / "cache"),
        }
        with open(tmp_path / "run.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tuneflow.cli", "run", "--config", str(tmp_path / "tiny.yaml")],
                    cwd=tmp_path,
                    env=run_env | {"PYTHONPATH": str(REPO)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        # the run says when it pauses; only then is the store opened here (two processes creating MLflow's tables in
        # one new sqlite file at once break its migration)
        deadline = time.monotonic() + 300
        while "Pausing flow" not in (tmp_path / "run.log").read_text():
            assert procs[1].poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the retrain did not pause for review"
            time.sleep(1)
        client = MlflowClient(mlflow_uri, mlflow_uri)
        tags = client.get_model_version(MODEL, "1").tags
        assert (
            tags["tuneflow.review"] == "waiting"
            and str(client.get_registered_model(MODEL).aliases["challenger"]) == "1"
        )
        assert "champion" not in client.get_registered_model(MODEL).aliases

        browser = DevTools(tmp_path / "profile")
        try:
            browser.send("Page.enable")
            browser.send(
                "Page.navigate", url=f"http://127.0.0.1:{port}/runs/flow-run/{tags['tuneflow.review.flow_run']}"
            )
            browser.wait_js(f"!!{_button('Resume')}", timeout_s=120)  # shown once the run is Paused
            browser.js(f"{_button('Resume')}.click()")
            browser.wait_js("!!document.querySelector('[role=dialog] textarea')")
            # the description (markdown) renders a moment after the form's fields
            browser.wait_js("document.querySelector('[role=dialog]').innerText.includes('Metrics on the same')", 30)
            shown = browser.js("document.querySelector('[role=dialog]').innerText")
            for what in ("Review tiny-clf v1", "Metrics on the same eval split", "macro_f1", "Trained on", "Decision"):
                assert what in shown, f"{what!r} not in the form:\n{shown[:3000]}"
            assert browser.js(FILL) == 2
            time.sleep(0.5)  # let the form take the values
            shot = tmp_path / "prefect-review-form.png"
            browser.screenshot(shot)
            rows, colours = drawn_share(shot)
            assert rows > 0.05 and colours > 20, f"blank screenshot {shot}"
            submit = _button("Submit", "document.querySelector('[role=dialog]')")
            browser.js(f"{submit}.click()")
            # the form closes once the server took the input (closing the browser earlier could drop the request)
            browser.wait_js("!document.querySelector('[role=dialog]')", 60)
        finally:
            browser.close()

        assert procs[1].wait(timeout=180) == 0, (tmp_path / "run.log").read_text()[-3000:]
        out = (tmp_path / "run.log").read_text()
        assert "PROMOTED to champion" in out and "review:       approved" in out
        assert str(client.get_registered_model(MODEL).aliases["champion"]) == "1"
        tags = client.get_model_version(MODEL, "1").tags
        assert tags["tuneflow.review.reviewer"] == "Ada Lovelace"
        assert tags["tuneflow.review.comment"] == "spam recall up, ham precision kept"
        history = [v for k, v in client.get_registered_model(MODEL).tags.items() if k.startswith("tuneflow.history.")]
        assert any('"actor": "Ada Lovelace"' in h and '"action": "approve"' in h for h in history), history
    finally:
        for p in reversed(procs):
            stop_group(p)
