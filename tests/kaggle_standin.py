"""A loopback stand-in for the two Kaggle endpoints a dataset download uses.

With `KAGGLE_API_ENVIRONMENT=TEST`, kagglesdk sends its RPCs to
`http://localhost:7777/api/v1/<service>/<method>`. What `kaggle` 2.2.5 does
for `dataset_download_files` (read from kaggle_api_extended.py and
kagglesdk/kaggle_http_client.py):

1. `POST /api/v1/datasets.DatasetApiService/DownloadDataset`, JSON body
   `{"ownerSlug": ..., "datasetSlug": ...}` (fields at their defaults are
   left out), headers `Content-Type: application/json` and `Authorization`:
   `Basic base64(user:key)` for a legacy key, `Bearer <token>` for a token.
2. Kaggle answers 302 with `Location:` a signed storage URL on another host;
   requests follows it as a `GET` (and drops `Authorization`, the host being
   different), streaming the zip. Errors come back as JSON
   `{"code": 4xx, "message": ...}`.
3. With a token, `authenticate()` first calls
   `POST /api/v1/security.OAuthService/IntrospectToken` with `{"token": ...}`
   and expects `{"active": true, "username": ...}`.

Here the redirect goes to `127.0.0.1:7777` while the API is `localhost:7777`,
so, as with the real storage host, the blob request carries no credentials.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

PORT = 7777
DOWNLOAD = "/api/v1/datasets.DatasetApiService/DownloadDataset"
INTROSPECT = "/api/v1/security.OAuthService/IntrospectToken"


@dataclass
class Request:
    method: str
    path: str
    headers: dict
    body: Optional[dict]


@dataclass
class KaggleStandIn:
    """Serves `datasets` ({"owner/slug": zip bytes}) to the given user."""

    datasets: dict
    username: str
    key: Optional[str] = None
    token: Optional[str] = None
    port: int = PORT
    requests: list = field(default_factory=list)

    def __post_init__(self) -> None:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                standin.requests.append(Request("POST", self.path, dict(self.headers), body))
                if self.path == INTROSPECT:
                    active = standin.token is not None and (body or {}).get("token") == standin.token
                    self._json(200, {"active": active, "username": standin.username if active else ""})
                elif self.path == DOWNLOAD:
                    if not standin.authorized(self.headers.get("Authorization")):
                        self._json(401, {"code": 401, "message": "Unauthenticated"})
                        return
                    name = f"{(body or {}).get('ownerSlug')}/{(body or {}).get('datasetSlug')}"
                    if name not in standin.datasets:
                        self._json(404, {"code": 404, "message": f"Dataset {name} not found"})
                        return
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{standin.port}/blobs/{name}.zip"
                                                 "?X-Goog-Signature=signed-url-signature")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._json(404, {"code": 404, "message": f"no such endpoint {self.path}"})

            def do_GET(self) -> None:
                standin.requests.append(Request("GET", self.path, dict(self.headers), None))
                name = self.path.split("?")[0].removeprefix("/blobs/").removesuffix(".zip")
                data = standin.datasets.get(name)
                if data is None:
                    self._json(404, {"code": 404, "message": "no such blob"})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Last-Modified", email.utils.formatdate(usegmt=True))
                self.send_header("ETag", '"' + hashlib.md5(data).hexdigest() + '"')
                self.end_headers()
                self.wfile.write(data)

            def _json(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)  # OSError if busy
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    def authorized(self, header: Optional[str]) -> bool:
        allowed = set()
        if self.key is not None:
            allowed.add("Basic " + base64.b64encode(f"{self.username}:{self.key}".encode()).decode())
        if self.token is not None:
            allowed.add(f"Bearer {self.token}")
        return header in allowed

    def __enter__(self) -> "KaggleStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
