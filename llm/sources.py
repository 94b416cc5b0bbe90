"""Where data comes from: hub, local, S3 or an offline mirror.

Sources are URIs:
- ``hf://datasets/<owner>/<name>@<revision>/<glob>``: a Hugging Face dataset repo (honours HF_ENDPOINT, HF_TOKEN);
- ``s3://bucket/prefix/<glob>``;
- a local path or glob.

An offline mirror (``run.data_mirror`` or ``KILN_DATA_MIRROR``) has the layout of
``../shared/data``: ``pretrain/*.parquet``, ``chat/{train,val}.parquet``, ``core_eval/``.
When set, each hub source of a known kind is read from the mirror instead, so one setting
switches a whole preset to offline data. This module only decides which URI to read; fetching it
(listing, verified and resumable transfers) is llm/fetch.py.
"""

from __future__ import annotations

import os
from pathlib import Path

MIRROR_LAYOUT = {
    "pretrain": "pretrain/*.parquet",
    "chat_train": "chat/train.parquet",
    "chat_val": "chat/val.parquet",
    "core_eval": "core_eval",
}


def mirror_root(configured: str = "") -> str:
    return configured or os.environ.get("KILN_DATA_MIRROR", "")


def resolve_source(uri: str, kind: str, mirror: str = "") -> str:
    """The URI to actually read for a source of ``kind``: the mirror's copy when a mirror is set."""
    root = mirror_root(mirror)
    if root and (uri.startswith("hf://") or uri.startswith("http://") or uri.startswith("https://")):
        return str(Path(root).expanduser().resolve() / MIRROR_LAYOUT[kind])
    return uri
