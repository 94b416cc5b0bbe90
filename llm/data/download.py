"""The download stage: fetch parquet shards from the Hugging Face hub, S3 or a local path, verify
every file, and publish them as ``data/<name>.parquet``.

The transfer itself (listing, hub revision pinning, ranged resume across retries and runs,
size/sha256/parquet verification) is :mod:`llm.fetch`; this module adds what makes it a stage: the
source as configured (or the offline mirror's copy), the budgets, a schema check per shard, and
the published shards.

Budgets: ``max_files`` takes the first N files in path order. ``max_rows`` fetches files in path
order until those fetched hold at least ``max_rows`` rows; the stage then makes the budget exact
by rewriting the last shard with only the rows it needs (row groups are streamed, so memory stays
bounded). Each shard's text column must be UTF-8 text (renamed to ``text``), and an ``id`` column
is added when missing.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from llm.data.docs import check_published_docs, output_names
from llm.fetch import DownloadError, FetchedFile, fetch_files, list_files, parquet_glob, parse_hf, pin_source
from llm.sources import resolve_source
from llm.stages.output import StageOutput
from llm.storage import atomic_path


def _stage_source(cfg: Any) -> str:
    """The URI the stage reads: the mirror's copy when one is set; a bare directory means its parquet files."""
    return parquet_glob(resolve_source(cfg.download.source, "pretrain", cfg.run.data_mirror))


def key_extras(cfg: Any) -> dict[str, Any]:
    """The source actually read (a mirror's copy when one is set), beside the configured one.

    The hub commit a branch points at is NOT in the key: the key must be computable without the
    network (the orchestrator checks its cache before the stage runs), so ``...@main/...`` keeps
    one key while ``main`` moves, and a finished output is reused as is. To take a newer commit,
    name it (``@<sha>`` is part of the source string, hence of the key) or force the stage. What
    each output holds is still exact: its manifest records the requested revision and the resolved
    ``source_commit``, and downstream keys hash the files' sha256 (the manifest hash), so new bytes
    under the same key still change every key after it.
    """
    return {"resolved_source": _stage_source(cfg)}


def _check_shard(text_column: str) -> Callable[[FetchedFile], None]:
    def check(f: FetchedFile) -> None:
        import pyarrow.parquet as pq

        if f.rows is None:
            raise DownloadError(f"{f.uri}: not a .parquet file; the download stage takes parquet shards (narrow the glob)")
        schema = pq.ParquetFile(f.path).schema_arrow
        if text_column not in schema.names:
            raise DownloadError(f"{f.uri}: no {text_column!r} column (columns: {', '.join(schema.names)}); "
                                f"set download.text_column")
        if text_column != "text" and "text" in schema.names:
            raise DownloadError(f"{f.uri}: has both {text_column!r} and 'text' columns; cannot rename {text_column!r} to 'text'")
        if not f.rows:
            raise DownloadError(f"{f.uri}: empty shard (0 rows)")
    return check


def _check_utf8(col: Any, label: str, first_row: int) -> Any:
    """Return ``col`` as a valid string array, or raise naming the first row that is null or not UTF-8."""
    import pyarrow as pa

    if isinstance(col, pa.Array):
        col = pa.chunked_array([col], col.type)
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        # Text stored as bytes: accepted when it is valid UTF-8 (checked below), written as string.
        target = pa.large_string() if pa.types.is_large_binary(col.type) else pa.string()
        col = pa.chunked_array([c.view(target) for c in col.chunks], target)
    elif not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise DownloadError(f"{label}: text column has type {col.type}, expected a string")
    if col.null_count:  # filter and every later stage need a text per document
        import pyarrow.compute as pc

        row = pc.index(pc.is_null(col), True).as_py()
        raise DownloadError(f"{label}: row {first_row + row}: text is null")
    offset = 0
    for chunk in col.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            for j, value in enumerate(chunk.view(pa.large_binary() if pa.types.is_large_string(chunk.type) else pa.binary())):
                raw = value.as_py()
                try:
                    if raw is not None:
                        raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DownloadError(f"{label}: row {first_row + offset + j}: text is not valid UTF-8 ({e})") from e
            raise
        offset += len(chunk)
    return col


