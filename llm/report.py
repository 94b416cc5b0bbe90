"""The run's report card: one markdown file a person wants to read after a pipeline run.

Stage "report" receives the manifests of every stage that ran, keyed by pipeline name
(download, filter, dedup, tokenizer, tokenize, pretrain, midtrain, sft, eval_pretrain,
eval_midtrain, eval_sft) and writes ``report.md`` plus one loss-curve PNG per training stage.
Anything missing is said to be "not run" rather than failing the report: a report of a
partial run is still useful.

:func:`render_report` returns the markdown text (the Prefect task publishes it as a markdown
artifact and logs it to MLflow); :func:`read_report` reads it back from a stage output.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from llm.config import KilnConfig
from llm.stages.output import StageOutput
from llm.storage import Store, atomic_path, join, write_atomic

DATA_STAGES = ("download", "filter", "dedup", "tokenize")
TRAIN_STAGES = ("pretrain", "midtrain", "sft")
LIBRARIES = ("torch", "numpy", "prefect", "mlflow", "tokenizers", "tiktoken", "pyarrow", "datatrove",
             "datasketch", "safetensors", "pydantic")
NOT_RUN = "_not run_"


# --------------------------------------------------------------------------- small helpers


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:,.{digits}f}".rstrip("0").rstrip(".") if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _rounded(v: Any) -> Any:
    """Throughputs read better as whole numbers."""
    return round(v) if isinstance(v, float) and not math.isnan(v) else v


def _table(headers: list[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out


def _seconds(s: float | None) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


class _Reader:
    """Reads files of stage outputs through the store (local or S3)."""

    def __init__(self, cfg: KilnConfig):
        self.store = Store(cfg.run.artifact_root, cfg.run.s3_endpoint)

    def text(self, manifest: dict[str, Any], rel: str) -> str | None:
        if rel not in manifest.get("files", {}) and not Path(join(manifest["uri"], rel)).exists():
            return None
        try:
            return self.store.cache_path(join(manifest["uri"], rel)).read_text(encoding="utf-8")
        except (FileNotFoundError, OSError):
            return None

    def json(self, manifest: dict[str, Any], rel: str) -> Any:
        t = self.text(manifest, rel)
        if t is None:
            return None
        try:
            return json.loads(t)
        except json.JSONDecodeError:
            return None

    def jsonl(self, manifest: dict[str, Any], rel: str) -> list[dict[str, Any]]:
        t = self.text(manifest, rel)
        rows = []
        for line in (t or "").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a crashed run must not hide the rest
        return rows


# --------------------------------------------------------------------------- sections


def _git_commit() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip()[:12] + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def _hardware() -> str:
    parts = [f"{platform.machine()} · {os.cpu_count()} CPU cores"]
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            parts.append(f"{len(names)} × {names[0]}" if len(set(names)) == 1 else ", ".join(names))
        else:
            parts.append("no CUDA device")
    except ImportError:
        pass
    return " · ".join(parts)


def environment_section(inputs: dict[str, dict]) -> list[str]:
    versions = []
    for lib in LIBRARIES:
        try:
            versions.append(f"{lib} {importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    hosts = sorted({f"{m['host'].get('hostname')} ({m['host'].get('platform')})" for m in inputs.values()
                    if isinstance(m.get("host"), dict)})
    lines = ["## Environment", "",
             f"- git commit: `{_git_commit()}`",
             f"- report host: {platform.node()} · {platform.platform()} · Python {platform.python_version()}",
             f"- hardware (report host): {_hardware()}"]
    if hosts:
        lines.append(f"- stages ran on: {'; '.join(hosts)}")
    lines.append(f"- libraries: {', '.join(versions)}")
    return lines + [""]


def _nested_tables(title: str, data: dict[str, Any]) -> list[str]:
    """Dict-valued counts (removals by rule, tokens by source, ...) as small tables."""
    lines: list[str] = []
    for key, val in data.items():
        if isinstance(val, dict) and val and all(not isinstance(v, (dict, list)) for v in val.values()):
            lines += [f"{title} — {key.replace('_', ' ')}:", ""]
            lines += _table(["", "value"], sorted(val.items(), key=lambda kv: -kv[1] if isinstance(kv[1], (int, float)) else 0))
            lines.append("")
    return lines


def data_section(inputs: dict[str, dict]) -> list[str]:
    lines = ["## Data", ""]
    rows = []
    for name in DATA_STAGES:
        m = inputs.get(name)
        if m is None:
            rows.append([name, None, None, None, NOT_RUN])
            continue
        c = m.get("counts", {})
        d_in, d_out = c.get("docs_in"), c.get("docs_out", c.get("docs"))
        removed = (d_in - d_out) if isinstance(d_in, int) and isinstance(d_out, int) else None
        extras = [f"{k}={_fmt(v)}" for k, v in c.items()
                  if k not in ("docs_in", "docs_out") and not isinstance(v, (dict, list))]
        rows.append([name, d_in, d_out, removed, ", ".join(extras[:8])])
    lines += _table(["stage", "docs in", "docs out", "removed", "other counts"], rows)
    lines.append("")
    f = inputs.get("filter")
    if f is not None:
        lines += _nested_tables("Filter", f.get("counts", {})) + _nested_tables("Filter", {
            k: v for k, v in f.items() if "rule" in k and isinstance(v, dict)})
    d = inputs.get("dedup")
    if d is not None:
        c = d.get("counts", {})
        rate = c.get("duplicate_rate", c.get("removal_rate"))
        if rate is None and c.get("docs_in"):
            rate = 1 - c.get("docs_out", c["docs_in"]) / c["docs_in"]
        lines += [f"Duplicate rate (dedup): **{_fmt(rate)}**" if rate is not None else "Duplicate rate: –", ""]
        lines += _nested_tables("Dedup", c)
    t = inputs.get("tokenize")
    if t is not None:
        lines += _nested_tables("Tokenize", t.get("counts", {}))
    return lines


def tokenizer_section(cfg: KilnConfig, inputs: dict[str, dict]) -> list[str]:
    lines = ["## Tokenizer", ""]
    m = inputs.get("tokenizer")
    if m is None:
        return lines + [f"Tokenizer: {NOT_RUN}", ""]
    c = m.get("counts", {})
    cpt = c.get("chars_per_token")
    tk = inputs.get("tokenize", {}).get("counts", {})
    if cpt is None and tk.get("chars") and tk.get("tokens"):
        cpt = tk["chars"] / tk["tokens"]
    lines += _table(["kind", "vocab size", "chars / token", "train chars"],
                    [[m.get("config", {}).get("tokenizer", {}).get("kind", c.get("kind", cfg.tokenizer.kind)),
                      c.get("vocab_size"), cpt,
                      c.get("train_chars", c.get("chars"))]])
    return lines + [""]


def _final_metric(rows: list[dict[str, Any]], key: str) -> float | None:
    for r in reversed(rows):
        if r.get(key) is not None:
            return r[key]
    return None


def plot_losses(stage: str, rows: list[dict[str, Any]], path: Path) -> bool:
    """Train (and val, where logged) loss against step as a PNG; False when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None and "step" in r]
    if not train and not val:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", linewidth=1.2, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{stage}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def training_section(cfg: KilnConfig, inputs: dict[str, dict], reader: _Reader, plot_dir: Path | None) -> tuple[list[str], list[str]]:
    """The training table and the loss-curve images (markdown lines, PNG file names)."""
    lines = ["## Training", ""]
    rows, pngs, extra = [], [], []
    for name in TRAIN_STAGES:
        m = inputs.get(name)
        if m is None:
            rows.append([name, NOT_RUN] + [None] * 8)
            continue
        c = m.get("counts", {})
        metrics = reader.jsonl(m, "metrics.jsonl")
        rows.append([name, c.get("params"), c.get("tokens"), c.get("steps"), _seconds(c.get("wall_s")),
                     _rounded(c.get("tokens_per_s")), c.get("mfu"),
                     c.get("final_train_loss", _final_metric(metrics, "loss")),
                     c.get("final_val_loss", _final_metric(metrics, "val_loss")),
                     c.get("val_bpb", _final_metric(metrics, "val_bpb"))])
        if plot_dir is not None and plot_losses(name, metrics, plot_dir / f"loss_{name}.png"):
            pngs.append(f"loss_{name}.png")
        sup = c.get("supervised_tokens")
        if isinstance(sup, int) and c.get("tokens") and sup != c.get("tokens"):
            extra += [f"{name}: {_fmt(sup)} of {_fmt(c['tokens'])} tokens carried loss "
                      f"({sup / c['tokens']:.1%}; the rest are prompts, padding or masked targets)"]
        if isinstance(c.get("tokens_by_source"), dict):
            extra += [f"{name} tokens by source: " + ", ".join(f"{k} {_fmt(v)}" for k, v in c["tokens_by_source"].items())]
    lines += _table(["stage", "params", "tokens", "steps", "wall time", "tokens/s", "MFU", "final train loss",
                     "final val loss", "val bpb"], rows)
    lines.append("")
    if extra:
        lines += [f"- {e}" for e in extra] + [""]
    if pngs:
        lines += ["### Loss curves", ""] + [f"![{p[5:-4]} loss]({p})" for p in pngs] + [""]
    return lines, pngs


