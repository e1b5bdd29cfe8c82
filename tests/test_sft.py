"""Kind sft on a tiny Llama with a tokenizer trained here: labels, EOS, packing isolation, LoRA, the gate's
lower-is-better direction, registration and offline reload, the whole flow and batch prediction."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from sft_fixtures import build_tiny_llama, sft_config, sft_frame
from tuneflow.config import PipelineConfig
from tuneflow.data import read_table, sft_settings, split_data
from tuneflow.kinds import get_kind
from tuneflow.kinds.sft import IGNORE, encode_row, generate, prepare_tokenizer, sft_trainer
from tuneflow.models import load_tokenizer
from tuneflow.registry import decide


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def sft_data(workdir) -> Path:
    path = workdir / "pairs.csv"
    sft_frame(96).to_csv(path, index=False)
    return path


def _cfg(tiny_llama: Path, data: Path, **overrides) -> PipelineConfig:
    return PipelineConfig.model_validate(sft_config(tiny_llama, data, **overrides))


def _prepared(cfg: PipelineConfig):
    kind = get_kind("sft")
    tok = kind.prepare_tokenizer(load_tokenizer(cfg.model), cfg)
    split = split_data(read_table(cfg.data, sft=sft_settings(cfg)), cfg.data)
    return kind, tok, split, kind.encode(split, tok, cfg.model.max_length, [])


def test_labels_mask_prompt_and_padding_and_train_the_eos(tiny_llama, sft_data):
    cfg = _cfg(tiny_llama, sft_data)
    kind, tok, split, data = _prepared(cfg)
    assert tok.pad_token_id == tok.eos_token_id  # the trap: padding must be masked by position, not by id
    eos = tok.eos_token_id
    rows = [data["train"][i] for i in range(4)]
    for row, prompt in zip(rows, split.train["text"][:4], strict=True):
        prompt_ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        n_prompt = len(tok(prompt_ids, add_special_tokens=False)["input_ids"])
        assert row["labels"][:n_prompt] == [IGNORE] * n_prompt
        trained = [x for x in row["labels"] if x != IGNORE]
        assert trained and trained[-1] == eos  # the response ends with a trained EOS, nothing after it
        assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    batch = kind.collator(tok)(rows)  # padded: every pad position is -100, the EOS labels stay
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["labels"][i, n:].eq(IGNORE).all()
        assert batch["labels"][i, n - 1].item() == eos
        assert batch["attention_mask"][i, n:].eq(0).all()


def test_a_prompt_that_fills_max_length_is_left_out_not_trained_on_nothing(tiny_llama, sft_data):
    cfg = _cfg(tiny_llama, sft_data)
    tok = prepare_tokenizer(load_tokenizer(cfg.model), cfg.sft)
    assert encode_row(tok, "word " * 200, "short answer", None, 64) is None
    row = encode_row(tok, "hi", "a long answer " * 50, None, 64)
    assert len(row["input_ids"]) == 64 and any(x != IGNORE for x in row["labels"])


def test_plain_template_for_a_base_model_without_one(tmp_path, sft_data):
    base = build_tiny_llama(tmp_path / "no-template", chat_template=None)
    cfg = _cfg(base, sft_data)
    tok = prepare_tokenizer(load_tokenizer(cfg.model), cfg.sft)
    row = encode_row(tok, "Hello?", "Hi.", None, 64)
    text = tok.decode(row["input_ids"])
    assert "### User:\nHello?" in text and text.endswith("Hi.<|im_end|>")
    assert row["labels"][-1] == tok.eos_token_id


def test_packed_examples_do_not_attend_to_each_other(tiny_llama, sft_data):
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    cfg = _cfg(tiny_llama, sft_data)
    _, tok, _, data = _prepared(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    rows = [data["train"][i] for i in range(3)]
    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(rows)
    assert packed["input_ids"].shape[0] == 1  # one row, no padding
    with torch.inference_mode():
        # use_cache=False as in training (TRL's compute_loss): the packed positions give a block-diagonal mask
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for row in rows:
            n = len(row["input_ids"])
            alone = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
            assert torch.allclose(logits[start : start + n], alone, atol=1e-4)
            start += n
    # the padding-free labels of each example start with the masked prompt (no label crosses a boundary)
    assert packed["labels"][0, 0].item() == IGNORE


@pytest.mark.parametrize("packing", [False, True])
def test_lora_trains_adapters_only_and_the_base_stays_frozen(tiny_llama, sft_data, tmp_path, packing):
    cfg = _cfg(tiny_llama, sft_data, **{"sft.packing": packing, "sft.max_steps": 3})
    _, tok, _, data = _prepared(cfg)
    trainer = sft_trainer(cfg, tok, data, tmp_path / "out")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    assert all(not after[n].requires_grad for n in base)
    assert all(torch.equal(before[n], after[n]) for n in base), "a base weight changed"
    assert any(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n), "no adapter weight changed"


def test_full_fine_tuning_trains_every_weight(tiny_llama, sft_data, tmp_path):
    cfg = _cfg(tiny_llama, sft_data, **{"sft.lora.enabled": False, "sft.max_steps": 2})
    _, tok, _, data = _prepared(cfg)
    trainer = sft_trainer(cfg, tok, data, tmp_path / "out")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and len(changed) >= len(before) // 2


def test_the_gate_for_a_lower_is_better_metric():
    assert decide("eval_loss", 1.2, 1.5, "1", 0.0).promote is True
    assert decide("eval_loss", 1.5, 1.2, "1", 0.0).promote is False
    assert decide("perplexity", 3.0, 3.0, "1", 0.0).promote is False  # a tie keeps the champion
    assert decide("eval_loss", 1.45, 1.5, "1", 0.1).promote is False  # better, but by less than the margin
    assert decide("eval_loss", float("nan"), 1.5, "1", 0.0).promote is False
    assert "lower is better" in decide("eval_loss", 1.2, 1.5, "1", 0.0).reason


def test_a_worse_model_never_becomes_champion_in_either_direction():
    import random

    rng = random.Random(11)
    for _ in range(2000):
        metric = rng.choice(["macro_f1", "chrf", "eval_loss", "perplexity"])
        champion = rng.uniform(0.01, 5)
        worse = rng.choice([0.0, 1e-9, rng.uniform(0, 1)])
        challenger = champion - worse if metric in ("macro_f1", "chrf") else champion + worse
        assert decide(metric, challenger, champion, "2", rng.choice([0.0, 0.01])).promote is False, (metric, worse)


def test_sft_config_defaults_and_refusals(tiny_llama, sft_data):
    cfg = _cfg(tiny_llama, sft_data)
    assert cfg.evaluate.primary_metric == "eval_loss" and cfg.data.labels == []
    with pytest.raises(ValueError, match="not a metric of kind 'sft'"):
        _cfg(tiny_llama, sft_data, **{"evaluate.primary_metric": "macro_f1"})
    bad = sft_config(tiny_llama, sft_data)
    bad["kind"] = "classification"
    with pytest.raises(ValueError, match="needs at least two"):
        PipelineConfig.model_validate(bad | {"evaluate": {"primary_metric": "macro_f1"}})


def test_messages_column_gives_prompt_response_and_context(tiny_llama, workdir):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]},
    ]
    path = workdir / "chat.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    cfg = _cfg(tiny_llama, path, **{"sft.messages_column": "messages"})
    frame = read_table(cfg.data, sft=sft_settings(cfg)).frame
    assert list(frame["text"]) == ["Hi?", "2+2?"] and list(frame["label"]) == ["Hello.", "4."]
    assert '"system"' in frame["context"][0] and frame["context"][1] is None
    tok = prepare_tokenizer(load_tokenizer(cfg.model), cfg.sft)
    row = encode_row(tok, "Hi?", "Hello.", frame["context"][0], 64)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tok.decode(row["input_ids"])


@pytest.mark.usefixtures("prefect_harness")
def test_flow_registers_a_chat_model_that_reloads_offline_with_the_same_greedy_output(tiny_llama, sft_data, workdir):
    import mlflow
    from mlflow import MlflowClient

    from tuneflow.flows.retrain import retrain_once
    from tuneflow.predict import score_path

    cfg = _cfg(tiny_llama, sft_data, **{"train.epochs": 2})
    first = retrain_once(cfg, config_file="sft.yaml")
    assert first["promoted"] is True and first["version"] == "1"
    m = first["metrics"]
    assert {"eval_loss", "perplexity", "chrf", "eos_stop_share"} <= set(m)

    client = MlflowClient()
    mv = client.get_model_version_by_alias("tiny-sft", "champion")
    assert mv.tags["tuneflow.kind"] == "sft" and mv.tags["tuneflow.primary_metric"] == "eval_loss"
    card = mv.description
    assert "LoRA r=4" in card and "Size of this version" in card
    full = mlflow.artifacts.load_text(mv.tags["tuneflow.model_card"])  # the whole card; a long one is cut above
    assert "LoRA r=4" in full and "## Sample generations" in full
    assert "## Sample generations" in card or "Left out here: Sample generations" in card
    # the run a version points to carries the eval metrics, and so does MLflow's logged model
    assert client.get_run(mv.run_id).data.metrics["eval/eval_loss"] == pytest.approx(m["eval_loss"])
    logged = mlflow.get_logged_model(mv.source.removeprefix("models:/"))
    assert any(x.key == "eval/eval_loss" for x in logged.metrics)
    parent = client.get_run(first["run_id"])
    assert "eval_generations.json" in [a.path for a in client.list_artifacts(first["run_id"])]
    (train_run,) = mlflow.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first['run_id']}' and tags.tuneflow.stage = 'train'",
        output_format="list",
    )
    assert "plots/training_loss.png" in [a.path for a in client.list_artifacts(train_run.info.run_id, "plots")]
    assert parent.data.metrics["eval/eval_loss"] == pytest.approx(m["eval_loss"])

    # offline reload through pyfunc (the chat endpoint) == the registered weights' own greedy generation
    prompts = ["What is your name? (3)", "Where do you live? (1)"]
    parts = mlflow.transformers.load_model("models:/tiny-sft@champion", return_type="components")
    tok = prepare_tokenizer(parts["tokenizer"], cfg.sft)
    expected, _ = generate(parts["model"], tok, prompts, max_new_tokens=cfg.sft.max_new_tokens)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-sft@champion")
    out = pyfunc.predict([{"messages": [{"role": "user", "content": p}]} for p in prompts])
    assert [o["choices"][0]["message"]["content"].strip() for o in out] == expected
    # and the reloaded weights are the trained ones, not a re-initialised base (the PEFT trap)
    base_loss = (
        get_kind("sft")
        .evaluate(
            get_kind("sft").load_model(cfg),
            tok,
            split_data(read_table(cfg.data, sft=sft_settings(cfg)), cfg.data).eval,
            cfg,
            64,
        )
        .metrics["eval_loss"]
    )
    assert m["eval_loss"] < base_loss

    # batch prediction: one generation per prompt
    inputs = workdir / "prompts.csv"
    pd.DataFrame({"prompt": prompts}).to_csv(inputs, index=False)
    summary = score_path("tiny-sft@champion", inputs, workdir / "out.csv", text_column="prompt", batch_size=8)
    scored = pd.read_csv(workdir / "out.csv")
    assert summary.rows == 2 and list(scored["generation"].fillna("")) == expected
    assert set(scored["finish_reason"]) <= {"stop", "length"}
    # a prompt that reads as a Python literal, and a 5,000-word one, each alone in a batch: generated from as
    # written (the chat input becomes prompt strings before MLflow parses anything; kind classification's list
    # input was parsed as literals: tests/test_predict_serve.py)
    for prompt in ("{'text': 'free prize'}", " ".join(["free"] * 5000)):
        pd.DataFrame({"prompt": [prompt]}).to_csv(inputs, index=False)
        score_path("tiny-sft@champion", inputs, workdir / "one.csv", text_column="prompt")
        wanted, _ = generate(parts["model"], tok, [prompt], max_new_tokens=cfg.sft.max_new_tokens)
        assert list(pd.read_csv(workdir / "one.csv")["generation"].fillna("")) == wanted

    # the same data, config and base model again: nothing changed, nothing trained or registered
    same = retrain_once(cfg, config_file="sft.yaml")
    assert same["status"] == "unchanged" and same["version"] == "1" and "nothing changed" in same["reason"]
    assert [str(v.version) for v in client.search_model_versions("name='tiny-sft'")] == ["1"]
    assert client.get_run(same["run_id"]).data.tags["tuneflow.same_as_version"] == "1"
    # forced: it retrains and re-scores the champion with the same code; no better: champion kept
    second = retrain_once(cfg, config_file="sft.yaml", force=True)
    assert second["version"] == "2" and second["promoted"] is False
    assert "lower is better" in second["reason"]
    assert client.get_run(second["run_id"]).data.metrics["champion/eval_loss"] == pytest.approx(m["eval_loss"])


@pytest.mark.usefixtures("prefect_harness")
def test_cli_run_and_compare_on_an_sft_config(tiny_llama, sft_data, workdir, capsys):
    import yaml

    from tuneflow.cli import main

    path = workdir / "sft.yaml"
    path.write_text(yaml.safe_dump(sft_config(tiny_llama, sft_data, **{"sft.generations": 2})))
    assert main(["run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "eval eval_loss" in out and "perplexity" in out and "PROMOTED to champion" in out
    assert main(["run", "--config", str(path), "--set", "sft.lora.r=2"]) == 0
    assert main(["compare", "tiny-sft", "1", "2", "--config", str(path)]) == 0
    table = capsys.readouterr().out
    assert "| eval_loss |" in table and "| chrf |" in table


def test_sft_training_resumes_from_the_newest_complete_checkpoint(tiny_llama, sft_data, tmp_path):
    import shutil

    from tuneflow.train_common import COMPLETE_MARKER

    cfg = _cfg(tiny_llama, sft_data, **{"sft.max_steps": 5, "train.checkpoint_minutes": 0})
    kind, tok, _, data = _prepared(cfg)
    whole = kind.train(cfg, tok, data, tmp_path / "whole")
    assert whole.extra["resumed_from_step"] == 0
    # What a kill -9 leaves: step 4 complete (adapter, optimizer, scheduler, RNG, data position), step 5 half-written
    crashed = tmp_path / "crashed"
    (crashed / "checkpoint-4").parent.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", crashed / "checkpoint-4")
    shutil.copytree(tmp_path / "whole" / "checkpoint-5", crashed / "checkpoint-5")
    (crashed / "checkpoint-5" / COMPLETE_MARKER).unlink()
    resumed = kind.train(cfg, tok, data, crashed)
    assert resumed.extra["resumed_from_step"] == 4 and resumed.steps == 5
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "the resumed run ended elsewhere"
