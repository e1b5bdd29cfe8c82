"""The facts of every kind, by name: what the library reads of a kind without importing its model stack.

Imports only the light facts modules (no tuneflow module outside ``tuneflow.kinds``): the config imports it.
"""

from __future__ import annotations

from tuneflow.kinds.classification_facts import FACTS as CLASSIFICATION_FACTS
from tuneflow.kinds.facts import CheckRow, KindFacts
from tuneflow.kinds.sft_facts import FACTS as SFT_FACTS

FACTS: dict[str, KindFacts] = {f.name: f for f in (CLASSIFICATION_FACTS, SFT_FACTS)}


def facts_of(name: str) -> KindFacts:
    """The facts of the kind called ``name``."""
    try:
        return FACTS[name]
    except KeyError:
        raise ValueError(f"unknown fine-tuning kind {name!r}; the kinds are: {', '.join(FACTS)}") from None


def all_checks() -> dict[str, CheckRow]:
    """Every data check of every kind, each once: the first kind's in its order, then the others' own."""
    out: dict[str, CheckRow] = {}
    for facts in FACTS.values():
        for row in facts.rows():
            out.setdefault(row.name, row)
    return out