def _eval_stages(inputs: dict[str, dict]) -> list[str]:
    order = [f"eval_{s}" for s in TRAIN_STAGES]
    found = [k for k in inputs if k.startswith("eval")]
    return [k for k in order if k in found] + sorted(k for k in found if k not in order)


def eval_section(inputs: dict[str, dict], reader: _Reader) -> list[str]:
    lines = ["## Evaluation", ""]
    stages = _eval_stages(inputs)
    if not stages:
        return lines + [f"CORE / bpb / samples: {NOT_RUN}", ""]
    cores = {s: reader.json(inputs[s], "core.json") for s in stages}
    bpbs = {s: reader.json(inputs[s], "bpb.json") or {} for s in stages}
    have = [s for s in stages if cores[s]]
    if have:
        first = cores[have[0]]
        labels = list(dict.fromkeys(t for s in have for t in cores[s]["tasks"]))
        refs: list[str] = []
        for s in have:
            for row in cores[s].get("comparison", []):
                refs += [k for k in row if k not in ("task", "ours") and k not in refs]
        ref_by_task: dict[str, dict[str, Any]] = {}
        for s in have:
            for row in cores[s].get("comparison", []):
                ref_by_task.setdefault(row["task"], row)
        head = ["task"] + [s.removeprefix("eval_") for s in have] + refs
        rows = []
        for label in labels:
            rows.append([label] + [cores[s]["tasks"].get(label, {}).get("centered") for s in have]
                        + [ref_by_task.get(label, {}).get(r) for r in refs])
        core_label = first["label"]
        rows.append([f"**{core_label}**"] + [cores[s]["core"] for s in have]
                    + [ref_by_task.get(core_label, {}).get(r) for r in refs])
        lines += ["Centered accuracy per task ((acc − random baseline) / (1 − baseline)); the last row is the mean. "
                  "GPT-2 columns are the bundle's reference CSVs, averaged over the same tasks."]
        missing = first.get("missing") or []
        if missing:
            lines += ["", f"**{core_label}**: {len(missing)} of the CORE tasks could not be evaluated "
                      f"({', '.join(missing)}; data missing), so this score is not comparable with published "
                      "22-task CORE numbers."]
        prints = {c.get("bundle_fingerprint") for c in (cores[s] for s in have)} - {None}
        if len(prints) == 1:
            lines += ["", f"Bundle `{first.get('bundle', '')}`, content sha256 `{next(iter(prints))[:16]}`."]
        elif len(prints) > 1:  # stages scored on different data: say so rather than compare them silently
            lines += ["", "**Warning:** the stages were scored on different bundle contents ("
                      + ", ".join(f"{s.removeprefix('eval_')}: `{(cores[s].get('bundle_fingerprint') or '?')[:16]}`"
                                  for s in have) + "); their columns are not comparable."]
        lines.append("")
        lines += _table(head, rows)
        lines.append("")
        n = {s: f"{cores[s]['examples']:,} examples in {_seconds(cores[s].get('seconds'))}" for s in have}
        lines += [f"- {s.removeprefix('eval_')}: " + n[s] for s in have] + [""]
    for s in stages:
        if not cores[s]:
            lines += [f"- {s}: CORE {NOT_RUN}"]
    lines += ["### Bits per byte (held-out pretraining split)", ""]
    lines += _table(["checkpoint", "bpb", "tokens"],
                    [[s.removeprefix("eval_"), bpbs[s].get("bpb") if bpbs[s].get("bpb") is not None else NOT_RUN,
                      bpbs[s].get("tokens")] for s in stages])
    lines += ["", "### Samples (greedy)", ""]
    for s in stages:
        smp = reader.json(inputs[s], "samples.json") or []
        lines += [f"**{s.removeprefix('eval_')}**", ""]
        if not smp:
            lines += [f"- {NOT_RUN}"]
        for item in smp:
            lines.append(f"- *{_fmt(item.get('prompt'))}* → {_fmt(item.get('completion'))}")
        lines.append("")
    return lines


