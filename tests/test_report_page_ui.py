"""The quarantine report a person is sent to, read as that person would with no network: Debian's headless
Chromium opens ``quarantine/<batch>.report/index.html`` with every request off the machine refused, and the
rendered page must show the batch, each failed check with its rule, the observed value in the rule's terms,
the offending rows and the fix. The screenshot and DOM are kept in test-artifacts/. Run with: pytest -m ui"""

from __future__ import annotations

import html
import re
import shutil

import pytest
from transformers import AutoTokenizer

from test_landing import quarantined_report_page
from test_ui import ARTIFACTS

from servers import CHROMIUM, chromium, drawn_share

pytestmark = pytest.mark.ui

# No network: every host resolves to nothing and every request goes to a proxy that is not there.
OFFLINE = [
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium; .ci/run installs it")
def test_the_quarantine_report_reads_offline_in_chromium(tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    site, batch = quarantined_report_page(tmp_path, tiny_model_dir, tokenizer)
    url = (site / "index.html").as_uri()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "quarantine-report.png"
    shot.unlink(missing_ok=True)
    try:
        chromium([*OFFLINE, f"--screenshot={shot}", url], tmp_path / "profile-shot")
        dom = chromium([*OFFLINE, "--dump-dom", url], tmp_path / "profile-dom").stdout
    finally:
        shutil.rmtree(tmp_path / "profile-shot", ignore_errors=True)
        shutil.rmtree(tmp_path / "profile-dom", ignore_errors=True)
    (ARTIFACTS / "quarantine-report.html").write_text(dom)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    expected = [
        "Data validation FAILED",
        f"The batch is now at {batch}",
        "label_in_set (failed)",
        "labels are one of ['ham', 'spam']",
        "24 <b>click</b> & claim your prize spma",  # line, text, label of the offending row
        "add the label to data.labels",
        "duplicate_rate (failed)",
        "at most 20% of rows repeat another row's text",
        "observed 6 of 23 rows (26.1%) repeat another row",
        "deduplicate the file",
        "rows_per_class (failed)",
        "observed rows per label: 'ham': 21, 'spam': 1",
        "Great Expectations Data Docs",
    ]
    text = html.unescape(text)
    missing = [e for e in expected if e not in text]
    assert not missing, f"not on the rendered page {url}: {missing}; see {ARTIFACTS}/quarantine-report.*"
    # The screenshot shows a drawn page, not a blank one: text in several colours over most of the height.
    drawn_rows, colours = drawn_share(shot)
    assert drawn_rows > 0.2 and colours > 20, (drawn_rows, colours)
