"""A URL block-list hook: drop documents whose URL is on a list of domains or URL substrings.

File format (``filter.url_blocklist``): one entry per line, ``#`` starts a comment.
An entry without ``/`` is a domain and matches that host and its subdomains
(``example.com`` blocks ``example.com`` and ``www.example.com``, not ``badexample.com``);
an entry with ``/`` is a substring matched against the lower-cased URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(frozen=True)
class UrlBlocklist:
    domains: frozenset[str]
    substrings: tuple[str, ...]

    @classmethod
    def from_lines(cls, lines: list[str]) -> "UrlBlocklist":
        domains, subs = set(), []
        for raw in lines:
            entry = raw.split("#", 1)[0].strip().lower()
            if not entry:
                continue
            if "/" in entry:
                subs.append(entry)
            else:
                domains.add(entry.lstrip("."))
        return cls(frozenset(domains), tuple(subs))

    @classmethod
    def from_file(cls, path: str | Path) -> "UrlBlocklist":
        return cls.from_lines(Path(path).read_text(encoding="utf-8").splitlines())

    def blocked(self, url: str | None) -> bool:
        if not url:
            return False
        low = url.strip().lower()
        if self.domains:
            host = urlsplit(low if "//" in low else f"//{low}").hostname or ""
            parts = host.split(".")
            # every suffix of the host: a.b.example.com -> a.b.example.com, b.example.com, example.com, com
            if any(".".join(parts[i:]) in self.domains for i in range(len(parts))):
                return True
        return any(s in low for s in self.substrings)


def url_filter(url: str | None, blocklist: UrlBlocklist) -> tuple[bool, str | None]:
    return (False, "url_blocklist") if blocklist.blocked(url) else (True, None)
