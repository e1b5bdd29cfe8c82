"""Prefect flows: they sequence the stages in ``tasks/`` and hold the orchestration policy."""
