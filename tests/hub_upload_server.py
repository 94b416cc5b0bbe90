"""A local stand-in for the Hugging Face hub's model *upload* endpoints (a test helper).

What ``huggingface_hub.HfApi.create_repo`` + ``upload_folder`` call, on 127.0.0.1 and a random port:

  POST /api/repos/create                              ``{"name", "organization", "type", ...}``: 200
       ``{"url": ...}``, or 409 when the repo exists (``exist_ok=True`` accepts that)
  POST /api/validate-yaml                             the README's front matter: 200, no errors
  POST /api/models/<owner>/<name>/preupload/<rev>     every file answered ``"uploadMode": "regular"``
  POST /api/models/<owner>/<name>/commit/<rev>        the NDJSON commit: each ``file`` line's base64
       content is stored in ``repos[repo][path]``; 200 ``{"commitUrl", "commitOid"}``

With ``token`` set, a request without ``Authorization: Bearer <token>`` gets 401. Every request's
Authorization header is kept in ``auth`` (to check what was sent, and that nothing else was).

Boundary: every file is inline ("regular"), so the hub's Xet/LFS transfer, which the real hub asks for
``model.safetensors``, is not served here; the client's side of that protocol is not exercised.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from loopback import LoopbackHTTPServer


@dataclass
class HubUploadServer(LoopbackHTTPServer):
    token: str | None = None
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    auth: list[str | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def start(self) -> "HubUploadServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._serve(Handler, "hub-upload-server")
        return self


class _Handler(BaseHTTPRequestHandler):
    hub: HubUploadServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?", 1)[0]
        with self.hub._lock:
            self.hub.auth.append(self.headers.get("Authorization"))
            self.hub.paths.append(path)
        if self.hub.token is not None and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            self._send(401, {"error": "Invalid credentials in Authorization header"})
            return
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req.get('organization')}/{req['name']}" if req.get("organization") else req["name"]
            with self.hub._lock:
                exists = repo in self.hub.repos
                self.hub.repos.setdefault(repo, {})
            self._send(409 if exists else 200, {"error": "You already created this model repo"} if exists
                       else {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
        elif path == "/api/validate-yaml":
            self._send(200, {"errors": [], "warnings": []})
        elif path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]})
        elif path.startswith("/api/models/") and "/commit/" in path:
            repo = path[len("/api/models/"):].split("/commit/")[0]
            if repo not in self.hub.repos:
                self._send(404, {"error": "Repository not found"})
                return
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    with self.hub._lock:
                        self.hub.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            oid = hashlib.sha1(body).hexdigest()
            self._send(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}", "commitOid": oid})
        else:
            self._send(404, {"error": f"no such endpoint {path}"})
