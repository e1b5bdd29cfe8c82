"""The package installs as ``tuneflow`` with ``tuneflow.tasks`` / ``tuneflow.flows`` and nothing named plain
``tasks`` or ``flows``, in a regular, an editable and a strict editable install; imports work from any folder.

Each install goes into a fresh virtual environment (``pip install --no-deps`` of a copy of the checkout);
the dependencies come from the project's own environment through a ``.pth`` line, so nothing is
downloaded but setuptools for the build (from pip's cache after the first time).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.install


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the tracked files (and untracked, not ignored ones): what a fresh clone would hold."""
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split()
    dst = tmp_path_factory.mktemp("clone") / "tuneflow"
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


@pytest.mark.parametrize(
    "mode",
    [
        ["."],
        ["-e", "."],
        ["-e", ".", "--config-settings", "editable_mode=strict"],
    ],
    ids=["regular", "editable", "editable-strict"],
)
def test_install_exposes_tuneflow_and_no_bare_tasks_or_flows(mode, checkout, tmp_path):
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], tmp_path).returncode == 0
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
    (Path(purelib.stdout.strip()) / "tuneflow-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    install = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", *mode], checkout)
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing importable from the working directory
    elsewhere.mkdir()
    ok = _run(
        [
            str(python),
            "-c",
            "import tuneflow.flows.serve, tuneflow.tasks.validate, tuneflow.kinds.classification;"
            "import tuneflow.flows.retrain as r; print(r.retrain.name, r.retrain_once.name)",
        ],
        elsewhere,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.split() == ["retrain", "retrain-once"]
    for bare in ("tasks", "flows"):
        missing = _run([str(python), "-c", f"import {bare}"], elsewhere)
        assert missing.returncode != 0 and f"No module named '{bare}'" in missing.stderr, (bare, missing.stdout)
    cli = _run([str(python), "-m", "tuneflow", "--help"], elsewhere)
    assert cli.returncode == 0 and "promote" in cli.stdout, cli.stderr[-2000:]

    site = Path(purelib.stdout.strip())
    assert not (site / "tasks").exists() and not (site / "flows").exists()
