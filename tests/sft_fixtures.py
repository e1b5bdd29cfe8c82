"""A tiny causal LM for kind sft tests: a Llama with random weights and a BPE tokenizer trained here, with a
ChatML chat template whose end-of-turn token is EOS (as SmolLM2-Instruct's)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PAIRS = [
    ("What is your name?", "My name is Tiny."),
    ("How are you?", "I am fine, thank you."),
    ("What is two plus two?", "Two plus two is four."),
    ("Do you like music?", "Yes, I like music a lot."),
    ("Where do you live?", "I live in a computer."),
    ("What colour is the sky?", "The sky is blue."),
    ("Tell me a joke.", "Why did the chicken cross the road?"),
    ("What is Python?", "Python is a programming language."),
    ("Good morning!", "Good morning to you too."),
    ("What time is it?", "It is time to learn."),
    ("Are you a robot?", "I am a small language model."),
    ("What do you eat?", "I eat data."),
]


def sft_frame(n: int = 96) -> pd.DataFrame:
    """Prompt/response rows: the pairs above with a numbered suffix, so every row is distinct."""
    rows = [(f"{p} ({i})", f"{r} ({i})") for i in range(n // len(PAIRS) + 1) for p, r in PAIRS][:n]
    return pd.DataFrame(rows, columns=["prompt", "response"])


def build_tiny_llama(folder: Path, chat_template: str | None = CHATML) -> Path:
    """Save a tiny random LlamaForCausalLM and its tokenizer (trained on the pairs) to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    special = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [f"user\n{p}\nassistant\n{r}\nsystem\n" for p, r in PAIRS] * 4 + [" ".join(map(str, range(200)))]
    backend.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>")
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def sft_config(base: Path, data: Path, **overrides) -> dict:
    cfg = {
        "name": "tiny-sft",
        "kind": "sft",
        "data": {"path": str(data), "eval_fraction": 0.25},
        "validation": {"min_rows_per_class": 1},
        "model": {"base_model": str(base), "max_length": 64},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 2, "eval_batch_size": 16},
        "sft": {"generations": 4, "max_new_tokens": 8, "lora": {"r": 4, "alpha": 8}},
        "registry": {"model_name": "tiny-sft"},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg
