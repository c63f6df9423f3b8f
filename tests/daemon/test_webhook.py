"""The Partner Center webhook receiver: signature verification as Microsoft documents it
(https://learn.microsoft.com/partner-center/developer/partner-center-webhooks), rejections counted,
and a verified event triggering a targeted sync of its referral in the daemon.

The signing PKI is made here: a test "Microsoft" root (what ``webhook.trusted_roots_file`` names),
a leaf with subject organization Microsoft Corporation, and impostors (another root, a non-Microsoft
subject). The leaf is served over HTTPS by :class:`CertTwin`, trusted through the twins' CA bundle
exactly as the connector's other remotes are."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from connector.daemon.http import HealthServer
from connector.daemon.metrics import Metrics
from connector.daemon.webhook import CertificateFetcher, SignatureVerifier, WebhookReceiver, referral_id_from
from connector.errors import ConfigError
from connector.partner_center.twin import PartnerCenterTwin
from connector.remote.twin import Twin, TwinCA, TwinRequest, TwinResponse
from connector.salesforce.twin import SalesforceTwin
from connector.settings import WebhookSettings, load_settings
from connector.state import SqlStateStore, open_store
from tests.daemon.conftest import Daemon, Setup
from tests.e2e.conftest import CONNECTION

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "partner_center"
CERT_PATH = "/cert/pcnotifications-dispatch.microsoft.com.cer"
RID = "0f8a1c2e-4b6d-4e8f-9a1b-2c3d4e5f6a7b"
BODY_CANARY = "body-token-canary-6620"  # planted in event bodies: must never reach a log line


def event(name: str = "webhook-referral-updated.json", referral_id: str = RID, **extra: Any) -> bytes:
    """A fixture event with its ``{{ReferralID}}`` placeholder filled, as Partner Center sends it."""
    text = (FIXTURES / name).read_text(encoding="utf-8").replace("{{ReferralID}}", referral_id)
    doc = json.loads(text)
    doc.update(extra)
    return json.dumps(doc).encode("utf-8")


# --- the signing PKI and the certificate host -------------------------------------------------------


@dataclass
class Signer:
    leaf: trustme.LeafCert
    key: rsa.RSAPrivateKey

    def sign(self, body: bytes) -> str:
        return base64.b64encode(self.key.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()

    def der(self) -> bytes:
        pem = self.leaf.cert_chain_pems[0].bytes()
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)

    def chain_pem(self) -> bytes:
        return b"".join(p.bytes() for p in self.leaf.cert_chain_pems)


def _signer(ca: trustme.CA, organization: str) -> Signer:
    leaf = ca.issue_cert(
        "pcnotifications-dispatch.microsoft.com",
        organization_name=organization,
        key_type=trustme.KeyType.RSA,
    )
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return Signer(leaf, key)


@dataclass
class Pki:
    root: trustme.CA
    microsoft: Signer  # chains to root, O=Microsoft Corporation
    via_intermediate: Signer  # chains to root through an intermediate served with it
    not_microsoft: Signer  # chains to root, O=Contoso Ltd
    rogue: Signer  # O=Microsoft Corporation, but from a root nobody trusts

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.root.cert_pem.bytes())
        return path


@pytest.fixture(scope="session")
def pki() -> Pki:
    root = trustme.CA(organization_name="Test Microsoft Root", key_type=trustme.KeyType.RSA)
    intermediate = root.create_child_ca(key_type=trustme.KeyType.RSA)
    rogue_root = trustme.CA(organization_name="Rogue Root", key_type=trustme.KeyType.RSA)
    return Pki(
        root,
        _signer(root, "Microsoft Corporation"),
        _signer(intermediate, "Microsoft Corporation"),
        _signer(root, "Contoso Ltd"),
        _signer(rogue_root, "Microsoft Corporation"),
    )


class CertTwin(Twin):
    """Microsoft's certificate blob host: serves the signing certificates by path."""

    name = "cert-host"

    def __init__(self, ca: TwinCA, files: dict[str, bytes]) -> None:
        super().__init__(ca)
        self.files = files

    def handle(self, request: TwinRequest) -> TwinResponse:
        payload = self.files.get(request.path)
        if request.method != "GET" or payload is None:
            return TwinResponse(404, "not found")
        return TwinResponse(200, payload, {"Content-Type": "application/pkix-cert"})


