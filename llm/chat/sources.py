"""Reading chat sets: local parquet/JSON files, or remote ones (the hub, S3) fetched into the cache.

A remote set is fetched and verified by Kiln's one fetcher (:mod:`llm.fetch`), each file under a
content-keyed cache directory, then read with the ``datasets`` library in streaming mode; rows come
back as dicts for the schema adapters of :mod:`llm.chat.format`, and :func:`iter_conversations` /
:func:`load_conversations` hand back validated conversations with their drop report.
"""

from __future__ import annotations

import glob as globlib
import hashlib
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from llm.chat.format import ChatSchemaError, DropReport, Message, detect_schema, normalize_rows
from llm.fetch import DownloadError, RemoteFile, fetch_files, list_files
from llm.stages.output import StageError
from llm.storage import cache_root

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


def _local_files(uri: str) -> list[str]:
    p = Path(uri).expanduser()
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet"))
    elif any(ch in uri for ch in "*?["):
        files = sorted(globlib.glob(str(p)))
    else:
        files = [str(p)] if p.exists() else []
    if not files:
        raise FileNotFoundError(f"chat source {uri!r}: no parquet files found")
    return files


def chat_cache_dir() -> Path:
    """Where remote chat files are kept: ``$KILN_CACHE/chat`` (the KILN_CACHE convention of
    ``Store.cache_path``, default ``~/.cache/kiln``)."""
    return cache_root("chat")


def _content_key(rf: RemoteFile) -> str:
    """A cache directory name that changes when the file's content does.

    The hub lists each LFS file's sha256, so a hub file is keyed by its content alone (a re-uploaded
    shard gets a fresh entry; the same bytes at another commit or under another name share one).
    Without a content hash (S3 listings, small non-LFS hub files) the key is the URI (for the hub,
    at the commit the fetcher pinned) plus the listed size: the best identity the listing gives.
    Every reuse re-verifies the file against the listing (size, parquet footer, sha256 if listed).
    """
    ident = f"sha256:{rf.sha256}" if rf.sha256 else f"{rf.kind}:{rf.uri}\0{rf.size}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _jsonl_rows(path: Path) -> int | None:
    """Rows of a JSON-lines file (its non-blank lines); None for a ``.json`` file, which may be one array."""
    if path.suffix != ".jsonl":
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def fetch_remote_files(uri: str, *, max_rows: int | None = None, s3_endpoint: str = "",
                       progress: bool = False) -> list[Path]:
    """Download the data files of a remote chat source, verified, into :func:`chat_cache_dir`.

    ``uri`` is ``hf://datasets/<repo>@<rev>/<glob>`` or ``s3://bucket/prefix/<glob or file>``;
    only ``.parquet``/``.jsonl``/``.json`` files among its matches are taken. Kiln's fetcher (llm.fetch)
    does the work, so the files get the pretraining data's guarantees: HF_ENDPOINT/HF_TOKEN are
    honoured, transient failures retried, and sizes, the hub's sha256, and parquet magic/footer/row
    counts verified before a file appears under its name. A file already in the cache that still
    verifies is not fetched again. With ``max_rows`` files are fetched one at a time, in path
    order, until those fetched hold enough rows (parquet footers, JSON lines), so a small budget
    costs one file, not the whole dataset. Returns the local paths in path order.
    """
    try:
        return _fetch_remote_files(uri, max_rows=max_rows, s3_endpoint=s3_endpoint, progress=progress)
    except DownloadError as e:
        # The fetcher names the file (at its pinned commit); add the source as configured.
        if uri in str(e):
            raise
        raise DownloadError(f"chat source {uri!r}: {e}") from e


