"""The tokenizer stage: BPE trained with HF tokenizers, run through tiktoken, saved portably."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from llm.config import load_config
from llm.stages.output import StageError
from llm.stages.registry import execute
from llm.tokenizer import (
    BOS,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    TokenizerError,
    from_tiktoken,
    load_tokenizer,
)
from llm.data.tokenizer import train_tokenizer
from tests._tok_helpers import publish_docs, real_docs

VOCAB = 640
HARD_STRINGS = [
    "",
    "Hello, world!",
    "naïve café — déjà vu; Ærøskøbing",
    "emoji 🚀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "中文字符和日本語のテキスト، العربية, עברית, русский",
    "tabs\tand\r\nwindows newlines\n\n\n   trailing spaces   ",
    "e\u0301 combining, zero\u200bwidth, nbsp\u00a0here, \x00\x01\x7f control",
    "numbers 1234567890 3.14159 1,000,000 0x1F",
    "<|bos|> looks special but is plain text <|assistant_end|>",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥² + 𝑦² = 𝑧²",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    """A tokenizer stage run on a small real slice; returns (stage result, docs uri, held-out texts)."""
    root = tmp_path_factory.mktemp("artifacts")
    docs = real_docs(shared_data, 300)
    docs_uri = publish_docs(root, [docs[:150], docs[150:]])
    cfg = load_config("tiny", {"run.artifact_root": str(root), "tokenizer.vocab_size": VOCAB,
                               "tokenizer.max_train_chars": 1_500_000, "tokenizer.doc_cap_chars": 5000})
    res = execute("tokenizer", cfg, {"docs": docs_uri}, progress=False)
    heldout = [d["text"] for d in real_docs(shared_data, 60, skip=2000)]
    return res, docs_uri, heldout, cfg


def test_stage_output_and_manifest(trained) -> None:
    res, _, _, cfg = trained
    out = Path(res.uri)
    assert (out / TOKENIZER_FILE).is_file() and (out / "token_bytes.npy").is_file()
    c = res.manifest["counts"]
    assert c["vocab_size"] == VOCAB
    assert 0 < c["train_chars"] <= cfg.tokenizer.max_train_chars
    assert c["heldout_docs"] > 0 and c["heldout_tokens"] > 0
    assert 1.5 < c["chars_per_token"] < 6
    assert c["hf_tiktoken_agreement"] == 1.0
    assert res.manifest["tokenizer"]["bos_id"] == load_tokenizer(res.uri).bos_id


def test_special_tokens(trained) -> None:
    tok = load_tokenizer(trained[0].uri)
    ids = [tok.special_id(s) for s in SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids)
    assert tok.bos_id == tok.special_id(BOS)
    assert max(ids) == tok.vocab_size - 1 == VOCAB - 1
    # Specials are never produced from text, and decode to their names.
    text = "<|bos|><|user_start|>hi<|assistant_end|>"
    assert not set(tok.encode(text)) & set(ids)
    assert tok.decode([tok.bos_id]) == BOS
    with pytest.raises(KeyError, match="unknown special token"):
        tok.special_id("<|nope|>")


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_round_trip_unicode(trained, text: str) -> None:
    tok = load_tokenizer(trained[0].uri)
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_real_text_and_batch(trained) -> None:
    tok = load_tokenizer(trained[0].uri)
    heldout = trained[2]
    batch = tok.encode_batch(heldout, num_threads=2)
    assert batch == [tok.encode(t) for t in heldout]
    assert all(tok.decode(ids) == t for ids, t in zip(batch, heldout))
    assert all(0 <= i < tok.vocab_size for ids in batch for i in ids)


def test_hf_and_tiktoken_agree(shared_data) -> None:
    texts = [d["text"][:4000] for d in real_docs(shared_data, 250)]
    tok, hf = train_tokenizer(texts, 800)
    heldout = [d["text"] for d in real_docs(shared_data, 80, skip=1500)] + HARD_STRINGS
    hf.encode_special_tokens = True  # compare like with like: specials in text are plain text
    hf_ids = [e.ids for e in hf.encode_batch(heldout, add_special_tokens=False)]
    assert hf_ids == tok.encode_batch(heldout)
    assert {s: hf.token_to_id(s) for s in SPECIAL_TOKENS} == {s: tok.special_id(s) for s in SPECIAL_TOKENS}
    # Training is deterministic: the same text gives the same vocabulary.
    tok2, _ = train_tokenizer(texts, 800)
    assert tok2.mergeable_ranks() == tok.mergeable_ranks()


def test_save_load_round_trip(trained, tmp_path: Path) -> None:
    tok = load_tokenizer(trained[0].uri)
    tok.save(tmp_path / "copy")
    again = load_tokenizer(str(tmp_path / "copy"))
    assert again.mergeable_ranks() == tok.mergeable_ranks()
    assert again.special_tokens == tok.special_tokens
    assert (again.vocab_size, again.bos_id) == (tok.vocab_size, tok.bos_id)
    assert np.array_equal(again.token_bytes, tok.token_bytes)
    assert np.array_equal(np.load(tmp_path / "copy" / "token_bytes.npy"), tok.token_bytes)
    for t in trained[2][:10]:
        assert again.encode(t) == tok.encode(t)
    body = json.loads((tmp_path / "copy" / TOKENIZER_FILE).read_text())
    assert body["format"] == "kiln-tokenizer" and len(body["ranks"]) == VOCAB - len(SPECIAL_TOKENS)


def test_token_bytes(trained) -> None:
    tok = load_tokenizer(trained[0].uri)
    tb = tok.token_bytes
    assert tb.shape == (tok.vocab_size,)
    specials = set(tok.special_tokens.values())
    for i in range(tok.vocab_size):
        if i in specials:
            assert tb[i] == 0
        else:
            assert tb[i] == len(tok.decode_token_bytes(i)) > 0
    assert tb[:256].min() == 1  # every single byte is a token
    for text in trained[2][:5] + HARD_STRINGS:
        assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda raw: raw[: len(raw) // 2], "not valid JSON"),
        (lambda raw: json.dumps({**json.loads(raw), "ranks": None}), "'ranks'"),
        (lambda raw: json.dumps({**json.loads(raw), "format": "pickle"}), "'format'"),
        (lambda raw: json.dumps({**json.loads(raw), "ranks": ["!!notbase64"] + json.loads(raw)["ranks"][1:]}), r"'ranks'\[0\]"),
        (lambda raw: json.dumps({**json.loads(raw), "ranks": json.loads(raw)["ranks"][1:]}), "single-byte"),
        (lambda raw: json.dumps({**json.loads(raw), "vocab_size": 7}), "'vocab_size'"),
    ],
)
def test_corrupt_tokenizer_file_is_a_clear_error(trained, tmp_path: Path, mutate, match) -> None:
    load_tokenizer(trained[0].uri).save(tmp_path)
    path = tmp_path / TOKENIZER_FILE
    path.write_text(mutate(path.read_text()))
    with pytest.raises(TokenizerError, match=match) as ei:
        load_tokenizer(str(tmp_path))
    assert str(path) in str(ei.value)


def test_missing_tokenizer_dir(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_vocab_too_small_is_an_error() -> None:
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(["some text"], 200)


def test_unknown_kind_is_a_stage_error(trained) -> None:
    _, docs_uri, _, cfg = trained
    bad = cfg.model_copy(deep=True)
    bad.tokenizer.kind = "sentencepiece"
    with pytest.raises(StageError, match="tokenizer.kind"):
        execute("tokenizer", bad, {"docs": docs_uri}, progress=False)


def test_wrapping_a_tiktoken_encoding(trained) -> None:
    """The stock-encoding path (tiktoken:<name>) on an Encoding that needs no network."""
    learned = load_tokenizer(trained[0].uri)
    base = tiktoken.Encoding("base", pat_str=learned.encoding._pat_str, mergeable_ranks=learned.mergeable_ranks(),
                             special_tokens={"<|endoftext|>": max(learned.mergeable_ranks().values()) + 1})
    tok = from_tiktoken(base)
    assert tok.special_tokens["<|endoftext|>"] == base.max_token_value  # kept
    assert min(tok.special_id(s) for s in SPECIAL_TOKENS) == base.max_token_value + 1  # ours appended after
    assert tok.vocab_size == base.max_token_value + 1 + len(SPECIAL_TOKENS)
    for t in HARD_STRINGS:
        assert tok.encode(t) == base.encode_ordinary(t)


def _tiktoken_cached(urls: list[str]) -> bool:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls)


GPT2_URLS = ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]


@pytest.mark.skipif(not _tiktoken_cached(GPT2_URLS), reason="tiktoken gpt2 files not cached offline")
def test_stock_gpt2(tmp_path: Path) -> None:
    tok = load_tokenizer("tiktoken:gpt2")
    assert tok.special_tokens["<|endoftext|>"] == 50256 and tok.bos_id == 50257
    assert tok.encode("Hello world") == tiktoken.get_encoding("gpt2").encode_ordinary("Hello world")
    tok.save(tmp_path)
    assert load_tokenizer(str(tmp_path)).encode("Hello world") == tok.encode("Hello world")


def test_unknown_stock_encoding() -> None:
    with pytest.raises(TokenizerError, match="unknown tiktoken encoding"):
        load_tokenizer("tiktoken:nope")


def test_small_corpus_gives_a_smaller_working_vocab() -> None:
    """Text with too few distinct pairs stops merging early; ids stay contiguous and specials follow."""
    tok, _ = train_tokenizer(["abab abab ab"] * 3, 1000)
    assert 256 + len(SPECIAL_TOKENS) <= tok.vocab_size < 1000
    assert tok.bos_id == tok.vocab_size - len(SPECIAL_TOKENS)
    assert tok.decode(tok.encode("abab 🚀")) == "abab 🚀"


def test_bpe_training_progress_leaves_stdout_clean_when_not_a_terminal(capfd: pytest.CaptureFixture[str]) -> None:
    """HF tokenizers draws its bars with a terminal library that, off a terminal (a log file, CI,
    `kiln tokenizer > out`), prints only empty lines to stdout; those must not appear."""
    from llm.data.tokenizer import train_hf_bpe

    train_hf_bpe(["the quick brown fox jumps over the lazy dog"] * 50, 400, progress=True)
    out = capfd.readouterr().out
    assert out.strip("\n") == out and "\n" not in out, repr(out)
