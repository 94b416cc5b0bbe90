"""Byte-level BPE: trained with HF ``tokenizers``, run with ``tiktoken``.

Why two libraries: HF ``tokenizers`` has a fast, well-tested BPE *trainer*; ``tiktoken`` is the
fastest *encoder* we know and has a batch API that releases the GIL. The learned vocabulary is
converted into tiktoken's ``mergeable_ranks`` (token bytes -> rank) and every encode goes through
tiktoken. The conversion is exact for BPE: HF numbers merged tokens in the order their merges were
learned, tiktoken merges the adjacent pair whose concatenation has the lowest rank, so using HF's
ids as ranks reproduces HF's encodings (checked on held-out text at training time, recorded in
the manifest as ``hf_tiktoken_agreement``, and in tests).

Saved format (portable, no pickle), in a tokenizer stage output directory:

* ``tokenizer.json``: ``{"format": "kiln-tokenizer", "version": 1, "name", "pattern",
  "ranks": [base64 of token bytes, index = rank], "special_tokens": {name: id}, "vocab_size"}``
* ``token_bytes.npy``: int32 UTF-8 byte length of every token id (0 for special tokens), the
  denominator of bits-per-byte.
* ``hf_tokenizer.json``: the trained HF tokenizer with the same ids, for the HF ecosystem.

``load_tokenizer("tiktoken:gpt2")`` (or ``cl100k_base``) wraps a stock tiktoken encoding with our
special tokens appended after its largest id; tiktoken fetches those files from the network (or
its cache, ``TIKTOKEN_CACHE_DIR``) the first time.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tiktoken

from llm.stages.output import StageError, StageOutput
from llm.storage import Store, join

# GPT-4 (cl100k) split pattern: contractions, letter runs with one leading non-letter, numbers in
# groups of up to 3 digits, punctuation runs, newlines and other whitespace.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; also the document separator in token shards
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # reserved for tool use
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
    "<|reserved_0|>",
    "<|reserved_1|>",
    "<|reserved_2|>",
]
BOS = "<|bos|>"
FORMAT = "kiln-tokenizer"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"
HF_TOKENIZER_FILE = "hf_tokenizer.json"
STOCK_ENCODINGS = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
# One document in this many (by id hash) is held out of tokenizer training to measure compression.
HELDOUT_FRACTION = 1 / 64
HELDOUT_MAX_CHARS = 2_000_000
AGREEMENT_DOCS = 200


class TokenizerError(StageError):
    """A tokenizer file that cannot be loaded, or a tokenizer that cannot be built."""


# --------------------------------------------------------------------------- the runtime tokenizer


class Tokenizer:
    """Encode/decode through a :class:`tiktoken.Encoding`. ``encode`` never emits special tokens."""

    def __init__(self, encoding: tiktoken.Encoding, name: str = ""):
        self.encoding = encoding
        self.name = name or encoding.name
        self.vocab_size: int = encoding.max_token_value + 1
        self.special_tokens: dict[str, int] = dict(encoding._special_tokens)
        missing = [s for s in SPECIAL_TOKENS if s not in self.special_tokens]
        if missing:
            raise TokenizerError(f"tokenizer {self.name!r} lacks special tokens {missing}")
        self.bos_id: int = self.special_tokens[BOS]
        self._token_bytes: np.ndarray | None = None

    # -- encoding
    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_numpy(self, text: str) -> np.ndarray:
        """Like :meth:`encode` but returns a uint32 array (no Python list; faster for bulk work)."""
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    def decode_token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {sorted(self.special_tokens)}") from None

    @property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of each token id; 0 for special tokens and unused ids."""
        if self._token_bytes is None:
            self._token_bytes = token_byte_lengths(self.encoding)
        return self._token_bytes

    # -- persistence
    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self.encoding._mergeable_ranks)

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``token_bytes.npy`` (atomically: temp name, then rename)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        ranks = self.mergeable_ranks()
        by_rank: list[str | None] = [None] * (max(ranks.values()) + 1)
        for tok, r in ranks.items():
            by_rank[r] = base64.b64encode(tok).decode("ascii")
        body = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "pattern": self.encoding._pat_str,
            "ranks": by_rank,
            "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size,
        }
        tmp = d / f"{TOKENIZER_FILE}.tmp"
        tmp.write_text(json.dumps(body, separators=(",", ":")))
        tmp.replace(d / TOKENIZER_FILE)
        tmp_npy = d / f"{TOKEN_BYTES_FILE}.tmp.npy"
        np.save(tmp_npy, self.token_bytes)
        tmp_npy.replace(d / TOKEN_BYTES_FILE)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id})"


