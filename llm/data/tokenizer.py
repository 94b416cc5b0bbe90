"""The tokenizer stage: train a byte-level BPE with HF ``tokenizers`` on the deduplicated documents
(or wrap a stock tiktoken encoding) and save it in Kiln's portable format.

Training lives here, with the stage; what every later stage loads and runs (the tiktoken-backed
:class:`~llm.tokenizer.Tokenizer`, the file format, ``load_tokenizer``) is :mod:`llm.tokenizer`.
One document in ``1 / HELDOUT_FRACTION`` (by id hash) is held out of training to measure compression
and to check that HF and tiktoken encode it identically (``hf_tiktoken_agreement``).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator

from llm.data.docs import iter_docs
from llm.data.shards import doc_bucket
from llm.stages.output import StageError, StageOutput
from llm.storage import Store
from llm.tokenizer import (
    HF_TOKENIZER_FILE,
    bytes_to_unicode,
    SPECIAL_TOKENS,
    STOCK_ENCODINGS,
    Tokenizer,
    TokenizerError,
    build_encoding,
    stock_tokenizer,
)

# GPT-4 (cl100k) split pattern: contractions, letter runs with one leading non-letter, numbers in
# groups of up to 3 digits, punctuation runs, newlines and other whitespace.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# One document in this many (by id hash) is held out of tokenizer training to measure compression.
HELDOUT_FRACTION = 1 / 64
HELDOUT_MAX_CHARS = 2_000_000
AGREEMENT_DOCS = 200


# --------------------------------------------------------------------------- training


BYTE_DECODER: dict[str, int] = {c: b for b, c in bytes_to_unicode().items()}


def hf_token_to_bytes(token: str) -> bytes:
    try:
        return bytes(BYTE_DECODER[c] for c in token)
    except KeyError as e:
        raise TokenizerError(f"HF token {token!r} has a character {e} outside the byte-level alphabet") from None


def train_hf_bpe(texts: Iterable[str] | Iterable[list[str]], vocab_size: int, *, progress: bool = False,
                 length: int | None = None):
    """Train an HF byte-level BPE with ``vocab_size - len(SPECIAL_TOKENS)`` learned tokens, then add our specials.

    Returns the HF ``tokenizers.Tokenizer``; its ids and ours are the same.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    learned = vocab_size - len(SPECIAL_TOKENS)
    if learned < 256:
        raise TokenizerError(f"tokenizer.vocab_size={vocab_size} is too small: needs 256 byte tokens + "
                             f"{len(SPECIAL_TOKENS)} special tokens at least")
    hf = HFTokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=learned,
        # Its bars are drawn for a terminal only; off one (a log, CI, `kiln tokenizer > out`) they
        # leave nothing but empty lines on stdout.
        show_progress=progress and sys.stdout.isatty(),
        min_frequency=0,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    hf.train_from_iterator(texts, trainer=trainer, length=length)
    hf.add_special_tokens(SPECIAL_TOKENS)
    return hf


def tokenizer_from_hf(hf, name: str = "kiln-bpe") -> Tokenizer:
    """Convert a trained HF byte-level BPE into our tiktoken-backed Tokenizer with the same ids."""
    vocab: dict[str, int] = hf.get_vocab(with_added_tokens=False)
    ranks: dict[bytes, int] = {}
    for token, i in vocab.items():
        b = hf_token_to_bytes(token)
        if b in ranks:
            raise TokenizerError(f"HF vocabulary maps {b!r} to two ids ({ranks[b]}, {i})")
        ranks[b] = i
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError("HF vocabulary ids are not contiguous from 0; cannot use them as tiktoken ranks")
    specials = {s: hf.token_to_id(s) for s in SPECIAL_TOKENS}
    enc = build_encoding(name, SPLIT_PATTERN, ranks, specials=SPECIAL_TOKENS, extra_specials=specials)
    return Tokenizer(enc, name=name)


def train_tokenizer(texts: Iterable[str] | Iterable[list[str]], vocab_size: int, *, progress: bool = False,
                    name: str = "kiln-bpe", length: int | None = None) -> tuple[Tokenizer, Any]:
    """Train a BPE on ``texts``; returns (tiktoken-backed Tokenizer, HF tokenizer)."""
    hf = train_hf_bpe(texts, vocab_size, progress=progress, length=length)
    return tokenizer_from_hf(hf, name=name), hf


# --------------------------------------------------------------------------- the stage


def key_extras(cfg) -> dict[str, Any]:  # noqa: ARG001 - the registry's key_extras signature
    """The held-out share is a constant of this module, not config, yet it decides which docs train the BPE."""
    return {"heldout_fraction": HELDOUT_FRACTION}


