"""Fixtures for the Dynamics tests: a CA, the identity-provider twin, the Dataverse twin, and the real
adapter signed in with real msal over real HTTPS."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from connector.dynamics.adapter import DynamicsAdapter, build_adapter, dataverse_signin
from connector.dynamics.twin import DataverseTwin
from connector.remote.calls import CallCounter
from connector.remote.http import http_client
from connector.remote.idp_twin import IdpTwin
from connector.remote.retry import RetryPolicy
from connector.remote.twin import Clock, TwinCA
from connector.settings import DynamicsAuth, DynamicsCrm

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "dataverse"
CLIENT_ID = "dyn-connector-app"
CLIENT_SECRET = "not-a-real-secret"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


@pytest.fixture
def ca() -> TwinCA:
    return TwinCA()


@pytest.fixture
def ca_pem(ca: TwinCA, tmp_path: Path) -> Path:
    return ca.write_pem(tmp_path / "ca.pem")


@pytest.fixture
def clock() -> Clock:
    # Frozen: every seeded row shares one modifiedon second, which exercises the keyset tie-break.
    return Clock(start=datetime(2026, 3, 2, 9, 0, tzinfo=UTC))


@pytest.fixture
def idp(ca: TwinCA, clock: Clock) -> Iterator[IdpTwin]:
    twin = IdpTwin(ca, clock=clock)
    twin.add_client(CLIENT_ID, secret=CLIENT_SECRET)
    with twin:
        yield twin


def start_dataverse(ca: TwinCA, clock: Clock, idp: IdpTwin, **kw: Any) -> DataverseTwin:
    twin = DataverseTwin(ca, clock=clock, **kw)
    # Only tokens the IdP twin issued for this environment's scope are accepted.
    twin.auth_check = lambda header: idp.validate(header, scope_prefix=twin.base_url) is not None
    twin.start()
    return twin


@pytest.fixture
def dataverse(ca: TwinCA, clock: Clock, idp: IdpTwin) -> Iterator[DataverseTwin]:
    twin = start_dataverse(ca, clock, idp)
    yield twin
    twin.stop()


@pytest.fixture
def waits() -> list[float]:
    """Every wait the retry policy asked for (recorded, never slept)."""
    return []


AdapterFactory = Callable[..., DynamicsAdapter]


@pytest.fixture
def make_adapter(idp: IdpTwin, ca_pem: Path, waits: list[float]) -> Iterator[AdapterFactory]:
    made: list[tuple[DynamicsAdapter, httpx.Client]] = []

    def make(twin: DataverseTwin, *, secret: str = CLIENT_SECRET, **overrides: Any) -> DynamicsAdapter:
        crm = DynamicsCrm(
            kind="dynamics",
            base_url=twin.base_url,
            auth=DynamicsAuth(
                tenant_id=idp.tenant_id,
                client_id=CLIENT_ID,
                authority=idp.authority,
                client_secret=SecretStr(secret),
            ),
            page_size=overrides.pop("page_size", 50),
            fields={"referral_id": "new_referralid"},
        )
        signin_http = http_client(ca_pem)  # real msal, over the same CA bundle
        tokens = dataverse_signin(crm, ca_pem, http=signin_http)
        policy = RetryPolicy(sleep=waits.append, initial_wait=0.01)
        adapter = build_adapter(
            crm, tokens=tokens, ca_bundle=ca_pem, policy=policy, calls=CallCounter(), **overrides
        )
        made.append((adapter, signin_http))
        return adapter

    yield make
    for adapter, signin_http in made:
        adapter.close()
        signin_http.close()


@pytest.fixture
def adapter(dataverse: DataverseTwin, make_adapter: AdapterFactory) -> DynamicsAdapter:
    return make_adapter(dataverse)
