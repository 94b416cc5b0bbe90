"""The quality filter: every rule on hand-made documents, thresholds, the stage on real data, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.config import (
    C4Config,
    FilterConfig,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageFilterConfig,
    load_config,
)
from llm.data.filters import (
    Doc,
    FilterChain,
    UrlBlocklist,
    c4_clean,
    c4_quality,
    count_sentences,
    fineweb_quality,
    gopher_quality,
    gopher_repetition,
    url_filter,
)
from llm.stages.output import StageError, run_stage
from llm.stages.registry import execute
from llm.storage import Store

# --------------------------------------------------------------------------- hand-made documents

VOCAB = (
    "river mountain garden window teacher village market science history morning evening kitchen winter summer "
    "forest island bridge letter number people family country animal doctor student picture music flower "
    "ocean valley castle engine harbor meadow planet silver button candle ladder pocket rabbit saddle tunnel "
    "violin walnut yellow zipper anchor basket carpet dragon empire falcon glacier hammer insect jacket"
).split()


def sentence(i: int, n: int = 12) -> str:
    """A varied English sentence: distinct words so no n-gram repeats across sentences."""
    words = [VOCAB[(i * 7 + k * 3) % len(VOCAB)] for k in range(n - 4)]
    return f"The {words[0]} of {' '.join(words[1:4])} and {' '.join(words[4:])} with care number{i}."


def good_doc(lines: int = 8, per_line: int = 2) -> str:
    """A document that passes every rule with default thresholds."""
    return "\n".join(" ".join(sentence(li * per_line + k) for k in range(per_line)) for li in range(lines))


GOOD = good_doc()


def test_good_document_passes_every_rule() -> None:
    doc = Doc(GOOD)
    assert gopher_quality(doc) == (True, None)
    assert gopher_repetition(doc) == (True, None)
    assert c4_quality(doc) == (True, None)
    assert fineweb_quality(doc) == (True, None)
    assert FilterChain(FilterConfig())(GOOD).keep


def test_rules_accept_plain_strings() -> None:
    assert gopher_quality(GOOD) == gopher_quality(Doc(GOOD))


# ---- Gopher quality: one document per check


@pytest.mark.parametrize(
    "text, reason",
    [
        ("The cat and the dog sat with me.", "short_doc"),
        ("the of and " + " ".join(["a", "b", "c", "d", "e", "f", "g", "h"]) * 10, "avg_word_length_low"),
        ("the and of " + " ".join(["internationalization"] * 3 + ["characteristically"] * 2 + VOCAB[:2]) * 12,
         "avg_word_length_high"),
        (GOOD + "\n" + "#news is great " * 60, "hash_ratio"),
        (GOOD + "\n" + "we wait... and go " * 60, "ellipsis_ratio"),
        ("\n".join("• " + sentence(i) for i in range(12)), "bullet_lines"),
        ("\n".join(sentence(i)[:-1] + " and then..." for i in range(12)), "ellipsis_lines"),
        (GOOD + "\n" + " ".join(str(1000 + i) for i in range(200)), "alpha_words"),
        (" ".join(VOCAB) + "\n" + " ".join(reversed(VOCAB)) + " finally.", "stop_words"),
    ],
)
def test_gopher_quality_rules(text: str, reason: str) -> None:
    keep, why = gopher_quality(text)
    assert not keep and why == f"gopher_quality.{reason}"
    # exactly that rule: with its threshold switched off, the document passes
    off = {
        "short_doc": "min_doc_words", "avg_word_length_low": "min_avg_word_length",
        "avg_word_length_high": "max_avg_word_length", "hash_ratio": "max_symbol_word_ratio",
        "ellipsis_ratio": "max_symbol_word_ratio", "bullet_lines": "max_bullet_lines_ratio",
        "ellipsis_lines": "max_ellipsis_lines_ratio", "alpha_words": "max_non_alpha_words_ratio",
        "stop_words": "min_stop_words",
    }[reason]
    if reason != "short_doc":  # a 8-word document has no other verdict to reach
        assert gopher_quality(text, GopherQualityConfig(**{off: None})) == (True, None)


def test_gopher_quality_long_doc() -> None:
    cfg = GopherQualityConfig(max_doc_words=100)
    assert gopher_quality(GOOD, cfg) == (False, "gopher_quality.long_doc")
    assert gopher_quality(GOOD)[0]


# ---- Gopher repetition


def test_gopher_repetition_rules() -> None:
    para = sentence(1) + " " + sentence(2)
    # 3 of 6 paragraphs repeat -> 0.5 > 0.3
    doc = "\n\n".join([para, sentence(3), para, sentence(4), para, para])
    assert gopher_repetition(doc) == (False, "gopher_repetition.dup_para_frac")
    # few duplicate paragraphs (1 of 5) but they are long: characters > 20 %
    long_para = " ".join(sentence(i) for i in range(10, 20))
    doc = "\n\n".join([long_para, sentence(30), sentence(31), sentence(32), long_para])
    assert gopher_repetition(doc) == (False, "gopher_repetition.dup_para_char_frac")
    # duplicate lines inside one paragraph (no blank lines)
    doc = "\n".join([sentence(1), sentence(2), sentence(1), sentence(3), sentence(1), sentence(1)])
    assert gopher_repetition(doc) == (False, "gopher_repetition.dup_line_frac")
    doc = "\n".join([long_para, sentence(30), sentence(31), sentence(32), long_para])
    assert gopher_repetition(doc) == (False, "gopher_repetition.dup_line_char_frac")


def test_gopher_top_ngram_rules() -> None:
    cfg = GopherRepetitionConfig(dup_n_grams=[])
    filler = " ".join(sentence(i) for i in range(4))
    doc = filler + " " + " ".join(["salty crackers"] * 60)
    assert gopher_repetition(doc, cfg) == (False, "gopher_repetition.top_2_gram")
    cfg3 = GopherRepetitionConfig(top_n_grams=[(3, 0.18)], dup_n_grams=[])
    doc = filler + " " + " ".join(f"quite remarkable banana v{i}" for i in range(60))
    assert gopher_repetition(doc, cfg3) == (False, "gopher_repetition.top_3_gram")
    cfg4 = GopherRepetitionConfig(top_n_grams=[(4, 0.16)], dup_n_grams=[])
    doc = filler + " " + " ".join(f"the quite remarkable banana v{i}" for i in range(60))
    assert gopher_repetition(doc, cfg4) == (False, "gopher_repetition.top_4_gram")
    assert gopher_repetition(GOOD) == (True, None)


@pytest.mark.parametrize("n", [5, 6, 7, 8, 9, 10])
def test_gopher_duplicate_ngram_rules(n: int) -> None:
    """A repeated n-word phrase (separated by unique words) trips exactly the dup-n rule."""
    phrase = " ".join(VOCAB[20 : 20 + n])
    body = " ".join(f"{phrase} unique{i}" for i in range(40))
    cfg = GopherRepetitionConfig(top_n_grams=[], dup_n_grams=[(n, 0.15)])
    assert gopher_repetition(body, cfg) == (False, f"gopher_repetition.dup_{n}_gram")
    # the same counts are under the bar for a much longer phrase window
    longer = GopherRepetitionConfig(top_n_grams=[], dup_n_grams=[(n + 1, 0.15)])
    assert gopher_repetition(body, longer) == (True, None)


def _reference_duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Gopher's duplicate n-gram characters by a plain walk: jump n words after a repeat."""
    seen, rep, idx = set(), 0, 0
    while idx < len(words) - n + 1:
        g = tuple(words[idx : idx + n])
        if g in seen:
            rep += sum(map(len, g))
            idx += n
        else:
            seen.add(g)
            idx += 1
    return rep


