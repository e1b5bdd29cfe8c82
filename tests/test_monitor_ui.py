"""The monitoring report page (``reports/step-<n>.html`` on the monitoring run), read offline in Debian's headless
Chromium: every request off the machine refused, the rendered page must show the verdict, the reasons, the
drift table and the words that moved. Screenshot and DOM in test-artifacts/. Run with: pytest -m ui"""

from __future__ import annotations

import html
import re
import shutil

import pytest

from test_report_page_ui import OFFLINE
from test_ui import ARTIFACTS
from tuneflow.drift import measure_drift
from tuneflow.monitor import MonitorPoint
from tuneflow.reporting import monitor_html

from conftest import make_rows
from servers import CHROMIUM, chromium, drawn_share

pytestmark = pytest.mark.ui


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium; .ci/run installs it")
def test_the_drift_report_page_reads_offline_in_chromium(tmp_path):
    ref, cur = make_rows(300, seed=1), make_rows(60, seed=2)
    cur["text"] = [f"{t} crypto airdrop" for t in cur.text]
    result = measure_drift(
        list(cur.text), list(ref.text), cur_labels=list(cur.label), ref_labels=list(ref.label), labels=["ham", "spam"]
    )
    point = MonitorPoint(
        step=3,
        at="2026-12-04T18:00:00+00:00",
        source="gate",
        batches=["week-49.csv"],
        rows=len(cur),
        digest="x",
        champion_version="4",
        status="degraded",
        reasons=[f"text drift: AUC {result.stats[-1].value:.4f} > threshold {result.stats[-1].threshold:.4f}"],
        primary_metric="macro_f1",
        metrics={"macro_f1": 0.91, "accuracy": 0.93},
        baseline=0.97,
        drop=0.06,
        drift=result.to_json(),
    )
    page = tmp_path / "step-000003.html"
    page.write_text(monitor_html(point, "sms-spam-classifier"))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "monitor-report.png"
    shot.unlink(missing_ok=True)
    try:
        chromium([*OFFLINE, f"--screenshot={shot}", page.as_uri()], tmp_path / "p1")
        dom = chromium([*OFFLINE, "--dump-dom", page.as_uri()], tmp_path / "p2").stdout
    finally:
        shutil.rmtree(tmp_path / "p1", ignore_errors=True)
        shutil.rmtree(tmp_path / "p2", ignore_errors=True)
    (ARTIFACTS / "monitor-report.html").write_text(dom)
    text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))
    expected = [
        "sms-spam-classifier: monitoring step 3 (degraded)",
        "120 rows from week-49.csv; champion v4",
        "text drift: AUC",
        "Registered macro_f1: 0.9700; drop on these rows: 0.0600",
        "ROC AUC of a classifier telling batch texts from training texts",
        "training-data chunks",
        "crypto",
        "airdrop",
    ]
    missing = [e for e in expected if e not in text]
    assert not missing, f"not on the rendered page: {missing}; see {ARTIFACTS}/monitor-report.*"
    drawn_rows, colours = drawn_share(shot)
    assert drawn_rows > 0.1 and colours > 20, (drawn_rows, colours)
