"""The whole connector against the twins over real HTTPS: identity provider, Partner Center and
Salesforce, with a real state store (SQLite and PostgreSQL), configured the way an operator does
(YAML + secrets in the environment), signed in through real msal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.partner_center.twin import PartnerCenterTwin
from connector.remote.idp_twin import IdpTwin
from connector.remote.retry import RetryPolicy
from connector.remote.twin import Clock, TwinCA
from connector.salesforce.twin import SalesforceTwin
from connector.settings import Settings, load_settings
from connector.state import SqlStateStore, open_store
from connector.sync.engine import RunReport
from connector.sync.factory import run_context

CONNECTION = "acme"
PC_CLIENT = "cosell-pc-app"
PC_USER = "pc-service@partner.example"
PC_PASSWORD = "pc-password-canary-7731"
SF_CLIENT, SF_SECRET = "3MVG9-e2e-consumer", "sf-secret-canary-5519"
SF_USER, SF_PASSWORD = "integration@partner.example", "sf-password-canary-0042"
NO_SLEEP = RetryPolicy(sleep=lambda _s: None)


@pytest.fixture(scope="session")
def ca() -> TwinCA:
    return TwinCA()


@pytest.fixture
def idp(ca: TwinCA) -> Iterator[IdpTwin]:
    twin = IdpTwin(ca, clock=Clock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC)))
    twin.add_client(PC_CLIENT)
    twin.add_user(PC_USER, PC_PASSWORD)
    with twin:
        yield twin


@pytest.fixture
def pc(ca: TwinCA, idp: IdpTwin) -> Iterator[PartnerCenterTwin]:
    with PartnerCenterTwin(ca, idp=idp) as twin:
        yield twin  # type: ignore[misc]


@pytest.fixture
def sf(ca: TwinCA) -> Iterator[SalesforceTwin]:
    twin = SalesforceTwin(
        ca,
        clock=Clock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC)),
        client_id=SF_CLIENT,
        client_secret=SF_SECRET,
        users={SF_USER: SF_PASSWORD},
    )
    twin.start()
    try:
        yield twin
    finally:
        twin.stop()


def connection_config(idp: IdpTwin, pc: PartnerCenterTwin, sf: SalesforceTwin) -> dict[str, Any]:
    """The connection's YAML block pointing at the twins (secrets stay in the environment)."""
    return {
        "crm": {
            "kind": "salesforce",
            "login_url": sf.base_url,
            "auth": {"flow": "password", "client_id": SF_CLIENT, "username": SF_USER},
            "api_budget_share": 1.0,
        },
        "partner_center": {
            "base_url": pc.api_base_url,
            "authority": idp.authority,
            "auth": {"mode": "device_code", "client_id": PC_CLIENT},
            "location_id": "loc-1",
        },
        "mappings": ["builtin:salesforce-default.yaml"],
        "policy": {"default": "newest-wins"},
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def settings(
    tmp_path: Path,
    ca: TwinCA,
    idp: IdpTwin,
    pc: PartnerCenterTwin,
    sf: SalesforceTwin,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    ca_pem = ca.write_pem(tmp_path / "twins-ca.pem")
    config: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "state": {"url": state_url},
        "tls": {"ca_bundle": str(ca_pem)},
        "connections": {CONNECTION: connection_config(idp, pc, sf)},
    }
    path = tmp_path / "cosell.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    # Secrets come from the environment, as in production; never from the YAML.
    monkeypatch.setenv("COSELL_CONNECTIONS__ACME__CRM__AUTH__CLIENT_SECRET", SF_SECRET)
    monkeypatch.setenv("COSELL_CONNECTIONS__ACME__CRM__AUTH__PASSWORD", SF_PASSWORD)
    settings = load_settings(path)
    idp.sign_in(settings, CONNECTION, PC_USER)  # the operator's one-off device-code sign-in
    return settings


@pytest.fixture
def store(settings: Settings) -> Iterator[SqlStateStore]:
    s = open_store(settings.state_url)
    try:
        yield s
    finally:
        s.close()


Run = Callable[..., RunReport]


@pytest.fixture
def run(settings: Settings, store: SqlStateStore) -> Run:
    """One sync run of the connection, as `cosell sync` does it."""

    def go(**kwargs: Any) -> RunReport:
        with run_context(settings, CONNECTION, store, policy=NO_SLEEP) as ctx:
            report = ctx.engine.run(**kwargs)
            report.calls = ctx.calls.snapshot()  # type: ignore[attr-defined]
            return report

    return go
