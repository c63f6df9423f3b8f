"""The seams the sync engine talks through. The engine imports these protocols, never an adapter.

- :class:`CrmAdapter` — what the engine needs from any CRM (Salesforce, Dynamics 365).
- :class:`ReferralStore` — the same for Partner Center.

Records crossing a seam are canonical :class:`~connector.domain.model.Deal` values plus the small
frozen types below. Cursors are opaque strings the adapter encodes (a compound (timestamp, id)
keyset, a delta link); the engine persists them only after the records they cover are committed.
"""

from __future__ import annotations

import hashlib
import marshal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson

from connector.domain.model import Deal
from connector.domain.stages import CrmStage
from connector.errors import RecordError

__all__ = [
    "ChangePage",
    "CrmAdapter",
    "CrmChange",
    "CrmField",
    "CrmWrite",
    "Listed",
    "RecordFailure",
    "ReferralStore",
    "WriteResult",
    "fingerprint",
]


@dataclass(frozen=True)
class RecordFailure:
    """One record that could not be read or converted: named, with its cause, isolated from the rest."""

    record_id: str
    cause: str
    detail: str = ""


@dataclass(frozen=True)
class Listed:
    """A record as a listing returned it, not yet converted into a :class:`Deal`.

    Converting (schema validation, then the canonical model) is most of what reading a page costs;
    a full reconciliation finds nearly every record as its last sync left it. The engine compares
    ``version`` and a :func:`fingerprint` of ``content`` with the link first and calls ``read`` only
    for the rest.
    """

    record_id: str
    #: the remote's concurrency token as listed (an eTag)
    version: str | None
    #: the id this record carries of its other side (a referral's ``externalReferenceId``)
    reference: str | None
    #: the record as listed (JSON), whole
    content: Mapping[str, Any]
    #: the conversion; raises :class:`~connector.errors.RecordError` for a record it cannot read
    read: Callable[[], Deal]


def fingerprint(record: Mapping[str, Any], *, key: bytes = b"") -> str:
    """A digest of a record's whole content as a remote gave it (decoded JSON), keyed with ``key``
    (the engine's reading of the records: equal content read another way must not match).

    Encoded with orjson (compact, keys in the order given, so equal content gives equal bytes): a
    full reconciliation digests every record of both books, and orjson does it in a third of the
    time of marshal (and a tenth of re-encoding with the json module). A value orjson cannot write
    (an integer beyond 64 bits) makes the record digest its marshal form instead, as every time it
    is seen. Key order counts: a remote that reorders its keys costs one conversion of each record,
    after which the new digests are noted."""
    plain = record if isinstance(record, dict) else dict(record)
    try:
        encoded = orjson.dumps(plain)
    except orjson.JSONEncodeError:
        encoded = b"marshal:" + marshal.dumps(plain, 0)
    return hashlib.blake2b(encoded, key=key, digest_size=16).hexdigest()


@dataclass(frozen=True)
class ChangePage:
    """One page of changes. ``cursor`` is where to resume after this page is committed.

    An adapter gives its records converted (``deals``) or, where conversion is costly, ``listed``
    for the engine to convert only those it needs (see :class:`Listed`)."""

    deals: Sequence[Deal]
    deleted_ids: Sequence[str] = ()
    failures: Sequence[RecordFailure] = ()
    cursor: str | None = None
    #: True when the adapter fell back to a full resync (expired token, window exceeded); logged.
    full_resync: bool = False
    listed: Sequence[Listed] = ()

    def converted(self) -> tuple[list[Deal], list[RecordFailure]]:
        """Every record of the page as a deal, the listed ones converted; failures of both."""
        deals, failures = list(self.deals), list(self.failures)
        for item in self.listed:
            try:
                deals.append(item.read())
            except RecordError as exc:
                failures.append(RecordFailure(item.record_id, exc.cause or "invalid", str(exc)))
        return deals, failures


@dataclass(frozen=True)
class CrmWrite:
    """Field changes for one CRM record (``crm_id`` None = create). Values are CRM field API names."""

    crm_id: str | None
    values: dict[str, object]
    #: the version the change was based on (If-Match / If-Unmodified-Since)
    based_on: str | None = None
    idempotency_key: str = ""


