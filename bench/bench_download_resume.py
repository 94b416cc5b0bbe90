"""Bytes and time a faulty download costs, with ranged resume vs a full refetch on every retry.

Both runs use the same fetcher (llm.fetch.fetch_files) against the loopback hub server
(tests/hub_server.py) serving one offline-kit shard, with the same injected faults. The reference
is the server with ``range_mode="none"``: it advertises no byte ranges, so every retry fetches the
whole file again (what Kiln did before ranged resume). Prints bytes received and wall time per
fault pattern, and the reference/Kiln ratios. Loopback moves bytes at memory speed, so the byte
ratio is the figure that carries over to a real network; the wall ratio here is mostly overhead.

Second table: a run killed (SIGKILL) mid-transfer, then run again. Kiln's rerun continues the
``.part`` file its sidecar vouches for; the reference server advertises no ranges, so the rerun
fetches the whole file (what Kiln did before partials outlived the process). Third: the cost of the
fsync'd checkpoints on a clean fetch of a larger file, against the same fetch with checkpoints off.

    .venv/bin/python bench/bench_download_resume.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hub_server import HubServer  # noqa: E402

import llm.fetch as fetch  # noqa: E402
from llm.fetch import fetch_files  # noqa: E402

SHARD = "shard_00000.parquet"
# (label, fault kind, times, fraction, client timeout): each pattern hits the first `times` requests.
PATTERNS = [
    ("one cut at 50%", "truncate", 1, 0.5, 5.0),
    ("two cuts at 30%", "truncate", 2, 0.3, 5.0),
    ("three cuts at 80%", "truncate", 3, 0.8, 5.0),
    ("stall after 50%", "stall", 1, 0.5, 1.0),
]


def one_run(data_dir: Path, mode: str, kind: str, times: int, fraction: float, timeout_s: float) -> tuple[int, float, str]:
    with HubServer(data_dir, repo="bench/fineweb", range_mode=mode) as hub, tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_ENDPOINT"] = hub.url
        hub.add_fault(kind, match=f"*/{SHARD}", times=times, fraction=fraction, seconds=timeout_s + 2)
        t0 = time.perf_counter()
        got = fetch_files(hub.source(SHARD), Path(tmp) / "dl", retries=times + 1, backoff_s=0.01, timeout_s=timeout_s)[0]
        wall = time.perf_counter() - t0
        digest = hashlib.sha256(got.path.read_bytes()).hexdigest()
        return got.transferred, wall, digest


_CHILD = """
import sys
from pathlib import Path
from llm.fetch import fetch_files
fetch_files(sys.argv[1], Path(sys.argv[2]), retries=0, timeout_s=60.0)
"""


def crash_run(data_dir: Path, mode: str, fraction: float) -> tuple[int, int, float, str]:
    """Kill a child fetch once ``fraction`` of the file is on disk, rerun: (received by the child,
    reused by the rerun, rerun wall s, sha256). The server stalls at ``fraction``, so the kill lands
    while the link is quiet, the way a preempted job's last read would."""
    with HubServer(data_dir, repo="bench/fineweb", range_mode=mode) as hub, tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_ENDPOINT"] = hub.url
        dest = Path(tmp) / "dl"
        size = (data_dir / SHARD).stat().st_size
        hub.add_fault("stall", match=f"*/{SHARD}", times=1, fraction=fraction, seconds=120)
        child = subprocess.Popen([sys.executable, "-c", _CHILD, hub.source(SHARD), str(dest)], cwd=ROOT)
        part = dest / f".{SHARD}.part"
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= int(size * fraction) - (1 << 20)):
            assert child.poll() is None and time.monotonic() < deadline, "the child never got that far"
            time.sleep(0.02)
        time.sleep(0.2)  # the stall: nothing more arrives
        received = part.stat().st_size
        child.send_signal(signal.SIGKILL)
        child.wait()
        t0 = time.perf_counter()
        got = fetch_files(hub.source(SHARD), dest, retries=0, timeout_s=60.0)[0]
        wall = time.perf_counter() - t0
        assert got.reused_bytes + got.transferred == size
        return received, got.reused_bytes, wall, hashlib.sha256(got.path.read_bytes()).hexdigest()


