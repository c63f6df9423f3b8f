"""Partner Center webhook receiver: the optional near-real-time path of ``cosell run``.

Partner Center POSTs a small event (``EventName``, ``ResourceUri``, ``ResourceName``, ``AuditUri``,
``ResourceChangeUtcDate``; partner-center-api.md §10) when a referral is created or updated. The
event carries no referral data, so a verified referral event only asks the daemon for a targeted
sync of that referral (``engine.run(referral_id=...)``); the scheduled poll stays the backstop for
anything missed (Partner Center gives up after 10 attempts, and nothing arrives while the daemon is
down).

Every event is signed; the checks follow Microsoft's "Authenticate the callback" steps
(https://learn.microsoft.com/partner-center/developer/partner-center-webhooks):

1. ``X-MS-Signature-Algorithm`` must be ``rsa-sha256``; ``X-MS-Certificate-Url`` and the signature
   (``Authorization: Signature <base64>``, or ``x-ms-signature`` when the registration set
   ``SignatureTokenToMsSignatureHeader``) must be present;
2. the certificate URL must be HTTPS on an allow-listed host (``webhook.allowed_certificate_hosts``):
   without the allow-list anyone could sign with a certificate of their own and point us at it;
3. the certificate must chain to a configured trusted root (``webhook.trusted_roots_file``, the
   Microsoft roots) and its subject organization must be Microsoft;
4. the RSA (PKCS#1 v1.5) / SHA-256 signature must verify over the raw request body bytes.

Anything else is refused before the body is parsed, answered 401 (400 for a malformed body of a
correctly signed request, 413 for an oversized one, 503 when the certificate cannot be fetched, so
that Partner Center retries) and counted in ``cosell_webhook_rejected_total{reason}``. Verified
certificates are cached per URL (until they expire, at most :data:`CERTIFICATE_TTL`), so a burst of
events costs one fetch. Nothing from the body, and never the signature, goes into a log line.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from connector.daemon.metrics import Metrics
from connector.errors import ConfigError, ConfigProblem
from connector.remote.http import http_client
from connector.settings import Settings, WebhookSettings

__all__ = [
    "REFERRAL_EVENTS",
    "CertificateFetcher",
    "Rejected",
    "SignatureVerifier",
    "WebhookReceiver",
    "load_trust_anchors",
    "referral_id_from",
]

log = structlog.get_logger(__name__)

#: The events that mean "this referral changed" (partner-center-api.md §10).
REFERRAL_EVENTS = frozenset(
    {"referral-created", "referral-updated", "related-referral-created", "related-referral-updated"}
)
#: The subject organization of Microsoft's signing certificate.
MICROSOFT_ORGANIZATIONS = frozenset({"Microsoft Corporation"})
#: How long a verified certificate is trusted without fetching it again (a rotated certificate is
#: picked up within this time; a signature that fails against the cached one triggers no refetch,
#: because the same URL serves the rotated certificate and the cache expires soon enough).
CERTIFICATE_TTL = timedelta(hours=6)
#: A certificate, or a short chain in PEM, is a few KiB; refuse to buffer more.
MAX_CERTIFICATE_BYTES = 64 * 1024
MAX_CHAIN_DEPTH = 5
#: Referral ids are GUIDs; anything else (e.g. the fixtures' ``{{ReferralID}}``) is not an id.
_REFERRAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
#: ``https://api.partnercenter.microsoft.com/engagements/v1/referrals/{id}`` in events, unlike the
#: v1.0 API's ``/v1.0/engagements/referrals/{id}`` (§1): only the last segment after
#: ``referrals/`` is used, never the host.
_RESOURCE_PATH = re.compile(r"/referrals/([^/]+)/?$", re.IGNORECASE)


class Rejected(Exception):
    """A request refused: the HTTP status, a fixed reason word (a metric label) and a detail for the
    log (our own words, never request content)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class Fetch(Protocol):
    def __call__(self, url: str) -> bytes: ...


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


