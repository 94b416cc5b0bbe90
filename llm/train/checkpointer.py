"""A training run's checkpoints: save, mirror, prune, and resume from the newest one.

A checkpoint holds weights, optimizer state, every rank's loader state, RNG states and the run's
counters (in ``meta.json``, written last), which is what makes resuming exact: nothing else in the
loop carries state. Checkpoints live in ``<out>/checkpoints/step_*`` and, when the job names an
``upload_uri``, are mirrored there file by file with ``meta.json`` last, so a copy without it is
incomplete and never resumed from. A run on a fresh machine (nothing local) resumes from the mirror.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llm.checkpoint import (META_FILE, MODEL_FILE, STEP_RE, CheckpointError, check_model_config,
                            latest_checkpoint, load_state_into, load_training_state, prune_checkpoints,
                            resolve_checkpoint_dir, save_checkpoint, step_dir_name, verify_checkpoint)
from llm.storage import Store, join

# A resumed run must keep these: the batch geometry and the optimizer's state layout depend on them.
RESUME_FIXED = ("total_batch_tokens", "device_batch_size", "optimizer")


class Checkpointer:
    """Checkpoints of one run under ``out``, for this process (``rank`` of ``world``, on ``device``)."""

    def __init__(self, out: Path, *, upload_uri: str | None, endpoint: str, keep_last: int, rank: int,
                 world: int, device: torch.device):
        self.root, self.final_dir = out / "checkpoints", out / "final"
        self.upload_uri, self.endpoint, self.keep_last = upload_uri, endpoint, keep_last
        self.rank, self.world, self.device = rank, world, device

    # ------------------------------------------------------------------ resume
    def find(self, resume: str) -> Path | None:
        """The checkpoint to resume: "auto" = the newest local one, else the newest mirrored one;
        "none" = start fresh; anything else is a checkpoint URI."""
        if resume == "auto":
            ckpt = latest_checkpoint(self.root)
            if ckpt is None and self.upload_uri:
                ckpt = self._remote_latest()
            return ckpt
        if resume != "none":
            return resolve_checkpoint_dir(resume, endpoint_url=self.endpoint)
        return None

    def restore(self, ckpt: Path, *, model: torch.nn.Module, opt: Any, loader: Any, model_config: dict[str, Any],
                train: Any) -> dict[str, Any]:
        """Load weights, optimizer, this rank's loader state and the RNG from ``ckpt``; returns its meta.

        Everything that does not fit (another model, batch geometry, optimizer, data, or a per-rank
        loader state for another world size) is refused with the checkpoint named.
        """
        st = load_training_state(ckpt)
        meta = st["meta"]
        check_model_config(meta, model_config, str(ckpt))
        for field in RESUME_FIXED:
            was = meta.get("train_config", {}).get(field)
            if was is not None and was != getattr(train, field):
                raise CheckpointError(f"{ckpt}: cannot resume: train.{field} was {was!r}, now "
                                      f"{getattr(train, field)!r}")
        load_state_into(model, st["model"], str(ckpt))
        if st["optimizer"] is None or st["loader"] is None:
            raise CheckpointError(f"{ckpt}: has no optimizer/loader state, cannot resume training from it "
                                  f"(use it as init_checkpoint instead)")
        try:
            opt.load_state_dict(st["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt}: optimizer state does not fit ({e})") from e
        self._restore_loader(loader, st["loader"], ckpt)
        if st["rng"] is not None:
            torch.set_rng_state(st["rng"]["cpu"])
            if self.device.type == "cuda" and st["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(st["rng"]["cuda"], self.device)
        return meta

    def _restore_loader(self, loader: Any, ls: dict[str, Any], ckpt: Path) -> None:
        ranks = ls["ranks"]
        if ls["world_size"] == self.world:
            mine = ranks[self.rank]
        elif all(r == ranks[0] for r in ranks):
            mine = ranks[0]  # rank-independent state (the pretrain loader's): any world size works
        else:
            raise CheckpointError(f"{ckpt}: loader state is per-rank for {ls['world_size']} processes; "
                                  f"resume with the same number of processes (now {self.world})")
        try:
            loader.load_state_dict(mine)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt}: loader state does not fit the data ({e})") from e
        if ls["world_size"] != self.world:
            # Each old rank's state held ITS share of tokens_seen_by_source (all shares equal, or we
            # would have refused above). Summing the new ranks' restored copies would count the
            # tokens before the checkpoint ×new/old world (2 procs -> 1 lost half of them): carry
            # the old global total on rank 0 and start the other ranks from zero.
            seen = loader.tokens_seen_by_source
            for k in list(seen):
                seen[k] = int(seen[k]) * int(ls["world_size"]) if self.rank == 0 else 0

    def load_init(self, uri: str, model: torch.nn.Module, model_config: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        """Start weights from another stage's checkpoint (weights only: a new run, not a resume)."""
        from safetensors.torch import load_file

        cdir = resolve_checkpoint_dir(uri, endpoint_url=self.endpoint)
        meta = verify_checkpoint(cdir)
        check_model_config(meta, model_config, str(cdir))
        load_state_into(model, load_file(str(cdir / MODEL_FILE), device="cpu"), str(cdir))
        return cdir, meta

    # ------------------------------------------------------------------ save (rank 0)
    def save(self, step: int, *, model: torch.nn.Module, opt: Any, loader_states: list[Any],
             meta: dict[str, Any], keep_steps: set[int]) -> str:
        """Write ``step_<step>`` with the RNG state, prune to ``keep_last`` + ``keep_steps``, mirror it.

        Rank 0 only: the caller gathers every rank's loader state first. Returns where it ended up.
        """
        path = self.root / step_dir_name(step)
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(path, model_state=model.state_dict(), meta=meta, optimizer_state=opt.state_dict(),
                        loader_state={"world_size": self.world, "ranks": loader_states}, rng_state=rng)
        prune_checkpoints(self.root, self.keep_last, keep_steps)
        return self._upload(path, f"checkpoints/{path.name}", prune_keep=keep_steps)

    def save_final(self, model: torch.nn.Module, meta: dict[str, Any]) -> str:
        """The final weights (no training state: ``final/`` is what later stages load)."""
        save_checkpoint(self.final_dir, model_state=model.state_dict(), meta=meta)
        return self._upload(self.final_dir, "final")

    # ------------------------------------------------------------------ the mirror
    def _upload(self, path: Path, rel: str, prune_keep: set[int] | None = None) -> str:
        """Mirror a checkpoint dir to ``upload_uri/rel`` (meta.json last); prune the remote step_* dirs to
        the newest keep_last plus ``prune_keep`` — from the remote listing, since a resumed run on a new
        machine does not have the old checkpoints locally."""
        if not self.upload_uri:
            return str(path)
        store = Store(self.upload_uri, self.endpoint)
        dest = join(self.upload_uri, rel)
        for p in sorted(path.iterdir()):
            if p.name != META_FILE:
                store.put(p, join(dest, p.name))
        store.put(path / META_FILE, join(dest, META_FILE))  # last: marks the remote copy complete
        if prune_keep is not None:
            self._prune_remote(store, prune_keep)
        return dest

    def _prune_remote(self, store: Store, keep_steps: set[int]) -> None:
        base = join(self.upload_uri, "checkpoints")
        steps = sorted({int(m.group(1)) for rel, _ in store.iter_files(base)
                        if (m := STEP_RE.match(rel.split("/")[0]))})
        keep = set(steps[-max(self.keep_last, 1):]) | keep_steps
        for s in steps:
            if s not in keep:
                store.delete_prefix(join(base, step_dir_name(s)))

    def _remote_latest(self) -> Path | None:
        """The newest complete mirrored checkpoint, downloaded; None when the mirror has none."""
        store = Store(self.upload_uri, self.endpoint)
        # An empty prefix lists as []; any other error (credentials, endpoint) must surface, not silently restart.
        metas = [u for u in store.list(join(self.upload_uri, "checkpoints")) if u.endswith("/" + META_FILE)]
        if not metas:
            return None
        latest = sorted(metas)[-1].rsplit("/", 1)[0]
        return resolve_checkpoint_dir(latest, endpoint_url=self.endpoint)
