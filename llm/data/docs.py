"""Reading the documents a data stage published: ``<stage output>/data/*.parquet`` with ``text`` and ``id``.

Shared by the tokenizer and tokenize stages. Files are read one row group at a time so memory
stays bounded by the largest row group, never by the shard or corpus size. S3 inputs go through
:meth:`llm.storage.Store.cache_path`, so the same code reads a local directory or a bucket.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from llm.stages.output import StageError, is_published
from llm.storage import Store, join


@dataclass(frozen=True)
class RowGroup:
    """One unit of work: a row group of one published parquet file."""

    path: str  # local path (cached copy when the input is on S3)
    name: str  # the file's name inside the stage output, for error messages
    index: int
    rows: int


def list_doc_files(store: Store, uri: str) -> list[tuple[str, Path]]:
    """(relative name, local path) of every ``data/*.parquet`` of a stage output, in name order."""
    files = [(rel, u) for rel, u in store.iter_files(join(uri, "data")) if rel.endswith(".parquet")]
    if not files:
        raise StageError(f"{join(uri, 'data')}: no parquet files (expected data/<shard>.parquet from the upstream stage)")
    return [(f"data/{rel}", store.cache_path(u)) for rel, u in sorted(files)]


def output_names(stage: str, pairs: Iterable[tuple[str, str]]) -> list[str]:
    """The output file name (``data/...``) of each ``(source, name)`` pair, normalised and checked.

    A stage derives each output name from an input name; two inputs that land on one name would
    overwrite each other (or race on one ``.tmp``) and half the documents would vanish behind an
    ``ok``. So would a name that publish leaves out (hidden, ``.tmp``) or one that leads out of
    ``data/``. All are a :class:`StageError` naming the source(s) and the name, before any work.
    """
    seen: dict[str, str] = {}
    out: list[str] = []
    for source, name in pairs:
        norm = posixpath.normpath(name)
        if not norm.startswith("data/") or ".." in norm.split("/"):
            raise StageError(f"{stage}: {source} would be written to {name!r}, outside the output's data/")
        if not is_published(norm):
            raise StageError(f"{stage}: {source} would be written to {norm}, a hidden or .tmp name that "
                             "publishing leaves out; rename the file")
        if norm in seen:
            raise StageError(f"{stage}: {seen[norm]} and {source} would both be written to {norm}")
        seen[norm] = source
        out.append(norm)
    return out


def check_published_docs(stage: str, workdir: Path, names: Iterable[str], docs: int, what: str = "docs_out") -> None:
    """Refuse to publish unless the output's ``data/`` files are exactly ``names`` and hold ``docs`` rows.

    The counts in a manifest are what every later stage and the report trust; a file lost to a name
    clash or left out by publish must fail the stage, not ship an ``ok`` with fewer documents. Row
    counts come from the parquet footers (cheap), over the files publish will include.
    """
    data = workdir / "data"
    present = sorted(rel for p in data.rglob("*")
                     if p.is_file() and is_published(rel := p.relative_to(workdir).as_posix())) if data.is_dir() else []
    expected = sorted(set(names))
    if present != expected:
        missing, extra = sorted(set(expected) - set(present)), sorted(set(present) - set(expected))
        raise StageError(f"{stage}: output files differ from the shards written (missing {missing}, unexpected "
                         f"{extra}); not publishing")
    rows = sum(pq.ParquetFile(workdir / rel).metadata.num_rows for rel in present)
    if rows != docs:
        raise StageError(f"{stage}: the output's {len(present)} files hold {rows} documents but the stage counted "
                         f"{what}={docs}; not publishing")


def _is_text_type(t: pa.DataType, binary: bool) -> bool:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    return binary and (pa.types.is_binary(t) or pa.types.is_large_binary(t))


def open_checked(path: Path | str, name: str, columns: tuple[str, ...] = ("text", "id"), *,
                 binary_text: bool = False, nonempty: bool = False) -> pq.ParquetFile:
    """Open a parquet file and check the columns we need exist with usable types.

    ``binary_text`` also accepts a binary ``text`` column (decoded as UTF-8 by :func:`column_strings`);
    ``nonempty`` makes a file with no rows an error.
    """
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise StageError(f"{name}: not a readable parquet file ({e})") from e
    schema = pf.schema_arrow
    for col in columns:
        if col not in schema.names:
            raise StageError(f"{name}: no {col!r} column (columns: {', '.join(schema.names)})")
    if "text" in columns:
        t = schema.field("text").type
        if not _is_text_type(t, binary_text):
            raise StageError(f"{name}: column 'text' has type {t}, expected a string column")
    if nonempty and pf.metadata.num_rows == 0:
        raise StageError(f"{name}: empty shard (0 rows)")
    return pf


def iter_row_groups(pf: pq.ParquetFile, columns: list[str] | None = None) -> Iterator[tuple[int, pa.Table]]:
    """(first row, table) for each row group of ``pf``, read ONE group at a time.

    Read explicitly, without threads: ``iter_batches`` reads ahead and its memory grew with the
    shard in bench_dedup_memory; ``read_row_group`` is bounded by one group.
    """
    first_row = 0
    for i in range(pf.num_row_groups):
        table = pf.read_row_group(i, columns=columns, use_threads=False)
        yield first_row, table
        first_row += table.num_rows


def row_groups(store: Store, uri: str) -> list[RowGroup]:
    """Every row group of every document file of the stage output at ``uri``, in order."""
    out: list[RowGroup] = []
    for name, path in list_doc_files(store, uri):
        pf = open_checked(path, name)
        for i in range(pf.metadata.num_row_groups):
            out.append(RowGroup(str(path), name, i, pf.metadata.row_group(i).num_rows))
    return out


def column_strings(col: pa.ChunkedArray | pa.Array, name: str, field: str, first_row: int) -> list[str]:
    """A string (or binary) column as Python strs; a null or invalid UTF-8 value is an error naming the
    file, row and field.

    Arrow does not validate UTF-8 when reading parquet, so bad bytes surface only on conversion.
    """
    def bad_utf8(row: int, e: Exception) -> StageError:
        why = f"{e.reason} at byte {e.start}" if isinstance(e, UnicodeDecodeError) else str(e)
        return StageError(f"{name}: row {row}: field {field!r} is not valid UTF-8 ({why})")

    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        values = []
        for j, v in enumerate(col.to_pylist()):
            try:
                values.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise bad_utf8(first_row + j, e) from None
    else:
        try:
            values = col.to_pylist()
        except (UnicodeDecodeError, pa.ArrowInvalid):
            row = first_row
            for chunk in (col.chunks if isinstance(col, pa.ChunkedArray) else [col]):
                for v in chunk:
                    try:
                        v.as_py()
                    except (UnicodeDecodeError, pa.ArrowInvalid) as e:
                        raise bad_utf8(row, e) from None
                    row += 1
            raise
    for j, v in enumerate(values):
        if v is None:
            raise StageError(f"{name}: row {first_row + j}: field {field!r} is null")
    return values


def read_row_group(rg: RowGroup) -> tuple[list[str], list[str]]:
    """(texts, ids) of one row group; a null text or id is an error naming file and row."""
    pf = open_checked(Path(rg.path), rg.name)
    table = pf.read_row_group(rg.index, columns=["text", "id"])
    first_row = sum(pf.metadata.row_group(i).num_rows for i in range(rg.index))
    texts = column_strings(table.column("text"), rg.name, "text", first_row)
    ids = [None if v is None else str(v) for v in table.column("id").to_pylist()]
    for j, d in enumerate(ids):
        if d is None:
            raise StageError(f"{rg.name}: row {first_row + j}: field 'id' is null")
    return texts, ids  # type: ignore[return-value]


def iter_docs(store: Store, uri: str) -> Iterator[tuple[str, str]]:
    """(id, text) for every document of a stage output, streaming row group by row group."""
    for rg in row_groups(store, uri):
        texts, ids = read_row_group(rg)
        yield from zip(ids, texts)
