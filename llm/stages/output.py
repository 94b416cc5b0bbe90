"""Content-addressed stage outputs.

Every stage writes to ``<root>/<stage>/<key>/``. The key hashes the stage's config
sections, the hashes of its inputs' manifests and an explicit code version, so the same
inputs and config always land in the same place and a finished stage is found, verified
and reused instead of recomputed.

``manifest.json`` is written last. A directory without a verifying manifest is never
treated as done: locally the stage works in ``<key>.partial/`` and the directory is
renamed into place with its manifest inside; on S3 the manifest object is uploaded after
every file it lists.

One computation per output: a run takes the lock ``<root>/<stage>/<key>.lock`` (llm/stages/locks.py)
before it works in the ``.partial``; an identical run started meanwhile waits and reuses what the
first one publishes. That holds with ``force`` too: a forced run that finds the same output being
computed reuses that fresh result instead of computing it a second time, and computes only when
the holder fails or dies. A stage that fails before writing anything leaves no ``.partial``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llm.stages.locks import StageLock
from llm.storage import Store, cache_root, is_s3, join, local_path, sha256_file

MANIFEST = "manifest.json"


class StageError(RuntimeError):
    """A deterministic stage failure (bad input, bad config): retrying will not help."""


class FollowerDone(Exception):
    """Raised by a stage function on a multi-node follower once its share of the work is done.

    Not an error: the node hosting global rank 0 publishes the output, this one publishes nothing.
    The message is the line the user sees.
    """


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_key(stage: str, config: dict[str, Any], input_hashes: dict[str, str], code_version: str) -> str:
    """Hash of everything that determines a stage's output."""
    payload = canonical_json({"stage": stage, "config": config, "inputs": input_hashes, "code": code_version})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def manifest_hash(manifest: dict[str, Any]) -> str:
    """Identity of a published output: the stage and the exact bytes of every file.

    Not the key: two configs that produce byte-identical output (say, the same shards read from a
    mirror mounted at another path) give downstream stages the same key, so their work is reused.
    """
    files = {k: v["sha256"] for k, v in manifest["files"].items()}
    return hashlib.sha256(canonical_json({"stage": manifest["stage"], "files": files}).encode()).hexdigest()[:20]


def read_manifest(store: Store, uri: str) -> dict[str, Any] | None:
    try:
        raw = store.get_bytes(join(uri, MANIFEST))
    except FileNotFoundError:
        return None
    try:
        m = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StageError(f"{join(uri, MANIFEST)}: corrupt manifest ({e})") from e
    # Valid JSON of the wrong shape (hand-edited, another tool's manifest.json) must also be a
    # one-line error naming the file, not a KeyError deep inside a caller.
    problem = _manifest_shape_problem(m)
    if problem:
        raise StageError(f"{join(uri, MANIFEST)}: corrupt manifest ({problem})")
    return located_manifest(m, uri)


# ---------------------------------------------------------------------------- paths in manifests
#
# On disk a manifest records its own place and its inputs' relative to its artifact root
# ("pretrain/<key>", "tokenize/<key>"; an input outside the root stays absolute), so a root can be
# moved, copied or synced to S3 whole. In memory (read_manifest, run_stage's results) every path is
# where the files are now: resolved against the root the manifest was found in, two levels above it.
# Neither the content key nor the manifest hash covers these fields, so keys do not depend on them.

PATHS_FIELD = "paths"
ROOT_RELATIVE = "root-relative"  # PATHS_FIELD's value in manifests written this way; older ones lack it


def root_of(uri: str) -> str:
    """The artifact root of the output at ``uri`` = ``<root>/<stage>/<key>``."""
    uri = uri.rstrip("/")
    if is_s3(uri):
        return uri.rsplit("/", 2)[0]
    return str(local_path(uri).parent.parent)


def _is_path(uri: str) -> bool:
    """A local path or s3:// URI (not some other scheme's URL, which is recorded as it is)."""
    return bool(uri) and (is_s3(uri) or uri.startswith("file://") or "://" not in uri)


def record_uri(root: str, uri: str) -> str:
    """How a manifest under ``root`` records ``uri``: relative to the root when inside it, else absolute."""
    if not _is_path(uri):
        return uri
    if is_s3(uri) or is_s3(root):
        prefix = root.rstrip("/") + "/"
        if is_s3(uri):
            return uri[len(prefix):] if uri.startswith(prefix) else uri
        return os.path.abspath(local_path(uri))
    path, base = local_path(uri).resolve(), local_path(root).resolve()
    if path.is_relative_to(base) and path != base:
        return path.relative_to(base).as_posix()
    return os.path.abspath(local_path(uri))


