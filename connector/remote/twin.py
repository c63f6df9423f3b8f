"""Machinery shared by the local HTTPS twins of Partner Center, the identity provider, Salesforce and
Dataverse: a certificate authority made at start (trustme), a threaded HTTPS server, a controllable
clock, a request log for counting calls, and fault injection.

A twin subclasses :class:`Twin` and implements :meth:`Twin.handle`. Twins must be at least as strict
as the documented API (eTags, paging, expiry, errors), or the tests that use them prove nothing.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme

from connector.remote.http import json_bytes

__all__ = ["Clock", "Fault", "Twin", "TwinCA", "TwinRequest", "TwinResponse"]


class TwinCA:
    """A throwaway certificate authority; its PEM is what the connector's ``ca_bundle`` points at."""

    def __init__(self) -> None:
        self._ca = trustme.CA()

    def write_pem(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._ca.cert_pem.bytes())
        return path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self._ca.configure_trust(ctx)
        return ctx


class Clock:
    """The twin's notion of now (aware UTC). Tests move it forward to expire tokens and referrals."""

    def __init__(self, start: datetime | None = None) -> None:
        self._offset = timedelta(0)
        self._frozen = start
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            base = self._frozen if self._frozen is not None else datetime.now(UTC)
            return base + self._offset

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._offset += delta


@dataclass(frozen=True)
class TwinRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None

    def form(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.body.decode("utf-8"), keep_blank_values=True).items()}

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass
class TwinResponse:
    status: int = 200
    body: Any = None  # dict/list -> JSON; bytes/str -> as is
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> tuple[bytes, str]:
        if self.body is None:
            return b"", ""
        if isinstance(self.body, bytes):
            return self.body, self.headers.get("Content-Type", "application/octet-stream")
        if isinstance(self.body, str):
            return self.body.encode("utf-8"), self.headers.get("Content-Type", "text/plain; charset=utf-8")
        return json_bytes(self.body), "application/json; charset=utf-8"


@dataclass
class Fault:
    """An injected failure: answer the next ``times`` matching requests with this response instead."""

    response: TwinResponse
    times: int = 1
    match: Callable[[TwinRequest], bool] = lambda _r: True


class Twin:
    """Base of every twin: HTTPS server, request log, faults. Subclasses implement :meth:`handle`."""

    name = "twin"

    def __init__(self, ca: TwinCA, *, clock: Clock | None = None, port: int = 0) -> None:
        self.ca = ca
        self.clock = clock or Clock()
        self.requests: list[TwinRequest] = []
        self._faults: list[Fault] = []
        self._lock = threading.RLock()
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- to implement -----------------------------------------------------------------------------
    def handle(self, request: TwinRequest) -> TwinResponse:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- lifecycle --------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._server is not None, "twin not started"
        return f"https://localhost:{self._server.server_address[1]}"

    def start(self) -> Twin:
        twin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two writes; with Nagle on, the body waits for the client's
            # delayed ACK (~40 ms on Linux) on every keep-alive response.
            disable_nagle_algorithm = True

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                request = TwinRequest(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                response = twin._dispatch(request)
                payload, content_type = response.encode()
                self.send_response(response.status)
                if content_type and "Content-Type" not in response.headers:
                    self.send_header("Content-Type", content_type)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if payload and self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

            def date_time_string(self, timestamp: float | None = None) -> str:
                # The Date header follows the twin's clock: clients that read the server's time
                # (Salesforce signposts, crm-apis.md §A.3) must see the clock tests move.
                return formatdate(twin.clock.now().timestamp(), usegmt=True)

            def log_message(self, format: str, *args: Any) -> None:
                return  # the twin keeps its own request log; stderr noise helps nobody

        server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        server.daemon_threads = True
        server.socket = self.ca.server_context().wrap_socket(server.socket, server_side=True)
        self._server = server
        # A short poll interval: stop() waits up to one interval, and tests start and stop twins often.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"{self.name}-twin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Twin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults and logging -----------------------------------------------------------------------
    def inject(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    @contextmanager
    def faults(self, *faults: Fault) -> Iterator[None]:
        for fault in faults:
            self.inject(fault)
        try:
            yield
        finally:
            with self._lock:
                self._faults = [f for f in self._faults if f not in faults]

    def calls(self, method: str | None = None, path_prefix: str = "") -> list[TwinRequest]:
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and r.path.startswith(path_prefix)
            ]

    def _dispatch(self, request: TwinRequest) -> TwinResponse:
        with self._lock:
            self.requests.append(request)
            for fault in self._faults:
                if fault.times > 0 and fault.match(request):
                    fault.times -= 1
                    return fault.response
        try:
            return self.handle(request)
        except Exception as exc:  # noqa: BLE001 - a twin bug must answer 500, not hang the client
            return TwinResponse(500, {"error": f"twin failure: {type(exc).__name__}: {exc}"})
