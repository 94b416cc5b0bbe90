"""The artifact store: one interface over a local directory and S3-compatible storage.

URIs are either plain paths / ``file://`` paths or ``s3://bucket/prefix``. The S3 endpoint
comes from the caller (config) or ``AWS_ENDPOINT_URL``; credentials come from boto3's
standard chain (``AWS_ACCESS_KEY_ID`` etc.) and are never logged.

Writes are atomic on both backends: local files go to a temp name and are renamed
(:func:`atomic_path`); S3 objects only appear when the (multipart) upload completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import time
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

CHUNK = 8 * 1024 * 1024
_CLIENT_LOCK = threading.Lock()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path to write ``path`` through by any means (a streaming parquet writer, ``np.save``, a
    hard link): renamed over ``path`` when the block exits cleanly, removed when it raises, so a reader
    sees the old file or the new one, never half of either.

    The temp name sits in the same directory (same filesystem, so the rename is atomic), carries the
    pid and a random part, so two writers of one path never share it, and starts with a dot and ends
    in ``.tmp`` so a stage publish never lists it. It does not exist when the block starts; a block
    that creates no file there publishes nothing (a writer that found nothing to write leaves
    ``path`` as it was). This and :func:`write_atomic` are Kiln's only atomic file writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically, through :func:`atomic_path`: use it for
    every whole-file write, don't write another."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:  # "x": the temp name is ours alone
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join URI parts with '/', for local paths and s3:// alike."""
    out = str(uri).rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"bad S3 URI {uri!r}: no bucket")
    return bucket, key


def local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return Path(uri)


class TransientError(RuntimeError):
    """An error worth retrying (network, 5xx, throttling)."""


def is_transient(exc: BaseException) -> bool:
    """A storage error worth retrying: connection trouble, timeouts, S3 5xx and throttling."""
    if isinstance(exc, TransientError):
        return True
    try:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnError, EndpointConnectionError, ReadTimeoutError
    except ImportError:  # pragma: no cover
        return isinstance(exc, (ConnectionError, TimeoutError))
    if isinstance(exc, (BotoConnError, EndpointConnectionError, ReadTimeoutError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in {"SlowDown", "Throttling", "RequestTimeout", "InternalError"}
    return False


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float | None = None,
    what: str = "",
    classify: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], Any] = time.sleep,
    give_up: Callable[[BaseException], BaseException] | None = None,
) -> T:
    """Run ``fn``, retrying with exponential backoff on transient errors only.

    Deterministic errors (missing key, access denied, bad data) are raised at once so the
    user sees the real cause instead of a slow retry loop. ``classify`` says which errors are
    transient; the wait before retry ``i`` (from 0) is ``base_delay * 2**i``, capped at
    ``max_delay``, spent in ``sleep`` (which may raise to abandon, e.g. on a stop event).
    When every attempt failed transiently, ``give_up(last error)`` (if given) is raised from it;
    otherwise the last error itself.
    """
    attempts = max(1, attempts)
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not classify(exc):
                raise
            if i == attempts - 1:
                if give_up is None:
                    raise
                raise give_up(exc) from exc
            delay = base_delay * (2**i)
            sleep(delay if max_delay is None else min(max_delay, delay))
    raise AssertionError("unreachable")


def cache_root(*parts: str) -> Path:
    """Kiln's local cache, ``$KILN_CACHE`` (default ``~/.cache/kiln``), joined with ``parts``.

    One rule for every cached download (S3 objects, checkpoints, the CORE bundle, chat files, stage
    scratch) so that pointing KILN_CACHE at a big or shared disk moves all of them at once.
    """
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")).joinpath(*parts)


