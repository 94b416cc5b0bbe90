"""Word splitting for the quality filters: it must give the words datatrove's filters count.

datatrove's Gopher and FineWeb filters split English text with spaCy's blank "en" tokenizer,
and the FineWeb recipe's thresholds were set on those words. spaCy is not a Kiln dependency
(nor installed in CI), so the expected splits below are hard-coded: every one was produced by
spaCy 3.8.18 (``[t.text for t in spacy.blank("en").tokenizer(s)]``), the version datatrove
0.10.1 ran with in bench/bench_filter.py. The real-document pin was made the same way, with
whitespace tokens dropped as datatrove drops them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.data.filters import Doc, gopher_quality

SPACY_SPLITS = [
    # contractions: split only where spaCy lists them, with ' or ’ or no apostrophe
    ("Don't", ["Do", "n't"]),
    ("don't", ["do", "n't"]),
    ("DON'T", ["DON'T"]),
    ("dont", ["do", "nt"]),
    ("can't", ["ca", "n't"]),
    ("won't", ["wo", "n't"]),
    ("I'm", ["I", "'m"]),
    ("I'd've", ["I", "'d", "'ve"]),
    ("you're", ["you", "'re"]),
    ("it's", ["it", "'s"]),
    ("It’s", ["It", "’s"]),
    ("“You’re", ["“", "You", "’re"]),
    ("y'all", ["y'", "all"]),
    ("gonna", ["gon", "na"]),
    ("cannot", ["can", "not"]),
    ("wed", ["we", "d"]),
    ("shed", ["shed"]),
    ("its", ["its"]),
    ("ill", ["ill"]),
    ("John's", ["John", "'s"]),
    ("80's", ["80", "'s"]),
    ("'80s", ["'", "80s"]),
    ("dogs'", ["dogs", "'"]),
    ("(don't).", ["(", "do", "n't", ")", "."]),
    # a final "." comes off after a lower-case letter, a digit or two capitals; abbreviations keep it
    ("Smith.", ["Smith", "."]),
    ("A.", ["A."]),
    ("U.S.", ["U.S."]),
    ("USA.", ["USA", "."]),
    ("e.g.,", ["e.g.", ","]),
    ("(e.g.)", ["(", "e.g.", ")"]),
    ("Dr.", ["Dr."]),
    ("Jan.", ["Jan."]),
    ("jan.", ["jan", "."]),
    ("etc.", ["etc", "."]),
    ("Ph.D.", ["Ph.D."]),
    ("Ph.D.s", ["Ph", ".", "D.s"]),
    ("wed.", ["we", "d."]),
    ("1.", ["1", "."]),
    ("(A.", ["(", "A."]),
    ("xD.", ["xD."]),
    ("half-A.", ["half", "-", "A."]),
    ("Im.", ["I", "m."]),
    ('"Jan."', ['"', "Jan.", '"']),
    ("dogs’.", ["dogs", "’", "."]),
    ("(1,000.5).", ["(", "1,000.5", ")", "."]),
    ("...", ["..."]),
    ("word...", ["word", "..."]),
    # infixes, and URLs / e-mail addresses that are not split at them
    ("end.The", ["end", ".", "The"]),
    ("word.another", ["word.another"]),
    ("example.com/path", ["example.com/path"]),
    ("http://x.com/a.", ["http://x.com/a", "."]),
    ("foo@bar.com", ["foo@bar.com"]),
    ("well-known", ["well", "-", "known"]),
    ("10-year", ["10", "-", "year"]),
    ("2020-01-01", ["2020", "-", "01", "-", "01"]),
    ("a--b", ["a", "--", "b"]),
    ("a/b", ["a", "/", "b"]),
    ("and/or", ["and/or"]),
    ("A/B", ["A", "/", "B"]),
    ("x=y", ["x", "=", "y"]),
    ("9:30", ["9:30"]),
    ("a:b", ["a", ":", "b"]),
    # numbers, currencies, units, times
    ("$10", ["$", "10"]),
    ("US$10", ["US$", "10"]),
    ("10%", ["10", "%"]),
    ("5km.", ["5", "km", "."]),
    ("3m/s", ["3", "m/s"]),
    ("1990s", ["1990s"]),
    ("1,000", ["1,000"]),
    ("3.5", ["3.5"]),
    ("+5", ["+5"]),
    ("+a", ["+", "a"]),
    ("5+", ["5", "+"]),
    ("10am", ["10", "am"]),
    ("10am.", ["10", "am", "."]),
    ("13am", ["13am"]),
    ("°C.", ["°", "C", "."]),
    ("5°C.", ["5", "°", "C", "."]),
    # brackets and quotes; emoticons are kept whole, even "8)" in "(8)"
    ("(1)", ["(", "1", ")"]),
    ("[1]", ["[", "1", "]"]),
    ("(8)", ["(", "8)"]),
    ("“Hello,", ["“", "Hello", ","]),
    ("Hello!”", ["Hello", "!", "”"]),
    ("—a", ["—", "a"]),
    ("x:)", ["x", ":)"]),
    ("é):(:“", ["é", "):", "(", ":", "“"]),
]


@pytest.mark.parametrize("text, words", SPACY_SPLITS)
def test_words_split_like_spacy(text: str, words: list[str]) -> None:
    assert Doc(text).words == words


def test_every_whitespace_separates_and_is_dropped() -> None:
    text = "Hello,  world\n\tdon't\u00a0stop\u2003now."
    assert Doc(text).words == ["Hello", ",", "world", "do", "n't", "stop", "now", "."]
    # a chunk splits the same wherever it appears (and however often: splits are memoised)
    assert Doc("x " + text + " " + text).words == ["x", *Doc(text).words, *Doc(text).words]


def test_symbol_and_letter_words_are_counted_as_datatrove_counts_them() -> None:
    """Only datatrove's punctuation list makes a word "symbol only"; a letter is ``str.isalpha``."""
    doc = Doc("; § ‘ £ • ² word ... —")
    assert doc.words == [";", "§", "‘", "£", "•", "²", "word", "...", "—"]
    assert doc.n_symbol_words == 3  # ";", "...", "—"; not "§", "‘", "£", "•", "²"
    assert doc.symbol_word_chars == 5
    assert doc.n_alpha_words == 1  # "²" is a digit, not a letter


def test_gopher_word_count_includes_symbols_outside_that_list() -> None:
    """45 words plus 6 symbols: "§" counts towards the 50-word minimum (as in datatrove), ";" does not."""
    body = " ".join(f"the river{i} and" for i in range(15))
    assert gopher_quality(body + " §" * 6) == (True, None)
    assert gopher_quality(body + " ;" * 6) == (False, "gopher_quality.short_doc")


def test_real_documents_split_exactly_as_spacy(shared_data: Path) -> None:
    """The first 160 kit documents: 327,890 words, the same sequence spaCy gives (hash of the words)."""
    pf = pq.ParquetFile(shared_data / "pretrain" / "shard_00000.parquet")
    texts = pa.Table.from_batches([next(pf.iter_batches(batch_size=160))]).column("text").to_pylist()
    words = [w for text in texts for w in Doc(text).words]
    assert len(words) == 327_890
    digest = hashlib.sha256("\n".join(words).encode()).hexdigest()
    assert digest == "8b03cf0382c1059334492f22b2ec6d46cddeec58acf66557a4f6cac18b9e3c38"
