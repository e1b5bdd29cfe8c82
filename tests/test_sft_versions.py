"""Kind sft versions that fit a registry (issue 22): merged weights in bf16, adapter-only versions pinned to their
base, generation settings logged with the model, the looping share, the base model's answers beside the
fine-tune's, and no tokenizer notice on reload. Tiny Llama, real MLflow store, real PEFT, no mocks."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from sft_fixtures import build_tiny_llama, sft_config, sft_frame
from tuneflow.config import PipelineConfig
from tuneflow.data import read_table, sft_settings, split_data
from tuneflow.kinds import get_kind
from tuneflow.kinds.sft import base_generations, generate, loops
from tuneflow.models import load_tokenizer
from tuneflow.predict import score_path
from tuneflow.registry import decide, register_version
from tuneflow.registry_base import UntrustedModel
from tuneflow.scoring import score_version

from servers import free_port, stop_group, wait_until_up

PROMPTS = ["What is your name? (3)", "Where do you live? (1)", "Tell me a joke. (5)", "Good morning! (2)"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def sft_data(workdir) -> Path:
    path = workdir / "pairs.csv"
    sft_frame(96).to_csv(path, index=False)
    return path


def _cfg(base: Path, data: Path, **overrides) -> PipelineConfig:
    return PipelineConfig.model_validate(sft_config(base, data, **{"sft.max_steps": 6, **overrides}))


def _train(cfg: PipelineConfig, where: Path):
    kind = get_kind("sft")
    tok = kind.prepare_tokenizer(load_tokenizer(cfg.model), cfg)
    split = split_data(read_table(cfg.data, sft=sft_settings(cfg)), cfg.data)
    result = kind.train(cfg, tok, kind.encode(split, tok, cfg.model.max_length, []), where)
    return kind, tok, split, result


def _register(cfg: PipelineConfig, result, tok, card: str = "card"):
    with mlflow.start_run():
        return register_version(result.model, tok, cfg, decide("eval_loss", 1.0, None, None, 0.0), {}, card, PROMPTS)


def _scored(cfg: PipelineConfig, ref: str, workdir: Path) -> list[str]:
    inputs = workdir / "prompts.csv"
    pd.DataFrame({"prompt": PROMPTS}).to_csv(inputs, index=False)
    score_path(ref, inputs, workdir / "scored.csv", text_column="prompt", batch_size=8)
    return list(pd.read_csv(workdir / "scored.csv")["generation"].fillna(""))


def _local(mv, workdir: Path, name: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}", dst_path=str(workdir / name)))


@pytest.mark.parametrize(
    ("answer", "looping"),
    [
        ("I'm going to Japan for a couple of weeks. I'm going to Japan for a couple of weeks.", True),
        ("I'm going to Japan. I'm going to Japan. I'm going to", True),  # cut mid-loop by max_new_tokens
        ("I am fine and you are fine and we are fine, we are fine and they are fine", False),  # 4-gram only twice
        ("yes yes yes yes yes yes", True),  # no sentence punctuation: the 4-word run 'yes yes yes yes' x3
        ("Good morning. Good morning.", False),  # a repeated sentence of two words is a greeting, not a loop
        ("I like music. I like music a lot.", False),  # the sentences differ
        ("My name is Tiny. What is your name?", False),
        ("", False),
    ],
)
def test_what_counts_as_a_looping_answer(answer, looping):
    assert loops(answer) is looping


def test_bf16_merged_version_is_half_the_size_and_reloads_with_the_same_greedy_output(tiny_llama, sft_data, workdir):
    import torch
    import transformers

    cfg = _cfg(tiny_llama, sft_data, **{"sft.max_steps": 30})  # answers of words, not stray bytes
    assert cfg.registry.sft_dtype == "bfloat16" and cfg.registry.sft_weights == "merged"
    kind, tok, split, result = _train(cfg, workdir / "ckpt")
    assert result.model.dtype == torch.bfloat16 and not hasattr(result.model, "peft_config")
    expected, _ = generate(result.model, tok, PROMPTS, max_new_tokens=8, settings=cfg.sft.generation)
    mv = _register(cfg, result, tok)
    local = _local(mv, workdir, "dl")
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    tf = mlmodel["flavors"]["transformers"]
    assert tf["torch_dtype"] == "torch.bfloat16"
    # the generation settings travel with the model (the served chat model uses them)
    assert mlmodel["flavors"]["python_function"]["config"] == {"max_new_tokens": 8, "do_sample": False}
    fp32_bytes = sum(p.numel() * 4 for p in result.model.parameters())
    weights = sum(f.stat().st_size for f in (local / "model").glob("*.safetensors"))
    assert weights < 0.55 * fp32_bytes  # bf16: half of float32, plus the safetensors header
    # the tokenizer is written compact (transformers pretty-prints it: twice the bytes in every version)
    (tok_file,) = local.rglob("tokenizer.json")
    text = tok_file.read_text()
    tok.save_pretrained(workdir / "as-transformers-writes-it")
    pretty = (workdir / "as-transformers-writes-it" / "tokenizer.json").read_text()
    assert "\n" not in text.strip() and json.loads(text) == json.loads(pretty) and len(text) < 0.8 * len(pretty)
    assert "_save_pretrained" not in vars(tok)  # the tokenizer object is left as it was

    # the registered weights, loaded as MLflow loads them, give the in-memory model's tokens
    parts = mlflow.transformers.load_model(str(local), return_type="components")
    assert parts["model"].dtype == torch.bfloat16
    assert generate(parts["model"], tok, PROMPTS, max_new_tokens=8)[0] == expected
    # ... and the same eval loss, to the last digit: the champion is re-scored from its registered weights, the
    # challenger in memory (the rotary frequencies, not saved, were cast to bf16 in memory only: 5.67342 vs 5.67349)
    scored = [kind.evaluate(m, tok, split.eval, cfg, 64).metrics["eval_loss"] for m in (result.model, parts["model"])]
    assert scored[0] == scored[1], scored

    # offline reload through the trust check and pyfunc (tuneflow predict), and no tokenizer notice on the way.
    # transformers says it once per process: forget that it did, so the reload would say it again.
    notices = _Collect()
    logger = logging.getLogger("transformers.tokenization_utils_tokenizers")
    logger.addHandler(notices)
    try:
        transformers.utils.logging.logging.Logger.warning_once.cache_clear()
        assert _scored(cfg, "tiny-sft@challenger", workdir) == expected
        assert not [m for m in notices.messages if "clean_up_tokenization_spaces" in m]
        # ... and the notice is what transformers would print without tuneflow's filter (the check above can fail)
        filters = list(logger.filters)
        for f in filters:
            logger.removeFilter(f)
        try:
            transformers.utils.logging.logging.Logger.warning_once.cache_clear()
            _scored(cfg, "tiny-sft@challenger", workdir)
        finally:
            for f in filters:
                logger.addFilter(f)
        assert any("Ignoring clean_up_tokenization_spaces=True for BPE" in m for m in notices.messages)
    finally:
        logger.removeHandler(notices)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_adapter_version_is_small_reloads_offline_and_is_refused_against_another_base(
    tiny_llama, sft_data, workdir, tmp_path
):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    cfg = _cfg(base, sft_data, **{"registry.sft_weights": "adapter", "sft.max_steps": 30})
    kind, tok, split, result = _train(cfg, workdir / "ckpt")
    assert hasattr(result.model, "peft_config")  # evaluated as registered: the adapter on the base
    evaluation = kind.evaluate(result.model, tok, split.eval, cfg, 64)
    expected, _ = generate(result.model, tok, PROMPTS, max_new_tokens=8, settings=cfg.sft.generation)
    mv = _register(cfg, result, tok)
    local = _local(mv, workdir, "dl")
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["transformers"]["local_base_model_path"] == str(base.resolve())
    assert mlmodel["metadata"]["tuneflow_base"]["model"] == str(base)
    assert not (local / "model").exists()  # no base weights in the version
    adapter = local / "peft" / "adapter_model.safetensors"
    lora = [p for n, p in result.model.named_parameters() if "lora_" in n]
    assert adapter.stat().st_size < sum(p.numel() * 2 for p in lora) + 20_000  # bf16 adapter + header
    assert all(t.dtype.itemsize == 2 for t in load_file(adapter).values())
    assert "peft==" in (local / "requirements.txt").read_text()
    assert result.extra["registered_weight_bytes"] == sum(p.numel() * 2 for p in lora)

    # offline through the trust check and pyfunc (tuneflow predict): the in-memory model's greedy answers
    assert _scored(cfg, "tiny-sft@challenger", workdir) == expected
    # the champion re-scoring path loads it too (base + adapter) and scores it as the new model was scored
    again = score_version(cfg, mv, split.eval)
    assert again.metrics["eval_loss"] == pytest.approx(evaluation.metrics["eval_loss"], rel=1e-4)

    # another base in the pinned folder (one weight changed): refused before anything loads
    weights = load_file(base / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UntrustedModel, match="not the one this adapter was trained on"):
        _scored(cfg, "tiny-sft@challenger", workdir)
    with pytest.raises(UntrustedModel, match="not the one this adapter was trained on"):
        score_version(cfg, mv, split.eval)
    shutil.rmtree(base)  # no base at all: refused, and the message says where it was expected
    with pytest.raises(UntrustedModel, match="is not on this machine"):
        _scored(cfg, "tiny-sft@challenger", workdir)


def test_adapter_version_trust_refusals(tiny_llama, sft_data, workdir, tmp_path):
    """The adapter keys pass only as tuneflow writes them: with a pin, in a kind that has adapters, on a clean base."""
    from tuneflow.trust import check_folder

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    cfg = _cfg(base, sft_data, **{"registry.sft_weights": "adapter", "sft.max_steps": 1})
    _, tok, _, result = _train(cfg, workdir / "ckpt")
    local = _local(_register(cfg, result, tok), workdir, "dl")
    check_folder(local, "sft", "v1")  # as registered: accepted

    def edited(change) -> Path:
        folder = workdir / f"copy-{len(list(workdir.glob('copy-*')))}"
        shutil.copytree(local, folder)
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
        change(mlmodel, folder)
        (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
        return folder

    def drop_pin(m, _):
        del m["metadata"]["tuneflow_base"]

    def bad_digest(m, _):
        m["metadata"]["tuneflow_base"]["digest"] = "0" * 64

    def relative_base(m, _):
        m["flavors"]["transformers"]["local_base_model_path"] = "base"
        m["flavors"]["transformers"]["source_model_name"] = "base"

    def extra_pin_key(m, _):
        m["metadata"]["tuneflow_base"]["revision"] = "main"

    def pickled_adapter(m, folder):
        (folder / "peft" / "adapter_model.bin").write_bytes(b"pickle")

    def adapter_config(**values):
        def change(_, folder):
            path = folder / "peft" / "adapter_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **values}))

        return change

    for change, finding in (
        (adapter_config(megatron_config={"x": 1}, megatron_core="os"), "megatron"),
        (adapter_config(init_lora_weights="pissa"), "init_lora_weights"),
        (adapter_config(peft_type="PROMPT_TUNING"), "LoRA adapters for CAUSAL_LM only"),
        (drop_pin, "unexpected file peft/|local_base_model_path is not one tuneflow writes"),
        (bad_digest, "not the one this adapter was trained on"),
        (relative_base, "absolute path"),
        (extra_pin_key, "MLmodel key metadata"),
        (pickled_adapter, "adapter_model.bin"),
    ):
        with pytest.raises(UntrustedModel, match=finding):
            check_folder(edited(change), "sft", "crafted")
    # a kind without adapters (classification) refuses the adapter keys even with a pin
    with pytest.raises(UntrustedModel, match="unexpected file peft/"):
        check_folder(local, "classification", "crafted")
    # code in the base folder: refused although the version itself is clean
    (base / "modeling_evil.py").write_text("raise SystemExit")
    with pytest.raises(UntrustedModel, match="modeling_evil.py"):
        check_folder(local, "sft", "v1")


def test_base_generations_are_cached_once_per_base_prompts_and_settings(tiny_llama, sft_data, workdir, caplog):
    cfg = _cfg(tiny_llama, sft_data)
    kind = get_kind("sft")
    tok = kind.prepare_tokenizer(load_tokenizer(cfg.model), cfg)
    caplog.set_level(logging.INFO, "tuneflow")
    first, _, hit = base_generations(cfg, tok, PROMPTS[:2], [None, None])
    assert not hit and first == generate(kind.load_model(cfg), tok, PROMPTS[:2], max_new_tokens=8)[0]
    again, _, hit = base_generations(cfg, tok, PROMPTS[:2], [None, None])
    assert hit and again == first
    other = cfg.model_copy(deep=True)
    other.sft.generation.repetition_penalty = 1.3  # other settings: other answers, another cache entry
    assert base_generations(other, tok, PROMPTS[:2], [None, None])[2] is False
    assert base_generations(cfg, tok, PROMPTS[:3], [None] * 3)[2] is False  # other prompts
    assert len(list((workdir / ".cache" / "tuneflow" / "base-generations").glob("*.json"))) == 3


def test_eval_table_has_the_looping_share_and_the_base_models_answers(tiny_llama, sft_data, workdir):
    from tuneflow.reporting import samples_markdown

    cfg = _cfg(tiny_llama, sft_data)
    kind, tok, split, result = _train(cfg, workdir / "ckpt")
    new = kind.evaluate(result.model, tok, split.eval, cfg, 64, new_model=True)
    s = new.samples
    assert {"loops", "base_generation", "base_chrf", "base_loops"} <= set(s.columns)
    assert new.metrics["looping_share"] == pytest.approx(s["loops"].mean())
    assert new.metrics["base_looping_share"] == pytest.approx(s["base_loops"].mean())
    assert list(s["loops"]) == [loops(a) for a in s["generation"]]
    base_answers = generate(kind.load_model(cfg), tok, list(s["prompt"]), max_new_tokens=8)[0]
    assert list(s["base_generation"]) == base_answers
    table = samples_markdown(s)
    assert "| base model's generation | base chrF |" in table and "| loops |" in table
    champion = kind.evaluate(result.model, tok, split.eval, cfg, 64)  # re-scoring a champion: no base columns
    assert "base_generation" not in champion.samples.columns and "looping_share" in champion.metrics


def test_adapter_weights_need_lora(tiny_llama, sft_data):
    with pytest.raises(ValueError, match="no adapter to register"):
        _cfg(tiny_llama, sft_data, **{"registry.sft_weights": "adapter", "sft.lora.enabled": False})


def test_serve_model_serves_an_adapter_version(tiny_llama, sft_data, workdir, tmp_path):
    """`tuneflow serve-model NAME@champion` on an adapter-only version: MLflow's scoring server on loopback."""
    import urllib.request

    from tuneflow.history import promote_by_gate

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    cfg = _cfg(base, sft_data, **{"registry.sft_weights": "adapter", "sft.max_steps": 2})
    _, tok, _, result = _train(cfg, workdir / "ckpt")
    expected, _ = generate(result.model, tok, PROMPTS[:1], max_new_tokens=8)
    mv = _register(cfg, result, tok)
    promote_by_gate("tiny-sft", str(mv.version), decide("eval_loss", 1.0, None, None, 0.0), "test")
    port = free_port()
    log = (workdir / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneflow", "serve-model", "tiny-sft@champion", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=workdir,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, workdir / "serve.log", timeout_s=300)
        body = json.dumps({"messages": [{"role": "user", "content": PROMPTS[0]}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        row = answer[0] if isinstance(answer, list) else answer
        row = row.get("predictions", row) if isinstance(row, dict) else row
        row = row[0] if isinstance(row, list) else row
        assert row["choices"][0]["message"]["content"].strip() == expected[0]
    finally:
        stop_group(proc)
        log.close()


def test_repetition_controls_are_logged_and_the_served_model_applies_them(tiny_llama, sft_data, workdir):
    settings = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}
    cfg = _cfg(tiny_llama, sft_data, **{"sft.max_steps": 60, "sft.generation": settings})
    _, tok, _, result = _train(cfg, workdir / "ckpt")
    expected, _ = generate(result.model, tok, PROMPTS, max_new_tokens=8, settings=cfg.sft.generation)
    assert expected != generate(result.model, tok, PROMPTS, max_new_tokens=8)[0]  # the settings change answers
    mv = _register(cfg, result, tok)
    local = _local(mv, workdir, "dl")
    config = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert config["config"] == {"max_new_tokens": 8, "do_sample": False, **settings}  # the served model's settings
    # The served chat model passes them to generate: the pipeline MLflow builds from the version, given its config,
    # returns the tokens evaluation generated. (Compared by tokens: this tiny model writes stray bytes, and MLflow
    # cuts the prompt off the decoded text by character count, which a stray byte's U+FFFD shifts.)
    pipe = mlflow.transformers.load_model(str(local))
    chat = [{"role": "user", "content": PROMPTS[1]}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    out = pipe(text, return_tensors=True, add_special_tokens=False, **config["config"])[0]["generated_token_ids"]
    prompt_n = len(tok(text, add_special_tokens=False)["input_ids"])
    answer = list(out[prompt_n:])
    answer = answer[: answer.index(tok.eos_token_id)] if tok.eos_token_id in answer else answer
    assert tok.decode(answer, skip_special_tokens=True).strip() == expected[1]


def test_sampling_settings_are_logged_only_when_sampling_and_pass_the_trust_types(tiny_llama, sft_data):
    from tuneflow.trust import EXPECTED

    kind = get_kind("sft")
    greedy = kind.logging_options(_cfg(tiny_llama, sft_data))["model_config"]
    assert greedy == {"max_new_tokens": 8, "do_sample": False}
    sampled = kind.logging_options(
        _cfg(tiny_llama, sft_data, **{"sft.generation": {"do_sample": True, "temperature": 0.7, "top_p": 0.9}})
    )["model_config"]
    assert sampled == {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50}
    types = EXPECTED["sft"].config
    assert all(type(v) is types[k] for k, v in sampled.items())
    with pytest.raises(ValueError, match="repetition_penalty"):
        _cfg(tiny_llama, sft_data, **{"sft.generation": {"repetition_penalty": 0.5}})


def test_sft_compile_trains_compiled_with_the_same_loss_and_leaves_the_model_plain(tiny_llama, sft_data, workdir):
    """``sft.compile``: the decoder stack runs compiled at every training step (seen from a callback), the training
    loss equals eager training's from the same seed (fp32: only the float order differs), and what comes back for
    evaluation and registration is the plain, uncompiled module."""
    import torch
    from transformers import TrainerCallback

    compiled_at_step: list[bool] = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            compiled_at_step.append(model.get_base_model().base_model._compiled_call_impl is not None)

    fp32 = {"train.bf16": False, "registry.sft_dtype": "float32", "sft.max_steps": 3, "train.logging_steps": 1}
    cfg = _cfg(tiny_llama, sft_data, **fp32)
    kind = get_kind("sft")
    tok = kind.prepare_tokenizer(load_tokenizer(cfg.model), cfg)
    data = kind.encode(split_data(read_table(cfg.data, sft=sft_settings(cfg)), cfg.data), tok, cfg.model.max_length, [])
    runs = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        probe = (Probe(),) if compile_ else ()
        run_cfg = _cfg(tiny_llama, sft_data, **fp32, **{"sft.compile": compile_})
        runs[name] = kind.train(run_cfg, tok, data, workdir / name, probe)
    assert compiled_at_step == [True, True, True]
    eager, compiled = runs["eager"].model, runs["compiled"].model
    assert compiled.model._compiled_call_impl is None  # merged and handed on uncompiled
    losses = {name: [e["loss"] for e in run.log_history if "loss" in e] for name, run in runs.items()}
    assert len(losses["eager"]) == 3, runs["eager"].log_history
    # the same data and seed: compiling reorders float operations and nothing else (a few 1e-6 of the loss)
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    trained = [k for k in eager.state_dict() if "proj" in k]
    base = kind.load_model(cfg).state_dict()
    assert any(not torch.equal(compiled.state_dict()[k], base[k]) for k in trained)  # the steps changed weights
    answers, _ = generate(compiled, tok, PROMPTS, max_new_tokens=8)  # plain module: generation does not recompile
    assert len(answers) == len(PROMPTS)


def test_the_eval_loss_during_training_is_the_response_loss_the_evaluate_stage_scores(tiny_llama, sft_data, workdir):
    """``sft.eval_steps``: the eval loss logged during training (what ``tuneflow tune`` prunes on) is the mean over
    every response token of the eval split, as ``response_loss`` computes it afterwards, not transformers' mean of
    each batch's mean (uneven batches: eval_batch_size 5 over the eval rows). Measured: equal to 1e-7; transformers'
    own mean gave 5.84299 against 5.84565 here (4.5e-4 apart)."""
    from tuneflow.kinds.sft import response_loss

    fp32 = {"train.bf16": False, "registry.sft_dtype": "float32", "sft.max_steps": 6, "sft.eval_steps": 6}
    cfg = _cfg(tiny_llama, sft_data, **fp32, **{"train.eval_batch_size": 5})
    kind, tok, split, result = _train(cfg, workdir / "ckpt")
    logged = [e["eval_loss"] for e in result.log_history if "eval_loss" in e]
    assert len(logged) == 1, result.log_history
    loss, tokens = response_loss(result.model, tok, split.eval, cfg.model.max_length, 16)
    assert tokens > 0 and logged[0] == pytest.approx(loss, rel=1e-5), (logged, loss)
