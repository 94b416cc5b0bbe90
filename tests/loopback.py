"""The lifecycle every test HTTP server here shares: a threaded server on 127.0.0.1, random port."""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    """A threaded server that remembers its open connections, so :meth:`close_connections` can end them.

    Clients pool keep-alive connections (one ``requests.Session`` per thread in the downloader, kept
    across tests). A handler thread serves its connection until the client closes it, even after
    the server stopped listening; if a later test's server is given the same port (the kernel may
    hand a freed port out again), a pooled connection would reach the *old* server's handler, its
    faults and its request log. Closing every connection at stop makes clients reconnect instead.
    """

    daemon_threads = True  # a stalled response must not block shutdown

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # type: ignore[override]
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            conns, self._open = list(self._open), set()
        for conn in conns:  # the client sees EOF; its handler thread reads EOF and ends
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class LoopbackHTTPServer:
    """Mixin: ``start()`` builds a handler class and calls :meth:`_serve`; the rest is here."""

    _httpd: _Server | None = None

    def start(self) -> "LoopbackHTTPServer":  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} must define start()")

    def _serve(self, handler: type[BaseHTTPRequestHandler], name: str) -> None:
        self._httpd = _Server(("127.0.0.1", 0), handler)
        # A short poll so shutdown() returns at once instead of after the default 0.5 s.
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=name,
                         daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()  # no new connections after this returns
            self._httpd.close_connections()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"