@pytest.fixture
def cert_host(ca: TwinCA, pki: Pki) -> Iterator[CertTwin]:
    files = {
        CERT_PATH: pki.microsoft.der(),
        "/cert/chain.pem": pki.via_intermediate.chain_pem(),
        "/cert/contoso.cer": pki.not_microsoft.der(),
        "/cert/rogue.cer": pki.rogue.der(),
    }
    with CertTwin(ca, files) as twin:
        yield twin  # type: ignore[misc]


def cert_url(host: CertTwin, path: str = CERT_PATH) -> str:
    return f"{host.base_url}{path}"


def signed_headers(signer: Signer, body: bytes, url: str, *, header: str = "authorization") -> dict[str, str]:
    signature = signer.sign(body)
    return {
        "X-MS-Signature-Algorithm": "rsa-sha256",
        "X-MS-Certificate-Url": url,
        **(
            {"Authorization": f"Signature {signature}"}
            if header == "authorization"
            else {"x-ms-signature": signature}
        ),
    }


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - local http URL
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
        exc.close()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, {"text": payload.decode()}


def samples(metrics: Metrics, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.name == name
    }


# --- the receiver in-process, behind the real HTTP server ----------------------------------------


@dataclass
class Receiver:
    server: HealthServer
    receiver: WebhookReceiver
    metrics: Metrics
    triggered: list[tuple[str, str]]

    def post(self, body: bytes, headers: dict[str, str], path: str = "/webhooks/partner-center/acme") -> Any:
        return post(self.server.port, path, body, headers)

    def rejected(self, reason: str) -> float:
        return samples(self.metrics, "cosell_webhook_rejected_total").get(
            frozenset({("reason", reason)}), 0.0
        )


@pytest.fixture
def receiver(tmp_path: Path, ca: TwinCA, pki: Pki, cert_host: CertTwin) -> Iterator[Receiver]:
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    metrics = Metrics(process=False)
    triggered: list[tuple[str, str]] = []

    def trigger(connection: str, referral_id: str) -> str:
        # the daemon's answer: a referral already waiting is not queued twice
        if (connection, referral_id) in triggered:
            return "duplicate"
        triggered.append((connection, referral_id))
        return "queued"

    fetcher = CertificateFetcher(ca.write_pem(tmp_path / "twins-ca.pem"))
    verifier = SignatureVerifier(allowed_hosts=["localhost"], anchors=[_root_cert(pki)], fetch=fetcher)
    webhook = WebhookReceiver(
        WebhookSettings(),
        connections=["acme", "beta"],
        verifier=verifier,
        trigger=trigger,
        metrics=metrics,
        close=fetcher.close,
    )
    server = HealthServer(
        "127.0.0.1", 0, store=store, metrics=metrics, connections=["acme", "beta"], webhook=webhook
    )
    try:
        with server:
            yield Receiver(server, webhook, metrics, triggered)
    finally:
        webhook.close()
        store.close()


def _root_cert(pki: Pki) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.root.cert_pem.bytes())


@pytest.mark.parametrize("header", ["authorization", "x-ms-signature"])
@pytest.mark.parametrize(
    "fixture",
    [
        "webhook-referral-created.json",
        "webhook-referral-updated.json",
        "webhook-related-referral-created.json",
        "webhook-related-referral-updated.json",
    ],
)
def test_a_signed_referral_event_is_acknowledged_and_queues_its_referral_once(
    receiver: Receiver, pki: Pki, cert_host: CertTwin, fixture: str, header: str
) -> None:
    body = event(fixture)
    headers = signed_headers(pki.microsoft, body, cert_url(cert_host), header=header)
    assert receiver.post(body, headers) == (202, {"status": "queued"})
    assert receiver.triggered == [("acme", RID)]
    # Partner Center retries a delivery it thinks failed: the second copy finds the referral queued
    assert receiver.post(body, headers) == (202, {"status": "duplicate"})
    assert receiver.triggered == [("acme", RID)]
    # the certificate was fetched once, then cached
    assert len(cert_host.calls("GET", CERT_PATH)) == 1
    events = samples(receiver.metrics, "cosell_webhook_events_total")
    assert events[frozenset({("connection", "acme"), ("outcome", "queued")})] == 1
    assert events[frozenset({("connection", "acme"), ("outcome", "duplicate")})] == 1


