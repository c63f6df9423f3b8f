"""The co-sell rules of cosell-domain.md, one test (at least) per rule."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from connector.domain import rules
from connector.domain.model import (
    Address,
    Contact,
    Customer,
    DealType,
    Direction,
    HelpType,
    MicrosoftStatus,
    Money,
    PartnerInvitation,
    Solution,
    SolutionKind,
    StandardStage,
    Status,
    Substatus,
)
from connector.errors import RecordError, RuleViolation
from tests.unit.factories import BUYER, deal, inbound


def rule_ids(refusals: list[rules.Refusal]) -> list[str]:
    return [r.rule for r in refusals]


# --- status and substatus ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "target"),
    [
        ((Status.NEW, Substatus.RECEIVED), (Status.ACTIVE, Substatus.ACCEPTED)),
        ((Status.NEW, Substatus.PENDING), (Status.ACTIVE, Substatus.ACCEPTED)),
        ((Status.NEW, Substatus.RECEIVED), (Status.CLOSED, Substatus.DECLINED)),
        ((Status.ACTIVE, Substatus.ACCEPTED), (Status.CLOSED, Substatus.WON)),
        ((Status.ACTIVE, Substatus.ACCEPTED), (Status.CLOSED, Substatus.LOST)),
    ],
)
def test_allowed_status_moves(start: tuple[Status, Substatus], target: tuple[Status, Substatus]) -> None:
    d = inbound(status=start[0], substatus=start[1])
    assert rules.check_status_change(d, *target) == []


@pytest.mark.parametrize(
    ("start", "target", "rule"),
    [
        ((Status.ACTIVE, Substatus.ACCEPTED), (Status.NEW, Substatus.RECEIVED), "status-transition"),
        ((Status.ACTIVE, Substatus.ACCEPTED), (Status.CLOSED, Substatus.DECLINED), "status-transition"),
        ((Status.NEW, Substatus.RECEIVED), (Status.CLOSED, Substatus.WON), "status-transition"),
        ((Status.NEW, Substatus.RECEIVED), (Status.CLOSED, Substatus.EXPIRED), "expiry-by-partner-center"),
        ((Status.ACTIVE, Substatus.ACCEPTED), (Status.CLOSED, Substatus.ERROR), "error-close-not-in-api"),
    ],
)
def test_refused_status_moves(
    start: tuple[Status, Substatus], target: tuple[Status, Substatus], rule: str
) -> None:
    d = inbound(status=start[0], substatus=start[1])
    assert rule_ids(rules.check_status_change(d, *target)) == [rule]


def test_refusal_message_names_the_allowed_moves() -> None:
    d = deal()
    [refusal] = rules.check_status_change(d, Status.NEW, Substatus.PENDING)
    assert (
        "Active/Accepted" in refusal.message
        and "Closed/Won" in refusal.message
        and "Closed/Lost" in refusal.message
    )


@pytest.mark.parametrize(
    "terminal", [Substatus.WON, Substatus.LOST, Substatus.DECLINED, Substatus.EXPIRED, Substatus.ERROR]
)
def test_terminal_deals_never_change(terminal: Substatus) -> None:
    d = deal(status=Status.CLOSED, substatus=terminal)
    assert rule_ids(rules.check_status_change(d, Status.ACTIVE, Substatus.ACCEPTED)) == ["terminal-immutable"]
    assert rule_ids(rules.check_update(d, replace(d, notes="edited"))) == ["terminal-immutable"]
    assert rule_ids(rules.check_stage_change(d, StandardStage.PROPOSED, allow_backward=True)) == [
        "terminal-immutable"
    ]
    assert "can never be changed again" in rules.check_update(d, replace(d, notes="x"))[0].message


def test_same_status_is_not_a_change() -> None:
    d = deal(status=Status.CLOSED, substatus=Substatus.WON)
    assert rules.check_status_change(d, Status.CLOSED, Substatus.WON) == []


def test_only_inbound_referrals_can_be_declined() -> None:
    d = deal(direction=Direction.OUTBOUND, status=Status.NEW, substatus=Substatus.PENDING)
    assert rule_ids(rules.check_status_change(d, Status.CLOSED, Substatus.DECLINED)) == [
        "decline-inbound-only"
    ]


def test_enforce_raises_the_first_refusal_as_rule_violation() -> None:
    d = deal(status=Status.CLOSED, substatus=Substatus.WON)
    with pytest.raises(RuleViolation) as info:
        rules.enforce(rules.check_update(d, replace(d, notes="x")), record_id="r-1")
    assert info.value.rule == "terminal-immutable" and info.value.record_id == "r-1"
    assert isinstance(info.value, RecordError)  # a refused change skips the record, the run goes on
    rules.enforce([])  # nothing to refuse: no error


# --- deal types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (DealType.PRIVATE, DealType.PARTNER_LED),
        (DealType.PRIVATE, DealType.CO_SELL),
        (DealType.PARTNER_LED, DealType.CO_SELL),
        (DealType.P2P, DealType.CO_SELL),
        (DealType.CO_SELL, DealType.CO_SELL),
    ],
)
def test_type_upgrades(before: DealType, after: DealType) -> None:
    assert rules.check_type_change(deal(deal_type=before), deal(deal_type=after)) == []


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (DealType.CO_SELL, DealType.PARTNER_LED),
        (DealType.CO_SELL, DealType.PRIVATE),
        (DealType.PARTNER_LED, DealType.PRIVATE),
        (DealType.PRIVATE, DealType.P2P),
        (DealType.SOLUTION_ASSESSMENT, DealType.CO_SELL),
    ],
)
def test_type_downgrades_refused(before: DealType, after: DealType) -> None:
    refusals = rules.check_type_change(deal(deal_type=before), deal(deal_type=after))
    assert rule_ids(refusals) == ["type-no-downgrade"]
    assert "never downgrade" in refusals[0].message


def _invite(partner: str = "p-2") -> PartnerInvitation:
    return PartnerInvitation(
        partner_id=partner,
        close_date=date(2027, 1, 1),
        value=Money(Decimal(1000), "USD"),
        help_wanted="Technical",
        solutions=(Solution(SolutionKind.THIRD_PARTY, "SOL-9"),),
    )


def test_inviting_partners_to_inbound_co_sell_is_refused() -> None:
    before = deal(deal_type=DealType.CO_SELL, direction=Direction.INBOUND)
    after = replace(before, invited_partners=(_invite(),))
    assert rule_ids(rules.check_type_change(before, after)) == ["invite-partners-outbound-only"]
    outbound = deal(deal_type=DealType.CO_SELL)
    assert rules.check_type_change(outbound, replace(outbound, invited_partners=(_invite(),))) == []


def test_p2p_inviting_other_partners_stays_p2p() -> None:
    before = deal(deal_type=DealType.P2P, invited_partners=(_invite("p-2"),))
    after = replace(before, invited_partners=(_invite("p-2"), _invite("p-3")))
    assert rules.check_update(before, after) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, DealType.PRIVATE),
        ({"share_with_microsoft": True}, DealType.PARTNER_LED),
        (
            {"share_with_microsoft": True, "help_requested": HelpType.PROOF_OF_CONCEPT_OR_DEMO},
            DealType.CO_SELL,
        ),
        ({"invited_partners": (_invite(),)}, DealType.P2P),
        ({"solutions": (Solution(SolutionKind.ASSESSMENT, "SA-1"),)}, DealType.SOLUTION_ASSESSMENT),
    ],
)
def test_derive_deal_type(changes: dict[str, object], expected: DealType) -> None:
    assert rules.derive_deal_type(deal(**changes)) is expected


# --- create / accept / decline / close -------------------------------------------------------


def test_a_complete_deal_can_be_created() -> None:
    assert rules.check_create(deal(referral_id=None)) == []


@pytest.mark.parametrize("field", ["name", "location_id", "value", "close_date", "customer"])
def test_create_needs_mandatory_fields(field: str) -> None:
    empty = "" if field == "name" else None
    refusals = rules.check_create(deal(**{field: empty}))
    assert ("mandatory-field", field) in [(r.rule, r.field) for r in refusals]


def test_create_needs_a_complete_team_and_a_solution() -> None:
    assert "team-required" in rule_ids(rules.check_create(deal(team=())))
    incomplete = Contact("Ada", "Lovelace", email="ada@partner.example")  # no phone
    assert "team-member-incomplete" in rule_ids(rules.check_create(deal(team=(incomplete,))))
    assert "solution-required" in rule_ids(rules.check_create(deal(solutions=())))


def test_co_sell_needs_a_customer_contact_with_consent() -> None:
    co_sell = {
        "deal_type": DealType.CO_SELL,
        "share_with_microsoft": True,
        "help_requested": HelpType.GENERAL_OR_OTHER,
    }
    assert "co-sell-needs-contact" in rule_ids(rules.check_create(deal(**co_sell)))
    assert "contact-consent" in rule_ids(rules.check_create(deal(customer_contact=BUYER, **co_sell)))
    assert rules.check_create(deal(customer_contact=BUYER, contact_consent=True, **co_sell)) == []


def test_create_flags_a_type_its_answers_contradict() -> None:
    assert "type-mismatch" in rule_ids(rules.check_create(deal(deal_type=DealType.PARTNER_LED)))


def test_solution_assessment_carries_exactly_one_assessment() -> None:
    sa = Solution(SolutionKind.ASSESSMENT, "SA-1")
    ok = deal(deal_type=DealType.SOLUTION_ASSESSMENT, solutions=(sa,))
    assert rules.check_create(ok) == []
    two = replace(ok, solutions=(sa, Solution(SolutionKind.OWN, "SOL-1")))
    assert "assessment-single-solution" in rule_ids(rules.check_create(two))
    assert "assessment-solution-type" in rule_ids(
        rules.check_create(deal(solutions=(sa,), deal_type=DealType.PRIVATE))
    )


def test_p2p_invitation_needs_solution_and_help() -> None:
    bad = replace(_invite(), solutions=(), help_wanted="")
    assert "p2p-invitation-incomplete" in rule_ids(
        rules.check_create(deal(deal_type=DealType.P2P, invited_partners=(bad,)))
    )


def test_accept_needs_name_value_close_date() -> None:
    assert rules.check_accept(inbound()) == []
    assert ("mandatory-field", "value") in [
        (r.rule, r.field) for r in rules.check_accept(inbound(value=None))
    ]


def test_decline_needs_a_reason() -> None:
    assert rule_ids(rules.check_decline(inbound(), None)) == ["decline-needs-reason"]
    assert rules.check_decline(inbound(), "Customer didn't respond") == []


def test_lost_needs_a_reason() -> None:
    assert rule_ids(rules.check_close(deal(), Substatus.LOST)) == ["lost-needs-reason"]
    assert rules.check_close(deal(), Substatus.LOST, "Customer chose another vendor") == []
    assert rules.check_close(deal(), Substatus.WON) == []


def test_solution_assessment_wins_only_after_every_stage() -> None:
    sa = deal(deal_type=DealType.SOLUTION_ASSESSMENT, solutions=(Solution(SolutionKind.ASSESSMENT, "SA-1"),))
    refusals = rules.check_close(replace(sa, assessment_stages_done=frozenset({20, 40})), Substatus.WON)
    assert rule_ids(refusals) == ["assessment-stages-before-won"]
    assert "Prepare assessment report" in refusals[0].message and "Present to customer" in refusals[0].message
    assert (
        rules.check_close(
            replace(sa, assessment_stages_done=frozenset(rules.ASSESSMENT_STAGES)), Substatus.WON
        )
        == []
    )


# --- edits -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("location_id", "loc-2"),
        ("customer", Customer("Other Inc", Address(country="DE"))),
        ("engagement_id", "e-9"),
        ("direction", Direction.INBOUND),
    ],
)
def test_fields_immutable_after_creation(field: str, value: object) -> None:
    before = deal()
    refusals = rules.check_update(before, replace(before, **{field: value}))
    assert ("immutable-field", field) in [(r.rule, r.field) for r in refusals]


def test_editable_fields_pass() -> None:
    before = deal()
    after = replace(
        before, notes="call scheduled", value=Money(Decimal(60000), "USD"), close_date=date(2027, 6, 30)
    )
    assert rules.check_update(before, after) == []


def test_share_with_microsoft_cannot_be_taken_back() -> None:
    before = deal(deal_type=DealType.PARTNER_LED, share_with_microsoft=True)
    after = replace(before, share_with_microsoft=False, deal_type=DealType.PRIVATE)
    assert {"share-no-downgrade", "type-no-downgrade"} <= set(rule_ids(rules.check_update(before, after)))


def test_help_type_locked_once_entered() -> None:
    before = deal(
        deal_type=DealType.CO_SELL, share_with_microsoft=True, help_requested=HelpType.QUOTES_OR_LICENSING
    )
    after = replace(before, help_requested=HelpType.GENERAL_OR_OTHER)
    assert "help-type-locked" in rule_ids(rules.check_update(before, after))


def test_contact_locked_after_sharing_for_co_sell() -> None:
    before = deal(deal_type=DealType.CO_SELL, customer_contact=BUYER, contact_consent=True)
    after = replace(before, customer_contact=Contact("Someone", "Else", email="else@customer.example"))
    assert "contact-locked-after-share" in rule_ids(rules.check_update(before, after))
    private = deal(customer_contact=BUYER)
    assert rules.check_update(private, replace(private, customer_contact=None)) == []


def test_inviter_cannot_change_promised_terms_but_invitee_can() -> None:
    before = deal(deal_type=DealType.P2P, invited_partners=(_invite(),))
    changed = replace(_invite(), value=Money(Decimal(2000), "USD"))
    assert "p2p-inviter-terms-locked" in rule_ids(
        rules.check_update(before, replace(before, invited_partners=(changed,)))
    )
    as_invitee = replace(before, direction=Direction.INBOUND)
    # direction is immutable, so build the invitee's view from scratch
    invitee_before = deal(deal_type=DealType.P2P, direction=Direction.INBOUND, invited_partners=(_invite(),))
    assert rules.check_update(invitee_before, replace(invitee_before, invited_partners=(changed,))) == []
    assert as_invitee.direction is Direction.INBOUND


# --- stages ------------------------------------------------------------------------------------


def test_stage_moves_forward_not_backward() -> None:
    d = deal(sales_stage=StandardStage.PROPOSED)
    assert rules.check_stage_change(d, StandardStage.NEGOTIATED, allow_backward=False) == []
    assert rule_ids(rules.check_stage_change(d, StandardStage.QUALIFIED, allow_backward=False)) == [
        "stage-backward"
    ]
    assert rules.check_stage_change(d, StandardStage.QUALIFIED, allow_backward=True) == []


def test_stage_rules_for_won_unaccepted_and_assessment() -> None:
    assert rule_ids(rules.check_stage_change(deal(), StandardStage.WON, allow_backward=False)) == [
        "won-is-a-status"
    ]
    assert rule_ids(rules.check_stage_change(inbound(), StandardStage.PROPOSED, allow_backward=False)) == [
        "stage-needs-accepted"
    ]
    sa = deal(deal_type=DealType.SOLUTION_ASSESSMENT)
    assert rule_ids(rules.check_stage_change(sa, StandardStage.PROPOSED, allow_backward=False)) == [
        "assessment-own-stages"
    ]


# --- registration ------------------------------------------------------------------------------

WON = {"status": Status.CLOSED, "substatus": Substatus.WON, "share_with_microsoft": True}


def test_partner_led_won_deal_with_eligible_solution_registers() -> None:
    d = deal(deal_type=DealType.PARTNER_LED, **WON)
    assert rules.registration_refusals(d, won_at=datetime(2026, 2, 1, tzinfo=UTC)) == []


def test_registration_refusals_name_every_missing_condition() -> None:
    d = deal(
        deal_type=DealType.CO_SELL,
        solutions=(Solution(SolutionKind.OWN, "SOL-1"),),
        value=Money(Decimal(1000), "USD"),
        microsoft_status=MicrosoftStatus.INVITED,
    )
    won_at = d.created_at + timedelta(hours=10)  # type: ignore[operator]
    assert set(rule_ids(rules.registration_refusals(d, won_at))) == {
        "registration-needs-won",
        "registration-solution",
        "registration-microsoft",
        "registration-value",
        "registration-72h",
    }


def test_private_deals_never_register() -> None:
    d = deal(status=Status.CLOSED, substatus=Substatus.WON)
    assert "registration-type" in rule_ids(rules.registration_refusals(d, datetime(2026, 6, 1, tzinfo=UTC)))


def test_co_sell_registers_once_microsoft_accepted() -> None:
    d = deal(deal_type=DealType.CO_SELL, microsoft_status=MicrosoftStatus.ACCEPTED, **WON)
    assert rules.registration_refusals(d, datetime(2026, 6, 1, tzinfo=UTC)) == []


def test_accepting_with_a_first_stage_is_one_allowed_change() -> None:
    before = inbound(sales_stage=None)
    after = replace(
        before, status=Status.ACTIVE, substatus=Substatus.ACCEPTED, sales_stage=StandardStage.QUALIFIED
    )
    assert rules.check_update(before, after) == []
    still_new = replace(before, sales_stage=StandardStage.QUALIFIED)
    assert "stage-needs-accepted" in rule_ids(rules.check_update(before, still_new))