def token_byte_lengths(encoding: tiktoken.Encoding) -> np.ndarray:
    out = np.zeros(encoding.max_token_value + 1, dtype=np.int32)
    for tok, r in encoding._mergeable_ranks.items():
        out[r] = len(tok)
    return out


def build_encoding(name: str, pattern: str, ranks: dict[bytes, int], specials: Sequence[str] = SPECIAL_TOKENS,
                   extra_specials: dict[str, int] | None = None) -> tiktoken.Encoding:
    """A tiktoken Encoding over ``ranks`` with ``specials`` numbered after every existing id."""
    special_ids = dict(extra_specials or {})
    next_id = max([*ranks.values(), *special_ids.values()]) + 1
    for s in specials:
        if s not in special_ids:
            special_ids[s] = next_id
            next_id += 1
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_ids)


def from_tiktoken(base: tiktoken.Encoding, name: str | None = None) -> Tokenizer:
    """Wrap any tiktoken Encoding (e.g. a stock one), keeping its specials and appending ours."""
    enc = build_encoding(name or f"{base.name}+kiln", base._pat_str, dict(base._mergeable_ranks),
                         extra_specials=dict(base._special_tokens))
    return Tokenizer(enc, name=f"tiktoken:{base.name}")


@lru_cache(maxsize=8)
def stock_tokenizer(encoding_name: str) -> Tokenizer:
    if encoding_name not in STOCK_ENCODINGS:
        raise TokenizerError(f"unknown tiktoken encoding {encoding_name!r}; known: {', '.join(STOCK_ENCODINGS)}")
    try:
        base = tiktoken.get_encoding(encoding_name)
    except Exception as e:  # noqa: BLE001 - network/cache errors come in many types
        raise TokenizerError(
            f"cannot load tiktoken encoding {encoding_name!r} ({type(e).__name__}: {e}); it is downloaded on first "
            "use: run once with network or set TIKTOKEN_CACHE_DIR to a directory holding its cached files"
        ) from e
    return from_tiktoken(base)


# --------------------------------------------------------------------------- load / save


def tokenizer_from_json(body: Any, where: str) -> Tokenizer:
    """Build a Tokenizer from the parsed ``tokenizer.json``; errors name the file and field."""
    if not isinstance(body, dict):
        raise TokenizerError(f"{where}: top level must be a JSON object")
    if body.get("format") != FORMAT:
        raise TokenizerError(f"{where}: field 'format' is {body.get('format')!r}, expected {FORMAT!r}")
    if body.get("version") != FORMAT_VERSION:
        raise TokenizerError(f"{where}: unsupported version {body.get('version')!r} (this code reads {FORMAT_VERSION})")
    for f, typ in (("pattern", str), ("ranks", list), ("special_tokens", dict)):
        if not isinstance(body.get(f), typ):
            raise TokenizerError(f"{where}: field {f!r} missing or not a {typ.__name__}")
    ranks: dict[bytes, int] = {}
    for r, b64 in enumerate(body["ranks"]):
        if b64 is None:
            continue
        try:
            tok = base64.b64decode(b64, validate=True)
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"{where}: field 'ranks'[{r}] is not valid base64 ({e})") from e
        if tok in ranks:
            raise TokenizerError(f"{where}: field 'ranks'[{r}] duplicates rank {ranks[tok]} ({tok!r})")
        ranks[tok] = r
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise TokenizerError(f"{where}: field 'ranks' lacks single-byte tokens for bytes {missing_bytes[:8]}...")
    specials = body["special_tokens"]
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in specials.items()):
        raise TokenizerError(f"{where}: field 'special_tokens' must map names to integer ids")
    clash = set(specials.values()) & set(ranks.values())
    if clash:
        raise TokenizerError(f"{where}: field 'special_tokens' reuses token ids {sorted(clash)[:5]}")
    try:
        enc = tiktoken.Encoding(name=str(body.get("name", "kiln")), pat_str=body["pattern"], mergeable_ranks=ranks,
                                special_tokens=specials)
    except Exception as e:  # noqa: BLE001 - tiktoken raises ValueError for a bad regex, etc.
        raise TokenizerError(f"{where}: cannot build a tiktoken encoding ({e})") from e
    tok = Tokenizer(enc, name=str(body.get("name", "")))
    if "vocab_size" in body and body["vocab_size"] != tok.vocab_size:
        raise TokenizerError(f"{where}: field 'vocab_size' is {body['vocab_size']} but the ranks and specials give {tok.vocab_size}")
    return tok


