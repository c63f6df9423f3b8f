"""Shared fixtures for the Partner Center tests: fixture files, the twins, settings, a signed-in client.

Fixture payloads are verbatim copies under tests/fixtures/partner_center/ (never read from ../shared).
Twins run per test (fresh state, fresh msal application: msal caches error answers per app).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.domain.model import (
    Address,
    Contact,
    Customer,
    Deal,
    DealType,
    Direction,
    Money,
    Solution,
    SolutionKind,
    StandardStage,
)
from connector.partner_center.client import PartnerCenterClient
from connector.partner_center.twin import PartnerCenterTwin
from connector.remote.calls import CallCounter
from connector.remote.idp_twin import IdpTwin
from connector.remote.retry import RetryPolicy
from connector.remote.twin import Clock, TwinCA
from connector.settings import Settings, load_settings

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "partner_center"
CLIENT_ID = "cosell-pc-app"
USER = "pc-service@partner.example"
PASSWORD = "correct horse battery staple"
CONNECTION = "acme"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def fixture_json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


SELLER = Contact("Ada", "Lovelace", email="ada@partner.example", phone="+1 555 0100")


def new_deal(crm_id: str = "0061x00000AbCdEAAV", **changes: Any) -> Deal:
    """An outbound private deal that passes the create rules."""
    deal = Deal(
        name="Contoso migration",
        direction=Direction.OUTBOUND,
        deal_type=DealType.PRIVATE,
        crm_id=crm_id,
        location_id="loc-1",
        sales_stage=StandardStage.QUALIFIED,
        customer=Customer("Contoso Ltd", Address(country="US", city="Redmond")),
        value=Money(Decimal("50000"), "USD"),
        close_date=date(2027, 3, 31),
        team=(SELLER,),
        solutions=(Solution(SolutionKind.OWN, "SOL-34104-EBB", "Contoso Cloud"),),
    )
    return replace(deal, **changes)


@pytest.fixture(scope="session")
def ca() -> TwinCA:
    return TwinCA()


@pytest.fixture
def ca_pem(ca: TwinCA, tmp_path: Path) -> Path:
    return ca.write_pem(tmp_path / "twin-ca.pem")


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def idp(ca: TwinCA, clock: Clock) -> Iterator[IdpTwin]:
    twin = IdpTwin(ca, clock=clock)
    twin.add_client(CLIENT_ID)
    twin.add_user(USER, PASSWORD)
    with twin:
        yield twin


@pytest.fixture
def pc(ca: TwinCA, idp: IdpTwin) -> Iterator[PartnerCenterTwin]:
    twin = PartnerCenterTwin(ca, idp=idp)
    with twin:
        yield twin


@pytest.fixture
def waits() -> list[float]:
    """Every wait the retry policy asked for (never slept)."""
    return []


@pytest.fixture
def policy(waits: list[float]) -> RetryPolicy:
    return RetryPolicy(sleep=waits.append)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Settings]:
    """Write a config file for connection ``acme`` and load it the way the CLI does."""

    def write(
        *, authority: str, base_url: str, ca_bundle: Path | None, patch_name: bool = False, **pc_auth: Any
    ) -> Settings:
        config: dict[str, Any] = {
            "data_dir": str(tmp_path / "state"),
            "connections": {
                CONNECTION: {
                    "crm": {
                        "kind": "salesforce",
                        "auth": {"flow": "client_credentials", "client_id": "sf-app"},
                    },
                    "partner_center": {
                        "base_url": base_url,
                        "authority": authority,
                        "auth": {"client_id": CLIENT_ID, **pc_auth},
                        "page_size": 100,
                        "patch_name": patch_name,
                    },
                    "mappings": ["mappings/default.yaml"],
                }
            },
        }
        if ca_bundle is not None:
            config["tls"] = {"ca_bundle": str(ca_bundle)}
        path = tmp_path / "cosell.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return load_settings(path)

    return write


@pytest.fixture
def settings(
    write_config: Callable[..., Settings], idp: IdpTwin, pc: PartnerCenterTwin, ca_pem: Path
) -> Settings:
    return write_config(authority=idp.authority, base_url=pc.api_base_url, ca_bundle=ca_pem)


@pytest.fixture
def sign_in(idp: IdpTwin) -> Callable[[Settings], None]:
    """Do the operator's one-off device-code sign-in through real msal (the twin approves it)."""

    def run(settings: Settings) -> None:
        idp.sign_in(settings, CONNECTION, USER)

    return run


@pytest.fixture
def calls() -> CallCounter:
    return CallCounter()


@pytest.fixture
def client(
    settings: Settings, sign_in: Callable[[Settings], None], policy: RetryPolicy, calls: CallCounter
) -> Iterator[PartnerCenterClient]:
    sign_in(settings)
    with PartnerCenterClient.from_settings(settings, CONNECTION, policy=policy, calls=calls) as c:
        yield c