def test_duplicate_ngram_greedy_scan_matches_reference() -> None:
    """Our hashed scan counts what a plain string walk counts (jump n words after a repeat)."""
    words = ("a b c d e a b c d e f a b c d e a b c d e " * 3).split()
    from llm.data.filters.gopher import _duplicate_ngram_chars

    doc = Doc(" ".join(words))
    for n in (2, 3, 5):
        got, _ = _duplicate_ngram_chars(doc, n, limit=0, bound=None)
        assert got == _reference_duplicate_ngram_chars(words, n)


def test_gopher_repetition_empty() -> None:
    assert gopher_repetition("") == (False, "gopher_repetition.empty")


# ---- C4


def test_c4_document_rules() -> None:
    assert c4_quality(GOOD + "\nLorem ipsum dolor sit amet consectetur.") == (False, "c4.lorem_ipsum")
    assert c4_quality(GOOD + "\nfunction f() { return 1; } is code here.") == (False, "c4.curly_bracket")
    assert c4_quality(sentence(1) + "\n" + sentence(2)) == (False, "c4.too_few_sentences")
    # five sentences on one line count as five
    assert c4_quality(" ".join(sentence(i) for i in range(5))) == (True, None)


def test_c4_line_rules_rewrite_text() -> None:
    lines = [
        sentence(1),
        "Menu Home",  # too few words
        "Please enable JavaScript to view the comments.",
        "This site uses cookies to improve your experience.",
        "Read our privacy policy before you continue.",
        sentence(2) + " [1] [citation needed]",
        "x" * 1001 + " is a very long word indeed.",
        sentence(3),
        sentence(4),
        sentence(5),
    ]
    r = c4_clean("\n".join(lines))
    assert r.keep
    assert r.text.split("\n") == [sentence(1), sentence(2) + "  ", sentence(3), sentence(4), sentence(5)]
    assert "[1]" not in r.text and "citation needed" not in r.text
    assert "JavaScript" not in r.text and "cookies" not in r.text and "privacy" not in r.text
    assert "Menu" not in r.text and "x" * 1001 not in r.text
    # rewrite off: same verdict, original text
    assert c4_clean("\n".join(lines), C4Config(rewrite_text=False)).text == "\n".join(lines)