def checkpoint_overhead(size_mb: int, repeats: int) -> tuple[float, float]:
    """Median wall s of a clean fetch of a ``size_mb`` MB file: checkpoints on, and off."""
    with tempfile.TemporaryDirectory() as src:
        (Path(src) / "blob.bin").write_bytes(os.urandom(size_mb << 20))
        walls: dict[bool, list[float]] = {True: [], False: []}
        with HubServer(Path(src), repo="bench/blob") as hub:
            os.environ["HF_ENDPOINT"] = hub.url
            for _ in range(repeats):
                for on in (True, False):
                    saved = fetch._CHECKPOINT_BYTES, fetch._CHECKPOINT_S
                    if not on:
                        fetch._CHECKPOINT_BYTES, fetch._CHECKPOINT_S = 1 << 62, float("inf")
                    try:
                        with tempfile.TemporaryDirectory() as tmp:
                            t0 = time.perf_counter()
                            fetch_files(hub.source("blob.bin"), Path(tmp) / "dl", retries=0, timeout_s=60.0)
                            walls[on].append(time.perf_counter() - t0)
                    finally:
                        fetch._CHECKPOINT_BYTES, fetch._CHECKPOINT_S = saved
        return statistics.median(walls[True]), statistics.median(walls[False])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pretrain")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.pop("HF_TOKEN", None)
    size = (args.data / SHARD).stat().st_size
    want = hashlib.sha256((args.data / SHARD).read_bytes()).hexdigest()
    one_run(args.data, "honour", "truncate", 0, 0.5, 5.0)  # warm-up, untimed: imports and first connections
    print(f"file: {SHARD}, {size:,} bytes; median wall of {args.repeats} runs; load {os.getloadavg()[0]:.2f}")
    print(f"{'fault':<20} {'Kiln bytes':>14} {'x size':>7} {'ref bytes':>14} {'x size':>7} {'bytes ratio':>12} "
          f"{'Kiln s':>7} {'ref s':>7} {'wall ratio':>11}")
    for label, kind, times, fraction, timeout_s in PATTERNS:
        rows = {}
        for mode in ("honour", "none"):
            runs = [one_run(args.data, mode, kind, times, fraction, timeout_s) for _ in range(args.repeats)]
            assert all(d == want for _, _, d in runs), f"{label}/{mode}: wrong bytes published"
            rows[mode] = (runs[0][0], statistics.median(w for _, w, _ in runs))
        (kb, kw), (rb, rw) = rows["honour"], rows["none"]
        print(f"{label:<20} {kb:>14,} {kb / size:>7.2f} {rb:>14,} {rb / size:>7.2f} {rb / kb:>11.2f}x "
              f"{kw:>7.2f} {rw:>7.2f} {rw / kw:>10.2f}x")

    print(f"\nkilled mid-transfer, then rerun (median of {args.repeats}); bytes = what the rerun fetched")
    print(f"{'killed at':<10} {'child got':>11} {'Kiln reused':>12} {'Kiln rerun':>11} {'ref rerun':>11} "
          f"{'bytes ratio':>12} {'Kiln s':>7} {'ref s':>7}")
    for fraction in (0.5, 0.9):
        rows = {}
        for mode in ("honour", "none"):
            runs = [crash_run(args.data, mode, fraction) for _ in range(args.repeats)]
            assert all(d == want for *_, d in runs), f"crash {fraction}/{mode}: wrong bytes published"
            rows[mode] = (statistics.median(g for g, _, _, _ in runs), statistics.median(r for _, r, _, _ in runs),
                          statistics.median(w for _, _, w, _ in runs))
        (got, reused, kw), (_, ref_reused, rw) = rows["honour"], rows["none"]
        kb, rb = size - reused, size - ref_reused
        print(f"{fraction:<10.0%} {got:>11,.0f} {reused:>12,.0f} {kb:>11,.0f} {rb:>11,.0f} {rb / kb:>11.2f}x "
              f"{kw:>7.2f} {rw:>7.2f}")

    on, off = checkpoint_overhead(256, args.repeats)
    print(f"\nclean fetch of 256 MiB, median of {args.repeats}: checkpoints on {on:.2f} s, off {off:.2f} s "
          f"({on / off:.2f}x)")


if __name__ == "__main__":
    main()