def finalize_shard(src: Path, dest: Path, *, label: str, text_column: str, keep_rows: int | None, id_prefix: str) -> int:
    """Write ``src`` as an output shard at ``dest`` (atomically); returns its row count.

    Checks the text is UTF-8, renames ``text_column`` to ``text``, adds an ``id`` column
    (``<id_prefix>:<row>``) when missing and keeps only the first ``keep_rows`` rows. When none of
    that changes anything the verified file is hard-linked as is (no copy, same bytes).
    """
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    total = pf.metadata.num_rows
    keep = total if keep_rows is None else min(keep_rows, total)
    add_id = "id" not in pf.schema_arrow.names
    with atomic_path(dest) as tmp:
        if add_id or text_column != "text" or keep < total:
            _rewrite_shard(pf, tmp, label=label, text_column=text_column, keep=keep, id_prefix=id_prefix if add_id else None)
        else:
            first = 0
            for g in range(pf.metadata.num_row_groups):
                _check_utf8(pf.read_row_group(g, columns=[text_column]).column(0), label, first)
                first += pf.metadata.row_group(g).num_rows
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem or no hard links: copy
                shutil.copyfile(src, tmp)
    return keep


def _rewrite_shard(pf: Any, tmp: Path, *, label: str, text_column: str, keep: int, id_prefix: str | None) -> None:
    """Stream the first ``keep`` rows of ``pf`` into ``tmp`` one row group at a time (bounded memory),
    with ``text_column`` checked and renamed to ``text`` and, given an ``id_prefix``, an ``id`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    row = 0
    try:
        for g in range(pf.metadata.num_row_groups):
            if row >= keep:
                break
            table = pf.read_row_group(g)
            table = table.slice(0, keep - row)
            i = table.schema.get_field_index(text_column)
            table = table.set_column(i, "text", _check_utf8(table.column(i), label, row))
            if id_prefix is not None:
                ids = pa.array([f"{id_prefix}:{r}" for r in range(row, row + table.num_rows)], pa.string())
                table = table.append_column("id", ids)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=max(1, table.num_rows))
            row += table.num_rows
    finally:
        if writer is not None:
            writer.close()


def output_name(rel: str) -> str:
    """``data/<name>``: the source path below the glob's prefix, flattened (``a/b.parquet`` -> ``a__b.parquet``)."""
    name = rel.replace("/", "__")
    return name if name.endswith(".parquet") else f"{name}.parquet"


