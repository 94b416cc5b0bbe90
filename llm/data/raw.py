"""Raw parquet as a data stage's ``docs`` input: a folder or glob, local, ``s3://`` or ``hf://``.

datatrove's readers start from any parquet folder; so does ``kiln filter|dedup|tokenizer|tokenize
--input docs=<folder or glob>``. Such an input is not a stage output, so it has no manifest hash to
enter the key. It gets one here, from the content: its files' names (relative to the folder or
the glob's fixed prefix), sizes and sha256. The same files anywhere give the same key; one changed
byte gives a new one.

The stages read their ``docs`` as ``<uri>/data/*.parquet``. So that they need no second reader, a
raw input is presented as a stage-output-shaped *view*: ``$KILN_CACHE/raw/<fingerprint>/data/<name>``
links to each file (a hard link, or a symlink across file systems). Remote files are fetched first
with the one fetcher (llm/fetch.py: listing, verified and resumable transfers) into
``$KILN_CACHE/raw/fetched/<source hash>/``; the view links to those copies.

Checked before any stage work, each a one-line :class:`StageError` naming the source or file: a
folder/glob with no parquet files, a file that is not readable parquet, a file without ``text`` (or
without ``id``, for the stages that split documents by id).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from llm.data.docs import open_checked
from llm.fetch import RemoteFile, fetch_files, list_files, parquet_glob, split_glob
from llm.stages.output import MANIFEST, StageError, canonical_json
from llm.storage import cache_root, is_s3, local_path, sha256_file

# The "stage" a raw input's stand-in manifest names (ROLE_PRODUCERS accepts it for "docs").
RAW_STAGE = "raw"
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def is_raw_candidate(uri: str) -> bool:
    """Whether ``uri`` can name raw parquet: a hub or S3 URI, a glob, or an existing local directory/file."""
    if uri.startswith("hf://") or is_s3(uri):
        return True
    if split_glob(str(local_path(uri)))[1] is not None:
        return True
    p = local_path(uri)
    return p.is_dir() or (p.is_file() and p.suffix == ".parquet")


def _listed(uri: str, s3_endpoint: str) -> list[RemoteFile]:
    try:
        files = list_files(parquet_glob(uri), s3_endpoint=s3_endpoint)
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 - a listing failure (bad bucket, bad path) is the input's problem
        raise StageError(f"{uri}: cannot list raw parquet input ({type(e).__name__}: {e})") from e
    parquet = [f for f in files if f.rel.endswith(".parquet") and not any(p.startswith(".") for p in f.rel.split("/"))]
    if not parquet:
        raise StageError(f"{uri}: no parquet files (neither a finished stage output nor a folder/glob of .parquet)")
    return parquet


def _local_copies(uri: str, files: list[RemoteFile], s3_endpoint: str) -> list[tuple[RemoteFile, Path]]:
    """Each file with a local path: itself when local, else its fetched copy (fetched once, verified)."""
    if all(f.kind == "local" for f in files):
        return [(f, Path(f.uri)) for f in files]
    dest = cache_root("raw", "fetched", hashlib.sha256(uri.encode()).hexdigest()[:20])
    fetched = fetch_files(files, dest, s3_endpoint=s3_endpoint)
    by_rel = {f.rel: f.path for f in fetched}
    return [(f, by_rel[f.rel]) for f in files]


def _sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) in this process: a key is asked for several
    times per command (check, key, run), and a corpus is worth hashing once."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        _SHA_MEMO[memo_key] = sha256_file(path)
    return _SHA_MEMO[memo_key]


def _link(src: Path, dest: Path) -> None:
    """Put ``src`` at ``dest`` without copying: a hard link, else a symlink (another file system)."""
    if dest.is_file() and dest.stat().st_size == src.stat().st_size and os.path.samefile(dest, src):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        tmp.symlink_to(src.resolve())
    os.replace(tmp, dest)


def raw_docs_input(uri: str, *, s3_endpoint: str = "", columns: tuple[str, ...] = ("text",)) -> dict[str, Any] | None:
    """A stand-in manifest for raw parquet at ``uri`` (see the module docstring), or None when ``uri``
    cannot be raw parquet (then the caller's "not a finished stage output" error stands).

    Every file must have ``columns`` (the reading stage's needs: ``text``; also ``id`` for the
    tokenizer and tokenize, which split by id hash)."""
    if not is_raw_candidate(uri):
        return None
    if not (uri.startswith("hf://") or is_s3(uri)) and (local_path(uri) / MANIFEST).is_file():
        raise StageError(f"{uri}: a stage output whose {MANIFEST} does not verify (unfinished or damaged); "
                         "rerun its stage, or pass its data/ folder as raw parquet")
    files = _listed(uri, s3_endpoint)
    local = _local_copies(uri, files, s3_endpoint)
    for rf, path in local:  # every file, before any stage work
        open_checked(path, rf.uri, columns=columns)
    entries = [{"name": rf.rel, "uri": _where(rf.uri), "size": path.stat().st_size, "sha256": _sha256(path)}
               for rf, path in local]
    fingerprint = hashlib.sha256(canonical_json(
        {"stage": RAW_STAGE, "files": {e["name"]: [e["size"], e["sha256"]] for e in entries}}).encode()).hexdigest()[:20]
    view = cache_root("raw", fingerprint)
    for (rf, path) in local:
        _link(path, view / "data" / rf.rel)
    return {"uri": str(view), "hash": fingerprint, "stage": RAW_STAGE, "counts": {"files": len(entries)},
            "raw": {"source": _where(uri), "files": entries}}


def _where(uri: str) -> str:
    """A local path as an absolute one (a manifest outlives the cwd it was made in); URIs as they are."""
    return uri if uri.startswith("hf://") or is_s3(uri) else str(local_path(uri).absolute())
