"""The sandbox's book of business: a deterministic, realistic set of customers, sellers, solutions,
CRM opportunities (Salesforce and Dynamics 365) and Partner Center referrals.

Pure data, no I/O: :func:`build_book` turns a seed and an anchor time into a :class:`Book`; the same
seed and anchor always give the same book, ids included (the twins are seeded with these ids, so two
sandboxes with one seed hold the same records). :mod:`connector.sandbox.seeding` writes it into the
twins.

What is in it, and why (cosell-domain.md):

- open opportunities at every stage, most opted in to co-sell ("Sync with Partner Center"), a few
  kept private (not opted in), closed history not opted in (sellers share open deals);
- opportunities already registered in Partner Center by hand before the connector existed: an
  outbound referral carrying the CRM id as ``externalReferenceId``, open or closed (Won, Lost) -
  the connector must pair them, not create duplicates;
- inbound referrals (from Microsoft or another partner) in every state: New/Received, Active/Accepted
  at each sales stage, Closed Won/Lost/Declined/Expired;
- deal types: private and partner-led (visibility only), co-sell (help asked of Microsoft, customer
  contact shared with consent).

Contact details are invented (``.example`` domains, 555 numbers); they live only in the twins.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any

from connector.partner_center.models import format_utc
from connector.salesforce.soql import id_checksum

__all__ = [
    "DV_STAGES",
    "HELP_CODES",
    "SF_STAGES",
    "Book",
    "Company",
    "CrmDeal",
    "Person",
    "SolutionSpec",
    "build_book",
]

# --- reference data ---------------------------------------------------------------------------

#: (label, default probability, closed, won) - Salesforce's standard opportunity stages
SF_STAGES: tuple[tuple[str, int, bool, bool], ...] = (
    ("Prospecting", 10, False, False),
    ("Qualification", 10, False, False),
    ("Needs Analysis", 20, False, False),
    ("Value Proposition", 50, False, False),
    ("Id. Decision Makers", 60, False, False),
    ("Perception Analysis", 70, False, False),
    ("Proposal/Price Quote", 75, False, False),
    ("Negotiation/Review", 90, False, False),
    ("Closed Won", 100, True, True),
    ("Closed Lost", 0, True, False),
)
#: Dynamics' salesstage option set (value, label, typical close probability) plus the closed outcomes
DV_STAGES: tuple[tuple[int, str, int], ...] = (
    (0, "Qualify", 20),
    (1, "Develop", 40),
    (2, "Propose", 60),
    (3, "Close", 80),
)
#: inviteContext.assistanceRequestCode values (what help is asked of Microsoft)
HELP_CODES = (
    "WorkloadSpecificValueProposition",
    "CustomerTechnicalArchitecture",
    "ProofOfConceptOrDemo",
    "QuotesOrLicensing",
    "PostSalesCustomerSuccess",
    "GeneralOrOther",
)

_COMPANIES = (
    "Northwind Traders", "Fabrikam", "Adventure Works Cycles", "Tailspin Toys", "Wide World Importers",
    "Litware", "Proseware", "Alpine Ski House", "Blue Yonder Airlines", "Coho Winery",
    "Southridge Pharmaceuticals", "Fourth Coffee", "Graphic Design Institute", "Humongous Insurance",
    "Lamna Healthcare", "Margie's Travel", "Trey Research", "VanArsdel", "Woodgrove Bank", "Relecloud",
    "Southridge Video", "Wingtip Toys", "Munson's Pickles and Preserves", "City Power & Light",
    "A. Datum Corporation", "Consolidated Messenger", "Bellows College", "First Up Consultants",
    "Nod Publishers", "Best For You Organics", "Lucerne Publishing", "Tasmanian Traders",
    "The Phone Company", "Wingtip Solutions", "School of Fine Art", "Cronus Industries",
)  # fmt: skip
_WORKLOADS = (
    "Azure migration", "Data platform modernisation", "Microsoft 365 Copilot rollout", "SAP on Azure",
    "Azure Virtual Desktop", "Dynamics 365 Sales", "Power Platform centre of excellence",
    "Fabric analytics", "Security posture assessment", "Teams Phone", "AKS landing zone",
    "Backup and disaster recovery",
)  # fmt: skip
#: (country name as CRMs hold it, ISO code, city, state, currency)
_PLACES = (
    ("United States", "US", "Seattle", "WA", "USD"),
    ("United States", "US", "Chicago", "IL", "USD"),
    ("United States", "US", "Austin", "TX", "USD"),
    ("Canada", "CA", "Toronto", "ON", "USD"),
    ("United Kingdom", "GB", "London", "", "GBP"),
    ("Germany", "DE", "Munich", "", "EUR"),
    ("France", "FR", "Lyon", "", "EUR"),
    ("Netherlands", "NL", "Utrecht", "", "EUR"),
    ("Australia", "AU", "Sydney", "NSW", "USD"),
    ("Japan", "JP", "Osaka", "", "USD"),
)
_FIRST = ("Avery", "Jordan", "Riley", "Morgan", "Casey", "Taylor", "Jamie", "Quinn", "Rowan", "Sasha",
          "Kai", "Robin", "Alex", "Drew", "Elliot", "Harper")  # fmt: skip
_LAST = ("Nakamura", "Okafor", "Lindqvist", "Moreau", "Schmidt", "Patel", "Garcia", "O'Brien", "Novak",
         "Rossi", "Kowalski", "Haddad", "Svensson", "Costa", "Murphy", "Tanaka")  # fmt: skip
_SOLUTIONS = (
    ("SOL-34104-EBB", "Contoso Cloud Migration Factory"),
    ("SOL-34117-KDM", "Contoso Data Estate Modernisation"),
    ("SOL-34122-QRT", "Contoso Secure Workplace"),
    ("SOL-34139-FXA", "Contoso Copilot Readiness"),
    ("SOL-34151-LBN", "Contoso Managed Azure"),
    ("SOL-34168-WPZ", "Contoso Business Apps Accelerator"),
)
_NOTES = (
    "Customer wants a fixed-price first phase.",
    "Budget approved for this fiscal year.",
    "Competing with an on-premises refresh.",
    "Executive sponsor is the CIO.",
    "Waiting for the security review.",
    "Pilot with one business unit first.",
    "",
)
LOST_REASONS = ("Lost to Competitor", "No Budget", "Timing", "No Decision / Non-Responsive")


# --- the book --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    email: str
    phone: str
    title: str = ""

    @property
    def full(self) -> str:
        return f"{self.first} {self.last}"

    def __repr__(self) -> str:  # contact details stay out of reprs (and so out of logs)
        return "Person(<redacted>)"


@dataclass(frozen=True)
class Company:
    name: str
    street: str
    city: str
    state: str
    postal_code: str
    country: str  # as the CRM holds it
    country_code: str
    currency: str
    duns: str | None
    contact: Person
    size: str


@dataclass(frozen=True)
class SolutionSpec:
    code: str
    name: str


@dataclass(frozen=True)
class CrmDeal:
    """One CRM opportunity. ``stage`` is the CRM's label; ``referral`` names the Partner Center
    referral already registered for it by hand (an outbound referral with the CRM id), if any."""

    id: str
    name: str
    company: int
    stage: str
    probability: int
    amount: int
    currency: str
    close_date: date
    notes: str
    owner: int
    team: tuple[int, ...]
    solutions: tuple[str, ...]
    opted_in: bool
    help_type: str | None = None
    referral: str | None = None


@dataclass(frozen=True)
class Book:
    seed: int
    anchor: datetime
    sellers: tuple[Person, ...]
    companies: tuple[Company, ...]
    solutions: tuple[SolutionSpec, ...]
    salesforce: tuple[CrmDeal, ...]
    dynamics: tuple[CrmDeal, ...]
    #: Partner Center referrals (wire documents) per connection: each CRM has its own partner account
    referrals: dict[str, tuple[dict[str, Any], ...]] = field(default_factory=dict)

    def company_of(self, deal: CrmDeal) -> Company:
        return self.companies[deal.company]


def _sf_id(prefix: str, n: int) -> str:
    id15 = f"{prefix}Sb{n:010d}"
    return id15 + id_checksum(id15)


def _guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _person(rng: random.Random, i: int, domain: str, title: str) -> Person:
    first, last = _FIRST[rng.randrange(len(_FIRST))], _LAST[rng.randrange(len(_LAST))]
    handle = f"{first}.{last}".lower().replace("'", "")
    return Person(first, last, f"{handle}{i}@{domain}", f"+1 555 01{i % 100:02d}", title)


def _weighted(rng: random.Random, options: tuple[tuple[Any, int], ...]) -> Any:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def build_book(seed: int, anchor: datetime, *, salesforce: int = 240, dynamics: int = 200) -> Book:
    """The book for ``seed``; dates and times relative to ``anchor`` (aware UTC)."""
    if anchor.utcoffset() is None:
        raise ValueError("anchor must be timezone-aware")
    rng = random.Random(seed)  # noqa: S311 - deterministic sample data, not secrets
    today = anchor.date()
    sellers = tuple(_person(rng, i, "partner.example", "Account Executive") for i in range(12))
    companies = []
    for i, name in enumerate(_COMPANIES):
        country, code, city, state, currency = _PLACES[rng.randrange(len(_PLACES))]
        companies.append(
            Company(
                name=name,
                street=f"{rng.randrange(1, 999)} {rng.choice(('Main', 'Market', 'Harbour', 'Station'))} Street",
                city=city,
                state=state,
                postal_code=f"{rng.randrange(10000, 99999)}",
                country=country,
                country_code=code,
                currency=currency,
                duns=f"{rng.randrange(100_000_000, 999_999_999)}" if i % 3 else None,
                contact=_person(rng, 50 + i, "customer.example", "IT Director"),
                size=rng.choice(
                    ("10to50employees", "51to250employees", "251to1000employees", "morethan1000employees")
                ),
            )
        )
    solutions = tuple(SolutionSpec(c, n) for c, n in _SOLUTIONS)
    book = _Builder(rng, today, anchor, tuple(companies), solutions, sellers)
    sf = book.crm_deals("salesforce", salesforce)
    dv = book.crm_deals("dynamics", dynamics)
    return Book(
        seed=seed,
        anchor=anchor,
        sellers=sellers,
        companies=tuple(companies),
        solutions=solutions,
        salesforce=sf,
        dynamics=dv,
        referrals={
            "salesforce": book.referrals("salesforce", sf),
            "dynamics": book.referrals("dynamics", dv),
        },
    )


class _Builder:
    def __init__(
        self,
        rng: random.Random,
        today: date,
        anchor: datetime,
        companies: tuple[Company, ...],
        solutions: tuple[SolutionSpec, ...],
        sellers: tuple[Person, ...],
    ) -> None:
        self.rng = rng
        self.today = today
        self.anchor = anchor
        self.companies = companies
        self.solutions = solutions
        self.sellers = sellers
        self._ref_ids: dict[str, list[str]] = {}

    # --- CRM opportunities ------------------------------------------------------------------------
    def crm_deals(self, crm: str, count: int) -> tuple[CrmDeal, ...]:
        rng = self.rng
        out: list[CrmDeal] = []
        for i in range(count):
            company = rng.randrange(len(self.companies))
            if crm == "salesforce":
                # closed stages weigh a little more: a real org holds years of closed history
                label, probability, closed, _won = _weighted(
                    rng, tuple((s, 12 if s[2] else 10) for s in SF_STAGES)
                )
            else:
                closed_roll = rng.random()
                if closed_roll < 0.14:
                    label, probability, closed = "Won", 100, True
                elif closed_roll < 0.24:
                    label, probability, closed = "Lost", 0, True
                else:
                    _value, label, probability = DV_STAGES[rng.randrange(len(DV_STAGES))]
                    closed = False
            amount = rng.randrange(8, 900) * 1000
            close = self.today + timedelta(days=rng.randrange(20, 330))
            if closed:
                close = self.today - timedelta(days=rng.randrange(5, 240))
            # Sellers opt most open deals in; closed history and a few private deals stay out.
            opted_in = not closed and rng.random() < 0.85
            help_type = None
            if opted_in and crm == "salesforce" and rng.random() < 0.015:
                help_type = HELP_CODES[rng.randrange(len(HELP_CODES))]
            owner = rng.randrange(len(self.sellers))
            team = tuple(sorted({(owner + 1 + k) % len(self.sellers) for k in range(rng.randrange(0, 3))}))
            sols = tuple(
                sorted(
                    {
                        self.solutions[rng.randrange(len(self.solutions))].code
                        for _ in range(rng.randrange(1, 3))
                    }
                )
            )
            deal_id = _sf_id("006", i + 1) if crm == "salesforce" else _guid(rng)
            out.append(
                CrmDeal(
                    id=deal_id,
                    name=f"{self.companies[company].name} - {_WORKLOADS[rng.randrange(len(_WORKLOADS))]}",
                    company=company,
                    stage=label,
                    probability=probability,
                    amount=amount,
                    currency=self.companies[company].currency,
                    close_date=close,
                    notes=_NOTES[rng.randrange(len(_NOTES))],
                    owner=owner,
                    team=team,
                    solutions=sols,
                    opted_in=opted_in,
                    help_type=help_type,
                )
            )
        return self._register_by_hand(crm, out)

    def _register_by_hand(self, crm: str, deals: list[CrmDeal]) -> tuple[CrmDeal, ...]:
        """Some deals were registered in Partner Center by hand before the connector: open ones and a
        few closed (Won, Lost), which sellers then opted in so the two records stay paired."""
        rng = self.rng
        ids: list[str] = []
        open_ones = [i for i, d in enumerate(deals) if d.opted_in and d.help_type is None]
        won = [i for i, d in enumerate(deals) if d.stage in ("Closed Won", "Won")]
        lost = [i for i, d in enumerate(deals) if d.stage in ("Closed Lost", "Lost")]
        chosen = rng.sample(open_ones, min(18, len(open_ones))) + won[:4] + lost[:2]
        for i in sorted(chosen):
            rid = _guid(rng)
            ids.append(rid)
            deals[i] = replace(deals[i], referral=rid, opted_in=True)
        self._ref_ids[crm] = ids
        return tuple(deals)

    # --- Partner Center ---------------------------------------------------------------------------
    def referrals(self, crm: str, deals: tuple[CrmDeal, ...]) -> tuple[dict[str, Any], ...]:
        docs = [self._outbound(crm, d) for d in deals if d.referral]
        docs += self._inbound(crm)
        return tuple(docs)

    def _solution_tags(self, codes: tuple[str, ...]) -> list[dict[str, Any]]:
        names = {s.code: s.name for s in self.solutions}
        return [{"id": c, "name": names[c], "type": "Name"} for c in codes]

    def _member(self, p: Person) -> dict[str, Any]:
        return {"firstName": p.first, "lastName": p.last, "phoneNumber": p.phone, "email": p.email}

    def _profile(self, c: Company, *, contact: bool) -> dict[str, Any]:
        return {
            "name": c.name,
            "address": {
                "addressLine1": c.street,
                "city": c.city,
                "state": c.state,
                "postalCode": c.postal_code,
                "country": c.country_code,
            },
            "size": c.size,
            "team": [self._member(c.contact)] if contact else [],
            "ids": [{"profileType": "Duns", "id": c.duns}] if c.duns else [],
        }

    def _outbound(self, crm: str, d: CrmDeal) -> dict[str, Any]:
        """The referral a seller typed into Partner Center for this opportunity, matching the CRM."""
        c = self.companies[d.company]
        created = self.anchor - timedelta(days=self.rng.randrange(20, 120))
        stage, status, substatus = _pc_state(crm, d.stage)
        # Dynamics' deal team is the owner alone (the adapter's default team source); Salesforce adds
        # the opportunity team members.
        people = (d.owner, *d.team) if crm == "salesforce" else (d.owner,)
        team = [self._member(self.sellers[i]) for i in people]
        return {
            "id": d.referral,
            "engagementId": _guid(self.rng),
            "name": d.name,
            "externalReferenceId": d.id,
            "createdDateTime": format_utc(created),
            "updatedDateTime": format_utc(created + timedelta(days=3)),
            "acceptedDateTime": format_utc(created),
            "closedDateTime": format_utc(created + timedelta(days=3)) if status == "Closed" else None,
            "status": status,
            "substatus": substatus,
            "statusReason": "Customer chose another vendor" if substatus == "Lost" else None,
            "type": "Independent",
            "qualification": "SalesQualified",
            "direction": "Outgoing",
            "salesStage": stage,
            "customerProfile": self._profile(c, contact=False),
            "consent": {
                "consentToToShareInfoWithOthers": False,
                "consentToContact": False,
                "consentToShareReferralWithMicrosoftSellers": False,
            },
            "details": {
                "notes": d.notes,
                "dealValue": d.amount,
                "currency": d.currency,
                "closingDateTime": f"{d.close_date.isoformat()}T00:00:00Z",
                "requirements": {"solutions": self._solution_tags(d.solutions)},
            },
            "team": team,
        }

    def _inbound(self, crm: str) -> list[dict[str, Any]]:
        """Referrals Microsoft (or another partner) sent: every state the lifecycle has."""
        rng = self.rng
        states: list[tuple[str, str, str | None]] = [("New", "Received", None)] * 8
        states += [("Active", "Accepted", s) for s in ("10", "20", "40", "60", "80") for _ in range(3)]
        states += [("Closed", sub, None) for sub in ("Won", "Lost", "Declined", "Expired") for _ in range(3)]
        out = []
        for n, (status, substatus, stage) in enumerate(states):
            c = self.companies[rng.randrange(len(self.companies))]
            cosell = rng.random() < 0.7  # most inbound referrals come from Microsoft sellers asking for help
            if substatus == "Received":
                created = self.anchor - timedelta(days=rng.randrange(1, 10), hours=rng.randrange(0, 20))
            else:
                created = self.anchor - timedelta(days=rng.randrange(20, 150))
            updated = created + timedelta(days=2) if status != "New" else created
            codes = (self.solutions[rng.randrange(len(self.solutions))].code,)
            value = rng.randrange(20, 600) * 1000
            close = self.today + timedelta(days=rng.randrange(30, 300))
            doc: dict[str, Any] = {
                "id": _guid(rng),
                "engagementId": _guid(rng),
                "name": f"{c.name} - {_WORKLOADS[rng.randrange(len(_WORKLOADS))]} (MS referral {n + 1:02d})",
                "externalReferenceId": None,
                "createdDateTime": format_utc(created),
                "updatedDateTime": format_utc(updated),
                "acceptedDateTime": format_utc(updated)
                if status == "Active" or substatus in ("Won", "Lost")
                else None,
                "closedDateTime": format_utc(updated) if status == "Closed" else None,
                "status": status,
                "substatus": substatus,
                "statusReason": {
                    "Declined": "Not a fit for our practice",
                    "Lost": "Customer chose another vendor",
                }.get(substatus),
                "type": "Shared" if cosell else "Independent",
                "qualification": "SalesQualified" if cosell else "MarketingQualified",
                "direction": "Incoming",
                "salesStage": stage,
                "customerProfile": self._profile(c, contact=cosell),
                "consent": {
                    "consentToToShareInfoWithOthers": cosell,
                    "consentToContact": cosell,
                    "consentToShareReferralWithMicrosoftSellers": True,
                },
                "details": {
                    "notes": "Referred by the Microsoft account team."
                    if cosell
                    else "Referred by a partner.",
                    "dealValue": value,
                    "currency": c.currency,
                    "closingDateTime": f"{close.isoformat()}T00:00:00Z",
                    "requirements": {"solutions": self._solution_tags(codes)},
                },
                "team": [self._member(self.sellers[rng.randrange(len(self.sellers))])]
                if status != "New"
                else [],
            }
            if cosell:
                doc["inviteContext"] = {
                    "notes": "Customer asked for a partner with migration experience.",
                    "invitedBy": {"organizationId": "msft", "organizationName": "Microsoft"},
                    "assistanceRequestCode": HELP_CODES[rng.randrange(len(HELP_CODES))],
                }
            out.append(doc)
        return out


def _pc_state(crm: str, stage: str) -> tuple[str | None, str, str]:
    """(salesStage, status, substatus) a hand-registered referral shows for a CRM stage."""
    if stage in ("Closed Won", "Won"):
        return "100", "Closed", "Won"
    if stage in ("Closed Lost", "Lost"):
        return None, "Closed", "Lost"
    sf = {
        "Prospecting": "10", "Qualification": "20", "Needs Analysis": "20", "Value Proposition": "40",
        "Id. Decision Makers": "40", "Perception Analysis": "60", "Proposal/Price Quote": "60",
        "Negotiation/Review": "80",
    }  # fmt: skip
    dv = {"Qualify": "20", "Develop": "40", "Propose": "60", "Close": "80"}
    return (sf if crm == "salesforce" else dv)[stage], "Active", "Accepted"
