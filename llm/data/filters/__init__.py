"""The FineWeb recipe's heuristic quality filters, written for speed (see text.py for how).

Each rule is a pure function of a document (a ``str`` or a shared :class:`Doc` view) and its
config section, returning ``(keep, reason)``; :class:`FilterChain` runs them in FineWeb's order.
"""

from .c4 import C4Result, c4_clean, c4_quality, count_sentences
from .chain import Decision, FilterChain
from .fineweb import fineweb_quality
from .gopher import gopher_quality, gopher_repetition
from .language import language_filter
from .text import Doc
from .urls import UrlBlocklist, url_filter

__all__ = [
    "C4Result", "Decision", "Doc", "FilterChain", "UrlBlocklist", "c4_clean", "c4_quality", "count_sentences",
    "fineweb_quality", "gopher_quality", "gopher_repetition", "language_filter", "url_filter",
]