def cost_section(cfg: KilnConfig, inputs: dict[str, dict]) -> list[str]:
    """GPU-hours of the training and eval stages × the configured $/GPU-hour."""
    price = cfg.report.gpu_hour_price.get(cfg.report.gpu_type)
    rows, total_h = [], 0.0
    for name in list(TRAIN_STAGES) + _eval_stages(inputs):
        m = inputs.get(name)
        if m is None:
            continue
        c = m.get("counts", {})
        secs = c.get("wall_s") or m.get("timings", {}).get("seconds") or 0.0
        ranks = c.get("ranks") or c.get("world_size") or c.get("nproc")
        if not ranks:
            section = getattr(cfg, name, None)
            n = getattr(section, "nproc", 1) if section is not None else 1
            ranks = n if isinstance(n, int) else 1
        gpu_h = float(secs) * int(ranks) / 3600
        total_h += gpu_h
        rows.append([name, _seconds(secs), ranks, gpu_h, gpu_h * price if price is not None else None])
    lines = ["## Cost estimate", ""]
    if not rows:
        return lines + [f"No training or eval stage: {NOT_RUN}", ""]
    lines += _table(["stage", "wall time", "devices", "device-hours", "USD"], rows)
    if price is None:
        lines += ["", f"No price for gpu_type {cfg.report.gpu_type!r} in report.gpu_hour_price."]
    else:
        lines += ["", f"Total: {total_h:.3f} {cfg.report.gpu_type}-hours × ${price}/h ≈ **${total_h * price:,.2f}** "
                  "(compute only; data stages on CPU not priced)."]
    return lines + [""]


