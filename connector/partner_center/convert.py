"""Referral (wire) <-> Deal (canonical), both ways, and the JSON Patch that turns one Deal into another.

- :func:`referral_to_deal` reads every documented shape (partner-center-api.md §5, §12).
- :func:`deal_to_referral` builds a referral for a create, or applies a deal's changes onto the
  referral it was read from, so everything the canonical model does not carry (requirements, tracking
  info, unknown FY26 fields) survives the round trip untouched.
- :func:`patch_operations` is the PATCH body for an edit: only Swagger-patchable paths (§5.3), lists
  grown with ``add …/-`` so members Microsoft added are not dropped, ``dealValue`` sent as a number.

The sales stage representation is configuration (§6.5): ``percent_string`` ("20", the default and
what live records show), ``percent_number`` (20) or ``stage_word`` ("Qualify"); reading accepts all
three plus ``null``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal

import structlog

from connector.domain.model import (
    Address,
    Contact,
    Customer,
    Deal,
    DealType,
    Direction,
    HelpType,
    Money,
    RegistrationState,
    Solution,
    SolutionKind,
    StandardStage,
    Status,
    Substatus,
    VersionTag,
)
from connector.domain.rules import derive_deal_type
from connector.errors import RecordError
from connector.partner_center.jsonpatch import apply_patch
from connector.partner_center.models import (
    CustomerId,
    Details,
    Member,
    PatchOp,
    Referral,
    SolutionTag,
    json_number,
    parse_utc,
    wire_dump,
)

__all__ = [
    "STAGE_WORDS",
    "SYSTEM",
    "PatchPlan",
    "StageFormat",
    "deal_to_referral",
    "format_stage",
    "parse_stage",
    "patch_operations",
    "referral_to_deal",
]

SYSTEM = "partner-center"
StageFormat = Literal["percent_string", "percent_number", "stage_word"]

#: Swagger's salesStage enum, aliased to the standard stages by percentage (§6.5 "assumed alias").
STAGE_WORDS: dict[StandardStage, str] = {
    StandardStage.QUALIFIED: "Qualify",
    StandardStage.DEVELOPED: "Develop",
    StandardStage.PROPOSED: "Propose",
    StandardStage.NEGOTIATED: "Close",
}
_WORD_STAGES = {word.casefold(): stage for stage, word in STAGE_WORDS.items()}
#: what format_stage writes, in each representation: read back by one lookup (parse_stage reads them
#: the same way through its general path)
_STAGE_EXACT: dict[str | int, StandardStage] = {
    **{str(int(stage)): stage for stage in StandardStage},
    **{int(stage): stage for stage in StandardStage},
    **{word: stage for stage, word in STAGE_WORDS.items()},
}

log = structlog.get_logger(__name__)


# --- sales stage -------------------------------------------------------------------------------


def format_stage(stage: StandardStage, fmt: StageFormat) -> str | int:
    """The wire value for ``stage`` in the configured representation."""
    if fmt == "percent_string":
        return str(int(stage))
    if fmt == "percent_number":
        return int(stage)
    try:
        return STAGE_WORDS[stage]
    except KeyError:
        raise RecordError(
            f"sales stage {stage.label} has no Partner Center stage word (only "
            + ", ".join(STAGE_WORDS.values())
            + "); use sales_stage_format percent_string or percent_number",
            cause="stage-no-word",
        ) from None


def parse_stage(raw: str | int | float | None) -> StandardStage | None:
    """Any of the three representations, a standard stage name, or null. Unknown values read as
    "no stage" (logged), never as an error: enum drift must not stop a sync (§12)."""
    if type(raw) is str or type(raw) is int:
        stage = _STAGE_EXACT.get(raw)  # the usual values, as they are written
        if stage is not None:
            return stage
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return StandardStage(int(raw))
        text = str(raw).strip()
        if text.casefold() in _WORD_STAGES:
            return _WORD_STAGES[text.casefold()]
        return StandardStage.parse(text)
    except (ValueError, KeyError):
        log.warning("pc.sales_stage_unknown", value=str(raw)[:40])
        return None


# --- wire -> canonical -------------------------------------------------------------------------

# Enum lookups by value as plain dicts: ``Status(text)`` goes through EnumMeta.__call__ (a listing
# converts every referral). Same members, same misses.
_STATUS = {s.value: s for s in Status}
_SUBSTATUS = {s.value: s for s in Substatus}
_REGISTRATION = {s.value: s for s in RegistrationState}
_HELP = {h.value: h for h in HelpType}


def _person(first_name: str, last_name: str, email: str, phone: str, title: str) -> Contact:
    # Not cached, though the same sellers recur: customer contacts pass here too, and a daemon must
    # not hold them beyond the record being read.
    try:
        return Contact(first_name=first_name, last_name=last_name, email=email, phone=phone, title=title)
    except ValueError:
        # Live records carry redacted or malformed emails; the raw referral keeps the original.
        return Contact(first_name=first_name, last_name=last_name, email="", phone=phone, title=title)


def _contact(member: Member) -> Contact:
    return _person(
        member.first_name or "",
        member.last_name or "",
        member.email or "",
        member.phone_number or "",
        member.title or "",
    )


def _solution(tag: SolutionTag) -> Solution | None:
    return _solution_of(tag.id or "", tag.name or "", tag.type, tag.solution_type or "")


@functools.lru_cache(maxsize=1024)
def _solution_of(tag_id: str, name: str, tag_type: str | None, solution_type: str) -> Solution | None:
    # Cached: a Solution is immutable and the same few solutions are on many referrals.
    if not tag_id.strip():
        return None
    # Whose solution it is is not on the wire; a heuristic from solutionType / type (§5.2).
    if solution_type.upper() == "3P":
        kind = SolutionKind.THIRD_PARTY
    elif tag_type == "Category" or not tag_id.upper().startswith("SOL-"):
        kind = SolutionKind.MICROSOFT
    else:
        kind = SolutionKind.OWN
    return Solution(kind=kind, id=tag_id, name=name)


def _duns(ids: list[CustomerId] | None) -> str | None:
    for i in ids or ():
        if i.profile_type == "Duns" and (i.id or "").isdigit():
            return i.id if len(i.id or "") == 9 else None  # the first digits-only Duns id decides
    return None


def _customer(ref: Referral) -> Customer | None:
    profile = ref.customer_profile
    if profile is None or not (profile.name or "").strip() or profile.address is None:
        return None
    a = profile.address
    try:
        return Customer(
            name=profile.name or "",
            address=Address(
                country=(a.country or "").upper(),
                line1=a.address_line1 or "",
                line2=a.address_line2 or "",
                city=a.city or "",
                state=a.state or "",
                postal_code=a.postal_code or "",
                region=a.region or "",
            ),
            duns=_duns(profile.ids),
            size=profile.size or "",
        )
    except ValueError:
        log.warning("pc.customer_unreadable", referral_id=ref.id)
        return None


def _value(ref: Referral) -> Money | None:
    d = ref.details
    if d is None or d.deal_value is None or not d.currency:
        return None
    try:
        return Money(d.deal_value, d.currency.upper())
    except ValueError:
        log.warning("pc.deal_value_unreadable", referral_id=ref.id)
        return None


def _direction(ref: Referral) -> Direction:
    if ref.direction == "Incoming":
        return Direction.INBOUND
    if ref.direction == "Outgoing":
        return Direction.OUTBOUND
    # No direction on create responses: an invitation from someone else is inbound.
    inviter = (
        ref.invite_context.invited_by.organization_id
        if ref.invite_context and ref.invite_context.invited_by
        else None
    )
    return Direction.INBOUND if inviter and inviter != ref.organization_id else Direction.OUTBOUND


def _help(ref: Referral) -> HelpType | None:
    # "Unknown" means no help; other values are enum drift, kept raw on the referral
    code = ref.invite_context.assistance_request_code if ref.invite_context else None
    return _HELP.get(code) if code else None


def _registration(raw: str | None) -> RegistrationState:
    if not raw:
        return RegistrationState.NONE
    return _REGISTRATION.get(raw, RegistrationState.OTHER)


def _solutions(details: Details | None) -> tuple[Solution, ...]:
    tags = details.requirements.solutions if details and details.requirements else None
    if not tags:
        return ()
    out = []
    for tag in tags:
        solution = _solution(tag)
        if solution is not None:
            out.append(solution)
    return tuple(out)


def referral_to_deal(ref: Referral) -> Deal:
    """The canonical deal a referral describes. Raises :class:`RecordError` for a referral that cannot
    be represented (an unknown status), so a page isolates it instead of failing."""
    status = _STATUS.get(ref.status or "None")
    substatus = _SUBSTATUS.get(ref.substatus or "None")
    if status is None or substatus is None:
        rid = ref.id or ""
        raise RecordError(
            f"referral {rid}: unknown status {ref.status!r}/{ref.substatus!r}",
            record_id=rid,
            cause="pc-unknown-status",
        )
    details = ref.details
    consent = ref.consent
    profile = ref.customer_profile
    closing = details.closing_date_time if details else None
    created, updated = ref.created_date_time, ref.updated_date_time
    deal = Deal(
        name=ref.name or "",
        direction=_direction(ref),
        deal_type=DealType.PRIVATE,  # derived below from the flags
        status=status,
        substatus=substatus,
        referral_id=ref.id,
        engagement_id=ref.engagement_id,
        external_reference_id=ref.crm_reference,
        sales_stage=parse_stage(ref.sales_stage),
        customer=_customer(ref),
        customer_contact=_contact(profile.team[0]) if profile and profile.team else None,
        contact_consent=bool(consent and consent.consent_to_share_info_with_others),
        value=_value(ref),
        close_date=parse_utc(closing).date() if closing else None,
        notes=(details.notes if details else None) or "",
        campaign_id=ref.campaign_id or None,
        status_reason=ref.status_reason,
        team=tuple([_contact(m) for m in ref.team]) if ref.team else (),
        solutions=_solutions(details),
        help_requested=_help(ref),
        share_with_microsoft=bool(consent and consent.consent_to_share_referral_with_microsoft_sellers),
        registration=_registration(ref.registration_status),
        created_at=parse_utc(created) if created else None,
        updated_at=parse_utc(updated) if updated else None,
        version=VersionTag(SYSTEM, ref.e_tag) if ref.e_tag else None,
    )
    # The type follows from the flags just read. Set on the new, not yet shared, instance rather
    # than through dataclasses.replace, which would build (and check) the whole deal a second time.
    object.__setattr__(deal, "deal_type", derive_deal_type(deal))
    return deal


# --- canonical -> wire -------------------------------------------------------------------------


def _member(contact: Contact) -> dict[str, Any]:
    out: dict[str, Any] = {
        "firstName": contact.first_name,
        "lastName": contact.last_name,
        "phoneNumber": contact.phone,
        "email": contact.email,
    }
    if contact.title:
        out["title"] = contact.title
    return out


def _solution_tag(solution: Solution) -> dict[str, Any]:
    out: dict[str, Any] = {"id": solution.id, "type": "Name"}
    if solution.name:
        out["name"] = solution.name
    if solution.kind is SolutionKind.THIRD_PARTY:
        out["solutionType"] = "3P"
    return out


def _closing(day: date) -> str:
    return f"{day.isoformat()}T00:00:00Z"


def _crm_ref(deal: Deal) -> str | None:
    return deal.external_reference_id or deal.crm_id


@dataclass(frozen=True, slots=True)
class PatchPlan:
    """The PATCH body for an edit, and what changed but cannot be sent (not a Swagger patch path)."""

    operations: tuple[PatchOp, ...]
    unpatchable: tuple[str, ...] = ()

    def body(self) -> list[dict[str, Any]]:
        return [op.model_dump(mode="json") for op in self.operations]


def _grow_or_replace(path: str, before: Sequence[Any], after: Sequence[Any], wire: Any) -> list[PatchOp]:
    if list(after) == list(before):
        return []
    if list(after[: len(before)]) == list(before):
        # Additions only: `add …/-` keeps members Microsoft added since we read (§5.3).
        return [PatchOp(op="add", path=f"{path}/-", value=wire(x)) for x in after[len(before) :]]
    return [PatchOp(op="replace", path=path, value=[wire(x) for x in after])]


def patch_operations(before: Deal, after: Deal, fmt: StageFormat, *, patch_name: bool = False) -> PatchPlan:
    """JSON Patch turning ``before`` (as Partner Center has it) into ``after``; see the module doc."""
    ops: list[PatchOp] = []
    unpatchable: list[str] = []

    def replace(path: str, value: Any) -> None:
        ops.append(PatchOp(op="replace", path=path, value=value))

    if _crm_ref(after) and _crm_ref(after) != _crm_ref(before):
        replace("/externalReferenceId", _crm_ref(after))
    if (after.status, after.substatus) != (before.status, before.substatus):
        replace("/status", after.status.value)
        replace("/substatus", after.substatus.value)
    if after.status_reason != before.status_reason and after.status_reason is not None:
        replace("/statusReason", after.status_reason)
    if after.sales_stage is not None and after.sales_stage != before.sales_stage:
        replace("/salesStage", format_stage(after.sales_stage, fmt))
    if after.value is not None and after.value != before.value:
        if before.value is None or after.value.amount != before.value.amount:
            replace("/details/dealValue", json_number(after.value.amount))
        if before.value is None or after.value.currency != before.value.currency:
            replace("/details/currency", after.value.currency)
    if after.close_date is not None and after.close_date != before.close_date:
        replace("/details/closingDateTime", _closing(after.close_date))
    if after.notes != before.notes:
        replace("/details/notes", after.notes)
    if after.campaign_id != before.campaign_id and after.campaign_id is not None:
        replace("/campaignId", after.campaign_id)
    ops += _grow_or_replace("/team", before.team, after.team, _member)
    if after.customer_contact != before.customer_contact:
        replace("/customerProfile/team", [_member(after.customer_contact)] if after.customer_contact else [])
    ops += _grow_or_replace(
        "/details/requirements/solutions", before.solutions, after.solutions, _solution_tag
    )
    if after.share_with_microsoft != before.share_with_microsoft:
        replace("/consent/consentToShareReferralWithMicrosoftSellers", after.share_with_microsoft)
    if after.name != before.name:
        # `/name` is not in the Swagger patch list (§5.3); sending it is opt-in until the live API
        # is seen to accept it.
        if patch_name:
            replace("/name", after.name)
        else:
            unpatchable.append("name")
    for name in ("help_requested", "contact_consent", "customer", "location_id", "engagement_id"):
        if getattr(after, name) != getattr(before, name):
            unpatchable.append(name)
    return PatchPlan(tuple(ops), tuple(unpatchable))


def deal_to_referral(
    deal: Deal, fmt: StageFormat = "percent_string", *, base: Referral | None = None
) -> Referral:
    """The referral for ``deal``.

    With ``base`` (the referral the deal was read from): ``base`` with the deal's changes applied, and
    nothing else touched. Without: a new referral for a create (partner-center-api.md §2 "Create").
    """
    if base is not None:
        plan = patch_operations(referral_to_deal(base), deal, fmt, patch_name=True)
        return Referral.model_validate(apply_patch(wire_dump(base), plan.body(), strict=False))
    return Referral.model_validate(create_request_body(deal, fmt))


def create_request_body(deal: Deal, fmt: StageFormat = "percent_string") -> dict[str, Any]:
    """The POST body of a create (partner-center-api.md §2 "Create"), straight from the deal: only
    the fields a create may set, what ``create_body(deal_to_referral(deal))`` gives (keys in another
    order) without building the referral's models to walk them again. Every value comes from the
    typed deal, so there is nothing for validation to catch (the rules already checked the deal;
    tests/partner_center/test_fast_paths.py checks the two agree), and one initial sync creates
    every linked deal: the models cost 3% of its CPU."""
    shared = deal.share_with_microsoft or deal.help_requested is not None
    doc: dict[str, Any] = {
        "name": deal.name,
        "type": "Shared" if shared else "Independent",
        "qualification": "SalesQualified",
        "consent": {
            "consentToToShareInfoWithOthers": deal.contact_consent,
            "consentToContact": deal.contact_consent,
            "consentToShareReferralWithMicrosoftSellers": deal.share_with_microsoft,
        },
        "details": {
            "notes": deal.notes,
            "requirements": {"solutions": [_solution_tag(s) for s in deal.solutions]},
        },
        "team": [_member(m) for m in deal.team],
        # The 2019 recipe addresses our own Shared referral to our solution profile (§7).
        "target": [
            {"type": "SolutionProfile", "id": s.id} for s in deal.solutions if s.kind is SolutionKind.OWN
        ]
        if shared
        else [],
    }
    if deal.status is not Status.NONE:
        doc["status"], doc["substatus"] = deal.status.value, deal.substatus.value
    optional: dict[str, Any] = {
        "engagementId": deal.engagement_id,
        "externalReferenceId": _crm_ref(deal),
        "campaignId": deal.campaign_id,
        "statusReason": deal.status_reason,
    }
    doc.update({k: v for k, v in optional.items() if v is not None})
    if deal.sales_stage is not None and deal.sales_stage is not StandardStage.WON:
        doc["salesStage"] = format_stage(deal.sales_stage, fmt)
    if deal.value is not None:
        doc["details"]["dealValue"] = json_number(deal.value.amount)
        doc["details"]["currency"] = deal.value.currency
    if deal.close_date is not None:
        doc["details"]["closingDateTime"] = _closing(deal.close_date)
    if deal.help_requested is not None:
        doc["inviteContext"] = {"assistanceRequestCode": deal.help_requested.value}
    if deal.customer is not None:
        c = deal.customer
        doc["customerProfile"] = {
            "name": c.name,
            "address": {
                "addressLine1": c.address.line1,
                "addressLine2": c.address.line2,
                "city": c.address.city,
                "state": c.address.state,
                "postalCode": c.address.postal_code,
                "country": c.address.country,
                "region": c.address.region,
            },
            "size": c.size,
            "team": [_member(deal.customer_contact)] if deal.customer_contact else [],
            "ids": [{"profileType": "Duns", "id": c.duns}] if c.duns else [],
        }
    return doc
