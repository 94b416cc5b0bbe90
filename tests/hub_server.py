"""A local stand-in for the Hugging Face hub's dataset URLs, with fault injection (a test helper).

It serves a directory as the dataset repo ``<owner>/<name>`` at one revision (a branch name) whose
head is one commit (``commit``, a fixed fake 40-hex sha), on 127.0.0.1 and a random port, in the URL
layout ``huggingface_hub`` and Kiln's downloader use; ``<rev>`` below is the branch name or the sha:

  GET  /api/datasets/<owner>/<name>/revision/<rev>   JSON ``{"id": repo, "sha": commit, ...}``
       (404 with ``X-Error-Code: RevisionNotFound`` for any other revision)
  GET  /api/datasets/<owner>/<name>/tree/<rev>[/<path>][?recursive=true]   JSON entries
       (``type``, ``path``, ``size``, ``oid`` and, for ``*.parquet``, ``lfs: {oid: sha256, size}``),
       paginated with a ``Link: <...>; rel="next"`` header past ``page_size`` entries
  GET|HEAD /datasets/<owner>/<name>/resolve/<rev>/<path>   the file, with Content-Length, ETag,
       ``X-Repo-Commit`` and ``Accept-Ranges: bytes``; ``Range: bytes=a-b`` answers 206 with
       ``Content-Range``. ``range_mode`` changes that: ``"ignore"`` still advertises ranges but
       answers every Range with 200 and the whole file (a proxy that drops the header); ``"none"``
       advertises nothing and ignores Range; ``"wrong_total"`` answers 206 with the asked-for bytes
       but a ``Content-Range`` total one byte too large (a server describing another object).
       ``If-Range`` is honoured as HTTP says: a Range whose ``If-Range`` is not the file's current
       ETag gets 200 and the whole file. ``etag_suffix`` changes every file's ETag (as a CDN
       re-serving the object under a new validator would) without changing its bytes; ``weak_etags``
       sends them as weak ``W/"..."`` validators.

Every request is logged as ``(method, path, status, Range header, If-Range header)`` before its response headers
are sent, so a test reading the log right after its call returns never races the server thread.

Faults (``server.add_fault(...)``) apply to requests whose URL path matches a glob, for the first
``times`` matching requests (None = always):
  * ``"truncate"``: Content-Length says the full size, the body stops at ``fraction`` of it and the
    connection closes; with ``corrupt=True`` one byte in the middle of what it does send is
    inverted (silent corruption: the prefix still starts with ``PAR1``, only a hash can tell);
  * ``"status"``: an HTTP error (``status``, default 503) instead of the file;
  * ``"stall"``: headers and ``fraction`` of the body are sent, then nothing for ``seconds``
    (longer than the client timeout);
  * ``"empty"``: ``Content-Length: 0`` and no body (a zero-byte file where the tree lists more).
With ``token`` set, any request without ``Authorization: Bearer <token>`` gets 401.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

from loopback import LoopbackHTTPServer


@dataclass
class Fault:
    kind: str  # truncate | status | stall | empty
    match: str = "*"  # glob on the URL path
    times: int | None = 1  # how many matching requests it hits; None = every one
    status: int = 503
    fraction: float = 0.5
    seconds: float = 5.0
    corrupt: bool = False  # truncate: invert one byte in the middle of what it sends
    hits: int = 0


class Logged(NamedTuple):
    method: str
    path: str  # the URL path as sent (not unquoted)
    status: int
    range: str | None  # the request's Range header
    if_range: str | None = None  # the request's If-Range header


@dataclass
class HubServer(LoopbackHTTPServer):
    root: Path
    repo: str = "kiln-test/pretrain"
    revision: str = "main"
    commit: str = ""  # the branch head's sha; default: a fixed fake one derived from repo and revision
    token: str | None = None
    page_size: int = 1000
    range_mode: str = "honour"  # honour | ignore | none | wrong_total (see the module docstring)
    etag_suffix: str = ""  # appended inside every file's ETag: a new validator for the same bytes
    weak_etags: bool = False  # send W/"..." ETags (a validator that cannot vouch for bytes)
    faults: list[Fault] = field(default_factory=list)
    log: list[Logged] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.commit = self.commit or hashlib.sha1(f"{self.repo}@{self.revision}".encode()).hexdigest()
        self._lock = threading.Lock()
        self._digests: dict[str, tuple[str, str]] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._serve(Handler, "hub-server")
        return self

    def source(self, glob: str) -> str:
        """The hf:// URI for ``glob`` in this repo."""
        return f"hf://datasets/{self.repo}@{quote(self.revision, safe='')}/{glob}"

    # ------------------------------------------------------------------ faults and bookkeeping
    def add_fault(self, kind: str, match: str = "*", times: int | None = 1, **kw: float | bool) -> Fault:
        fault = Fault(kind=kind, match=match, times=times, **kw)  # type: ignore[arg-type]
        with self._lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if fnmatch.fnmatch(path, f.match) and (f.times is None or f.hits < f.times):
                    f.hits += 1
                    return f
        return None

    def record(self, method: str, path: str, status: int, range_header: str | None = None,
               if_range: str | None = None) -> None:
        with self._lock:
            self.log.append(Logged(method, path, status, range_header, if_range))

    def requests_for(self, suffix: str, method: str = "GET") -> list[int]:
        """Statuses of the requests whose path ends with ``suffix``."""
        return [e.status for e in self.logged(suffix, method)]

    def ranges_for(self, suffix: str, method: str = "GET") -> list[str | None]:
        """Range headers (None = none sent) of the requests whose path ends with ``suffix``."""
        return [e.range for e in self.logged(suffix, method)]

    def logged(self, suffix: str, method: str = "GET") -> list[Logged]:
        with self._lock:
            return [e for e in self.log if e.method == method and e.path.endswith(suffix)]

    def digests(self, rel: str) -> tuple[str, str]:
        """(git-style sha1, sha256) of a file, cached."""
        if rel not in self._digests:
            data = (self.root / rel).read_bytes()
            sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            self._digests[rel] = (sha1, hashlib.sha256(data).hexdigest())
        return self._digests[rel]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ helpers
    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        # Record before the client can see the response: a test that asserts on the log right
        # after its request returns must never race the server thread.
        self._record(status)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _record(self, status: int) -> None:
        # Always before end_headers(): see the module docstring.
        self.hub.record(self.command, urlsplit(self.path).path, status, self.headers.get("Range"),
                        self.headers.get("If-Range"))

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        # The hub names the kind of 404 in X-Error-Code; huggingface_hub maps it to its exceptions.
        self._send(status, json.dumps({"error": message}).encode(), headers={"X-Error-Code": code} if code else None)

    def _authorized(self) -> bool:
        if self.hub.token is None:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    # ------------------------------------------------------------------ routes
    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        path = unquote(url.path)
        try:
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            fault = self.hub.take_fault(path)
            if fault is not None and fault.kind == "status":
                return self._error(fault.status, "injected failure")
            revision = f"/api/datasets/{self.hub.repo}/revision/"
            tree = f"/api/datasets/{self.hub.repo}/tree/"
            resolve = f"/datasets/{self.hub.repo}/resolve/"
            if path.startswith(revision):
                return self._revision(path[len(revision):])
            if path.startswith(tree):
                return self._tree(path[len(tree):], parse_qs(url.query))
            if path.startswith(resolve):
                return self._resolve(path[len(resolve):], fault)
            return self._error(404, "Repository not found", "RepoNotFound")
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
            self.close_connection = True

    def _split_revision(self, rest: str) -> tuple[str, str] | None:
        """``(revision, path)`` when ``rest`` starts with the branch name or its commit sha."""
        for rev in (self.hub.revision, self.hub.commit):
            if rest == rev or rest.startswith(rev + "/"):
                return rev, rest[len(rev):].strip("/")
        return None

    def _revision(self, rev: str) -> None:
        if rev not in (self.hub.revision, self.hub.commit):
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        info = {"id": self.hub.repo, "sha": self.hub.commit, "private": self.hub.token is not None,
                "siblings": [{"rfilename": p.relative_to(self.hub.root).as_posix()}
                             for p in sorted(self.hub.root.rglob("*")) if p.is_file()]}
        self._send(200, json.dumps(info).encode())

    def _tree(self, rest: str, query: dict[str, list[str]]) -> None:
        split = self._split_revision(rest)
        if split is None:
            return self._error(404, "Revision not found", "RevisionNotFound")
        _, sub = split
        base = self.hub.root / sub if sub else self.hub.root
        if not base.is_dir():
            return self._error(404, f"{sub} does not exist on {self.hub.revision}")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        children = sorted(base.rglob("*") if recursive else base.iterdir())
        entries = []
        for p in children:
            rel = p.relative_to(self.hub.root).as_posix()
            if p.is_dir():
                entries.append({"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0, "path": rel})
                continue
            sha1, sha256 = self.hub.digests(rel)
            entry = {"type": "file", "oid": sha1, "size": p.stat().st_size, "path": rel}
            if rel.endswith(".parquet"):  # the hub stores binary files in LFS and lists their sha256
                entry["lfs"] = {"oid": sha256, "size": p.stat().st_size, "pointerSize": 134}
            entries.append(entry)
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start : start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(entries):
            nxt = f"{self.hub.url}{urlsplit(self.path).path}?recursive={str(recursive).lower()}&cursor={start + self.hub.page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._send(200, json.dumps(page).encode(), headers=headers)

    def _resolve(self, rest: str, fault: Fault | None) -> None:
        split = self._split_revision(rest)
        if split is None:
            return self._error(404, "Revision not found", "RevisionNotFound")
        _, rel = split
        p = self.hub.root / rel
        if not rel or not p.is_file():
            return self._error(404, "Entry not found")
        data = p.read_bytes()
        sha1, sha256 = self.hub.digests(rel)
        etag = f'"{sha256 if rel.endswith(".parquet") else sha1}{self.hub.etag_suffix}"'
        if self.hub.weak_etags:
            etag = "W/" + etag
        status, start, end = 200, 0, len(data)
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range != etag:  # the validator no longer matches: whole file
            rng = None
        if rng and rng.startswith("bytes=") and self.hub.range_mode in ("honour", "wrong_total"):
            a, _, b = rng[len("bytes="):].partition("-")
            start = int(a) if a else max(0, len(data) - int(b))
            end = min(len(data), int(b) + 1) if a and b else len(data)
            if start >= len(data):
                return self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
        body = data[start:end]
        headers = {"ETag": etag, "X-Repo-Commit": self.hub.commit,
                   "Content-Type": "application/octet-stream"}
        if self.hub.range_mode != "none":
            headers["Accept-Ranges"] = "bytes"
        if status == 206:
            total = len(data) + (self.hub.range_mode == "wrong_total")
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if fault is not None and fault.kind == "empty":
            self.send_header("Content-Length", "0")
            self._record(status)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self._record(status)
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is not None and fault.kind == "truncate":
            sent = body[: int(len(body) * fault.fraction)]
            if fault.corrupt and sent:
                mid = len(sent) // 2
                sent = sent[:mid] + bytes([sent[mid] ^ 0xFF]) + sent[mid + 1 :]
            self.wfile.write(sent)
            self.wfile.flush()
            self.close_connection = True  # the rest never comes
            return
        if fault is not None and fault.kind == "stall":
            self.wfile.write(body[: int(len(body) * fault.fraction)])
            self.wfile.flush()
            time.sleep(fault.seconds)
            self.close_connection = True
            return
        self.wfile.write(body)