def _training_stream(docs: Iterator[tuple[str, str]], doc_cap: int, max_chars: int, heldout: list[str],
                     stats: dict[str, int], batch: int = 256) -> Iterator[list[str]]:
    """Batches of training text (capped per doc and in total); held-out docs go to ``heldout`` instead."""
    buf: list[str] = []
    for doc_id, text in docs:
        stats["docs_seen"] += 1
        if doc_bucket(doc_id) < HELDOUT_FRACTION:
            if stats["heldout_chars"] < HELDOUT_MAX_CHARS:
                heldout.append(text)
                stats["heldout_chars"] += len(text)
            continue
        piece = text[:doc_cap]
        if stats["train_chars"] + len(piece) > max_chars:
            piece = piece[: max_chars - stats["train_chars"]]
        if piece:
            buf.append(piece)
            stats["train_docs"] += 1
            stats["train_chars"] += len(piece)
        if len(buf) >= batch:
            yield buf
            buf = []
        if stats["train_chars"] >= max_chars:
            break
    if buf:
        yield buf


def run(cfg, out: StageOutput, inputs: dict[str, dict], *, progress: bool) -> dict[str, Any]:
    """Stage "tokenizer": train (or wrap a stock encoding) and save the portable tokenizer files."""
    tcfg = cfg.tokenizer
    store = Store(cfg.run.artifact_root, cfg.run.s3_endpoint)
    docs_uri = inputs["docs"]["uri"]
    heldout: list[str] = []
    stats = {"docs_seen": 0, "train_docs": 0, "train_chars": 0, "heldout_chars": 0}
    t0 = time.time()
    hf = None
    if tcfg.kind == "bpe":
        stream = _training_stream(iter_docs(store, docs_uri), tcfg.doc_cap_chars, tcfg.max_train_chars, heldout, stats)
        tok, hf = train_tokenizer(stream, tcfg.vocab_size, progress=progress)
        if stats["train_chars"] == 0:
            raise StageError(f"{docs_uri}: no training text (every document empty or held out)")
    elif tcfg.kind in STOCK_ENCODINGS:
        tok = stock_tokenizer(tcfg.kind)
        _heldout_sample(iter_docs(store, docs_uri), heldout, stats)  # nothing to train: only the sample is needed
    else:
        raise StageError(f"tokenizer.kind={tcfg.kind!r}: expected 'bpe' or a tiktoken encoding ({', '.join(STOCK_ENCODINGS)})")
    train_s = time.time() - t0

    tok.save(out.workdir)
    if hf is not None:
        hf.save(str(out.path(HF_TOKENIZER_FILE)))
    counts: dict[str, Any] = {
        "vocab_size": tok.vocab_size,  # smaller than requested only when the text runs out of pairs to merge
        "vocab_requested": tcfg.vocab_size if tcfg.kind == "bpe" else tok.vocab_size,
        "train_docs": stats["train_docs"],
        "train_chars": stats["train_chars"],
        **_compression(tok, heldout),
        "train_seconds": round(train_s, 3),
    }
    if hf is not None and heldout:
        counts["hf_tiktoken_agreement"] = _agreement(tok, hf, heldout)
    extra: dict[str, Any] = {"tokenizer": {"name": tok.name, "kind": tcfg.kind, "bos_id": tok.bos_id,
                                           "special_tokens": tok.special_tokens, "pattern": tok.encoding._pat_str}}
    return {"counts": counts, **extra}


def _heldout_sample(docs: Iterator[tuple[str, str]], heldout: list[str], stats: dict[str, int]) -> None:
    """Only the held-out documents (up to HELDOUT_MAX_CHARS), for a stock encoding that is not trained."""
    for doc_id, text in docs:
        stats["docs_seen"] += 1
        if doc_bucket(doc_id) < HELDOUT_FRACTION:
            heldout.append(text)
            stats["heldout_chars"] += len(text)
            if stats["heldout_chars"] >= HELDOUT_MAX_CHARS:
                break


def _compression(tok: Tokenizer, heldout: list[str]) -> dict[str, Any]:
    """Compression on held-out text: the number that says whether the tokenizer is any good."""
    held_tokens = sum(len(x) for x in tok.encode_batch(heldout)) if heldout else 0
    held_chars = sum(len(t) for t in heldout)
    held_bytes = sum(len(t.encode("utf-8")) for t in heldout)
    counts: dict[str, Any] = {
        "heldout_docs": len(heldout),
        "heldout_chars": held_chars,
        "heldout_tokens": held_tokens,
        "chars_per_token": round(held_chars / held_tokens, 4) if held_tokens else None,
        "bytes_per_token": round(held_bytes / held_tokens, 4) if held_tokens else None,
    }
    return counts


def _agreement(tok: Tokenizer, hf: Any, heldout: list[str]) -> float:
    """The share of held-out documents HF and tiktoken encode to identical ids (1.0 expected: the check
    that using HF's ids as tiktoken ranks is exact)."""
    sample = heldout[:AGREEMENT_DOCS]
    hf.encode_special_tokens = True  # like tiktoken's encode_ordinary: "<|bos|>" in text is plain text
    same = sum(h.ids == t for h, t in zip(hf.encode_batch(sample, add_special_tokens=False), tok.encode_batch(sample)))
    return round(same / len(sample), 4)
