"""Chat loaders: SFT packing keeps every token and never trains on padding; the midtrain mixture
hits its token ratio; both resume exactly and split ranks disjointly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.chat.format import RenderedChats
from llm.train.chat_loaders import CHAT, WEB, DocTable, MixtureLoader, MixtureStream, SFTLoader, best_fit_rows

BOS = 0


def make_chats(n: int, seed: int, lo: int = 8, hi: int = 120) -> RenderedChats:
    """Random conversations: BOS first, tokens 1..99, a random supervision mask (BOS never supervised)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi, size=n)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = rng.integers(1, 100, size=int(off[-1])).astype(np.uint16)
    ids[off[:-1]] = BOS
    mask = (rng.random(int(off[-1])) < 0.5).astype(np.uint8)
    mask[off[:-1]] = 0
    # Make conversations identifiable: token 1 = 100 + index (mod a large vocab).
    ids[off[:-1] + 1] = 100 + np.arange(n)
    return RenderedChats(ids, mask, off)


def write_token_split(root: Path, split: str, doc_lens: list[int], seed: int) -> None:
    """A tokenize-stage-shaped directory (meta.json + shard .bin + .idx.npy), per the HELPERS contract."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    toks = rng.integers(1, 100, size=sum(doc_lens)).astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum(doc_lens)[:-1]]).astype(np.int64)
    toks[starts] = BOS
    toks.tofile(root / split / "shard_00000.bin")
    np.save(root / split / "shard_00000.idx.npy", starts)
    meta = json.loads((root / "meta.json").read_text()) if (root / "meta.json").exists() else {
        "dtype": "uint16", "vocab_size": 4096, "bos_id": BOS, "splits": {}}
    meta["splits"][split] = {"tokens": int(sum(doc_lens)), "docs": len(doc_lens), "shards": [f"{split}/shard_00000.bin"]}
    (root / "meta.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------- SFT


def test_best_fit_packing_places_every_conversation_once_within_capacity() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=300)
    order = rng.permutation(300)
    rows = best_fit_rows(lengths, order, capacity=65, buffer=16)
    placed = [c for r in rows for c in r]
    assert sorted(placed) == list(range(300))
    assert all(sum(lengths[c] for c in r) <= 65 for r in rows)
    assert lengths.sum() / (len(rows) * 65) > 0.9  # best-fit actually packs
    with pytest.raises(ValueError, match="exceed the row capacity"):
        best_fit_rows(np.array([10, 70]), np.arange(2), capacity=65)


def _epoch_batches(loader: SFTLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    while loader.epoch == 0:
        out.append(loader.next_batch())
    return out


def test_sft_packing_keeps_every_token_and_masks_padding(tmp_path: Path) -> None:
    chats = make_chats(200, seed=1)
    chats.save(tmp_path, "train")
    make_chats(20, seed=2).save(tmp_path, "val")
    T = 127
    loader = SFTLoader({"chat_dir": str(tmp_path), "pad_id": BOS}, batch_size=4, seq_len=T, rank=0, world_size=1, seed=3)
    n_rows = loader.rows_per_epoch()
    batches = _epoch_batches(loader)
    # Rebuild every row (x plus the last target) and recover the conversations from it.
    seen: list[int] = []
    supervised_expected = 0
    for x, y in batches:
        assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
        for xr, yr in zip(x.numpy(), y.numpy()):
            assert xr[0] == BOS  # every row starts with BOS
            row = np.append(xr, yr[-1] if yr[-1] != -1 else BOS)
            starts = [i for i in range(len(row) - 1) if row[i] == BOS and row[i + 1] >= 100]
            for s in starts:
                c = int(row[s + 1]) - 100
                ids, mask = chats.conversation(c)
                n = len(ids)
                # The conversation is there whole (no token lost)...
                np.testing.assert_array_equal(xr[s:s + n][: T - s], ids[: T - s])
                # ...and its targets are exactly its supervised tokens.
                tgt = yr[s:s + n - 1]
                want = np.where(mask[1:] == 1, ids[1:].astype(np.int64), -1)
                np.testing.assert_array_equal(tgt[: T - s], want[: T - s])
                supervised_expected += int(mask[1:].sum())
                seen.append(c)
            end = max(s + len(chats.conversation(int(row[s + 1]) - 100)[0]) for s in starts)
            # After the last conversation only padding follows, and it never carries loss.
            assert (yr[end - 1:] == -1).all()
            assert (xr[end:] == BOS).all()
    rows_seen = len(batches) * 4
    # The last batch may run into the next epoch; the first epoch holds every conversation.
    assert rows_seen >= n_rows
    assert set(range(200)) <= set(seen)
    assert len(seen) - 200 <= 3 * (T + 1) // 8  # only the last batch's spill-over rows (<=3, convs >=8 tokens) repeat
    assert loader.tokens_seen_by_source["chat"] + loader.tokens_seen_by_source["padding"] == rows_seen * T
    assert loader.supervised_tokens == supervised_expected


def test_sft_loader_resumes_exactly_and_splits_ranks(tmp_path: Path) -> None:
    make_chats(120, seed=5, hi=60).save(tmp_path, "train")
    make_chats(30, seed=6, hi=60).save(tmp_path, "val")
    spec = {"chat_dir": str(tmp_path), "pad_id": BOS}
    kw = dict(batch_size=2, seq_len=63, seed=9)
    a = SFTLoader(spec, rank=0, world_size=1, **kw)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must be JSON-able
    want = [a.next_batch() for _ in range(40)]  # crosses an epoch boundary (reshuffle)
    assert a.epoch >= 1
    b = SFTLoader(spec, rank=0, world_size=1, **kw)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(want, (b.next_batch() for _ in range(40))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # Two ranks with batch 1 see exactly the rows one rank with batch 2 sees, disjointly.
    one = SFTLoader(spec, batch_size=2, seq_len=63, rank=0, world_size=1, seed=9)
    r0 = SFTLoader(spec, batch_size=1, seq_len=63, rank=0, world_size=2, seed=9)
    r1 = SFTLoader(spec, batch_size=1, seq_len=63, rank=1, world_size=2, seed=9)
    for _ in range(5):
        x, _ = one.next_batch()
        assert torch.equal(x[0:1], r0.next_batch()[0]) and torch.equal(x[1:2], r1.next_batch()[0])
    # Validation: deterministic, same number of batches on every rank, all-padding never.
    v1, v2 = list(r0.val_batches(10_000)), list(r1.val_batches(10_000))
    assert len(v1) == len(v2) >= 1
    assert all((y != -1).any() for _, y in v1)
    assert all(torch.equal(p[1], q[1]) for p, q in zip(v1, list(r0.val_batches(10_000))))
    with pytest.raises(ValueError, match="different data"):
        SFTLoader({"chat_dir": str(tmp_path), "chat_train": "val", "pad_id": BOS}, rank=0, world_size=1, **kw
                  ).load_state_dict(state)


# --------------------------------------------------------------------------- midtraining mixture


def _tables(n_web: int = 400, n_chat: int = 600) -> tuple[DocTable, DocTable]:
    rng = np.random.default_rng(11)

    class Shard:
        def __init__(self, lens: np.ndarray):
            self.doc_starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
            self.tokens = rng.integers(1, 100, size=int(lens.sum())).astype(np.uint16)

    web = DocTable.from_shards([Shard(rng.integers(20, 3000, size=n_web)), Shard(rng.integers(5, 300, size=50))])
    return web, DocTable.from_chats(make_chats(n_chat, seed=12, lo=20, hi=600))


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.9])
def test_mixture_ratio_within_one_percent_of_target(ratio: float) -> None:
    web, chat = _tables()
    s = MixtureStream(web, chat, chat_ratio=ratio, seq_len=256, seed=0)
    for _ in range(8 * 40):  # the tiny preset's midtraining budget: 40 steps x 4096 tokens
        row, src = s.next_row()
        assert len(row) == len(src) == 257  # packed: every row full, no padding
    counts = s.tokens_by_source()
    assert counts["web"] + counts["chat"] == 8 * 40 * 256
    assert abs(s.realised_ratio() - ratio) < 0.01
    # Packed, not padded: every chat token comes from real conversations in their own order.


def test_mixture_counts_exact_and_documents_intact() -> None:
    web, chat = _tables()
    s = MixtureStream(web, chat, chat_ratio=0.3, seq_len=128, seed=4)
    rows = [s.next_row() for _ in range(200)]
    toks = np.concatenate([r for r, _ in rows])
    srcs = np.concatenate([c for _, c in rows])
    # Exact counts: recount every target position (all but each row's first token) by source.
    tgt_src = np.concatenate([c[1:] for _, c in rows])
    assert s.tokens_by_source() == {"web": int((tgt_src == WEB).sum()), "chat": int((tgt_src == CHAT).sum())}
    # Conversations appear as contiguous, unmodified prefixes (cropped at seq_len at most).
    chat_starts = [i for i in range(len(toks) - 1) if srcs[i] == CHAT and toks[i] == BOS and toks[i + 1] >= 100]
    assert chat_starts
    for i in chat_starts[:-1]:
        c = int(toks[i + 1]) - 100
        doc = chat.doc(c, crop=128)
        np.testing.assert_array_equal(toks[i:i + len(doc)], doc)


def test_mixture_loader_resume_and_rank_split(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    write_token_split(tokens, "train", [int(x) for x in np.random.default_rng(1).integers(30, 900, size=300)], seed=1)
    write_token_split(tokens, "val", [200] * 40, seed=2)
    make_chats(300, seed=3, lo=20, hi=300).save(tmp_path / "chats", "train")
    make_chats(40, seed=4, lo=20, hi=300).save(tmp_path / "chats", "val")
    spec = {"tokens_uri": str(tokens), "chat_dir": str(tmp_path / "chats"), "chat_ratio": 0.3}
    kw = dict(seq_len=64, seed=5)
    a = MixtureLoader(spec, batch_size=4, rank=0, world_size=1, **kw)
    for _ in range(10):
        x, y = a.next_batch()
        assert (y != -1).all() and torch.equal(x[:, 1:], y[:, :-1])
    state = json.loads(json.dumps(a.state_dict()))
    want = [a.next_batch() for _ in range(30)]
    b = MixtureLoader(spec, batch_size=4, rank=0, world_size=1, **kw)
    b.load_state_dict(state)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(want, (b.next_batch() for _ in range(30))))
    assert b.tokens_seen_by_source == a.tokens_seen_by_source
    assert sum(a.tokens_seen_by_source.values()) == 40 * 4 * 64
    # Ranks: disjoint slices of the same global rows; per-rank counts sum to the 1-process counts.
    one = MixtureLoader(spec, batch_size=4, rank=0, world_size=1, **kw)
    ranks = [MixtureLoader(spec, batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    for _ in range(6):
        x, _ = one.next_batch()
        assert torch.equal(x, torch.cat([r.next_batch()[0] for r in ranks]))
    total = {k: sum(r.tokens_seen_by_source[k] for r in ranks) for k in ("pretrain", "chat")}
    assert total == one.tokens_seen_by_source
    vb = [list(r.val_batches(2048)) for r in ranks]
    assert len(vb[0]) == len(vb[1]) >= 1
    with pytest.raises(ValueError, match="chat_ratio"):
        MixtureLoader({**spec, "chat_ratio": 0.5}, batch_size=4, rank=0, world_size=1, **kw).load_state_dict(state)
