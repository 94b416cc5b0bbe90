"""Helpers for the tokenizer/tokenize tests: publish small real document sets as stage outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from llm.stages.output import run_stage
from llm.storage import Store


def real_docs(shared_data: Path, n: int, skip: int = 0, shard: int = 0) -> list[dict]:
    """``n`` documents (text, id, url) from one offline pretraining shard, starting at row ``skip``."""
    pf = pq.ParquetFile(shared_data / "pretrain" / f"shard_{shard:05d}.parquet")
    rows: list[dict] = []
    seen = 0
    for batch in pf.iter_batches(batch_size=256, columns=["text", "id", "url"]):
        for r in batch.to_pylist():
            if seen >= skip:
                rows.append(r)
                if len(rows) == n:
                    return rows
            seen += 1
    return rows


def publish_docs(root: Path | str, files: Sequence[Sequence[dict]], *, row_group_size: int = 64, tag: str = "t",
                 schema: pa.Schema | None = None) -> str:
    """Publish ``files`` (lists of row dicts) as a verified stage output ``data/part_XXXXX.parquet``."""

    def fn(out, inputs):
        for i, rows in enumerate(files):
            table = pa.Table.from_pylist(list(rows), schema=schema)
            pq.write_table(table, out.path(f"data/part_{i:05d}.parquet"), row_group_size=row_group_size)
        return {"counts": {"docs_out": sum(len(f) for f in files)}}

    return run_stage(Store(str(root)), "dedup", {"tag": tag}, {}, "test", fn).uri