def test_c4_terminal_punctuation_rule_is_off_by_default_and_configurable() -> None:
    doc = "\n".join(sentence(i)[:-1] for i in range(8))  # no line ends with punctuation
    assert c4_quality(doc) == (True, None)
    assert c4_quality(doc, C4Config(filter_no_terminal_punct=True)) == (False, "c4.too_few_sentences")


def test_sentence_counter() -> None:
    assert count_sentences("One here. Two there! Three? Four.") == 4
    assert count_sentences("Dr. Smith met Mr. Jones in the U.S. on Monday.") == 1
    assert count_sentences("He waited... and waited.") == 1
    assert count_sentences("") == 0


# ---- FineWeb quality


def test_fineweb_quality_rules() -> None:
    no_punct = "\n".join(sentence(i)[:-1] + " and more words here" for i in range(10))
    assert fineweb_quality(no_punct) == (False, "fineweb_quality.line_punct_ratio")
    short = GOOD + "\n" + "\n".join(f"Item {i}." for i in range(40))
    assert fineweb_quality(short) == (False, "fineweb_quality.short_line_ratio")
    dup = GOOD + "\n" + sentence(0) + " " + sentence(1)  # repeats the first line exactly
    assert fineweb_quality(dup) == (False, "fineweb_quality.char_dup_ratio")
    listy = "\n".join(f"Item{i} here." for i in range(30))  # 3 words a line
    assert fineweb_quality(listy, FineWebQualityConfig(short_line_thr=1.0)) == (False, "fineweb_quality.list_ratio")
    assert fineweb_quality("   \n \n") == (False, "fineweb_quality.empty")


# ---- URL block list and language


def test_url_blocklist(tmp_path: Path) -> None:
    f = tmp_path / "block.txt"
    f.write_text("# spam\nexample.com\n/ads/\n")
    bl = UrlBlocklist.from_file(f)
    assert url_filter("https://www.example.com/page", bl) == (False, "url_blocklist")
    assert url_filter("http://example.com", bl) == (False, "url_blocklist")
    assert url_filter("https://site.org/ads/1", bl) == (False, "url_blocklist")
    assert url_filter("https://badexample.com/x", bl) == (True, None)
    assert url_filter(None, bl) == (True, None)
    chain = FilterChain(FilterConfig(url_blocklist=str(f)))
    assert chain(GOOD, "https://example.com/a").reason == "url_blocklist"
    assert chain(GOOD, "https://other.org/a").keep