# --- certificates ----------------------------------------------------------------------------------


def _parse_certificates(data: bytes) -> list[x509.Certificate]:
    """A ``.cer`` is usually one DER certificate; accept PEM (possibly with intermediates) too."""
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)
    return [x509.load_der_x509_certificate(data)]


def load_trust_anchors(path: Path) -> list[x509.Certificate]:
    """The trusted roots from a PEM file; ConfigError naming ``webhook.trusted_roots_file`` if unusable."""
    try:
        anchors = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        problem = f"cannot read the trusted roots file: {exc.strerror}"
    except ValueError:
        problem = "not a PEM file of certificates"
    else:
        if anchors:
            return anchors
        problem = "no certificate in the file"
    raise ConfigError(
        [ConfigProblem(str(path), "webhook.trusted_roots_file", problem, "a PEM file of root certificates")]
    )


class CertificateFetcher:
    """GETs the signing certificate through the connector's one HTTP client factory (``tls.ca_bundle``
    and no CA environment variables, connector.remote.http); no redirects, bounded size."""

    def __init__(self, ca_bundle: Path | None, *, timeout: float = 10.0) -> None:
        self._client = http_client(ca_bundle, timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)))

    def __call__(self, url: str) -> bytes:
        try:
            with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise Rejected(503, "certificate_unavailable", f"HTTP {response.status_code}")
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > MAX_CERTIFICATE_BYTES:
                        raise Rejected(401, "certificate_untrusted", "the certificate download is too large")
                return bytes(data)
        except httpx.HTTPError as exc:
            raise Rejected(503, "certificate_unavailable", f"{type(exc).__name__}") from None

    def close(self) -> None:
        self._client.close()