def _legacy_candidates(recorded: str, old_root: str | None) -> list[str]:
    """Places under a root that an old absolute or cwd-relative path may now be at (root moved)."""
    out = []
    norm = lambda u: u.rstrip("/") if is_s3(u) else os.path.normpath(u)  # noqa: E731
    if old_root and _is_path(old_root):
        prefix = norm(old_root) + "/"
        if norm(recorded).startswith(prefix):
            out.append(norm(recorded)[len(prefix):])
    parts = norm(recorded).split("/")
    if len(parts) >= 2:
        out.append("/".join(parts[-2:]))  # <stage>/<key>
    return out


def resolve_uri(root: str, recorded: str, *, legacy: bool = False, old_root: str | None = None) -> str:
    """Where a path recorded in a manifest found under ``root`` is now.

    ``legacy``: the manifest predates root-relative paths; its paths are as that run spelled them
    (absolute, or relative to the directory it ran in). Used as recorded while that exists, else at the
    same place under this root.
    """
    if not _is_path(recorded) or is_s3(recorded):
        return recorded
    if not legacy:
        return recorded if os.path.isabs(local_path(recorded)) else join(root, recorded)
    if local_path(recorded).exists():
        return recorded
    for rel in _legacy_candidates(recorded, old_root):
        cand = join(root, rel)
        if is_s3(cand) or local_path(cand).exists():
            return cand
    return recorded


def located_manifest(m: dict[str, Any], found_at: str) -> dict[str, Any]:
    """``m`` as read from ``found_at``: its "uri" is that place and its inputs' are resolved from there."""
    found_at = found_at.rstrip("/")
    root = root_of(found_at)
    legacy = m.get(PATHS_FIELD) != ROOT_RELATIVE
    recorded_self = m.get("uri")
    old_root = root_of(recorded_self) if legacy and isinstance(recorded_self, str) and recorded_self else None
    out = {k: v for k, v in m.items() if k != PATHS_FIELD}
    out["uri"] = found_at
    inputs = m.get("inputs")
    if isinstance(inputs, dict):
        out["inputs"] = {
            role: {**inp, "uri": resolve_uri(root, inp["uri"], legacy=legacy, old_root=old_root)}
            if isinstance(inp, dict) and isinstance(inp.get("uri"), str) else inp
            for role, inp in inputs.items()
        }
    return out


def recorded_manifest(m: dict[str, Any], uri: str) -> dict[str, Any]:
    """The on-disk form of the manifest of the output at ``uri``: its paths relative to its root."""
    root = root_of(uri)
    out = {**m, PATHS_FIELD: ROOT_RELATIVE, "uri": record_uri(root, uri)}
    if isinstance(m.get("inputs"), dict):
        out["inputs"] = {role: {**inp, "uri": record_uri(root, inp["uri"])}
                         if isinstance(inp, dict) and isinstance(inp.get("uri"), str) else inp
                         for role, inp in m["inputs"].items()}
    return out


def _manifest_shape_problem(m: Any) -> str:
    if not isinstance(m, dict):
        return f"expected a JSON object, found {type(m).__name__}"
    if not isinstance(m.get("stage"), str):
        return "no 'stage' name"
    files = m.get("files")
    if not isinstance(files, dict):
        return "no 'files' table"
    for rel, info in files.items():
        if not isinstance(info, dict) or not isinstance(info.get("size"), int) or not isinstance(info.get("sha256"), str):
            return f"files[{rel!r}] lacks size/sha256"
    return ""


def verify_output(store: Store, uri: str, deep: bool = False) -> dict[str, Any] | None:
    """The manifest if the output at ``uri`` is complete, else None.

    Checks every listed file exists with its recorded size; ``deep`` re-hashes local files.
    """
    m = read_manifest(store, uri)
    if m is None:
        return None
    if is_s3(uri):
        present = {rel for rel, _ in store.iter_files(uri)}
        if any(rel not in present for rel in m["files"]):
            return None
        return m
    base = local_path(uri)
    for rel, info in m["files"].items():
        p = base / rel
        if not p.is_file() or p.stat().st_size != info["size"]:
            return None
        if deep and sha256_file(p) != info["sha256"]:
            return None
    return m


def require_manifest(store: Store, uri: str, what: str) -> dict[str, Any]:
    m = verify_output(store, uri)
    if m is None:
        raise StageError(f"{what}: {uri} is not a finished stage output (no verifying {MANIFEST})")
    return m


def is_published(rel: str) -> bool:
    """Whether a work-dir file at ``rel`` goes into the published output.

    Dot-prefixed paths are scratch (half-written checkpoints, temp files from a killed writer), as
    are ``*.tmp`` files, and the manifest is written by publish itself. One rule, so a stage can check
    before publishing that what will be published holds what it counted.
    """
    parts = Path(rel).parts
    return bool(parts) and parts[-1] != MANIFEST and not parts[-1].endswith(".tmp") \
        and not any(part.startswith(".") for part in parts)


