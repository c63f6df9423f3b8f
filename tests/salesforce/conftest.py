"""Fixtures for the Salesforce tests: one twin per test over real HTTPS, a CA bundle the connector
trusts, and REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE pointing at an unrelated CA — so every test also proves
the adapter's requests session ignores the environment (trust_env=False, crm-apis.md §D)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from connector.remote.calls import CallCounter
from connector.remote.retry import RetryPolicy
from connector.remote.twin import Clock, TwinCA
from connector.salesforce.adapter import SalesforceAdapter
from connector.salesforce.auth import SalesforceSignIn
from connector.salesforce.twin import SalesforceTwin
from connector.settings import SalesforceAuth, SalesforceCrm

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "salesforce"
START = datetime(2025, 3, 3, 12, 0, 0, tzinfo=UTC)
CLIENT_ID = "3MVG9-twin-consumer-key"
CLIENT_SECRET = "twin-consumer-secret"
USERNAME = "integration@example.com"
PASSWORD = "twin-password"
NO_SLEEP = RetryPolicy(sleep=lambda _s: None)


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def ca() -> TwinCA:
    return TwinCA()


@pytest.fixture(scope="session")
def rsa_keys() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.fixture
def ca_bundle(ca: TwinCA, tmp_path: Path) -> Path:
    return ca.write_pem(tmp_path / "connector-ca.pem")


@pytest.fixture(autouse=True)
def hostile_ca_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """CA variables naming a CA that did not sign the twin: with trust_env on, requests would fail."""
    unrelated = TwinCA().write_pem(tmp_path / "unrelated-ca.pem")
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.setenv(name, str(unrelated))
    return unrelated


@pytest.fixture
def twin(ca: TwinCA, rsa_keys: tuple[bytes, bytes]) -> Iterator[SalesforceTwin]:
    sf = SalesforceTwin(ca, clock=Clock(START), jwt_public_key=rsa_keys[1])
    sf.start()
    try:
        yield sf
    finally:
        sf.stop()


def crm_settings(twin: SalesforceTwin, **overrides: Any) -> SalesforceCrm:
    auth = overrides.pop(
        "auth",
        SalesforceAuth(
            flow="password",
            client_id=CLIENT_ID,
            username=USERNAME,
            password=SecretStr(PASSWORD),
            client_secret=SecretStr(CLIENT_SECRET),
        ),
    )
    values: dict[str, Any] = {
        "kind": "salesforce",
        "login_url": twin.base_url,
        "auth": auth,
        "api_budget_share": 1.0,
    }
    values.update(overrides)
    return SalesforceCrm(**values)


MakeAdapter = Callable[..., SalesforceAdapter]


@pytest.fixture
def make_adapter(twin: SalesforceTwin, ca_bundle: Path) -> Iterator[MakeAdapter]:
    made: list[SalesforceAdapter] = []

    def make(**overrides: Any) -> SalesforceAdapter:
        adapter_kw = {
            k: overrides.pop(k)
            for k in list(overrides)
            if k in ("stage_mapping", "day_share", "solution_map", "calls")
        }
        crm = crm_settings(twin, **overrides)
        # one counter for the adapter and its sign-in: the oauth call is counted with the rest
        calls = adapter_kw["calls"] = adapter_kw.get("calls") or CallCounter()
        sign_in = SalesforceSignIn(crm, ca_bundle=ca_bundle, policy=NO_SLEEP, now=twin.clock.now, calls=calls)
        # metadata age on the twin's clock, so tests move it past metadata_ttl
        adapter = SalesforceAdapter(
            crm, ca_bundle=ca_bundle, sign_in=sign_in, policy=NO_SLEEP, now=twin.clock.now, **adapter_kw
        )
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()
