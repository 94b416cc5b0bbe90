"""The one torchrun launcher, and the rendezvous arguments that make a job span several machines.

:func:`launch` runs ``python -m torch.distributed.run ... -m <module> <args>`` for training
(``llm.train.stages.launch_training``) and for eval (``llm.eval.stage``) alike:

- every output line streams to stdout (progress-bar redraws pass through) or to a sink: a callback
  argument, or one installed with :func:`line_sink` (how a Prefect task routes lines into its run
  logger without ``llm/`` importing Prefect);
- SIGTERM or Ctrl-C to this process asks the job to checkpoint and stop (torchrun passes SIGTERM to
  every rank) while its output keeps streaming, and this process stops once the job has;
- the job dies with this process: torchrun runs in a session of its own (so a terminal's Ctrl-C
  reaches only us, and we stop it in order), and the kernel sends it SIGHUP if we die, even by
  SIGKILL (Linux ``PR_SET_PDEATHSIG``), so no job trains on under PID 1 with nobody to publish it;
- a non-zero exit raises :class:`TrainingFailed` with the exit code and the last lines of output.

Multi-node: a stage deployment on the gpu pool gets its environment from Prefect job variables, so one
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

import collections
import contextlib
import contextvars
import ctypes
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from llm.stages.output import StageError

LineSink = Callable[[str], None]
_SINK: contextvars.ContextVar[LineSink | None] = contextvars.ContextVar("kiln_torchrun_line_sink", default=None)
TAIL_LINES = 40
# Signals that ask a running job to checkpoint and stop, and how long it gets to after an interruption.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_TIMEOUT_S = 120
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- multi-node rendezvous


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


# --------------------------------------------------------------------------- the launcher


@contextlib.contextmanager
def line_sink(fn: LineSink) -> Iterator[None]:
    """Route a job's output lines to ``fn`` (e.g. a Prefect run logger's ``info``) inside this block."""
    token = _SINK.set(fn)
    try:
        yield
    finally:
        _SINK.reset(token)


class TrainingFailed(RuntimeError):
    """A torchrun job exited non-zero (possibly transient: OOM, NCCL, preemption). Carries the exit code and tail.

    Eval jobs raise it too; tasks/ recognises it by this name to retry a job that was lost, not broken.
    """

    def __init__(self, stage: str, code: int, tail: list[str]):
        self.code, self.tail = code, tail
        super().__init__(f"{stage}: torchrun exited with code {code}; last lines:\n" + "\n".join(tail))


def launch(module: str, args: Sequence[str], *, label: str, nproc: int, env: Mapping[str, str],
           rendezvous: Sequence[str] = ("--standalone",), progress: bool = True,
           on_line: LineSink | None = None) -> list[str]:
    """Run ``python -m module *args`` on ``nproc`` ranks of this node under torchrun, to the end.

    ``env``: the job's whole environment (this checkout is put first on its PYTHONPATH, so the ranks
    import the same ``llm``). ``rendezvous``: :func:`rendezvous_args` for a job that may span nodes.
    ``label`` names the job in errors. Returns the last :data:`TAIL_LINES` lines of output; raises
    :class:`TrainingFailed` for a non-zero exit. A stop signal received meanwhile stops this process
    too once the job has stopped (see :func:`_stop_self`).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc}",
           "-m", module, *args]
    child_env = {**env, "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")}
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    emit = _emitter(on_line or _SINK.get(), progress, tail)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env,
                            start_new_session=True, preexec_fn=_die_with_parent())
    try:
        with _forward_stop_signals(proc.pid) as received:
            _pump(proc, emit)
            code = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    if received:
        _stop_self(received[0])
    if code != 0:
        raise TrainingFailed(label, code, list(tail))
    return list(tail)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGHUP when this process dies, even by SIGKILL.

    torchrun runs in a session of its own, so nothing else would stop it. SIGHUP, not SIGTERM: with
    this process gone nobody reads the job's output or publishes its result, so the ranks should not
    spend minutes checkpointing (what SIGTERM asks of them; a graceful stop is the SIGTERM a living
    launcher forwards). torchrun passes SIGHUP on to every rank, whose default action ends it at once.
    Linux only (``PR_SET_PDEATHSIG``; elsewhere None). The kernel sends it when the *thread* that
    started the child ends, which is fine: :func:`launch` holds that thread until the job has ended.
    prctl and its arguments are prepared here, before the fork, so the child runs one foreign call
    and nothing that could wait on a lock another thread held at the fork.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    option, sig, parent = ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(int(signal.SIGHUP)), os.getpid()

    def preexec() -> None:
        prctl(option, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect: no signal would come
            os._exit(1)

    return preexec


def _signal_job(pid: int) -> None:
    """SIGTERM to torchrun (the leader of its own process group), which passes it to every rank."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)


@contextlib.contextmanager
def _forward_stop_signals(pid: int) -> Iterator[list[int]]:
    """While the job runs, SIGTERM/SIGINT to this process become SIGTERM to the job; yields those received.

    Python's default for SIGTERM is to die at once, which left the job running; now the job
    checkpoints and stops while its output keeps streaming. Only the main thread may set handlers: in
    another (a Prefect task's thread) the host's handlers stay, and an exception they raise in this
    thread stops the job through :func:`_stop`.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        _signal_job(pid)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _stop(proc: subprocess.Popen) -> None:
    """We are being interrupted: ask the job to checkpoint and stop, and give it the time to."""
    _signal_job(proc.pid)
    with contextlib.suppress(Exception):
        proc.wait(timeout=STOP_TIMEOUT_S)


def _stop_self(signum: int) -> None:
    """Stop this process for the signal it got while the job ran, now that the job has stopped.

    The handler that was in place decides, as if the signal came now (Ctrl-C: KeyboardInterrupt; a
    host's own handler runs). Where that was the default action, SystemExit(128 + signum) (the status
    a shell reports for that signal), raised so that cleanups still run: the stage lock is released.
    """
    handler = signal.getsignal(signum)
    if handler is signal.SIG_IGN:
        return
    if callable(handler):
        signal.raise_signal(signum)
        return
    raise SystemExit(128 + signum)


def _emitter(sink: LineSink | None, progress: bool, tail: collections.deque[str]) -> Callable[[str, bool], None]:
    """Where each piece of output goes: log lines to the sink (or stdout) and the tail, bar redraws to a TTY."""
    bar_shown = False
    tty = sys.stdout.isatty()

    def emit(text: str, is_bar: bool) -> None:
        nonlocal bar_shown
        if not text.strip():
            return
        if is_bar:  # a carriage-return progress-bar redraw
            if sink is None and progress:
                sys.stdout.write("\r" + text)
                sys.stdout.flush()
                bar_shown = True
            return
        tail.append(text)
        if sink is not None:
            sink(text)
        else:
            if bar_shown:  # put the log line where the bar was (TTY) or below it
                sys.stdout.write("\r\x1b[2K" if tty else "\n")
                bar_shown = False
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    return emit


def _pump(proc: subprocess.Popen, emit: Callable[[str, bool], None]) -> None:
    """Split the child's output on '\\n' (log lines) and '\\r' (progress-bar redraws)."""
    assert proc.stdout is not None
    buf = b""
    while True:
        chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        if not chunk:
            break
        buf += chunk
        while True:
            i_n, i_r = buf.find(b"\n"), buf.find(b"\r")
            cuts = [i for i in (i_n, i_r) if i >= 0]
            if not cuts:
                break
            i = min(cuts)
            piece, sep, buf = buf[:i], buf[i:i + 1], buf[i + 1:]
            emit(piece.decode("utf-8", "replace"), sep == b"\r")
    if buf:
        emit(buf.decode("utf-8", "replace"), False)
