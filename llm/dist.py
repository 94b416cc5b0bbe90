"""Which device and how many processes a job gets, and the process group its ranks share.

One home for both, because each used to be decided in several places that could disagree: a stage
checked before it started (:func:`check_devices`), training and eval each picked a process
count, and the trainer, the SFT held-out loss and ``kiln chat`` each resolved ``device: auto`` their
own way (one of them quietly falling back to CPU when CUDA was asked for). Now
:func:`resolve_device` and :func:`resolve_nproc` are the only rules, with one error message each
(:func:`resolve_devices` applies both to a config section).

The process-group half runs inside a torchrun job (``llm.train.trainer``, ``llm.eval.stage``):
:func:`init_distributed` joins the group, :func:`all_sum`, :func:`gather_objects` and :func:`barrier`
are the collectives the trainer needs (no-ops in a single process), and :func:`finish` leaves the
group without gloo's teardown crash.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from llm.config import DEVICE_STAGES, ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


# --------------------------------------------------------------------------- device and process count


def resolve_device(pref: str, key: str = "device") -> str:
    """The device (``"cpu"`` or ``"cuda"``) that ``pref`` ("auto", "cpu" or "cuda") means on this machine.

    "auto" is CUDA when a GPU is visible, else CPU. "cuda" without a GPU is a :class:`ConfigError`
    naming ``key`` (e.g. ``pretrain.device``), never a silent CPU fallback: a GPU-sized job on CPU
    would look like it works and take days.
    """
    if pref not in DEVICE_CHOICES:
        raise ConfigError(f"{key}: {pref!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if pref == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if pref == "cuda":
        raise ConfigError(f"{key}: cuda requested but torch.cuda.is_available() is False on this machine "
                          f"(use 'auto' or 'cpu')")
    return "cpu"


def resolve_nproc(pref: int | str, device: str, key: str = "nproc") -> int:
    """Processes on this node for a job on ``device`` (already resolved): ``pref`` when it is a number.

    "auto" is one process per visible GPU on CUDA and 1 on CPU. On CUDA, more processes than GPUs is
    a :class:`ConfigError` naming ``key``: ranks would share a GPU, which NCCL refuses after every rank
    has started. CPU ranks (gloo) need no GPU, so any count goes there.
    """
    if pref == "auto":
        return max(1, torch.cuda.device_count()) if device == "cuda" else 1
    n = int(pref)
    if device == "cuda" and n > torch.cuda.device_count():
        raise ConfigError(f"{key}: {n} processes but only {torch.cuda.device_count()} CUDA device(s) visible "
                          f"(one process per GPU; use 'auto')")
    return n


def resolve_devices(section: Any, name: str) -> tuple[str, int]:
    """(device, processes on this node) for a config section with ``device`` and ``nproc`` fields.

    The training sections and ``eval`` have them; errors name ``<name>.device`` / ``<name>.nproc``.
    """
    device = resolve_device(section.device, f"{name}.device")
    return device, resolve_nproc(section.nproc, device, f"{name}.nproc")


# --------------------------------------------------------------------------- the process group (in a rank)


@dataclass
class Dist:
    """This process's place in the job: its global and node-local rank, the world size, its device."""

    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str, nccl_env: Mapping[str, Any], key: str = "train.device") -> Dist:
    """Join the job's process group (when torchrun started more than one rank) on this rank's device.

    The rank comes from torchrun's RANK/WORLD_SIZE/LOCAL_RANK (a plain ``python -m`` run is rank 0
    of 1, with no group). ``nccl_env`` (the config's NCCL settings) only fills variables the
    environment does not already set, so an operator's export wins.
    """
    for k, v in nccl_env.items():
        os.environ.setdefault(k, str(v))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if resolve_device(device_pref, key) == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if world > 1:
        on_cuda = device.type == "cuda"
        dist.init_process_group(backend="nccl" if on_cuda else "gloo", device_id=device if on_cuda else None)
    return Dist(rank, local, world, device)


def all_sum(values: list[float], d: Dist) -> list[float]:
    """``values`` summed over every rank, in float64 (exact for counts below 2**53)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    if d.world > 1:
        dist.barrier()


def finish(code: int) -> int:
    """End a successful distributed job with exit status ``code``.

    Call after the ranks have met at a final barrier with every output written. gloo (the CPU
    backend) can abort a rank with SIGABRT during teardown when its peer has already closed its
    sockets: the error is raised on a gloo background thread, so Python cannot catch it, and the
    job fails after it has finished (seen about 1 run in 10 on a loaded 2-core machine). On gloo
    the process therefore exits without that teardown; NCCL's group is destroyed normally.
    """
    if not dist.is_initialized():
        return code
    if dist.get_backend() == "gloo":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    dist.destroy_process_group()
    return code


# --------------------------------------------------------------------------- devices


def check_devices(cfg: Any, stage: str) -> None:
    """Raise :class:`ConfigError` naming the key when ``stage`` asks for devices this machine lacks.

    Called when the stage starts on the machine that runs it, before torchrun (or a model) is
    launched, so a missing GPU is one line instead of a traceback from every rank. It is not part
    of validation because configs are also built where the stage does not run: a CPU orchestrator
    dispatching to a GPU pool, ``kiln config``, ``kiln ls``. The rules are this module's, the same
    ones the stage applies when it picks its device and process count.
    """
    if stage not in DEVICE_STAGES:
        return
    resolve_devices(getattr(cfg, stage), stage)