def test_language_filter() -> None:
    from llm.data.filters import language_filter

    french = ("Le chat est sur la table et le chien dort dans le jardin. " * 5).strip()
    assert language_filter(GOOD) == (True, None)
    assert language_filter(french) == (False, "language")
    assert language_filter(french, LanguageFilterConfig(languages=["fr"]))[0]
    chain = FilterChain(FilterConfig(language=LanguageFilterConfig(enabled=True)))
    assert chain(french).reason == "language"


# ---- thresholds and switches


def test_thresholds_are_configurable() -> None:
    doc = GOOD + "\n" + " ".join(str(1000 + i) for i in range(200))
    assert gopher_quality(doc)[1] == "gopher_quality.alpha_words"
    assert gopher_quality(doc, GopherQualityConfig(max_non_alpha_words_ratio=0.3)) == (True, None)
    assert gopher_quality(GOOD, GopherQualityConfig(min_doc_words=10_000))[1] == "gopher_quality.short_doc"
    assert c4_quality(GOOD, C4Config(min_num_sentences=100))[1] == "c4.too_few_sentences"
    assert fineweb_quality(GOOD, FineWebQualityConfig(line_punct_thr=1.1))[1] == "fineweb_quality.line_punct_ratio"
    cfg = load_config("tiny", ["filter.gopher_quality.min_doc_words=5000", "filter.c4.enabled=false"])
    assert FilterChain(cfg.filter)(GOOD).reason == "gopher_quality.short_doc"


def test_disabled_rules_do_not_run() -> None:
    bad = "Lorem ipsum dolor sit amet. " + GOOD
    cfg = FilterConfig()
    assert FilterChain(cfg)(bad).reason == "c4.lorem_ipsum"
    cfg.c4.enabled = False
    assert FilterChain(cfg)(bad).keep


# --------------------------------------------------------------------------- the stage


def _publish_docs(root: Path, tables: dict[str, pa.Table]) -> str:
    """A finished upstream stage output holding ``data/<name>.parquet`` files."""
    def body(out, _inputs):
        for name, table in tables.items():
            pq.write_table(table, out.path(f"data/{name}"), row_group_size=128)
        return {"counts": {"files": len(tables)}}

    return run_stage(Store(str(root)), "download", {"fixture": sorted(tables)}, {}, "test", body).uri


@pytest.fixture()
def shard_slice(shared_data: Path) -> pa.Table:
    """The first 160 rows of a real shard: FineWeb, DCLM-labelled pages and Wikipedia mixed."""
    pf = pq.ParquetFile(shared_data / "pretrain" / "shard_00000.parquet")
    return pa.Table.from_batches([next(pf.iter_batches(batch_size=160))])


def _cfg(root: Path, *extra: str):
    return load_config("tiny", [f"run.artifact_root={root}", "filter.workers=2", *extra])


def test_stage_on_real_shard(artifact_root: Path, shard_slice: pa.Table) -> None:
    half = shard_slice.num_rows // 2
    uri = _publish_docs(artifact_root, {"a.parquet": shard_slice.slice(0, half), "b.parquet": shard_slice.slice(half)})
    cfg = _cfg(artifact_root)
    res = execute("filter", cfg, {"docs": uri}, progress=False)
    m = res.manifest
    c = m["counts"]
    assert c["docs_in"] == shard_slice.num_rows
    assert c["docs_out"] + sum(m["removed_by_rule"].values()) == c["docs_in"]
    assert 0 < c["docs_out"] < c["docs_in"]  # real web data: some kept, some removed
    out_rows = 0
    for name in ("a.parquet", "b.parquet"):
        t = pq.read_table(Path(res.uri) / "data" / name)
        assert t.schema.names == shard_slice.schema.names  # every original column
        out_rows += t.num_rows
        assert m["shards"][f"data/{name}"]["docs_out"] == t.num_rows
    assert out_rows == c["docs_out"]
    for rule, exs in m["examples_per_rule"].items():
        assert rule in m["removed_by_rule"]
        assert 1 <= len(exs) <= cfg.filter.examples_per_rule
        assert all(len(e["text"]) <= 200 and e["id"] for e in exs)
    # kept rows really pass the filter, removed examples really fail it with that rule
    chain = FilterChain(cfg.filter)
    kept = pq.read_table(Path(res.uri) / "data" / "a.parquet").column("id").to_pylist()
    by_id = {r["id"]: r for r in shard_slice.to_pylist()}
    assert all(chain(by_id[i]["text"], by_id[i]["url"]).keep for i in kept)
    for rule, exs in m["examples_per_rule"].items():
        assert all(chain(by_id[e["id"]]["text"], by_id[e["id"]]["url"]).reason == rule for e in exs)


