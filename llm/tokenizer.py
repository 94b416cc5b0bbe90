"""The runtime tokenizer: byte-level BPE run with ``tiktoken``, loaded from a tokenizer stage output.

It is trained with HF ``tokenizers`` by the tokenizer stage (llm/data/tokenizer.py); this module is
what every later stage, the trainer and the chat CLI load. Why two libraries: HF ``tokenizers`` has a fast, well-tested BPE *trainer*; ``tiktoken`` is the
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
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import tiktoken

from llm.stages.output import StageError
from llm.storage import Store, atomic_path, join, write_atomic

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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in.

    Training writes vocabularies in it (llm/data/tokenizer.py) and the HF export writes them back (llm/export.py).

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
        """Write ``tokenizer.json`` and ``token_bytes.npy``, each atomically (llm.storage)."""
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
        write_atomic(d / TOKENIZER_FILE, json.dumps(body, separators=(",", ":")))
        with atomic_path(d / TOKEN_BYTES_FILE) as tmp, open(tmp, "wb") as f:
            np.save(f, self.token_bytes)

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