@dataclass
class Store:
    """Artifact store rooted at ``root`` (a directory or ``s3://bucket/prefix``)."""

    root: str
    endpoint_url: str = ""
    # Files at least this large upload as multipart, in parts of multipart_chunksize (S3 needs >= 5 MiB parts).
    multipart_threshold: int = CHUNK * 8
    multipart_chunksize: int = CHUNK * 8
    _client_cache: Any = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ plumbing
    def _client(self):
        import boto3
        from botocore.config import Config

        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        # One client per (store, endpoint): clients are thread-safe, but creating them through
        # boto3's default session is not, and threads (parallel downloads) share a Store.
        with _CLIENT_LOCK:
            if self._client_cache is None or self._client_cache[0] != endpoint:
                # botocore's own retries are off: with_retries owns the policy, so it is stated once.
                client = boto3.client(
                    "s3", endpoint_url=endpoint,
                    config=Config(retries={"max_attempts": 1}, connect_timeout=10, read_timeout=60),
                )
                self._client_cache = (endpoint, client)
            return self._client_cache[1]

    def __getstate__(self) -> dict[str, Any]:
        # A Store may be sent to worker processes; boto3 clients do not pickle, so rebuild there.
        return {**self.__dict__, "_client_cache": None}

    def uri(self, *parts: str) -> str:
        return join(self.root, *parts)

    # ------------------------------------------------------------------ operations
    def put(self, local: str | Path, uri: str) -> None:
        """Upload/copy one file atomically. Large files stream as multipart uploads."""
        local = Path(local)
        if is_s3(uri):
            from boto3.s3.transfer import TransferConfig

            bucket, key = split_s3(uri)
            cfg = TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=self.multipart_chunksize)
            with_retries(lambda: self._client().upload_file(str(local), bucket, key, Config=cfg), what=f"put {uri}")
            return
        with atomic_path(local_path(uri)) as tmp:
            shutil.copyfile(local, tmp)

    def put_bytes(self, data: bytes, uri: str) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with_retries(lambda: self._client().put_object(Bucket=bucket, Key=key, Body=data), what=f"put {uri}")
            return
        write_atomic(local_path(uri), data)

    def get(self, uri: str, local: str | Path) -> Path:
        """Download/copy one file to ``local`` atomically; returns the local path."""
        local = Path(local)
        with atomic_path(local) as tmp:
            if is_s3(uri):
                bucket, key = split_s3(uri)
                with_retries(lambda: self._client().download_file(bucket, key, str(tmp)), what=f"get {uri}")
            else:
                src = local_path(uri)
                if not src.exists():
                    raise FileNotFoundError(f"no such artifact: {uri}")
                shutil.copyfile(src, tmp)
        return local

    def get_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, key = split_s3(uri)

            def fetch() -> bytes:
                return self._client().get_object(Bucket=bucket, Key=key)["Body"].read()

            try:
                return with_retries(fetch, what=f"get {uri}")
            except Exception as exc:
                # Only a missing key is "not found"; access denied and the like must surface as themselves.
                resp = getattr(exc, "response", None) or {}
                status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if resp.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"} or status == 404:
                    raise FileNotFoundError(f"no such artifact: {uri}") from exc
                raise
        p = local_path(uri)
        if not p.exists():
            raise FileNotFoundError(f"no such artifact: {uri}")
        return p.read_bytes()

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            from botocore.exceptions import ClientError

            def head() -> bool:
                try:
                    self._client().head_object(Bucket=bucket, Key=key)
                    return True
                except ClientError as exc:
                    if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                        return False
                    raise

            return with_retries(head, what=f"exists {uri}")
        return local_path(uri).exists()

    def list(self, uri: str) -> list[str]:
        """All file URIs under the prefix ``uri`` (recursive), sorted."""
        return sorted(self.list_sizes(uri))

    def list_sizes(self, uri: str) -> dict[str, int]:
        """``{file URI: size in bytes}`` for every file under the prefix ``uri`` (recursive)."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            prefix = key.rstrip("/") + "/" if key else ""

            def page() -> dict[str, int]:
                out: dict[str, int] = {}
                paginator = self._client().get_paginator("list_objects_v2")
                for resp in paginator.paginate(Bucket=bucket, Prefix=prefix):
                    out.update({f"s3://{bucket}/{o['Key']}": int(o["Size"]) for o in resp.get("Contents", [])})
                return out

            return with_retries(page, what=f"list {uri}")
        base = local_path(uri)
        if not base.exists():
            return {}
        return {str(p): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def delete_prefix(self, uri: str) -> None:
        if is_s3(uri):
            client = self._client()
            bucket, _ = split_s3(uri)
            for obj in self.list(uri):
                with_retries(lambda o=obj: client.delete_object(Bucket=bucket, Key=split_s3(o)[1]))
            return
        shutil.rmtree(local_path(uri), ignore_errors=True)

    def put_dir(self, local_dir: str | Path, uri: str) -> None:
        local_dir = Path(local_dir)
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                self.put(p, join(uri, p.relative_to(local_dir).as_posix()))

    def iter_files(self, uri: str) -> Iterator[tuple[str, str]]:
        """(relative path, uri) for every file under ``uri``.

        The relative path is computed against the prefix as the listing spells it, not by cutting
        ``len(uri)`` characters: a local listing normalises ``./root`` to ``root`` and ``a//b`` to
        ``a/b``, and cutting the written length shortened every name by the difference (issue 13).
        """
        if is_s3(uri):
            bucket, key = split_s3(uri)
            prefix = f"s3://{bucket}/" + (key.rstrip("/") + "/" if key else "")
            for u in self.list(uri):
                yield u[len(prefix):], u
            return
        base = local_path(uri)
        for u in self.list(uri):
            yield Path(u).relative_to(base).as_posix(), u

    def cache_path(self, uri: str) -> Path:
        """A local path holding the content of ``uri``: the file itself when local, else a cached download."""
        if not is_s3(uri):
            return local_path(uri)
        cache = cache_root("s3", *map(_cache_component, uri[len("s3://"):].split("/")))
        if not cache.exists():
            self.get(uri, cache)
        return cache


def _cache_component(part: str) -> str:
    """One S3 key component as a local path component, injectively and inside the cache.

    S3 keys may hold empty, ``.`` and ``..`` components (``data//x``, ``data/../x``) that a local path
    would merge with another key's file or lead out of the cache; those are escaped (``%`` first, so
    no ordinary name is mistaken for an escape). Every other component is kept as is, so sibling
    files (a shard and its index) stay siblings in the cache.
    """
    part = part.replace("%", "%25")
    return {"": "%", ".": "%2E", "..": "%2E%2E"}.get(part, part)


def store_for(root: str, endpoint_url: str = "") -> Store:
    return Store(root=str(root), endpoint_url=endpoint_url)