def test_stage_is_deterministic_and_cached(artifact_root: Path, shard_slice: pa.Table, tmp_path: Path) -> None:
    uri = _publish_docs(artifact_root, {"a.parquet": shard_slice.slice(0, 96)})
    first = execute("filter", _cfg(artifact_root), {"docs": uri}, progress=False)
    again = execute("filter", _cfg(artifact_root), {"docs": uri}, progress=False)
    assert again.cached and again.uri == first.uri
    other_root = tmp_path / "other"
    other_root.mkdir()
    uri2 = _publish_docs(other_root, {"a.parquet": shard_slice.slice(0, 96)})
    second = execute("filter", _cfg(other_root, "filter.workers=1"), {"docs": uri2}, progress=False)
    assert second.manifest["files"] == first.manifest["files"]  # byte-identical output
    assert second.manifest["removed_by_rule"] == first.manifest["removed_by_rule"]
    changed = execute("filter", _cfg(artifact_root, "filter.gopher_quality.min_doc_words=10"), {"docs": uri}, progress=False)
    assert changed.uri != first.uri


def test_progress_bar_counts_every_document_in_workers_and_in_process(
        artifact_root: Path, shard_slice: pa.Table, capsys: pytest.CaptureFixture[str]) -> None:
    """The bar counts documents as the shards' batches finish (llm.data.parallel.advance), whether the
    shards run in worker processes or in this one; the output is the same either way."""
    uri = _publish_docs(artifact_root, {"a.parquet": shard_slice.slice(0, 80), "b.parquet": shard_slice.slice(80)})
    manifests = []
    for workers in (2, 1):
        capsys.readouterr()
        res = execute("filter", _cfg(artifact_root, f"filter.workers={workers}"), {"docs": uri}, force=True, progress=True)
        err = capsys.readouterr().err
        assert f"{shard_slice.num_rows}/{shard_slice.num_rows}" in err and "doc" in err, err[-500:]
        manifests.append(res.manifest)
    assert manifests[0]["files"] == manifests[1]["files"] and manifests[0]["counts"] == manifests[1]["counts"]


def test_blocklist_file_content_is_in_the_cache_key(artifact_root: Path, shard_slice: pa.Table, tmp_path: Path) -> None:
    uri = _publish_docs(artifact_root, {"a.parquet": shard_slice.slice(0, 64)})
    block = tmp_path / "block.txt"
    block.write_text("nothing-matches.invalid\n")
    cfg = _cfg(artifact_root, f"filter.url_blocklist={block}")
    a = execute("filter", cfg, {"docs": uri}, progress=False)
    host = next(u for u in shard_slice.slice(0, 64).column("url").to_pylist() if u)
    from urllib.parse import urlsplit

    block.write_text(urlsplit(host).hostname + "\n")
    b = execute("filter", cfg, {"docs": uri}, progress=False)
    assert a.uri != b.uri and b.manifest["removed_by_rule"].get("url_blocklist", 0) >= 1


# ---- bad input


def test_missing_text_column(artifact_root: Path) -> None:
    uri = _publish_docs(artifact_root, {"bad.parquet": pa.table({"id": ["1"], "content": ["hello"]})})
    with pytest.raises(StageError, match=r"data/bad\.parquet: no 'text' column"):
        execute("filter", _cfg(artifact_root), {"docs": uri}, progress=False)
    assert not list((artifact_root / "filter").glob("*/manifest.json"))


