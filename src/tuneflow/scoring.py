"""Scoring a registered version on an eval split, with the code that scores a new model: the promotion gate's
champion score, ``tuneflow compare`` and monitoring. Apart from the registry's I/O (``tuneflow.registry``) because
loading a version goes through the trust check (``tuneflow.trust``), which itself reads registry names."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tuneflow.config import PipelineConfig
from tuneflow.evaluate import Evaluation
from tuneflow.kinds import get_kind
from tuneflow.registry import ChampionScore, current_champion
from tuneflow.registry_base import MAX_LENGTH_TAG, kind_of
from tuneflow.trust import checked_version

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)


def score_version(cfg: PipelineConfig, mv: ModelVersion, eval_frame: pd.DataFrame) -> Evaluation:
    """Load a registered version offline and score it with the code that scores a new model.

    The version's own ``max_length`` (its tag) is used, so it is scored as it was trained.
    """
    import mlflow

    max_length = int((mv.tags or {}).get(MAX_LENGTH_TAG, cfg.model.max_length))
    with checked_version(mv) as local:  # refuses versions that carry code or pickles, before loading anything
        parts = mlflow.transformers.load_model(str(local), return_type="components")
        return get_kind(kind_of(mv)).evaluate(parts["model"], parts["tokenizer"], eval_frame, cfg, max_length)


def score_champion(cfg: PipelineConfig, eval_frame: pd.DataFrame) -> ChampionScore:
    """Re-score the current champion on ``eval_frame``, so the decision compares like with like."""
    champ = current_champion(cfg.registry.model_name)
    if champ is None:
        return ChampionScore(None, None, None)
    from mlflow.exceptions import MlflowException
    from safetensors import SafetensorError

    try:
        return ChampionScore(str(champ.version), score_version(cfg, champ, eval_frame), None)
    except (ValueError, OSError) as exc:  # labels it lacks; UntrustedModel (a ValueError)
        log.warning("champion v%s could not be scored on this eval split: %s", champ.version, exc)
        return ChampionScore(str(champ.version), None, str(exc))
    except (MlflowException, RuntimeError, SafetensorError) as exc:
        # artifacts garbage-collected or half-copied, the store unreachable: the new model was trained and is
        # registered all the same; with nothing to compare it with, it is not promoted (as an untrusted champion)
        error = f"it could not be loaded: {type(exc).__name__}: {exc}"
        log.warning(
            "champion v%s of %s %s. The new version is registered but NOT promoted; check the artifact store, "
            "then compare and promote by hand (tuneflow compare / promote)",
            champ.version,
            cfg.registry.model_name,
            error,
        )
        return ChampionScore(str(champ.version), None, error)
