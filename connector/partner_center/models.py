"""Pydantic models of the Partner Center referral resource, as the wire carries it.

Sources: https://learn.microsoft.com/partner-center/developer/referral-resources (Doc), the
"Partner Center Referrals" connector Swagger (Swagger) and real records (Live); partner-center-api.md §5.

Three promises, because the schema is half-documented and drifts (partner-center-api.md §12):

- **Nothing the connector does not understand is dropped.** Every model keeps unknown keys
  (``extra="allow"``) so :func:`wire_dump` gives back what was read, FY26 fields included.
- **Documented shape drift is absorbed on read**: ``dealValue`` as number or string, ``team`` as an
  array or a single object, ``externalReferenceId`` null or ``""``, timestamps with 0–7 fractional
  digits, PascalCase consent keys (the current private-deal sample). Reading normalises them; the
  normalised form is what is written back.
- **Nothing read-only or unknown is echoed on write**: :func:`create_body` sends an allow-list of
  documented writable fields, each sub-object without its unknown keys.

Timestamps stay as the server's text (validated): the server writes 7 fractional digits, Python keeps
6, and the change cursor must be the server's exact value (partner-center-api.md §2.1).
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
)
from pydantic.alias_generators import to_camel

__all__ = [
    "AdditionalRequirements",
    "Address",
    "Consent",
    "ContactPreference",
    "CustomerId",
    "CustomerProfile",
    "Details",
    "IdRef",
    "InviteContext",
    "InvitedBy",
    "Link",
    "Links",
    "Member",
    "PatchOp",
    "Referral",
    "ReferralList",
    "Registration",
    "Requirements",
    "SolutionTag",
    "Target",
    "TrackingInfo",
    "create_body",
    "format_utc",
    "json_number",
    "parse_utc",
    "utc_ticks",
    "wire_dump",
]

# --- scalar types ------------------------------------------------------------------------------

_UTC_TEXT = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})T(?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d{1,7}))?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})$"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _match_utc(text: str) -> re.Match[str]:
    match = _UTC_TEXT.match(text.strip())
    if match is None:
        raise ValueError(f"not an ISO 8601 timestamp with a zone: {text!r}")
    return match


@functools.lru_cache(maxsize=4096)
def parse_utc(text: str) -> datetime:
    """An aware UTC datetime from the server's text (0–7 fractional digits, ``Z`` or an offset).

    The 7th digit (100 ns) does not fit a datetime and is dropped; :func:`utc_ticks` keeps it.
    Cached: a pure function of the text with an immutable result, and a referral repeats its
    timestamps (created = updated = accepted on a create, one closing date for many deals).
    """
    m = _match_utc(text)
    frac = (m["frac"] or "").ljust(6, "0")[:6]
    zone = "+00:00" if m["zone"] == "Z" else m["zone"]
    return datetime.fromisoformat(f"{m['date']}T{m['time']}.{frac}{zone}").astimezone(UTC)


def utc_ticks(text: str) -> int:
    """The instant in 100 ns ticks since 1970, exact to the server's 7 digits (for ordering cursors)."""
    m = _match_utc(text)
    seconds = parse_utc(text).replace(microsecond=0) - _EPOCH
    frac = int((m["frac"] or "").ljust(7, "0"))
    return (seconds.days * 86_400 + seconds.seconds) * 10_000_000 + frac


def format_utc(value: datetime) -> str:
    """The server's own format: UTC, 7 fractional digits, ``Z``."""
    if value.utcoffset() is None:
        raise ValueError("a Partner Center timestamp must be timezone-aware")
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond:06d}0Z"


@functools.lru_cache(maxsize=4096)
def _valid_utc(text: str) -> bool:
    # Cached (a failure raises, and is never cached): a referral repeats its timestamps
    # (created = updated = accepted on a create), and so do many referrals (closing dates).
    _match_utc(text)
    return True


def _check_utc(text: str) -> str:
    _valid_utc(text)
    return text  # the input itself: the cache holds no value that reaches a model


def _to_decimal(value: Any) -> Any:
    # PATCH samples send dealValue as the string "10000" while the resource holds a number (§5.2).
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"dealValue {value!r} is not a number") from None
    if isinstance(value, float):
        return Decimal(str(value))
    return value


def json_number(value: Decimal) -> int | float:
    """A Decimal as a JSON number (pydantic would write a string): deal values are numbers on the wire."""
    return int(value) if value == value.to_integral_value() else float(value)


def _one_or_many(value: Any) -> Any:
    # A third-party copy of a real record has `team` as a single object (fixtures README).
    return [value] if isinstance(value, dict) else value


UtcText = Annotated[str, AfterValidator(_check_utc)]
Amount = Annotated[
    Decimal, BeforeValidator(_to_decimal), PlainSerializer(json_number, return_type=int | float)
]


# --- models ------------------------------------------------------------------------------------


class _Wire(BaseModel):
    """Camel-case wire names, unknown keys kept, immutable."""

    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        populate_by_name=True,
        alias_generator=to_camel,
        serialize_by_alias=True,
    )

    #: documented fields the service sets and a write must never carry (even when known)
    read_only: ClassVar[frozenset[str]] = frozenset()


