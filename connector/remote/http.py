"""One place that builds every HTTP client the connector uses, all honouring one ``ca_bundle``.

Why this exists: this machine and many corporate hosts export ``REQUESTS_CA_BUNDLE`` /
``SSL_CERT_FILE``. requests (simple-salesforce, msal's default client) then silently ignores
``session.verify`` unless ``trust_env`` is off, and httpx reads ``SSL_CERT_FILE`` on its own
(crm-apis.md §D). So every client is built here from the connector's single setting.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import httpx
import orjson
import requests

from connector import __version__
from connector.errors import ConfigError

__all__ = [
    "USER_AGENT",
    "TlsTrustError",
    "http_client",
    "is_tls_failure",
    "json_bytes",
    "requests_session",
    "ssl_context",
    "tls_hint",
]

USER_AGENT = f"cosell/{__version__}"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


def json_bytes(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON, as the services write it: request bodies, and the twins'
    answers. orjson writes it in a tenth of the json module's time (a create body per referral of
    an initial sync; half of the twins' CPU was encoding their answers); a value it cannot write
    (an integer beyond 64 bits) goes through the json module, which can."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value).encode("utf-8")


def ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """A verifying context: the given PEM bundle when set, else the system store (not env vars)."""
    if ca_bundle is not None:
        return ssl.create_default_context(cafile=str(ca_bundle))
    import certifi  # installed with httpx and requests

    return ssl.create_default_context(cafile=certifi.where())


def http_client(
    ca_bundle: Path | None,
    *,
    base_url: str = "",
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    headers: dict[str, str] | None = None,
    event_hooks: dict[str, list[object]] | None = None,
) -> httpx.Client:
    """An httpx client that trusts exactly ``ca_bundle`` (or the default store) and no env vars."""
    return httpx.Client(
        base_url=base_url,
        verify=ssl_context(ca_bundle),
        trust_env=False,
        timeout=timeout,
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        event_hooks=event_hooks or {},  # type: ignore[arg-type]
    )


def requests_session(ca_bundle: Path | None, *, proxies: dict[str, str] | None = None) -> requests.Session:
    """A requests session for simple-salesforce that honours ``ca_bundle`` despite CA env vars.

    ``trust_env=False`` also drops proxy env vars and ``.netrc``, so proxies come from configuration.
    """
    session = requests.Session()
    session.trust_env = False
    session.verify = str(ca_bundle) if ca_bundle is not None else True
    if proxies:
        session.proxies.update(proxies)
    session.headers["User-Agent"] = USER_AGENT
    return session


class TlsTrustError(ConfigError):
    """A server's certificate is not trusted by the configured CA bundle: retrying cannot help."""


def is_tls_failure(exc: BaseException) -> bool:
    """Whether a transport error (or anything in its cause chain) is a certificate verification failure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def tls_hint(host: str) -> str:
    """The operator-facing fix for :class:`TlsTrustError`."""
    return (
        f"the certificate presented by {host} is not trusted by this host. If it is signed by a private CA "
        "(a TLS-inspecting proxy, the sandbox twins), set tls.ca_bundle to that CA's PEM file"
    )
