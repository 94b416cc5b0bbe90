"""A real S3 API on loopback for tests: ``moto_server`` as a subprocess, plus a fault-injecting proxy.

Use from a test module (importing the fixtures registers them there; conftest.py is untouched)::

    from s3_server import moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

    def test_x(s3_bucket):          # a fresh bucket; AWS_* env points boto3 at the server
        Store(f"s3://{s3_bucket.name}/root").put_bytes(b"x", ...)

``moto_server`` (session scope) yields the endpoint URL of one ``python -m moto.server`` process
on 127.0.0.1. ``s3_bucket`` (function scope) sets AWS_ENDPOINT_URL, dummy credentials and the
region in the environment, creates a uniquely named bucket and yields an :class:`S3Bucket`.

:class:`FaultProxy` sits between boto3 and moto and answers the first N matching requests with
an HTTP error (e.g. 500 or 403) before forwarding the rest, so retry policy is tested against
real HTTP responses, not an in-process mock.
"""

from __future__ import annotations

import fnmatch
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class MotoServer:
    """``python -m moto.server`` on a free loopback port, stopped by its own process handle."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoServer":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)
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
class FaultProxy(LoopbackHTTPServer):
    """An HTTP reverse proxy to ``target`` that answers matching requests with injected errors."""

    target: str
    faults: list[ProxyFault] = field(default_factory=list)
    log: list[tuple[str, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

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