class ContactPreference(_Wire):
    locale: str | None = None
    disable_notifications: bool | None = None


class Member(_Wire):
    """A team member or customer contact. Contact details are never logged (see Contact.__repr__)."""

    first_name: str | None = None
    last_name: str | None = None
    phone_number: str | None = None
    email: str | None = None
    title: str | None = None
    contact_preference: ContactPreference | None = None

    def __repr__(self) -> str:
        return "Member(<redacted>)"


Members = Annotated[list[Member], BeforeValidator(_one_or_many)]


class Address(_Wire):
    address_line1: str | None = None
    address_line2: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None
    region: str | None = None


class CustomerId(_Wire):
    profile_type: str | None = None  # "Duns" | "External"
    id: str | None = None


class CustomerProfile(_Wire):
    read_only: ClassVar[frozenset[str]] = frozenset({"is_matching_complete"})

    name: str | None = None
    address: Address | None = None
    size: str | None = None
    team: Members | None = None
    ids: list[CustomerId] | None = None
    is_matching_complete: bool | None = None


def _both_cases(camel: str) -> Any:
    # The current private-deal sample sends PascalCase consent keys (partner-center-api.md §5.2).
    return Field(
        default=None,
        validation_alias=AliasChoices(camel, camel[0].upper() + camel[1:]),
        serialization_alias=camel,
    )


class Consent(_Wire):
    # The doubled "To" is the real key name.
    consent_to_share_info_with_others: bool | None = _both_cases("consentToToShareInfoWithOthers")
    consent_to_contact: bool | None = _both_cases("consentToContact")
    consent_to_share_referral_with_microsoft_sellers: bool | None = _both_cases(
        "consentToShareReferralWithMicrosoftSellers"
    )
    consent_to_microsoft_to_contact_specific_partners: bool | None = _both_cases(
        "consentToMicrosoftToContactSpecificPartners"
    )


class IdRef(_Wire):
    id: str | None = None


class SolutionTag(_Wire):
    id: str | None = None
    name: str | None = None
    type: str | None = None  # None | Category | Name
    price: Any = None
    quantity: Any = None
    currency: str | None = None
    publisher_name: str | None = None
    solution_type: str | None = None  # e.g. "3P"
    closing_date_time: UtcText | None = None


class Attribute(_Wire):
    id: str | None = None
    type: str | None = None


class AdditionalRequirements(_Wire):
    iot: dict[str, Any] | None = None
    attributes: list[Attribute] | None = None


class Requirements(_Wire):
    industries: list[IdRef] | None = None
    products: list[IdRef] | None = None
    services: list[IdRef] | None = None
    solutions: list[SolutionTag] | None = None
    offers: list[Any] | None = None
    sales_plays: list[Any] | None = None
    additional_requirements: AdditionalRequirements | None = None


class Details(_Wire):
    notes: str | None = None
    deal_value: Amount | None = None
    currency: str | None = None
    closing_date_time: UtcText | None = None
    requirements: Requirements | None = None
    customer_requested_contact: bool | None = None
    customer_action: str | None = None
    incentive_level: Any = None


class InvitedBy(_Wire):
    organization_id: str | None = None  # "msft" = Microsoft
    organization_name: str | None = None


class InviteContext(_Wire):
    notes: str | None = None
    invited_by: InvitedBy | None = None
    assistance_request_code: str | None = None
    invited_mpn_id: str | None = None


class Target(_Wire):
    type: str | None = None  # None | BusinessProfileLocation | SolutionProfile
    id: str | None = None


class Link(_Wire):
    uri: str | None = None
    method: str | None = None


class Links(_Wire):
    """Informational only: published samples have broken URIs here; never build a request from them."""

    self_link: Link | None = Field(default=None, alias="self")
    related_referrals: Link | None = None


class TrackingInfo(_Wire):
    microsoft_msx_id: str | None = None
    microsoft_us_fed_opportunity_id: str | None = Field(default=None, alias="microsoftUSFedOpportunityId")
    microsoft_us_fed_lead_id: str | None = Field(default=None, alias="microsoftUSFedLeadId")
    migrated_psc_deal_id: str | None = Field(default=None, alias="migratedPSCDealId")
    migrated_psc_partner_deal_id: str | None = Field(default=None, alias="migratedPSCPartnerDealId")


class Registration(_Wire):
    """A deal registration (Swagger only, §8); the rest of its shape is kept as unknown keys."""

    type: str | None = None
    id: str | None = None
    status: str | None = None
    status_reason: str | None = None
    registration_date_time: UtcText | None = None


