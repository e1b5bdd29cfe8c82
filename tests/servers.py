"""Helpers for tests that start real servers (MLflow, Prefect) as subprocesses on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log tail if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no answer from {url} in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(1)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group a test started (servers fork workers and flow runs), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package, never a downloaded browser (.ci/run installs it)


def chromium(
    args: list[str], profile: Path, budget_ms: int = 15000, window: str = "1400,2400"
) -> subprocess.CompletedProcess:
    """Headless Chromium with ``args`` (e.g. ``--dump-dom URL``); no sandbox (containers), no GPU, nothing that
    phones home (offline machine); ``budget_ms`` of virtual time for scripts to render the page."""
    base = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        f"--window-size={window}",
    ]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=180)


def drawn_share(screenshot: Path) -> tuple[float, int]:
    """(share of pixel rows holding dark pixels, number of colours) of a screenshot: a drawn page, not a blank one."""
    import numpy as np
    from matplotlib import image

    pixels = image.imread(screenshot)[..., :3]
    rows = float((pixels.min(axis=(1, 2)) < 0.5).mean())
    return rows, len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))


class PrefectApi:
    """Reads from a real Prefect server at ``self.api`` (set by the subclass), for the tests' assertions."""

    api: str

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api)

    def runs(self, deployment: str) -> list:
        """The flow runs of ``deployment`` (``flow/deployment``) that were not merely scheduled, oldest first."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        with self.client() as c:
            dep = c.read_deployment_by_name(deployment)
            runs = c.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            )
        return [r for r in runs if r.state_type.value != "SCHEDULED"]

    def logs(self, run_id) -> list:
        """Every log line of a flow run, oldest first (the API returns pages of 200; a retrain logs more)."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        logs: list = []
        with self.client() as c:
            while True:
                page = c.read_logs(
                    LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                    limit=200,
                    offset=len(logs),
                    sort=LogSort.TIMESTAMP_ASC,
                )
                logs += page
                if len(page) < 200:
                    return logs


class WebhookReceiver:
    """A loopback HTTP server that records the JSON bodies POSTed to it (the alert webhook)."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append({"path": self.path, **json.loads(body or b"{}")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # a token in the path, as Slack/Teams webhooks carry one: it must never show up in a log
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tok-3f9a1c-not-for-logs"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = [a for a in self.received if predicate(a)]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no matching alert in {timeout:.0f} s; received: {self.received}"
            time.sleep(0.5)


class DevTools:
    """Headless Chromium driven over the DevTools protocol (a page a test can click and type into, which
    ``--dump-dom`` cannot): ``js`` evaluates in the page, ``wait_js`` polls until an expression is truthy."""

    def __init__(self, profile: Path, window: str = "1400,2000") -> None:
        import json

        from websockets.sync.client import connect

        port = free_port()
        self.proc = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={port}",
                f"--window-size={window}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.3)
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        self.sent = 0

    def send(self, method: str, **params) -> dict:
        import json

        self.sent += 1
        self.ws.send(json.dumps({"id": self.sent, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.sent:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg.get("result", {})

    def js(self, expression: str):
        out = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in out, out["exceptionDetails"]
        return out["result"].get("value")

    def wait_js(self, expression: str, timeout_s: float = 60):
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.js(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"not true within {timeout_s:.0f} s: {expression}"
            time.sleep(0.5)

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        stop_group(self.proc)
