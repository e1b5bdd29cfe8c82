"""The docs site as a reader opens it, with no network: ``mkdocs build --strict`` into a temporary folder, served by
a loopback http.server, opened in Debian's headless Chromium with every request off the machine refused. The home
page must render with its links into the site, and the generated configuration reference must show the config key
table. Screenshots go to test-artifacts/docs-*.png. Run with: pytest -m ui"""

from __future__ import annotations

import functools
import html
import re
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_ui import ARTIFACTS

from servers import CHROMIUM, chromium, drawn_share

pytestmark = pytest.mark.ui

ROOT = Path(__file__).resolve().parents[1]
# No network but loopback: every host name resolves to nothing and every request goes to a proxy that is not
# there, except loopback addresses, which Chromium never sends through a proxy (its implicit bypass rules).
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9"]


class _QuietHandler(SimpleHTTPRequestHandler):
    requested: list[str] = []

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        _QuietHandler.requested.append(self.path)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium; .ci/run installs it")
def test_the_built_site_opens_offline_and_shows_the_config_key_table(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra: make setup-dev installs it")
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)},
    )
    assert built.returncode == 0, built.stderr[-3000:]

    handler = functools.partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        home = chromium([*OFFLINE, "--dump-dom", f"{base}/"], tmp_path / "profile-home").stdout
        text = html.unescape(re.sub(r"<[^>]+>", " ", home))
        assert "Keep fine-tuned language models fresh" in text
        assert "Where to go" in text and "Get started" in text
        assert 'href="reference/config/"' in home  # the link from the front page into the reference

        url = f"{base}/reference/config/"
        dom = chromium([*OFFLINE, "--dump-dom", url], tmp_path / "profile-config").stdout
        shot = tmp_path / "config.png"
        chromium([*OFFLINE, f"--screenshot={shot}", url], tmp_path / "profile-shot", window="1400,1600")
    finally:
        server.shutdown()
        server.server_close()

    tables = re.findall(r"<table>.*?</table>", dom, re.S)
    headers = [re.sub(r"<[^>]+>", "", h).strip() for h in re.findall(r"<th[^>]*>(.*?)</th>", tables[1], re.S)]
    assert headers == ["key", "type", "default", "constraints", "description"]
    rows = {
        re.sub(r"<[^>]+>", "", cells[0]).strip(): [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in cells]
        for cells in (re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", dom, re.S))
        if cells
    }
    assert rows["train.processes"][1:4] == ["int", "1", "≥ 1, ≤ 1024"]
    assert rows["data.landing"][1] == "str or unset" and "landing-zone folder" in rows["data.landing"][4]
    assert rows["registry.model_name"][2] == "required"
    shutil.copy(shot, ARTIFACTS / "docs-config.png")
    rows_drawn, colours = drawn_share(shot)
    assert rows_drawn > 0.2 and colours > 20, (rows_drawn, colours)  # a drawn page, not a blank one
    # everything the pages asked for came from the site itself
    assert _QuietHandler.requested and all(p.startswith("/") for p in _QuietHandler.requested)
