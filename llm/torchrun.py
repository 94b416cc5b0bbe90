"""torchrun rendezvous arguments for multi-node training, from the environment.

A stage deployment on the gpu pool gets its environment from Prefect job variables, so one
training stage can span several machines without any config change: start the same stage
deployment on every node with

    prefect deployment run pretrain/d20 --job-variable env='{"KILN_NNODES": "2", "KILN_NODE_RANK": "0",
        "KILN_RDZV_ENDPOINT": "10.0.0.1:29500", "KILN_RDZV_ID": "d20-pretrain"}'

(``KILN_NODE_RANK`` differs per node; with the c10d backend it may be omitted and torchrun assigns
ranks). Without ``KILN_NNODES`` (or with 1) training is single-node: ``--standalone``.

    KILN_NNODES          number of nodes, or a range "MIN:MAX" for elastic jobs
    KILN_NODE_RANK       this node's rank (optional with c10d)
    KILN_RDZV_ENDPOINT   host:port of the rendezvous (the rank-0 node)
    KILN_RDZV_ID         a job id shared by all nodes (default "kiln")
    KILN_RDZV_BACKEND    c10d (default) or static
    KILN_MAX_RESTARTS    torchrun --max-restarts (default 0)
"""

from __future__ import annotations

import os
from typing import Mapping

from llm.stages.output import StageError


def rendezvous_args(env: Mapping[str, str] | None = None) -> list[str]:
    """The torchrun arguments that choose single-node or multi-node rendezvous."""
    env = os.environ if env is None else env
    nnodes = env.get("KILN_NNODES", "").strip()
    if nnodes in ("", "1", "1:1"):
        return ["--standalone"]
    endpoint = env.get("KILN_RDZV_ENDPOINT", "").strip()
    if not endpoint:
        raise StageError(f"KILN_NNODES={nnodes} needs KILN_RDZV_ENDPOINT=host:port (the rendezvous on the first node)")
    if ":" not in endpoint:
        raise StageError(f"KILN_RDZV_ENDPOINT={endpoint!r} must be host:port")
    backend = env.get("KILN_RDZV_BACKEND", "c10d").strip() or "c10d"
    if backend not in ("c10d", "static"):
        raise StageError(f"KILN_RDZV_BACKEND={backend!r}: use c10d or static")
    args = [f"--nnodes={nnodes}", f"--rdzv-backend={backend}", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={env.get('KILN_RDZV_ID', 'kiln').strip() or 'kiln'}"]
    rank = env.get("KILN_NODE_RANK", "").strip()
    if rank:
        args.append(f"--node-rank={int(rank)}")
    elif backend == "static":
        raise StageError("KILN_RDZV_BACKEND=static needs KILN_NODE_RANK on every node")
    restarts = env.get("KILN_MAX_RESTARTS", "").strip()
    if restarts:
        args.append(f"--max-restarts={int(restarts)}")
    return args