def _valid_at(cert: x509.Certificate, at: datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class _Cached:
    key: rsa.RSAPublicKey
    until: datetime


class SignatureVerifier:
    """Checks one request's headers and raw body; raises :class:`Rejected` or returns None."""

    def __init__(
        self,
        *,
        allowed_hosts: Sequence[str],
        anchors: Sequence[x509.Certificate],
        fetch: Fetch,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        ttl: timedelta = CERTIFICATE_TTL,
    ) -> None:
        self.allowed_hosts = frozenset(h.lower().rstrip(".") for h in allowed_hosts)
        self.anchors = list(anchors)
        self._fetch = fetch
        self._now = now
        self._ttl = ttl
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()
        self.fetches = 0

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """``headers`` with lower-cased names; ``body`` exactly as received."""
        algorithm = headers.get("x-ms-signature-algorithm", "").strip()
        url = headers.get("x-ms-certificate-url", "").strip()
        signature_text = _signature_text(headers)
        if not (algorithm or url or signature_text):
            raise Rejected(401, "unsigned", "no signature headers")
        if algorithm.lower() != "rsa-sha256":
            # the algorithm is a fixed word; anything else (or nothing) is refused, never negotiated
            raise Rejected(401, "algorithm", "X-MS-Signature-Algorithm is missing or not rsa-sha256")
        if not url or not signature_text:
            raise Rejected(401, "unsigned", "X-MS-Certificate-Url or the signature is missing")
        try:
            signature = base64.b64decode(signature_text, validate=True)
        except (binascii.Error, ValueError):
            raise Rejected(401, "malformed_signature", "the signature is not base64") from None
        key = self.public_key(url)
        try:
            key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise Rejected(401, "bad_signature", "the signature does not match the body") from None

    def host_of(self, url: str) -> str:
        """The certificate URL's host when it may be fetched; Rejected otherwise."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower().rstrip(".")
        except ValueError:
            raise Rejected(401, "certificate_host", "X-MS-Certificate-Url is not a URL") from None
        if parts.scheme != "https" or parts.username or parts.password or host not in self.allowed_hosts:
            raise Rejected(
                401, "certificate_host", f"certificate host {host or '?'} ({parts.scheme}) is not allowed"
            )
        return host

    def public_key(self, url: str) -> rsa.RSAPublicKey:
        """The signing key of the certificate at ``url``, fetched and verified once, then cached."""
        self.host_of(url)
        now = self._now()
        with self._lock:
            cached = self._cache.get(url)
        if cached is not None and now < cached.until:
            return cached.key
        data = self._fetch(url)
        self.fetches += 1
        try:
            certs = _parse_certificates(data)
        except ValueError:
            raise Rejected(
                401, "certificate_untrusted", "the certificate URL did not serve a certificate"
            ) from None
        if not certs:
            raise Rejected(401, "certificate_untrusted", "the certificate URL served no certificate")
        leaf, extra = certs[0], certs[1:]
        self._check_chain(leaf, extra, now)
        organizations = {str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)}
        if not organizations & MICROSOFT_ORGANIZATIONS:
            raise Rejected(
                401, "certificate_subject", "the certificate's subject organization is not Microsoft"
            )
        key = leaf.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise Rejected(401, "certificate_untrusted", "the certificate's key is not RSA")
        with self._lock:
            self._cache[url] = _Cached(key, min(now + self._ttl, leaf.not_valid_after_utc))
        return key

    def _check_chain(self, leaf: x509.Certificate, extra: Sequence[x509.Certificate], at: datetime) -> None:
        """Walk issuer by issuer (intermediates only from the download) up to a configured anchor.

        Only the anchors are trusted; an intermediate must be a CA and every certificate on the way
        must be valid now."""
        current = leaf
        for _ in range(MAX_CHAIN_DEPTH):
            if not _valid_at(current, at):
                raise Rejected(
                    401, "certificate_untrusted", "a certificate in the chain is expired or not yet valid"
                )
            if any(current == anchor for anchor in self.anchors):
                return
            anchor = next((a for a in self.anchors if _issued_by(current, a)), None)
            if anchor is not None:
                if not _valid_at(anchor, at):
                    raise Rejected(401, "certificate_untrusted", "the trusted root is expired")
                return
            parent = next((c for c in extra if _is_ca(c) and _issued_by(current, c)), None)
            if parent is None:
                break
            current = parent
        raise Rejected(401, "certificate_untrusted", "the certificate does not chain to a trusted root")


def _signature_text(headers: Mapping[str, str]) -> str:
    for name in ("authorization", "x-ms-signature"):
        value = headers.get(name, "").strip()
        if not value:
            continue
        scheme, _, rest = value.partition(" ")
        if scheme.lower() == "signature" and rest.strip():
            return rest.strip()
        if name == "x-ms-signature" and not rest:
            return value  # the header may carry the bare base64 value
    return ""


def referral_id_from(resource_uri: object) -> str | None:
    """The referral id at the end of an event's ``ResourceUri`` (either host/path layout), or None."""
    if not isinstance(resource_uri, str):
        return None
    try:
        path = urlsplit(resource_uri).path
    except ValueError:
        return None
    match = _RESOURCE_PATH.search(path)
    if match is None or not _REFERRAL_ID.fullmatch(match.group(1)):
        return None
    return match.group(1)


# --- the receiver ----------------------------------------------------------------------------------

#: (connection, referral id) -> "queued" | "duplicate" | "overflow" | "stopping"
Trigger = Callable[[str, str], str]


class WebhookReceiver:
    """Answers ``POST <path>/<connection>`` (``<path>`` alone when one connection runs)."""

    def __init__(
        self,
        config: WebhookSettings,
        *,
        connections: Sequence[str],
        verifier: SignatureVerifier,
        trigger: Trigger,
        metrics: Metrics,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.path = config.path.rstrip("/")
        self.max_body_bytes = config.max_body_bytes
        self.connections = list(connections)
        self.verifier = verifier
        self.trigger = trigger
        self.metrics = metrics
        self._close = close

    @classmethod
    def from_settings(
        cls, settings: Settings, *, connections: Sequence[str], trigger: Trigger, metrics: Metrics
    ) -> WebhookReceiver | None:
        """The receiver ``settings.webhook`` asks for, or None when it is off."""
        config = settings.webhook
        if not config.enabled or config.trusted_roots_file is None:
            return None
        anchors = load_trust_anchors(settings.resolve_path(config.trusted_roots_file))
        fetcher = CertificateFetcher(settings.tls.ca_bundle)
        verifier = SignatureVerifier(
            allowed_hosts=config.allowed_certificate_hosts, anchors=anchors, fetch=fetcher
        )
        return cls(
            config,
            connections=connections,
            verifier=verifier,
            trigger=trigger,
            metrics=metrics,
            close=fetcher.close,
        )

    def close(self) -> None:
        if self._close is not None:
            self._close()

    def handles(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path + "/")

    def _connection(self, path: str) -> str:
        rest = path[len(self.path) :].strip("/")
        if not rest and len(self.connections) == 1:
            return self.connections[0]
        if rest in self.connections:
            return rest
        raise Rejected(404, "unknown_connection", "no such connection on this daemon")

    def handle(self, path: str, headers: Mapping[str, str], body: Readable) -> tuple[int, dict[str, Any]]:
        """One POST: ``headers`` with lower-cased names, ``body`` the unread request stream."""
        connection: str | None = None
        try:
            connection = self._connection(path)
            raw = self._read(headers, body)
            self.verifier.verify(headers, raw)
            return self._accept(connection, raw)
        except Rejected as exc:
            self.metrics.webhook_rejected.labels(exc.reason).inc()
            host = None
            url = headers.get("x-ms-certificate-url", "")
            if url:
                try:
                    host = urlsplit(url).hostname
                except ValueError:
                    host = None
            log.warning(
                "webhook.rejected",
                connection=connection,
                reason=exc.reason,
                status=exc.status,
                detail=exc.detail,
                certificate_host=host,
            )
            return exc.status, {"error": exc.reason}

    def _read(self, headers: Mapping[str, str], body: Readable) -> bytes:
        try:
            length = int(headers.get("content-length", ""))
        except ValueError:
            raise Rejected(411, "malformed", "no Content-Length") from None
        if length < 0:
            raise Rejected(400, "malformed", "negative Content-Length")
        if length > self.max_body_bytes:
            raise Rejected(413, "too_large", f"body of {length} bytes over webhook.max_body_bytes")
        raw = body.read(length)
        if len(raw) != length:
            raise Rejected(400, "malformed", "the body is shorter than its Content-Length")
        return raw

    def _accept(self, connection: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        # Only now, with the signature verified, is the body parsed at all.
        try:
            event = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Rejected(400, "malformed", "the body is not JSON") from None
        if not isinstance(event, dict) or not isinstance(event.get("EventName"), str):
            raise Rejected(400, "malformed", "the body is not an event (no EventName)")
        name = event["EventName"]
        if name not in REFERRAL_EVENTS:
            # test-created, subscription events...: acknowledged (a validation event needs a 2xx),
            # nothing to sync. The name is not logged: it is free text from outside.
            self.metrics.webhook_events.labels(connection, "ignored").inc()
            log.info("webhook.ignored", connection=connection, reason="not a referral event")
            return 202, {"status": "ignored"}
        referral_id = referral_id_from(event.get("ResourceUri"))
        if referral_id is None:
            raise Rejected(400, "malformed", "ResourceUri does not end in a referral id")
        outcome = self.trigger(connection, referral_id)
        if outcome == "stopping":
            # the daemon is shutting down: let Partner Center retry later (the poll covers it anyway)
            self.metrics.webhook_events.labels(connection, "stopping").inc()
            return 503, {"status": "stopping"}
        self.metrics.webhook_events.labels(connection, outcome).inc()
        log.info(
            "webhook.received",
            connection=connection,
            event_name=name,
            referral_id=referral_id,
            outcome=outcome,
        )
        return 202, {"status": outcome}
