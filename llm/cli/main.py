"""`kiln`: run one stage or the whole pipeline without a server.

    kiln <stage> [--input ROLE=URI ...] [--output ROOT] [--preset P] [--set k=v ...] [--force]
    kiln run [--preset P] [--set k=v ...]          the whole pipeline, in this process
    kiln eval --checkpoint URI                     CORE + bpb + samples for one checkpoint
    kiln chat --checkpoint URI                     talk to a model
    kiln export --checkpoint URI --output DIR      a Hugging Face transformers directory of a model
    kiln stack up|down|status                      local Prefect + MLflow servers and workers
    kiln config [--preset P] [--set k=v ...]       print the resolved config

Without ``--input`` a stage finds its inputs by content key (running any upstream stage
that has not run yet for this config), so ``kiln sft --preset tiny`` just works.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Any, Callable

from llm.config import ConfigError, KilnConfig, list_presets, load_config
from llm.stages.registry import STAGES

# Extra commands live in their own modules; imported only when used so `kiln --help` is fast.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("llm.cli.chat:add_arguments", "llm.cli.chat:main"),
    "stack": ("deployments.stack:add_arguments", "deployments.stack:main"),
    "ls": ("llm.cli.ls:add_arguments", "llm.cli.ls:main"),
    "plan": ("llm.cli.plan:add_arguments", "llm.cli.plan:main"),
    # Also a pipeline stage (`kiln run` runs it), but here --output is the model directory, not a root.
    "export": ("llm.export:add_arguments", "llm.export:main"),
}


# One line each for `kiln --help` (and the command's own --help when its module sets none).
EXTRA_HELP: dict[str, str] = {
    "chat": "talk to a trained model (--checkpoint)",
    "stack": "local Prefect + MLflow servers and workers: up|down|status",
    "ls": "list, verify and trace the outputs under the artifact root",
    "plan": "the token plan of the training stages (params, tokens, steps, batch split, time), without running",
    "export": "a checkpoint as a Hugging Face transformers directory: --checkpoint URI --format hf --output DIR",
}

def _stage_description(name: str) -> str:
    sd = STAGES[name]
    if sd.reads:
        return f"{sd.description}. {sd.reads}"
    roles = ", ".join(f"{r} (from {u})" for r, u in sd.inputs.items())
    return f"{sd.description}. Inputs: {roles}; those not given with --input are found (or first computed) by content key."


def _load(path: str) -> Any:
    mod, fn = path.split(":")
    return getattr(importlib.import_module(mod), fn)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help=f"preset name or YAML path (built in: {', '.join(list_presets())})")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set pretrain.lr=1e-3 model.depth=4 (repeatable)")
    p.add_argument("--output", default=None, metavar="ROOT", help="artifact root (a directory or s3://bucket/prefix)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


EXECUTOR_STAGES = ("filter", "dedup", "tokenize")  # the stages whose units run on run.executor


def _executor_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", default=None, metavar="local|dask|dask://HOST:PORT",
                   help="where the data stages run their units: this machine's process pool (local, the "
                        "default), a Dask LocalCluster (dask) or a Dask scheduler (dask://HOST:PORT); "
                        "the same as --set run.executor=...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln: raw web text to a scored chat model.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, sd in STAGES.items():
        if name in EXTRA_COMMANDS:  # a stage with its own command line (export)
            continue
        p = sub.add_parser(name, help=sd.description, description=_stage_description(name))
        _common(p)
        if sd.inputs or sd.reads_all:
            p.add_argument("--input", action="append", default=[], metavar="[ROLE=]URI",
                           help="an upstream output URI; ROLE may be omitted when the stage has one input")
        else:
            p.set_defaults(input=[])
        p.add_argument("--force", action="store_true", help="recompute even if a verified output exists")
        if name in EXECUTOR_STAGES:
            _executor_option(p)
        if sd.per_model:
            p.add_argument("--checkpoint", default=None, help="the model stage output (or checkpoint dir) to evaluate")
    p = sub.add_parser("run", help="the whole pipeline in this process",
                       description="Run the whole pipeline in this process (no server). Stages already done for "
                                   "this config are reused; an unfinished one resumes.")
    _common(p)
    p.add_argument("--until", choices=list(STAGES), default=None, metavar="STAGE",
                   help=f"stop after this stage ({', '.join(STAGES)})")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="recompute this stage (repeatable, or 'all')")
    _executor_option(p)
    p = sub.add_parser("config", help="print the resolved config as JSON",
                       description="Print the config a run would use (preset + --set overrides) as JSON; "
                                   "an unknown key or a wrong type is an error naming it.")
    _common(p)
    for name in EXTRA_COMMANDS:
        # Parsed by the command's own module (see main) so its imports stay lazy.
        p = sub.add_parser(name, help=EXTRA_HELP.get(name, f"see `kiln {name} --help`"), add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _run_extra(name: str, argv: list[str]) -> int:
    add, run = EXTRA_COMMANDS[name]
    p = argparse.ArgumentParser(prog=f"kiln {name}", description=EXTRA_HELP.get(name))
    _load(add)(p)
    return int(_load(run)(p.parse_args(argv)) or 0)


def config_from_args(args: argparse.Namespace) -> KilnConfig:
    overrides = list(args.overrides)
    if getattr(args, "output", None):
        overrides.append(f"run.artifact_root={args.output}")
    if getattr(args, "executor", None):
        overrides.append(f"run.executor={args.executor}")
    return load_config(args.preset, overrides)


def _parse_inputs(stage: str, raw: list[str], checkpoint: str | None) -> dict[str, str]:
    roles = list(STAGES[stage].inputs)
    out: dict[str, str] = {}
    for item in raw:
        role, sep, uri = item.partition("=")
        if not sep or "://" in role:
            if len(roles) != 1:
                raise ConfigError(f"{stage} has inputs {roles}: give --input ROLE=URI")
            role, uri = roles[0], item
        if role not in roles and not STAGES[stage].reads_all:
            raise ConfigError(f"{stage} has no input {role!r} (inputs: {roles})")
        out[role] = uri
    if checkpoint:
        out["model"] = checkpoint
    return out


def _shown_counts(stage: str, counts: dict[str, Any], n: int = 5) -> str:
    """The stage's headline counts first (the ones `kiln ls` shows), then others, floats rounded.

    A reused output's manifest has its counts in alphabetical order, so "the first five" would
    show a different, less useful set for the same output depending on whether it was cached.
    """
    from llm.cli.ls import _fmt_counts

    headline = STAGES[stage].headline if stage in STAGES else ()
    order = [k for k in headline if k in counts] + [k for k in counts if k not in headline]
    return _fmt_counts({k: counts[k] for k in order[:n]})


def summary(results: dict[str, Any], seconds: float) -> str:
    lines = [f"{'stage':<16} {'status':<9} {'secs':>8}  counts / uri"]
    for name, r in results.items():
        status = "follower" if r.follower else ("cached" if r.cached else "computed")
        secs = r.manifest.get("timings", {}).get("seconds", 0.0)
        counts = _shown_counts(r.manifest.get("stage", name), r.manifest.get("counts", {}))
        lines.append(f"{name:<16} {status:<9} {secs:>8.1f}  {counts}")
        lines.append(f"{'':<16} {'':<9} {'':>8}  {r.uri}")
        if r.follower:
            lines.append(f"{'':<16} {'':<9} {'':>8}  {r.follower}")
    lines.append(f"total wall time {seconds:.1f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        return _guarded(lambda: _run_extra(argv[0], argv[1:]))
    args = build_parser().parse_args(argv)
    return _guarded(lambda: _run_command(args))


def _guarded(fn: Callable[[], int]) -> int:
    """Run a command; a known kind of failure is one line on stderr and a non-zero exit.

    Bad config is exit 2, bad data/inputs exit 1; anything else is a bug and keeps its traceback.
    """
    try:
        return fn()
    except ConfigError as e:
        print(f"kiln: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - top-level: one clear line, the traceback on demand
        from llm.stages.output import StageError

        if isinstance(e, (StageError, FileNotFoundError, ValueError)):
            print(f"kiln: error: {e}", file=sys.stderr)
            return 1
        raise


def _run_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.command == "config":
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    from llm.stages.pipeline import run_pipeline, target_step, upstream_inputs
    from llm.stages.registry import check_inputs, execute

    t0 = time.time()
    progress = not args.quiet
    if args.command in (*EXECUTOR_STAGES, "run"):
        from llm.data.executor import probe

        probe(cfg.run.executor)  # an unreachable scheduler is one line now, not after upstream stages ran
    if args.command == "run":
        results = run_pipeline(cfg, until=args.until, force=args.force, progress=progress,
                               on_stage=lambda n, r: print(f"[kiln] {r.follower}" if r.follower else
                                                          f"[kiln] {n}: {'cached' if r.cached else 'done'} -> {r.uri}", flush=True))
    else:
        inputs = _parse_inputs(args.command, args.input, getattr(args, "checkpoint", None))
        # The inputs given on the command line are checked now: a typo must not cost an upstream run.
        check_inputs(args.command, cfg, inputs)
        target = target_step(cfg, args.command)
        # Only the missing roles decide how far upstream to run: `kiln eval --checkpoint X` needs the
        # tokenizer and tokens, not a whole training chain up to sft. A reads-all stage (the report)
        # given any input reads just those.
        missing = [] if STAGES[args.command].reads_all and inputs else [r for r in target.inputs if r not in inputs]
        if missing:
            inputs |= upstream_inputs(cfg, target, missing, progress=progress)
        results = {args.command: execute(args.command, cfg, inputs, force=args.force, progress=progress)}
    print(summary(results, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