def test_a_certificate_chaining_through_an_intermediate_is_accepted(
    receiver: Receiver, pki: Pki, cert_host: CertTwin
) -> None:
    body = event()
    headers = signed_headers(pki.via_intermediate, body, cert_url(cert_host, "/cert/chain.pem"))
    assert receiver.post(body, headers)[0] == 202
    assert receiver.triggered == [("acme", RID)]


def _tampered(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    headers = signed_headers(pki.microsoft, event(), cert_url(host))
    return event(referral_id="11111111-2222-4333-8444-555555555555"), headers


def _wrong_algorithm(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    body = event()
    return body, {
        **signed_headers(pki.microsoft, body, cert_url(host)),
        "X-MS-Signature-Algorithm": "hmac-sha256",
    }


def _no_algorithm(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    body = event()
    headers = signed_headers(pki.microsoft, body, cert_url(host))
    del headers["X-MS-Signature-Algorithm"]
    return body, headers


def _unsigned(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    return event(), {}


def _no_signature(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    body = event()
    headers = signed_headers(pki.microsoft, body, cert_url(host))
    del headers["Authorization"]
    return body, headers


def _bearer_instead(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    body = event()
    headers = signed_headers(pki.microsoft, body, cert_url(host))
    headers["Authorization"] = headers["Authorization"].replace("Signature", "Bearer")
    return body, headers


def _not_base64(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    body = event()
    return body, {
        **signed_headers(pki.microsoft, body, cert_url(host)),
        "Authorization": "Signature !!not-b64!!",
    }


def _disallowed_host(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    # the same server under another name: refused by the allow-list, never fetched
    body = event()
    return body, signed_headers(pki.microsoft, body, cert_url(host).replace("localhost", "127.0.0.1"))


def _plain_http(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    body = event()
    return body, signed_headers(pki.microsoft, body, cert_url(host).replace("https://", "http://"))


def _not_microsoft(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    body = event()
    return body, signed_headers(pki.not_microsoft, body, cert_url(host, "/cert/contoso.cer"))


def _rogue_root(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    body = event()
    return body, signed_headers(pki.rogue, body, cert_url(host, "/cert/rogue.cer"))


def _signed_by_another_key(pki: Pki, host: CertTwin) -> tuple[bytes, dict[str, str]]:
    # a valid Microsoft certificate URL, but signed with an attacker's key
    body = event()
    return body, signed_headers(pki.rogue, body, cert_url(host))


@pytest.mark.parametrize(
    ("forge", "reason", "fetched"),
    [
        (_tampered, "bad_signature", True),
        (_signed_by_another_key, "bad_signature", True),
        (_wrong_algorithm, "algorithm", False),
        (_no_algorithm, "algorithm", False),
        (_unsigned, "unsigned", False),
        (_no_signature, "unsigned", False),
        (_bearer_instead, "unsigned", False),
        (_not_base64, "malformed_signature", False),
        (_disallowed_host, "certificate_host", False),
        (_plain_http, "certificate_host", False),
        (_not_microsoft, "certificate_subject", True),
        (_rogue_root, "certificate_untrusted", True),
    ],
)
def test_forged_unsigned_and_malformed_signatures_are_rejected_and_counted(
    receiver: Receiver,
    pki: Pki,
    cert_host: CertTwin,
    forge: Callable[[Pki, CertTwin], tuple[bytes, dict[str, str]]],
    reason: str,
    fetched: bool,
) -> None:
    body, headers = forge(pki, cert_host)
    with capture_logs() as logs:
        status, answer = receiver.post(body, headers)
    assert (status, answer) == (401, {"error": reason})
    assert receiver.triggered == []
    assert receiver.rejected(reason) == 1
    assert bool(cert_host.calls("GET")) is fetched  # no fetch before the headers pass
    [line] = [e for e in logs if e["event"] == "webhook.rejected"]
    assert line["reason"] == reason and line["log_level"] == "warning"
    text = json.dumps(logs, default=str)
    assert BODY_CANARY not in text and "Signature " not in text


def test_malformed_bodies_and_other_requests(receiver: Receiver, pki: Pki, cert_host: CertTwin) -> None:
    url = cert_url(cert_host)

    def signed(body: bytes) -> tuple[int, Any]:
        return receiver.post(body, signed_headers(pki.microsoft, body, url))

    # correctly signed, but not something to act on: 400 (the fixture's placeholder is not an id)
    assert signed(b"not json") == (400, {"error": "malformed"})
    assert signed(b'["EventName"]') == (400, {"error": "malformed"})
    assert signed(event(referral_id="{{ReferralID}}")) == (400, {"error": "malformed"})
    assert receiver.rejected("malformed") == 3
    # a validation event (test-created) is acknowledged so the registration test passes; no sync
    assert signed(event("webhook-test-created.json")) == (202, {"status": "ignored"})
    # too large: refused before it is read or verified
    big = b"{" + b" " * (WebhookSettings().max_body_bytes + 1) + b"}"
    assert receiver.post(big, {})[0] == 413 and receiver.rejected("too_large") == 1
    # connections are named in the path when the daemon runs more than one
    body = event()
    headers = signed_headers(pki.microsoft, body, url)
    assert receiver.post(body, headers, path="/webhooks/partner-center")[0] == 404
    assert receiver.post(body, headers, path="/webhooks/partner-center/nope")[0] == 404
    assert receiver.rejected("unknown_connection") == 2
    assert receiver.post(body, headers, path="/webhooks/partner-center/beta") == (202, {"status": "queued"})
    assert receiver.triggered == [("beta", RID)]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(
            f"http://127.0.0.1:{receiver.server.port}/webhooks/partner-center/acme", timeout=5
        )
    assert info.value.code == 405
    info.value.close()
    assert post(receiver.server.port, "/readyz", b"{}", {})[0] == 404  # only the webhook takes POST


def test_the_certificate_host_being_down_answers_503_so_partner_center_retries(
    receiver: Receiver, pki: Pki, cert_host: CertTwin
) -> None:
    body = event()
    headers = signed_headers(pki.microsoft, body, cert_url(cert_host, "/cert/missing.cer"))
    assert receiver.post(body, headers) == (503, {"error": "certificate_unavailable"})
    assert receiver.triggered == [] and receiver.rejected("certificate_unavailable") == 1


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (f"https://api.partnercenter.microsoft.com/engagements/v1/referrals/{RID}", RID),  # event layout
        (f"https://api.partner.microsoft.com/v1.0/engagements/referrals/{RID}/", RID),  # the API's
        ("https://api.partnercenter.microsoft.com/engagements/v1/referrals/{{ReferralID}}", None),
        ("https://api.partnercenter.microsoft.com/engagements/v1/referrals/", None),
        ("http://localhost:16722/v1/webhooks/registration/test", None),
        (f"https://x/referrals/{RID}/../../admin", None),
        (None, None),
        (42, None),
    ],
)
def test_referral_id_from_resource_uri(uri: object, expected: str | None) -> None:
    assert referral_id_from(uri) == expected


def test_settings_webhook_section(tmp_path: Path) -> None:
    assert WebhookSettings().enabled is False
    assert WebhookSettings().allowed_certificate_hosts == ("3psostorageacct.blob.core.windows.net",)
    path = tmp_path / "cosell.yaml"
    path.write_text(yaml.safe_dump({"webhook": {"enabled": True}}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "trusted_roots_file" in str(info.value)


# --- the daemon as a subprocess ------------------------------------------------------------------


def test_the_daemon_syncs_the_referral_of_a_verified_event_and_rejects_a_forged_one(
    make_setup: Callable[..., Setup],
    start_daemon: Callable[..., Daemon],
    pc: PartnerCenterTwin,
    sf: SalesforceTwin,
    cert_host: CertTwin,
    pki: Pki,
    tmp_path: Path,
) -> None:
    # a long interval: after the run at start, only the webhook can bring the new referral over
    setup = make_setup(interval=3600)
    config = yaml.safe_load(setup.config.read_text(encoding="utf-8"))
    config["webhook"] = {
        "enabled": True,
        "allowed_certificate_hosts": ["localhost"],
        "trusted_roots_file": str(pki.write_root(tmp_path / "microsoft-roots.pem")),
    }
    setup.config.write_text(yaml.safe_dump(config), encoding="utf-8")
    daemon = start_daemon(setup)
    daemon.wait_for(lambda: daemon.event("run.end"), "the run at start")

    [rid] = pc.seed(1, mix=False)
    with pc._store:  # a new inbound referral from Microsoft
        pc.referrals[rid].update(
            {"status": "New", "substatus": "Received", "direction": "Incoming", "externalReferenceId": None,
             "salesStage": None}
        )  # fmt: skip
    url = cert_url(cert_host)
    # forged first: refused, counted, nothing fetched from Partner Center
    forged = event("webhook-referral-created.json", rid, ResourceName=BODY_CANARY)
    headers = signed_headers(pki.rogue, forged, url)
    assert post(daemon.port, "/webhooks/partner-center", forged, headers) == (401, {"error": "bad_signature"})
    assert daemon.metric("cosell_webhook_rejected_total", reason="bad_signature") == 1

    body = event("webhook-referral-created.json", rid, ResourceName=BODY_CANARY)
    signature_headers = signed_headers(pki.microsoft, body, url)
    assert post(daemon.port, "/webhooks/partner-center", body, signature_headers)[0] == 202

    def synced() -> bool:
        return any(
            row.get("Partner_Center_Referral_Id__c") == rid for row in sf.tables["Opportunity"].values()
        )

    daemon.wait_for(synced, "the targeted sync to create the opportunity")
    # targeted: the referral was read by id (a poll lists), through the v1.0 host, not ResourceUri's
    assert pc.calls("GET", f"/v1.0/engagements/referrals/{rid}")
    daemon.wait_for(
        lambda: daemon.metric("cosell_runs_total", kind="referral", outcome="ok", connection=CONNECTION) >= 1,
        "the targeted run's metrics",
    )
    assert daemon.metric("cosell_webhook_events_total", outcome="queued", connection=CONNECTION) == 1
    store: SqlStateStore = open_store(setup.settings.state_url, migrate=False)
    try:
        link = store.link_by_referral(CONNECTION, rid)
        assert link is not None and link.crm_id
    finally:
        store.close()

    daemon.proc.terminate()
    assert daemon.proc.wait(30) == 0
    out = daemon.output()
    assert BODY_CANARY not in out
    assert signature_headers["Authorization"].split()[1] not in out and headers["Authorization"] not in out
    rejected = [e for e in daemon.events() if e.get("event") == "webhook.rejected"]
    assert [e["reason"] for e in rejected] == ["bad_signature"]


# --- the daemon's queue, in-process ---------------------------------------------------------------


def test_the_daemon_queues_each_referral_once_and_runs_targeted_syncs_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connector.daemon import scheduler as scheduler_module
    from connector.daemon.scheduler import Daemon as Scheduler
    from connector.remote.calls import CallCounter
    from connector.sync.engine import RunReport
    from tests.daemon.test_scheduler import CONFIG

    ran: list[str] = []
    entered, release = threading.Event(), threading.Event()

    @contextmanager
    def fake_context(settings: Any, name: str, store: Any, **_: Any) -> Iterator[Any]:
        class Engine:
            crm = object()

            def run(self, *, referral_id: str) -> RunReport:
                ran.append(referral_id)
                entered.set()
                release.wait(10)
                return RunReport(name, "run-1", "corr-1", False)

        yield SimpleNamespace(engine=Engine(), calls=CallCounter())

    monkeypatch.setattr(scheduler_module, "run_context", fake_context)
    path = tmp_path / "cosell.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    daemon = Scheduler(load_settings(path), store, connections=["good"], metrics=Metrics(process=False))
    daemon.scheduler.start()  # the drain jobs only: no scheduled syncs in this test
    try:
        assert daemon.request_referral_sync("good", "r-1") == "queued"
        assert entered.wait(10)  # r-1 is running, off the queue
        assert daemon.request_referral_sync("good", "r-1") == "queued"  # may have been read already
        assert daemon.request_referral_sync("good", "r-2") == "queued"
        assert daemon.request_referral_sync("good", "r-2") == "duplicate"
        assert daemon.queued_referrals("good") == ["r-1", "r-2"]
        release.set()
        deadline = time.monotonic() + 10
        while len(ran) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ran == ["r-1", "r-1", "r-2"]
        assert daemon.stop(5)
        assert daemon.request_referral_sync("good", "r-3") == "stopping"
    finally:
        release.set()
        store.close()
