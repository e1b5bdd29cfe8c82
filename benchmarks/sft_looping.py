"""Looping share, chrF and EOS share of a kind sft adapter on the demo's first 16 eval prompts, greedy, with and
without repetition controls (sft.generation), side by side in one run:

    .venv/bin/python benchmarks/sft_looping.py PEFT_FOLDER [CONFIG]

PEFT_FOLDER: the ``peft/`` folder of an adapter-only version (registry.sft_weights: adapter); CONFIG defaults to
configs/chatterbot-sft.yaml (its base model is loaded in float32, as an adapter version loads it).
"""

from __future__ import annotations

import sys
import time

SETTINGS = (
    {},
    {"repetition_penalty": 1.2},
    {"no_repeat_ngram_size": 4},
    {"repetition_penalty": 1.1, "no_repeat_ngram_size": 4},
)


def main(adapter: str, config: str = "configs/chatterbot-sft.yaml", n: int = 16) -> None:
    from tuneflow.runtime import configure_environment

    configure_environment()
    import numpy as np
    from peft import PeftModel
    from sacrebleu.metrics import CHRF

    from tuneflow.config import GenerationSettings, load_config
    from tuneflow.data import LABEL, TEXT, read_table, resolve_path, sft_settings, split_data
    from tuneflow.kinds import get_kind
    from tuneflow.kinds.sft import generate, loops
    from tuneflow.models import load_tokenizer

    cfg = load_config(config)
    kind = get_kind("sft")
    tok = kind.prepare_tokenizer(load_tokenizer(cfg.model), cfg)
    loaded = read_table(cfg.data, sft=sft_settings(cfg), path=resolve_path(cfg.data.path))
    rows = split_data(loaded, cfg.data).eval.head(n)
    model = PeftModel.from_pretrained(kind.load_model(cfg), adapter).eval()
    print("| sft.generation | looping_share | chrF | eos_stop_share | generation seconds |")
    print("|---|---:|---:|---:|---:|")
    for settings in SETTINGS:
        start = time.perf_counter()
        answers, stopped = generate(
            model, tok, list(rows[TEXT]), None, cfg.sft.max_new_tokens, 16, GenerationSettings(**settings)
        )
        seconds = time.perf_counter() - start
        chrf = CHRF().corpus_score(answers, [list(rows[LABEL])]).score
        looping = np.mean([loops(a) for a in answers])
        print(f"| {settings or 'off'} | {looping:.3f} | {chrf:.2f} | {np.mean(stopped):.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
