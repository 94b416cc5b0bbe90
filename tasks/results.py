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
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableFileSystem

from llm.config import KilnConfig
from llm.storage import Store, is_s3, join


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
        return self._store().get_bytes(self._resolve_path(path))

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
