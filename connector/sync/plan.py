"""Deciding what one pair (CRM opportunity, referral) needs: the plan the engine executes, and what
``sync --dry-run`` prints. Pure: no I/O, no adapters; every decision carries the rule behind it.

Inputs are the CRM record (canonical deal + the CRM's stage facts), the referral as Partner Center
has it, the link's merge base, the stage mapping and the connection's policies. Output is a
:class:`PairPlan`: the Partner Center operations (create, field patch, accept, decline, stage, win,
lose), the CRM field and stage changes, refusals (blocked, with the rule's words), changes that
must wait (the rule may allow them later), conflicts for a human, and the new merge base.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from connector.domain import rules
from connector.domain.merge import Direction, FieldConflict, Policy, as_base, base_value, merge, snapshot_of
from connector.domain.model import (
    Contact,
    Deal,
    Money,
    Solution,
    SolutionKind,
    StandardStage,
    Status,
    Substatus,
)
from connector.domain.rules import Refusal
from connector.domain.stages import (
    ReverseKey,
    StageAction,
    StageMapping,
    decide_crm_stage,
    decide_referral_stage,
)
from connector.errors import RecordError

__all__ = ["CrmFacts", "PairPlan", "PcOp", "PcOpKind", "crm_side_settled", "pc_state_key", "plan_pair"]

#: Refusals that only mean "not yet": the change waits in the outbox until the rule allows it.
WAITING_RULES = frozenset({"stage-needs-accepted"})


@dataclass(frozen=True)
class CrmFacts:
    """What the stage mapping needs from the CRM record besides the canonical deal."""

    stage_label: str
    probability: int | None = None
    record_type: str | None = None
    modified: datetime | None = None
    lost_reason: str | None = None

    @classmethod
    def of(cls, deal: Deal) -> CrmFacts:
        info = deal.crm_stage
        if info is None:
            raise RecordError(f"{deal.label} was read without its CRM stage", cause="crm-stage-missing")
        return cls(info.label, info.probability, info.record_type, info.modified, info.lost_reason)


class PcOpKind(StrEnum):
    CREATE = "create"
    PATCH = "patch"  # field changes, applied to the referral as JSON Patch
    ACCEPT = "accept"
    DECLINE = "decline"
    SET_STAGE = "set-stage"
    WIN = "win"
    LOSE = "lose"


@dataclass(frozen=True)
class PcOp:
    kind: PcOpKind
    after: Deal  # the referral as it should be after this operation
    rule: str
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class PairPlan:
    pc_ops: tuple[PcOp, ...] = ()
    crm_changes: Mapping[str, Any] = field(default_factory=dict)  # canonical field -> new value
    crm_stage: str | None = None
    refusals: tuple[Refusal, ...] = ()
    waiting: tuple[Refusal, ...] = ()
    conflicts: tuple[FieldConflict, ...] = ()
    base: dict[str, Any] = field(default_factory=dict)
    explanations: tuple[tuple[str, str, Any, Any, str], ...] = ()  # (field, direction, old, new, rule)
    #: why nothing is done for this record although it is in scope (e.g. closed before it was synced)
    skipped: str = ""

    @property
    def is_noop(self) -> bool:
        return not (
            self.pc_ops
            or self.crm_changes
            or self.crm_stage
            or self.refusals
            or self.waiting
            or self.conflicts
            or self.skipped
        )


def pc_state_key(referral: Deal) -> ReverseKey:
    """Where the referral stands, in the vocabulary of the reverse stage mapping."""
    sub = referral.substatus
    if sub in (Substatus.RECEIVED, Substatus.PENDING):
        return ReverseKey.RECEIVED
    if sub is Substatus.DECLINED:
        return ReverseKey.DECLINED
    if sub in (Substatus.EXPIRED, Substatus.ERROR):
        return ReverseKey.EXPIRED
    if sub is Substatus.WON:
        return ReverseKey.WON
    if sub is Substatus.LOST:
        return ReverseKey.LOST
    stage = referral.sales_stage or StandardStage.ACCEPTED
    return ReverseKey.WON if stage is StandardStage.WON else ReverseKey(stage.name.lower())


def _apply_fields(deal: Deal, values: Mapping[str, Any]) -> Deal:
    """The deal with merged canonical values applied (the inverse of snapshot_of, field by field)."""
    changes: dict[str, Any] = {}
    currency = values.get("currency", deal.value.currency if deal.value else None)
    if "value" in values or "currency" in values:
        amount = values.get("value", str(deal.value.amount) if deal.value else None)
        changes["value"] = Money(Decimal(amount), currency) if amount is not None and currency else None
    if "name" in values:
        changes["name"] = values["name"]
    if "close_date" in values:
        changes["close_date"] = date.fromisoformat(values["close_date"]) if values["close_date"] else None
    if "notes" in values:
        changes["notes"] = values["notes"] or ""
    if "campaign_id" in values:
        changes["campaign_id"] = values["campaign_id"]
    if "team" in values:
        # keep what the snapshot does not carry (a member's title) from the deal's own members
        members = {m.key: m for m in deal.team}
        team = []
        for m in values["team"]:
            key = m["email"] or f"{m['first_name']} {m['last_name']}".strip().lower()
            title = members[key].title if key in members else ""
            team.append(
                Contact(m["first_name"], m["last_name"], email=m["email"], phone=m["phone"], title=title)
            )
        changes["team"] = tuple(team)
    if "solutions" in values:
        known = {s.id: s for s in deal.solutions}
        changes["solutions"] = tuple(
            known.get(i) or Solution(SolutionKind.OWN, i) for i in values["solutions"]
        )
    return replace(deal, **changes)


def plan_pair(
    crm: Deal | None,
    facts: CrmFacts | None,
    referral: Deal | None,
    base: Mapping[str, Any] | None,
    mapping: StageMapping,
    *,
    policies: Mapping[str, Policy] | None = None,
    default_policy: Policy = Policy.NEWEST_WINS,
    create_referrals: bool = True,
    create_opportunities: bool = True,
    location_id: str | None = None,
    crm_readonly: frozenset[str] = frozenset(),
    pc_readonly: frozenset[str] = frozenset(),
) -> PairPlan:
    """Plan one pair. ``crm`` None = a referral with no opportunity yet; ``referral`` None = an
    opted-in opportunity with no referral yet; ``base`` None = never synced."""
    # "lost_reason" among them: the CRM keeps no reason of its own to write (it is no synced field)
    reason_writable = "lost_reason" not in crm_readonly
    crm_readonly = crm_readonly - {"lost_reason"}
    if referral is None:
        assert crm is not None and facts is not None
        plan = _plan_create_referral(crm, facts, mapping, create_referrals, location_id, crm_readonly)
    elif crm is None:
        plan = _plan_create_opportunity(referral, mapping, create_opportunities, crm_readonly)
    else:
        assert facts is not None
        plan = _plan_linked(
            crm, facts, referral, base, mapping, policies or {}, default_policy, crm_readonly, pc_readonly,
            reason_writable,
        )  # fmt: skip
    # the base leaves the planner as the state store keeps it: team members as digests
    return replace(plan, base=as_base(plan.base)) if plan.base else plan


def _plan_create_referral(
    crm: Deal,
    facts: CrmFacts,
    mapping: StageMapping,
    enabled: bool,
    location_id: str | None,
    crm_readonly: frozenset[str] = frozenset(),
) -> PairPlan:
    if not enabled:
        return PairPlan()
    try:
        target = mapping.resolve(facts.stage_label, facts.probability, facts.record_type).target
    except RecordError as exc:
        return PairPlan(refusals=(Refusal("stage-unmapped", str(exc), "sales_stage"),))
    if target.stage is None or target.stage is StandardStage.WON:
        # A deal closed before it was ever synced is history, not co-sell work: like Microsoft's own
        # connector, only open deals become referrals. Said once in the CRM's status field.
        return PairPlan(skipped="closed before it was synced: no referral is created for a closed deal")
    draft = replace(
        crm,
        referral_id=None,
        status=Status.ACTIVE,
        substatus=Substatus.ACCEPTED,
        sales_stage=target.stage,
        external_reference_id=crm.crm_id,
        deal_type=rules.derive_deal_type(crm),
        location_id=crm.location_id or location_id,
    )
    refusals = rules.check_create(draft)
    if refusals:
        return PairPlan(refusals=tuple(refusals))
    base = {**snapshot_of(draft), "crm_stage": facts.stage_label, "pc_state": pc_state_key(draft).value}
    crm_values = snapshot_of(crm) if crm_readonly else {}
    base |= _crm_answers(crm) | {f"crm:{name}": crm_values.get(name) for name in crm_readonly}
    return PairPlan(
        pc_ops=(PcOp(PcOpKind.CREATE, draft, f"opted in, no referral yet ({draft.deal_type.value})"),),
        base=base,
        explanations=(("referral", Direction.TO_PARTNER_CENTER.value, None, draft.name, "create"),),
    )


def _crm_answers(crm: Deal) -> dict[str, Any]:
    return {
        "crm:share": crm.share_with_microsoft,
        "crm:help": crm.help_requested.value if crm.help_requested else None,
    }


def crm_side_settled(
    crm: Deal,
    referral_id: str,
    base: Mapping[str, Any],
    crm_readonly: frozenset[str] = frozenset(),
    pc_readonly: frozenset[str] = frozenset(),
) -> bool:
    """The opportunity holds exactly what the last sync of its pair left (the merge base): its synced
    fields, its stage, its visibility/help answers and the referral id. Then nothing on the CRM side
    asks for a write, and whatever changed on Partner Center's side arrives through Partner Center's
    own listing. Compared by content, not by SystemModstamp: two edits within one second share a
    stamp, and a skipped record would stay unsynced until its next edit."""
    if not base or crm.referral_id != referral_id:
        return False
    if CrmFacts.of(crm).stage_label != base.get("crm_stage"):
        return False
    if any(base.get(k) != v for k, v in _crm_answers(crm).items()):
        return False
    for name, value in snapshot_of(crm).items():
        if name in pc_readonly:  # not sent to Partner Center: a CRM edit of it asks for nothing
            continue
        if base_value(name, base.get(f"crm:{name}" if name in crm_readonly else name)) != base_value(
            name, value
        ):
            return False
    return True


def pc_side_settled(referral: Deal, crm_id: str, base: Mapping[str, Any]) -> bool:
    """The referral holds what the last sync of its pair left: its synced fields, its state and the
    CRM id. The engine asks this only of a referral whose eTag is also the one last synced, so an
    edit that somehow kept its eTag is still caught by content (full reconciliation's promise)."""
    if not base or pc_state_key(referral).value != base.get("pc_state"):
        return False
    if not referral.is_terminal and referral.external_reference_id != crm_id:
        return False
    return all(
        base_value(name, base.get(name)) == base_value(name, value)
        for name, value in snapshot_of(referral).items()
    )


def _plan_create_opportunity(
    referral: Deal, mapping: StageMapping, enabled: bool, crm_readonly: frozenset[str] = frozenset()
) -> PairPlan:
    if not enabled or referral.is_terminal:
        return PairPlan()
    key = pc_state_key(referral)
    try:
        resolution = mapping.to_crm(key)
    except RecordError as exc:
        return PairPlan(refusals=(Refusal("stage-unmapped", str(exc), "sales_stage"),))
    base = {**snapshot_of(referral), "crm_stage": resolution.crm_label, "pc_state": key.value}
    # what the new opportunity will not carry (fields the CRM cannot be written) starts empty there
    base |= {"crm:share": False, "crm:help": None} | {f"crm:{name}": [] for name in crm_readonly}
    return PairPlan(
        crm_changes={**snapshot_of(referral), "referral_id": referral.referral_id},
        crm_stage=resolution.crm_label,
        base=base,
        explanations=(("opportunity", Direction.TO_CRM.value, None, referral.name, resolution.rule),),
    )


def _plan_linked(
    crm: Deal,
    facts: CrmFacts,
    referral: Deal,
    base: Mapping[str, Any] | None,
    mapping: StageMapping,
    policies: Mapping[str, Policy],
    default_policy: Policy,
    crm_readonly: frozenset[str] = frozenset(),
    pc_readonly: frozenset[str] = frozenset(),
    reason_writable: bool = True,
) -> PairPlan:
    explanations: list[tuple[str, str, Any, Any, str]] = []
    refusals: list[Refusal] = []
    waiting: list[Refusal] = []
    pc_ops: list[PcOp] = []
    crm_changes: dict[str, Any] = {}
    crm_stage: str | None = None

    crm_snapshot = snapshot_of(crm)
    merge_base = dict(base) if base is not None else None
    if merge_base is not None:
        # For fields the CRM cannot be written, the CRM's own last-read value is its base: its
        # changes still flow to Partner Center, and Partner Center's own additions survive.
        for name in crm_readonly:
            if f"crm:{name}" in merge_base:
                merge_base[name] = merge_base[f"crm:{name}"]
    fields_plan = merge(
        merge_base,
        crm_snapshot,
        snapshot_of(referral),
        policies=policies,
        default_policy=default_policy,
        crm_modified=facts.modified,
        pc_modified=referral.updated_at,
    )
    new_base = dict(fields_plan.base)
    for name in crm_readonly:
        new_base[f"crm:{name}"] = crm_snapshot.get(name)
    # Fields Partner Center cannot be written (the name, unless /name is enabled) keep Partner
    # Center's value as their base: a CRM rename is not sent, and is not "undone" next run either.
    pc_snapshot = snapshot_of(referral)
    for name in pc_readonly:
        new_base[name] = pc_snapshot.get(name)
    to_pc = {k: v for k, v in fields_plan.toward(Direction.TO_PARTNER_CENTER).items() if k not in pc_readonly}
    for change in fields_plan.changes:
        if change.direction is Direction.TO_CRM and change.field in crm_readonly:
            continue
        if change.direction is Direction.TO_PARTNER_CENTER and change.field in pc_readonly:
            continue
        explanations.append((change.field, change.direction.value, change.old, change.new, change.rule))
    refused_fields: set[str] = set()
    field_refusals_from = len(refusals)
    if referral.is_terminal and to_pc:
        refusals += rules.check_update(referral, _apply_fields(referral, to_pc))[:1]
        refused_fields |= set(to_pc)
        # the CRM keeps its values; the base follows Partner Center, which can no longer change
        for name in to_pc:
            new_base[name] = snapshot_of(referral)[name]
        to_pc = {}
    elif to_pc:
        after = _apply_fields(referral, to_pc)
        refused = rules.check_update(referral, after)
        if refused:
            refusals += refused
            refused_fields |= set(to_pc)
            for name in to_pc:
                new_base[name] = (base or {}).get(name, snapshot_of(referral)[name])
        else:
            pc_ops.append(PcOp(PcOpKind.PATCH, after, "field changes", tuple(sorted(to_pc))))
            referral = after
    if refused_fields:
        # a refused change is audited as refused (with the fields it covered), never as sent
        explanations = [
            e
            for e in explanations
            if not (e[1] == Direction.TO_PARTNER_CENTER.value and e[0] in refused_fields)
        ]
        named = ",".join(sorted(refused_fields))
        refusals[field_refusals_from:] = [
            r if r.field else replace(r, field=named) for r in refusals[field_refusals_from:]
        ]
    crm_changes.update(
        {k: v for k, v in fields_plan.toward(Direction.TO_CRM).items() if k not in crm_readonly}
    )

    # --- identity: every referral the connector pairs carries the CRM id (partner-center-api.md §5.1),
    # so a lost link can always be found again by externalReferenceId
    if not referral.is_terminal and crm.crm_id and referral.external_reference_id != crm.crm_id:
        adopted = replace(referral, external_reference_id=crm.crm_id)
        pc_ops.append(
            PcOp(
                PcOpKind.PATCH,
                adopted,
                "pairing: the CRM id as externalReferenceId",
                ("external_reference_id",),
            )
        )
        explanations.append(
            (
                "external_reference_id",
                Direction.TO_PARTNER_CENTER.value,
                referral.external_reference_id,
                crm.crm_id,
                "pairing",
            )
        )
        referral = adopted

    # ... and the opportunity carries the referral id (read back from the CRM, so a write-back lost
    # to a crash is noticed and made again)
    if referral.referral_id and crm.referral_id != referral.referral_id and "referral_id" not in crm_readonly:
        crm_changes["referral_id"] = referral.referral_id
        explanations.append(
            ("referral_id", Direction.TO_CRM.value, crm.referral_id, referral.referral_id, "pairing")
        )

    # --- deal type: the CRM's visibility/help answers upgrade the referral, never downgrade it.
    # Only "Microsoft sellers may view this deal" has a PATCH path (partner-center-api.md §5.3); help
    # asked of Microsoft (and the contact it needs) cannot be added to an existing referral through
    # the API, so that upgrade is reported for a person to make in Partner Center, and it never
    # holds back the other changes of the record.
    if not referral.is_terminal:
        if crm.share_with_microsoft and not referral.share_with_microsoft:
            upgraded = replace(referral, share_with_microsoft=True)
            upgraded = replace(upgraded, deal_type=rules.derive_deal_type(upgraded))
            refused = rules.check_update(referral, upgraded)
            if refused:
                refusals += refused
            else:
                rule = f"upgrade: {referral.deal_type.value} -> {upgraded.deal_type.value}"
                pc_ops.append(PcOp(PcOpKind.PATCH, upgraded, rule, ("share_with_microsoft",)))
                explanations.append(
                    (
                        "deal_type",
                        Direction.TO_PARTNER_CENTER.value,
                        referral.deal_type.value,
                        upgraded.deal_type.value,
                        rule,
                    )
                )
                referral = upgraded
        # planned for as long as it holds (the engine reports an unchanged block once, not every run)
        if crm.help_requested is not None and referral.help_requested is None:
            refusals.append(
                Refusal(
                    "help-not-patchable",
                    "Asking Microsoft for help turns the deal into co-sell, but Partner Center's API cannot "
                    "add it to an existing referral: request the help in Partner Center.",
                    "help_requested",
                )
            )
        # Only a CRM answer that changed from yes to no is a downgrade attempt; a CRM that never
        # carried the answer (no field for it) is not asking for anything.
        withdrew_share = (base or {}).get("crm:share") is True and not crm.share_with_microsoft
        withdrew_help = (base or {}).get("crm:help") is not None and crm.help_requested is None
        if withdrew_share or withdrew_help:
            refusals += [
                r
                for r in rules.check_update(
                    referral,
                    replace(
                        referral,
                        share_with_microsoft=crm.share_with_microsoft,
                        help_requested=crm.help_requested,
                    ),
                )
                if r.rule in ("share-no-downgrade", "help-type-locked")
            ]

    new_base |= _crm_answers(crm)

    # --- stage and status: through the mapping and the rules, never a blind copy
    known = base or {}
    pc_key = pc_state_key(referral)
    crm_moved = known.get("crm_stage") != facts.stage_label
    pc_moved = known.get("pc_state") != pc_key.value
    if crm_moved and pc_moved and known:
        policy = policies.get("sales_stage", default_policy)
        if policy is Policy.MANUAL or (
            policy is Policy.NEWEST_WINS and (facts.modified is None or referral.updated_at is None)
        ):
            conflict = FieldConflict("sales_stage", known.get("crm_stage"), facts.stage_label, pc_key.value)
            return PairPlan(
                tuple(pc_ops), crm_changes, None, tuple(refusals), (), (*fields_plan.conflicts, conflict),
                new_base, tuple(explanations),
            )  # fmt: skip
        crm_first = policy is Policy.CRM_WINS or (
            policy is Policy.NEWEST_WINS
            and facts.modified is not None
            and referral.updated_at is not None
            and facts.modified >= referral.updated_at
        )
        crm_moved, pc_moved = crm_first, not crm_first
    pc_to_crm = pc_moved and not (crm_moved or not known)
    if crm_moved or not known:
        ops, refused = _crm_stage_to_referral(mapping, referral, facts)
        blocking = [r for r in refused if r.rule not in WAITING_RULES]
        if not ops and blocking and (pc_moved or not known or referral.is_terminal):
            # The CRM's stage cannot reach Partner Center (the referral is closed, or ahead of it):
            # Partner Center's state is then the one to keep, and it comes to the CRM instead.
            pc_to_crm = True
        else:
            for op in ops:
                pc_ops.append(op)
                after_key = pc_state_key(op.after).value
                explanations.append(
                    ("stage", Direction.TO_PARTNER_CENTER.value, pc_key.value, after_key, op.rule)
                )
                referral = op.after
            for r in refused:
                (waiting if r.rule in WAITING_RULES else refusals).append(r)
            if ops or not refused:
                new_base["crm_stage"] = facts.stage_label
                new_base["pc_state"] = pc_state_key(referral).value
            else:
                new_base["crm_stage"] = known.get("crm_stage", facts.stage_label)
                new_base["pc_state"] = pc_key.value
    if pc_to_crm:
        decision = decide_crm_stage(mapping, facts.stage_label, pc_key, facts.record_type)
        if decision.label is not None:
            crm_stage = decision.label
            rule = decision.resolution.rule if decision.resolution else "reverse"
            explanations.append(("stage", Direction.TO_CRM.value, facts.stage_label, decision.label, rule))
            reason = referral.status_reason
            closed_with_reason = pc_key in (ReverseKey.LOST, ReverseKey.DECLINED) and reason
            if reason_writable and closed_with_reason and reason != facts.lost_reason:
                # Why it was lost or declined goes with the close: in Partner Center's words here
                # (partner-center-api.md §6.4); the engine puts them in the CRM's (the reasons map).
                crm_changes["lost_reason"] = reason
                explanations.append(
                    (
                        "lost_reason",
                        Direction.TO_CRM.value,
                        facts.lost_reason,
                        reason,
                        f"reason of the {pc_key.value}",
                    )
                )
        if decision.refusal is not None:
            refusals.append(decision.refusal)
        new_base["crm_stage"] = crm_stage or facts.stage_label
        new_base["pc_state"] = pc_key.value
    elif not (crm_moved or not known):
        new_base["crm_stage"] = facts.stage_label
        new_base["pc_state"] = pc_key.value

    return PairPlan(
        tuple(pc_ops),
        crm_changes,
        crm_stage,
        tuple(refusals),
        tuple(waiting),
        fields_plan.conflicts,
        new_base,
        tuple(explanations),
    )


def _crm_stage_to_referral(
    mapping: StageMapping, referral: Deal, facts: CrmFacts
) -> tuple[list[PcOp], list[Refusal]]:
    """A CRM stage move as a referral operation: accept/decline an unanswered inbound referral, set
    a stage, win or lose; or the refusals that forbid it."""
    if referral.status is Status.NEW and not referral.is_terminal:
        try:
            target = mapping.resolve(facts.stage_label, facts.probability, facts.record_type).target
        except RecordError as exc:
            return [], [Refusal("stage-unmapped", str(exc), "sales_stage")]
        received = mapping.to_crm(ReverseKey.RECEIVED, facts.record_type).crm_label
        if facts.stage_label.casefold() == received.casefold():
            return [], []  # still parked on the "received" stage: nothing to answer yet
        if target.stage is None:  # moved to a lost stage: decline
            reason = facts.lost_reason
            refused = rules.check_decline(referral, reason)
            if refused:
                return [], refused
            after = replace(
                referral, status=Status.CLOSED, substatus=Substatus.DECLINED, status_reason=reason
            )
            return [PcOp(PcOpKind.DECLINE, after, "CRM moved the unanswered referral to a lost stage")], []
        refused = rules.check_accept(referral)
        if refused:
            return [], refused
        accepted = replace(referral, status=Status.ACTIVE, substatus=Substatus.ACCEPTED)
        op_rule = "CRM moved the referral off its received stage"
        if target.stage is StandardStage.WON:
            won = replace(accepted, status=Status.CLOSED, substatus=Substatus.WON)
            return [PcOp(PcOpKind.ACCEPT, accepted, op_rule), PcOp(PcOpKind.WIN, won, "closed-flag:won")], []
        return [PcOp(PcOpKind.ACCEPT, replace(accepted, sales_stage=target.stage), op_rule)], []
    try:
        decision = decide_referral_stage(
            mapping,
            referral,
            facts.stage_label,
            facts.probability,
            facts.record_type,
            lost_reason=facts.lost_reason,
        )
    except RecordError as exc:
        return [], [Refusal("stage-unmapped", str(exc), "sales_stage")]
    rule = decision.resolution.rule if decision.resolution else ""
    if decision.action is StageAction.REFUSED:
        return [], list(decision.refusals)
    if decision.action is StageAction.SET_STAGE:
        return [PcOp(PcOpKind.SET_STAGE, replace(referral, sales_stage=decision.stage), rule)], []
    if decision.action is StageAction.WIN:
        return [
            PcOp(PcOpKind.WIN, replace(referral, status=Status.CLOSED, substatus=Substatus.WON), rule)
        ], []
    if decision.action is StageAction.LOSE:
        reason = facts.lost_reason or "Others"
        after = replace(referral, status=Status.CLOSED, substatus=Substatus.LOST, status_reason=reason)
        return [PcOp(PcOpKind.LOSE, after, rule)], []
    return [], []
