"""Prefect tasks, one per stage: each wraps one library call (``tuneflow.*``) with Prefect policy only.

Task name, cache policy, retries (only on I/O that can fail transiently), the run logger, the stage's
nested MLflow run and its Prefect artifact. Installed as ``tuneflow.tasks``.
"""
