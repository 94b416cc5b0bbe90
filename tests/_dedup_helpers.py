"""Planted near-duplicates for the dedup tests (test_dedup.py, test_executor.py)."""

from __future__ import annotations

import random

from llm.data.minhash import Signer, band_keys, jaccard, normalize, shingles


def perturb(text: str, frac: float, rng: random.Random) -> str:
    """Replace ``frac`` of the words of ``text`` with other words (a realistic near-duplicate)."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * frac))):
        words[i] = rng.choice(["lorem", "ipsum", "dolor", "amet", "quux", "zebra", "orbit", "velvet"])
    return " ".join(words)


def sh(text: str) -> list[bytes]:
    return shingles(normalize(text), 5)


def colliding_low_pair(texts: list[str], frac: float = 0.11) -> tuple[str, str, float]:
    """A (source, copy) pair with true Jaccard 0.3-0.5 that still shares an LSH band (tiny preset's
    14x8, seed 1): the chance collision that verification exists to reject. Found by a seeded
    search (about 1% of such pairs collide), so the same pair every run."""
    signer = Signer(112, seed=1)
    for attempt in range(4000):
        src = texts[attempt % len(texts)]
        copy = perturb(src, frac, random.Random(attempt))
        j = jaccard(sh(src), sh(copy))
        if not 0.3 <= j <= 0.5:
            continue
        keys = band_keys(signer.sign([sh(src), sh(copy)]), 14, 8)
        if (keys[0] == keys[1]).any():
            return src, copy, j
    raise AssertionError("no colliding low-Jaccard pair in 4000 seeded tries")
