"""torchrun rendezvous arguments for multi-node training, from the environment.

A stage deployment on the gpu pool gets its environment from Prefect job variables, so one
training stage can span several machines without any config change: start the same stage
deployment on every node with

    prefect deployment run pretrain/d20 --job-variable env='{"KILN_NNODES": "2", "KILN_NODE_RANK": "0",
        "KILN_RDZV_ENDPOINT": "10.0.0.1:29500", "KILN_RDZV_ID": "d20-pretrain"}'

with ``KILN_NODE_RANK`` 0, 1, ... on the nodes and ``KILN_RDZV_ENDPOINT`` on node 0. Without
``KILN_NNODES`` (or with 1) training is single-node: ``--standalone``.

Exactly one node publishes the stage output: node 0, which hosts global rank 0 (the only rank that
writes checkpoints and the summary). The others are followers: they train in node-local scratch and
end with a line saying so (llm/stages/output.py FollowerDone). That needs ranks fixed before training
starts, so the rendezvous is torchrun's static one (``--node-rank`` decides; c10d ignores it and
ranks nodes by join order) and the number of nodes is fixed.

    KILN_NNODES          number of nodes
    KILN_NODE_RANK       this node's rank, 0 .. KILN_NNODES-1 (0: the node at KILN_RDZV_ENDPOINT)
    KILN_RDZV_ENDPOINT   host:port of the rendezvous, on node 0
    KILN_RDZV_ID         a job id shared by all nodes (default "kiln")
    KILN_RDZV_BACKEND    static (the default and the only choice; see above)
    KILN_MAX_RESTARTS    torchrun --max-restarts (default 0)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from llm.stages.output import StageError


@dataclass(frozen=True)
class Nodes:
    """A multi-node job as this node sees it."""

    nnodes: int
    rank: int
    endpoint: str

    @property
    def leader(self) -> bool:
        return self.rank == 0


def multi_node(env: Mapping[str, str] | None = None) -> Nodes | None:
    """The multi-node settings, checked; None when training is single-node."""
    env = os.environ if env is None else env
    raw = env.get("KILN_NNODES", "").strip()
    if raw in ("", "1", "1:1"):
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise StageError(f"KILN_NNODES={raw!r}: give a fixed number of nodes (an elastic range would let torchrun "
                         f"rank the nodes by join order, and the node that publishes must be known before training)")
    nnodes = int(raw)
    endpoint = env.get("KILN_RDZV_ENDPOINT", "").strip()
    if not endpoint:
        raise StageError(f"KILN_NNODES={nnodes} needs KILN_RDZV_ENDPOINT=host:port (the rendezvous on node 0)")
    if ":" not in endpoint:
        raise StageError(f"KILN_RDZV_ENDPOINT={endpoint!r} must be host:port")
    backend = env.get("KILN_RDZV_BACKEND", "static").strip() or "static"
    if backend != "static":
        raise StageError(f"KILN_RDZV_BACKEND={backend!r}: kiln uses torchrun's static rendezvous, where KILN_NODE_RANK "
                         f"fixes which node hosts global rank 0 and publishes (c10d ranks nodes by join order)")
    rank = env.get("KILN_NODE_RANK", "").strip()
    if not rank.isdigit() or int(rank) >= nnodes:
        raise StageError(f"KILN_NNODES={nnodes} needs KILN_NODE_RANK=0..{nnodes - 1} on every node (0 on the node at "
                         f"KILN_RDZV_ENDPOINT, which publishes the output); got {rank!r}")
    return Nodes(nnodes=nnodes, rank=int(rank), endpoint=endpoint)


def is_follower(env: Mapping[str, str] | None = None) -> bool:
    """True on a node of a multi-node job that does not publish (node rank > 0)."""
    nodes = multi_node(env)
    return nodes is not None and not nodes.leader


def rendezvous_args(env: Mapping[str, str] | None = None) -> list[str]:
    """The torchrun arguments that choose single-node or multi-node rendezvous."""
    env = os.environ if env is None else env
    nodes = multi_node(env)
    if nodes is None:
        return ["--standalone"]
    args = [f"--nnodes={nodes.nnodes}", "--rdzv-backend=static", f"--rdzv-endpoint={nodes.endpoint}",
            f"--rdzv-id={env.get('KILN_RDZV_ID', 'kiln').strip() or 'kiln'}", f"--node-rank={nodes.rank}"]
    restarts = env.get("KILN_MAX_RESTARTS", "").strip()
    if restarts:
        args.append(f"--max-restarts={int(restarts)}")
    return args