@dataclass(frozen=True)
class CrmChange:
    """What the engine wants changed on one CRM opportunity, in canonical terms; the adapter maps
    it onto its own fields (configurable API names) and builds the :class:`CrmWrite`.

    ``fields`` uses the merge snapshot's names and JSON-ready values (name, value, currency,
    close_date, notes, campaign_id, team, solutions), plus ``lost_reason`` (the CRM's words for why
    a deal closed in Partner Center was lost or declined; written once with the close, not a synced
    field); ``crm_id`` None creates an opportunity.
    """

    crm_id: str | None
    fields: Mapping[str, Any] = field(default_factory=dict)
    stage: str | None = None  # the CRM stage label to set
    referral_id: str | None = None
    referral_link: str | None = None
    sync_status: str | None = None  # e.g. "synced", "blocked: terminal-immutable"
    audit_line: str | None = None
    synced_at: datetime | None = None
    based_on: str | None = None
    key: str = ""  # idempotency key, echoed in WriteResult.key


@dataclass(frozen=True)
class WriteResult:
    """Per-record outcome of a batched write, in request order."""

    key: str
    ok: bool
    crm_id: str | None = None
    error_code: str = ""
    message: str = ""
    conflict: bool = False
    new_version: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class CrmField:
    """One field of the CRM's opportunity entity as the CRM's own metadata describes it (for
    ``cosell doctor``: a configured field that does not exist, a mapped value a restricted picklist
    would refuse)."""

    name: str  # API / logical name
    type: str  # the CRM's own type name (picklist, multipicklist, boolean, Picklist, ...)
    #: active values of a picklist / option set (labels for Dataverse), empty when not a picklist
    picklist_values: tuple[str, ...] = ()
    #: True when a value outside ``picklist_values`` is refused on write
    restricted: bool = False


class CrmAdapter(Protocol):
    """What the sync engine needs from a CRM."""

    system: str  # "salesforce" | "dynamics"
    #: True when writes carrying ``based_on`` (If-Match) still go out in one batch; else the engine
    #: leaves them unconditional rather than send them one by one
    conditional_writes_batched: bool

    @property
    def write_unsupported(self) -> frozenset[str]:
        """Canonical fields ``apply`` cannot write: synced ones flow CRM -> Partner Center only;
        ``lost_reason`` here means the CRM keeps no reason field, so none is sent."""
        ...

    def stages(self) -> Sequence[CrmStage]:
        """The org's stage metadata (labels, probabilities, closed/won flags, record types)."""
        ...

    def changes(self, cursor: str | None) -> Iterator[ChangePage]:
        """Opted-in opportunities changed since ``cursor`` (None = full load), page by page."""
        ...

    def get(self, crm_ids: Sequence[str]) -> Sequence[Deal]:
        """Opportunities by id, with related data, in bulk."""
        ...

    def write(self, writes: Sequence[CrmWrite]) -> Sequence[WriteResult]:
        """Batched creates/updates; each record's failure is isolated and reported."""
        ...

    def find_by_referral(self, referral_ids: Sequence[str]) -> Mapping[str, Deal]:
        """Opportunities that already carry these referral ids, keyed by referral id."""
        ...

    def apply(self, changes: Sequence[CrmChange]) -> Sequence[WriteResult]:
        """Canonical changes -> CRM writes (one batch); results in order, keyed by ``CrmChange.key``."""
        ...

    def opportunity_fields(self) -> Mapping[str, CrmField]:
        """The opportunity entity's fields by API name, from the CRM's metadata (doctor checks)."""
        ...


class ReferralStore(Protocol):
    """What the sync engine needs from Partner Center."""

    #: whether the deal name is sent (``/name`` is not a documented PATCH path)
    patch_name: bool

    def changes(self, cursor: str | None) -> Iterator[ChangePage]:
        """Referrals changed since ``cursor`` (server ``updatedDateTime``), page by page."""
        ...

    def get(self, referral_id: str) -> Deal: ...

    def find_by_external_reference(self, crm_id: str) -> Deal | None: ...

    def create(self, deal: Deal, *, request_id: str, resumed: bool = False) -> Deal:
        """``resumed``: an earlier attempt with this ``request_id`` may have landed without its answer
        being recorded (crash, timeout); the store then looks the deal up before creating it again."""
        ...

    def update(self, before: Deal, after: Deal, *, request_id: str) -> Deal: ...