def test_empty_shard(artifact_root: Path) -> None:
    empty = pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    uri = _publish_docs(artifact_root, {"ok.parquet": pa.table({"id": ["1"], "text": [GOOD]}), "empty.parquet": empty})
    with pytest.raises(StageError, match=r"data/empty\.parquet: empty shard"):
        execute("filter", _cfg(artifact_root), {"docs": uri}, progress=False)


def test_non_utf8_text_names_the_row(artifact_root: Path) -> None:
    texts = [GOOD.encode(), GOOD.encode(), b"caf\xe9 au lait " * 20]
    table = pa.table({"id": ["1", "2", "3"], "text": pa.array(texts, pa.binary())})
    uri = _publish_docs(artifact_root, {"latin1.parquet": table})
    with pytest.raises(StageError, match=r"data/latin1\.parquet: row 2: field 'text' is not valid UTF-8"):
        execute("filter", _cfg(artifact_root, "filter.workers=1"), {"docs": uri}, progress=False)


def test_invalid_utf8_in_a_string_column(artifact_root: Path, tmp_path: Path) -> None:
    """Bytes that are not UTF-8 inside a column typed as string (a writer that did not validate)."""
    good = GOOD.encode()
    bad = b"\xff\xfe broken"
    data = good + bad
    offsets = pa.array([0, len(good), len(data)], pa.int32()).buffers()[1]
    arr = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(data)])
    uri = _publish_docs(artifact_root, {"s.parquet": pa.table({"id": ["1", "2"], "text": arr})})
    with pytest.raises(StageError, match=r"data/s\.parquet: row 1: field 'text' is not valid UTF-8"):
        execute("filter", _cfg(artifact_root, "filter.workers=1"), {"docs": uri}, progress=False)


def test_binary_utf8_text_is_decoded(artifact_root: Path) -> None:
    table = pa.table({"id": ["1"], "text": pa.array([GOOD.encode()], pa.binary())})
    uri = _publish_docs(artifact_root, {"bin.parquet": table})
    res = execute("filter", _cfg(artifact_root), {"docs": uri}, progress=False)
    out = pq.read_table(Path(res.uri) / "data" / "bin.parquet")
    assert out.schema.field("text").type == pa.string() and out.num_rows == 1


# ---- CLI


def test_cli_filter(artifact_root: Path, shard_slice: pa.Table, capsys: pytest.CaptureFixture[str]) -> None:
    from llm.cli.main import main

    uri = _publish_docs(artifact_root, {"a.parquet": shard_slice.slice(0, 64)})
    rc = main(["filter", "--input", f"docs={uri}", "--output", str(artifact_root), "--quiet", "--set", "filter.workers=1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "filter" in out and "docs_in=64" in out
    manifest = json.loads(next((artifact_root / "filter").glob("*/manifest.json")).read_text())
    assert manifest["counts"]["docs_in"] == 64
    # a bad input is one clear line and exit status 1
    bad = _publish_docs(artifact_root, {"x.parquet": pa.table({"id": ["1"], "body": ["x"]})})
    assert main(["filter", "--input", bad, "--output", str(artifact_root), "--quiet"]) == 1
    assert "no 'text' column" in capsys.readouterr().err


def test_hashed_ngram_statistics_match_plain_python(shard_slice: pa.Table) -> None:
    """On real documents, the numpy/hash n-gram statistics equal a straightforward string version."""
    from collections import Counter

    from llm.data.filters.gopher import _duplicate_ngram_chars, _top_ngram_chars

    for text in shard_slice.column("text").to_pylist()[:40]:
        doc = Doc(text)
        words = doc.words
        for n in (2, 3, 4):
            if len(words) < n:
                continue
            grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
            gram, count = Counter(grams).most_common(1)[0]
            assert _top_ngram_chars(doc, n) == len(gram) * count
        for n in (5, 8):
            got, _ = _duplicate_ngram_chars(doc, n, limit=-1, bound=None)
            assert got == _reference_duplicate_ngram_chars(words, n)
