"""English word splitting that reproduces spaCy's rule-based English tokenizer, without spaCy.

Why: datatrove's Gopher and FineWeb filters count words with spaCy's blank English pipeline,
and the FineWeb recipe's thresholds (share of words with a letter, mean word length, n-gram
repetition, newlines per word) were set on those words. A tokenizer that merely resembles it
moves documents near a threshold across it. So this module re-implements the tokenizer's
rules (its documented algorithm, checked against its output on the data kit) instead of
approximating them:

1. Whitespace separates chunks and each chunk is split on its own, so splits are memoised
   per chunk (:func:`split_text` is a dictionary look-up for almost every chunk).
2. A chunk that is a special case (a contraction "don't" -> "do", "n't", an abbreviation
   "Dr.", an emoticon ":)") gets its fixed split.
3. Otherwise one prefix ("(", quotes, "$", ...) and one suffix (")", ",", "'s", a "." after a
   lower-case letter or digit, units after a number, ...) are peeled off at a time, until
   nothing more comes off or what remains is a special case.
4. What remains is split at infixes ("well-known", "a/b", "end.The", "x,y") unless it looks
   like a URL or e-mail address.
5. A special case that came out as several tokens ("wed." -> "we", "d", ".") is merged back
   ("we", "d.").

Character classes follow the tokenizer's: "letters" are ``str.isalpha`` characters, "lower"
are letters that are not upper case (uncased scripts count as both lower and upper), icons
are Unicode "other symbols" (So). The tokenizer lists its letters by script instead, so splits
differ next to rare letters (modifier letters, "µ", Greek Extended, scripts it does not list);
bench/results_filter.md lists every known difference and measures the effect on decisions.

Each word is also classed as datatrove's Gopher filter classes it (symbol only, has a letter),
and the counts are memoised with the split.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from itertools import chain
from operator import itemgetter

import numpy as np

# --------------------------------------------------------------------------- character classes


@lru_cache(maxsize=1)
def all_chars() -> str:
    """Every code point except surrogates, decoded in one go (much faster than a chr() loop)."""
    cps = np.concatenate([np.arange(0, 0xD800), np.arange(0xE000, 0x110000)]).astype("<u4")
    return cps.tobytes().decode("utf-32-le")


def char_class(chars: str) -> str:
    """A compact ``[...]`` body (ranges) for a set of characters, usable in ``re``."""
    codes = sorted(set(map(ord, chars)))
    parts: list[str] = []
    i = 0
    while i < len(codes):
        j = i
        while j + 1 < len(codes) and codes[j + 1] == codes[j] + 1:
            j += 1
        a, b = chr(codes[i]), chr(codes[j])
        parts.append(re.escape(a) if i == j else f"{re.escape(a)}-{re.escape(b)}")
        i = j + 1
    return "".join(parts)


def all_chars_in(body: str) -> frozenset[str]:
    """The characters a ``[...]`` class body matches."""
    return frozenset(re.findall(f"[{body}]", all_chars()))


@lru_cache(maxsize=1)
def classes() -> dict[str, str]:
    """``[...]`` bodies for letters, lower-case letters, upper-case letters and icons (see module docstring)."""
    import regex  # a tiktoken dependency, always present; scans all code points in C, once

    chars = all_chars()
    letters = "".join(filter(str.isalpha, chars))
    return {
        "alpha": char_class(letters),
        "lower": char_class("".join(c for c in letters if not c.isupper())),
        "upper": char_class("".join(c for c in letters if not c.islower())),
        "icon": char_class("".join(regex.findall(r"\p{So}", chars))),
    }


# Punctuation the tokenizer splits off either end of a chunk, one character at a time.
_PUNCT = ",:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪…"
_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉\u2329\u232a⟦⟧"
_CURRENCY = "$£€¥฿₽﷼₴₠₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₵₶₷₸₹₺₻₼₾₿"
_UNITS = (
    "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s km/h kmh mph hPa Pa "
    "mbar mb MB kb KB gb GB tb TB T G M K % км км² км³ м м² м³ дм дм² дм³ см см² см³ мм мм² мм³ нм кг г мг м/с км/ч "
    "кПа Па мбар Кб КБ кб Мб МБ мб Гб ГБ гб Тб ТБ тб كم كم² كم³ م م² م³ سم سم² سم³ مم مم² مم³ غرام جرام جم كغ ملغ كوب اكواب"
).split()
_HYPHENS = ("-", "–", "—", "--", "---", "——", "~")
_DIGITS = frozenset("0123456789")


@lru_cache(maxsize=1)
def _affix_sets() -> dict[str, frozenset[str]]:
    """Character sets for the prefix and suffix rules (set look-ups beat regexes on short chunks)."""
    icons = all_chars_in(classes()["icon"])
    return {
        "prefix": frozenset(_PUNCT + _QUOTES + _CURRENCY + "§%=—–") | icons,
        "suffix": frozenset(_PUNCT + _QUOTES + "—–") | icons,
        # a final "." is split off after these (and after a lower-case letter)
        "dot_after": frozenset(_PUNCT + _QUOTES + "|%²-+") | _DIGITS,
    }


@lru_cache(maxsize=1)
def _number_tails() -> dict[str, tuple[str, ...]]:
    """Units and currencies split off a number ("5km", "10$"), by last character, longest first."""
    out: dict[str, list[str]] = {}
    for tail in sorted({*_UNITS, *_CURRENCY, "US$", "C$", "A$", "+"}, key=len, reverse=True):
        out.setdefault(tail[-1], []).append(tail)
    return {k: tuple(v) for k, v in out.items()}


def _is_lower(c: str) -> bool:
    return c.isalpha() and not c.isupper()  # uncased letters count as lower (and upper)


def _is_upper(c: str) -> bool:
    return c.isalpha() and not c.islower()


def _prefix_len(text: str) -> int:
    """Length of the prefix split off the front of ``text`` (0 if none)."""
    c = text[0]
    if c == ".":
        n = len(text) - len(text.lstrip("."))
        return n if n > 1 else 0  # "..." is one prefix; a single "." is none
    if c in _affix_sets()["prefix"]:
        return 1
    if c == "+":
        return 0 if text[1:2] in _DIGITS else 1  # "+5" stays whole
    if text.startswith("US$"):
        return 3
    return 2 if text[:2] in ("C$", "A$") else 0


def _suffix_len(text: str) -> int:
    """Length of the suffix split off the end of ``text`` (0 if none): the longest tail a rule matches."""
    n, last = len(text), text[-1]
    if last == ".":
        dots = n - len(text.rstrip("."))
        if dots > 1:
            return dots
        prev = text[-2:-1]
        if prev and (prev in _affix_sets()["dot_after"] or _is_lower(prev)):
            return 1  # "end." "1." "etc.)."
        if n > 2 and ((text[-3] == "°" and prev in "FfCcKk") or (_is_upper(prev) and _is_upper(text[-3]))):
            return 1  # "°F." "USA." (but not "A." or "U.S.")
        return 0
    best = 0
    for tail in _number_tails().get(last, ()):  # "5km" "10%" "3+" "20$"
        size = len(tail)
        if n > size and text[-size - 1] in _DIGITS and text.endswith(tail):
            best = size
            break
    if n > 1 and ((last in "sS" and text[-2] in "'’") or (last == "…" and text[-2] == "…")):
        best = max(best, 2)  # "'s" "’S" "……"
    if not best and last in _affix_sets()["suffix"]:
        best = 1
    return best


@lru_cache(maxsize=1)
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """(infix gate, infix, url) expressions, built once."""
    c = classes()
    al, lo, up, ic = c["alpha"], c["lower"], c["upper"], c["icon"]
    q = char_class(_QUOTES)
    hyphens = "|".join(map(re.escape, _HYPHENS))
    # Every infix holds one of these characters; a chunk without any is not searched further.
    gate = re.compile(rf"[.…+\-*^,:<>=/–—~{ic}]")
    infix = re.compile(
        rf"(?=[.…+\-*^,:<>=/–—~{ic}])"  # the gate first: most positions fail on one character test
        rf"(?:\.\.+|…|[{ic}]"
        r"|(?<=[0-9])[+\-*^](?=[0-9-])"
        rf"|(?<=[{lo}{q}])\.(?=[{up}{q}])"
        rf"|(?<=[{al}]),(?=[{al}])"
        rf"|(?<=[{al}0-9])(?:{hyphens})(?=[{al}])"
        rf"|(?<=[{al}0-9])[:<>=/](?=[{al}]))"
    )
    host = "[A-Za-z0-9\u00a1-\uffff](?:[A-Za-z0-9\u00a1-\uffff_-]{0,62}[A-Za-z0-9\u00a1-\uffff])?"
    url = re.compile(
        r"(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?"  # scheme, user[:password]@
        rf"(?:\d{{1,3}}(?:\.\d{{1,3}}){{3}}|(?:{host}\.)+[{lo}]{{2,63}})"  # IPv4 address or host.tld
        r"(?::\d{2,5})?(?:[/?#]\S*)?\Z"  # port, path
    )
    return gate, infix, url


# --------------------------------------------------------------------------- special cases

_APOSTROPHES = ("'", "’")


def _contractions() -> dict[str, tuple[str, ...]]:
    """English contractions, split into word + clitic(s), with ' and ’ and without an apostrophe.

    The apostrophe-less forms ("dont" -> "do", "nt") are split too, except where they spell a
    common word ("ill", "well", "were", "hell", "shed", "shell", "its", "lets", "whore").
    """
    clitics = {
        "i": "d d've ll ll've m ma ve",
        "you we they": "d d've ll ll've re ve",
        "he she it that this": "d d've ll ll've s",
        "these those": "d d've ll ll've re ve",
        "there what when where why how who": "d d've ll ll've re s ve",
        "could might must should would not": "ve",
        "let": "s",
    }
    negatable = "ai are ca could dare did does do had has have is may might must need ought sha should was were wo would"
    no_ve = {"ai", "are", "dare", "has", "have", "is", "was", "were"}
    words_not_contractions = {"ill", "well", "were", "hell", "shed", "shell", "its", "lets", "whore"}
    forms: list[tuple[str, ...]] = []  # word pieces with "'" standing for the apostrophe
    for hosts, tails in clitics.items():
        for host in hosts.split():
            for tail in tails.split():
                forms.append((host, *("'" + t for t in tail.split("'"))))
    for stem in negatable.split():
        forms.append((stem, "n't"))
        if stem not in no_ve:
            forms.append((stem, "n't", "'ve"))
    out: dict[str, tuple[str, ...]] = {}
    for apo in _APOSTROPHES:
        out[f"how{apo}d{apo}y"] = ("how", f"{apo}d", f"{apo}y")  # no bare form: that is "howdy"
        out[f"c{apo}mon"] = (f"c{apo}m", "on")
        out[f"y{apo}all"] = (f"y{apo}", "all")
    for pieces in forms:
        for apo in _APOSTROPHES:
            split = tuple(p.replace("'", apo) for p in pieces)
            if split[-1] == apo + "ma":  # "I'ma" -> "I", "'m", "a"
                split = (*split[:-1], apo + "m", "a")
            out["".join(split)] = split
        bare = tuple(p.replace("'", "") for p in pieces)
        if bare[-1] == "ma":
            bare = (*bare[:-1], "m", "a")
        if "".join(bare) not in words_not_contractions:
            out["".join(bare)] = bare
    for text, split in (("cannot", ("can", "not")), ("gonna", ("gon", "na")), ("gotta", ("got", "ta")),
                        ("yall", ("y", "all"))):
        out[text] = split
    # Capitalised forms split the same way ("i" is also written "I"); "Y'all" is one word.
    for text, split in list(out.items()):
        if text in ("yall", "y'all", "y’all"):
            continue
        out.setdefault(text[0].upper() + text[1:], (split[0][0].upper() + split[0][1:], *split[1:]))
    return out


# Abbreviations that keep their final "." (it would otherwise be split off after a lower-case letter).
_ABBREVIATIONS = (
    "Adm. Bros. Co. Corp. Dr. Gen. Gov. Id. Inc. Jr. Ltd. Messrs. Mr. Mrs. Ms. Mt. Prof. Rep. Rev. Sen. St. co. vs. v.s. "
    "Jan. Feb. Mar. Apr. Jun. Jul. Aug. Sep. Sept. Oct. Nov. Dec. "
    "Ak. Ala. Ariz. Ark. Calif. Colo. Conn. Del. Fla. Ga. Ia. Ill. Ind. Kan. Kans. Ky. La. Md. Mass. Mich. Minn. Miss. "
    "Mo. Mont. Neb. Nebr. Nev. Okla. Ore. Pa. Tenn. Va. Wash. Wis. "
    "D.C. N.C. N.D. N.H. N.J. N.M. N.Y. S.C. Ph.D. e.g. E.g. E.G. i.e. I.e. I.E. a.m. p.m. "
    "ä. ö. ü."
).split() + [f"{chr(c)}." for c in range(ord("a"), ord("z") + 1)]

# Tokens kept whole although they contain characters that would be split off.
_WHOLE = (
    "' '' ’’ C++ and/or w/o \\n \\t \\\") <space> — ’ "
    "'s 'S ’s ’S ‘s ‘S 'd ’d 'll ’ll 're ’re 'em ’em 'bout ’bout 'nuff ’nuff "
    "'cause 'Cause ’cause ’Cause 'cos 'Cos ’cos ’Cos 'coz 'Coz ’coz ’Coz 'cuz 'Cuz ’cuz ’Cuz "
    "ma'am Ma'am ma’am Ma’am o'clock O'clock o’clock O’clock ol' Ol' ol’ Ol’"
).split() + [f"{w}{apo}" for w in ("doin", "goin", "havin", "lovin", "nothin", "nuthin", "somethin")
             for w in (w, w.capitalize()) for apo in _APOSTROPHES]

# Emoticons (kept whole; several start with a digit, which matters for list markers like "(8)").
_EMOTICONS = (
    ":) :)) :))) :-) :-)) :-))) :( :(( :((( :-( :-(( :-((( :'( :') :'-( :'-) :’( :’) :’-( :’-) :() :* :-* :/ :-/ "
    ":0 :-0 :1 :3 :-3 :> :-> :D :-D :O :-O :o :-o :o) :P :-P :p :-p :X :-X :x :-x :| :-| :] :-] :} :-} "
    ";) ;-) ;D ;-D ;_; (: (-: (; (-; (= (o: ): )-: [: [-: [= ]= =( =) =/ =3 =D =[ =] =| "
    "<3 <33 <333 </3 8) 8-) 8D 8-D (-8 XD XDD xD xDD >.< >.> <.< >:( >:o ^_^ ^__^ ^___^ -_- -__- ._. "
    "0.0 0.o 0_0 0_o o.0 o.O o.o o_0 o_O o_o O.O O.o O_O O_o v.v v_v V.V V_V @_@ (*_*) (-_-) (._.) (>_<) (^_^) "
    "(¬_¬) (ಠ_ಠ) ಠ_ಠ ಠ︵ಠ ¯\\(ツ)/¯ (╯°□°）╯︵┻━┻ ><(((*>"
).split()


@lru_cache(maxsize=1)
def special_cases() -> dict[str, tuple[str, ...]]:
    """Every chunk with a fixed split: contractions, times ("10am"), abbreviations, emoticons."""
    out = _contractions()
    for hour in range(1, 13):
        for mark in ("am", "pm", "a.m.", "p.m."):
            out[f"{hour}{mark}"] = (str(hour), mark)
    for token in (*_ABBREVIATIONS, *_WHOLE, *_EMOTICONS):
        out[token] = (token,)
    for scale in "CFKcfk":  # "°C." is three tokens where the affix rules would give "°", "C."
        out[f"°{scale}."] = ("°", scale, ".")
    return out


# --------------------------------------------------------------------------- the tokenizer


def _split_infixes(text: str) -> list[str]:
    gate, infix, url = _patterns()
    if text.isalpha() or not gate.search(text, 1):
        return [text]
    found = [m.span() for m in infix.finditer(text) if m.start() > 0]
    if not found or url.match(text):
        return [text]
    out: list[str] = []
    start = 0
    for a, b in found:
        if a > start:
            out.append(text[start:a])
        if b > a:
            out.append(text[a:b])
        start = b
    if start < len(text):
        out.append(text[start:])
    return out


def _split_affixes(chunk: str, specials: dict[str, tuple[str, ...]]) -> list[str]:
    """Steps 2-4 of the module docstring for one whitespace-free chunk."""
    prefixes: list[str] = []
    suffixes: list[str] = []
    text = chunk
    while text and text not in specials:
        size = len(text)
        pre = _prefix_len(text)
        if pre and text[pre:] in specials:
            prefixes.append(text[:pre])
            text = text[pre:]
            break
        suf = _suffix_len(text[pre:]) if pre < size else 0  # the suffix rules do not see the prefix
        if suf and text[:-suf] in specials:
            suffixes.append(text[-suf:])
            text = text[:-suf]
            break
        if pre and suf and pre + suf <= size:
            prefixes.append(text[:pre])
            suffixes.append(text[-suf:])
            text = text[pre:-suf]
        elif pre:
            prefixes.append(text[:pre])
            text = text[pre:]
        elif suf:
            suffixes.append(text[-suf:])
            text = text[:-suf]
        if len(text) == size:
            break
    middle = list(specials[text]) if text in specials else _split_infixes(text) if text else []
    return prefixes + middle + suffixes[::-1]


@lru_cache(maxsize=1)
def _mergeable() -> tuple[dict[tuple[str, ...], tuple[str, ...]], int, frozenset[str], frozenset[tuple[str, str]]]:
    """Special cases that the affix rules would split, keyed by those pieces (step 5).

    Also the most pieces in a key, the keys' first pieces, and their first two pieces (tokens
    without one of these pairs side by side have nothing to merge).
    """
    out: dict[tuple[str, ...], tuple[str, ...]] = {}
    for text, split in special_cases().items():
        pieces = tuple(_split_affixes(text, {}))
        if len(pieces) > 1:
            out[pieces] = split
    return out, max(map(len, out)), frozenset(k[0] for k in out), frozenset(k[:2] for k in out)


def _merge_specials(tokens: list[str]) -> list[str]:
    """Merge runs of tokens that spell a special case, choosing among overlapping runs as spaCy does.

    Longer runs first, then leftmost; a run is taken when its first and last tokens are still
    free, and every run considered, taken or not, uses up its tokens (so "é):(:" merges only "):").
    """
    merge, longest, firsts, pairs = _mergeable()
    if firsts.isdisjoint(tokens) or pairs.isdisjoint(zip(tokens, tokens[1:])):
        return tokens
    runs = [(n, i) for n in range(min(longest, len(tokens)), 1, -1) for i in range(len(tokens) - n + 1)
            if tuple(tokens[i:i + n]) in merge]
    taken: dict[int, int] = {}
    used: set[int] = set()
    for n, i in runs:
        if i not in used and i + n - 1 not in used:
            taken[i] = n
        used.update(range(i, i + n))
    if not taken:
        return tokens
    out: list[str] = []
    i = 0
    while i < len(tokens):
        n = taken.get(i)
        if n is None:
            out.append(tokens[i])
            i += 1
        else:
            out.extend(merge[tuple(tokens[i:i + n])])
            i += n
    return out


# A word wrapped in punctuation that comes off one piece at a time: "(word", "word),", "well-known." "1,000."
_LEAD = "([\"“‘"
_TRAIL = ",;:!?)]\"”’"
_DASHES = "-–—"
_WRAPPED_RE = re.compile(
    rf"([{re.escape(_LEAD)}]*)"  # leading punctuation: one prefix per character
    rf"([^\W\d_]+(?:[{_DASHES}][^\W\d_]+)*|[0-9]+(?:[.,][0-9]+)*)"  # words joined by dashes, or a number
    rf"((?:[{re.escape(_TRAIL)}]|\.+)*)"  # trailing punctuation: one suffix per character or run of dots
)
_DASH_SPLIT_RE = re.compile(f"([{_DASHES}])")
_TRAIL_PIECES_RE = re.compile(r"\.\.+|.")


@lru_cache(maxsize=1)
def _wrapped_specials() -> frozenset[str]:
    """Cores that some special case wraps in that punctuation ("Jan" of "Jan.", "s" of "‘s", "8" of "8)")."""
    out = set()
    for text in special_cases():
        m = _WRAPPED_RE.fullmatch(text)
        if m and m.group(2) != text:
            out.add(m.group(2))
    return frozenset(out)


def _split_wrapped(chunk: str, specials: dict[str, tuple[str, ...]]) -> list[str] | None:
    """The affix loop's result for a core wrapped in plain punctuation, computed directly; else None.

    Every leading character is a prefix and every trailing character (or run of dots) a suffix,
    whatever surrounds it, except a single "." right after the core, which comes off only where
    the suffix rule allows it. Dashes between letters are infixes; "." and "," inside a number
    are not. No special case can match part-way (cores that a special case wraps go the long
    way), so only the core itself may be one.
    """
    m = _WRAPPED_RE.fullmatch(chunk)
    if m is None:
        return None
    lead, core, trail = m.groups()
    if core in _wrapped_specials():
        return None
    tail = _TRAIL_PIECES_RE.findall(trail) if "." in trail else list(trail)
    dot = ""
    if tail and tail[0] == "." and core[-1] not in _DIGITS and not (
            _is_lower(core[-1]) or (_is_upper(core[-1]) and _is_upper(core[-2:-1]))):
        dot = tail.pop(0)  # "A." keeps its "." ("end." and "USA." do not: see _suffix_len)
    if core[0] in _DIGITS:
        middle = list(specials.get(core, (core,)))
    else:
        middle = _DASH_SPLIT_RE.split(core)  # "well-known" -> "well", "-", "known"
        if not all(map(str.isalpha, middle[::2])):
            return None  # letters as ``re`` sees them ("²"), not as the tokenizer does
        if len(middle) == 1 and not dot:
            middle = list(specials.get(core, (core,)))
        middle[-1] += dot  # a word that keeps its "." is no special case: its core would be wrapped
    return [*lead, *middle, *tail]


def split_chunk(chunk: str) -> tuple[str, ...]:
    """The words of one whitespace-free chunk (uncached; see :func:`split_text`)."""
    specials = special_cases()
    split = specials.get(chunk)
    if split is not None:
        return split
    if chunk.isalpha():  # no rule splits letters apart: the common case, answered early
        return (chunk,)
    tokens = _split_wrapped(chunk, specials)
    if tokens is None:
        tokens = _split_affixes(chunk, specials)
    return tuple(_merge_specials(tokens) if len(tokens) > 1 else tokens)


# --------------------------------------------------------------------------- word classes


@lru_cache(maxsize=1)
def terminal_punctuation() -> tuple[str, ...]:
    """Unicode Sentence_Terminal characters ('.', '!', '?', '。', '؟', ...), for line-end rules."""
    import regex  # a tiktoken dependency, always present; only used once to list the characters

    return tuple(regex.findall(r"\p{Sentence_Terminal}", all_chars()))


@lru_cache(maxsize=1)
def symbol_chars() -> str:
    """Characters that make a word "symbol only" for the Gopher word statistics.

    The set datatrove's Gopher filter uses, so that word counts and mean word lengths agree:
    ASCII punctuation, a short list of typographic and CJK marks, control characters and
    sentence terminals. Symbols outside it ("‘", "§", "£", "•", "×") count as words there,
    and so they do here.
    """
    controls = "".join(map(chr, (*range(0, 9), *range(11, 32), *range(127, 160))))
    return string.punctuation + "«´»–—’“”„…∶━►、〈〉《》「」【】％（），１：；～" + controls + "".join(terminal_punctuation())


@lru_cache(maxsize=1)
def _word_classes() -> tuple[frozenset[str], re.Pattern[str], re.Pattern[str]]:
    """(symbol characters, a symbol-only word, a letter) for classifying words."""
    symbols = symbol_chars()
    return frozenset(symbols), re.compile(f"[{char_class(symbols)}]+"), re.compile(f"[{classes()['alpha']}]")


Entry = tuple[tuple[str, ...], int, int, int]


def _entry(chunk: str) -> Entry:
    """A chunk's words, with its symbol-only words, their characters, and its words with a letter.

    A word is symbol-only when every character is in :func:`symbol_chars`, and has a letter when
    one character is ``str.isalpha`` (no symbol character is), as datatrove's Gopher filter counts.
    """
    words = split_chunk(chunk)
    symbols, symbol_word, letter = _word_classes()
    n_symbol = symbol_chars_ = n_alpha = 0
    for word in words:
        if word.isalpha():
            n_alpha += 1
        elif word in symbols or (len(word) > 1 and symbol_word.fullmatch(word)):
            n_symbol += 1
            symbol_chars_ += len(word)
        elif len(word) > 1 and letter.search(word):
            n_alpha += 1
    return words, n_symbol, symbol_chars_, n_alpha


_CACHE: dict[str, Entry] = {}
_CACHE_MAX = 500_000  # chunks, about 100 MB (a kit shard fills 353k); cleared when full, which only costs re-splitting


def split_text(text: str) -> tuple[list[str], int, int, int]:
    """(words, symbol-only words, their characters, words with a letter) of a text.

    The words are spaCy's English tokens with whitespace tokens dropped, as datatrove's filters
    see them; the counts are summed from per-chunk counts kept in the memo with the split.
    """
    chunks = text.split()
    new = set(chunks).difference(_CACHE)  # set operations run in C; most chunks were seen before
    if new:
        if len(_CACHE) + len(new) > _CACHE_MAX:
            _CACHE.clear()
            new = set(chunks)
        specials = special_cases()
        for chunk in new:
            # a word of letters is one word with a letter (the common case, answered here)
            _CACHE[chunk] = ((chunk,), 0, 0, 1) if chunk.isalpha() and chunk not in specials else _entry(chunk)
    entries = list(map(_CACHE.__getitem__, chunks))
    words = list(chain.from_iterable(map(itemgetter(0), entries)))
    return words, sum(map(itemgetter(1), entries)), sum(map(itemgetter(2), entries)), sum(map(itemgetter(3), entries))

