"""Every documented payload parses, converts to a Deal and back without losing a field."""

from __future__ import annotations

import copy
import dataclasses
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from connector.domain.model import (
    DealType,
    Direction,
    HelpType,
    Money,
    RegistrationState,
    SolutionKind,
    StandardStage,
    Status,
    Substatus,
)
from connector.errors import RecordError
from connector.partner_center.convert import (
    deal_to_referral,
    format_stage,
    parse_stage,
    patch_operations,
    referral_to_deal,
)
from connector.partner_center.jsonpatch import JsonPatchError, apply_patch
from connector.partner_center.models import (
    Referral,
    ReferralList,
    Target,
    create_body,
    format_utc,
    parse_utc,
    utc_ticks,
    wire_dump,
)

from .conftest import fixture_json

REFERRALS = [
    "create-private-referral-request.json",
    "create-referral-request.json",
    "create-referral-response.json",
    "get-referral-response.json",
    "referral-real-closed-won-ppe.json",
    "referral-real-inbound-active-accepted.json",
]
#: fields the server sets: a deal built from scratch cannot carry them back
SERVER_SET = {"referral_id", "direction", "created_at", "updated_at", "version", "registration"}


def documented_normalisation(doc: Any) -> Any:
    """What reading does on purpose (partner-center-api.md §12): team object -> array, PascalCase
    consent keys -> camelCase, dealValue string -> number. Nothing else may change."""
    doc = copy.deepcopy(doc)

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            for key in ("team",):
                if isinstance(node.get(key), dict):
                    node[key] = [node[key]]
            if "consent" in node and isinstance(node["consent"], dict):
                node["consent"] = {k[0].lower() + k[1:]: v for k, v in node["consent"].items()}
            if isinstance(node.get("dealValue"), str):
                node["dealValue"] = int(Decimal(node["dealValue"]))
            for value in node.values():
                fix(value)
        elif isinstance(node, list):
            for value in node:
                fix(value)
        return node

    return fix(doc)


@pytest.mark.parametrize("name", REFERRALS)
def test_every_documented_referral_round_trips_through_the_model(name: str) -> None:
    raw = fixture_json(name)
    assert wire_dump(Referral.model_validate(raw)) == documented_normalisation(raw)


@pytest.mark.parametrize("name", REFERRALS)
def test_every_documented_referral_round_trips_through_the_deal(name: str) -> None:
    raw = fixture_json(name)
    referral = Referral.model_validate(raw)
    deal = referral_to_deal(referral)
    back = deal_to_referral(deal, base=referral)
    assert wire_dump(back) == documented_normalisation(raw)


@pytest.mark.parametrize("name", REFERRALS)
def test_a_deal_written_fresh_reads_back_the_same(name: str) -> None:
    deal = referral_to_deal(Referral.model_validate(fixture_json(name)))
    again = referral_to_deal(deal_to_referral(deal))
    changed = {f.name for f in dataclasses.fields(deal) if getattr(deal, f.name) != getattr(again, f.name)}
    # Won is a status, never sent as a stage on create (partner-center-api.md §6.5).
    assert changed <= SERVER_SET | ({"sales_stage"} if deal.sales_stage is StandardStage.WON else set())


def test_unknown_fields_survive_a_change_made_through_the_deal() -> None:
    raw = fixture_json("referral-real-inbound-active-accepted.json")
    raw["partnerRole"] = "Seller"
    raw["fy27Thing"] = {"nested": [1, 2, {"x": None}]}
    raw["details"]["incentiveProgram"] = "AzureIPCoSell"
    raw["customerProfile"]["team"][0]["pronouns"] = "they"
    referral = Referral.model_validate(raw)
    deal = referral_to_deal(referral)
    edited = dataclasses.replace(
        deal, notes="accepted; kickoff next week", sales_stage=StandardStage.DEVELOPED
    )
    out = wire_dump(deal_to_referral(edited, base=referral))
    assert out["fy27Thing"] == {"nested": [1, 2, {"x": None}]}
    assert out["partnerRole"] == "Seller"
    assert out["details"]["incentiveProgram"] == "AzureIPCoSell"
    assert out["customerProfile"]["team"][0]["pronouns"] == "they"
    assert out["details"]["notes"] == "accepted; kickoff next week" and out["salesStage"] == "40"
    expected = documented_normalisation(raw)
    expected["details"]["notes"], expected["salesStage"] = "accepted; kickoff next week", "40"
    assert out == expected


