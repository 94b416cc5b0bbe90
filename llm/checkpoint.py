"""Training checkpoints: atomic, verifiable, and loadable without unpickling arbitrary objects.

A checkpoint is a directory::

    step_000123/
      model.safetensors   weights (the only file downstream stages need)
      optimizer.pt        optimizer state_dict   (torch.save; loaded with weights_only=True)
      rng.pt              torch (and CUDA) RNG states (same)
      loader.json         {"world_size": W, "ranks": [state of rank 0, rank 1, ...]}
      meta.json           written LAST: step, tokens, model_config, train config, val metrics, file sizes+sha256

It is written into ``.step_000123.tmp-<pid>/`` and renamed into place, so a directory named ``step_*`` is
always complete; ``meta.json`` carries every file's size and SHA-256 so a truncated or bit-flipped file
is reported by name instead of surfacing as a confusing tensor error.

A training stage output dir holds ``checkpoints/step_*/`` and ``final/`` (the one to use downstream).
:func:`load_model` accepts either that dir or a checkpoint dir, local or ``s3://``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from llm.storage import cache_root, sha256_file, write_atomic

FORMAT = "kiln-ckpt-1"
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
OPTIM_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
LOADER_FILE = "loader.json"
STEP_RE = re.compile(r"^step_(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt, or does not fit the model being built."""




def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# --------------------------------------------------------------------------- save


def save_checkpoint(
    ckpt_dir: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    loader_state: dict[str, Any] | None = None,
    rng_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically at ``ckpt_dir`` (replacing an existing one). Returns the path.

    ``meta`` must contain ``model_config`` (a ``GPTConfig.to_dict()``) and ``step``.
    """
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    if "model_config" not in meta or "step" not in meta:
        raise ValueError("checkpoint meta needs 'model_config' and 'step'")
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": FORMAT})
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIM_FILE)
        if rng_state is not None:
            torch.save(rng_state, tmp / RNG_FILE)
        if loader_state is not None:
            (tmp / LOADER_FILE).write_text(json.dumps(loader_state))
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        full = {"format": FORMAT, **meta, "files": files}
        (tmp / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
        if ckpt_dir.exists():
            old = ckpt_dir.with_name(f".{ckpt_dir.name}.old-{os.getpid()}")
            os.replace(ckpt_dir, old)
            os.replace(tmp, ckpt_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ckpt_dir


# --------------------------------------------------------------------------- inspect


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    ckpt_dir = Path(ckpt_dir)
    p = ckpt_dir / META_FILE
    if not p.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint (no {META_FILE}; an interrupted save leaves none)")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: corrupt checkpoint meta ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    _check_files_table(p, meta.get("files"))
    return meta


def _check_files_table(meta_path: Path, files: Any) -> None:
    """``files`` maps each file name to its size and sha256; say so when it does not, rather than
    reporting the files it fails to list as missing."""
    if not isinstance(files, dict):
        what = "no 'files' table" if files is None else f"a 'files' entry that is a {type(files).__name__}, not a table"
        raise CheckpointError(f"{meta_path}: {what} (it lists each file's size and sha256; rewritten or truncated meta?)")
    for name, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("size"), int) and isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"{meta_path}: files[{name!r}] needs an integer 'size' and a 'sha256' (got {info!r})")


def verify_checkpoint(ckpt_dir: str | Path, *, deep: bool = True) -> dict[str, Any]:
    """The meta if every listed file is present with its size (and SHA-256 when ``deep``); else CheckpointError."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    for name, info in meta.get("files", {}).items():
        p = ckpt_dir / name
        if not p.is_file():
            raise CheckpointError(f"{ckpt_dir}: missing {name}")
        if p.stat().st_size != info["size"]:
            raise CheckpointError(f"{p}: size {p.stat().st_size} != recorded {info['size']} (truncated or replaced)")
        if deep and sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{p}: SHA-256 mismatch (corrupt file)")
    if MODEL_FILE not in meta.get("files", {}):
        raise CheckpointError(f"{ckpt_dir}: checkpoint has no {MODEL_FILE}")
    return meta


def list_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """Complete ``step_*`` checkpoints under ``ckpt_root`` as (step, path), oldest first."""
    root = Path(ckpt_root)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_RE.match(p.name)
            if m and (p / META_FILE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    cks = list_checkpoints(ckpt_root)
    return cks[-1][1] if cks else None


def prune_checkpoints(ckpt_root: str | Path, keep_last: int, keep_steps: set[int] = frozenset()) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and those in ``keep_steps`` (e.g. the best)."""
    cks = list_checkpoints(ckpt_root)
    keep = {s for s, _ in cks[-max(keep_last, 1):]} | set(keep_steps)
    removed = []
    for step, p in cks:
        if step not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# --------------------------------------------------------------------------- load


def load_training_state(ckpt_dir: str | Path, *, deep: bool = True) -> dict[str, Any]:
    """Everything needed to resume: {"meta", "model" (state dict, CPU), "optimizer", "rng", "loader"}.

    Tensors are loaded with safetensors and ``torch.load(weights_only=True)``: no arbitrary unpickling.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    meta = verify_checkpoint(ckpt_dir, deep=deep)
    try:
        state = load_file(str(ckpt_dir / MODEL_FILE), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt_dir / MODEL_FILE}: cannot read weights ({e})") from e
    out: dict[str, Any] = {"meta": meta, "model": state, "optimizer": None, "rng": None, "loader": None}
    for key, name in (("optimizer", OPTIM_FILE), ("rng", RNG_FILE)):
        p = ckpt_dir / name
        if p.is_file():
            try:
                out[key] = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file to the user
                raise CheckpointError(f"{p}: cannot load ({type(e).__name__}: {e})") from e
    p = ckpt_dir / LOADER_FILE
    if p.is_file():
        try:
            out["loader"] = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p}: corrupt loader state ({e})") from e
    return out


def check_model_config(meta: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise a CheckpointError naming every field where the checkpoint's model differs from ``expected``."""
    got = meta.get("model_config", {})
    diff = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"{where}: checkpoint does not match the model config ({desc})")


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict`` with a clear error for missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]}")
        raise CheckpointError(f"{where}: weights do not fit the model ({'; '.join(parts)})")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def resolve_checkpoint_dir(uri: str, *, endpoint_url: str = "") -> Path:
    """A local checkpoint directory for ``uri``: a checkpoint dir, or a training stage output dir
    (its ``final/``, else its newest ``checkpoints/step_*``). ``s3://`` URIs are downloaded to KILN_CACHE."""
    from llm.storage import Store, is_s3, join

    if is_s3(uri):
        store = Store(uri, endpoint_url)
        for cand in (uri, join(uri, "final")):
            if store.exists(join(cand, META_FILE)):
                return _download_dir(store, cand)
        steps = sorted({u.split("/")[-2] for u in store.list(join(uri, "checkpoints")) if u.endswith("/" + META_FILE)})
        if steps:
            return _download_dir(store, join(uri, "checkpoints", steps[-1]))
        raise CheckpointError(f"{uri}: no checkpoint found (no meta.json, final/ or checkpoints/step_*)")
    p = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    if (p / META_FILE).is_file():
        return p
    if (p / "final" / META_FILE).is_file():
        return p / "final"
    latest = latest_checkpoint(p / "checkpoints")
    if latest is not None:
        return latest
    raise CheckpointError(f"{uri}: no checkpoint found (no meta.json, final/ or checkpoints/step_*)")