def load_tokenizer(uri: str, endpoint_url: str = "") -> Tokenizer:
    """A tokenizer stage output dir (local or s3://) holding ``tokenizer.json``, or ``tiktoken:<name>``."""
    uri = str(uri)
    if uri.startswith("tiktoken:"):
        return stock_tokenizer(uri.split(":", 1)[1])
    return _load_dir(uri, endpoint_url)


def _load_dir(uri: str, endpoint_url: str) -> Tokenizer:
    store = Store(uri, endpoint_url)
    where = join(uri, TOKENIZER_FILE)
    try:
        path = store.cache_path(where)
    except FileNotFoundError:
        raise TokenizerError(f"{where}: not found (is {uri} a tokenizer stage output?)") from None
    if not path.exists():
        raise TokenizerError(f"{where}: not found (is {uri} a tokenizer stage output?)")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{where}: corrupt tokenizer file, not valid JSON ({e})") from e
    return tokenizer_from_json(body, where)


# --------------------------------------------------------------------------- training


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points from 256 up,
    in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_DECODER: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


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
    from llm.data.shards import doc_bucket

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
    from llm.data.docs import iter_docs

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
        from llm.data.shards import doc_bucket

        for doc_id, text in iter_docs(store, docs_uri):  # nothing to train: only the held-out sample is needed
            stats["docs_seen"] += 1
            if doc_bucket(doc_id) < HELDOUT_FRACTION:
                heldout.append(text)
                stats["heldout_chars"] += len(text)
                if stats["heldout_chars"] >= HELDOUT_MAX_CHARS:
                    break
    else:
        raise StageError(f"tokenizer.kind={tcfg.kind!r}: expected 'bpe' or a tiktoken encoding ({', '.join(STOCK_ENCODINGS)})")
    train_s = time.time() - t0

    tok.save(out.workdir)
    if hf is not None:
        hf.save(str(out.path(HF_TOKENIZER_FILE)))

    # Compression on held-out text, and HF/tiktoken agreement on it (identical ids expected).
    held_tokens = sum(len(x) for x in tok.encode_batch(heldout)) if heldout else 0
    held_chars = sum(len(t) for t in heldout)
    held_bytes = sum(len(t.encode("utf-8")) for t in heldout)
    counts: dict[str, Any] = {
        "vocab_size": tok.vocab_size,  # smaller than requested only when the text runs out of pairs to merge
        "vocab_requested": tcfg.vocab_size if tcfg.kind == "bpe" else tok.vocab_size,
        "train_docs": stats["train_docs"],
        "train_chars": stats["train_chars"],
        "heldout_docs": len(heldout),
        "heldout_chars": held_chars,
        "heldout_tokens": held_tokens,
        "chars_per_token": round(held_chars / held_tokens, 4) if held_tokens else None,
        "bytes_per_token": round(held_bytes / held_tokens, 4) if held_tokens else None,
        "train_seconds": round(train_s, 3),
    }
    extra: dict[str, Any] = {"tokenizer": {"name": tok.name, "kind": tcfg.kind, "bos_id": tok.bos_id,
                                           "special_tokens": tok.special_tokens, "pattern": tok.encoding._pat_str}}
    if hf is not None and heldout:
        sample = heldout[:AGREEMENT_DOCS]
        hf.encode_special_tokens = True  # like tiktoken's encode_ordinary: "<|bos|>" in text is plain text
        same = sum(h.ids == t for h, t in zip(hf.encode_batch(sample, add_special_tokens=False), tok.encode_batch(sample)))
        counts["hf_tiktoken_agreement"] = round(same / len(sample), 4)
    return {"counts": counts, **extra}
