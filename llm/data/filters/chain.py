"""The FineWeb recipe's rule order, built from :class:`llm.config.FilterConfig`.

Order (FineWeb's): URL block list -> language -> Gopher repetition -> Gopher quality -> C4 ->
FineWeb quality. The first rule that removes a document is the one it is counted under.
C4 may rewrite a kept document's text; FineWeb quality then judges the rewritten text.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm.config import FilterConfig
from llm.data.filters.c4 import c4_clean
from llm.data.filters.fineweb import fineweb_quality
from llm.data.filters.gopher import gopher_quality, gopher_repetition
from llm.data.filters.language import language_filter
from llm.data.filters.text import Doc
from llm.data.filters.urls import UrlBlocklist, url_filter


@dataclass(frozen=True)
class Decision:
    keep: bool
    reason: str | None  # the first rule that removed the document
    text: str  # the text to publish when kept (C4 may have removed lines)


class FilterChain:
    """Apply every enabled rule of a :class:`FilterConfig` to one document at a time."""

    def __init__(self, cfg: FilterConfig, blocklist: UrlBlocklist | None = None) -> None:
        self.cfg = cfg
        if blocklist is None and cfg.url_blocklist:
            blocklist = UrlBlocklist.from_file(cfg.url_blocklist)
        self.blocklist = blocklist
        if cfg.language.enabled:
            from llm.data.filters.language import load_model

            load_model()  # fail at start-up, not on the first document, if the detector is missing

    def __call__(self, text: str, url: str | None = None) -> Decision:
        cfg = self.cfg
        if self.blocklist is not None:
            keep, why = url_filter(url, self.blocklist)
            if not keep:
                return Decision(False, why, text)
        if cfg.language.enabled:
            keep, why = language_filter(text, cfg.language)
            if not keep:
                return Decision(False, why, text)
        doc = Doc(text)
        for rule, rule_cfg in ((gopher_repetition, cfg.gopher_repetition), (gopher_quality, cfg.gopher_quality)):
            if rule_cfg.enabled:
                keep, why = rule(doc, rule_cfg)
                if not keep:
                    return Decision(False, why, text)
        if cfg.c4.enabled:
            r = c4_clean(doc, cfg.c4)
            if not r.keep:
                return Decision(False, r.reason, text)
            if r.text != text:
                text, doc = r.text, Doc(r.text)
        if cfg.fineweb_quality.enabled:
            keep, why = fineweb_quality(doc, cfg.fineweb_quality)
            if not keep:
                return Decision(False, why, text)
        return Decision(True, None, text)