def as_stage_input(uri: str, *, endpoint_url: str = "") -> dict[str, Any] | None:
    """A bare checkpoint directory as a stage input (``kiln eval --checkpoint .../step_000500``).

    Its identity is the hash of its ``meta.json``, which lists every file's sha256, so the
    downstream cache key still follows the exact weights. None when ``uri`` holds no checkpoint.
    """
    try:
        ckpt = resolve_checkpoint_dir(uri, endpoint_url=endpoint_url)
    except (CheckpointError, FileNotFoundError):
        return None
    verify_checkpoint(ckpt, deep=False)  # a checkpoint that is there but damaged: say which file
    meta_hash = sha256_file(ckpt / META_FILE)[:20]
    return {"uri": str(ckpt), "hash": meta_hash, "stage": "checkpoint", "counts": {}}


def _download_dir(store: Any, uri: str) -> Path:
    from llm.storage import join

    cache = cache_root("s3", uri[len("s3://"):])
    meta = json.loads(store.get_bytes(join(uri, META_FILE)))
    for name in meta.get("files", {}):
        dest = cache / name
        if not dest.is_file() or dest.stat().st_size != meta["files"][name]["size"]:
            store.get(join(uri, name), dest)
    write_atomic(cache / META_FILE, json.dumps(meta))  # ranks share this cache: none may read half of it
    return cache


def load_model(uri: str, device: str = "cpu", *, endpoint_url: str = "") -> tuple[Any, dict[str, Any]]:
    """(GPT in eval mode on ``device``, checkpoint meta) from a training stage output dir or checkpoint dir."""
    from llm.model import GPT, GPTConfig

    ckpt = resolve_checkpoint_dir(uri, endpoint_url=endpoint_url)
    meta = verify_checkpoint(ckpt)
    try:
        cfg = GPTConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / META_FILE}: bad model_config ({e})") from e
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(ckpt / MODEL_FILE), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt / MODEL_FILE}: cannot read weights ({e})") from e
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device=device)
    model.init_weights()  # rebuilds the (non-persistent) rotary tables; weights are overwritten below
    load_state_into(model, state, str(ckpt))
    model.eval()
    return model, meta
