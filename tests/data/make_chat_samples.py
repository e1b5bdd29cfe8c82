"""Writes tests/data/chat/: the chatterbot corpus (BSD, the chatterbot-corpus package) in two public layouts.

- ``sharegpt.jsonl``: every conversation as ShareGPT turns (human/gpt alternating, ending on a gpt turn), one
  in five with a system turn first: multi-turn rows, every gpt turn trained.
- ``alpaca.json``: one JSON array (pretty-printed, as Alpaca ships) of the first exchange of every
  conversation; where the conversation goes on, its third turn is the record's ``input``.

Run from the repository root: python tests/data/make_chat_samples.py. The output is committed; it is what
``configs/chatterbot-sft.yaml`` trains on with only data.path and data.format changed (docs/how-to/sft-data.md).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent / "chat"
SYSTEM = "You are a friendly chat companion. Answer briefly."


def conversations() -> list[list[str]]:
    spec = importlib.util.find_spec("chatterbot_corpus")  # found, never imported
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    out, seen = [], set()
    for f in sorted(folder.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [str(t).strip() for t in conv if str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]  # end on an answer
            key = tuple(turns)
            if len(turns) >= 2 and key not in seen:
                seen.add(key)
                out.append(turns)
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    convs = conversations()
    with (OUT / "sharegpt.jsonl").open("w", encoding="utf-8") as fh:
        for i, turns in enumerate(convs):
            chat = [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]
            if i % 5 == 0:
                chat = [{"from": "system", "value": SYSTEM}, *chat]
            fh.write(json.dumps({"id": f"chatterbot-{i}", "conversations": chat}, ensure_ascii=False) + "\n")
    records, seen = [], set()
    for turns in convs:
        extra = turns[2] if len(turns) > 2 else ""
        if (turns[0], extra) not in seen:
            seen.add((turns[0], extra))
            records.append({"instruction": turns[0], "input": extra, "output": turns[1]})
    (OUT / "alpaca.json").write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(convs)} ShareGPT conversations, {len(records)} Alpaca records in {OUT}")


if __name__ == "__main__":
    main()
