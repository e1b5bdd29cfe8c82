"""Serving a registered version over HTTP: MLflow's scoring server on the very folder tuneflow checked.

``mlflow models serve -m models:/NAME@ALIAS`` resolves the alias again and downloads again (what it serves may
not be what ``tuneflow verify`` checked), and with its default environment manager it pip-installs the
version's ``requirements.txt``. Here the server runs on a folder that was checked (``tuneflow.trust``), with
``--env-manager local``: the installed environment, nothing downloaded or installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def scoring_server_command(folder: Path, host: str, port: int) -> list[str]:
    """MLflow's scoring server on ``folder`` with this interpreter's environment (no conda, no virtualenv)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        str(folder),
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
    ]


def serve_folder(folder: Path, host: str, port: int) -> int:
    """Run the scoring server on ``folder`` until it exits (Ctrl-C or SIGTERM stop it); returns its exit code.

    The caller may delete ``folder`` afterwards: this returns only once the server has exited.
    """
    # The server starts uvicorn from PATH: use the one of this interpreter's environment.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(scoring_server_command(folder, host, port), env=env)
    # MLflow's CLI makes the server exit with it (PR_SET_PDEATHSIG), so stopping the CLI stops both.
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the server too (same process group): wait for it to finish
        proc.terminate()
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