@dataclass
class StageOutput:
    """The place a running stage writes to, published atomically by :func:`run_stage`."""

    store: Store
    stage: str
    key: str
    uri: str
    workdir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    # A multi-node follower: ``workdir`` is node-local scratch and the stage raises FollowerDone.
    follower: bool = False

    def path(self, rel: str) -> Path:
        p = self.workdir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def publish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(self.workdir.rglob("*")):
            rel = p.relative_to(self.workdir).as_posix()
            if p.is_file() and is_published(rel):
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(self.workdir.rglob(".*")):  # leftover scratch from a killed writer
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        manifest = {**manifest, "files": files}
        manifest["hash"] = manifest_hash(manifest)
        body = json.dumps(recorded_manifest(manifest, self.uri), indent=2, sort_keys=True, default=str).encode()
        if is_s3(self.uri):
            for rel in files:
                self.store.put(self.workdir / rel, join(self.uri, rel))
            self.store.put_bytes(body, join(self.uri, MANIFEST))  # last: marks the output done
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            tmp = self.workdir / f"{MANIFEST}.tmp"
            tmp.write_bytes(body)
            os.replace(tmp, self.workdir / MANIFEST)
            final = local_path(self.uri)
            if final.exists():  # a stale, unverified leftover (verified outputs never get here)
                shutil.rmtree(final)
            os.replace(self.workdir, final)
        return manifest


def work_root(store: Store) -> Path:
    """The local directory holding this root's ``<stage>/<key>.partial`` work dirs: the root itself, or
    for an S3 root a per-root directory of this machine's cache."""
    if is_s3(store.root):
        return cache_root("work") / store.root.replace("s3://", "").replace("/", "_")
    return local_path(store.root)


def workdir_for(store: Store, stage: str, key: str) -> Path:
    """Local scratch for a stage. Kept across crashes so training can resume from it."""
    return work_root(store) / stage / f"{key}.partial"


@dataclass
class StageResult:
    uri: str
    manifest: dict[str, Any]
    cached: bool
    # Non-empty on a multi-node follower: the line saying it took part and published nothing. Then
    # ``uri`` is where the leader publishes (on this root only if the root is shared) and
    # ``manifest`` holds only stage, key, uri and follower: there are no files to describe.
    follower: str = ""


StageFn = Callable[[StageOutput, dict[str, dict[str, Any]]], dict[str, Any]]
# Identifies an input that is not a stage output (e.g. a bare checkpoint directory): returns a
# manifest-like dict with at least "uri" and "hash", or None when it does not recognise the URI.
ExternalInput = Callable[[str, str], "dict[str, Any] | None"]


def input_manifest(store: Store, stage: str, role: str, uri: str, external: ExternalInput | None = None) -> dict[str, Any]:
    """The manifest of input ``uri``, with ``m["uri"]`` the place it was found at (read_manifest sees
    to that): stages read their files from there, never from where a copied output was first written."""
    m = verify_output(store, uri)
    if m is None and external is not None:
        m = external(role, uri)
    if m is None:
        raise StageError(f"{stage} input {role!r}: {uri} is not a finished stage output (no verifying {MANIFEST})")
    return m


def output_address(store: Store, stage: str, config: dict[str, Any], inputs: dict[str, str], code_version: str,
                   external: ExternalInput | None = None) -> tuple[str, str, dict[str, dict[str, Any]]]:
    """(key, URI, input manifests) of the output of ``stage`` for this config, these inputs and code version.

    The one derivation of a key: :func:`run_stage` publishes where this says, and an orchestrator that
    needs the key before running (llm.stages.registry.stage_key) asks here too.
    """
    in_manifests = {name: input_manifest(store, stage, name, uri, external) for name, uri in inputs.items()}
    key = content_key(stage, config, {n: m["hash"] for n, m in in_manifests.items()}, code_version)
    return key, store.uri(stage, key), in_manifests


def run_stage(
    store: Store,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    code_version: str,
    fn: StageFn,
    *,
    force: bool = False,
    external: ExternalInput | None = None,
    follower: bool = False,
) -> StageResult:
    """Run ``fn`` unless an identical, verified output exists; publish it with its manifest.

    ``inputs`` maps names to upstream output URIs; their manifests are verified first and
    their hashes enter the key. ``fn(out, input_manifests)`` returns a dict whose ``counts``
    and other keys are merged into the manifest.

    ``follower``: this node takes part in a multi-node job whose leader publishes. It takes no
    lock (the leader holds it, and its job waits for this node) and works in node-local scratch.
    """
    key, uri, in_manifests = output_address(store, stage, config, inputs, code_version, external)
    seen = verify_output(store, uri)
    if seen is not None and not force:
        return StageResult(uri=uri, manifest=seen, cached=True)
    if follower:
        return _follow(store, stage, key, uri, in_manifests, fn)

    def published() -> dict[str, Any] | None:
        """A verified output this run did not see at its start (forced) or at all (not forced)."""
        m = verify_output(store, uri)
        return m if m is not None and m != seen else None

    lock = StageLock(store, stage, key)
    done = lock.acquire(published)
    if done is not None:
        return StageResult(uri=uri, manifest=done, cached=True)
    try:
        return _compute(store, stage, key, uri, config, inputs, in_manifests, code_version, fn)
    finally:
        lock.release()


