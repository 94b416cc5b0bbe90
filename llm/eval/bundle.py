"""The CORE eval bundle: task list, data, random baselines and GPT-2 reference scores.

A bundle is a directory (or a zip of one) laid out like nanochat's ``eval_bundle``::

    core.yaml                     icl_tasks: label, dataset_uri, num_fewshot, icl_task_type, continuation_delimiter
    eval_meta_data.csv            "Eval Task" -> "Random baseline" (percent)
    eval_data/<category>/<task>.jsonl
    openai-community-gpt2*.csv    reference accuracy / centered scores of GPT-2

It can come from a local directory, a local ``.zip``, an ``http(s)://`` URL of a zip or an
``s3://`` zip. Zips are fetched once into the cache under a file lock (several ranks or
workers may ask at the same time) by Kiln's one fetcher (:mod:`llm.fetch`: retries on
transient failures, resumed transfers, size checks), checked against an optional sha256,
then extracted.

CORE is defined over 22 tasks. A task whose data file is absent (or that a trimmed
``core.yaml`` leaves out) is *reported and excluded*, and the score is labelled with the
number of tasks actually used, e.g. ``CORE-20 (squad, coqa missing)``: a 20-task mean is
never passed off as the 22-task number.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.storage import cache_root, sha256_file, write_atomic

import yaml

# The 22 tasks of the DCLM CORE metric as nanochat runs it (the labels of its core.yaml), in order.
CORE_TASKS: tuple[str, ...] = (
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
    "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
    "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
    "bigbench_repeat_copy_logic", "squad", "coqa", "boolq", "bigbench_language_identification",
)
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# Fields each task type needs in every jsonl row, checked on load so a bad row fails with its line number.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


class BundleError(ValueError):
    """A malformed or unusable bundle; the message names the file (and line/field)."""


@dataclass(frozen=True)
class TaskSpec:
    label: str
    dataset_uri: str  # relative to eval_data/
    task_type: str
    num_fewshot: int
    delimiter: str
    baseline: float  # random-guess accuracy as a fraction (CSV percent / 100)


@dataclass(frozen=True)
class MissingTask:
    label: str
    reason: str


@dataclass
class Bundle:
    root: Path
    tasks: list[TaskSpec]
    missing: list[MissingTask]
    # model name (e.g. "gpt2-xl") -> {task label: {"accuracy", "centered"}}
    references: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # model name -> CORE as printed in its CSV (22 tasks)
    reference_core: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``CORE`` for the full 22-task metric, else ``CORE-<n> (<missing> missing)``."""
        n = len(self.tasks)
        if not self.missing and {t.label for t in self.tasks} == set(CORE_TASKS):
            return "CORE"
        if not self.missing:
            return f"CORE-{n}"
        if len(self.missing) <= 4:
            return f"CORE-{n} ({', '.join(m.label for m in self.missing)} missing)"
        return f"CORE-{n} ({len(self.missing)} of the {len(CORE_TASKS)} CORE tasks missing)"

    def fingerprint(self) -> str:
        """sha256 over the files that decide the score: ``core.yaml``, the baselines CSV and every evaluated
        task's data. Recorded with each result so two CORE numbers can be checked to come from the same
        data, whatever URL or directory the bundle was read from (an unpinned URL can change under us)."""
        h = hashlib.sha256()
        rels = ["core.yaml", "eval_meta_data.csv"] + sorted(f"eval_data/{t.dataset_uri}" for t in self.tasks)
        for rel in rels:
            h.update(f"{rel}\0{sha256_file(self.root / rel)}\n".encode())
        return h.hexdigest()

    def task(self, label: str) -> TaskSpec:
        for t in self.tasks:
            if t.label == label:
                return t
        raise KeyError(label)

    def data_path(self, task: TaskSpec) -> Path:
        return self.root / "eval_data" / task.dataset_uri


# --------------------------------------------------------------------------- fetching


def _cache_dir() -> Path:
    return cache_root("eval_bundle")


