"""Where the vs-nanochat benches find nanochat HEAD: one home for the lookup and the how-to-get-it message.

The checkout is a reference to run beside Kiln, never a dependency (and never copied into Kiln), so a bench
without one explains how to get it and exits 0.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GET_NANOCHAT = "git clone https://github.com/karpathy/nanochat && git -C nanochat checkout 92d63d4"
HOW_TO_GET = (f"nanochat checkout not found. Get it with:\n  {GET_NANOCHAT}\n"
              "then pass --nanochat nanochat (or set NANOCHAT_DIR).")


def find_nanochat(arg: str | None) -> Path | None:
    """The checkout named by --nanochat, else $NANOCHAT_DIR or ../nanochat beside the repo; None when absent."""
    # An explicit --nanochat is the only candidate: a wrong path must not silently fall back to another one.
    for cand in (arg,) if arg else (os.environ.get("NANOCHAT_DIR"), str(REPO.parent / "nanochat")):
        if cand and (Path(cand) / "nanochat" / "gpt.py").is_file() and (Path(cand) / "nanochat" / "core_eval.py").is_file():
            return Path(cand).resolve()
    return None
