"""The co-sell business rules as code: may this change happen, and if not, why.

Every check returns a list of :class:`Refusal` (empty = allowed) so a caller can report all problems
of a record at once; :func:`enforce` turns the first into a :class:`~connector.errors.RuleViolation`.
Each refusal names a stable rule id (for audit rows and metrics) and quotes the rule in words a
sales-ops person understands. Source of every rule: ``cosell-domain.md`` and partner-center-api.md §5.3, §6.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal

from connector.domain.model import (
    INCENTIVE_PROGRAMS,
    Deal,
    DealType,
    Direction,
    MicrosoftStatus,
    SolutionKind,
    StandardStage,
    Status,
    Substatus,
    require_utc,
)
from connector.errors import RuleViolation

__all__ = [
    "ALLOWED_STATUS_MOVES",
    "ASSESSMENT_STAGES",
    "TYPE_UPGRADES",
    "Refusal",
    "check_accept",
    "check_close",
    "check_create",
    "check_decline",
    "check_stage_change",
    "check_status_change",
    "check_type_change",
    "check_update",
    "derive_deal_type",
    "enforce",
    "registration_refusals",
]

# Deal registration is refused for smaller deals and too soon after creation (partner-center-api.md §8).
REGISTRATION_MIN_USD = Decimal(25_000)
REGISTRATION_MIN_AGE = timedelta(hours=72)

#: Solution-assessment deals have their own stages, all mandatory before Won (partner-center-api.md §6.5).
ASSESSMENT_STAGES: dict[int, str] = {
    20: "Secure customer LOE",
    40: "Collect data",
    60: "Prepare assessment report",
    80: "Present to customer",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """A rule said no. ``rule`` is stable; ``message`` is for people."""

    rule: str
    message: str
    field: str = ""

    def error(self, record_id: str = "") -> RuleViolation:
        return RuleViolation(self.rule, self.message, record_id=record_id, field=self.field)


def enforce(refusals: Iterable[Refusal], record_id: str = "") -> None:
    """Raise the first refusal as a :class:`RuleViolation`; return quietly when there is none."""
    for refusal in refusals:
        raise refusal.error(record_id)


# --- status and substatus ----------------------------------------------------------------------

_Pair = tuple[Status, Substatus]
_RECEIVED: frozenset[_Pair] = frozenset(
    {(Status.NEW, Substatus.PENDING), (Status.NEW, Substatus.RECEIVED)},
)

#: Status moves the API allows (partner-center-api.md §6.2), refined to substatus pairs by the
#: lifecycle of cosell-domain.md: Received -> Accepted | Declined | Expired; Accepted -> Won | Lost.
ALLOWED_STATUS_MOVES: dict[_Pair, frozenset[_Pair]] = {
    **{
        pair: _RECEIVED
        | {
            (Status.ACTIVE, Substatus.ACCEPTED),
            (Status.CLOSED, Substatus.DECLINED),
            (Status.CLOSED, Substatus.EXPIRED),
        }
        for pair in _RECEIVED
    },
    (Status.ACTIVE, Substatus.ACCEPTED): frozenset(
        {(Status.ACTIVE, Substatus.ACCEPTED), (Status.CLOSED, Substatus.WON), (Status.CLOSED, Substatus.LOST)}
    ),
}


def _fmt(pair: _Pair) -> str:
    return f"{pair[0].value}/{pair[1].value}"


def _terminal(deal: Deal) -> list[Refusal]:
    if deal.is_terminal:
        return [
            Refusal(
                "terminal-immutable",
                f"{deal.label} is {deal.status.value}/{deal.substatus.value}: a Won, Lost, Declined or "
                "Expired deal can never be changed again, by anyone.",
            )
        ]
    return []


def check_status_change(deal: Deal, status: Status, substatus: Substatus) -> list[Refusal]:
    """May the connector move ``deal`` to ``status``/``substatus``?"""
    target = (status, substatus)
    current = (deal.status, deal.substatus)
    if target == current:
        return []
    if refused := _terminal(deal):
        return refused
    if substatus is Substatus.EXPIRED:
        return [
            Refusal(
                "expiry-by-partner-center",
                "Only Partner Center expires a referral (14 days without an answer); the connector never sets Expired.",
                "substatus",
            )
        ]
    if substatus is Substatus.ERROR:
        return [
            Refusal(
                "error-close-not-in-api",
                "Closing a referral as Error is possible only in the Partner Center UI, not through the API.",
                "substatus",
            )
        ]
    allowed = ALLOWED_STATUS_MOVES.get(current, frozenset())
    if target not in allowed:
        options = ", ".join(sorted(_fmt(p) for p in allowed if p != current)) or "none"
        return [
            Refusal(
                "status-transition",
                f"{deal.label} cannot move from {_fmt(current)} to {_fmt(target)}; "
                f"from {_fmt(current)} it may move to: {options}.",
                "status",
            )
        ]
    if substatus is Substatus.DECLINED and deal.direction is not Direction.INBOUND:
        return [Refusal("decline-inbound-only", "Only an inbound referral can be declined.", "substatus")]
    return []


# --- deal type ---------------------------------------------------------------------------------

#: Upgrades allowed before a terminal state (cosell-domain.md "Deal types"); never downgrades.
TYPE_UPGRADES: dict[DealType, frozenset[DealType]] = {
    DealType.PRIVATE: frozenset({DealType.PARTNER_LED, DealType.CO_SELL}),
    DealType.PARTNER_LED: frozenset({DealType.CO_SELL}),
    DealType.P2P: frozenset({DealType.CO_SELL}),
    DealType.CO_SELL: frozenset(),
    DealType.SOLUTION_ASSESSMENT: frozenset(),
}


def derive_deal_type(deal: Deal) -> DealType:
    """The deal type its flags imply: help asked of Microsoft makes co-sell, visibility makes partner-led."""
    if any(s.kind is SolutionKind.ASSESSMENT for s in deal.solutions):
        return DealType.SOLUTION_ASSESSMENT
    if deal.help_requested is not None:
        return DealType.CO_SELL
    if deal.invited_partners and not deal.share_with_microsoft:
        return DealType.P2P
    if deal.share_with_microsoft:
        return DealType.PARTNER_LED
    return DealType.PRIVATE


def check_type_change(before: Deal, after: Deal) -> list[Refusal]:
    """Deal types only upgrade, only before a terminal state; inbound co-sell deals invite no partners."""
    refusals: list[Refusal] = []
    if before.deal_type is not after.deal_type and after.deal_type not in TYPE_UPGRADES[before.deal_type]:
        allowed = ", ".join(t.value for t in sorted(TYPE_UPGRADES[before.deal_type], key=lambda t: t.value))
        refusals.append(
            Refusal(
                "type-no-downgrade",
                f"A {before.deal_type.value} deal cannot become {after.deal_type.value}: deal types only "
                f"upgrade (private -> partner-led -> co-sell), never downgrade"
                f"{'; allowed here: ' + allowed if allowed else '; this type has no upgrade'}.",
                "deal_type",
            )
        )
    new_partners = {p.partner_id for p in after.invited_partners} - {
        p.partner_id for p in before.invited_partners
    }
    if new_partners and before.deal_type is DealType.CO_SELL and before.direction is Direction.INBOUND:
        refusals.append(
            Refusal(
                "invite-partners-outbound-only",
                "Other partners can be invited to a co-sell deal only when the partner created it (outbound), "
                "never to an inbound one.",
                "invited_partners",
            )
        )
    return refusals


# --- mandatory fields --------------------------------------------------------------------------


def _missing(deal: Deal, names: Iterable[str], action: str) -> list[Refusal]:
    out = []
    for name in names:
        value = getattr(deal, name)
        if value is None or (isinstance(value, str | tuple) and not value):
            out.append(
                Refusal(
                    "mandatory-field", f"To {action} a deal, {name.replace('_', ' ')} is mandatory.", name
                )
            )
    return out


def _team_and_solutions(deal: Deal, action: str) -> list[Refusal]:
    out = []
    if not deal.team:
        out.append(
            Refusal("team-required", f"To {action} a deal, at least one team member is needed.", "team")
        )
    elif not all(m.is_complete for m in deal.team):
        out.append(
            Refusal(
                "team-member-incomplete",
                "Every team member needs a name, a phone number and an email.",
                "team",
            )
        )
    if not deal.solutions:
        out.append(
            Refusal("solution-required", f"To {action} a deal, at least one solution is needed.", "solutions")
        )
    return out


def _assessment_shape(deal: Deal) -> list[Refusal]:
    assessments = [s for s in deal.solutions if s.kind is SolutionKind.ASSESSMENT]
    if deal.deal_type is DealType.SOLUTION_ASSESSMENT and (len(assessments) != 1 or len(deal.solutions) != 1):
        return [
            Refusal(
                "assessment-single-solution",
                "A solution assessment deal carries exactly one assessment type and no other solution.",
                "solutions",
            )
        ]
    if deal.deal_type is not DealType.SOLUTION_ASSESSMENT and assessments:
        return [
            Refusal(
                "assessment-solution-type",
                "An assessment solution belongs only on a solution assessment deal.",
                "solutions",
            )
        ]
    return []


def _invitations(deal: Deal) -> list[Refusal]:
    out = []
    for inv in deal.invited_partners:
        if not inv.solutions or not inv.help_wanted.strip():
            out.append(
                Refusal(
                    "p2p-invitation-incomplete",
                    f"The invitation to partner {inv.partner_id} needs at least one solution and the kind of help "
                    "wanted (as well as its close date and value).",
                    "invited_partners",
                )
            )
    return out


def check_create(deal: Deal) -> list[Refusal]:
    """What Partner Center needs to create a deal (cosell-domain.md "Deal fields")."""
    refusals = _missing(deal, ("name", "location_id", "value", "close_date", "customer"), "create")
    refusals += _team_and_solutions(deal, "create")
    refusals += _assessment_shape(deal)
    refusals += _invitations(deal)
    if deal.deal_type is DealType.CO_SELL and deal.customer_contact is None:
        refusals.append(
            Refusal(
                "co-sell-needs-contact",
                "A co-sell deal (help asked of Microsoft) needs a customer contact.",
                "customer_contact",
            )
        )
    if deal.deal_type is DealType.CO_SELL and deal.customer_contact is not None and not deal.contact_consent:
        refusals.append(
            Refusal(
                "contact-consent",
                "The customer contact is shared with Microsoft only with the customer's consent; record it first.",
                "contact_consent",
            )
        )
    expected = derive_deal_type(deal)
    if expected is not deal.deal_type and deal.deal_type is not DealType.P2P:
        refusals.append(
            Refusal(
                "type-mismatch",
                f"The deal is marked {deal.deal_type.value} but its answers (visibility, help requested) make it "
                f"{expected.value}.",
                "deal_type",
            )
        )
    return refusals


def check_accept(deal: Deal) -> list[Refusal]:
    """Accepting an inbound referral needs a deal name, value and close date."""
    return check_status_change(deal, Status.ACTIVE, Substatus.ACCEPTED) + _missing(
        deal, ("name", "value", "close_date"), "accept"
    )


def check_decline(deal: Deal, reason: str | None) -> list[Refusal]:
    """Declining an inbound referral needs a reason."""
    refusals = check_status_change(deal, Status.CLOSED, Substatus.DECLINED)
    if not (reason and reason.strip()):
        refusals.append(
            Refusal("decline-needs-reason", "Declining a referral needs a reason.", "status_reason")
        )
    return refusals


def check_close(deal: Deal, outcome: Substatus, reason: str | None = None) -> list[Refusal]:
    """Closing as Won or Lost: Lost needs a reason; a solution assessment wins only after every stage."""
    refusals = check_status_change(deal, Status.CLOSED, outcome)
    if outcome is Substatus.LOST and not (reason and reason.strip()):
        refusals.append(
            Refusal("lost-needs-reason", "Closing a deal as Lost needs a reason.", "status_reason")
        )
    if outcome is Substatus.WON and deal.deal_type is DealType.SOLUTION_ASSESSMENT:
        missing = [name for pct, name in ASSESSMENT_STAGES.items() if pct not in deal.assessment_stages_done]
        if missing:
            refusals.append(
                Refusal(
                    "assessment-stages-before-won",
                    "A solution assessment deal can be won only once every stage is complete; still open: "
                    + ", ".join(missing)
                    + ".",
                    "sales_stage",
                )
            )
    return refusals


# --- edits -------------------------------------------------------------------------------------

_IMMUTABLE_AFTER_CREATE = (
    "referral_id",
    "engagement_id",
    "direction",
    "location_id",
    "customer",
    "created_at",
)


def check_update(before: Deal, after: Deal) -> list[Refusal]:
    """Every rule that applies when ``before`` (as Partner Center has it) is edited into ``after``."""
    if before == after:
        return []
    if refused := _terminal(before):
        return refused
    refusals: list[Refusal] = []
    for name in _IMMUTABLE_AFTER_CREATE:
        if before.referral_id is not None and getattr(before, name) != getattr(after, name):
            refusals.append(
                Refusal(
                    "immutable-field",
                    f"The {name.replace('_', ' ')} cannot change after the deal is created.",
                    name,
                )
            )
    if (before.status, before.substatus) != (after.status, after.substatus):
        refusals += check_status_change(before, after.status, after.substatus)
    refusals += check_type_change(before, after)
    if before.share_with_microsoft and not after.share_with_microsoft:
        refusals.append(
            Refusal(
                "share-no-downgrade",
                "Once Microsoft sellers may view a deal, that cannot be taken back.",
                "share_with_microsoft",
            )
        )
    if before.help_requested is not None and after.help_requested != before.help_requested:
        refusals.append(
            Refusal(
                "help-type-locked",
                "The help requested from Microsoft cannot be changed or removed once entered.",
                "help_requested",
            )
        )
    if before.deal_type is DealType.CO_SELL and before.customer_contact != after.customer_contact:
        refusals.append(
            Refusal(
                "contact-locked-after-share",
                "The customer contact cannot change after the deal was shared with Microsoft for co-sell.",
                "customer_contact",
            )
        )
    if before.contact_consent != after.contact_consent and before.referral_id is not None:
        refusals.append(
            Refusal(
                "immutable-field",
                "Consent to share contacts cannot change after creation.",
                "contact_consent",
            )
        )
    if before.direction is Direction.OUTBOUND:
        # We are the inviter: what we promised an invited partner is theirs to change, not ours.
        promised = {p.partner_id: (p.close_date, p.value) for p in before.invited_partners}
        for inv in after.invited_partners:
            if inv.partner_id in promised and promised[inv.partner_id] != (inv.close_date, inv.value):
                refusals.append(
                    Refusal(
                        "p2p-inviter-terms-locked",
                        f"The close date and value offered to partner {inv.partner_id} cannot be changed by the "
                        "inviter after the invitation was sent; the invited partner can.",
                        "invited_partners",
                    )
                )
    refusals += _invitations(after)
    if after.sales_stage != before.sales_stage and after.sales_stage is not None:
        # Accepting an inbound referral and setting its first stage is one change (one PATCH).
        accepting = before.status is Status.NEW and after.status is Status.ACTIVE
        stage_base = replace(before, status=after.status, substatus=after.substatus) if accepting else before
        refusals += check_stage_change(stage_base, after.sales_stage, allow_backward=False)
    return refusals


def check_stage_change(deal: Deal, stage: StandardStage, *, allow_backward: bool) -> list[Refusal]:
    """Stages move forward on an open referral; backwards only when the connection's config says so."""
    if refused := _terminal(deal):
        return refused
    if stage is StandardStage.WON:
        return [
            Refusal(
                "won-is-a-status",
                "Won is set by closing the deal as Won, not as a sales stage.",
                "sales_stage",
            )
        ]
    if deal.status is not Status.ACTIVE:
        return [
            Refusal(
                "stage-needs-accepted",
                f"{deal.label} is {deal.status.value}/{deal.substatus.value}: sales stages apply once it is accepted.",
                "sales_stage",
            )
        ]
    if deal.deal_type is DealType.SOLUTION_ASSESSMENT:
        return [
            Refusal(
                "assessment-own-stages",
                "Solution assessment deals have their own mandatory stages; their stage is not synced "
                "unless explicitly mapped.",
                "sales_stage",
            )
        ]
    if deal.sales_stage is not None and stage < deal.sales_stage and not allow_backward:
        return [
            Refusal(
                "stage-backward",
                f"{deal.label} is at {deal.sales_stage.label} ({int(deal.sales_stage)}%); moving it back to "
                f"{stage.label} ({int(stage)}%) needs allow_backward_stages in the connection's sync policy.",
                "sales_stage",
            )
        ]
    return []


