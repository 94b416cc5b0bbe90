"""The ``filter`` stage: FineWeb-recipe quality filters over every shard of a document set.

Input role ``docs``: a stage output with ``data/*.parquet`` (``text`` and ``id`` columns, any
others). Output: ``data/<same name>.parquet`` with every original column and only the kept
rows; a kept row's ``text`` is the text after C4's line removal (see llm/data/filters/c4.py).

One unit per shard (``filter.workers`` at a time, on the ``run.executor``: llm/data/executor.py;
a rerun after a crash filters only the shards without a finished part). Each shard is streamed one record batch
at a time and kept rows are appended with a ParquetWriter, so a worker holds one batch in
memory whatever the shard size. The manifest counts documents in and out, removals per rule
(the first rule that removed a document) and keeps a few removed examples per rule.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llm.config import FilterConfig, KilnConfig
from llm.stages.output import StageError, StageOutput
from llm.storage import Store, atomic_path, join
from llm.data.docs import check_published_docs, column_strings, list_doc_files, open_checked, output_names
from llm.data.filters import FilterChain
from llm.data.executor import Unit, run_units, stage_executor
from llm.data.parallel import advance

BATCH_ROWS = 1024
EXAMPLE_CHARS = 200


def key_extras(cfg: KilnConfig) -> dict[str, Any]:
    """The block list's content (the config names only its path), so editing that file invalidates the cache."""
    if not cfg.filter.url_blocklist:
        return {}
    path = Path(cfg.filter.url_blocklist)
    if not path.is_file():
        raise StageError(f"filter.url_blocklist: no such file {path}")
    return {"url_blocklist_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@dataclass
class ShardReport:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    removed: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def open_shard(path: str | Path, name: str) -> pq.ParquetFile:
    """Open one input shard and check it can be filtered: readable, a string or binary text column, not empty."""
    return open_checked(path, name, ("text",), binary_text=True, nonempty=True)


def _output_schema(schema: pa.Schema) -> pa.Schema:
    """Input schema with ``text`` as a UTF-8 string column (binary input is decoded)."""
    i = schema.get_field_index("text")
    t = schema.field("text").type
    text_type = pa.large_string() if pa.types.is_large_string(t) or pa.types.is_large_binary(t) else pa.string()
    return schema.set(i, schema.field("text").with_type(text_type))


def filter_shard(src: str, name: str, dst: str, cfg: FilterConfig, examples_per_rule: int) -> ShardReport:
    """Filter one shard into ``dst`` (written under a temp name, renamed when complete)."""
    pf = open_shard(src, name)
    chain = FilterChain(cfg)
    schema = pf.schema_arrow
    out_schema = _output_schema(schema)
    text_idx = schema.get_field_index("text")
    has_id, has_url = "id" in schema.names, "url" in schema.names
    report = ShardReport(name)
    row = 0
    with atomic_path(dst) as tmp, pq.ParquetWriter(tmp, out_schema, compression="zstd") as writer:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            texts = column_strings(batch.column(text_idx), name, "text", row)
            urls = batch.column("url").to_pylist() if has_url else [None] * len(texts)
            ids = batch.column("id").to_pylist() if has_id else [None] * len(texts)
            keep_mask: list[bool] = []
            kept_texts: list[str] = []
            for j, (text, url) in enumerate(zip(texts, urls)):
                d = chain(text, url)
                report.chars_in += len(text)
                keep_mask.append(d.keep)
                if d.keep:
                    kept_texts.append(d.text)
                    report.chars_out += len(d.text)
                    continue
                reason = d.reason or "unknown"
                report.removed[reason] += 1
                ex = report.examples.setdefault(reason, [])
                if len(ex) < examples_per_rule:
                    ex.append({"id": None if ids[j] is None else str(ids[j]), "url": url, "row": row + j,
                               "text": text[:EXAMPLE_CHARS]})
            advance(len(texts))  # documents, for the stage's progress bar
            report.docs_in += len(texts)
            report.docs_out += len(kept_texts)
            row += len(texts)
            if kept_texts:
                kept = pa.Table.from_batches([batch.filter(pa.array(keep_mask, type=pa.bool_()))])
                text_field = out_schema.field("text")
                kept = kept.set_column(text_idx, text_field, pa.array(kept_texts, type=text_field.type))
                writer.write_table(kept.cast(out_schema))
    return report


def _filter_job(job: tuple[Any, ...]) -> ShardReport:
    """One shard's ``filter_shard`` arguments as a single task (module level, so workers can unpickle it)."""
    return filter_shard(*job)


def report_json(r: ShardReport) -> dict[str, Any]:
    """A shard's report as its part manifest records it."""
    return {"name": r.name, "docs_in": r.docs_in, "docs_out": r.docs_out, "chars_in": r.chars_in,
            "chars_out": r.chars_out, "removed": dict(r.removed), "examples": r.examples}


def report_from_json(d: dict[str, Any]) -> ShardReport:
    return ShardReport(**{**d, "removed": Counter(d["removed"])})


def filter_units(cfg: KilnConfig, out: StageOutput, shards: list[tuple[str, Path]]) -> list[Unit]:
    """One unit per shard: its arguments to ``filter_shard`` and the one file it writes."""
    fcfg = cfg.filter
    return [Unit(f"shard_{i:05d}", (str(path), name, str(out.path(name)), fcfg, fcfg.examples_per_rule),
                 (str(out.path(name)),), pq.ParquetFile(path).metadata.num_rows) for i, (name, path) in enumerate(shards)]


def input_shards(cfg: KilnConfig, inputs: dict[str, dict]) -> list[tuple[str, Path]]:
    """(name, local path) of every shard of the ``docs`` input, each validated before any is filtered.

    The name is also the shard's output name, checked so that no two shards share one.
    """
    if "docs" not in inputs:
        raise StageError("filter needs an input 'docs' (a download stage output)")
    docs_uri = inputs["docs"]["uri"]
    listed = list_doc_files(Store(cfg.run.artifact_root, cfg.run.s3_endpoint), docs_uri)
    names = output_names("filter", [(join(docs_uri, name), name) for name, _ in listed])
    shards = [(name, path) for name, (_, path) in zip(names, listed)]
    for name, path in shards:
        open_shard(path, name)  # validate every shard before spending time on any
    return shards


def summarize(reports: list[ShardReport], examples_per_rule: int) -> dict[str, Any]:
    """The stage's manifest fields from per-shard reports (in shard order, so the manifest is deterministic)."""
    removed: Counter = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    for r in reports:
        removed.update(r.removed)
        for rule, exs in r.examples.items():
            slot = examples.setdefault(rule, [])
            slot.extend({"shard": r.name, **e} for e in exs[: examples_per_rule - len(slot)])
    docs_in = sum(r.docs_in for r in reports)
    docs_out = sum(r.docs_out for r in reports)
    return {
        "counts": {
            "docs_in": docs_in,
            "docs_out": docs_out,
            "removed": docs_in - docs_out,
            "kept_fraction": round(docs_out / docs_in, 4) if docs_in else 0.0,
            "chars_in": sum(r.chars_in for r in reports),
            "chars_out": sum(r.chars_out for r in reports),
            "shards": len(reports),
        },
        "removed_by_rule": dict(sorted(removed.items())),
        "examples_per_rule": dict(sorted(examples.items())),
        "shards": {r.name: {"docs_in": r.docs_in, "docs_out": r.docs_out} for r in reports},
    }


def check_output(out: StageOutput, reports: list[ShardReport]) -> None:
    """Fail, rather than publish, unless the output holds exactly the kept documents the reports count."""
    check_published_docs("filter", out.workdir, [r.name for r in reports], sum(r.docs_out for r in reports))


def run(cfg: KilnConfig, out: StageOutput, inputs: dict[str, dict], *, progress: bool) -> dict[str, Any]:
    fcfg = cfg.filter
    if fcfg.url_blocklist and not Path(fcfg.url_blocklist).is_file():
        raise StageError(f"filter.url_blocklist: no such file {fcfg.url_blocklist}")
    try:
        FilterChain(fcfg)  # fail fast on a missing language model or unreadable block list
    except Exception as e:  # noqa: BLE001
        raise StageError(f"filter config: {e}") from e
    shards = input_shards(cfg, inputs)
    with stage_executor(cfg.run.executor, fcfg.workers) as executor:
        # Reports come back in shard order whatever the executor, so the manifest is deterministic.
        reports = run_units(executor, _filter_job, filter_units(cfg, out, shards), out.workdir / ".units" / "filter",
                            desc="filter", progress=progress, encode=report_json, decode=report_from_json, unit="doc")
    check_output(out, reports)
    return summarize(reports, fcfg.examples_per_rule)