def run(cfg: Any, out: StageOutput, inputs: dict[str, dict], *, progress: bool) -> dict[str, Any]:
    """The download stage (no inputs): fetch and verify (llm.fetch), then publish ``data/<name>.parquet``."""
    d = cfg.download
    source = _stage_source(cfg)
    # Pin a hub branch to its commit once, before listing: every file then comes from one snapshot.
    # A resume after a crash may pin a newer commit; files left in _raw from the older one are
    # refetched when their sha256 no longer matches the listing (see llm.fetch), so no mix survives.
    pinned, commit = pin_source(source, retries=d.retries, timeout_s=d.timeout_s, backoff_s=d.backoff_s)
    if resolve_source(d.source, "pretrain", cfg.run.data_mirror) != d.source:
        # Said out loud: a mirror silently standing in for the hub would look like the real data.
        print(f"[download] data mirror in use: reading {source} instead of {d.source}", file=sys.stderr, flush=True)
    # Verified downloads, plus hidden `.<name>.part` files (with sidecars) a crashed run was fetching;
    # kept across crashes for resume, removed before publishing. Only fetch_files' results are
    # published, never a listing of this directory, so a partial cannot pass for a shard.
    raw_dir = out.workdir / "_raw"
    fetched, names = _fetch_shards(cfg, pinned, raw_dir, progress)
    if not fetched:
        raise DownloadError(f"no parquet files match {source}")
    short = d.max_files is not None and d.max_rows is None and len(fetched) < d.max_files
    if short:  # a budget the source cannot meet: fewer tokens than the preset planned for
        print(f"[download] download.max_files={d.max_files} but {source} has only {len(fetched)} matching "
              "files: all of them were taken", file=sys.stderr, flush=True)
    shards = _publish_shards(out, fetched, names, text_column=d.text_column, max_rows=d.max_rows)
    shutil.rmtree(raw_dir, ignore_errors=True)
    rows = sum(s["rows"] for s in shards.values())
    check_published_docs("download", out.workdir, [f"data/{name}" for name in shards], rows, what="rows")
    return {
        "counts": {"files": len(shards), "rows": rows, "docs_out": rows, "bytes": sum(s["bytes"] for s in shards.values()),
                   "resumed_files": sum(1 for s in shards.values() if s["resumed"]),
                   # bytes received, retries included (a ranged resume only adds the missing part)
                   "transferred_bytes": sum(f.transferred for f in fetched),
                   # bytes an interrupted earlier run had fetched and this one continued
                   "reused_bytes": sum(f.reused_bytes for f in fetched)},
        "source": d.source,
        "resolved_source": source,
        "budget_short": short,  # max_files asked for more files than the source has
        # hub sources: the revision asked for and the commit it was read at (None for other sources)
        "source_revision": parse_hf(source)[1] if source.startswith("hf://") else None,
        "source_commit": commit,
        "pinned_source": pinned,
        "shards": shards,
    }


def _fetch_shards(cfg: Any, pinned: str, raw_dir: Path, progress: bool) -> tuple[list[FetchedFile], list[str]]:
    """The verified files of the (pinned) source within the budget, in path order, and their output names."""
    d = cfg.download
    listed = list_files(pinned, s3_endpoint=cfg.run.s3_endpoint, timeout_s=d.timeout_s, retries=d.retries,
                        backoff_s=d.backoff_s)[: d.max_files]
    # Flattening hub subdirectories can map two files to one name: fail naming both, before fetching.
    out_names = dict(zip((f.rel for f in listed),
                         output_names("download", [(f.uri, f"data/{output_name(f.rel)}") for f in listed])))
    fetched = fetch_files(listed, raw_dir, max_rows=d.max_rows, workers=d.workers,
                          retries=d.retries, timeout_s=d.timeout_s, backoff_s=d.backoff_s,
                          s3_endpoint=cfg.run.s3_endpoint, validate=_check_shard(d.text_column), progress=progress)
    return fetched, [out_names[f.rel][len("data/"):] for f in fetched]


def _publish_shards(out: StageOutput, fetched: list[FetchedFile], names: list[str], *, text_column: str,
                    max_rows: int | None) -> dict[str, dict[str, Any]]:
    """Write each fetched file as ``data/<name>`` until ``max_rows`` rows are out (the last one trimmed to
    the exact budget); returns the manifest's per-shard record."""
    remaining = max_rows
    shards: dict[str, dict[str, Any]] = {}
    for f, name in zip(fetched, names):
        if remaining is not None and remaining <= 0:
            break
        dest = out.path(f"data/{name}")
        rows = finalize_shard(f.path, dest, label=f.uri, text_column=text_column, keep_rows=remaining, id_prefix=name)
        shards[name] = {"rows": rows, "bytes": dest.stat().st_size, "source": f.uri, "source_rows": f.rows,
                        "source_bytes": f.size, "resumed": f.resumed, "transferred_bytes": f.transferred,
                        "reused_bytes": f.reused_bytes}
        if remaining is not None:
            remaining -= rows
    return shards
