"""Prefect flows: they sequence the stages (``tuneflow.tasks``) and hold the decisions.

Installed as ``tuneflow.flows``.
"""