# --- deal registration -------------------------------------------------------------------------


def registration_refusals(deal: Deal, won_at: datetime) -> list[Refusal]:
    """Why a won deal may not be registered for incentives yet (empty = eligible)."""
    refusals: list[Refusal] = []
    if deal.substatus is not Substatus.WON:
        refusals.append(Refusal("registration-needs-won", "Only a won deal can be registered.", "substatus"))
    if deal.deal_type not in (DealType.CO_SELL, DealType.PARTNER_LED):
        refusals.append(
            Refusal(
                "registration-type",
                f"Only co-sell and partner-led deals can be registered; this one is {deal.deal_type.value}.",
                "deal_type",
            )
        )
    if not any(s.incentive in INCENTIVE_PROGRAMS for s in deal.solutions):
        refusals.append(
            Refusal(
                "registration-solution",
                "Registration needs an incentive-eligible solution ("
                + ", ".join(sorted(INCENTIVE_PROGRAMS))
                + ").",
                "solutions",
            )
        )
    if deal.deal_type is DealType.CO_SELL and deal.microsoft_status not in (
        MicrosoftStatus.ACCEPTED,
        MicrosoftStatus.WON,
    ):
        refusals.append(
            Refusal(
                "registration-microsoft",
                "A co-sell deal can be registered only after Microsoft accepted the invitation or marked it won.",
                "microsoft_status",
            )
        )
    if deal.value is not None and deal.value.currency == "USD" and deal.value.amount < REGISTRATION_MIN_USD:
        refusals.append(
            Refusal("registration-value", "Registration needs a deal value of at least USD 25,000.", "value")
        )
    if deal.created_at is not None and require_utc(won_at, "won_at") - deal.created_at < REGISTRATION_MIN_AGE:
        refusals.append(
            Refusal(
                "registration-72h",
                "A deal can be registered only if 72 hours passed between its creation and marking it won.",
                "created_at",
            )
        )
    return refusals
