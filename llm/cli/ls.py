"""`kiln ls`: what is in an artifact root, whether it is intact, and where each output came from.

Every stage writes to ``<root>/<stage>/<key>/`` and publishes ``manifest.json`` last, so the root
itself is the catalogue: no database to drift from the files. This module reads it back so nobody
has to juggle checkpoint directories by hand. It answers three questions:

* what is there (stage, key, when, size, headline counts), newest first;
* is it intact (``--verify`` re-hashes every file against its manifest; a ``.partial`` directory
  is a stage that crashed, failed or is still running (it says which: a running one holds the
  stage's lock), and it resumes on the next run with the same key; empty ones and, for an S3 root,
  this machine's local work dirs are shown too);
* where did it come from (``--lineage URI`` walks the manifests' inputs back to the download).

Nothing here deletes anything: outputs are immutable and shared between runs by their key.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.stages.output import MANIFEST, lineage, read_manifest, work_root
from llm.stages.registry import STAGES
from llm.storage import Store, is_s3, join, local_path, sha256_file

# The counts worth a column, per stage (the registry's headline counts).
HEADLINE: dict[str, tuple[str, ...]] = {name: sd.headline for name, sd in STAGES.items() if sd.headline}


@dataclass
class Entry:
    """One output directory under the root."""

    stage: str
    key: str
    uri: str
    status: str  # "ok", "corrupt" (a file is missing or differs), "partial" (unfinished), "broken" (bad manifest)
    bytes: int = 0
    started: float | None = None
    seconds: float | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # role -> upstream URI
    problem: str = ""

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _scan(store: Store, root: str) -> dict[tuple[str, str], dict[str, int]]:
    """``{(stage, key dir): {relative file: size}}`` for every output directory under ``root``."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    base = None if is_s3(root) else local_path(root)
    prefix = root.rstrip("/") + "/"
    for uri, size in store.list_sizes(root).items():
        if base is not None:
            rel_path = Path(uri).relative_to(base).as_posix()
        elif uri.startswith(prefix):
            rel_path = uri[len(prefix):]
        else:
            continue
        parts = rel_path.split("/", 2)
        if len(parts) < 3:  # not <stage>/<key>/<file>: something else lives in the root
            continue
        stage, key, rel = parts
        out.setdefault((stage, key), {})[rel] = size
    return out


def _damage(manifest: dict[str, Any], present: dict[str, int], local_dir: Path | None, *, rehash: bool) -> str:
    """What is wrong with a published output, naming the file; "" when intact.

    Presence and size come from the listing already made (so this is free on S3 too); ``rehash``
    re-reads local files and compares their sha256 with the manifest's.
    """
    for rel, info in sorted((manifest.get("files") or {}).items()):
        if rel not in present:
            return f"{rel}: listed in the manifest but missing"
        if present[rel] != info.get("size"):
            return f"{rel}: {present[rel]} bytes, the manifest says {info.get('size')}"
    if rehash and local_dir is not None:
        for rel, info in sorted((manifest.get("files") or {}).items()):
            if sha256_file(local_dir / rel) != info.get("sha256"):
                return f"{rel}: content differs from its recorded sha256"
    return ""


def list_outputs(store: Store, root: str, *, stage: str | None = None, verify: bool = False,
                 progress: bool = False) -> list[Entry]:
    """Every output under ``root`` (optionally one stage's), newest first; unfinished ones last.

    Without ``verify`` an output is "ok" when its manifest lists files that all exist with their
    recorded sizes (what a run checks before reusing it); ``verify`` also re-hashes local files
    (on S3 it stays a presence and size check: re-hashing would mean downloading everything).
    """
    entries: list[Entry] = []
    found = sorted(_scan(store, root).items())
    if progress and verify:  # re-hashing a root of checkpoints takes a while: show it
        from tqdm import tqdm

        found = tqdm(found, desc="verify", unit="output", leave=False)
    for (st, keydir), files in found:
        if stage is not None and st != stage:
            continue
        uri = join(join(root, st), keydir)
        size = sum(files.values())
        if keydir.endswith(".partial"):
            entries.append(_partial(store, st, keydir, uri, size))
            continue
        if MANIFEST not in files:
            entries.append(Entry(st, keydir, uri, "partial", size, problem=f"no {MANIFEST}: never published"))
            continue
        try:
            manifest = read_manifest(store, uri) or {}
        except Exception as e:  # noqa: BLE001 - a corrupt manifest is reported, not fatal to the listing
            entries.append(Entry(st, keydir, uri, "broken", size, problem=str(e)))
            continue
        problem = _damage(manifest, files, None if is_s3(uri) else local_path(uri), rehash=verify)
        timings = manifest.get("timings", {})
        entries.append(Entry(
            st, keydir, uri, "corrupt" if problem else "ok", size,
            started=timings.get("started"), seconds=timings.get("seconds"),
            counts={k: manifest.get("counts", {}).get(k) for k in HEADLINE.get(st, ())
                    if manifest.get("counts", {}).get(k) is not None},
            inputs={role: v.get("uri", "") for role, v in (manifest.get("inputs") or {}).items()},
            problem=problem,
        ))
    listed = {(e.stage, e.key) for e in entries if e.status == "partial"}
    for (st, keydir), path in sorted(_local_partials(store).items()):
        if (stage is None or st == stage) and (st, keydir.removesuffix(".partial")) not in listed:
            entries.append(_partial(store, st, keydir, str(path), sum(_file_sizes(path)),
                                    where="" if path == local_path(join(root, st, keydir)) else " on this machine"))
    entries.sort(key=lambda e: (e.status == "partial", -(e.started or 0.0)))
    return entries


