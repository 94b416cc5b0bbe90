"""Where a training run reports to: ``metrics.jsonl``, MLflow, the progress bar and printed lines.

Every output is written by rank 0 only; on other ranks each method is a no-op, so the trainer calls
them unconditionally and its loop reads as what happens, not who may say it. ``metrics.jsonl`` and
``samples.json`` survive a kill -9: on resume the rows and samples after the checkpoint are dropped
(they will be recomputed), so the files read as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator

from llm.storage import write_atomic
from llm.tracking import NullTracker

# The printed step line: the metrics people watch, in this order and format, when present.
_LINE_FIELDS = (("loss", "{:.4f}"), ("val_loss", "{:.4f}"), ("val_bpb", "{:.4f}"), ("lr", "{:.2e}"),
                ("grad_norm", "{:.3f}"), ("tokens_per_s", "{:,.0f}"), ("mfu", "{:.1%}"))


class RunLog:
    """One run's reporting; ``open`` it in the out dir once MLflow is up, ``close`` it when the loop ends."""

    def __init__(self, stage: str, *, main: bool):
        self.stage, self.main = stage, main
        self.tracker: Any = NullTracker()
        self.samples: list[dict[str, Any]] = []
        self.checkpoint_uris: list[str] = []
        self.out: Path | None = None
        self.total_steps = 0
        self._bar: Any = None
        self._metrics: IO[str] | None = None

    def line(self, msg: str) -> None:
        """A ``[stage]`` line on stdout, above the progress bar when one is shown."""
        if not self.main:
            return
        text = f"[{self.stage}] {msg}"
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def attach(self, out: Path, tracker: Any, step: int) -> None:
        """Use ``tracker`` and ``out``; on resume at ``step``, drop the rows and samples written after it."""
        self.out, self.tracker = out, tracker
        if not self.main:
            return
        _truncate_metrics(out / "metrics.jsonl", step)
        samples_path = out / "samples.json"
        if samples_path.exists() and step > 0:
            self.samples = [s for s in json.loads(samples_path.read_text()) if s["step"] <= step]

    def open(self, total_steps: int, start_step: int, *, progress: bool) -> None:
        """Start the progress bar and append to ``metrics.jsonl``: the loop begins."""
        self.total_steps = total_steps
        if not self.main:
            return
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=self.stage, unit="step", file=sys.stdout,
                             mininterval=1.0, dynamic_ncols=False, ncols=100)
        assert self.out is not None, "attach() before open()"
        self._metrics = open(self.out / "metrics.jsonl", "a")

    def tick(self) -> None:
        """One optimizer step done."""
        if self._bar is not None:
            self._bar.update(1)

    def row(self, row: dict[str, Any]) -> None:
        """A metrics row: to ``metrics.jsonl`` (flushed: a kill -9 loses at most a torn last line), MLflow, stdout."""
        if not self.main:
            return
        assert self._metrics is not None, "open() before row()"
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                                 row["step"])
        parts = [f"step {row['step']:>6}/{self.total_steps}"]
        parts += [f"{k} " + fmt.format(row[k]) for k, fmt in _LINE_FIELDS if row.get(k) is not None]
        self.line(" | ".join(parts))

    def add_samples(self, new: list[dict[str, Any]], step: int) -> None:
        """Greedy samples of this step: appended to ``samples.json``, logged to MLflow and printed."""
        if not new or not self.main:
            return
        assert self.out is not None, "attach() before add_samples()"
        self.samples += new
        write_atomic(self.out / "samples.json", json.dumps(self.samples, indent=2))
        self.tracker.log_dict(new, f"samples/step_{step:06d}.json")
        for s in new:
            self.line(f"sample | {s['prompt']!r} -> {s['completion']!r}")

    def checkpoint(self, uri: str, reason: str, step: int) -> None:
        """A checkpoint was written to ``uri``: tag the MLflow run and keep the list of every one written."""
        if not self.main:
            return
        self.tracker.set_tags({"last_checkpoint": uri})
        self.checkpoint_uris.append(uri)
        self.tracker.log_dict({"checkpoints": self.checkpoint_uris}, "checkpoints.json")
        self.line(f"checkpoint ({reason}) step {step} -> {uri}")

    def close(self) -> None:
        """The loop is over (normally or not): close the metrics file and the bar."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def finish(self, summary: dict[str, Any], last_val: dict[str, Any]) -> None:
        """Write ``summary.json``/``status.json``, log the final numbers, end the MLflow run, print the closing line."""
        if not self.main:
            return
        assert self.out is not None, "attach() before finish()"
        status, step, tokens = summary["status"], summary["steps"], summary["tokens"]
        write_atomic(self.out / "summary.json", json.dumps(summary, indent=2, default=str))
        write_atomic(self.out / "status.json", json.dumps({"status": status, "step": step}))
        self.tracker.log_metrics({f"final/{k}": v for k, v in summary.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)}, step)
        self.tracker.log_dict(summary, "summary.json")
        if self.samples:
            self.tracker.log_dict(self.samples, "samples.json")
        self.tracker.end("FINISHED" if status == "done" else "KILLED")
        vals = ", ".join(f"{k} {v:.4f}" for k, v in last_val.items() if isinstance(v, (int, float)))
        loss = summary["final_train_loss"]
        loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "n/a"
        self.line(f"{status}: {step} steps, {tokens:,} tokens in {summary['wall_s']:.1f}s; train loss {loss}"
                  + (f"; {vals}" if vals else ""))

    def failed(self) -> None:
        """The run raised: mark the MLflow run FAILED (the error itself propagates)."""
        self.tracker.end("FAILED")


class Interval:
    """Throughput and train loss since the last metrics row, with pauses (eval, checkpoints) left out.

    A pause is excluded by shifting the window's start past it, so the steps before the pause keep
    their time and their tokens (restarting the clock instead dropped their time but kept their
    tokens, and the next tokens_per_s/MFU read too high).
    """

    def __init__(self, device: Any):
        self._device = device
        self.reset()

    def reset(self) -> None:
        import torch

        self.t0, self.tokens = time.time(), 0
        self.loss_sum = torch.zeros((), device=self._device, dtype=torch.float64)
        self.micro_steps = 0

    def add_micro(self, loss: Any) -> None:
        """One micro-batch's (detached) mean loss; summed on the device, no host sync."""
        self.loss_sum += loss.double()
        self.micro_steps += 1

    def tokens_per_s(self) -> float:
        """Training tokens per second of wall time since the last row, pauses excluded."""
        dt = time.time() - self.t0
        return self.tokens / dt if dt > 0 else 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count as training time."""
        t = time.time()
        try:
            yield
        finally:
            self.t0 += time.time() - t


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows from steps after the checkpoint (they will be recomputed)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a torn last line from a kill -9
    write_atomic(path, "".join(k + "\n" for k in keep))