@pytest.mark.parametrize("name", REFERRALS)
def test_create_body_never_echoes_read_only_or_unknown_fields(name: str) -> None:
    raw = fixture_json(name)
    raw["fy27Thing"] = 1
    raw.setdefault("customerProfile", {})["isMatchingComplete"] = True
    body = create_body(Referral.model_validate(raw))
    assert not body.keys() & {
        "id",
        "eTag",
        "links",
        "createdDateTime",
        "updatedDateTime",
        "organizationId",
        "trackingInfo",
        "registrationStatus",
        "fy27Thing",
        "@odata.context",
        "direction",
    }
    assert "isMatchingComplete" not in body.get("customerProfile", {})


def test_real_closed_won_record() -> None:
    deal = referral_to_deal(Referral.model_validate(fixture_json("referral-real-closed-won-ppe.json")))
    assert (deal.status, deal.substatus, deal.is_terminal) == (Status.CLOSED, Substatus.WON, True)
    assert deal.direction is Direction.INBOUND and deal.deal_type is DealType.PARTNER_LED
    assert deal.sales_stage is StandardStage.WON  # the string "100"
    assert deal.value == Money(Decimal(30000), "USD") and deal.close_date == date(2022, 3, 24)
    assert deal.registration is RegistrationState.REVIEW_PENDING
    assert len(deal.team) == 1  # a single object, read as a list of one
    assert deal.team[0].email == ""  # "[REDACTED]" is not an email; the raw referral keeps it
    assert deal.updated_at == datetime(2022, 3, 7, 9, 18, 1, 607654, tzinfo=UTC)
    assert deal.version is not None and deal.version.value == '"8500e212-0000-0100-0000-6225cdc90000"'


def test_real_inbound_record() -> None:
    referral = Referral.model_validate(fixture_json("referral-real-inbound-active-accepted.json"))
    deal = referral_to_deal(referral)
    assert referral.external_reference_id == "" and deal.external_reference_id is None
    assert deal.sales_stage is None and deal.help_requested is None  # "Unknown" = no help
    assert deal.customer is not None and deal.customer.duns is None  # "[REDACTED]" is no D-U-N-S
    assert [s.kind for s in deal.solutions] == [SolutionKind.MICROSOFT, SolutionKind.MICROSOFT]


def test_private_sample_with_pascal_case_consent() -> None:
    referral = Referral.model_validate(fixture_json("create-private-referral-request.json"))
    assert referral.consent is not None and referral.consent.consent_to_share_info_with_others is True
    assert referral.consent.consent_to_microsoft_to_contact_specific_partners is True
    deal = referral_to_deal(referral)
    assert deal.deal_type is DealType.PRIVATE and deal.contact_consent is True
    assert deal.solutions[0].kind is SolutionKind.THIRD_PARTY


def test_list_response_and_targets() -> None:
    page = ReferralList.model_validate(fixture_json("list-referrals-response.json"))
    assert page.count == 1 and len(page.value) == 1
    assert (
        page.next_link == "http://api.partner.microsoft.com/v1.0/referrals?$skiptoken=k181pEdP0ykypkieJfcxX"
    )
    for name, kind in (
        ("create-referral-target-microsoft.json", "BusinessProfileLocation"),
        ("create-referral-target-solution-profile.json", "SolutionProfile"),
    ):
        targets = [Target.model_validate(t) for t in fixture_json(name)["target"]]
        assert targets[0].type == kind


def test_unknown_status_is_isolated_as_a_record_error() -> None:
    raw = fixture_json("get-referral-response.json")
    raw["status"] = "Engaged"  # appears in no Microsoft source (§6.1)
    with pytest.raises(RecordError) as caught:
        referral_to_deal(Referral.model_validate(raw))
    assert caught.value.cause == "pc-unknown-status" and caught.value.record_id == raw["id"]


def test_help_request_makes_co_sell() -> None:
    raw = fixture_json("referral-real-inbound-active-accepted.json")
    raw["inviteContext"]["assistanceRequestCode"] = "ProofOfConceptOrDemo"
    deal = referral_to_deal(Referral.model_validate(raw))
    assert deal.help_requested is HelpType.PROOF_OF_CONCEPT_OR_DEMO and deal.deal_type is DealType.CO_SELL


# --- scalars -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2020-10-30T21:03:00Z", datetime(2020, 10, 30, 21, 3, tzinfo=UTC)),
        ("2020-10-30T21:03:00.1Z", datetime(2020, 10, 30, 21, 3, 0, 100000, tzinfo=UTC)),
        ("2022-03-07T05:08:23.810144Z", datetime(2022, 3, 7, 5, 8, 23, 810144, tzinfo=UTC)),
        ("2022-03-07T09:18:01.6076542Z", datetime(2022, 3, 7, 9, 18, 1, 607654, tzinfo=UTC)),
        ("2018-02-17T00:05:39.5485487+00:00", datetime(2018, 2, 17, 0, 5, 39, 548548, tzinfo=UTC)),
        ("2018-02-17T02:05:39-02:00", datetime(2018, 2, 17, 4, 5, 39, tzinfo=UTC)),
    ],
)
def test_timestamps_with_0_to_7_fractional_digits(text: str, expected: datetime) -> None:
    assert parse_utc(text) == expected


