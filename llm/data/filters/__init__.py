"""The FineWeb recipe's heuristic quality filters, written for speed (see text.py for how).

Each rule is a pure function of a document (a ``str`` or a shared :class:`Doc` view) and its
config section, returning ``(keep, reason)``; :class:`FilterChain` runs them in FineWeb's order.
"""

from llm.data.filters.c4 import C4Result, c4_clean, c4_quality, count_sentences
from llm.data.filters.chain import Decision, FilterChain
from llm.data.filters.fineweb import fineweb_quality
from llm.data.filters.gopher import gopher_quality, gopher_repetition
from llm.data.filters.language import language_filter
from llm.data.filters.text import Doc
from llm.data.filters.urls import UrlBlocklist, url_filter

__all__ = [
    "C4Result", "Decision", "Doc", "FilterChain", "UrlBlocklist", "c4_clean", "c4_quality", "count_sentences",
    "fineweb_quality", "gopher_quality", "gopher_repetition", "language_filter", "url_filter",
]
