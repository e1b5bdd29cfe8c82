"""Process-wide switches, set once at an entry point (CLI, flow script, test session), never on import."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

OFFLINE_AND_QUIET = {
    # No model hub: every model and dataset comes from an installed package or a local folder.
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # No telemetry: without these Prefect's server and MLflow try to reach telemetry hosts and log errors.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow accepts only the string "true"
    # The temporary Prefect server once took more than the default 20 s to start on 2 cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # Under load, OpenMP's default spin-wait made small training steps up to 60x slower (STACK_NOTES).
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    # The library logs through logging.getLogger("tuneflow..."); this makes Prefect send those lines
    # (gate verdicts, watcher, training) to the flow run's logs. Read when Prefect is first imported.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tuneflow",
    # ... and the same lines outside a flow run (tuneflow promote, the watcher thread) stay local
    # instead of warning "attempted to send logs to the API without a flow run id".
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # MLflow prints "View run ... at: <tracking URI>/#/..." at every run's end, credentials in the URI and all;
    # tuneflow prints its own links, without them (redact_url).
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class _BpeCleanupNotice(logging.Filter):
    """Drops transformers' "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer" notice. MLflow 3.17's chat
    model decodes every answer with ``clean_up_tokenization_spaces=True`` hard-coded
    (``mlflow/transformers/llm_inference_utils.py``), whatever the saved tokenizer says (tuneflow saves False);
    transformers 5 ignores it for a BPE tokenizer (the answer is decoded correctly) and says so once per process:
    a notice a user cannot act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Ignoring clean_up_tokenization_spaces=True for BPE tokenizer")


def quiet_bpe_cleanup_notice() -> None:
    """Install ``_BpeCleanupNotice`` on transformers' tokenizer logger (once)."""
    logger = logging.getLogger("transformers.tokenization_utils_tokenizers")
    if not any(isinstance(f, _BpeCleanupNotice) for f in logger.filters):
        logger.addFilter(_BpeCleanupNotice())


def configure_environment() -> None:
    """Apply the defaults above without overriding anything the user set; library logs at INFO."""
    quiet_bpe_cleanup_notice()
    for key, value in OFFLINE_AND_QUIET.items():
        os.environ.setdefault(key, value)
    api = os.environ.get("PREFECT_API_URL", "")
    if api and redact_url(api) != api and not os.environ.get("PREFECT_UI_URL"):
        # Prefect prints "View at <UI URL>" for every run, derived from the API URL: credentials and all
        os.environ["PREFECT_UI_URL"] = redact_url(api).rstrip("/").removesuffix("/api")
    library = logging.getLogger("tuneflow")
    if library.level == logging.NOTSET:  # Prefect's root level is WARNING: gate verdicts would be dropped
        library.setLevel(logging.INFO)


def cache_dir() -> Path:
    """Where derived data (tokenized splits, checkpoints) lives: ``$TUNEFLOW_CACHE_DIR`` or ``.cache/tuneflow``."""
    return Path(os.environ.get("TUNEFLOW_CACHE_DIR", Path.cwd() / ".cache" / "tuneflow")).resolve()


_SECRET_QUERY_KEY = re.compile(r"token|key|secret|passw|pwd|sig|auth|credential", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` without credentials: no ``user:password@`` and no value of a secret-looking query parameter
    (token, key, secret, password, signature, auth). What tuneflow prints, logs, tags or puts in an artifact."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.netloc and not parts.query:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_QUERY_KEY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
