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
    "filter": "5020f3422757a500e031",  # version 3: spaCy-compatible word splitting
    "dedup": "05fbd18065d44b08e804",  # dedup.verify + dedup.threshold (candidate verification)
    "tokenizer": "6e5b33f8bc89b0700124",
    "tokenize": "64d1d03873687539ccba",
    "pretrain": "6ae2ef18282a2938f305",  # pretrain.depth_scaling, ratio 12 over scaling params
    "midtrain": "168982fa9437b27981fd",
    "sft": "03127fc62671f91392ec",
    "eval": "9068a0b41447e92306c7",
    "export": "58783e45491981ff63bd",
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


# --------------------------------------------------------------------------- the one key rule, field by field


def _leaf_fields(model, prefix: str):
    """(dotted path, field) of every field of a section, nested sections' fields instead of themselves."""
    from pydantic import BaseModel

    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            yield from _leaf_fields(f.annotation, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}", f


def _candidates(value, annotation) -> list:
    """Other values of a field's type, from its current value (the first one the config accepts is used)."""
    import typing

    literals = [a for a in typing.get_args(annotation) if isinstance(a, str)]
    for arg in typing.get_args(annotation):  # Literal members inside a union (int | Literal["auto"])
        literals += [a for a in typing.get_args(arg) if isinstance(a, str) and typing.get_origin(arg) is typing.Literal]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2, value // 2, value - 1, "auto"]
    if isinstance(value, float):
        return [value * 0.5, value + 0.1, value * 2] if value else [0.1]
    if isinstance(value, str):
        return [*literals, value + "x", value * 2, 1]  # value * 2: a pattern field ("L" -> "LL")
    if isinstance(value, list):
        return [value[:-1], value + value[:1]] if value else [["x"]]
    if isinstance(value, dict):
        return [{}] if value else [{"x": "1"}]
    return [1, 0.5, ["x"], "x"]  # None


def _changed(base: dict, dotted: str, value, annotation):
    """A config with field ``dotted`` changed (and still valid as a whole), or None when no candidate is."""
    from llm.config import ConfigError, load_config

    for cand in _candidates(value, annotation):
        if cand == value:
            continue
        try:
            return load_config("tiny", {**base, dotted: cand})
        except ConfigError:
            continue
    return None


def test_every_field_of_a_stages_sections_is_in_its_key_unless_operational(tiny, tmp_path) -> None:
    """A field added to a section is in the key of every stage naming that section unless it is tagged
    Operational (then it is in none), with no per-stage list to update: changing each field of each
    section, one at a time, changes exactly the keys the rule says."""
    from functools import reduce

    from llm.config import OPERATIONAL

    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("example.com\n")
    base = {"filter.url_blocklist": str(blocklist)}  # a path that exists, so "" -> path is testable too
    ref = load_config("tiny", base)
    hashes = {role: f"hash-of-{role}" for sd in STAGES.values() for role in sd.inputs}
    keys = lambda cfg: {n: content_key(n, sd.key_config(cfg), {r: hashes[r] for r in sd.inputs}, sd.version)  # noqa: E731
                        for n, sd in STAGES.items()}
    before, unchangeable = keys(ref), []
    sections = sorted({s for sd in STAGES.values() for s in sd.sections})
    for section in sections:
        for dotted, f in _leaf_fields(type(getattr(ref, section)), section):
            value = reduce(getattr, dotted.split("."), ref)
            cfg = _changed(base, dotted, value, f.annotation) if dotted != "filter.url_blocklist" else \
                load_config("tiny", {"filter.url_blocklist": ""})
            if cfg is None:
                unchangeable.append(dotted)
                continue
            operational = any(m is OPERATIONAL for m in f.metadata)
            changed = {n for n, k in keys(cfg).items() if k != before[n]}
            expected = set() if operational else {n for n, sd in STAGES.items() if section in sd.sections}
            assert changed == expected, f"{dotted} (operational={operational}) changed the keys of {sorted(changed)}"
    assert unchangeable == ["dedup.keep", "export.format"], unchangeable  # one-value Literals; anything else needs a candidate
    seeded = {n for n, k in keys(load_config("tiny", {**base, "run.seed": 7})).items() if k != before[n]}
    assert seeded == {n for n, sd in STAGES.items() if sd.seeded} == {"pretrain", "midtrain", "sft", "eval", "report"}