def _local_partials(store: Store) -> dict[tuple[str, str], Path]:
    """Every ``<stage>/<key>.partial`` work dir on this machine for the root, files or not.

    A listing of files misses an empty one (a stage that failed before writing), and for an S3
    root the work dirs are in this machine's cache, not under the root at all.
    """
    base = work_root(store)
    if not base.is_dir():
        return {}
    return {(p.parent.name, p.name): p for p in base.glob("*/*.partial") if p.is_dir()}


def _file_sizes(path: Path) -> list[int]:
    return [p.stat().st_size for p in path.rglob("*") if p.is_file()]


def _partial(store: Store, stage: str, keydir: str, uri: str, size: int, where: str = "") -> Entry:
    """An unfinished output, saying whether a run is at it now (it holds the stage's lock)."""
    from llm.stages.locks import read_lock

    key = keydir.removesuffix(".partial")
    holder = read_lock(store, stage, key)
    if holder is not None:
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder.get("since", 0)))
        problem = f"running{where}: pid {holder.get('pid')} on {holder.get('host')} since {since}"
    else:
        problem = f"unfinished{where}: crashed or failed; the next run with this key resumes it"
    return Entry(stage, key, uri, "partial", size, problem=problem)


# --------------------------------------------------------------------------- CLI


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _fmt_counts(counts: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) >= 1e-6 else "0"  # a mean of centred scores can be 1e-18, i.e. zero
        return f"{v:,}" if isinstance(v, int) else str(v)

    return " ".join(f"{k}={one(v)}" for k, v in counts.items())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "List the stage outputs under an artifact root, check them, and show where one came from."
    p.add_argument("--root", default=None, help="artifact root (default: run.artifact_root of the preset)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stage", default=None, help="only this stage's outputs")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every file against its manifest (local roots; S3 is checked by presence and size)")
    p.add_argument("--lineage", metavar="URI", default=None, help="print the inputs of this output, back to the source")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--s3-endpoint", default="", help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")


def main(args: argparse.Namespace) -> int:
    root = args.root
    if root is None:
        from llm.config import load_config

        root = load_config(args.preset).run.artifact_root
    store = Store(root, args.s3_endpoint)
    if args.stage is not None:
        if args.stage not in STAGES:
            print(f"kiln ls: unknown stage {args.stage!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
            return 2
    if not is_s3(root) and not local_path(root).is_dir():
        print(f"kiln ls: no artifact root at {root} (nothing has run there yet?)", file=sys.stderr)
        return 1
    if args.lineage:
        chain = lineage(store, args.lineage, root=root)
        if chain[0][2] is None:
            print(f"kiln ls: {args.lineage}: no {MANIFEST} (not a published stage output)", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps([{"depth": d, "label": label, "stage": (m or {}).get("stage"),
                               "counts": (m or {}).get("counts")} for d, label, m in chain], indent=2))
            return 0
        for depth, label, m in chain:
            extra = f"  [{m['stage']}] {_fmt_counts({k: m.get('counts', {}).get(k) for k in HEADLINE.get(m['stage'], ()) if m.get('counts', {}).get(k) is not None})}" if m else ""
            print("  " * depth + ("└ " if depth else "") + label + extra)
        return 0
    entries = list_outputs(store, root, stage=args.stage, verify=args.verify, progress=not args.json)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
    elif not entries:
        print(f"{root}: no stage outputs" + (f" for {args.stage}" if args.stage else ""))
    else:
        print(f"{'stage':<10} {'key':<20} {'status':<8} {'size':>9}  {'finished':<16} counts")
        for e in entries:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.started + (e.seconds or 0))) if e.started else "-"
            print(f"{e.stage:<10} {e.key:<20} {e.status:<8} {_human_bytes(e.bytes):>9}  {when:<16} "
                  f"{_fmt_counts(e.counts) or e.problem}")
        bad = [e for e in entries if e.status in ("corrupt", "broken")]
        print(f"\n{len(entries)} outputs under {root}; {sum(e.status == 'ok' for e in entries)} ok, "
              f"{sum(e.status == 'partial' for e in entries)} unfinished, {len(bad)} damaged")
        for e in bad:
            print(f"  {e.uri}: {e.problem}")
    return 1 if any(e.status in ("corrupt", "broken") for e in entries) else 0
