"""The daemon's small HTTP server: ``/healthz``, ``/readyz`` and ``/metrics``.

stdlib ``ThreadingHTTPServer`` in a daemon thread: three read-only endpoints need no framework.

- ``/healthz``: the process is alive and serving (200). What the container HEALTHCHECK and a
  liveness probe ask; it never touches the state store, so a database outage does not get the
  process restarted in a loop.
- ``/readyz``: the state store answers a ping, plus each connection's last run (from the store) and
  the daemon's view of it (failures in a row, back-off). 503 when the store is unreachable; a
  failing connection does not make the daemon unready (the others still sync), it is reported.
- ``/metrics``: the Prometheus text format of the daemon's own registry.
- ``POST webhook.path[/<connection>]`` (only when ``webhook.enabled``): Partner Center's signed
  referral events, verified and acted on by :class:`connector.daemon.webhook.WebhookReceiver`.

Error texts go through the log redaction (tokens, e-mail addresses) before they are served.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog

from connector.daemon.metrics import CONTENT_TYPE_LATEST, Metrics
from connector.errors import CosellError
from connector.logs import redact
from connector.state import StateStore

if TYPE_CHECKING:
    from connector.daemon.webhook import WebhookReceiver

__all__ = ["HealthServer"]

log = structlog.get_logger(__name__)

StatusProvider = Callable[[], Mapping[str, Mapping[str, Any]]]


class HealthServer:
    """Serves the three endpoints on ``host:port`` (port 0 picks a free one; see :attr:`port`)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        store: StateStore,
        metrics: Metrics,
        connections: list[str],
        status: StatusProvider | None = None,
        webhook: WebhookReceiver | None = None,
    ) -> None:
        self.store = store
        self.webhook = webhook
        self.metrics = metrics
        self.connections = connections
        self._status = status or (lambda: {})
        server = self
        handler = type("Handler", (_Handler,), {"owner": server})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> HealthServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="cosell-http", daemon=True
        )
        self._thread.start()
        paths = ["/healthz", "/readyz", "/metrics"] + ([self.webhook.path] if self.webhook else [])
        log.info("http.listening", host=self.host, port=self.port, paths=paths)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the answers ------------------------------------------------------------------------------

    def readiness(self) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"status": "ready", "store": "ok", "connections": {}}
        try:
            self.store.ping()
        except CosellError as exc:
            body.update(status="not ready", store=_safe(f"unreachable: {exc}"))
            return 503, body
        daemon = self._status()
        for name in self.connections:
            entry: dict[str, Any] = {}
            try:
                last = self.store.last_run(name)
            except CosellError as exc:
                body.update(status="not ready", store=_safe(f"unreachable: {exc}"))
                return 503, body
            if last is not None:
                entry["last_run"] = {
                    "run_id": last.run_id,
                    "outcome": last.outcome,
                    "started_at": last.started_at.isoformat(timespec="seconds"),
                    "finished_at": last.finished_at.isoformat(timespec="seconds")
                    if last.finished_at
                    else None,
                    "error": _safe(last.error) or None,
                }
            else:
                entry["last_run"] = None
            for key, value in daemon.get(name, {}).items():
                entry[key] = _safe(value) if isinstance(value, str) else value
            body["connections"][name] = entry
        return 200, body


def _safe(text: str) -> str:
    """The log redaction applied to a text served over HTTP."""
    return str(redact(None, "", {"text": text})["text"])


class _Handler(BaseHTTPRequestHandler):
    owner: HealthServer
    server_version = "cosell"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/readyz":
                status, body = self.owner.readiness()
                self._send(status, json.dumps(body, indent=2).encode() + b"\n", "application/json")
            elif path == "/metrics":
                self._send(200, self.owner.metrics.render(), CONTENT_TYPE_LATEST)
            elif self.owner.webhook is not None and self.owner.webhook.handles(path):
                self._send(405, b"POST only\n", "text/plain; charset=utf-8", allow="POST")
            else:
                self._send(
                    404, b"not found: try /healthz, /readyz or /metrics\n", "text/plain; charset=utf-8"
                )
        except Exception:  # one bad answer must not take the server thread down
            log.exception("http.error", path=path)
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        webhook = self.owner.webhook
        if webhook is None or not webhook.handles(path):
            self.close_connection = True  # the unread body must not be taken for the next request
            self._send(404, b"not found\n", "text/plain; charset=utf-8")
            return
        try:
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, body = webhook.handle(path, headers, self.rfile)
        except Exception:  # a bug must answer 500 (Partner Center retries), not kill the thread
            log.exception("http.error", path=path)
            status, body = 500, {"error": "internal"}
        if status >= 400:
            self.close_connection = True  # a refused body may be left unread on the socket
        self._send(status, json.dumps(body).encode() + b"\n", "application/json")

    def _send(self, status: int, payload: bytes, content_type: str, *, allow: str | None = None) -> None:
        self.send_response(status)
        if allow:
            self.send_header("Allow", allow)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        return  # probes hit these endpoints every few seconds; access lines would drown the run logs
