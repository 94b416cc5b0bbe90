"""The resumable, verified fetcher: files from the Hugging Face hub, S3, an http(s) URL or a local
path, into a local directory. Plain file transfer: it knows no stage, config or artifact layout
(only its hint for a host that does not resolve names the offline mirror setting), so the download
stage, the remote chat sets (llm/chat/sources.py) and the CORE eval bundle (llm/eval/bundle.py) all
fetch through it and get the same guarantees.

API::

    fetch_files(source, dest_dir, *, max_files=None, max_rows=None, workers=4, retries=5,
                timeout_s=60.0, backoff_s=0.5, s3_endpoint="", hf_endpoint=None, hf_token=None,
                validate=None, progress=False) -> list[FetchedFile]
        Download every file matching ``source`` into ``dest_dir`` (keeping paths relative to the
        glob's fixed prefix), verified, in parallel, resuming: a file already in ``dest_dir`` that
        verifies is not fetched again. Returns them in listing order (sorted by path).
    list_files(source, *, ...same connection keywords...) -> list[RemoteFile]
    pin_source(source, *, ...) -> (source at a commit, commit sha | None)
    verify_parquet(path, expected_size=None) -> int          row count, or DownloadError

``source`` is one of
  * ``hf://datasets/<owner>/<repo>@<revision>/<glob>`` (revision defaults to ``main``; a revision
    with a slash is written URL-encoded, e.g. ``refs%2Fconvert%2Fparquet``). The revision is first
    resolved to its commit sha (the hub's revision API), and files are listed with the tree API and
    fetched from the resolve URLs at that commit, so a branch that moves mid-download cannot mix
    two snapshots; all at ``HF_ENDPOINT`` (default huggingface.co), with ``HF_TOKEN`` as a bearer
    token when set;
  * ``s3://bucket/prefix/<glob>`` through :class:`llm.storage.Store` (endpoint from the caller or
    ``AWS_ENDPOINT_URL``);
  * ``http(s)://host/path/file`` (one file, e.g. the CORE eval bundle zip; no glob, no token sent);
  * a local path, directory or glob.
Globs: ``*`` and ``?`` stay within one path component, ``**`` crosses directories. A path without
glob characters names one file, or a directory (all files under it).

What "verified" means, for every file: the byte count equals the size the source lists (hub tree
size, S3 object size, file size) and the response's Content-Length; the sha256 equals the hub's LFS
oid when the hub gives one; and a ``.parquet`` file has the ``PAR1`` magic at both ends, a footer
whose metadata parses and whose row groups add up to its row count. A short, stalled or failed
transfer (connection error, timeout, 5xx/429, size or hash mismatch) is retried with exponential
backoff; a file is written to a ``.tmp`` name and renamed only once it verifies, so a truncated
file is never visible under its real name. An HTTP retry continues from the bytes already received
(``Range: bytes=<n>-``) when the server advertises ``Accept-Ranges: bytes``; it falls back to the
whole file when the server answers 200, and when a continued file fails its hash (or, without a
hash, its parquet checks) it is discarded and fetched once more from byte 0, never continued
again. Deterministic failures (401/403/404, a file that is complete but is not parquet, a
zero-byte file the source itself lists as empty) fail at once.

Across runs: an HTTP download in progress is the hidden ``.<name>.part`` next to its destination,
with a ``.<name>.part.json`` sidecar (replaced atomically) naming the exact URL (for the hub, at a
commit), the listed size and sha256, the server's ETag / Last-Modified and how many bytes were on
disk at the last fsync (every 8 MiB or second while bytes arrive, and exactly on any interruption
the process sees). When a run is killed, stopped (Ctrl-C, another file failed) or runs out of
retries, the next run with the same ``dest_dir`` continues it: only when the sidecar matches the
listing, and only for a URL at an immutable revision or with a strong ETag (sent as ``If-Range``,
so a changed object comes back whole as a 200). The prefix is read once to rebuild its sha256 and
the joined file passes every check above (failing, it is fetched once more from byte 0).
``FetchedFile.reused_bytes`` counts those bytes. A deterministic failure removes the partial, a
publish removes the sidecar; ``.part`` files are never listed as fetched files. A
``.<name>.part.lock`` keeps two processes sharing a directory from writing one partial together.
Every failure is a :class:`DownloadError` naming the file; it is a
:class:`llm.stages.output.StageError` (the contract's "deterministic, do not retry the stage" error,
imported from the bottom layer), since the fetcher has already spent its retries.

Budgets: ``max_files`` takes the first N files in path order. ``max_rows`` fetches files in path
order until those fetched hold at least ``max_rows`` rows; ``fetch_files`` itself never alters a
file (the download stage trims the last shard to the exact budget).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, unquote

from llm.stages.output import StageError
from llm.storage import Store, is_s3, is_transient, local_path, sha256_file, split_s3, with_retries, write_atomic

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
PARQUET_MAGIC = b"PAR1"
_READ_CHUNK = 1 << 20
_MAX_BACKOFF_S = 30.0
# How often a partial HTTP download records (after an fsync) how many of its bytes are on disk, for a
# run after a crash to continue from: every this many bytes, or this often while bytes arrive. A kill
# loses at most this much; every interruption the process sees (a cut, a timeout, Ctrl-C) records
# the exact count.
_CHECKPOINT_BYTES = 8 << 20
_CHECKPOINT_S = 1.0
_SIDECAR_VERSION = 1


class DownloadError(StageError):
    """A file could not be fetched or failed verification (the message names it)."""


class _Retryable(RuntimeError):
    """A failed attempt worth repeating: short body, hash mismatch, 5xx, timeout."""


class _Cancelled(RuntimeError):
    """Another download failed or the row budget was met: stop this one."""


class _GaveUp(DownloadError):
    """Every attempt failed transiently (network, 5xx, short body): not the file's fault, so a
    partial download is kept for the next run to continue."""


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class RemoteFile:
    rel: str  # path relative to the source's fixed prefix (posix); the local name under dest_dir
    uri: str  # where it comes from, for messages and manifests
    kind: str  # "hf" | "http" | "s3" | "local"
    size: int | None  # as listed by the source
    sha256: str | None = None  # the hub's LFS oid, when it gives one
    url: str = ""  # hf: the resolve URL


@dataclass(frozen=True)
class FetchedFile:
    rel: str
    uri: str
    path: Path
    size: int
    rows: int | None  # parquet row count; None for other files
    resumed: bool  # already present and verified: not fetched again
    transferred: int = 0  # bytes received by this run over every attempt (== size for a clean fetch, 0 when resumed)
    reused_bytes: int = 0  # bytes of the file an earlier, interrupted run had fetched (continued, not refetched)


_GLOB_CHARS = re.compile(r"[*?\[]")


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a path glob where ``*``/``?`` stay in one component and ``**`` crosses them."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def split_glob(path: str) -> tuple[str, str | None]:
    """``(fixed prefix, glob)`` for a path; glob is None when the path has no glob characters."""
    parts = path.strip("/").split("/") if path.strip("/") else []
    for i, part in enumerate(parts):
        if _GLOB_CHARS.search(part):
            return "/".join(parts[:i]), "/".join(parts[i:])
    return "/".join(parts), None


def parquet_glob(uri: str) -> str:
    """A source that names a folder (no glob characters, not a ``.parquet`` file) means every parquet
    file under it: ``<folder>/**/*.parquet``. Other sources are returned as they are."""
    path = parse_hf(uri)[2] if uri.startswith("hf://") else split_s3(uri)[1] if is_s3(uri) else uri
    if split_glob(path)[1] is None and not path.endswith(".parquet"):
        return uri.rstrip("/") + "/**/*.parquet"
    return uri


def _select(entries: dict[str, Any], target: str) -> dict[str, tuple[str, Any]]:
    """Pick ``{rel: (full path, info)}`` from ``{full path: info}`` for a target path or glob."""
    base, pattern = split_glob(target)
    chosen: dict[str, tuple[str, Any]] = {}
    if pattern is None:
        name = base.rsplit("/", 1)[-1]
        for full, info in entries.items():
            if full == base:  # one file
                chosen[name] = (full, info)
            elif not base or full.startswith(base + "/"):  # a directory
                chosen[full[len(base) + 1 :] if base else full] = (full, info)
        return chosen
    rx = glob_regex(pattern)
    for full, info in entries.items():
        if base and not full.startswith(base + "/"):
            continue
        rel = full[len(base) + 1 :] if base else full
        if rx.match(rel):
            chosen[rel] = (full, info)
    return chosen


def parse_hf(uri: str) -> tuple[str, str, str]:
    """``hf://datasets/<owner>/<repo>[@<revision>]/<path>`` -> (repo, revision, path)."""
    rest = uri[len("hf://") :]
    if not rest.startswith("datasets/"):
        raise DownloadError(f"{uri}: only hf://datasets/<owner>/<repo>@<revision>/<glob> sources are supported")
    parts = rest[len("datasets/") :].split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise DownloadError(f"{uri}: expected hf://datasets/<owner>/<repo>@<revision>/<glob>")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", unquote(revision) or "main", parts[2] if len(parts) > 2 else ""