def _compute(store: Store, stage: str, key: str, uri: str, config: dict[str, Any], inputs: dict[str, str],
             in_manifests: dict[str, dict[str, Any]], code_version: str, fn: StageFn) -> StageResult:
    """Run ``fn`` in the stage's work dir and publish (the caller holds the stage's lock)."""
    workdir = workdir_for(store, stage, key)
    workdir.mkdir(parents=True, exist_ok=True)
    out = StageOutput(store=store, stage=stage, key=key, uri=uri, workdir=workdir)
    started = time.time()
    try:
        result = fn(out, in_manifests) or {}
    except BaseException:
        _drop_if_empty(workdir)
        raise
    manifest = {
        "stage": stage,
        "key": key,
        "uri": uri,
        "code_version": code_version,
        "config": config,
        # A raw input (no manifest of its own) is recorded with where it came from and its files.
        "inputs": {n: {"uri": inputs[n], "hash": m["hash"], **({"raw": m["raw"]} if "raw" in m else {})}
                   for n, m in in_manifests.items()},
        "counts": result.pop("counts", {}),
        **result,
        "timings": {"started": started, "seconds": round(time.time() - started, 3)},
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version()},
    }
    return StageResult(uri=uri, manifest=out.publish(manifest), cached=False)


def _drop_if_empty(workdir: Path) -> None:
    """Remove a work dir that holds no file (a stage that failed on its config before writing).

    One with files stays: training resumes from its checkpoints, and `kiln ls` shows it.
    """
    if workdir.is_dir() and not any(p.is_file() for p in workdir.rglob("*")):
        shutil.rmtree(workdir, ignore_errors=True)


def _follow(store: Store, stage: str, key: str, uri: str, in_manifests: dict[str, dict[str, Any]],
            fn: StageFn) -> StageResult:
    """Run ``fn`` as a multi-node follower: in node-local scratch, removed afterwards, nothing published."""
    base = cache_root("follower")
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{stage}-{key}-", dir=base))
    out = StageOutput(store=store, stage=stage, key=key, uri=uri, workdir=scratch, follower=True)
    try:
        fn(out, in_manifests)
    except FollowerDone as done:
        return StageResult(uri=uri, manifest={"stage": stage, "key": key, "uri": uri, "follower": str(done)},
                           cached=False, follower=str(done))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    raise StageError(f"{stage}: ran as a multi-node follower but the stage does not support it "
                     f"(it returned instead of raising FollowerDone)")


# --------------------------------------------------------------------------- lineage


def _locate_output(store: Store, root: str | None, uri: str) -> tuple[str, dict[str, Any] | None]:
    """The manifest of ``uri``, or of the same ``<stage>/<key>`` under ``root``.

    Manifests read back have their inputs resolved against where they were found; an old manifest's
    input that resolves nowhere (its root since moved, its path relative to another directory) is
    still found by ``<stage>/<key>``: the key names the content, so the copy under this root is the same.
    """
    m = read_manifest(store, uri)
    if m is None and root is not None:
        stage_key = uri.rstrip("/").split("/")[-2:]
        if len(stage_key) == 2:
            alt = join(root, *stage_key)
            if alt != uri:
                m2 = read_manifest(store, alt)
                if m2 is not None:
                    return alt, m2
    return uri, m


def lineage(store: Store, uri: str, *, root: str | None = None,
            max_depth: int = 32) -> list[tuple[int, str, dict[str, Any] | None]]:
    """``(depth, role/stage label, manifest)`` from ``uri`` back through its inputs, depth first.

    Shared upstreams (tokenizer and tokens both lead to the same dedup output) are printed once in
    full and then by reference, so the tree stays readable.
    """
    seen: set[str] = set()
    out: list[tuple[int, str, dict[str, Any] | None]] = []

    def walk(u: str, label: str, depth: int) -> None:
        u, m = _locate_output(store, root, u)
        name = f"{label}: {u}" if label else u
        if u in seen:
            out.append((depth, f"{name} (above)", None))
            return
        seen.add(u)
        out.append((depth, name, m))
        if m is None or depth >= max_depth:
            return
        for role, inp in sorted((m.get("inputs") or {}).items()):
            walk(inp.get("uri", ""), role, depth + 1)

    walk(uri.rstrip("/"), "", 0)
    return out