def _fetch_zip(source: str, dest: Path, *, s3_endpoint: str) -> Path:
    """The zip at ``source`` (http(s), s3 or a local path) as ``dest``, through :mod:`llm.fetch`: transient
    failures retried with backoff, an interrupted transfer continued, the size checked against the
    source's listing and the response's Content-Length before the file appears under its name."""
    from dataclasses import replace

    from llm.fetch import DownloadError, fetch_files, list_files

    try:
        listed = list_files(source, s3_endpoint=s3_endpoint)
        if len(listed) != 1:
            raise BundleError(f"CORE bundle {source}: no such file" if not listed else
                              f"CORE bundle {source}: names {len(listed)} files, expected one zip")
        rf = replace(listed[0], rel=dest.name)
        # A zip left by a run that died before extracting it is not trusted (an unpinned URL may have
        # changed since): fetched again. An interrupted transfer's partial is still continued.
        dest.unlink(missing_ok=True)
        return fetch_files([rf], dest.parent, workers=1, retries=4, s3_endpoint=s3_endpoint)[0].path
    except DownloadError as e:  # the fetcher names the URL; say it is the bundle that failed
        raise BundleError(f"CORE bundle: {e}" if source in str(e) else f"CORE bundle {source}: {e}") from e


def _find_root(d: Path) -> Path:
    """The directory holding core.yaml: the extraction dir itself or its single top folder."""
    if (d / "core.yaml").exists():
        return d
    hits = sorted(p.parent for p in d.rglob("core.yaml"))
    if not hits:
        raise BundleError(f"{d}: no core.yaml in the bundle")
    return min(hits, key=lambda p: len(p.parts))


def fetch_bundle(source: str, *, sha256: str = "", cache_dir: Path | None = None, s3_endpoint: str = "") -> Path:
    """A local directory with the bundle from ``source`` (directory, zip path, http(s) or s3 zip URL)."""
    if not (source.startswith(("http://", "https://", "s3://")) or source.endswith(".zip")):
        root = Path(source).expanduser()
        if not root.is_dir():
            raise BundleError(f"CORE bundle {source}: no such directory")
        return _find_root(root)
    from filelock import FileLock

    cache = cache_dir or _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(source.encode()).hexdigest()[:16]
    target = cache / name
    with FileLock(str(cache / f"{name}.lock")):
        if (target / ".complete").exists():
            return _find_root(target)
        zpath = _fetch_zip(source, cache / f"{name}.zip", s3_endpoint=s3_endpoint)
        if sha256:
            got = sha256_file(zpath)
            if got != sha256.lower():
                zpath.unlink(missing_ok=True)
                raise BundleError(f"CORE bundle {source}: sha256 mismatch (expected {sha256}, got {got})")
        staging = cache / f"{name}.extract.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with zipfile.ZipFile(zpath) as zf:
                zf.extractall(staging)
        except zipfile.BadZipFile as e:
            zpath.unlink(missing_ok=True)
            raise BundleError(f"CORE bundle {source}: not a zip file ({e})") from e
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        write_atomic(target / ".complete", source + "\n")
        zpath.unlink(missing_ok=True)
        return _find_root(target)


# --------------------------------------------------------------------------- parsing


def read_baselines(path: Path) -> dict[str, float]:
    """``Eval Task`` -> random baseline as a fraction (the CSV gives percent)."""
    if not path.exists():
        raise BundleError(f"{path}: missing (needed for the random baselines)")
    out: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "Eval Task" not in reader.fieldnames or "Random baseline" not in reader.fieldnames:
            raise BundleError(f"{path}: needs columns 'Eval Task' and 'Random baseline' (has {reader.fieldnames})")
        for lineno, row in enumerate(reader, start=2):
            try:
                out[row["Eval Task"].strip()] = float(row["Random baseline"]) / 100.0
            except (TypeError, ValueError) as e:
                raise BundleError(f"{path}:{lineno}: bad 'Random baseline' {row.get('Random baseline')!r}") from e
    return out


def read_reference_csv(path: Path) -> tuple[dict[str, dict[str, float]], float | None]:
    """Per-task accuracy/centered and the printed CORE of one reference CSV (nanochat's format)."""
    tasks: dict[str, dict[str, float]] = {}
    core: float | None = None
    with open(path, newline="", encoding="utf-8") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f) if r]
    for r in rows[1:]:
        if len(r) < 3:
            continue
        if r[0] == "CORE":
            core = float(r[2]) if r[2] else None
        elif r[1] and r[2]:
            tasks[r[0]] = {"accuracy": float(r[1]), "centered": float(r[2])}
    return tasks, core


