"""One HTTP plumbing for every remote seam: auth header, one refresh on 401, retries, call counting.

Partner Center and Dataverse (and Salesforce's OAuth calls) go through :class:`ApiSession`; the
seams only add their own headers and classify the statuses that mean something to them
(412 -> conflict, 400 -> record error, ...). Transient statuses are classified here, once:

- 429 -> :class:`RateLimited` with ``Retry-After`` (Dataverse service protection, Partner Center throttling)
- 500, 502, 503, 504 and transport errors -> :class:`RetryLater`
- 401 -> refresh the token once and resend; a second 401 is returned to the caller

Headers the caller sets (e.g. ``MS-RequestId``) are built once per logical operation and so are
identical on every retry: a retried POST carries the same idempotency key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import structlog

from connector.errors import RateLimited, RetryLater
from connector.remote.calls import CallCounter
from connector.remote.http import TlsTrustError, is_tls_failure, tls_hint
from connector.remote.retry import RetryPolicy, parse_retry_after
from connector.remote.tokens import TokenProvider

__all__ = ["TRANSIENT_STATUSES", "ApiSession"]

TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})
log = structlog.get_logger(__name__)


class ApiSession:
    """Sends requests for one remote system with auth, retry and counting."""

    def __init__(
        self,
        system: str,
        http: httpx.Client,
        *,
        tokens: TokenProvider | None = None,
        policy: RetryPolicy | None = None,
        calls: CallCounter | None = None,
    ) -> None:
        self.system = system
        self.http = http
        self.tokens = tokens
        self.policy = policy or RetryPolicy()
        self.calls = calls or CallCounter()

    def request(
        self,
        operation: str,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | str | None = None,
        record_id: str = "",
    ) -> httpx.Response:
        """Send with retries; returns the final response (any non-transient status) or raises
        :class:`RetryLater` / :class:`RateLimited` once the retry budget is spent."""
        if self.policy.max_attempts == 1:  # the caller runs the retry loop (a create): no second one
            return self._send_with_auth(operation, method, url, headers, params, json, content, record_id)
        for attempt in self.policy.retrying():
            with attempt:
                return self._send_with_auth(operation, method, url, headers, params, json, content, record_id)
        raise AssertionError("unreachable: tenacity re-raises")  # pragma: no cover

    def _send_with_auth(
        self,
        operation: str,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, Any] | None,
        json: Any,
        content: bytes | str | None,
        record_id: str,
    ) -> httpx.Response:
        response = self._send_once(operation, method, url, headers, params, json, content, record_id, False)
        if response.status_code == 401 and self.tokens is not None:
            # Tokens expire mid-run (crm-apis.md §C; prior-art failure class 5): refresh once, resend.
            response = self._send_once(
                operation, method, url, headers, params, json, content, record_id, True
            )
        return response

    def _send_once(
        self,
        operation: str,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, Any] | None,
        json: Any,
        content: bytes | str | None,
        record_id: str,
        refresh: bool,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if self.tokens is not None:
            all_headers["Authorization"] = f"Bearer {self.tokens.token(force_refresh=refresh)}"
        try:
            response = self.http.request(
                method, url, headers=all_headers, params=params, json=json, content=content
            )
        except httpx.TransportError as exc:
            self.calls.record(self.system, operation, "error")
            if is_tls_failure(exc):
                # An untrusted certificate does not heal with retries: say how to fix it instead.
                host = httpx.URL(url).host or self.http.base_url.host
                raise TlsTrustError(f"{self.system} {operation}: {tls_hint(host)}") from exc
            raise RetryLater(
                f"{self.system} {operation}{' for ' + record_id if record_id else ''}: "
                f"connection failed ({type(exc).__name__})",
                system=self.system,
            ) from exc
        # httpx leaves every response in a reference cycle (the response's stream refers back to
        # it), so its body is freed only when the garbage collector runs — rarely, once the process
        # is settled (connector/process.py): a full reconciliation of 100,000 deals had 36 listing
        # pages (80 MB) waiting for it. The body is read already (no streaming here); a plain
        # stream in its place breaks the cycle and reference counting frees the response.
        response.stream = httpx.ByteStream(response.content)
        self.calls.record(self.system, operation, response.status_code)
        status = response.status_code
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            log.info("throttled", system=self.system, operation=operation, retry_after=retry_after)
            raise RateLimited(
                f"{self.system} throttled {operation}{' for ' + record_id if record_id else ''}",
                system=self.system,
                retry_after=retry_after,
            )
        if status in TRANSIENT_STATUSES:
            raise RetryLater(
                f"{self.system} {operation}{' for ' + record_id if record_id else ''}: HTTP {status}",
                system=self.system,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        return response
