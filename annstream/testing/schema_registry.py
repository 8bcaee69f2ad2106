"""A small Confluent-compatible Schema Registry over real HTTP(S), in a thread, for tests.

It speaks the endpoints a client of annstream's uses (register, look up under a subject, get by
id, list subjects), answers errors in the registry's JSON form, and can demand basic auth and
serve TLS, so the real `SchemaRegistryClient` is exercised end to end without a JVM.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["FakeSchemaRegistry", "RegistryRequest"]

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


@dataclass(frozen=True)
class RegistryRequest:
    """One request the fake registry answered: method, path (no query), basic-auth user."""

    method: str
    path: str
    user: str


@dataclass
class _State:
    user: str
    password: str
    schemas: dict[int, str] = field(default_factory=dict)  # id -> schema text
    subjects: dict[str, list[int]] = field(default_factory=dict)  # subject -> ids by version
    requests: list[RegistryRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def id_of(self, text: str) -> int | None:
        canonical = _canonical(text)
        return next((i for i, t in self.schemas.items() if _canonical(t) == canonical), None)


def _canonical(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `FakeSchemaRegistry.requests` instead."""

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", _CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: int, message: str) -> None:
        self._reply(status, {"error_code": code, "message": message})

    def _authorised(self, state: _State) -> str | None:
        """The caller's user name, or None after answering 401."""
        header = self.headers.get("Authorization", "")
        user, _, password = "", "", ""
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        if state.user and (user, password) != (state.user, state.password):
            self._error(401, 401, "Unauthorized")
            return None
        return user

    def _handle(self, method: str) -> None:
        state = self.server.state
        path = unquote(urlsplit(self.path).path)
        user = self._authorised(state)
        if user is None:
            return
        body: dict[str, Any] = {}
        if method == "POST":
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
        with state.lock:
            state.requests.append(RegistryRequest(method, path, user))
            self._route(state, method, path, body)

    def _route(self, state: _State, method: str, path: str, body: dict[str, Any]) -> None:
        if method == "GET" and path == "/subjects":
            return self._reply(200, sorted(state.subjects))
        m = re.fullmatch(r"/schemas/ids/(\d+)", path)
        if method == "GET" and m:
            text = state.schemas.get(int(m[1]))
            if text is None:
                return self._error(404, 40403, "Schema not found")
            return self._reply(200, {"schema": text})
        m = re.fullmatch(r"/subjects/([^/]+)/versions", path)
        if method == "POST" and m:
            if body.get("schemaType", "AVRO") != "AVRO":
                return self._error(422, 42201, "Only AVRO schemas here")
            schema_id = state.id_of(body["schema"])
            if schema_id is None:
                schema_id = max(state.schemas, default=0) + 1
                state.schemas[schema_id] = body["schema"]
            versions = state.subjects.setdefault(m[1], [])
            if schema_id not in versions:
                versions.append(schema_id)
            return self._reply(200, {"id": schema_id})
        m = re.fullmatch(r"/subjects/([^/]+)", path)
        if method == "POST" and m:
            if m[1] not in state.subjects:
                return self._error(404, 40401, f"Subject '{m[1]}' not found.")
            schema_id = state.id_of(body["schema"])
            versions = state.subjects[m[1]]
            if schema_id not in versions:
                return self._error(404, 40403, "Schema not found")
            return self._reply(
                200,
                {
                    "subject": m[1],
                    "id": schema_id,
                    "version": versions.index(schema_id) + 1,
                    "schema": state.schemas[schema_id],
                },
            )
        return self._error(404, 404, f"no endpoint {method} {path} here")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: _State) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


class FakeSchemaRegistry:
    """`with FakeSchemaRegistry(user, password, tls=context) as registry:` ... `registry.url`."""

    def __init__(
        self, user: str = "", password: str = "", tls: ssl.SSLContext | None = None
    ) -> None:
        self.state = _State(user, password)
        self._server = _Server(self.state)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-schema-registry", daemon=True
        )

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[RegistryRequest]:
        with self.state.lock:
            return list(self.state.requests)

    def subjects(self) -> dict[str, list[int]]:
        with self.state.lock:
            return {k: list(v) for k, v in self.state.subjects.items()}

    def register(self, subject: str, schema_text: str) -> int:
        """Register ahead, as an operator or CI would before writers start."""
        with self.state.lock:
            schema_id = self.state.id_of(schema_text)
            if schema_id is None:
                schema_id = max(self.state.schemas, default=0) + 1
                self.state.schemas[schema_id] = schema_text
            self.state.subjects.setdefault(subject, []).append(schema_id)
            return schema_id

    def start(self) -> FakeSchemaRegistry:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeSchemaRegistry:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