def resolve_hf_endpoint(explicit: str | None = None) -> str:
    return (explicit or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def resolve_hf_token(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:  # a token saved by `hf auth login`
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no hub client or no token: anonymous access
        return None


_local = threading.local()


def _session():
    """One requests.Session per thread: sessions pool connections but are not thread-safe."""
    import requests

    if getattr(_local, "session", None) is None:
        _local.session = requests.Session()
    return _local.session


def _auth_headers(token: str | None) -> dict[str, str]:
    # identity encoding: Content-Length must be the byte count we write, not a gzip size.
    headers = {"Accept-Encoding": "identity", "User-Agent": "kiln-download"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _http_status_error(status: int, what: str, body: str = "") -> Exception:
    if status >= 500 or status == 429:
        return _Retryable(f"HTTP {status}")
    hint = " (set HF_TOKEN for gated or private repos)" if status in (401, 403) else ""
    return DownloadError(f"{what}: HTTP {status}{hint} {body[:200]}".rstrip())


_COMMIT = re.compile(r"[0-9a-f]{40}\Z")


def is_commit(revision: str) -> bool:
    """A full 40-hex git sha: immutable, so it needs no resolving (the hub reads it as a commit too)."""
    return bool(_COMMIT.match(revision))


def resolve_hf_revision(repo: str, revision: str, *, endpoint: str, token: str | None, timeout_s: float = 60.0,
                        attempts: int = 6, backoff_s: float = 0.5, what: str = "") -> str:
    """The commit sha that ``revision`` (a branch, tag or sha) of dataset ``repo`` points at now.

    One call to the hub's ``GET /api/datasets/<repo>/revision/<rev>`` (the endpoint behind
    ``HfApi.dataset_info(revision=...)``), whose JSON carries the commit in ``sha``. A 404 (no such
    revision or repo) and 401/403 fail at once, naming the revision; 5xx/429 and connection errors retry.
    """
    what = what or f"hf://datasets/{repo}@{quote(revision, safe='')}"
    url = f"{endpoint}/api/datasets/{repo}/revision/{quote(revision, safe='')}"
    label = f"{what}: revision {revision!r} of dataset {repo}"

    def ask() -> Any:
        r = _session().get(url, headers=_auth_headers(token), timeout=timeout_s)
        if r.status_code != 200:
            raise _http_status_error(r.status_code, label, r.text)
        return r

    resp = _attempt(ask, attempts=attempts, backoff_s=backoff_s, what=label)
    try:
        sha = resp.json().get("sha")
    except ValueError as e:
        raise DownloadError(f"{label}: the hub answered {url} with something that is not JSON") from e
    if not isinstance(sha, str) or not is_commit(sha):
        raise DownloadError(f"{label}: the hub's answer at {url} has no commit sha (sha={sha!r})")
    return sha


def pin_source(
    source: str,
    *,
    hf_endpoint: str | None = None,
    hf_token: str | None = None,
    timeout_s: float = 60.0,
    retries: int = 5,
    backoff_s: float = 0.5,
) -> tuple[str, str | None]:
    """``(source at a fixed commit, that commit)`` for an hf:// source; ``(source, None)`` for others.

    A branch such as ``main`` can move while files are listed and fetched, or between a crashed
    run and its resume; every later request names the commit instead, so all files come from one
    snapshot of the repo. A source already naming a 40-hex commit is returned as is (no request).
    """
    if not source.startswith("hf://"):
        return source, None
    repo, revision, path = parse_hf(source)
    if is_commit(revision):
        return source, revision
    sha = resolve_hf_revision(repo, revision, endpoint=resolve_hf_endpoint(hf_endpoint), token=resolve_hf_token(hf_token),
                              timeout_s=timeout_s, attempts=retries + 1, backoff_s=backoff_s, what=source)
    return f"hf://datasets/{repo}@{sha}/{path}", sha


def _hf_list(uri: str, endpoint: str, token: str | None, timeout_s: float, attempts: int, backoff_s: float) -> list[RemoteFile]:
    repo, revision, path = parse_hf(uri)
    if not is_commit(revision):  # pin once: the listing and every file come from the same commit
        revision = resolve_hf_revision(repo, revision, endpoint=endpoint, token=token, timeout_s=timeout_s,
                                       attempts=attempts, backoff_s=backoff_s, what=uri)
    base, pattern = split_glob(path)
    # List the glob's fixed prefix; for a plain path, its parent (it may be a file or a directory).
    list_dir = base if pattern is not None else base.rsplit("/", 1)[0] if "/" in base else ""
    rev_q = quote(revision, safe="")
    url: str | None = f"{endpoint}/api/datasets/{repo}/tree/{rev_q}" + (f"/{quote(list_dir)}" if list_dir else "")
    params: dict[str, str] | None = {"recursive": "true"}
    entries: dict[str, dict[str, Any]] = {}
    while url:
        def page(url: str = url, params: dict[str, str] | None = params) -> Any:
            r = _session().get(url, params=params, headers=_auth_headers(token), timeout=timeout_s)
            if r.status_code != 200:
                raise _http_status_error(r.status_code, f"hub listing {uri} ({url})", r.text)
            return r

        resp = _attempt(page, attempts=attempts, backoff_s=backoff_s, what=f"hub listing {uri}")
        for item in resp.json():
            if item.get("type") == "file":
                entries[item["path"]] = item
        url = resp.links.get("next", {}).get("url")  # the hub paginates large trees with Link headers
        params = None
    out = []
    for rel, (full, item) in sorted(_select(entries, path).items()):
        lfs = item.get("lfs") or {}
        out.append(RemoteFile(
            rel=rel,
            uri=f"hf://datasets/{repo}@{quote(revision, safe='')}/{full}",
            kind="hf",
            size=int(lfs.get("size", item.get("size"))),
            sha256=lfs.get("oid") or lfs.get("sha256"),
            url=f"{endpoint}/datasets/{repo}/resolve/{rev_q}/{quote(full)}",
        ))
    return out


def list_files(
    source: str,
    *,
    s3_endpoint: str = "",
    hf_endpoint: str | None = None,
    hf_token: str | None = None,
    timeout_s: float = 60.0,
    retries: int = 5,
    backoff_s: float = 0.5,
) -> list[RemoteFile]:
    """Every file ``source`` names, sorted by relative path."""
    if source.startswith(("http://", "https://")):
        name = source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        if not name or _GLOB_CHARS.search(name):
            raise DownloadError(f"{source}: an http(s) source names one file (no globs)")
        return [RemoteFile(rel=name, uri=source, kind="http", size=None, url=source)]
    if source.startswith("hf://"):
        return _hf_list(source, resolve_hf_endpoint(hf_endpoint), resolve_hf_token(hf_token), timeout_s, retries + 1, backoff_s)
    if is_s3(source):
        bucket, key = split_s3(source)
        base, pattern = split_glob(key)
        list_dir = base if pattern is not None else base.rsplit("/", 1)[0] if "/" in base else ""
        store = Store(f"s3://{bucket}", s3_endpoint)
        sizes = store.list_sizes(f"s3://{bucket}/{list_dir}")
        entries = {u[len(f"s3://{bucket}/") :]: size for u, size in sizes.items()}
        return [RemoteFile(rel=rel, uri=f"s3://{bucket}/{full}", kind="s3", size=size)
                for rel, (full, size) in sorted(_select(entries, key).items())]
    path = str(local_path(source))
    absolute = path.startswith("/")
    base, pattern = split_glob(path)
    root = Path(("/" if absolute else "") + base)
    if pattern is None:
        if root.is_file():
            return [RemoteFile(rel=root.name, uri=str(root), kind="local", size=root.stat().st_size)]
        pattern, files = "**", (p for p in root.rglob("*") if p.is_file()) if root.is_dir() else ()
    else:
        files = (p for p in root.rglob("*") if p.is_file()) if root.is_dir() else ()
    rx = glob_regex(pattern)
    out = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        if rx.match(rel):
            out.append(RemoteFile(rel=rel, uri=str(p), kind="local", size=p.stat().st_size))
    return sorted(out, key=lambda f: f.rel)


# --------------------------------------------------------------------------- verification


def verify_parquet(path: str | Path, expected_size: int | None = None, label: str | None = None) -> int:
    """Check a parquet file is whole and readable; return its row count.

    Checks the size (when given), the ``PAR1`` magic at both ends, a footer length that fits the
    file, metadata that parses, and row groups that add up to the footer's row count.
    """
    import pyarrow.parquet as pq

    label = label or str(path)
    size = os.path.getsize(path)
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{label}: size {size} bytes, expected {expected_size} (truncated?)")
    if size == 0:
        raise DownloadError(f"{label}: zero-byte file")
    if size < 12:
        raise DownloadError(f"{label}: {size} bytes is too short to be parquet")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-8, os.SEEK_END)
        tail = f.read(8)
    if head != PARQUET_MAGIC or tail[4:] != PARQUET_MAGIC:
        raise DownloadError(f"{label}: not a parquet file or truncated (PAR1 magic missing at the "
                            f"{'start' if head != PARQUET_MAGIC else 'end'})")
    footer_len = int.from_bytes(tail[:4], "little")
    if footer_len + 12 > size:
        raise DownloadError(f"{label}: parquet footer length {footer_len} exceeds the file size {size}")
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt footer
        raise DownloadError(f"{label}: unreadable parquet metadata ({e})") from e
    rows = sum(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    if rows != meta.num_rows:
        raise DownloadError(f"{label}: row groups hold {rows} rows but the footer says {meta.num_rows}")
    return int(meta.num_rows)


# --------------------------------------------------------------------------- fetching


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, _Retryable):
        return True
    if isinstance(exc, (DownloadError, _Cancelled)):
        return False
    import requests
    import urllib3

    # Connection resets, timeouts and short bodies (urllib3 enforces Content-Length on raw reads).
    if isinstance(exc, (requests.RequestException, urllib3.exceptions.HTTPError)):
        return True
    return is_transient(exc)


def _cannot_resolve(exc: BaseException | None) -> bool:
    """A DNS failure anywhere in the exception chain (requests wraps urllib3 wraps socket.gaierror)."""
    import socket

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, socket.gaierror) or "NameResolutionError" in type(exc).__name__ \
                or "Name or service not known" in str(exc) or "Temporary failure in name resolution" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__ or (exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None)
        seen += 1
    return False


def _attempt(fn: Callable[[], Any], *, attempts: int, backoff_s: float, what: str,
             stop: threading.Event | None = None) -> Any:
    """Run ``fn`` up to ``attempts`` times, backing off between retryable failures; a set ``stop``
    abandons the retries (checked before each attempt and during each wait)."""

    def guarded() -> Any:
        if stop is not None and stop.is_set():
            raise _Cancelled(what)
        return fn()

    def wait(delay: float) -> None:
        if stop is None:
            time.sleep(delay)
        elif stop.wait(delay):
            raise _Cancelled(what)

    def give_up(last: BaseException) -> DownloadError:
        detail = str(last)
        if detail.startswith(f"{what}: "):
            detail = detail[len(what) + 2 :]
        kind = "" if isinstance(last, _Retryable) else f"{type(last).__name__}: "
        hint = ""
        if _cannot_resolve(last):  # the usual first run on an offline machine: say what to do
            hint = (" (the host name does not resolve: no network? To read a local copy with the layout of "
                    "../shared/data, set KILN_DATA_MIRROR=/path/to/mirror or run.data_mirror)")
        return _GaveUp(f"{what}: failed after {attempts} attempts: {kind}{detail}{hint}")

    return with_retries(guarded, attempts=attempts, base_delay=backoff_s, max_delay=_MAX_BACKOFF_S, what=what,
                        classify=_is_retryable, sleep=wait, give_up=give_up)


class _Partial:
    """The in-progress file of one HTTP download, across its attempts and across runs: what is in
    it and whether a retry may continue it with a Range request instead of starting over.

    Invariant: the file holds exactly ``have`` bytes, and ``sha`` is the sha256 of them, so a
    continued transfer ends with the whole file's hash without reading the prefix again (a prefix
    taken over from an earlier run is read once, in :meth:`adopt`, to rebuild ``sha``).

    With a ``sidecar`` the file lives under a stable name and outlives the process: the sidecar
    (JSON, replaced atomically) says which bytes these are (URL, size, sha256 of the listing, the
    server's validators) and how many are known to be on disk (``have`` as of the last fsync).
    """

    def __init__(self, path: Path, rf: RemoteFile, sidecar: Path | None = None):
        self.path = path
        self.rf = rf
        self.sidecar = sidecar  # None: a private temp file that never outlives this fetch
        self.sha = hashlib.sha256()
        self.have = 0
        self.total: int | None = None  # the full size, from the last 200 (or the listing)
        self.etag: str | None = None  # strong validator of those bytes, sent as If-Range
        self.last_modified: str | None = None  # recorded; only a strong ETag is trusted as a validator
        self.ranges = False  # the server advertised Accept-Ranges: bytes
        self.may_resume = True  # off once a continued transfer failed its final check
        self.continued = False  # the last transfer continued a prefix
        self.transferred = 0  # bytes received by this run, every attempt
        self.reused = 0  # bytes of the current prefix that an earlier run fetched
        self._synced = 0  # ``have`` at the last checkpoint
        self._synced_at = time.monotonic()

    def reset(self) -> None:
        """Forget the prefix: the next bytes written start the file."""
        self.path.unlink(missing_ok=True)
        if self.sidecar is not None:
            self.sidecar.unlink(missing_ok=True)
        self.sha = hashlib.sha256()
        self.have = 0
        self.continued = False
        self.reused = 0
        self._synced = 0

    def resume_offset(self, expected: int | None, is_parquet: bool) -> int:
        """Where a retry may start: ``have`` when the prefix can be trusted and continued, else 0."""
        if not (self.may_resume and self.ranges and self.have > 0):
            return 0
        total = expected if expected is not None else self.total
        if total is None or self.have >= total:  # nothing to ask for, or a length we cannot check
            return 0
        try:
            if self.path.stat().st_size != self.have:  # something else touched the file
                return 0
            if is_parquet and self.have >= len(PARQUET_MAGIC):
                with open(self.path, "rb") as f:
                    if f.read(len(PARQUET_MAGIC)) != PARQUET_MAGIC:  # cheap early sign of a bad prefix
                        return 0
        except OSError:
            return 0
        return self.have

    def distrust(self) -> None:
        """A continued transfer ended wrong: the prefix may be the bad part, so start over once and
        do not continue this file again."""
        if self.continued:
            self.may_resume = False
        self.reset()

    # ------------------------------------------------------------------ across runs

    @property
    def pinned(self) -> bool:
        """The URL names an immutable revision (a hub resolve URL at a commit sha)."""
        return self.rf.kind == "hf" and is_commit(parse_hf(self.rf.uri)[1])

    def keepable(self) -> bool:
        """Whether a later run could continue these bytes, so they are worth keeping on failure.

        Only when the bytes cannot have changed under the URL: the URL names a commit, or the
        server gave a strong ETag that the next run sends as ``If-Range`` (the server then answers
        200 with the whole file if the object changed). A moving URL without a strong ETag (a plain
        https file, a CDN with weak or no ETags) could serve other bytes next time, and a
        Last-Modified date is too coarse (one-second resolution, clock games) to vouch for bytes,
        so such a partial is dropped and the next run starts over.
        """
        return self.sidecar is not None and self.ranges and self.have > 0 and (self.pinned or self.etag is not None)

    def _describe(self) -> dict[str, Any]:
        return {"version": _SIDECAR_VERSION, "url": self.rf.url, "uri": self.rf.uri, "size": self.rf.size,
                "sha256": self.rf.sha256, "total": self.total, "etag": self.etag,
                "last_modified": self.last_modified, "accept_ranges": self.ranges}

    def checkpoint(self, f: Any, *, force: bool = False) -> None:
        """Record how many bytes are on disk, for a run after a crash: fsync the data first, so the
        sidecar never claims bytes a power cut could still lose, then replace the sidecar."""
        if not self.keepable() or self.have == self._synced or (self.total is not None and self.have >= self.total):
            return  # nothing new, or the whole file: it is checked and published next, no run continues it
        if not force and self.have - self._synced < _CHECKPOINT_BYTES and time.monotonic() - self._synced_at < _CHECKPOINT_S:
            return
        f.flush()
        os.fsync(f.fileno())
        assert self.sidecar is not None
        write_atomic(self.sidecar, json.dumps({**self._describe(), "have": self.have}))
        self._synced, self._synced_at = self.have, time.monotonic()

    def adopt(self) -> int:
        """Take over the bytes an earlier run left, when its sidecar still describes this file;
        returns how many (0: none, and whatever was there is removed).

        The sidecar must name the same URL (for hub files: the same commit), size and sha256, and the
        file must hold at least the bytes it vouches for (any tail past them is cut off). The prefix
        is read once to rebuild the running sha256; the transfer still ends with every check a fresh
        one gets, and a continued file that fails them is fetched once more from byte 0.
        """
        if self.sidecar is None:
            return 0
        try:
            meta = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            meta = None
        have = meta.get("have") if isinstance(meta, dict) else None
        same = (isinstance(meta, dict) and isinstance(have, int) and have > 0
                and {k: meta.get(k) for k in ("version", "url", "size", "sha256")}
                == {"version": _SIDECAR_VERSION, "url": self.rf.url, "size": self.rf.size, "sha256": self.rf.sha256})
        if same:
            assert isinstance(meta, dict) and isinstance(have, int)
            self.total = meta.get("total") if isinstance(meta.get("total"), int) else self.rf.size
            self.etag = _strong_etag(meta.get("etag"))
            self.last_modified = meta.get("last_modified")
            self.ranges = meta.get("accept_ranges") is True
            same = self.total is not None and have < self.total and self.ranges and (self.pinned or self.etag is not None)
        try:
            same = same and self.path.stat().st_size >= have  # type: ignore[operator]
        except OSError:
            same = False
        if not same:
            self.reset()
            self.total, self.etag, self.last_modified, self.ranges = None, None, None, False
            return 0
        assert isinstance(have, int)
        sha = hashlib.sha256()
        with open(self.path, "r+b") as f:
            f.truncate(have)
            left = have
            while left:
                block = f.read(min(_READ_CHUNK, left))
                if not block:  # shrank under us: trust nothing
                    self.reset()
                    return 0
                sha.update(block)
                left -= len(block)
        self.sha, self.have, self.reused, self._synced = sha, have, have, have
        return have


def _content_range(value: str | None) -> tuple[int, int, int] | None:
    """``bytes a-b/total`` -> (a, b, total); None when absent, unparsable or the total is unknown."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+)\s*", value or "")
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def _strong_etag(value: str | None) -> str | None:
    # If-Range only takes a strong validator; a weak one (W/"...") cannot vouch for bytes.
    return value if value and not value.startswith("W/") else None


class _Fetcher:
    """Downloads one file per call, verified, into ``dest_dir``; shared by the worker threads."""

    def __init__(self, dest_dir: Path, *, attempts: int, timeout_s: float, backoff_s: float, s3_endpoint: str,
                 token: str | None, stop: threading.Event, on_bytes: Callable[[int], None]):
        self.dest_dir = dest_dir
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.s3_endpoint = s3_endpoint
        self.token = token
        self.stop = stop
        self.on_bytes = on_bytes

    def __call__(self, rf: RemoteFile) -> FetchedFile:
        dest = self.dest_dir / rf.rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        # The in-progress file has a stable name so a run after a crash finds it; a lock keeps two
        # processes fetching into one directory (a shared cache) from writing it at once. Whoever
        # does not get the lock works in a private temp file, as if there were nothing to continue.
        from filelock import FileLock, Timeout

        lock = FileLock(dest.with_name(f".{dest.name}.part.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            lock = None  # type: ignore[assignment]
        try:
            return self._fetch(rf, dest, stable=lock is not None)
        finally:
            if lock is not None:
                lock.release()

    def _fetch(self, rf: RemoteFile, dest: Path, *, stable: bool) -> FetchedFile:
        is_parquet = rf.rel.endswith(".parquet")
        http = rf.kind in ("hf", "http")
        if stable:
            part = _Partial(dest.with_name(f".{dest.name}.part"), rf,
                            dest.with_name(f".{dest.name}.part.json") if http else None)
        else:
            part = _Partial(dest.with_name(f".{dest.name}.{os.getpid()}-{threading.get_ident()}.tmp"), rf)
        if dest.is_file():  # resume: keep what an earlier run fetched if it still verifies
            kept = self._reuse(rf, dest, part, is_parquet, stable=stable)
            if kept is not None:
                return kept
        if rf.size == 0:
            # The source itself lists it as empty: fetching again cannot help.
            raise DownloadError(f"{rf.uri}: zero-byte file at the source")
        if http and stable:
            self.on_bytes(part.adopt())  # bytes an interrupted earlier run left (0 when none fit)
        else:
            part.reset()
        keep = False
        try:
            try:
                rows = _attempt(lambda: self._one_attempt(rf, part, is_parquet, http), attempts=self.attempts,
                                backoff_s=self.backoff_s, what=rf.uri, stop=self.stop)
            except (_Cancelled, _GaveUp, KeyboardInterrupt, SystemExit):
                # Stopped (Ctrl-C, another file failed, budget met) or the network kept failing:
                # nothing says these bytes are wrong, so a later run may continue them. A
                # deterministic failure (404, 401, not parquet) falls through and removes them.
                keep = part.keepable()
                raise
            reused = part.reused
            os.replace(part.path, dest)  # verified: only now does the file appear under its name
        finally:
            if not keep:
                part.reset()  # after a publish: only the sidecar is left to remove
        return FetchedFile(rf.rel, rf.uri, dest, dest.stat().st_size, rows, resumed=False,
                           transferred=part.transferred, reused_bytes=reused)

    def _reuse(self, rf: RemoteFile, dest: Path, part: _Partial, is_parquet: bool, *, stable: bool) -> FetchedFile | None:
        """The file an earlier run published in ``dest``, if it still verifies against the listing;
        else it is removed (None) and fetched again."""
        try:
            rows = self._verify(dest, rf, is_parquet)
            if rf.sha256 and sha256_file(dest) != rf.sha256:
                # same size, other bytes: e.g. fetched before the branch moved to another commit
                raise DownloadError(f"{rf.uri}: the file on disk is not the one listed")
        except DownloadError:
            dest.unlink()
            return None
        if stable:
            part.reset()  # e.g. a crash between publishing the file and removing its sidecar
        self.on_bytes(dest.stat().st_size)
        return FetchedFile(rf.rel, rf.uri, dest, dest.stat().st_size, rows, resumed=True)

    def _one_attempt(self, rf: RemoteFile, part: _Partial, is_parquet: bool, http: bool) -> int | None:
        """One transfer into ``part`` and its verification; returns the parquet row count (None: not parquet)."""
        tmp = part.path
        if http:
            self._http(rf, part, is_parquet)  # continues part's prefix when it can
        else:
            tmp.unlink(missing_ok=True)
            try:
                self._transfer(rf, tmp)
            finally:
                part.transferred += tmp.stat().st_size if tmp.exists() else 0
        try:
            return self._verify(tmp, rf, is_parquet)
        except DownloadError as e:
            if part.continued and not rf.sha256:
                # No hash vouched for the joined bytes, so the old prefix may be what is
                # broken: one more try from byte 0 before calling the file bad.
                part.distrust()
                raise _Retryable(f"{e} (after a resumed transfer; starting over)") from e
            if rf.size is None:  # no independent length: a short body looks like corruption
                part.reset()
                raise _Retryable(str(e)) from e
            raise

    @staticmethod
    def _verify(path: Path, rf: RemoteFile, is_parquet: bool) -> int | None:
        if is_parquet:
            return verify_parquet(path, rf.size, label=rf.uri)
        if rf.size is not None and path.stat().st_size != rf.size:
            raise DownloadError(f"{rf.uri}: size {path.stat().st_size} bytes, expected {rf.size}")
        return None

    def _transfer(self, rf: RemoteFile, tmp: Path) -> None:
        """S3 and local files: whole-file copies (boto3 runs its own ranged parts for S3)."""
        if rf.kind == "s3":
            Store(rf.uri.rsplit("/", 1)[0], self.s3_endpoint).get(rf.uri, tmp)
            self.on_bytes(tmp.stat().st_size)
            self._check_length(rf, tmp.stat().st_size, rf.size)
        else:
            try:
                shutil.copyfile(rf.uri, tmp)
            except FileNotFoundError as e:
                raise DownloadError(f"{rf.uri}: vanished while downloading") from e
            self.on_bytes(tmp.stat().st_size)
            self._check_length(rf, tmp.stat().st_size, rf.size)

    @staticmethod
    def _check_length(rf: RemoteFile, got: int, expected: int | None) -> None:
        if expected is not None and got != expected:
            raise _Retryable(f"{rf.uri}: got {got} of {expected} bytes (truncated transfer)")

    def _http(self, rf: RemoteFile, part: _Partial, is_parquet: bool) -> None:
        """One GET into ``part``: from byte 0, or for the rest of the file when a retry may continue.

        A retry continues (``Range: bytes=<have>-``) only when the server advertised byte ranges and
        the prefix is intact; the answer must be a 206 whose ``Content-Range`` starts at ``have``
        and whose total is the expected size. A 200 means the server ignored the range (or the
        ``If-Range`` validator no longer matched): the body is the whole file, written from 0.
        """
        # The hub token goes to the hub only (requests drops it on redirects to another host).
        headers = _auth_headers(self.token if rf.kind == "hf" else None)
        offset = part.resume_offset(rf.size, is_parquet)
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if part.etag:
                headers["If-Range"] = part.etag
        else:
            part.reset()
        r = _session().get(rf.url, headers=headers, stream=True, timeout=(self.timeout_s, self.timeout_s))
        with r:
            _accept_response(r, rf, part, offset)
            self._stream_body(r, rf, part)
        self._check_length(rf, part.have, part.total)
        self._check_length(rf, part.have, rf.size)
        if rf.sha256 and part.sha.hexdigest() != rf.sha256:
            got = part.sha.hexdigest()
            continued = part.continued
            part.distrust()  # whole but wrong: never continue these bytes
            raise _Retryable(f"{rf.uri}: sha256 {got} does not match the hub's {rf.sha256}"
                             + (" (after a resumed transfer; starting over)" if continued else ""))

    def _stream_body(self, r: Any, rf: RemoteFile, part: _Partial) -> None:
        """Append the response body to ``part`` (hashing as it goes), checkpointing now and then."""
        with open(part.path, "r+b" if part.have else "wb") as f:
            f.seek(part.have)
            f.truncate()
            try:
                # decode_content=False: bytes as sent, so counts compare with Content-Length.
                for block in r.raw.stream(_READ_CHUNK, decode_content=False):
                    if self.stop.is_set():
                        raise _Cancelled(rf.uri)
                    f.write(block)
                    part.sha.update(block)
                    part.have += len(block)
                    part.transferred += len(block)
                    self.on_bytes(len(block))
                    part.checkpoint(f)  # now and then, for a run after a crash
            finally:
                # The exact count on any way out: a cut, a timeout, Ctrl-C. A failing disk must
                # not hide the error in flight; the sidecar then keeps its older, smaller count.
                with contextlib.suppress(OSError):
                    part.checkpoint(f, force=True)


def _accept_response(r: Any, rf: RemoteFile, part: _Partial, offset: int) -> None:
    """Check the status and headers of the answer to a GET from ``offset`` and prepare ``part`` for its
    body: a 206 continues the prefix, a 200 restarts the file, anything else raises."""
    if offset and r.status_code == 206:
        span = _content_range(r.headers.get("Content-Range"))
        total = rf.size if rf.size is not None else part.total
        if span is None or span[0] != offset or span[1] != span[2] - 1 or span[2] != total:
            part.reset()
            raise _Retryable(f"{rf.uri}: asked for bytes {offset}- of {total}, the server sent "
                             f"Content-Range {r.headers.get('Content-Range')!r}")
        etag = _strong_etag(r.headers.get("ETag"))
        if part.etag and etag and etag != part.etag:  # a server that ignored If-Range
            part.reset()
            raise _Retryable(f"{rf.uri}: the rest of the file came with ETag {etag}, the start with {part.etag}")
        part.continued = True
    elif r.status_code == 200:
        if offset:  # the range was not honoured (or If-Range did not match): the whole file
            part.reset()
        length = r.headers.get("Content-Length")
        if length is not None and rf.size is not None and int(length) != rf.size:
            raise _Retryable(f"{rf.uri}: server says {length} bytes, the hub listing says {rf.size}")
        part.total = int(length) if length is not None else rf.size
        part.etag = _strong_etag(r.headers.get("ETag"))
        part.last_modified = r.headers.get("Last-Modified")
        part.ranges = r.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
    elif r.status_code == 416 and offset:  # the server thinks the prefix is already the whole file
        part.distrust()
        raise _Retryable(f"{rf.uri}: HTTP 416 for bytes {offset}-")
    else:
        raise _http_status_error(r.status_code, rf.uri, r.text if r.status_code < 500 else "")

def fetch_files(
    source: str | list[RemoteFile],
    dest_dir: str | Path,
    *,
    max_files: int | None = None,
    max_rows: int | None = None,
    workers: int = 4,
    retries: int = 5,
    timeout_s: float = 60.0,
    backoff_s: float = 0.5,
    s3_endpoint: str = "",
    hf_endpoint: str | None = None,
    hf_token: str | None = None,
    validate: Callable[[FetchedFile], None] | None = None,
    progress: bool = False,
) -> list[FetchedFile]:
    """Fetch and verify the files of ``source`` into ``dest_dir``; see the module docstring.

    ``retries`` counts attempts after the first. ``validate`` runs on each verified file in the
    worker thread (e.g. a schema check) and may raise to fail the whole fetch early. With
    ``max_rows``, files already fetched past the point where the budget was met are removed.
    """
    if isinstance(source, str):
        files = list_files(source, s3_endpoint=s3_endpoint, hf_endpoint=hf_endpoint, hf_token=hf_token,
                           timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
    else:
        files = list(source)
    if max_files is not None:
        files = files[:max_files]
    if not files:
        return []
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(f.size or 0 for f in files), unit="B", unit_scale=True, desc="download", disable=not progress)
    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with lock:
            bar.update(n)

    stop = threading.Event()
    fetcher = _Fetcher(Path(dest_dir), attempts=retries + 1, timeout_s=timeout_s, backoff_s=backoff_s,
                       s3_endpoint=s3_endpoint, token=resolve_hf_token(hf_token) if any(f.kind == "hf" for f in files) else None,
                       stop=stop, on_bytes=on_bytes)

    def job(rf: RemoteFile) -> FetchedFile:
        got = fetcher(rf)
        if validate is not None:
            validate(got)
        return got

    try:
        results, done = _in_path_order(files, job, workers=max(1, workers), max_rows=max_rows, stop=stop)
    finally:
        bar.close()
    for extra in results[done:]:
        if extra is not None:
            extra.path.unlink(missing_ok=True)
    return [f for f in results[:done] if f is not None]


def _in_path_order(files: list[RemoteFile], job: Callable[[RemoteFile], FetchedFile], *, workers: int,
                   max_rows: int | None, stop: threading.Event) -> tuple[list[FetchedFile | None], int]:
    """Run ``job`` over ``files`` on ``workers`` threads; returns the results (None: not fetched) and
    how many leading files are done and needed.

    A sliding window over the files in path order: with ``max_rows`` the budget is judged on the
    contiguous prefix that is done, and nothing new starts once that prefix meets it. The first
    failure stops every other transfer (``stop``) and is raised once the threads are drained.
    """
    results: list[FetchedFile | None] = [None] * len(files)
    done_prefix, prefix_rows = 0, 0
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-download") as pool:
        inflight: dict[Future[FetchedFile], int] = {}
        next_i = 0
        budget_met = False
        try:
            while True:
                while not budget_met and error is None and next_i < len(files) and len(inflight) < workers:
                    inflight[pool.submit(job, files[next_i])] = next_i
                    next_i += 1
                if not inflight:
                    break
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = inflight.pop(fut)
                    try:
                        results[i] = fut.result()
                    except _Cancelled:
                        pass
                    except BaseException as exc:  # noqa: BLE001 - re-raised once the pool is drained
                        if error is None:
                            error = exc
                        stop.set()
                while not budget_met and done_prefix < len(files) and results[done_prefix] is not None:
                    prefix_rows += results[done_prefix].rows or 0  # type: ignore[union-attr]
                    done_prefix += 1
                if max_rows is not None and prefix_rows >= max_rows and not budget_met:
                    budget_met = True
                    stop.set()  # in-flight files past the budget are not needed
        finally:
            stop.set()  # on any exit (error, budget, interrupt) workers still running stop at their next block
    if error is not None:
        raise error
    return results, done_prefix
