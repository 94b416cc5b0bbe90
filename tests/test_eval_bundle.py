"""The CORE bundle: the offline kit (20 tasks, squad/coqa reported missing) and a zip served over HTTP."""

from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from _eval_fakes import write_bundle
from s3_server import S3Bucket, moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

from llm.eval.bundle import CORE_TASKS, BundleError, load_bundle, reference_core
from llm.sources import resolve_source
from llm.storage import Store


def test_offline_kit_is_core_20_with_squad_and_coqa_missing(shared_data):
    # The config's hub URL maps to the mirror's core_eval/ (KILN_DATA_MIRROR is set by conftest).
    from llm.config import EvalConfig

    src = resolve_source(EvalConfig().bundle, "core_eval", "")
    assert Path(src) == (shared_data / "core_eval").resolve()
    b = load_bundle(src)
    assert len(b.tasks) == 20
    assert [m.label for m in b.missing] == ["squad", "coqa"]
    assert b.label == "CORE-20 (squad, coqa missing)"
    assert {t.label for t in b.tasks} == set(CORE_TASKS) - {"squad", "coqa"}
    hs = b.task("hellaswag")
    assert (hs.task_type, hs.num_fewshot, hs.baseline) == ("multiple_choice", 10, 0.25)
    assert b.task("jeopardy").delimiter == "\nAnswer: " and b.task("copa").delimiter == " "
    # GPT-2 references: the CSV's own 22-task CORE, and a 20-task mean for a like-for-like comparison
    assert set(b.references) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    assert b.reference_core["gpt2"] == pytest.approx(0.113891)
    core20 = reference_core(b, "gpt2", [t.label for t in b.tasks])
    vals = [v["centered"] for k, v in b.references["gpt2"].items() if k not in ("squad", "coqa")]
    assert core20 == pytest.approx(sum(vals) / 20) and core20 != pytest.approx(0.113891)


def test_task_listed_but_without_data_is_reported_and_excluded(tmp_path: Path):
    root = write_bundle(tmp_path / "b", [
        {"label": "copa", "type": "multiple_choice", "rows": [{"query": "q", "choices": ["a", "b"], "gold": 0}] * 3},
        {"label": "squad", "type": "language_modeling", "rows": None},  # listed, no file
    ], {"copa": 50, "squad": 0})
    b = load_bundle(str(root))
    assert [t.label for t in b.tasks] == ["copa"]
    squad = next(m for m in b.missing if m.label == "squad")
    assert squad.reason == "data file eval_data/misc/squad.jsonl not found"
    assert b.label.startswith("CORE-1 (")


def test_missing_baseline_names_the_task(tmp_path: Path):
    root = write_bundle(tmp_path / "b", [{"label": "x", "type": "schema", "rows": []}], {"y": 0})
    with pytest.raises(BundleError, match=r"core\.yaml: task 'x' has no 'Random baseline'"):
        load_bundle(str(root))


class _Server:
    """A real HTTP server on 127.0.0.1 serving one zip, failing the first ``fail_first`` requests with 503."""

    def __init__(self, payload: bytes, fail_first: int = 0):
        self.payload, self.fail_left, self.requests = payload, fail_first, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests += 1
                if outer.fail_left > 0:
                    outer.fail_left -= 1
                    self.send_error(503)
                    return
                if self.path != "/eval_bundle.zip":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                self.wfile.write(outer.payload)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _zip_dir(src: Path, dest: Path, top: str = "eval_bundle") -> bytes:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, f"{top}/{p.relative_to(src).as_posix()}")
    return dest.read_bytes()


def test_bundle_from_url_zip_with_checksum_retries_and_cache(tmp_path: Path):
    rows = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(4)]
    src = write_bundle(tmp_path / "src", [{"label": "copa", "type": "multiple_choice", "rows": rows}], {"copa": 50})
    payload = _zip_dir(src, tmp_path / "b.zip")
    digest = hashlib.sha256(payload).hexdigest()
    server = _Server(payload, fail_first=2)  # two 503s, then success: retried, not fatal
    try:
        url = f"{server.url}/eval_bundle.zip"
        with pytest.raises(BundleError, match="sha256 mismatch"):
            load_bundle(url, sha256="0" * 64, cache_dir=tmp_path / "cache")
        b = load_bundle(url, sha256=digest, cache_dir=tmp_path / "cache")
        assert [t.label for t in b.tasks] == ["copa"] and b.root.name == "eval_bundle"
        assert (b.root / "eval_data" / "misc" / "copa.jsonl").read_text() == (src / "eval_data/misc/copa.jsonl").read_text()
        with pytest.raises(BundleError, match="HTTP 404"):
            load_bundle(f"{server.url}/nope.zip", cache_dir=tmp_path / "cache")
    finally:
        server.close()
    # extracted once, then served from the cache without the network
    again = load_bundle(url, sha256=digest, cache_dir=tmp_path / "cache")
    assert again.root == b.root
    # The fingerprint names the content, not the place: the zip from the URL and the directory agree.
    assert again.fingerprint() == load_bundle(str(src)).fingerprint()


def test_bundle_zip_from_s3_and_a_local_path_through_the_fetcher(tmp_path: Path, s3_bucket: S3Bucket):
    """S3 and local zips come through llm.fetch like the URL one: fetched, checked, extracted, cached;
    a key or file that is not there names the bundle and the file, before anything is extracted."""
    rows = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(4)]
    src = write_bundle(tmp_path / "src", [{"label": "copa", "type": "multiple_choice", "rows": rows}], {"copa": 50})
    _zip_dir(src, tmp_path / "b.zip")
    Store(s3_bucket.uri).put(tmp_path / "b.zip", f"{s3_bucket.uri}/core/eval_bundle.zip")
    want = load_bundle(str(src)).fingerprint()
    for source in (f"{s3_bucket.uri}/core/eval_bundle.zip", str(tmp_path / "b.zip")):
        b = load_bundle(source, cache_dir=tmp_path / "cache", s3_endpoint=s3_bucket.endpoint)
        assert [t.label for t in b.tasks] == ["copa"] and b.fingerprint() == want
    assert not list((tmp_path / "cache").glob("*.zip"))  # the zips were removed once extracted
    for missing in (f"{s3_bucket.uri}/core/nope.zip", str(tmp_path / "nope.zip")):
        with pytest.raises(BundleError, match=rf"CORE bundle {missing}: no such file"):
            load_bundle(missing, cache_dir=tmp_path / "cache", s3_endpoint=s3_bucket.endpoint)


def test_fingerprint_changes_when_an_evaluated_file_changes(tmp_path: Path):
    rows = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(4)]
    src = write_bundle(tmp_path / "src", [{"label": "copa", "type": "multiple_choice", "rows": rows}], {"copa": 50})
    before = load_bundle(str(src)).fingerprint()
    assert load_bundle(str(src)).fingerprint() == before  # stable
    data = src / "eval_data" / "misc" / "copa.jsonl"
    data.write_text(data.read_text().replace('"gold": 1', '"gold": 0', 1))
    assert load_bundle(str(src)).fingerprint() != before


def test_mirror_wins_over_url(shared_data):
    assert resolve_source("https://example.invalid/eval_bundle.zip", "core_eval", str(shared_data)).endswith("core_eval")
