"""The canonical deal: what a CRM opportunity and a Partner Center referral both carry.

Pure data. Frozen, typed, timezone-aware. Adapters convert to and from it at the boundary; the rules
(:mod:`connector.domain.rules`) and the stage mapping (:mod:`connector.domain.stages`) reason on it.
Business background: ``cosell-domain.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import IntEnum, StrEnum

from connector.domain.codes import ISO_3166_ALPHA2, ISO_4217

__all__ = [
    "INCENTIVE_PROGRAMS",
    "Address",
    "Contact",
    "CrmStageInfo",
    "Customer",
    "Deal",
    "DealType",
    "Direction",
    "HelpType",
    "MicrosoftStatus",
    "Money",
    "PartnerInvitation",
    "RegistrationState",
    "Solution",
    "SolutionKind",
    "StandardStage",
    "Status",
    "Substatus",
    "TeamMember",
    "VersionTag",
    "require_utc",
]


def require_utc(value: datetime, what: str) -> datetime:
    """Reject naive datetimes and normalise aware ones to UTC.

    A naive datetime would be read in the container's local zone by some libraries (apscheduler
    assumes local) and as UTC by others; that silent disagreement drops or duplicates records.
    """
    if value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (got naive {value.isoformat()})")
    return value.astimezone(UTC)


class Direction(StrEnum):
    """Who started the deal: Microsoft/another partner (inbound) or us (outbound)."""

    INBOUND = "inbound"
    OUTBOUND = "outbound"


class DealType(StrEnum):
    """The five deal types of cosell-domain.md, ordered loosely by how much Microsoft sees."""

    PRIVATE = "private"
    PARTNER_LED = "partner-led"
    CO_SELL = "co-sell"
    P2P = "p2p"
    SOLUTION_ASSESSMENT = "solution-assessment"


class Status(StrEnum):
    """Partner Center referral status (partner-center-api.md §6.1)."""

    NONE = "None"
    NEW = "New"
    ACTIVE = "Active"
    CLOSED = "Closed"


class Substatus(StrEnum):
    """Partner Center referral substatus. ``ERROR`` is the UI's "Close as Error" (not in the API enum)."""

    NONE = "None"
    PENDING = "Pending"
    RECEIVED = "Received"
    ACCEPTED = "Accepted"
    WON = "Won"
    LOST = "Lost"
    DECLINED = "Declined"
    EXPIRED = "Expired"
    ERROR = "Error"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({Substatus.WON, Substatus.LOST, Substatus.DECLINED, Substatus.EXPIRED, Substatus.ERROR})


class StandardStage(IntEnum):
    """Partner Center's standard sales stages, by percentage (cosell-domain.md).

    10 is "Created" for an outbound deal and "Accepted" for an inbound one: one stage, two names.
    """

    ACCEPTED = 10
    QUALIFIED = 20
    DEVELOPED = 40
    PROPOSED = 60
    NEGOTIATED = 80
    WON = 100

    @property
    def label(self) -> str:
        return "Created/Accepted" if self is StandardStage.ACCEPTED else self.name.title()

    @classmethod
    def parse(cls, text: str | int) -> StandardStage:
        """Accept a percentage (``40``, ``"40"``) or a name (``Developed``, ``created``)."""
        if isinstance(text, int) or (isinstance(text, str) and text.strip().isdigit()):
            return cls(int(text))
        key = str(text).strip().upper()
        if key in {"CREATED", "CREATED/ACCEPTED"}:
            return cls.ACCEPTED
        return cls[key]


class HelpType(StrEnum):
    """What help is asked of Microsoft (``inviteContext.assistanceRequestCode``)."""

    WORKLOAD_SPECIFIC_VALUE_PROPOSITION = "WorkloadSpecificValueProposition"
    CUSTOMER_TECHNICAL_ARCHITECTURE = "CustomerTechnicalArchitecture"
    PROOF_OF_CONCEPT_OR_DEMO = "ProofOfConceptOrDemo"
    QUOTES_OR_LICENSING = "QuotesOrLicensing"
    POST_SALES_CUSTOMER_SUCCESS = "PostSalesCustomerSuccess"
    GENERAL_OR_OTHER = "GeneralOrOther"


class MicrosoftStatus(StrEnum):
    """Microsoft's own status on a co-sell deal, read from the related referral."""

    NOT_INVITED = "not-invited"
    INVITED = "invited"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    WON = "won"


class RegistrationState(StrEnum):
    """Deal registration (for incentives) after Won. Unknown remote values are kept as ``OTHER``."""

    NONE = "None"
    REVIEW_PENDING = "ReviewPending"
    ACTION_REQUIRED = "ActionRequired"
    PASSED = "Passed"
    FAILED = "Failed"
    APPROVED = "Approved"
    OTHER = "Other"


class SolutionKind(StrEnum):
    """Whose solution it is (cosell-domain.md "solutions")."""

    OWN = "own"
    MICROSOFT = "microsoft"
    THIRD_PARTY = "third-party"
    ASSESSMENT = "assessment"


#: IP incentive programs that make a won deal eligible for registration (cosell-domain.md "Deal registration").
INCENTIVE_PROGRAMS = frozenset({"Azure IP co-sell", "Biz apps premium", "Biz apps standard"})

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_DUNS = re.compile(r"^\d{9}$")


@dataclass(frozen=True, slots=True)
class Money:
    """An amount in an ISO 4217 currency. Decimal, never float: deal values are money."""

    amount: Decimal
    currency: str

    def __post_init__(self) -> None:
        if not isinstance(self.amount, Decimal):
            object.__setattr__(self, "amount", Decimal(str(self.amount)))
        if self.amount < 0:
            raise ValueError(f"a deal value cannot be negative (got {self.amount})")
        if self.currency not in ISO_4217:
            raise ValueError(f"{self.currency!r} is not an ISO 4217 currency code")


