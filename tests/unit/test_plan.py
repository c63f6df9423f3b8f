"""Per-pair planning: lifecycles of cosell-domain.md in both directions, guards, conflicts, no-ops."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from connector.domain.merge import Direction, Policy, snapshot_of
from connector.domain.model import Contact, DealType, Money, StandardStage, Status, Substatus
from connector.mappings import load_mapping_files
from connector.sync.plan import CrmFacts, PairPlan, PcOpKind, pc_state_key, plan_pair
from tests.unit.factories import deal, inbound

MAPPING = load_mapping_files(["builtin:salesforce-default.yaml"]).stages
EARLY, LATE = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)


def base_of(crm_stage: str, referral: Any) -> dict[str, Any]:
    return {**snapshot_of(referral), "crm_stage": crm_stage, "pc_state": pc_state_key(referral).value}


def kinds(plan: PairPlan) -> list[PcOpKind]:
    return [op.kind for op in plan.pc_ops]


def test_an_in_sync_pair_plans_nothing() -> None:
    ref = deal(sales_stage=StandardStage.QUALIFIED)
    plan = plan_pair(ref, CrmFacts("Needs Analysis"), ref, base_of("Needs Analysis", ref), MAPPING)
    assert plan.is_noop
    # and re-planning with the new base stays a no-op (no ping-pong)
    again = plan_pair(ref, CrmFacts("Needs Analysis"), ref, plan.base, MAPPING)
    assert again.is_noop


def test_outbound_opportunity_creates_a_referral() -> None:
    crm = deal(referral_id=None)
    plan = plan_pair(crm, CrmFacts("Value Proposition"), None, None, MAPPING)
    [op] = plan.pc_ops
    assert op.kind is PcOpKind.CREATE
    assert op.after.sales_stage is StandardStage.DEVELOPED and op.after.external_reference_id == crm.crm_id
    assert op.after.deal_type is DealType.PRIVATE
    assert plan.base["crm_stage"] == "Value Proposition"


def test_create_is_refused_with_the_rule_when_data_is_missing() -> None:
    plan = plan_pair(deal(referral_id=None, team=()), CrmFacts("Prospecting"), None, None, MAPPING)
    assert not plan.pc_ops and "team-required" in [r.rule for r in plan.refusals]
    closed = plan_pair(deal(referral_id=None), CrmFacts("Closed Won"), None, None, MAPPING)
    assert not closed.pc_ops and not closed.refusals and closed.skipped.startswith("closed before")


def test_inbound_referral_creates_an_opportunity_at_the_received_stage() -> None:
    ref = inbound()
    plan = plan_pair(None, None, ref, None, MAPPING)
    assert plan.crm_stage == "Prospecting" and plan.crm_changes["referral_id"] == ref.referral_id
    assert plan_pair(None, None, ref, None, MAPPING, create_opportunities=False).is_noop


def test_inbound_received_then_accepted_then_stages_then_won() -> None:
    ref = inbound(sales_stage=None)
    base = base_of("Prospecting", ref)
    # the seller moves the opportunity off the received stage: accept, with the stage
    plan = plan_pair(ref, CrmFacts("Needs Analysis"), ref, base, MAPPING)
    assert kinds(plan) == [PcOpKind.ACCEPT]
    accepted = plan.pc_ops[0].after
    assert (accepted.status, accepted.substatus, accepted.sales_stage) == (
        Status.ACTIVE,
        Substatus.ACCEPTED,
        StandardStage.QUALIFIED,
    )
    # later: proposal
    plan2 = plan_pair(accepted, CrmFacts("Proposal/Price Quote"), accepted, plan.base, MAPPING)
    assert (
        kinds(plan2) == [PcOpKind.SET_STAGE] and plan2.pc_ops[0].after.sales_stage is StandardStage.PROPOSED
    )
    proposed = plan2.pc_ops[0].after
    # won
    plan3 = plan_pair(proposed, CrmFacts("Closed Won"), proposed, plan2.base, MAPPING)
    assert kinds(plan3) == [PcOpKind.WIN] and plan3.pc_ops[0].after.substatus is Substatus.WON


def test_received_straight_to_won_accepts_then_wins() -> None:
    ref = inbound()
    plan = plan_pair(ref, CrmFacts("Closed Won"), ref, base_of("Prospecting", ref), MAPPING)
    assert kinds(plan) == [PcOpKind.ACCEPT, PcOpKind.WIN]


def test_inbound_declined_needs_a_reason() -> None:
    ref = inbound()
    base = base_of("Prospecting", ref)
    refused = plan_pair(ref, CrmFacts("Closed Lost"), ref, base, MAPPING)
    assert [r.rule for r in refused.refusals] == ["decline-needs-reason"]
    assert refused.base["crm_stage"] == "Prospecting"  # retried next run once a reason is given
    plan = plan_pair(ref, CrmFacts("Closed Lost", lost_reason="Customer didn't respond"), ref, base, MAPPING)
    assert (
        kinds(plan) == [PcOpKind.DECLINE] and plan.pc_ops[0].after.status_reason == "Customer didn't respond"
    )


@pytest.mark.parametrize(
    ("substatus", "readonly", "wanted"),
    [
        (Substatus.LOST, frozenset(), {"lost_reason": "Customer chose another vendor"}),
        (Substatus.DECLINED, frozenset(), {"lost_reason": "Customer chose another vendor"}),
        (Substatus.LOST, frozenset({"lost_reason"}), {}),  # the CRM keeps no reason: none is sent
        (Substatus.WON, frozenset(), {}),
    ],
)
def test_a_close_in_partner_center_brings_its_reason_to_the_crm(
    substatus: Substatus, readonly: frozenset[str], wanted: dict[str, str]
) -> None:
    ref = deal(referral_id="r-1", external_reference_id="006A")
    base = base_of("Needs Analysis", ref)
    closed = replace(
        ref, status=Status.CLOSED, substatus=substatus, status_reason="Customer chose another vendor"
    )
    plan = plan_pair(ref, CrmFacts("Needs Analysis"), closed, base, MAPPING, crm_readonly=readonly)
    assert plan.crm_stage in ("Closed Lost", "Closed Won")
    assert {k: v for k, v in plan.crm_changes.items() if k == "lost_reason"} == wanted
    said = [e for e in plan.explanations if e[0] == "lost_reason"]
    assert [(e[1], e[3]) for e in said] == [(Direction.TO_CRM.value, v) for v in wanted.values()]
    assert "lost_reason" not in plan.base and "crm:lost_reason" not in plan.base  # no synced field


def test_expired_referral_moves_the_opportunity_to_lost() -> None:
    ref = inbound()
    expired = replace(ref, status=Status.CLOSED, substatus=Substatus.EXPIRED)
    plan = plan_pair(ref, CrmFacts("Prospecting"), expired, base_of("Prospecting", ref), MAPPING)
    assert plan.crm_stage == "Closed Lost" and not plan.pc_ops


def test_partner_center_stage_moves_the_crm_forward_not_back() -> None:
    ref = deal(sales_stage=StandardStage.QUALIFIED)
    base = base_of("Needs Analysis", ref)
    ahead = replace(ref, sales_stage=StandardStage.NEGOTIATED)
    plan = plan_pair(ref, CrmFacts("Needs Analysis"), ahead, base, MAPPING)
    assert plan.crm_stage == "Negotiation/Review"
    crm_ahead_base = base_of("Negotiation/Review", deal(sales_stage=StandardStage.NEGOTIATED))
    behind = deal(sales_stage=StandardStage.QUALIFIED)
    back = plan_pair(ref, CrmFacts("Negotiation/Review"), behind, crm_ahead_base, MAPPING)
    assert back.crm_stage is None and [r.rule for r in back.refusals] == ["stage-backward"]


def test_crm_stage_backwards_is_blocked_with_the_rule() -> None:
    ref = deal(sales_stage=StandardStage.PROPOSED)
    plan = plan_pair(ref, CrmFacts("Prospecting"), ref, base_of("Proposal/Price Quote", ref), MAPPING)
    assert not plan.pc_ops and [r.rule for r in plan.refusals] == ["stage-backward"]


def test_changes_to_a_closed_referral_are_refused_and_not_sent() -> None:
    won = deal(status=Status.CLOSED, substatus=Substatus.WON)
    crm = replace(won, notes="edited after the win")
    plan = plan_pair(crm, CrmFacts("Closed Won"), won, base_of("Closed Won", won), MAPPING)
    assert not plan.pc_ops and [r.rule for r in plan.refusals] == ["terminal-immutable"]
    assert plan.base["notes"] == won.notes  # the base follows the frozen referral


def test_stage_waits_until_the_referral_is_accepted() -> None:
    pending = deal(status=Status.NEW, substatus=Substatus.PENDING)
    plan = plan_pair(
        pending, CrmFacts("Value Proposition"), pending, base_of("Prospecting", pending), MAPPING
    )
    # an outbound "New/Pending" referral behaves like an unanswered one: CRM moved on -> accept it
    assert kinds(plan) == [PcOpKind.ACCEPT]


def test_field_changes_flow_both_ways_in_one_plan() -> None:
    ref = deal()
    base = base_of("Needs Analysis", ref)
    crm = replace(ref, value=Money(Decimal(75000), "USD"))
    pc = replace(ref, notes="Microsoft seller engaged")
    plan = plan_pair(crm, CrmFacts("Needs Analysis"), pc, base, MAPPING)
    [patch] = plan.pc_ops
    assert patch.kind is PcOpKind.PATCH and patch.fields == ("value",)
    assert (
        patch.after.value == Money(Decimal(75000), "USD") and patch.after.notes == "Microsoft seller engaged"
    )
    assert plan.crm_changes == {"notes": "Microsoft seller engaged"}
    assert ("value", Direction.TO_PARTNER_CENTER.value) in [(e[0], e[1]) for e in plan.explanations]


def test_team_member_added_by_microsoft_survives_a_crm_push() -> None:
    ref = deal()
    base = base_of("Needs Analysis", ref)
    ms = Contact("Mia", "Soft", email="mia@microsoft.example", phone="+1 555 0001")
    rep = Contact("Ned", "Rep", email="ned@partner.example", phone="+1 555 0002")
    plan = plan_pair(
        replace(ref, team=(*ref.team, rep)),
        CrmFacts("Needs Analysis"),
        replace(ref, team=(*ref.team, ms)),
        base,
        MAPPING,
    )
    [patch] = plan.pc_ops
    assert {m.email for m in patch.after.team} == {
        "ada@partner.example",
        "ned@partner.example",
        "mia@microsoft.example",
    }
    assert {m["email"] for m in plan.crm_changes["team"]} == {m.email for m in patch.after.team}


@pytest.mark.parametrize(
    ("policy", "expect_pc", "expect_crm"),
    [
        (Policy.CRM_WINS, "150000", None),
        (Policy.PARTNER_CENTER_WINS, None, "120000"),
        (Policy.MANUAL, None, None),
    ],
)
def test_conflicting_values_follow_the_policy(
    policy: Policy, expect_pc: str | None, expect_crm: str | None
) -> None:
    ref = deal()
    base = base_of("Needs Analysis", ref)
    crm = replace(ref, value=Money(Decimal(150000), "USD"))
    pc = replace(ref, value=Money(Decimal(120000), "USD"))
    plan = plan_pair(
        crm, CrmFacts("Needs Analysis", modified=EARLY), pc, base, MAPPING, policies={"value": policy}
    )
    sent = plan.pc_ops[0].after.value if plan.pc_ops else None
    assert (str(sent.amount) if sent else None) == expect_pc
    assert plan.crm_changes.get("value") == expect_crm
    assert bool(plan.conflicts) is (policy is Policy.MANUAL)


def test_both_sides_moving_the_stage_is_a_conflict_under_manual() -> None:
    ref = deal(sales_stage=StandardStage.QUALIFIED)
    base = base_of("Needs Analysis", ref)
    pc = replace(ref, sales_stage=StandardStage.DEVELOPED)
    plan = plan_pair(
        ref, CrmFacts("Proposal/Price Quote"), pc, base, MAPPING, policies={"sales_stage": Policy.MANUAL}
    )
    assert [c.field for c in plan.conflicts] == ["sales_stage"] and not plan.pc_ops and plan.crm_stage is None
    crm_wins = plan_pair(
        ref, CrmFacts("Proposal/Price Quote"), pc, base, MAPPING, policies={"sales_stage": Policy.CRM_WINS}
    )
    assert kinds(crm_wins) == [PcOpKind.SET_STAGE]


def test_outbound_private_upgrades_to_partner_led_then_co_sell() -> None:
    from connector.domain.model import HelpType
    from tests.unit.factories import BUYER

    ref = deal()
    base = base_of("Needs Analysis", ref)
    visible = replace(ref, share_with_microsoft=True)
    plan = plan_pair(visible, CrmFacts("Needs Analysis"), ref, base, MAPPING)
    [op] = plan.pc_ops
    assert op.after.deal_type is DealType.PARTNER_LED and op.rule == "upgrade: private -> partner-led"
    partner_led = op.after
    help_wanted = replace(
        visible,
        help_requested=HelpType.PROOF_OF_CONCEPT_OR_DEMO,
        customer_contact=BUYER,
        contact_consent=True,
    )
    # asking for Microsoft's help has no PATCH path: reported for a person, other changes still go
    help_and_value = replace(help_wanted, value=Money(Decimal(60000), "USD"))
    plan2 = plan_pair(help_and_value, CrmFacts("Needs Analysis"), partner_led, plan.base, MAPPING)
    assert [r.rule for r in plan2.refusals] == ["help-not-patchable"]
    assert [o.kind for o in plan2.pc_ops] == [PcOpKind.PATCH] and plan2.pc_ops[0].fields == ("value",)
    assert plan2.pc_ops[0].after.help_requested is None
    # the CRM un-ticking visibility later is a downgrade: refused with the rule, nothing sent
    plan3 = plan_pair(
        replace(visible, share_with_microsoft=False),
        CrmFacts("Needs Analysis"),
        partner_led,
        plan.base,
        MAPPING,
    )
    assert not plan3.pc_ops and "share-no-downgrade" in [r.rule for r in plan3.refusals]


def test_pairing_never_copies_a_customer_contact_without_consent_and_help() -> None:
    from tests.unit.factories import BUYER

    ref = deal()
    crm = replace(ref, customer_contact=BUYER)  # the CRM knows a contact; no help asked, no consent
    plan = plan_pair(crm, CrmFacts("Needs Analysis"), ref, base_of("Needs Analysis", ref), MAPPING)
    assert all(op.after.customer_contact is None for op in plan.pc_ops)
    assert plan.is_noop


def test_a_won_referral_brings_the_crm_to_won_even_when_the_crm_stage_moved_too() -> None:
    ref = deal(sales_stage=StandardStage.QUALIFIED)
    base = base_of("Needs Analysis", ref)
    won = replace(ref, status=Status.CLOSED, substatus=Substatus.WON)
    crm = CrmFacts("Proposal/Price Quote", modified=LATE)  # newer than Partner Center's win
    plan = plan_pair(ref, crm, replace(won, updated_at=EARLY), base, MAPPING)
    assert plan.crm_stage == "Closed Won" and not plan.pc_ops
    assert plan.base["pc_state"] == "won"


def test_first_pairing_with_partner_center_ahead_moves_the_crm_forward() -> None:
    ahead = deal(sales_stage=StandardStage.NEGOTIATED)
    plan = plan_pair(ahead, CrmFacts("Needs Analysis"), ahead, None, MAPPING)
    assert plan.crm_stage == "Negotiation/Review" and not plan.refusals
    again = plan_pair(ahead, CrmFacts("Negotiation/Review"), ahead, plan.base, MAPPING)
    assert again.is_noop


def test_a_side_is_settled_only_when_it_holds_the_merge_base() -> None:
    from connector.domain.model import CrmStageInfo
    from connector.sync.plan import crm_side_settled, pc_side_settled

    ref = deal(sales_stage=StandardStage.QUALIFIED)
    assert ref.referral_id and ref.crm_id and ref.external_reference_id == ref.crm_id
    crm = replace(ref, crm_stage=CrmStageInfo("Needs Analysis", 20))
    base = plan_pair(crm, CrmFacts.of(crm), ref, base_of("Needs Analysis", ref), MAPPING).base
    assert crm_side_settled(crm, ref.referral_id, base) and pc_side_settled(ref, ref.crm_id, base)
    # the CRM side: any synced field, the stage, the referral id, the visibility answer
    assert not crm_side_settled(replace(crm, notes="edited"), ref.referral_id, base)
    moved = replace(crm, crm_stage=CrmStageInfo("Proposal/Price Quote", 75))
    assert not crm_side_settled(moved, ref.referral_id, base)
    assert not crm_side_settled(crm, "another-referral", base)
    assert not crm_side_settled(
        replace(crm, share_with_microsoft=not crm.share_with_microsoft), ref.referral_id, base
    )
    # a rename Partner Center is not sent (no /name patch) asks nothing of the CRM side
    assert crm_side_settled(
        replace(crm, name="Renamed"), ref.referral_id, base, pc_readonly=frozenset({"name"})
    )
    assert not crm_side_settled(replace(crm, name="Renamed"), ref.referral_id, base)
    # the Partner Center side: fields, state, the CRM id it carries
    assert not pc_side_settled(replace(ref, notes="edited"), ref.crm_id, base)
    assert not pc_side_settled(replace(ref, sales_stage=StandardStage.PROPOSED), ref.crm_id, base)
    assert not pc_side_settled(replace(ref, external_reference_id=None), ref.crm_id, base)
    assert not crm_side_settled(crm, ref.referral_id, {}) and not pc_side_settled(ref, ref.crm_id, {})
