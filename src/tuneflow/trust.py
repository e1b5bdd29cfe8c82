"""What tuneflow loads from the registry: registered versions are data to check, never code to run.

``mlflow.pyfunc.load_model`` runs whatever loader or cloudpickle a version's MLmodel names, and
``mlflow.transformers.load_model`` turns on ``trust_remote_code`` for a model class transformers does not
have: anyone who can write to the registry could make every worker that re-scores the champion, compares,
promotes or predicts execute code. So before loading, a version is downloaded once into a local folder
and checked there (the same bytes are then loaded from that folder, so nothing can change in between):

- produced by tuneflow: the tags ``register_version`` sets on every version (``tuneflow.decision``,
  ``tuneflow.max_length``; ``tuneflow.kind`` a known kind). Tags can be copied, so this only turns away
  what tuneflow never registered; the checks below are what make a load safe;
- the MLmodel (read with ``yaml.safe_load``): exactly the ``transformers`` and ``python_function``
  flavors, loader ``mlflow.transformers``, no code paths, the kind's task and pipeline, a model class from
  transformers' own architectures for that task, a tokenizer class transformers has;
- files: weights as ``.safetensors`` only, and only plain data files besides (JSON, text, Jinja
  templates, YAML at the top); no pickles, no Python, no ``code/``;
- configs: no ``auto_map`` (remote code) anywhere in the model's or the tokenizer's JSON files.

Anything else raises ``UntrustedModel`` naming the version, the finding and the fix.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneflow.registry import KIND_TAG, TAG, RegistryError, kind_of

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

# Per kind: the MLflow task, the transformers pipeline, and the auto-mapping whose classes are allowed.
EXPECTED = {
    "classification": ("text-classification", "TextClassificationPipeline", "MODEL_FOR_SEQUENCE_CLASSIFICATION"),
    "sft": ("text-generation", "TextGenerationPipeline", "MODEL_FOR_CAUSAL_LM"),
}
TOP_LEVEL_FILES = {
    "MLmodel",
    "conda.yaml",
    "python_env.yaml",
    "requirements.txt",
    "LICENSE.txt",
    "input_example.json",
    "serving_input_example.json",
    "model_card.md",
    "model_card_data.yaml",
    "registered_model_meta",  # written by MLflow's client when it downloads a models:/ URI
}
DATA_SUFFIXES = {".json", ".safetensors", ".txt", ".jinja", ".model", ".md"}  # .model: a sentencepiece vocabulary
LINEAGE_TAGS = (f"{TAG}decision", f"{TAG}max_length")  # set by register_version on every version


class UntrustedModel(RegistryError):
    """A registered version failed the checks that make it safe to load; nothing of it was loaded."""


def _architectures(mapping: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    return set(getattr(modeling_auto, f"{mapping}_MAPPING_NAMES").values())


def _has_key(obj: Any, key: str) -> bool:
    if isinstance(obj, dict):
        return key in obj or any(_has_key(v, key) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_key(v, key) for v in obj)
    return False


def check_folder(folder: Path, kind: str, where: str) -> None:
    """Check a downloaded model folder (see the module's docstring); raises ``UntrustedModel``."""
    import yaml

    def refuse(finding: str) -> UntrustedModel:
        return UntrustedModel(
            f"refusing to load {where}: {finding}. tuneflow loads only what it registered itself (transformers "
            "weights as safetensors, no code). Fix: retrain with 'tuneflow run', or move the alias back with "
            "'tuneflow rollback'; do not load this version elsewhere either"
        )

    task, pipeline, mapping = EXPECTED[kind]
    if not (folder / "MLmodel").is_file():
        raise refuse("it has no MLmodel at its top: not a model that tuneflow registered")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_symlink():
            raise refuse(f"{rel} is a symbolic link")
        if path.is_dir():
            continue
        if len(rel.parts) == 1:
            if rel.name not in TOP_LEVEL_FILES:
                raise refuse(f"unexpected file {rel} (a pickled model or code?)")
        elif rel.parts[0] not in ("model", "components") or path.suffix not in DATA_SUFFIXES:
            raise refuse(
                f"unexpected file {rel}: weights must be .safetensors and nothing else may be code or a pickle"
            )
    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise refuse(f"its MLmodel cannot be read ({exc})") from exc
    flavors = (mlmodel or {}).get("flavors") or {}
    if set(flavors) != {"python_function", "transformers"}:
        raise refuse(f"its flavors are {sorted(flavors)}, not transformers + python_function")
    pyfunc, tf = flavors["python_function"], flavors["transformers"]
    if pyfunc.get("loader_module") != "mlflow.transformers" or pyfunc.get("code") or "python_model" in pyfunc:
        raise refuse(f"its python_function flavor loads {pyfunc.get('loader_module')!r} with custom code")
    if tf.get("code"):
        raise refuse("its transformers flavor ships code")
    if tf.get("task") not in (task, "llm/v1/chat" if kind == "sft" else task) or tf.get("instance_type") != pipeline:
        raise refuse(f"task {tf.get('task')!r} / pipeline {tf.get('instance_type')!r}, not {task!r} / {pipeline!r}")
    allowed = _architectures(mapping)
    if tf.get("pipeline_model_type") not in allowed:
        raise refuse(f"model class {tf.get('pipeline_model_type')!r} is not a transformers architecture for {task}")
    import transformers

    tokenizer_type = tf.get("tokenizer_type")
    if tokenizer_type is not None and not hasattr(transformers, str(tokenizer_type)):
        raise refuse(f"tokenizer class {tokenizer_type!r} is not one transformers has")
    weights = [p for p in (folder / "model").rglob("*") if p.is_file() and p.suffix == ".safetensors"]
    if not weights:
        raise refuse("it has no .safetensors weights under model/")
    parsed: dict[Path, Any] = {}
    for path in sorted(p for p in folder.rglob("*.json") if p.is_file()):
        rel = path.relative_to(folder)
        try:
            parsed[rel] = data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise refuse(f"{rel} is not valid JSON") from exc
        if _has_key(data, "auto_map"):
            raise refuse(f"{rel} has an auto_map (code from outside transformers)")
        if _has_key(data, "trust_remote_code"):
            raise refuse(f"{rel} asks for trust_remote_code")
    config = parsed.get(Path("model", "config.json"))
    if not isinstance(config, dict):
        raise refuse("it has no model/config.json")
    archs = set(config.get("architectures") or [])
    if not archs or not archs <= allowed:
        raise refuse(f"model/config.json names architectures {sorted(archs)}, not transformers ones for {task}")


def check_lineage(mv: ModelVersion) -> None:
    tags = mv.tags or {}
    missing = [t for t in LINEAGE_TAGS if not tags.get(t)]
    kind = kind_of(mv)
    if missing or kind not in EXPECTED:
        finding = f"no {', '.join(missing)} tag" if missing else f"unknown kind {tags.get(KIND_TAG)!r}"
        raise UntrustedModel(
            f"refusing to load {mv.name} v{mv.version}: it was not registered by tuneflow ({finding}). Fix: "
            "retrain with 'tuneflow run', or move the alias back with 'tuneflow rollback'"
        )


@contextmanager
def checked_version(mv: ModelVersion) -> Iterator[Path]:
    """Download ``mv`` into a temporary folder, check it, and yield the folder to load it from (deleted after).

    Raises:
        UntrustedModel: the version is not one tuneflow registered, or carries code or pickles.
    """
    import mlflow

    check_lineage(mv)
    tmp = Path(tempfile.mkdtemp(prefix="tuneflow-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}", dst_path=str(tmp)))
        check_folder(local, kind_of(mv), f"{mv.name} v{mv.version}")
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
