"""Bytes and time a faulty download costs, with ranged resume vs a full refetch on every retry.

Both runs use the same downloader (llm.data.download.fetch_files) against the loopback hub server
(tests/hub_server.py) serving one offline-kit shard, with the same injected faults. The reference
is the server with ``range_mode="none"``: it advertises no byte ranges, so every retry fetches the
whole file again (what Kiln did before ranged resume). Prints bytes received and wall time per
fault pattern, and the reference/Kiln ratios. Loopback moves bytes at memory speed, so the byte
ratio is the figure that carries over to a real network; the wall ratio here is mostly overhead.

    .venv/bin/python bench/bench_download_resume.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hub_server import HubServer  # noqa: E402

from llm.data.download import fetch_files  # noqa: E402

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


if __name__ == "__main__":
    main()
