"""Where Prefect keeps task results and cache records: one place every worker can read.

Prefect's default result storage is ``~/.prefect/storage`` on whichever machine ran the
task, so a stage cached by the cpu worker is invisible to the gpu worker (or to the next
machine). ``cfg.orchestration.result_storage`` names one shared place instead:

- a directory (made absolute against the current directory, which for deployments is
  the repo root set by the deployment's pull step);
- ``s3://bucket/prefix``, written with the same boto3 client and endpoint as the
  artifact store (``run.s3_endpoint`` / ``AWS_ENDPOINT_URL``), so no s3fs or prefect-aws
  is needed and credentials come from boto3's standard chain.

The S3 block is saved on the Prefect server under a name derived from its location (Prefect
requires saved blocks); any process that imports this module can load it back by id.

Records are JSON (:data:`RESULT_SERIALIZER`), not Prefect's default pickle: a stage's result is
its URI, key and counts, and unpickling a record runs whatever code its writer put there, so
anyone who could write the shared storage could run code on every worker. Prefect decodes a
record with the serializer named *inside* the record, so the S3 block also refuses, on read, a
record that names any other serializer (it then counts as no record: the stage's own manifest
check decides whether the work is done).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableFileSystem
from prefect.serializers import JSONSerializer

from llm.config import KilnConfig
from llm.storage import Store, is_s3, join


def encode_error(obj: Any) -> Any:
    """``json.dumps(default=...)`` for task results: a failed task's exception is recorded as its type
    and message; any other value that is not plain JSON is a bug in what a task returns, and fails the
    write rather than being stored by class name."""
    if isinstance(obj, BaseException):
        return {"error": type(obj).__name__, "message": str(obj)}
    raise TypeError(f"a task result holds a {type(obj).__name__}, which is not plain JSON")


# Plain JSON: no object hook on reading, so decoding a record imports and calls nothing it names.
RESULT_SERIALIZER = JSONSerializer(object_encoder=f"{__name__}.encode_error", object_decoder=None)


class UntrustedResultRecord(ValueError):
    """A result record that is not JSON written by :data:`RESULT_SERIALIZER`: never decoded."""


def check_result_record(content: bytes, where: str) -> None:
    """Raise :class:`UntrustedResultRecord` unless ``content`` is a record that names exactly
    :data:`RESULT_SERIALIZER` (a record naming "pickle", or a JSON serializer whose ``jsonlib``
    or ``object_decoder`` names some other callable, would run code when Prefect decodes it)."""
    try:
        named = json.loads(content)["metadata"]["serializer"]
    except (ValueError, KeyError, TypeError):
        raise UntrustedResultRecord(f"{where}: not a Prefect result record") from None
    if named != RESULT_SERIALIZER.model_dump(mode="json"):
        kind = named.get("type") if isinstance(named, dict) else named
        raise UntrustedResultRecord(f"{where}: result record names serializer {kind!r}, not Kiln's plain JSON; "
                                    f"not decoding it")


class KilnS3ResultStorage(WritableFileSystem):
    """Prefect result storage on S3-compatible object storage through :class:`llm.storage.Store`."""

    _block_type_name = "Kiln S3 Result Storage"
    _block_type_slug = "kiln-s3-result-storage"

    basepath: str
    endpoint_url: str = ""

    def _store(self) -> Store:
        return Store(self.basepath, self.endpoint_url)

    def _resolve_path(self, path: str) -> str:
        return join(self.basepath, path)

    # Prefect calls these both ways: sync with ``_sync=True`` (via async_dispatch) from sync
    # task engines, and the ``a``-prefixed coroutine from async ones.
    async def aread_path(self, path: str) -> bytes:
        return self._read(path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._read(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)

    def _read(self, path: str) -> bytes:
        # FileNotFoundError for a missing key: Prefect treats any exception as "no record".
        uri = self._resolve_path(path)
        content = self._store().get_bytes(uri)
        check_result_record(content, uri)
        return content

    def _write(self, path: str, content: bytes) -> str:
        uri = self._resolve_path(path)
        self._store().put_bytes(content, uri)
        return uri


_SAVED: dict[tuple[str, str], KilnS3ResultStorage] = {}


def result_storage_for(cfg: KilnConfig) -> Path | WritableFileSystem:
    """The result storage for this config (see module docstring).

    Prefect 3.8 accepts a block as a task's ``result_storage`` only once it is saved on the
    server (so other processes can resolve it by id); a local directory is passed as a Path.
    The S3 block is saved under a name derived from its location, once per process.
    """
    where = cfg.orchestration.result_storage
    if is_s3(where):
        ident = (where.rstrip("/"), cfg.run.s3_endpoint)
        if ident not in _SAVED:
            block = KilnS3ResultStorage(basepath=ident[0], endpoint_url=ident[1])
            name = "kiln-results-" + hashlib.sha256("|".join(ident).encode()).hexdigest()[:12]
            block.save(name, overwrite=True)
            _SAVED[ident] = block
        return _SAVED[ident]
    path = Path(where.removeprefix("file://")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