def _task_from_yaml(entry: Any, i: int, path: Path, baselines: dict[str, float]) -> TaskSpec:
    if not isinstance(entry, dict) or "label" not in entry:
        raise BundleError(f"{path}: icl_tasks[{i}] has no label")
    label = str(entry["label"])
    for key in ("dataset_uri", "icl_task_type", "num_fewshot"):
        if key not in entry:
            raise BundleError(f"{path}: task {label!r} has no field {key!r}")
    ttype = entry["icl_task_type"]
    if ttype not in TASK_TYPES:
        raise BundleError(f"{path}: task {label!r} has icl_task_type {ttype!r}, expected one of {TASK_TYPES}")
    shots = entry["num_fewshot"]
    shots = int(shots[0] if isinstance(shots, list) else shots)  # nanochat uses the first listed value
    if label not in baselines:
        raise BundleError(f"{path}: task {label!r} has no 'Random baseline' row in eval_meta_data.csv")
    return TaskSpec(label=label, dataset_uri=str(entry["dataset_uri"]), task_type=ttype, num_fewshot=shots,
                    delimiter=str(entry.get("continuation_delimiter", " ")), baseline=baselines[label])


def open_bundle(root: Path) -> Bundle:
    """Parse a bundle directory; tasks whose data is missing are listed in ``missing``, not evaluated."""
    cfg_path = root / "core.yaml"
    try:
        spec = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as e:
        raise BundleError(f"{cfg_path}: missing") from e
    except yaml.YAMLError as e:
        raise BundleError(f"{cfg_path}: invalid YAML ({e})") from e
    entries = spec.get("icl_tasks") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise BundleError(f"{cfg_path}: no icl_tasks list")
    baselines = read_baselines(root / "eval_meta_data.csv")
    tasks: list[TaskSpec] = []
    missing: list[MissingTask] = []
    for i, entry in enumerate(entries):
        t = _task_from_yaml(entry, i, cfg_path, baselines)
        if (root / "eval_data" / t.dataset_uri).is_file():
            tasks.append(t)
        else:
            missing.append(MissingTask(t.label, f"data file eval_data/{t.dataset_uri} not found"))
    listed = {m.label for m in missing} | {t.label for t in tasks}
    for label in CORE_TASKS:  # a trimmed core.yaml must not quietly shrink the metric either
        if label not in listed:
            missing.append(MissingTask(label, "not listed in core.yaml"))
    order = {label: i for i, label in enumerate(CORE_TASKS)}
    missing.sort(key=lambda m: order.get(m.label, len(order)))
    refs: dict[str, dict[str, dict[str, float]]] = {}
    ref_core: dict[str, float] = {}
    for p in sorted(root.glob("openai-community-gpt2*.csv")):
        name = p.stem.replace("openai-community-", "")
        refs[name], core = read_reference_csv(p)
        if core is not None:
            ref_core[name] = core
    return Bundle(root=root, tasks=tasks, missing=missing, references=refs, reference_core=ref_core)


def load_bundle(source: str, *, sha256: str = "", cache_dir: Path | None = None, s3_endpoint: str = "") -> Bundle:
    """Fetch (if remote) and parse the bundle at ``source``."""
    return open_bundle(fetch_bundle(source, sha256=sha256, cache_dir=cache_dir, s3_endpoint=s3_endpoint))


def load_task_data(bundle: Bundle, task: TaskSpec) -> list[dict[str, Any]]:
    """All rows of a task's jsonl, validated; a bad row raises naming the file and line."""
    path = bundle.data_path(task)
    need = REQUIRED_FIELDS[task.task_type]
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BundleError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise BundleError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            absent = [k for k in need if k not in row]
            if absent:
                raise BundleError(f"{path}:{lineno}: missing field(s) {absent} for a {task.task_type} task")
            options = row.get("choices") if task.task_type == "multiple_choice" else row.get("context_options")
            if options is not None:
                if not isinstance(options, list) or len(options) < 2:
                    raise BundleError(f"{path}:{lineno}: field 'choices'/'context_options' must list at least 2 options")
                gold = row["gold"]
                if not isinstance(gold, int) or not 0 <= gold < len(options):
                    raise BundleError(f"{path}:{lineno}: field 'gold' = {gold!r} is not an index into {len(options)} options")
            rows.append(row)
    if len(rows) <= task.num_fewshot:
        raise BundleError(f"{path}: {len(rows)} rows, need more than num_fewshot={task.num_fewshot}")
    return rows


def reference_core(bundle: Bundle, model: str, labels: list[str]) -> float | None:
    """A reference model's CORE recomputed over exactly ``labels`` (so CORE-20 compares with CORE-20)."""
    ref = bundle.references.get(model, {})
    vals = [ref[label]["centered"] for label in labels if label in ref]
    if not vals or len(vals) != len(labels):
        return None
    return sum(vals) / len(vals)
