"""The data stages on the ``dask`` executor (1 and 2 workers) against the ``local`` one, in one run.

Part 1 (throughput): filter, dedup and tokenize on the same corpus, each executor in turn, in
interleaved rounds (local-1, local-2, dask-1, dask-2, then again), so machine load hits every
executor alike. The Dask clusters (2-process and 1-process LocalClusters on 127.0.0.1) are started
once, before the rounds, each in a process of its own (so their schedulers do not share this
process's CPU and GIL with the local runs), and reached by address, as a real scheduler would be;
their start-up is reported on its own. The local pool's start-up (spawned workers) is inside its stage time, since
every local run pays it. Every run must produce the same files (sha256) as local-1, or the
benchmark stops. Reported: docs/s per stage and executor, dask/local ratios, 1 -> 2 worker scaling.

Part 2 (memory): dedup's peak RSS per worker at 1x and 10x corpus on the ``dask`` executor: each
size runs with ``run.executor=dask`` in a fresh interpreter, so its LocalCluster's workers are fresh
processes whose ``VmHWM`` is that run's own (as bench/bench_dedup_memory.py does for ``local``).

    python bench/bench_executor.py --docs 2000 --shards 4 --rounds 2 --memory-sizes 1000,10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from bench_dedup_memory import build  # noqa: E402  (the same corpus builder: real docs, perturbed replicas)

STAGES = ("filter", "dedup", "tokenize")


def publish_corpus(root: Path, corpus: Path) -> str:
    """The corpus files as a finished stage output (what filter, dedup and tokenize read)."""
    from llm.stages.output import run_stage
    from llm.storage import Store

    def body(out, _):
        for f in sorted(corpus.glob("*.parquet")):
            shutil.copyfile(f, out.path(f"data/{f.name}"))
        return {}

    return run_stage(Store(str(root)), "filter", {"corpus": str(corpus)}, {}, "bench", body).uri


def run_once(stage: str, root: Path, inputs: dict[str, str], executor: str, workers: int) -> tuple[float, dict]:
    from llm.config import load_config
    from llm.stages.registry import execute

    shutil.rmtree(root, ignore_errors=True)
    cfg = load_config("tiny", {"run.artifact_root": str(root), "run.executor": executor, f"{stage}.workers": workers})
    t0 = time.perf_counter()
    res = execute(stage, cfg, inputs, progress=False)
    return time.perf_counter() - t0, res.manifest


CLUSTER = """
import sys
from distributed import LocalCluster
c = LocalCluster(n_workers=int(sys.argv[1]), threads_per_worker=1, processes=True, host="127.0.0.1",
                 dashboard_address=":0")
print(c.scheduler_address, flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
c.close()
"""


def start_cluster(n: int) -> tuple[subprocess.Popen, str]:
    """A LocalCluster of ``n`` workers in a process of its own; (process, scheduler address)."""
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    return proc, proc.stdout.readline().strip()


def throughput(args: argparse.Namespace, work: Path) -> dict:
    from llm.config import load_config
    from llm.stages.registry import execute

    corpus = work / "corpus"
    build(corpus, args.docs, args.shards)
    docs_uri = publish_corpus(work / "inputs", corpus)
    cfg = load_config("tiny", {"run.artifact_root": str(work / "inputs"), "tokenizer.vocab_size": 2048,
                               "tokenizer.max_train_chars": 2_000_000})
    tok_uri = execute("tokenizer", cfg, {"docs": docs_uri}, progress=False).uri
    clusters, started = {}, {}
    for n in (1, 2):
        t0 = time.perf_counter()
        clusters[n] = start_cluster(n)
        started[n] = round(time.perf_counter() - t0, 2)
    print(f"LocalCluster start-up (own process): 1 worker {started[1]} s, 2 workers {started[2]} s", flush=True)
    execs = [("local", 1, "local"), ("local", 2, "local"), ("dask", 1, clusters[1][1]), ("dask", 2, clusters[2][1])]
    times: dict[str, dict[str, list[float]]] = {s: {f"{e}-{w}": [] for e, w, _ in execs} for s in STAGES}
    docs: dict[str, int] = {}
    try:
        for rnd in range(args.rounds):
            for stage in STAGES:
                inputs = {"docs": docs_uri} | ({"tokenizer": tok_uri} if stage == "tokenize" else {})
                reference = None
                for name, w, spec in execs:
                    secs, m = run_once(stage, work / "runs" / f"{stage}-{name}-{w}", inputs, spec, w)
                    if reference is None:
                        reference = m["files"]
                    elif m["files"] != reference:
                        sys.exit(f"{stage} on {name}-{w}: output differs from local-1")
                    docs[stage] = m["counts"].get("docs_in") or m["counts"].get("docs") + m["counts"]["empty_docs_skipped"]
                    times[stage][f"{name}-{w}"].append(secs)
                    print(f"round {rnd + 1} {stage:8s} {name}-{w}: {secs:6.2f} s  ({docs[stage] / secs:7.1f} docs/s)", flush=True)
    finally:
        for proc, _ in clusters.values():
            proc.stdin.close()
            proc.wait(timeout=60)
    return {"docs": docs, "seconds": times, "cluster_startup_s": started}


def summarize(res: dict) -> None:
    print("\nstage     executor  docs/s (best of rounds)  vs local same workers   1->2 workers")
    for stage, by in res["seconds"].items():
        best = {k: min(v) for k, v in by.items()}
        rate = {k: res["docs"][stage] / s for k, s in best.items()}
        for k in by:
            kind, w = k.split("-")
            ratio = rate[k] / rate[f"local-{w}"]
            scale = f"x{rate[f'{kind}-2'] / rate[f'{kind}-1']:.2f}" if w == "2" else ""
            print(f"{stage:9s} {k:8s}  {rate[k]:10.1f}            {ratio:6.2f}              {scale}")


def memory(args: argparse.Namespace, work: Path) -> list[dict]:
    """Dedup on ``run.executor=dask`` (a fresh LocalCluster per size) via bench_dedup_memory's one-size runner."""
    rows = []
    for n in [int(s) for s in args.memory_sizes.split(",")]:
        corpus = work / f"mem-{n}"
        build(corpus, n, args.shards)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, str(REPO / "bench" / "bench_dedup_memory.py"), "--one", str(corpus),
               "--workers", str(args.workers), "--executor", "dask"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        shutil.rmtree(corpus, ignore_errors=True)
        if proc.returncode:
            sys.exit(f"memory run for {n} docs failed:\n{proc.stderr[-3000:]}")
        r = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
        rows.append(r)
        print(f"dask, {r['workers']} workers, {r['docs']:>6} docs: signature worker {r['signature_worker_peak_rss_mb']:.1f} MB, "
              f"filter worker {r['filter_worker_peak_rss_mb']:.1f} MB, coordinator {r['coordinator_peak_rss_mb']:.1f} MB, "
              f"{r['seconds']:.1f} s", flush=True)
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        for k in ("signature_worker_peak_rss_mb", "filter_worker_peak_rss_mb"):
            print(f"{k}: x{b[k] / a[k]:.2f} for x{b['docs'] / a['docs']:.0f} documents")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="dask workers for the memory part")
    ap.add_argument("--memory-sizes", default="1000,10000", help="'' to skip the memory part")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_executor_"))
    out: dict = {}
    try:
        if not args.skip_throughput:
            out["throughput"] = throughput(args, work)
            summarize(out["throughput"])
        if args.memory_sizes:
            out["memory"] = memory(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
