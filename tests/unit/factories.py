"""Builders for canonical deals used across the domain tests."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

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
    Status,
    Substatus,
)

SELLER = Contact("Ada", "Lovelace", email="ada@partner.example", phone="+1 555 0100")
BUYER = Contact("Grace", "Hopper", email="grace@customer.example", phone="+1 555 0199")


def deal(**changes: Any) -> Deal:
    base = Deal(
        name="Contoso migration",
        direction=Direction.OUTBOUND,
        deal_type=DealType.PRIVATE,
        status=Status.ACTIVE,
        substatus=Substatus.ACCEPTED,
        referral_id="r-1",
        crm_id="0061x000001AbcdAAC",
        external_reference_id="0061x000001AbcdAAC",
        location_id="loc-1",
        sales_stage=StandardStage.QUALIFIED,
        customer=Customer("Contoso Ltd", Address(country="US", city="Redmond")),
        value=Money(Decimal("50000"), "USD"),
        close_date=date(2027, 3, 31),
        team=(SELLER,),
        solutions=(
            Solution(SolutionKind.OWN, "SOL-34104-EBB", "Contoso Cloud", incentive="Azure IP co-sell"),
        ),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return replace(base, **changes)


def inbound(**changes: Any) -> Deal:
    fields: dict[str, Any] = {
        "direction": Direction.INBOUND,
        "status": Status.NEW,
        "substatus": Substatus.RECEIVED,
    }
    return deal(**{**fields, **changes})
