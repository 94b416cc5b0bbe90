"""A real S3 API on loopback for tests: ``moto_server`` as a subprocess, plus a fault-injecting proxy.

Use from a test module (importing the fixtures registers them there; conftest.py is untouched)::

    from s3_server import moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

    def test_x(s3_bucket):          # a fresh bucket; AWS_* env points boto3 at the server
        Store(f"s3://{s3_bucket.name}/root").put_bytes(b"x", ...)

``moto_server`` (session scope) yields the endpoint URL of one moto server process on 127.0.0.1
(the port is bound by that process itself: no free-port guess that another process could take
first). ``s3_bucket`` (function scope) sets AWS_ENDPOINT_URL, dummy credentials and the region in
the environment, creates a uniquely named bucket and yields an :class:`S3Bucket`.

:class:`FaultProxy` sits between boto3 and moto and answers the first N matching requests with
an HTTP error (e.g. 500 or 403) before forwarding the rest, so retry policy is tested against
real HTTP responses, not an in-process mock. :meth:`FaultProxy.add_hang` holds matching requests
unanswered instead (an upload in flight when its machine dies), and tells the test when one came.
"""

from __future__ import annotations

import fnmatch
import http.client
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from loopback import LoopbackHTTPServer

CREDENTIAL_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


# Runs in the server process: bind port 0 (the kernel picks a free port and it is ours at once), then
# publish the port through a file, renamed into place so the parent never reads half of it.
_MOTO_MAIN = """
import os, sys, threading
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
path = sys.argv[1]
with open(path + ".tmp", "w") as f:
    f.write(str(server.get_host_and_port()[1]))
os.replace(path + ".tmp", path)
threading.Event().wait()
"""


class MotoServer:
    """A moto S3 server in its own process on a loopback port it bound itself; stopped by its process handle.

    (Picking a free port here and passing it to ``python -m moto.server`` left a window in which
    another process could take the port, and a health check would then have found that process.)
    """

    def __init__(self) -> None:
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        assert self.port is not None, "server not started"
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "MotoServer":
        with tempfile.TemporaryDirectory(prefix="kiln-moto-") as tmp:
            port_file = Path(tmp) / "port"
            log = self._log = tempfile.TemporaryFile()  # its stderr, shown if it fails to start
            self.proc = subprocess.Popen([sys.executable, "-c", _MOTO_MAIN, str(port_file)],
                                         stdout=subprocess.DEVNULL, stderr=log)
            deadline = time.monotonic() + timeout
            while not port_file.exists():
                if self.proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"moto server exited with code {self.proc.returncode}:\n"
                                       f"{log.read().decode(errors='replace')[-3000:]}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"moto server did not start within {timeout:.0f}s")
                time.sleep(0.05)
            self.port = int(port_file.read_text())
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class S3Bucket:
    name: str
    endpoint: str

    @property
    def uri(self) -> str:
        return f"s3://{self.name}"

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    server = MotoServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[S3Bucket]:
    for k, v in CREDENTIAL_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    # No developer's ~/.aws files leak into the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    bucket = S3Bucket(name=f"kiln-{uuid.uuid4().hex[:12]}", endpoint=moto_server)
    bucket.client().create_bucket(Bucket=bucket.name)
    yield bucket


# --------------------------------------------------------------------------- fault-injecting proxy


@dataclass
class ProxyFault:
    status: int
    method: str = "*"
    match: str = "*"  # glob on the URL path
    times: int | None = 1
    code: str = ""  # the S3 error code in the XML body; default by status
    hits: int = 0


@dataclass
class Hang:
    """Requests matching ``method``/``match`` are read and then held without an answer or a forward.

    ``arrived`` is set when the first one comes in. :meth:`release` (or stopping the proxy) closes
    their connections, still unanswered and never forwarded: what the server saw of an upload whose
    sender died is the requests before it.
    """

    method: str = "*"
    match: str = "*"  # glob on the URL path
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class FaultProxy(LoopbackHTTPServer):
    """An HTTP reverse proxy to ``target`` that answers matching requests with injected errors."""

    target: str
    faults: list[ProxyFault] = field(default_factory=list)
    hangs: list[Hang] = field(default_factory=list)
    log: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status; 0 = held)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add_hang(self, method: str = "*", match: str = "*") -> Hang:
        """Hold every matching request unanswered (see :class:`Hang`); wait on ``.arrived`` to sync with one."""
        h = Hang(method=method, match=match)
        with self._lock:
            self.hangs.append(h)
        return h

    def _hang_for(self, method: str, path: str) -> Hang | None:
        with self._lock:
            return next((h for h in self.hangs if fnmatch.fnmatch(method, h.method) and fnmatch.fnmatch(path, h.match)),
                        None)

    def stop(self) -> None:
        with self._lock:
            hangs = list(self.hangs)
        for h in hangs:  # let held handler threads end (their connections close unanswered)
            h.release()
        super().stop()

    def add_fault(self, status: int, method: str = "*", match: str = "*", times: int | None = 1, code: str = "") -> ProxyFault:
        f = ProxyFault(status=status, method=method, match=match, times=times, code=code)
        with self._lock:
            self.faults.append(f)
        return f

    def _take(self, method: str, path: str) -> ProxyFault | None:
        with self._lock:
            for f in self.faults:
                if fnmatch.fnmatch(method, f.method) and fnmatch.fnmatch(path, f.match) and (f.times is None or f.hits < f.times):
                    f.hits += 1
                    return f
        return None

    def count(self, method: str = "*", match: str = "*") -> int:
        with self._lock:
            return sum(1 for m, p, _ in self.log if fnmatch.fnmatch(m, method) and fnmatch.fnmatch(p, match))

    def start(self) -> "FaultProxy":
        proxy = self
        target = urlsplit(self.target)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                path = urlsplit(self.path).path
                hang = proxy._hang_for(self.command, path)
                if hang is not None:
                    with proxy._lock:
                        proxy.log.append((self.command, path, 0))
                    hang.arrived.set()
                    hang.released.wait()
                    self.close_connection = True  # no answer, nothing forwarded
                    return
                fault = proxy._take(self.command, path)
                if fault is not None:
                    code = fault.code or {500: "InternalError", 503: "SlowDown", 403: "AccessDenied", 404: "NoSuchKey"}.get(fault.status, "Error")
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>injected</Message></Error>").encode()
                    with proxy._lock:  # logged before answering: the client may check the log at once
                        proxy.log.append((self.command, path, fault.status))
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in {"transfer-encoding", "connection"}}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    with proxy._lock:
                        proxy.log.append((self.command, path, resp.status))
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in {"transfer-encoding", "connection", "content-length"}:
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length if length is not None else str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

        self._serve(Handler, "s3-fault-proxy")
        return self


def env_for(endpoint: str) -> dict[str, str]:
    """Environment for a subprocess that should talk to ``endpoint`` (e.g. a `kiln` CLI run)."""
    return {**os.environ, **CREDENTIAL_ENV, "AWS_ENDPOINT_URL": endpoint}