def test_ticks_keep_the_seventh_digit_and_format_is_the_servers() -> None:
    assert utc_ticks("2022-03-07T09:18:01.6076542Z") - utc_ticks("2022-03-07T09:18:01.6076541Z") == 1
    assert utc_ticks("2022-03-07T09:18:01Z") == utc_ticks("2022-03-07T10:18:01+01:00")
    assert format_utc(datetime(2022, 3, 7, 9, 18, 1, 607654, tzinfo=UTC)) == "2022-03-07T09:18:01.6076540Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_utc(datetime(2022, 3, 7))  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError):
        Referral.model_validate({"updatedDateTime": "2022-03-07 09:18"})


@pytest.mark.parametrize(
    ("raw", "stage"),
    [
        ("20", StandardStage.QUALIFIED),
        (40, StandardStage.DEVELOPED),
        ("Propose", StandardStage.PROPOSED),
        ("close", StandardStage.NEGOTIATED),
        ("100", StandardStage.WON),
        (None, None),
        ("", None),
        ("Negotiated", StandardStage.NEGOTIATED),
        ("37", None),
        ("Ponder", None),
    ],
)
def test_sales_stage_reads_every_representation(raw: str | int | None, stage: StandardStage | None) -> None:
    assert parse_stage(raw) is stage


def test_sales_stage_is_written_in_the_configured_representation() -> None:
    assert format_stage(StandardStage.DEVELOPED, "percent_string") == "40"
    assert format_stage(StandardStage.DEVELOPED, "percent_number") == 40
    assert format_stage(StandardStage.DEVELOPED, "stage_word") == "Develop"
    with pytest.raises(RecordError, match="no Partner Center stage word"):
        format_stage(StandardStage.ACCEPTED, "stage_word")


def test_deal_value_as_number_or_string() -> None:
    referral = Referral.model_validate({"details": {"dealValue": "10000.50", "currency": "EUR"}})
    assert referral.details is not None and referral.details.deal_value == Decimal("10000.50")
    assert wire_dump(referral) == {"details": {"dealValue": 10000.5, "currency": "EUR"}}


# --- patches -----------------------------------------------------------------------------------


def test_documented_patches_apply_on_the_patchable_paths() -> None:
    doc = fixture_json("referral-real-inbound-active-accepted.json")
    for name in ("patch-deal-value-and-team.json", "patch-deal-value-and-notes.json", "patch-close-won.json"):
        doc = apply_patch(doc, fixture_json(name), strict=True)
    referral = Referral.model_validate(doc)
    assert referral.details is not None and referral.details.deal_value == Decimal(10000)
    assert referral.substatus == "Won" and len(referral.team or []) == 2


def test_patch_for_a_win_is_the_documented_one() -> None:
    deal = referral_to_deal(
        Referral.model_validate(fixture_json("referral-real-inbound-active-accepted.json"))
    )
    plan = patch_operations(
        deal, dataclasses.replace(deal, status=Status.CLOSED, substatus=Substatus.WON), "percent_string"
    )
    assert plan.body() == fixture_json("patch-close-won.json")


def test_patch_grows_lists_with_add_and_sends_numbers() -> None:
    deal = referral_to_deal(
        Referral.model_validate(fixture_json("referral-real-inbound-active-accepted.json"))
    )
    newcomer = dataclasses.replace(
        deal.team[0], first_name="Jane", last_name="Doe", email="jane.doe@contoso.com"
    )
    after = dataclasses.replace(deal, team=(*deal.team, newcomer), value=Money(Decimal(10500), "USD"))
    body = patch_operations(deal, after, "percent_string").body()
    assert body[0] == {"op": "replace", "path": "/details/dealValue", "value": 10500}
    assert (
        body[1]["op"] == "add"
        and body[1]["path"] == "/team/-"
        and body[1]["value"]["email"] == "jane.doe@contoso.com"
    )
    removed = patch_operations(deal, dataclasses.replace(deal, team=()), "percent_string").body()
    assert removed == [{"op": "replace", "path": "/team", "value": []}]


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "remove", "path": "/details/notes"}],
        [{"op": "replace", "path": "/name", "value": "x"}],
        [{"op": "replace", "path": "/engagementId", "value": "x"}],
        [{"op": "replace", "path": "/details/notes"}],
    ],
)
def test_strict_patch_refuses_what_the_api_refuses(ops: list[dict[str, Any]]) -> None:
    with pytest.raises(JsonPatchError):
        apply_patch(fixture_json("referral-real-inbound-active-accepted.json"), ops, strict=True)