# --------------------------------------------------------------------------- entry points


def render_report(cfg: KilnConfig, inputs: dict[str, dict], plot_dir: Path | None = None) -> str:
    """The report as markdown; loss-curve PNGs are written to ``plot_dir`` when given."""
    reader = _Reader(cfg)
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Kiln run report: {cfg.run.name}", "",
             f"Preset `{cfg.preset}` · generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} · "
             f"artifacts in `{cfg.run.artifact_root}`", ""]
    headline = []
    for s in _eval_stages(inputs):
        core = reader.json(inputs[s], "core.json")
        if core:
            headline.append(f"{s.removeprefix('eval_')} {core['label'].split(' ')[0]} {core['core']:.4f}")
    if headline:
        lines += ["**" + " · ".join(headline) + "**", ""]
    lines += environment_section(inputs)
    lines += data_section(inputs)
    lines += tokenizer_section(cfg, inputs)
    train_lines, _ = training_section(cfg, inputs, reader, plot_dir)
    lines += train_lines
    lines += eval_section(inputs, reader)
    lines += cost_section(cfg, inputs)
    lines += ["## Stage outputs", ""]
    lines += _table(["stage", "key", "uri"], [[k, m.get("key"), m.get("uri")] for k, m in inputs.items()])
    return "\n".join(lines) + "\n"


def run(cfg: KilnConfig, out: StageOutput, inputs: dict[str, dict], *, progress: bool) -> dict[str, Any]:
    text = render_report(cfg, inputs, out.workdir)
    write_atomic(out.path("report.md"), text)
    plots = sorted(p.name for p in out.workdir.glob("loss_*.png"))
    return {"counts": {"stages": len(inputs), "plots": len(plots), "chars": len(text)},
            "report": "report.md", "plots": plots}


def read_report(uri: str, cfg: KilnConfig | None = None) -> str:
    """The markdown of a finished report stage output (local or S3)."""
    store = Store(cfg.run.artifact_root if cfg else uri, cfg.run.s3_endpoint if cfg else "")
    return store.cache_path(join(uri, "report.md")).read_text(encoding="utf-8")
