"""Shared fixtures: offline switches, a tiny random BERT with a tokenizer trained here, generated data,
a temporary MLflow store, and Prefect's test harness. No network, no mocks of MLflow or Prefect."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

from tuneflow.runtime import configure_environment

configure_environment()  # the test session is an entry point: offline + telemetry off before any import

# Prefect configures logging, binding its console handler to the current sys.stderr, when prefect.main
# is first imported (`from prefect import flow`). The library no longer imports Prefect, so without this
# that would happen inside a test using capsys, whose stream is closed after the test: every later flow
# run then fails with "I/O operation on closed file".
import prefect.main  # noqa: E402, F401

HAM_WORDS = "lunch later home tonight dinner movie call back soon thanks meeting class love sleep".split()
SPAM_WORDS = "winner prize claim free cash urgent txt offer ringtone awarded guaranteed voucher".split()
SHARED_WORDS = "you the to and a is now for your this".split()


def make_rows(n_per_class: int, seed: int = 0) -> pd.DataFrame:
    """Separable two-class data: each text mixes class words with shared words; all texts distinct."""
    rng = random.Random(seed)
    rows = []
    for label, words in (("ham", HAM_WORDS), ("spam", SPAM_WORDS)):
        seen: set[str] = set()
        while len(seen) < n_per_class:
            k = rng.randint(4, 12)
            text = " ".join(rng.choice(words if rng.random() < 0.6 else SHARED_WORDS) for _ in range(k))
            text = f"{text} {len(seen)}"
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with a WordLevel tokenizer trained on the generated vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    corpus = [" ".join(HAM_WORDS + SPAM_WORDS + SHARED_WORDS)] + [str(i) for i in range(2000)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(out)
    cfg = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(out)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder: the MLflow store (mlruns/) and caches (.cache/) land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TUNEFLOW_CACHE_DIR", raising=False)
    from tuneflow.tracking import configure_tracking, ensure_experiment

    configure_tracking(tmp_path)
    ensure_experiment("tests")  # also replaces MLflow's process-wide active experiment of an earlier test
    return tmp_path


@pytest.fixture
def data_csv(workdir) -> Path:
    path = workdir / "data.csv"
    make_rows(150).to_csv(path, index=False)
    return path


def tiny_config_dict(data_path: Path, model_dir: Path, **sections) -> dict:
    base = {
        "name": "tiny",
        "data": {"path": str(data_path), "labels": ["ham", "spam"], "eval_fraction": 0.25},
        "validation": {"min_rows_per_class": 10, "max_text_chars": 500},
        "model": {"base_model": str(model_dir), "max_length": 32},
        "train": {
            "epochs": 4,
            "batch_size": 16,
            "learning_rate": 5e-3,
            "early_stopping_patience": 0,
            "bf16": False,
            "logging_steps": 5,
            "threads": 1,
        },
        "registry": {"model_name": "tiny-clf"},
        # the gate judges a file once unchanged this long: tests write their batches whole, then run it at once
        "watch": {"quiet_seconds": 0.2},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return base


def tiny_training_setup(tiny_model_dir: Path, tmp_path: Path, **train):
    """(config, tokenizer, tokenized train/eval datasets) of 240 generated rows for the tiny model, with ``train``
    settings over tiny_config_dict's: what a training test needs without the flow."""
    from transformers import AutoTokenizer

    from tuneflow.config import PipelineConfig
    from tuneflow.data import content_digest, split_by_text_hash
    from tuneflow.tokenization import tokenize_split

    frame = make_rows(120).assign(line=range(2, 242))
    cfg = PipelineConfig.model_validate(tiny_config_dict(tmp_path / "unused.csv", tiny_model_dir, train=train))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    sp = split_by_text_hash(frame, 0.25, "s")
    data = tokenize_split(sp, tok, 32, cfg.data.labels, content_digest(frame), "x", tmp_path / "tok").datasets
    return cfg, tok, data


@pytest.fixture
def tiny_config(data_csv, tiny_model_dir):
    from tuneflow.config import PipelineConfig

    return PipelineConfig.model_validate(tiny_config_dict(data_csv, tiny_model_dir))


def tiny_registry_config(model_name: str, tiny_model_dir: Path):
    """A config for registering the tiny model as ``model_name`` (its data file is never read)."""
    from tuneflow.config import PipelineConfig

    return PipelineConfig.model_validate(
        {
            "name": model_name.removesuffix("-clf"),
            "data": {"path": "x.csv", "labels": ["ham", "spam"]},
            "model": {"base_model": str(tiny_model_dir), "max_length": 32},
            "registry": {"model_name": model_name},
        }
    )


@pytest.fixture
def register_tiny(workdir, tiny_model_dir):
    """``register_tiny(cfg_or_name, decision, tags=None, card="card", example=("hi",))``: the retrain's last steps.

    Logs the tiny (untrained) model into a new MLflow run, registers it with ``tags`` and ``card`` (alias
    ``challenger``) and, when ``decision.promote``, moves ``champion`` to it as the gate does. Returns the
    registered ``ModelVersion`` as it is after the move.
    """
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    from tuneflow.history import promote_by_gate
    from tuneflow.kinds.classification import load_base_model
    from tuneflow.registry import register_version

    cache = {}

    def register(cfg_or_name, decision, tags: dict | None = None, card: str = "card", example=("hi",)):
        cfg = tiny_registry_config(cfg_or_name, tiny_model_dir) if isinstance(cfg_or_name, str) else cfg_or_name
        if not cache:
            cache["model"] = load_base_model(cfg.model, ["ham", "spam"])
            cache["tokenizer"] = AutoTokenizer.from_pretrained(str(tiny_model_dir))
        with mlflow.start_run() as run:
            mv = register_version(
                cache["model"], cache["tokenizer"], cfg, decision, dict(tags or {}), card, list(example)
            )
        if decision.promote:
            actor = (tags or {}).get("tuneflow.prefect_flow_run_id") or f"run {run.info.run_id}"
            promote_by_gate(cfg.registry.model_name, str(mv.version), decision, actor)
        return MlflowClient().get_model_version(cfg.registry.model_name, mv.version)

    return register


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