def _fetch_remote_files(uri: str, *, max_rows: int | None, s3_endpoint: str, progress: bool) -> list[Path]:
    listed = list_files(uri, s3_endpoint=s3_endpoint)
    files = [f for f in listed if f.rel.endswith(DATA_SUFFIXES)]
    if not files:
        seen = ", ".join(f.rel for f in listed[:5]) + (", ..." if len(listed) > 5 else "")
        raise DownloadError(f"chat source {uri!r}: no {'/'.join(DATA_SUFFIXES)} files match"
                            + (f" (found only: {seen})" if listed else ""))
    kinds = {f.rel.endswith(".parquet") for f in files}
    if len(kinds) > 1:
        raise DownloadError(f"chat source {uri!r} matches both parquet and JSON files; narrow the glob to one format")
    # Each file in its own content-keyed directory, under its own base name (datasets picks the reader by suffix).
    keyed = [replace(f, rel=f"{_content_key(f)}/{PurePosixPath(f.rel).name}") for f in files]
    cache = chat_cache_dir()
    kw: dict[str, Any] = {"s3_endpoint": s3_endpoint, "progress": progress}
    if max_rows is None:
        return [f.path for f in fetch_files(keyed, cache, **kw)]
    paths: list[Path] = []
    rows = 0
    for rf in keyed:
        got = fetch_files([rf], cache, **kw)[0]
        paths.append(got.path)
        n = got.rows if got.rows is not None else _jsonl_rows(got.path)
        if n is not None:
            rows += n
            if rows >= max_rows:
                break
    return paths


def iter_rows(uri: str, max_rows: int | None = None, *, s3_endpoint: str = "",
              progress: bool = False) -> Iterator[dict[str, Any]]:
    """Rows of a chat dataset with the ``datasets`` library, streamed (nothing is copied to an Arrow cache).

    ``uri`` is a local parquet file / directory / glob, or a remote source
    (``hf://datasets/<repo>@<rev>/<glob>``, ``s3://bucket/prefix/<glob or file>``) whose files are
    first fetched and verified into the local cache by :func:`fetch_remote_files`. Any schema:
    rows come back as dicts for the adapters to recognise.
    """
    import datasets

    datasets.logging.set_verbosity_error()
    if uri.startswith(("s3://", "hf://")):
        files = [str(p) for p in fetch_remote_files(uri, max_rows=max_rows, s3_endpoint=s3_endpoint, progress=progress)]
    else:
        files = _local_files(uri)
    fmt = "json" if all(f.endswith((".json", ".jsonl")) for f in files) else "parquet"
    ds = datasets.load_dataset(fmt, data_files=files, split="train", streaming=True)
    for i, row in enumerate(ds):
        if max_rows is not None and i >= max_rows:
            return
        yield row


def iter_conversations(uri: str, *, max_rows: int | None, max_chars: int, name: str,
                       s3_endpoint: str = "", progress: bool = False) -> tuple[Iterator[list[Message]], DropReport, str]:
    """Stream validated conversations (the report fills in as the iterator is consumed) and the schema name.

    The schema is detected from the first row, so an unknown schema fails here, before any work.
    """
    report = DropReport(name=name)
    rows = iter_rows(uri, max_rows, s3_endpoint=s3_endpoint, progress=progress)
    first = next(rows, None)
    if first is None:
        raise StageError(f"chat source {uri!r} ({name}) has no rows")
    try:
        schema, adapter = detect_schema(first.keys())
    except ChatSchemaError as e:
        raise ChatSchemaError(f"{uri}: {e}") from None

    def chained() -> Iterator[dict[str, Any]]:
        yield first
        yield from rows

    return normalize_rows(chained(), max_chars, report, adapter), report, schema


def load_conversations(uri: str, *, max_rows: int | None, max_chars: int, name: str,
                       s3_endpoint: str = "", progress: bool = False) -> tuple[list[list[Message]], DropReport, str]:
    """Validated conversations from a chat dataset (in memory), the drop report, and the detected schema name."""
    it, report, schema = iter_conversations(uri, max_rows=max_rows, max_chars=max_chars, name=name,
                                            s3_endpoint=s3_endpoint, progress=progress)
    convs = list(it)
    report.last_row = -1  # materialised: later drops are named by list position, not a stale row
    return convs, report, schema