class Referral(_Wire):
    """One referral. Enum-valued fields are plain strings: unknown values must never crash a read."""

    read_only: ClassVar[frozenset[str]] = frozenset(
        {
            "id",
            "organization_id",
            "organization_name",
            "created_date_time",
            "updated_date_time",
            "expiration_date_time",
            "accepted_date_time",
            "closed_date_time",
            "direction",
            "links",
            "e_tag",
            "registration_status",
            "tracking_info",
            "registrations",
            "referral_source",
            "call_to_action",
            "favorite",
            "is_spam",
            "quality",
            "tags",
            "deal_sensitivity",
            "created_via",
            "last_modified_via",
            "last_run_id",
            "mpn_id",
        }
    )

    id: str | None = None
    engagement_id: str | None = None
    name: str | None = None
    organization_id: str | None = None
    organization_name: str | None = None
    external_reference_id: str | None = None
    created_date_time: UtcText | None = None
    updated_date_time: UtcText | None = None
    expiration_date_time: UtcText | None = None
    accepted_date_time: UtcText | None = None
    closed_date_time: UtcText | None = None
    status: str | None = None
    substatus: str | None = None
    status_reason: str | None = None
    type: str | None = None  # Independent | Shared
    qualification: str | None = None
    direction: str | None = None  # Incoming | Outgoing
    sales_stage: str | int | None = None  # representation undecided (§6.5)
    customer_profile: CustomerProfile | None = None
    consent: Consent | None = None
    details: Details | None = None
    team: Members | None = None
    invite_context: InviteContext | None = None
    target: list[Target] | None = None
    links: Links | None = None
    e_tag: str | None = None
    campaign_id: str | None = None
    referral_program: str | None = None
    registrations: list[Registration] | None = None
    registration_status: str | None = None
    tracking_info: TrackingInfo | None = None
    referral_source: str | None = None
    call_to_action: str | None = None
    partner_role: Any = None
    solution_area: Any = None
    solution_play: Any = None
    favorite: bool | None = None
    is_spam: bool | None = None
    quality: str | None = None
    tags: list[Any] | None = None
    deal_sensitivity: str | None = None
    created_via: str | None = None
    last_modified_via: str | None = None
    last_run_id: str | None = None
    mpn_id: str | None = None

    def __repr__(self) -> str:  # ids only: a referral carries customer contact data
        return f"Referral(id={self.id!r}, status={self.status!r}/{self.substatus!r})"

    @property
    def crm_reference(self) -> str | None:
        """``externalReferenceId`` with the live ``""`` read as absent."""
        return self.external_reference_id or None


class ReferralList(_Wire):
    """A list response: ``value`` plus OData annotations (kept, never trusted for completeness)."""

    value: list[Referral] = Field(default_factory=list)
    next_link: str | None = Field(default=None, alias="@odata.nextLink")
    count: int | None = Field(default=None, alias="@odata.count")


class PatchOp(BaseModel):
    """One RFC 6902 operation; the API takes ``replace`` and ``add`` only (§2)."""

    model_config = ConfigDict(frozen=True)

    op: str
    path: str
    value: Any = None


# --- writing -----------------------------------------------------------------------------------

#: Top-level fields a create may carry: documented writable fields only (create-a-referral, §5.1).
CREATE_FIELDS = frozenset(
    {
        "engagement_id",
        "name",
        "external_reference_id",
        "status",
        "substatus",
        "status_reason",
        "type",
        "qualification",
        "sales_stage",
        "customer_profile",
        "consent",
        "details",
        "team",
        "invite_context",
        "target",
        "campaign_id",
        "referral_program",
    }
)


def wire_dump(model: BaseModel) -> Any:
    """Everything read, unknown keys included, in wire form (the lossless round trip)."""
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True)


#: per model class: (attribute, wire key) of each declared field that is not read-only, in declared
#: order (the order of the body's keys). Unknown keys are never declared, so never here.
_WRITABLE: dict[type[_Wire], tuple[tuple[str, str], ...]] = {}
#: types :func:`_known` gives back as they are (checked exactly: subclasses take the general path)
_PLAIN: frozenset[type] = frozenset({str, int, bool, float, type(None)})


def _writable(cls: type[_Wire]) -> tuple[tuple[str, str], ...]:
    plan = _WRITABLE.get(cls)
    if plan is None:
        plan = _WRITABLE[cls] = tuple(
            (name, info.serialization_alias or info.alias or name)
            for name, info in cls.model_fields.items()
            if name not in cls.read_only
        )
    return plan


def _known_fields(model: _Wire, plan: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    # Fields are in the instance __dict__ (pydantic v2), unknown keys in __pydantic_extra__.
    fields_set = model.__pydantic_fields_set__
    values = model.__dict__
    out: dict[str, Any] = {}
    for name, key in plan:
        if name in fields_set:
            value = values[name]
            out[key] = value if type(value) in _PLAIN else _known(value)
    return out


def _known(value: Any) -> Any:
    """``value`` in wire form with only its set, declared, writable fields, at every depth."""
    if isinstance(value, _Wire):
        return _known_fields(value, _writable(type(value)))
    if isinstance(value, list):
        return [v if type(v) in _PLAIN else _known(v) for v in value]
    if isinstance(value, Decimal):
        return json_number(value)
    return value


#: the top level of a create: the allow-list, in declared order
_CREATE_PLAN = tuple((name, key) for name, key in _writable(Referral) if name in CREATE_FIELDS)


def create_body(referral: Referral) -> dict[str, Any]:
    """The POST body: allow-listed top-level fields, sub-objects without unknown or read-only keys."""
    return _known_fields(referral, _CREATE_PLAN)