@dataclass(frozen=True, slots=True)
class Address:
    """A postal address; Partner Center needs the ISO 3166 two-letter country."""

    country: str
    line1: str = ""
    line2: str = ""
    city: str = ""
    state: str = ""
    postal_code: str = ""
    region: str = ""

    def __post_init__(self) -> None:
        if self.country not in ISO_3166_ALPHA2:
            raise ValueError(f"{self.country!r} is not an ISO 3166 two-letter country code")


@dataclass(frozen=True, slots=True)
class Customer:
    """The end customer: company name, address, and D-U-N-S to pick the right legal entity."""

    name: str
    address: Address
    duns: str | None = None
    size: str = ""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("the customer needs a company name")
        if self.duns is not None and not _DUNS.match(self.duns):
            raise ValueError(f"a D-U-N-S number has nine digits (got {self.duns!r})")


@dataclass(frozen=True, slots=True)
class Contact:
    """A person: a customer contact or a team member. Contact details never go to logs."""

    first_name: str
    last_name: str
    email: str = ""
    phone: str = ""
    title: str = ""

    def __post_init__(self) -> None:
        if self.email and not _EMAIL.match(self.email):
            raise ValueError("a contact email address is malformed")

    @property
    def key(self) -> str:
        """Identity for set semantics: email, case-insensitive; the name when there is no email."""
        return self.email.lower() if self.email else f"{self.first_name} {self.last_name}".strip().lower()

    @property
    def is_complete(self) -> bool:
        return bool(self.first_name.strip() and self.last_name.strip() and self.email and self.phone)

    def __repr__(self) -> str:  # never print contact details, even in a traceback
        return "Contact(<redacted>)"


TeamMember = Contact


@dataclass(frozen=True, slots=True)
class Solution:
    """A solution on the deal: whose it is and its Partner Center id (e.g. ``SOL-34104-EBB``)."""

    kind: SolutionKind
    id: str
    name: str = ""
    #: the IP incentive program the solution qualifies for, if any (see INCENTIVE_PROGRAMS)
    incentive: str | None = None

    def __post_init__(self) -> None:
        if not self.id.strip():
            raise ValueError("a solution needs an id")


@dataclass(frozen=True, slots=True)
class PartnerInvitation:
    """One partner invited to a P2P deal, with what the inviter promised it (cosell-domain.md)."""

    partner_id: str
    close_date: date
    value: Money
    help_wanted: str
    solutions: tuple[Solution, ...]
    team: tuple[Contact, ...] = ()
    notes: str = ""


@dataclass(frozen=True, slots=True)
class CrmStageInfo:
    """The CRM's own stage facts for a deal read from the CRM: what the stage mapping needs."""

    label: str
    probability: int | None = None
    record_type: str | None = None
    #: the CRM's last-modified time (server clock), for newest-wins
    modified: datetime | None = None
    #: the lost/decline reason as the CRM words it (mapped through the reasons value map)
    lost_reason: str | None = None

    def __post_init__(self) -> None:
        if self.modified is not None:
            object.__setattr__(self, "modified", require_utc(self.modified, "modified"))


@dataclass(frozen=True, slots=True)
class VersionTag:
    """The remote's concurrency token for the version we read: an eTag, SystemModstamp or versionnumber."""

    system: str
    value: str


@dataclass(frozen=True, slots=True)
class Deal:
    """One co-sell deal as both sides see it. ``None`` means "not known / not set" on that side."""

    name: str
    direction: Direction
    deal_type: DealType
    status: Status = Status.ACTIVE
    substatus: Substatus = Substatus.ACCEPTED
    # identity
    referral_id: str | None = None
    engagement_id: str | None = None
    crm_id: str | None = None
    external_reference_id: str | None = None
    location_id: str | None = None
    # commercial
    sales_stage: StandardStage | None = None
    customer: Customer | None = None
    customer_contact: Contact | None = None
    contact_consent: bool = False
    value: Money | None = None
    close_date: date | None = None
    notes: str = ""
    campaign_id: str | None = None
    status_reason: str | None = None
    team: tuple[Contact, ...] = ()
    solutions: tuple[Solution, ...] = ()
    help_requested: HelpType | None = None
    share_with_microsoft: bool = False
    microsoft_status: MicrosoftStatus = MicrosoftStatus.NOT_INVITED
    invited_partners: tuple[PartnerInvitation, ...] = ()
    registration: RegistrationState = RegistrationState.NONE
    # time and version
    created_at: datetime | None = None
    updated_at: datetime | None = None
    version: VersionTag | None = None
    # Solution-assessment stages completed so far (all are mandatory before Won).
    assessment_stages_done: frozenset[int] = field(default_factory=frozenset)
    #: set on deals read from a CRM: the CRM stage label, probability and record type
    crm_stage: CrmStageInfo | None = None

    def __post_init__(self) -> None:
        for name in ("created_at", "updated_at"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, require_utc(value, name))

    @property
    def is_terminal(self) -> bool:
        return self.substatus.is_terminal

    @property
    def label(self) -> str:
        """How to name this deal in a message: ids only, never customer contact data."""
        ids = [
            f"referral {self.referral_id}" if self.referral_id else "",
            f"CRM {self.crm_id}" if self.crm_id else "",
        ]
        return " / ".join(i for i in ids if i) or f"deal {self.name!r}"
