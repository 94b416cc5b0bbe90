"""The tiny pipeline's content keys, pinned.

A cache key is a promise: the same config, inputs and code version find the same output. A refactor
that changes which config fields a stage hashes (or how) silently breaks every user's cache, and a new
field left out of the key silently reuses stale outputs. So the keys of every stage for the ``tiny``
preset are pinned here, computed from stand-in input hashes (each stage's real inputs are other stages'
outputs; their manifest hashes enter the key the same way).

Changing a pin is right only when a stage's output really changes for the same config and inputs; then
bump that stage's ``version`` in the registry and say why in the commit.
"""

from __future__ import annotations

import pytest

from llm.config import load_config
from llm.stages.output import content_key
from llm.stages.registry import STAGES

TINY_KEYS = {
    "download": "161d2614ca05213d525b",
    "filter": "e2ea12ce298cde986f7d",
    "dedup": "8e41d0f2ea4bc72081cd",
    "tokenizer": "6e5b33f8bc89b0700124",
    "tokenize": "64d1d03873687539ccba",
    "pretrain": "2284bd3c5107fc7b5dbd",
    "midtrain": "ce2d5e7b238b7c865716",
    "sft": "9ebe1d90fe7abf957f1a",
    "eval": "9068a0b41447e92306c7",
    "export": "301877a41e269fd78388",
    "report": "f4c3288914b2f35c2608",
}


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KILN_DATA_MIRROR", raising=False)  # the mirror changes download's resolved source
    return load_config("tiny")


def test_every_registered_stage_is_pinned() -> None:
    assert set(STAGES) == set(TINY_KEYS)


@pytest.mark.parametrize("stage", list(TINY_KEYS))
def test_tiny_key_is_unchanged(tiny, stage: str) -> None:
    sd = STAGES[stage]
    hashes = {role: f"hash-of-{role}" for role in sd.inputs}
    assert content_key(stage, sd.key_config(tiny), hashes, sd.version) == TINY_KEYS[stage]
