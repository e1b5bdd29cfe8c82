"""tuneflow: retrain language models as a reviewable, scheduled pipeline."""

__version__ = "0.1.0"
