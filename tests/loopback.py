"""The lifecycle every test HTTP server here shares: a threaded server on 127.0.0.1, random port."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackHTTPServer:
    """Mixin: ``start()`` builds a handler class and calls :meth:`_serve`; the rest is here."""

    _httpd: ThreadingHTTPServer | None = None

    def start(self) -> "LoopbackHTTPServer":  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} must define start()")

    def _serve(self, handler: type[BaseHTTPRequestHandler], name: str) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True  # a stalled response must not block shutdown
        # A short poll so shutdown() returns at once instead of after the default 0.5 s.
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=name,
                         daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
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
