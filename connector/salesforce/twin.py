"""A strict local HTTPS twin of the parts of Salesforce the adapter uses.

Served under ``/services``:

- ``oauth2/token`` — JWT bearer (RS256 signature verified against the configured public key; ``iss``,
  ``sub``, ``aud``, ``exp`` ≤ 3 minutes ahead on the twin's clock), client credentials (HTTP Basic or
  form) and username-password; OAuth errors as ``{"error", "error_description"}``.
- ``data/vXX.X/query`` and ``queryAll`` — the SOQL subset of :mod:`.twin_soql`, 2,000 rows per page
  (``Sforce-Query-Options: batchSize=`` honoured, 200..2000), relative ``nextRecordsUrl``; URIs over
  16,384 bytes answer 414 like Salesforce. Relationship queries over :data:`RELATIONSHIPS`: a parent
  lookup (``Account.Name``) renders as a nested record with ``attributes`` (type, url), or ``null``
  when the lookup is empty or its record gone; a subquery (``(SELECT ... FROM OpportunityContactRoles)``)
  as a nested query result ``{"totalSize", "done", "records"}``, or ``null`` without children
  (https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_relationships_query_results.htm).
  A parent with more than :attr:`SalesforceTwin.child_batch_size` children (default 200; Salesforce
  does not document its threshold) gets the first ones with ``done: false`` and a ``nextRecordsUrl``
  that ``query/<locator>-<offset>`` serves like a top-level locator. Child records count toward the
  batch size, as the Query Options header documents ("Child objects count toward the number of
  records for the batch size"): a page of a query with subqueries holds fewer parents (at least one).
  Under ``queryAll`` a subquery also returns its deleted children (Salesforce does not document
  this case; the twin takes the reading a client must survive).
- ``sobjects/{obj}/describe``, ``sobjects/{obj}/{id}`` (GET/PATCH with ``If-Unmodified-Since`` -> 412,
  DELETE), ``sobjects/{obj}`` (POST), ``sobjects/Opportunity/updated|deleted`` with their 30/15-day
  windows on the twin clock and ``earliestDateAvailable``.
- ``composite/sobjects`` PATCH/POST (≤ 200 records, ``allOrNone``), per-record errors with
  ``statusCode``: restricted picklists, required fields, validation rules, injected UNABLE_TO_LOCK_ROW.
- ``ui-api/object-info/{obj}/picklist-values/{recordTypeId}/{field}``.
- ``jobs/query`` — Bulk API 2.0 query jobs, CSV results paged by ``Sforce-Locator``; datetimes as
  epoch milliseconds (what crm-apis.md §A.3 says Bulk returns; the adapter accepts ISO too). Parent
  fields (``Account.Name``) are CSV columns; subqueries are refused (crm-apis.md §A.3).
- ``limits`` and ``Sforce-Limit-Info: api-usage=n/max`` on every data response; once the daily
  allocation is spent, 403 ``REQUEST_LIMIT_EXCEEDED``. Expired or unknown sessions: 401
  ``[{"errorCode": "INVALID_SESSION_ID", ...}]``. Error bodies are JSON arrays (crm-apis.md §A.6).

``SystemModstamp``/``LastModifiedDate`` come from the twin clock truncated to the second, so many rows
share one stamp. Deletes are Salesforce's: :meth:`SalesforceTwin.delete_row` soft-deletes (stamp moves,
``query`` hides the row, ``queryAll`` returns it with ``IsDeleted = true``), :meth:`~SalesforceTwin.purge_row`
empties it from the recycle bin and :meth:`~SalesforceTwin.hard_delete_row` does both — after which only
getDeleted (within its window) still knows it. The ``Date`` header of every response follows the twin
clock, so clients that take Salesforce's time from it see the clock tests move. :meth:`SalesforceTwin.transaction` writes rows stamped now but visible only on
commit: the "late commit" that defeats naive watermarks (prior-art.md §5 class 1).
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import random
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import jwt

from connector.remote.twin import Clock, Twin, TwinCA, TwinRequest, TwinResponse
from connector.salesforce.soql import id_checksum
from connector.salesforce.twin_soql import (
    Bound,
    Children,
    FieldDef,
    Parent,
    ParsedQuery,
    Relationship,
    Select,
    SoqlError,
    parse,
    sort_key,
)

__all__ = [
    "MASTER_RECORD_TYPE",
    "RELATIONSHIPS",
    "STANDARD_STAGES",
    "SalesforceTwin",
    "SeedSummary",
    "seed",
]

MASTER_RECORD_TYPE = "012000000000000AAA"
MAX_URI = 16_384  # documented since API 49.0; salesforce.stackexchange.com/q/195449
MAX_COLLECTION = 200  # sObject Collections: "up to 200 records"
GET_DELETED_DAYS = 15
GET_UPDATED_DAYS = 30
JWT_MAX_LIFETIME = timedelta(minutes=3)

# (ApiName, DefaultProbability, ForecastCategoryName, IsClosed, IsWon, SortOrder) — Salesforce's defaults
STANDARD_STAGES: tuple[tuple[str, int, str, bool, bool, int], ...] = (
    ("Prospecting", 10, "Pipeline", False, False, 1),
    ("Qualification", 10, "Pipeline", False, False, 2),
    ("Needs Analysis", 20, "Pipeline", False, False, 3),
    ("Value Proposition", 50, "Pipeline", False, False, 4),
    ("Id. Decision Makers", 60, "Pipeline", False, False, 5),
    ("Perception Analysis", 70, "Pipeline", False, False, 6),
    ("Proposal/Price Quote", 75, "Pipeline", False, False, 7),
    ("Negotiation/Review", 90, "Pipeline", False, False, 8),
    ("Closed Won", 100, "Closed", True, True, 9),
    ("Closed Lost", 0, "Omitted", True, False, 10),
)

_PREFIX = {
    "Opportunity": "006",
    "Account": "001",
    "Contact": "003",
    "User": "005",
    "OpportunityContactRole": "00K",
    "OpportunityTeamMember": "00q",
    "OpportunityLineItem": "00k",
    "Product2": "01t",
    "OpportunityStage": "01J",
    "RecordType": "012",
}
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SYSTEM = ("SystemModstamp", "LastModifiedDate", "CreatedDate", "IsDeleted")


def _f(name: str, type_: str, **kw: Any) -> FieldDef:
    return FieldDef(name, type_, **kw)


def _system_fields() -> list[FieldDef]:
    return [
        _f("Id", "id", createable=False, updateable=False),
        _f("SystemModstamp", "datetime", createable=False, updateable=False),
        _f("LastModifiedDate", "datetime", createable=False, updateable=False),
        _f("CreatedDate", "datetime", createable=False, updateable=False),
        _f("IsDeleted", "boolean", createable=False, updateable=False),
    ]


HELP_TYPES = (
    "WorkloadSpecificValueProposition",
    "CustomerTechnicalArchitecture",
    "ProofOfConceptOrDemo",
    "QuotesOrLicensing",
    "PostSalesCustomerSuccess",
    "GeneralOrOther",
)
#: the help-type picklist's labels (API values are Partner Center's codes; labels are the words the
#: default mapping's ``help_types`` lists)
HELP_TYPE_LABELS = (
    ("WorkloadSpecificValueProposition", "Workload value proposition"),
    ("CustomerTechnicalArchitecture", "Technical architecture"),
    ("ProofOfConceptOrDemo", "Proof of concept or demo"),
    ("QuotesOrLicensing", "Quotes or licensing"),
    ("PostSalesCustomerSuccess", "Post-sales customer success"),
    ("GeneralOrOther", "General or other"),
)
#: a custom loss-reason picklist (``crm.fields.lost_reason: Loss_Reason__c``) with the reasons the
#: default mapping's ``values.reasons`` maps, plus one deactivated value
LOSS_REASONS = (
    "Price",
    "No Budget",
    "No Decision / Non-Responsive",
    "Lost to Competitor",
    "Requirements Not Met",
    "Timing",
    "Other",
)
LOSS_REASONS_INACTIVE = ("Discontinued Product",)


def _schema(multi_currency: bool, country_picklists: bool) -> dict[str, dict[str, FieldDef]]:
    stages = tuple(s[0] for s in STANDARD_STAGES)
    opp = [
        *_system_fields(),
        _f("Name", "string", required=True, length=120),
        _f("StageName", "picklist", picklist=stages, restricted=True, required=True),
        _f("Probability", "percent"),
        _f("Amount", "currency"),
        _f("CloseDate", "date", required=True),
        _f("IsClosed", "boolean", createable=False, updateable=False),
        _f("IsWon", "boolean", createable=False, updateable=False),
        _f(
            "ForecastCategoryName",
            "picklist",
            picklist=("Pipeline", "Best Case", "Commit", "Closed", "Omitted"),
        ),
        _f("AccountId", "reference"),
        _f("OwnerId", "reference"),
        _f("CampaignId", "reference"),
        _f("RecordTypeId", "reference"),
        _f("Description", "textarea", length=32_000),
        _f("Sync_with_Partner_Center__c", "boolean"),
        _f("Partner_Center_Referral_Id__c", "string", length=64),
        _f("Partner_Center_Referral_Link__c", "url"),
        _f("Partner_Center_Sync_Status__c", "string", length=255),
        _f("Partner_Center_Last_Sync__c", "datetime"),
        _f("Partner_Center_Audit__c", "string", length=255),
        _f(
            "Partner_Center_Help_Type__c",
            "picklist",
            picklist=HELP_TYPES,
            restricted=True,
            labels=HELP_TYPE_LABELS,
        ),
        _f("Partner_Center_Visibility__c", "boolean"),
        _f("Partner_Center_Contact_Consent__c", "boolean"),
        _f("Partner_Center_Solutions__c", "multipicklist"),
        # new custom picklists are restricted by default in Salesforce
        _f(
            "Loss_Reason__c",
            "picklist",
            picklist=LOSS_REASONS,
            restricted=True,
            inactive=LOSS_REASONS_INACTIVE,
        ),
    ]
    if multi_currency:
        opp.append(_f("CurrencyIsoCode", "picklist", picklist=("USD", "EUR", "GBP", "JPY"), restricted=True))
    account = [
        *_system_fields(),
        _f("Name", "string", required=True),
        _f("BillingStreet", "textarea"),
        _f("BillingCity", "string"),
        _f("BillingState", "string"),
        _f("BillingPostalCode", "string"),
        _f("BillingCountry", "string"),
        _f("DunsNumber", "string", length=9),
    ]
    if country_picklists:
        account.append(_f("BillingCountryCode", "picklist"))
    person = [
        _f("FirstName", "string"),
        _f("LastName", "string", required=True),
        _f("Email", "email"),
        _f("Phone", "phone"),
        _f("Title", "string"),
    ]
    schema = {
        "Opportunity": opp,
        "Account": account,
        "Contact": [*_system_fields(), *person, _f("AccountId", "reference")],
        "User": [*_system_fields(), *person, _f("Name", "string"), _f("IsActive", "boolean")],
        "OpportunityContactRole": [
            *_system_fields(),
            _f("OpportunityId", "reference", required=True, updateable=False),
            _f("ContactId", "reference", required=True),
            _f("Role", "picklist"),
            _f("IsPrimary", "boolean"),
        ],
        "OpportunityTeamMember": [
            *_system_fields(),
            _f("OpportunityId", "reference", required=True, updateable=False),
            _f("UserId", "reference", required=True),
            _f("TeamMemberRole", "picklist"),
            _f("OpportunityAccessLevel", "picklist", picklist=("Read", "Edit", "All")),
        ],
        "OpportunityLineItem": [
            *_system_fields(),
            _f("OpportunityId", "reference", required=True, updateable=False),
            _f("Product2Id", "reference"),
            _f("PricebookEntryId", "reference"),
            _f("ProductCode", "string", createable=False, updateable=False),
            _f("Name", "string", createable=False, updateable=False),
            _f("Quantity", "double"),
            _f("UnitPrice", "currency"),
            _f("TotalPrice", "currency"),
        ],
        "Product2": [
            *_system_fields(),
            _f("Name", "string", required=True),
            _f("ProductCode", "string"),
            _f("IsActive", "boolean"),
        ],
        "OpportunityStage": [
            _f("Id", "id", createable=False, updateable=False),
            _f("ApiName", "string"),
            _f("MasterLabel", "string"),
            _f("DefaultProbability", "percent"),
            _f("ForecastCategoryName", "string"),
            _f("IsActive", "boolean"),
            _f("IsClosed", "boolean"),
            _f("IsWon", "boolean"),
            _f("SortOrder", "int"),
        ],
        "RecordType": [
            _f("Id", "id", createable=False, updateable=False),
            _f("Name", "string"),
            _f("DeveloperName", "string"),
            _f("SobjectType", "string"),
            _f("IsActive", "boolean"),
        ],
    }
    return {obj: {fd.name: fd for fd in fields} for obj, fields in schema.items()}


def _relationships() -> dict[str, dict[str, Relationship]]:
    parents = (  # (object, relationship, reference field, parent object)
        ("Opportunity", "Account", "AccountId", "Account"),
        ("Opportunity", "Owner", "OwnerId", "User"),
        ("Contact", "Account", "AccountId", "Account"),
        ("OpportunityContactRole", "Opportunity", "OpportunityId", "Opportunity"),
        ("OpportunityContactRole", "Contact", "ContactId", "Contact"),
        ("OpportunityTeamMember", "Opportunity", "OpportunityId", "Opportunity"),
        ("OpportunityTeamMember", "User", "UserId", "User"),
        ("OpportunityLineItem", "Opportunity", "OpportunityId", "Opportunity"),
        ("OpportunityLineItem", "Product2", "Product2Id", "Product2"),
    )
    children = (  # (object, child relationship, child object, the child's reference field)
        ("Opportunity", "OpportunityContactRoles", "OpportunityContactRole", "OpportunityId"),
        ("Opportunity", "OpportunityTeamMembers", "OpportunityTeamMember", "OpportunityId"),
        ("Opportunity", "OpportunityLineItems", "OpportunityLineItem", "OpportunityId"),
    )
    out: dict[str, dict[str, Relationship]] = {}
    for obj, name, ref, target in parents:
        out.setdefault(obj, {})[name] = Relationship(name, "parent", ref, target)
    for obj, name, target, ref in children:
        out.setdefault(obj, {})[name] = Relationship(name, "child", ref, target)
    return out


#: The relationships SOQL may follow in the twin, per object: the lookups of its schema (names as in
#: Salesforce's describe, e.g. Opportunity.Owner -> User) and Opportunity's documented child
#: relationships (OpportunityContactRoles, OpportunityTeamMembers, OpportunityLineItems).
RELATIONSHIPS: Mapping[str, Mapping[str, Relationship]] = _relationships()


def sf_datetime(value: datetime) -> str:
    """REST's datetime format: ``2024-05-01T12:30:15.000+0000``."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}+0000"


def _json_value(fd: FieldDef, value: Any) -> Any:
    if value is None:
        return None
    if fd.type == "datetime":
        return sf_datetime(value)
    if fd.type == "date":
        return value.isoformat()
    return value


def _csv_value(fd: FieldDef, value: Any) -> str:
    if value is None:
        return ""
    if fd.type == "datetime":
        return str(int(value.timestamp() * 1000))
    if fd.type == "date":
        return str(value.isoformat())
    if fd.type == "boolean":
        return "true" if value else "false"
    return str(value)


def _error(status: int, code: str, message: str, fields: list[str] | None = None) -> TwinResponse:
    body: dict[str, Any] = {"message": message, "errorCode": code}
    if fields is not None:
        body["fields"] = fields
    return TwinResponse(status, [body])


class _WriteFailure(Exception):
    def __init__(self, code: str, message: str, fields: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields or []


@dataclass
class _Locator:
    rows: list[dict[str, Any]]
    sobject: str
    include_deleted: bool
    # per row, the records it counts for in a batch (itself and its inline child records); None: 1 each
    weights: list[int] | None = None


@dataclass
class _BulkJob:
    id: str
    operation: str
    sobject: str
    rows: list[dict[str, Any]]
    fields: list[str]
    created: datetime
    polls_left: int


@dataclass
class SeedSummary:
    opportunities: list[str]
    accounts: list[str]
    users: list[str]
    contacts: list[str]
    products: list[str]
    record_types: dict[str, str]


# --- indexes --------------------------------------------------------------------------------------
# Salesforce answers the connector's selective queries from indexes; a twin that scans every row for
# each query costs ~50 ms per query at 100,000 opportunities (0.2 s for an idle incremental query),
# which swamps what a benchmark means to measure. So the twin keeps, per table, lazily built indexes
# for the predicates the connector sends as top-level AND conjuncts (twin_soql.Bound):
#
# - ``Id = / IN``: the table itself (it is keyed by Id);
# - ``<field> = / IN`` on reference fields (OpportunityId, AccountId, ContactId, UserId, ...) and
#   string fields (the referral id ``find_by_referral`` looks up, an external id in a real org): a hash
#   index comparison key -> row ids (the key folds case for text, as SOQL's comparison does);
# - ``SystemModstamp`` ranges: the same hash index plus its distinct stamps kept sorted, so a range
#   is a bisect (stamps are truncated to the second: many rows share one);
# - subqueries: a parent's children come from the hash index on the child's reference field
#   (``OpportunityId``), put back in table order (``SalesforceTwin._children_of``).
#
# An index only narrows the rows looked at: the whole WHERE still runs on them, and they are put back
# in table order before ORDER BY (whose sort is stable), so a query returns exactly what a scan would.
# Indexes are built on first use and then maintained by add_row / update_row / delete_row / purge_row;
# a table dict replaced wholesale (allOrNone rollback) or grown/shrunk behind the twin's back is
# noticed and its indexes rebuilt. Editing an indexed field of a row dict directly (rather than with
# update_row) is not noticed: tests must not do that.

_RANGE_INDEXED = frozenset({"SystemModstamp"})
_SCAN_SHARE = 0.5  # use an index only when it narrows to under this share of the table


def _indexable(fd: FieldDef, bound: Bound) -> bool:
    if fd.name in _RANGE_INDEXED:
        return True
    return bound.op == "in" and fd.type in ("id", "reference", "string")


class _FieldIndex:
    """One field of one table: comparison key -> ids of the rows holding it (a bucket is a bare id
    while it has one row, as most lookup values do, else a set), and with ``ranged`` the distinct
    non-null keys sorted for range bounds."""

    def __init__(self, fd: FieldDef, *, ranged: bool) -> None:
        self.fd = fd
        self.ranged = ranged
        self.key_of: dict[str, Any] = {}  # row id -> the key it is filed under
        self.buckets: dict[Any, str | set[str]] = {}
        self.sorted_keys: list[Any] = []

    def fill(self, table: Mapping[str, Mapping[str, Any]]) -> None:
        """The first build, from every row: what add() per row would give, in one cheaper pass."""
        fd, name = self.fd, self.fd.name
        groups: dict[Any, list[str]] = {}
        for rid, row in table.items():
            key = self.key_of[rid] = sort_key(fd, row.get(name))
            group = groups.get(key)
            if group is None:
                groups[key] = [rid]
            else:
                group.append(rid)
        self.buckets = {key: ids[0] if len(ids) == 1 else set(ids) for key, ids in groups.items()}
        if self.ranged:
            self.sorted_keys = sorted(key for key in groups if key is not None)

    def add(self, rid: str, value: Any) -> None:
        key = sort_key(self.fd, value)
        self.key_of[rid] = key
        bucket = self.buckets.get(key)
        if bucket is None:
            self.buckets[key] = rid
            if self.ranged and key is not None:
                bisect.insort(self.sorted_keys, key)
        elif isinstance(bucket, str):
            self.buckets[key] = {bucket, rid}
        else:
            bucket.add(rid)

    def remove(self, rid: str) -> None:
        if rid not in self.key_of:
            return
        key = self.key_of.pop(rid)
        bucket = self.buckets[key]
        if isinstance(bucket, set) and len(bucket) > 1:
            bucket.discard(rid)
            if len(bucket) == 1:
                self.buckets[key] = next(iter(bucket))
            return
        del self.buckets[key]
        if self.ranged and key is not None:
            del self.sorted_keys[bisect.bisect_left(self.sorted_keys, key)]

    def lookup(self, bound: Bound) -> list[str | set[str]]:
        """The buckets of the rows that may satisfy ``bound`` (disjoint: one per distinct key)."""
        if bound.op == "in":
            return [self.buckets[k] for k in bound.keys if k in self.buckets]
        keys = self.sorted_keys
        lo, hi = 0, len(keys)
        if bound.op == ">=":
            lo = bisect.bisect_left(keys, bound.keys)
        elif bound.op == ">":
            lo = bisect.bisect_right(keys, bound.keys)
        elif bound.op == "<=":
            hi = bisect.bisect_right(keys, bound.keys)
        else:  # "<"
            hi = bisect.bisect_left(keys, bound.keys)
        return [self.buckets[k] for k in keys[lo:hi]]


class _TableIndex:
    """The indexes of one table, and each row's position in it (dict insertion order: what a scan
    returns before ORDER BY), so index hits can be put back in scan order."""

    def __init__(self, table: dict[str, dict[str, Any]]) -> None:
        self.table = table  # the dict indexed; another one in its place means rebuild
        self.position = {rid: i for i, rid in enumerate(table)}
        self.next_position = len(table)
        self.fields: dict[str, _FieldIndex] = {}

    def field(self, fd: FieldDef) -> _FieldIndex:
        found = self.fields.get(fd.name)
        if found is None:
            found = self.fields[fd.name] = _FieldIndex(fd, ranged=fd.name in _RANGE_INDEXED)
            found.fill(self.table)
        return found

    def put(self, rid: str, row: Mapping[str, Any]) -> None:
        """``row`` was added (at the end of the table) or changed."""
        if rid not in self.position:
            self.position[rid] = self.next_position
            self.next_position += 1
        for index in self.fields.values():
            index.remove(rid)
            index.add(rid, row.get(index.fd.name))

    def drop(self, rid: str) -> None:
        self.position.pop(rid, None)
        for index in self.fields.values():
            index.remove(rid)


@dataclass
class _Pending:
    sobject: str
    id: str
    values: dict[str, Any]
    stamp: datetime


class Transaction:
    """Writes stamped when made, visible only on :meth:`commit` (a long Salesforce transaction)."""

    def __init__(self, twin: SalesforceTwin) -> None:
        self._twin = twin
        self._pending: list[_Pending] = []

    def update(self, sobject: str, record_id: str, values: Mapping[str, Any]) -> None:
        self._pending.append(_Pending(sobject, record_id, dict(values), self._twin.stamp()))

    def commit(self) -> None:
        for p in self._pending:
            self._twin.update_row(p.sobject, p.id, p.values, stamp=p.stamp)
        self._pending.clear()


class SalesforceTwin(Twin):
    """The Salesforce twin. Configure credentials with the constructor; seed with :func:`seed`."""

    name = "salesforce"

    def __init__(
        self,
        ca: TwinCA,
        *,
        clock: Clock | None = None,
        client_id: str = "3MVG9-twin-consumer-key",
        client_secret: str = "twin-consumer-secret",  # noqa: S107 - a twin's fixed test credential
        users: Mapping[str, str] | None = None,
        jwt_public_key: bytes | None = None,
        jwt_audience: str | None = None,
        session_ttl: timedelta = timedelta(hours=2),
        daily_api_limit: int = 100_000,
        multi_currency: bool = True,
        country_picklists: bool = False,
        bulk_polls_in_progress: int = 1,
        child_batch_size: int = 200,
    ) -> None:
        super().__init__(ca, clock=clock)
        #: children a subquery returns inline per parent; more get done=false and a nextRecordsUrl.
        #: Salesforce does not document its threshold: tests set it low to make child paging happen.
        self.child_batch_size = child_batch_size
        self.client_id = client_id
        self.client_secret = client_secret
        self.users: dict[str, str] = dict(users or {"integration@example.com": "twin-password"})
        self.jwt_public_key = jwt_public_key
        self._jwt_audience = jwt_audience
        self.session_ttl = session_ttl
        self.daily_api_limit = daily_api_limit
        self.api_used = 0
        self.bulk_polls_in_progress = bulk_polls_in_progress
        self.schema = _schema(multi_currency, country_picklists)
        self.tables: dict[str, dict[str, dict[str, Any]]] = {obj: {} for obj in self.schema}
        self.sessions: dict[str, datetime] = {}
        self.sign_ins: list[str] = []  # grant types, in order
        self.deleted_log: list[tuple[str, str, datetime]] = []  # (sobject, id, deletedDate)
        self.delete_log_purged_before: datetime | None = None
        self.record_type_stages: dict[str, tuple[str, ...]] = {}
        self.validation_rules: list[Callable[[str, Mapping[str, Any]], str | None]] = []
        self.locked: dict[str, int] = {}
        self._counter = itertools.count(1)
        self._locators: dict[str, _Locator] = {}
        self._jobs: dict[str, _BulkJob] = {}
        self._data_lock = threading.RLock()
        self._indexes: dict[str, _TableIndex] = {}  # per sObject, built on first use
        self._seed_stages()

    # --- python-side API (tests and seeding) -------------------------------------------------------
    @property
    def jwt_audience(self) -> str:
        return self._jwt_audience or self.base_url

    def stamp(self) -> datetime:
        """Now on the twin clock, truncated to the second as Salesforce's stamps are in practice."""
        return self.clock.now().astimezone(UTC).replace(microsecond=0)

    def new_id(self, sobject: str) -> str:
        n = next(self._counter)
        digits = ""
        while n:
            n, r = divmod(n, 62)
            digits = _B62[r] + digits
        id15 = _PREFIX.get(sobject, "a00") + "Tw" + digits.rjust(10, "0")
        return id15 + id_checksum(id15)

    def add_row(self, sobject: str, values: Mapping[str, Any], *, stamp: datetime | None = None) -> str:
        with self._data_lock:
            rid = str(values.get("Id") or self.new_id(sobject))
            when = stamp or self.stamp()
            row: dict[str, Any] = dict.fromkeys(self.schema[sobject])
            row.update({"Id": rid, "IsDeleted": False})
            if "SystemModstamp" in row:
                row.update({"SystemModstamp": when, "LastModifiedDate": when, "CreatedDate": when})
            row.update({k: v for k, v in values.items() if k != "Id"})
            if sobject == "Opportunity":
                self._derive_stage(row, set(values))
            self.tables[sobject][rid] = row
            self._reindex(sobject, rid)
            return rid

    def update_row(
        self, sobject: str, record_id: str, values: Mapping[str, Any], *, stamp: datetime | None = None
    ) -> None:
        with self._data_lock:
            row = self.tables[sobject][record_id]
            row.update(values)
            if sobject == "Opportunity":
                self._derive_stage(row, set(values))
            when = stamp or self.stamp()
            row["SystemModstamp"] = when
            row["LastModifiedDate"] = when
            self._reindex(sobject, record_id)

    def delete_row(self, sobject: str, record_id: str) -> None:
        """Soft delete: to the recycle bin and the delete log. The row's SystemModstamp moves (as in
        Salesforce), ``query`` no longer returns it, ``queryAll`` returns it with IsDeleted = true, and
        getDeleted lists it for 15 days."""
        with self._data_lock:
            row = self.tables[sobject][record_id]
            if row.get("IsDeleted"):
                raise ValueError(f"{record_id} is already deleted")
            when = self.stamp()
            row.update({"IsDeleted": True, "SystemModstamp": when})
            self._reindex(sobject, record_id)
            self.deleted_log.append((sobject, record_id, when))

    def purge_row(self, sobject: str, record_id: str) -> None:
        """Empty a soft-deleted row from the recycle bin (emptyRecycleBin, or Salesforce's own purge):
        ``queryAll`` no longer returns it; getDeleted still lists it within its window."""
        with self._data_lock:
            row = self.tables[sobject].get(record_id)
            if row is None or not row.get("IsDeleted"):
                raise ValueError(f"{record_id} is not in the recycle bin")
            del self.tables[sobject][record_id]
            self._reindex(sobject, record_id)

    def hard_delete_row(self, sobject: str, record_id: str) -> None:
        """Delete bypassing the recycle bin (Bulk API hardDelete): only getDeleted knows it was there."""
        with self._data_lock:
            self.delete_row(sobject, record_id)
            self.purge_row(sobject, record_id)

    def purge_delete_log(self, before: datetime) -> None:
        """Salesforce may purge the delete log early; getDeleted then reports a later earliestDateAvailable."""
        with self._data_lock:
            self.deleted_log = [d for d in self.deleted_log if d[2] >= before]
            self.delete_log_purged_before = before

    def transaction(self) -> Transaction:
        return Transaction(self)

    def expire_sessions(self) -> None:
        with self._data_lock:
            self.sessions.clear()

    def lock_rows(self, ids: list[str], times: int = 1) -> None:
        with self._data_lock:
            for rid in ids:
                self.locked[rid] = times

    def add_record_type(self, developer_name: str, stages: tuple[str, ...]) -> str:
        rid = self.add_row(
            "RecordType",
            {
                "Name": developer_name.replace("_", " "),
                "DeveloperName": developer_name,
                "SobjectType": "Opportunity",
                "IsActive": True,
            },
        )
        self.record_type_stages[rid] = stages
        return rid

    def _seed_stages(self) -> None:
        for api, prob, fc, closed, won, order in STANDARD_STAGES:
            self.add_row(
                "OpportunityStage",
                {
                    "ApiName": api,
                    "MasterLabel": api,
                    "DefaultProbability": float(prob),
                    "ForecastCategoryName": fc,
                    "IsActive": True,
                    "IsClosed": closed,
                    "IsWon": won,
                    "SortOrder": order,
                },
            )

    def _stage(self, name: str) -> dict[str, Any] | None:
        for row in self.tables["OpportunityStage"].values():
            if row["ApiName"] == name:
                return row
        return None

    def _derive_stage(self, row: dict[str, Any], given: set[str]) -> None:
        stage = self._stage(row.get("StageName") or "")
        if stage is None:
            return
        row["IsClosed"] = stage["IsClosed"]
        row["IsWon"] = stage["IsWon"]
        row["ForecastCategoryName"] = stage["ForecastCategoryName"]
        if "StageName" in given and "Probability" not in given:
            row["Probability"] = stage["DefaultProbability"]

    # --- HTTP -------------------------------------------------------------------------------------
    def handle(self, request: TwinRequest) -> TwinResponse:
        path = request.path
        if path == "/services/oauth2/token":
            return self._token(request)
        if not path.startswith("/services/data/v"):
            return _error(404, "NOT_FOUND", "The requested resource does not exist")
        parts = [p for p in path.split("/")[3:] if p]  # ['vXX.X', ...]; simple-salesforce adds a trailing '/'
        version = parts[0]
        if not version[1:].replace(".", "").isdigit():
            return _error(404, "NOT_FOUND", "The requested resource does not exist")
        uri_len = len(path) + 1 + len(urllib.parse.urlencode(request.query, doseq=True))
        if uri_len > MAX_URI:
            return TwinResponse(414, "URI Too Long")
        token = (request.headers.get("authorization") or "").removeprefix("Bearer ").strip()
        with self._data_lock:
            expires = self.sessions.get(token)
            if expires is None or expires <= self.clock.now():
                self.sessions.pop(token, None)
                return _error(401, "INVALID_SESSION_ID", "Session expired or invalid")
            if self.api_used >= self.daily_api_limit:
                # crm-apis.md §A.5: exhaustion is a 403 without Retry-After or rate headers.
                return _error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
            self.api_used += 1
            usage = f"api-usage={self.api_used}/{self.daily_api_limit}"
            response = self._route(request, version, parts[1:])
        response.headers.setdefault("Sforce-Limit-Info", usage)
        return response

    def _route(self, request: TwinRequest, version: str, rest: list[str]) -> TwinResponse:
        method = request.method
        try:
            if rest == ["limits"] and method == "GET":
                return TwinResponse(
                    200,
                    {
                        "DailyApiRequests": {
                            "Max": self.daily_api_limit,
                            "Remaining": self.daily_api_limit - self.api_used,
                        }
                    },
                )
            if rest and rest[0] in ("query", "queryAll") and method == "GET":
                return self._query(request, version, rest)
            if rest[:1] == ["sobjects"] and len(rest) >= 2:
                return self._sobjects(request, version, rest[1:])
            if rest == ["composite", "sobjects"] and method in ("PATCH", "POST"):
                return self._collection(request, creating=method == "POST")
            if (
                rest[:3] == ["ui-api", "object-info", "Opportunity"]
                and len(rest) == 6
                and rest[3] == "picklist-values"
            ):
                return self._picklist(rest[4], rest[5])
            if rest[:2] == ["jobs", "query"]:
                return self._bulk(request, version, rest[2:])
        except SoqlError as exc:
            return _error(400, exc.code, exc.message)
        return _error(404, "NOT_FOUND", "The requested resource does not exist")

    # --- OAuth ------------------------------------------------------------------------------------
    def _token(self, request: TwinRequest) -> TwinResponse:
        if request.method != "POST":
            return TwinResponse(405, {"error": "invalid_request", "error_description": "must use HTTP POST"})
        form = request.form()
        grant = form.get("grant_type", "")
        bad = TwinResponse(400, {"error": "invalid_grant", "error_description": "authentication failure"})
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            if self.jwt_public_key is None:
                return bad
            try:
                claims = jwt.decode(
                    form.get("assertion", ""),
                    self.jwt_public_key,
                    algorithms=["RS256"],
                    audience=self.jwt_audience,
                    options={"require": ["iss", "sub", "aud", "exp"], "verify_exp": False},
                )
            except jwt.PyJWTError:
                return TwinResponse(400, {"error": "invalid_grant", "error_description": "invalid assertion"})
            now = self.clock.now().timestamp()
            exp = float(claims["exp"])
            if exp <= now or exp > now + JWT_MAX_LIFETIME.total_seconds() + 5:
                return TwinResponse(
                    400, {"error": "invalid_grant", "error_description": "expired authorization code"}
                )
            if claims["iss"] != self.client_id:
                return TwinResponse(
                    400, {"error": "invalid_client_id", "error_description": "client identifier invalid"}
                )
            if claims["sub"] not in self.users:
                return TwinResponse(
                    400, {"error": "invalid_grant", "error_description": "user hasn't approved this consumer"}
                )
        elif grant == "client_credentials":
            cid, secret = form.get("client_id"), form.get("client_secret")
            auth = request.headers.get("authorization", "")
            if auth.startswith("Basic "):
                import base64

                cid, _, secret = base64.b64decode(auth[6:]).decode("utf-8").partition(":")
            if cid != self.client_id or secret != self.client_secret:
                return TwinResponse(
                    400, {"error": "invalid_client", "error_description": "invalid client credentials"}
                )
        elif grant == "password":
            if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
                return TwinResponse(
                    400, {"error": "invalid_client", "error_description": "invalid client credentials"}
                )
            if self.users.get(form.get("username", "")) != form.get("password"):
                return bad
        else:
            return TwinResponse(
                400, {"error": "unsupported_grant_type", "error_description": "grant type not supported"}
            )
        token = "00DTw0000000001!" + uuid.uuid4().hex
        with self._data_lock:
            self.sessions[token] = self.clock.now() + self.session_ttl
            self.sign_ins.append(grant)
        return TwinResponse(
            200,
            {
                "access_token": token,
                "instance_url": self.base_url,
                "id": f"{self.base_url}/id/00DTw0000000001AAA/005Tw0000000001AAA",
                "token_type": "Bearer",
                "issued_at": str(int(self.clock.now().timestamp() * 1000)),
                "signature": "twin",
            },
        )

    # --- query ------------------------------------------------------------------------------------
    def _index(self, sobject: str) -> _TableIndex:
        """The table's indexes, (re)started empty if missing or no longer describing the table."""
        table = self.tables[sobject]
        index = self._indexes.get(sobject)
        if index is None or index.table is not table or len(index.position) != len(table):
            index = self._indexes[sobject] = _TableIndex(table)
        return index

    def _reindex(self, sobject: str, record_id: str) -> None:
        """Keep built indexes current after a write to ``record_id`` (added, changed or purged)."""
        index = self._indexes.get(sobject)
        if index is None or index.table is not self.tables[sobject]:
            return  # not built, or stale (then _index rebuilds it when next needed)
        row = index.table.get(record_id)
        if row is None:
            index.drop(record_id)
        else:
            index.put(record_id, row)

    def _candidates(self, parsed: ParsedQuery) -> list[dict[str, Any]] | None:
        """The rows the WHERE may match, in table order, from its most selective indexable bound;
        None when no index narrows it enough to beat a scan."""
        schema = self.schema[parsed.sobject]
        table = self.tables[parsed.sobject]
        usable = [b for b in parsed.bounds if _indexable(schema[b.field], b)]
        if not usable:
            return None
        index = self._index(parsed.sobject)
        best: tuple[int, list[str | set[str]]] | None = None  # (rows, buckets)
        for bound in usable:
            if bound.field == "Id" and bound.op == "in":
                # The table is keyed by Id (add_row keeps row["Id"] equal to its key): its own index.
                buckets: list[str | set[str]] = [k for k in bound.keys if k in table]
            else:
                buckets = index.field(schema[bound.field]).lookup(bound)
            size = sum(1 if isinstance(b, str) else len(b) for b in buckets)
            if best is None or size < best[0]:
                best = (size, buckets)
        assert best is not None
        if best[0] > _SCAN_SHARE * len(table):
            return None
        ids = [rid for b in best[1] for rid in ((b,) if isinstance(b, str) else b)]
        ids.sort(key=index.position.__getitem__)
        return [table[rid] for rid in ids]

    def _rows(self, parsed: ParsedQuery, include_deleted: bool) -> list[dict[str, Any]]:
        table = self.tables[parsed.sobject]
        candidates = self._candidates(parsed)
        source = table.values() if candidates is None else candidates
        rows = [r for r in source if include_deleted or not r.get("IsDeleted")]
        if parsed.where is not None:
            rows = [r for r in rows if parsed.where(r)]
        schema = self.schema[parsed.sobject]
        for name, asc, nulls_first in reversed(parsed.order):
            fd = schema[name]
            present = [r for r in rows if r.get(name) is not None]
            absent = [r for r in rows if r.get(name) is None]
            keys = {id(r): sort_key(fd, r[name]) for r in present}
            present.sort(key=lambda r: keys[id(r)], reverse=not asc)
            rows = absent + present if nulls_first else present + absent
        if parsed.limit is not None:
            rows = rows[: parsed.limit]
        return rows

    def _render(
        self, sobject: str, version: str, fields: list[str], row: Mapping[str, Any]
    ) -> dict[str, Any]:
        schema = self.schema[sobject]
        out: dict[str, Any] = {
            "attributes": {"type": sobject, "url": f"/services/data/{version}/sobjects/{sobject}/{row['Id']}"}
        }
        for name in fields:
            out[name] = _json_value(schema[name], row.get(name))
        return out

    def _children_of(self, rel: Relationship) -> Callable[[str], list[dict[str, Any]]]:
        """A parent id -> its ``rel`` child rows in table order (deleted ones included), from the
        index on the child's reference field: what a scan of the child table would return."""
        table = self.tables[rel.target]
        index = self._index(rel.target)
        buckets = index.field(self.schema[rel.target][rel.field]).buckets
        position = index.position

        def children(parent_id: str) -> list[dict[str, Any]]:
            bucket = buckets.get(parent_id)  # a reference field's comparison key is its value
            if bucket is None:
                return []
            if isinstance(bucket, str):
                return [table[bucket]]
            return [table[rid] for rid in sorted(bucket, key=position.__getitem__)]

        return children

    def _renderer(
        self, sobject: str, select: Select, version: str, kind: str, include_deleted: bool
    ) -> Callable[[Mapping[str, Any]], tuple[dict[str, Any], int]]:
        """Renders one ``sobject`` row as ``select`` asks: the record and the records it counts for
        in a batch (itself plus its inline children)."""
        prefix = f"/services/data/{version}/sobjects/{sobject}/"
        steps: list[tuple[str, int, Any]] = []
        for key, item in select.items():
            if isinstance(item, FieldDef):
                # values of other types go out as stored; datetimes and dates are formatted
                steps.append((key, 3 if item.type in ("datetime", "date") else 0, item))
            elif isinstance(item, Parent):
                rel = item.relationship
                render = self._renderer(rel.target, item.select, version, kind, include_deleted)
                # one rendering per parent per query: many deals share an account, an owner
                steps.append((key, 1, (rel.field, self.tables[rel.target], render, {})))
            else:
                assert isinstance(item, Children)
                rel = item.relationship
                render = self._renderer(rel.target, item.select, version, kind, include_deleted)
                steps.append((key, 2, (self._children_of(rel), rel.target, render)))

        def render_row(row: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
            out: dict[str, Any] = {"attributes": {"type": sobject, "url": prefix + row["Id"]}}
            weight = 1
            for key, step, arg in steps:
                if step == 0:
                    out[key] = row.get(key)
                elif step == 3:
                    out[key] = _json_value(arg, row.get(key))
                elif step == 1:
                    ref, parents, render, rendered = arg
                    parent_id = row.get(ref) or ""
                    if parent_id not in rendered:
                        parent = parents.get(parent_id)
                        # an empty lookup, or one whose record is gone or in the recycle bin: null
                        gone = parent is None or parent.get("IsDeleted")
                        rendered[parent_id] = None if gone else render(parent)[0]
                    out[key] = rendered[parent_id]
                else:
                    children_of, child_sobject, render = arg
                    rows = [r for r in children_of(row["Id"]) if include_deleted or not r.get("IsDeleted")]
                    out[key] = self._nested(child_sobject, [render(r)[0] for r in rows], version, kind)
                    if rows:
                        weight += len(out[key]["records"])
            return out, weight

        return render_row

    def _nested(
        self, sobject: str, records: list[dict[str, Any]], version: str, kind: str
    ) -> dict[str, Any] | None:
        """A subquery's result for one parent: null without children, else a query result whose
        first ``child_batch_size`` records are inline and the rest behind its own locator."""
        if not records:
            return None
        limit = max(1, self.child_batch_size)
        if len(records) <= limit:
            return {"totalSize": len(records), "done": True, "records": records}
        locator_id = "01g" + uuid.uuid4().hex[:15]
        self._locators[locator_id] = _Locator(records, sobject, kind == "queryAll")
        return {
            "totalSize": len(records),
            "done": False,
            "records": records[:limit],
            "nextRecordsUrl": f"/services/data/{version}/{kind}/{locator_id}-{limit}",
        }

    def _query(self, request: TwinRequest, version: str, rest: list[str]) -> TwinResponse:
        include_deleted = rest[0] == "queryAll"
        batch = 2000
        options = request.headers.get("sforce-query-options", "")
        if options.startswith("batchSize="):
            batch = max(200, min(2000, int(options.split("=", 1)[1])))
        if len(rest) == 2:
            locator_id, _, offset_text = rest[1].rpartition("-")
            with self._data_lock:
                locator = self._locators.get(locator_id)
            if locator is None or not offset_text.isdigit():
                return _error(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
            return self._page(locator, locator_id, int(offset_text), batch, version, rest[0])
        soql = request.arg("q")
        if not soql:
            return _error(400, "MALFORMED_QUERY", "missing q")
        with self._data_lock:
            parsed = parse(soql, self.schema, RELATIONSHIPS)
            rows = self._rows(parsed, include_deleted)
            if parsed.fields is None:
                return TwinResponse(200, {"totalSize": len(rows), "done": True, "records": []})
            render = self._renderer(parsed.sobject, parsed.select, version, rest[0], include_deleted)
            pairs = [render(r) for r in rows]
            rendered = [record for record, _weight in pairs]
            weights = [weight for _record, weight in pairs] if parsed.has_subqueries else None
            locator_id = "01g" + uuid.uuid4().hex[:15]
            locator = _Locator(rendered, parsed.sobject, include_deleted, weights)
            self._locators[locator_id] = locator
        return self._page(locator, locator_id, 0, batch, version, rest[0])

    def _page(
        self, locator: _Locator, locator_id: str, offset: int, batch: int, version: str, kind: str
    ) -> TwinResponse:
        end = min(offset + batch, len(locator.rows))
        if locator.weights is not None:
            # child records count toward the batch size (the Query Options header's documentation)
            end, used = offset, 0
            while end < len(locator.rows) and (end == offset or used + locator.weights[end] <= batch):
                used += locator.weights[end]
                end += 1
        rows = locator.rows[offset:end]
        body: dict[str, Any] = {
            "totalSize": len(locator.rows),
            "done": end >= len(locator.rows),
            "records": rows,
        }
        if not body["done"]:
            body["nextRecordsUrl"] = f"/services/data/{version}/{kind}/{locator_id}-{end}"
        else:
            # A cursor read to its end is closed, as Salesforce's are: asking it again is
            # INVALID_QUERY_LOCATOR. Kept, a full read of 100,000 nested records stayed in the twin.
            with self._data_lock:
                self._locators.pop(locator_id, None)
        return TwinResponse(200, body)

    # --- sobjects ---------------------------------------------------------------------------------
    def _sobjects(self, request: TwinRequest, version: str, rest: list[str]) -> TwinResponse:
        sobject = rest[0]
        if sobject not in self.schema:
            return _error(404, "NOT_FOUND", "The requested resource does not exist")
        method = request.method
        if rest[1:] == ["describe"] and method == "GET":
            return TwinResponse(200, self._describe(sobject))
        if rest[1:] in (["deleted"], ["updated"]) and method == "GET":
            return self._replication(request, sobject, rest[1])
        if len(rest) == 1 and method == "POST":
            results = self._write_many(sobject, [request.json() or {}], creating=True, all_or_none=True)
            res = results[0]
            if not res["success"]:
                err = res["errors"][0]
                return _error(400, err["statusCode"], err["message"], err["fields"])
            return TwinResponse(201, {"id": res["id"], "success": True, "errors": []})
        if len(rest) == 2:
            rid = rest[1]
            with self._data_lock:
                row = self.tables[sobject].get(rid)
                if row is None or row.get("IsDeleted"):
                    return _error(404, "NOT_FOUND", "The requested resource does not exist")
                if method == "GET":
                    return TwinResponse(200, self._render(sobject, version, list(self.schema[sobject]), row))
                if method == "DELETE":
                    self.delete_row(sobject, rid)
                    return TwinResponse(204)
                if method == "PATCH":
                    header = request.headers.get("if-unmodified-since")
                    if header is not None:
                        try:
                            since = parsedate_to_datetime(header)
                        except (TypeError, ValueError):
                            since = None
                        if since is None or since.tzinfo is None:
                            return _error(
                                400, "INVALID_HEADER_TYPE", "If-Unmodified-Since is not a valid HTTP-date"
                            )
                        if row["LastModifiedDate"] > since:
                            return _error(
                                412, "PRECONDITION_FAILED", "The record was modified since the given date"
                            )
                    body = dict(request.json() or {})
                    body["id"] = rid
                    res = self._write_many(sobject, [body], creating=False, all_or_none=True)[0]
                    if not res["success"]:
                        err = res["errors"][0]
                        return _error(400, err["statusCode"], err["message"], err["fields"])
                    return TwinResponse(204)
        return _error(404, "NOT_FOUND", "The requested resource does not exist")

    def _describe(self, sobject: str) -> dict[str, Any]:
        """The DescribeSObjectResult shape: per field its type, flags and, for picklists, every value
        (``active`` false for deactivated ones) and ``restrictedPicklist``."""
        fields = []
        for fd in self.schema[sobject].values():
            labels = dict(fd.labels)
            values = [(v, labels.get(v, v), True) for v in fd.picklist]
            values += [(v, labels.get(v, v), False) for v in fd.inactive]
            if sobject == "Opportunity" and fd.name == "StageName":
                values = [
                    (r["ApiName"], r["MasterLabel"] or r["ApiName"], bool(r["IsActive"]))
                    for r in sorted(
                        self.tables["OpportunityStage"].values(), key=lambda r: r.get("SortOrder") or 0
                    )
                ]
            fields.append(
                {
                    "name": fd.name,
                    "type": fd.type,
                    "length": fd.length,
                    "nillable": not fd.required,
                    "createable": fd.createable,
                    "updateable": fd.updateable,
                    "restrictedPicklist": fd.restricted,
                    "picklistValues": [
                        {
                            "value": v,
                            "label": label,
                            "active": active,
                            "defaultValue": False,
                            "validFor": None,
                        }
                        for v, label, active in values
                    ],
                }
            )
        return {"name": sobject, "keyPrefix": _PREFIX.get(sobject), "fields": fields}

    def _picklist(self, record_type: str, field_name: str) -> TwinResponse:
        if field_name != "StageName":
            return _error(404, "NOT_FOUND", "The requested resource does not exist")
        if record_type == MASTER_RECORD_TYPE:
            stages = tuple(r["ApiName"] for r in self.tables["OpportunityStage"].values() if r["IsActive"])
        elif record_type in self.record_type_stages:
            stages = self.record_type_stages[record_type]
        else:
            return _error(404, "NOT_FOUND", "The requested resource does not exist")
        return TwinResponse(
            200,
            {
                "controllerValues": {},
                "defaultValue": None,
                "eTag": uuid.uuid5(uuid.NAMESPACE_URL, ",".join(stages)).hex,
                "url": f"/services/data/v59.0/ui-api/object-info/Opportunity/picklist-values/{record_type}/StageName",
                "values": [{"attributes": None, "label": s, "validFor": [], "value": s} for s in stages],
            },
        )

    def _replication(self, request: TwinRequest, sobject: str, kind: str) -> TwinResponse:
        def when(name: str) -> datetime | None:
            text = request.arg(name)
            if not text:
                return None
            try:
                value = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                return None
            return value.astimezone(UTC).replace(second=0, microsecond=0) if value.tzinfo else None

        start, end = when("start"), when("end")
        now = self.stamp()
        if start is None or end is None:
            return _error(400, "INVALID_REPLICATION_DATE", "start and end must be valid dateTimes")
        days = GET_DELETED_DAYS if kind == "deleted" else GET_UPDATED_DAYS
        if end <= start:
            return _error(
                400,
                "INVALID_REPLICATION_DATE",
                "startDate must chronologically precede endDate by more than one minute",
            )
        if start < now - timedelta(days=days):
            return _error(400, "INVALID_REPLICATION_DATE", f"startDate cannot be more than {days} days ago")
        latest = min(end, now.replace(second=0))
        with self._data_lock:
            if kind == "updated":
                ids = [
                    r["Id"]
                    for r in self.tables[sobject].values()
                    if not r.get("IsDeleted") and start <= r["SystemModstamp"] < latest
                ]
                return TwinResponse(200, {"ids": ids, "latestDateCovered": sf_datetime(latest)})
            earliest = now - timedelta(days=days)
            if self.delete_log_purged_before is not None:
                earliest = max(earliest, self.delete_log_purged_before)
            records = [
                {"id": rid, "deletedDate": sf_datetime(at)}
                for obj, rid, at in self.deleted_log
                if obj == sobject and start <= at < latest
            ]
        return TwinResponse(
            200,
            {
                "deletedRecords": records,
                "earliestDateAvailable": sf_datetime(earliest.replace(second=0)),
                "latestDateCovered": sf_datetime(latest),
            },
        )

    # --- writes -----------------------------------------------------------------------------------
    def _collection(self, request: TwinRequest, *, creating: bool) -> TwinResponse:
        body = request.json()
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            return _error(400, "JSON_PARSER_ERROR", "expected {allOrNone, records}")
        records = body["records"]
        if len(records) > MAX_COLLECTION:
            return _error(
                400,
                "EXCEEDED_ID_LIMIT",
                "record limit reached. cannot submit more than 200 records into this call",
            )
        groups: dict[str, list[dict[str, Any]]] = {}
        for rec in records:
            kind = (rec.get("attributes") or {}).get("type")
            if kind not in self.schema:
                return _error(
                    400, "INVALID_TYPE", "every record needs attributes.type naming a known sObject"
                )
            groups.setdefault(kind, []).append(rec)
        if len(groups) > 10:
            return _error(400, "INVALID_BATCH_REQUEST", "up to 10 object types per request")
        all_or_none = bool(body.get("allOrNone", False))
        results: list[dict[str, Any]] = []
        with self._data_lock:
            snapshot = (
                {obj: {k: dict(v) for k, v in rows.items()} for obj, rows in self.tables.items()}
                if all_or_none
                else None
            )
            for rec in records:
                kind = rec["attributes"]["type"]
                results.extend(self._write_many(kind, [rec], creating=creating, all_or_none=False))
            if all_or_none and not all(r["success"] for r in results):
                assert snapshot is not None
                self.tables = snapshot
                self._indexes.clear()  # they describe the discarded tables
                results = [
                    r
                    if not r["success"]
                    else {
                        "id": r["id"],
                        "success": False,
                        "errors": [
                            {
                                "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                                "message": "Record rolled back because not all records were valid and the request was using AllOrNone header",
                                "fields": [],
                            }
                        ],
                    }
                    for r in results
                ]
        return TwinResponse(200, results)

    def _write_many(
        self, sobject: str, records: list[dict[str, Any]], *, creating: bool, all_or_none: bool
    ) -> list[dict[str, Any]]:
        out = []
        with self._data_lock:
            for rec in records:
                rid = rec.get("id") or rec.get("Id")
                try:
                    rid = self._write_one(sobject, rec, creating=creating)
                    out.append({"id": rid, "success": True, "errors": []})
                except _WriteFailure as exc:
                    res: dict[str, Any] = {
                        "success": False,
                        "errors": [{"statusCode": exc.code, "message": exc.message, "fields": exc.fields}],
                    }
                    if not creating and rid:
                        res["id"] = rid
                    out.append(res)
        return out

    def _write_one(self, sobject: str, rec: Mapping[str, Any], *, creating: bool) -> str:
        schema = self.schema[sobject]
        values = {k: v for k, v in rec.items() if k not in ("attributes", "id", "Id")}
        if creating and (rec.get("id") or rec.get("Id")):
            raise _WriteFailure(
                "INVALID_FIELD_FOR_INSERT_UPDATE", "cannot specify Id in an insert call", ["Id"]
            )
        rid = None if creating else str(rec.get("id") or rec.get("Id") or "")
        if not creating:
            row = self.tables[sobject].get(rid or "")
            if row is None:
                raise _WriteFailure("INVALID_ID_FIELD", "invalid record id", ["Id"])
            if row.get("IsDeleted"):
                raise _WriteFailure("ENTITY_IS_DELETED", "entity is deleted", [])
            if self.locked.get(rid or "", 0) > 0:
                self.locked[rid or ""] -= 1
                raise _WriteFailure(
                    "UNABLE_TO_LOCK_ROW",
                    f"unable to obtain exclusive access to this record or 1 records: {rid}",
                    [],
                )
        converted: dict[str, Any] = {}
        for name, value in values.items():
            fd = schema.get(name)
            if fd is None:
                raise _WriteFailure(
                    "INVALID_FIELD", f"No such column '{name}' on sobject of type {sobject}", [name]
                )
            if not (fd.createable if creating else fd.updateable):
                raise _WriteFailure(
                    "INVALID_FIELD_FOR_INSERT_UPDATE", f"Unable to create/update fields: {name}.", [name]
                )
            converted[name] = self._convert(fd, value)
        if creating:
            missing = [
                fd.name for fd in schema.values() if fd.required and converted.get(fd.name) in (None, "")
            ]
            if missing:
                raise _WriteFailure(
                    "REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]", missing
                )
        else:
            for fd in schema.values():
                if fd.required and fd.name in converted and converted[fd.name] in (None, ""):
                    raise _WriteFailure(
                        "REQUIRED_FIELD_MISSING", f"Required fields are missing: [{fd.name}]", [fd.name]
                    )
        for name, value in converted.items():
            fd = schema[name]
            if fd.restricted and value is not None:
                allowed = fd.picklist
                if sobject == "Opportunity" and name == "StageName":
                    allowed = tuple(
                        r["ApiName"] for r in self.tables["OpportunityStage"].values() if r["IsActive"]
                    )
                    rt = converted.get("RecordTypeId") or (
                        None if creating else self.tables[sobject][rid or ""].get("RecordTypeId")
                    )
                    if rt in self.record_type_stages:
                        allowed = self.record_type_stages[rt]
                if value not in allowed:
                    raise _WriteFailure(
                        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                        f"bad value for restricted picklist field: {value}",
                        [name],
                    )
            if fd.type == "string" and isinstance(value, str) and len(value) > fd.length:
                raise _WriteFailure("STRING_TOO_LONG", f"{name}: data value too large", [name])
        after = dict(self.tables[sobject][rid or ""]) if not creating else {}
        after.update(converted)
        for rule in self.validation_rules:
            message = rule(sobject, after)
            if message:
                raise _WriteFailure("FIELD_CUSTOM_VALIDATION_EXCEPTION", message, [])
        if creating:
            return self.add_row(sobject, converted)
        assert rid is not None
        self.update_row(sobject, rid, converted)
        return rid

    @staticmethod
    def _convert(fd: FieldDef, value: Any) -> Any:
        if value is None:
            return None
        bad = _WriteFailure(
            "INVALID_TYPE_ON_FIELD_IN_RECORD", f"{fd.name}: value not of required type: {value}", [fd.name]
        )
        try:
            if fd.type == "datetime":
                if not isinstance(value, str):
                    raise bad
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
                if parsed.tzinfo is None:
                    raise bad
                return parsed.astimezone(UTC)
            if fd.type == "date":
                if not isinstance(value, str):
                    raise bad
                return date.fromisoformat(value)
            if fd.type == "boolean":
                if not isinstance(value, bool):
                    raise bad
                return value
            if fd.type in ("double", "currency", "percent", "int"):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise bad
                return float(value)
        except ValueError:
            raise bad from None
        if not isinstance(value, str):
            raise bad
        return value

    # --- Bulk API 2.0 -----------------------------------------------------------------------------
    def _bulk(self, request: TwinRequest, version: str, rest: list[str]) -> TwinResponse:
        if not rest and request.method == "POST":
            body = request.json() or {}
            operation = body.get("operation")
            if operation not in ("query", "queryAll"):
                return _error(400, "INVALIDJOB", "operation must be query or queryAll")
            soql = str(body.get("query") or "")
            with self._data_lock:
                parsed = parse(soql, self.schema, RELATIONSHIPS)
                if parsed.fields is None:
                    return _error(400, "INVALIDJOB", "Aggregate queries are not supported by Bulk API 2.0")
                if parsed.has_subqueries:
                    return _error(
                        400, "INVALIDJOB", "Bulk API 2.0 does not support parent-to-child subqueries"
                    )
                rows = [
                    self._flat(parsed.sobject, r, parsed.fields)
                    for r in self._rows(parsed, operation == "queryAll")
                ]
                job = _BulkJob(
                    "750Tw" + uuid.uuid4().hex[:10].upper(),
                    operation,
                    parsed.sobject,
                    rows,
                    parsed.fields,
                    self.clock.now(),
                    self.bulk_polls_in_progress,
                )
                self._jobs[job.id] = job
            return TwinResponse(200, self._job_info(job, "UploadComplete", version))
        found = self._jobs.get(rest[0]) if rest else None
        if found is None:
            return _error(404, "NOT_FOUND", "The requested resource does not exist")
        job = found
        if len(rest) == 1 and request.method == "GET":
            state = "InProgress" if job.polls_left > 0 else "JobComplete"
            job.polls_left -= 1
            return TwinResponse(200, self._job_info(job, state, version))
        if rest[1:] == ["results"] and request.method == "GET":
            if job.polls_left >= 0:
                return _error(400, "INVALIDJOB", "job is not complete")
            max_records = int(request.arg("maxRecords") or 50_000)
            offset = int(request.arg("locator") or 0)
            chunk = job.rows[offset : offset + max_records]
            defs = [self._field_def(job.sobject, f) for f in job.fields]
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(job.fields)
            for row in chunk:
                writer.writerow([_csv_value(fd, row.get(f)) for fd, f in zip(defs, job.fields, strict=True)])
            nxt = offset + max_records
            return TwinResponse(
                200,
                buf.getvalue().encode("utf-8"),
                headers={
                    "Content-Type": "text/csv",
                    "Sforce-Locator": str(nxt) if nxt < len(job.rows) else "null",
                    "Sforce-NumberOfRecords": str(len(chunk)),
                },
            )
        return _error(404, "NOT_FOUND", "The requested resource does not exist")

    def _field_def(self, sobject: str, path: str) -> FieldDef:
        """The definition of a canonical column path (``Name``, ``Account.Name``)."""
        *hops, name = path.split(".")
        for hop in hops:
            sobject = RELATIONSHIPS[sobject][hop].target
        return self.schema[sobject][name]

    def _flat(self, sobject: str, row: Mapping[str, Any], paths: list[str]) -> dict[str, Any]:
        """A row's values for Bulk's CSV columns, parent fields followed through their lookups
        (an empty lookup, or one whose record is gone, gives an empty column)."""
        out: dict[str, Any] = {}
        for path in paths:
            *hops, name = path.split(".")
            obj, current = sobject, row
            for hop in hops:
                rel = RELATIONSHIPS[obj][hop]
                obj, parent = rel.target, self.tables[rel.target].get(current.get(rel.field) or "")
                current = {} if parent is None or parent.get("IsDeleted") else parent
            out[path] = current.get(name)
        return out

    @staticmethod
    def _job_info(job: _BulkJob, state: str, version: str) -> dict[str, Any]:
        # Shape of the documented create-job response (fixtures: bulk2-create-query-job-response.json).
        return {
            "id": job.id,
            "operation": job.operation,
            "object": job.sobject,
            "createdById": "005Tw0000000001AAA",
            "createdDate": sf_datetime(job.created),
            "systemModstamp": sf_datetime(job.created),
            "state": state,
            "concurrencyMode": "Parallel",
            "contentType": "CSV",
            "apiVersion": float(version[1:]),
            "lineEnding": "LF",
            "columnDelimiter": "COMMA",
            **({"numberRecordsProcessed": len(job.rows)} if state == "JobComplete" else {}),
        }

    # --- convenience ------------------------------------------------------------------------------
    def request_count(self, path_fragment: str = "", method: str = "GET") -> int:
        return sum(1 for r in self.calls(method) if path_fragment in r.path)

    def soql_log(self) -> Iterator[str]:
        for r in self.calls("GET"):
            q = r.arg("q")
            if q:
                yield q

    @contextmanager
    def frozen(self) -> Iterator[None]:
        with self._data_lock:
            yield


# --- seeding ---------------------------------------------------------------------------------------

_COUNTRIES = (
    ("United States", "US"),
    ("Germany", "DE"),
    ("United Kingdom", "GB"),
    ("France", "FR"),
    ("Japan", "JP"),
    ("Canada", "CA"),
)
_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Linus")
_LAST = (
    "Lovelace",
    "Hopper",
    "Turing",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Allen",
    "Thompson",
    "Perlman",
    "Torvalds",
)


def seed(
    twin: SalesforceTwin,
    opportunities: int,
    *,
    rng_seed: int = 7,
    opted_in_share: float = 1.0,
    stamps: int = 10,
    start: datetime | None = None,
) -> SeedSummary:
    """Deterministically add ``opportunities`` with accounts, contacts, users, products, team members,
    contact roles and line items across the standard stages. Rows share ``stamps`` distinct
    SystemModstamp values spaced one second apart (many rows per stamp, as in a real org after a
    data load)."""
    rng = random.Random(rng_seed)  # noqa: S311 - deterministic seed data, not security
    base = (start or twin.stamp() - timedelta(hours=1)).replace(microsecond=0)
    stamp_values = [base + timedelta(seconds=i) for i in range(max(1, stamps))]
    n_accounts = max(1, opportunities // 4)
    users = [
        twin.add_row(
            "User",
            {
                "FirstName": _FIRST[i % 10],
                "LastName": _LAST[(i * 3) % 10],
                "Name": f"{_FIRST[i % 10]} {_LAST[(i * 3) % 10]}",
                "Email": f"seller{i}@partner.example",
                "Phone": f"+1 555 010 {i:04d}",
                "Title": "Account Executive",
                "IsActive": True,
            },
            stamp=base,
        )
        for i in range(max(2, min(50, opportunities // 20 + 2)))
    ]
    accounts = []
    for i in range(n_accounts):
        country, _code = _COUNTRIES[i % len(_COUNTRIES)]
        accounts.append(
            twin.add_row(
                "Account",
                {
                    "Name": f"Customer {i:05d} Ltd",
                    "BillingStreet": f"{i} Main Street",
                    "BillingCity": "Springfield",
                    "BillingPostalCode": f"{10000 + i}",
                    "BillingCountry": country,
                    "DunsNumber": f"{100000000 + i}" if i % 3 else None,
                },
                stamp=base,
            )
        )
    contacts = [
        twin.add_row(
            "Contact",
            {
                "FirstName": _FIRST[(i + 2) % 10],
                "LastName": _LAST[(i + 5) % 10],
                "Email": f"buyer{i}@customer.example",
                "Phone": f"+1 555 020 {i % 10000:04d}",
                "AccountId": accounts[i % n_accounts],
            },
            stamp=base,
        )
        for i in range(n_accounts)
    ]
    products = [
        twin.add_row(
            "Product2",
            {"Name": f"Solution {i}", "ProductCode": f"SOL-{i:05d}-TWN", "IsActive": True},
            stamp=base,
        )
        for i in range(10)
    ]
    product_codes = {pid: twin.tables["Product2"][pid]["ProductCode"] for pid in products}
    stage_names = [s[0] for s in STANDARD_STAGES]
    opps = []
    for i in range(opportunities):
        stamp = stamp_values[i % len(stamp_values)]
        account = accounts[i % n_accounts]
        opp = twin.add_row(
            "Opportunity",
            {
                "Name": f"Deal {i:05d}",
                "StageName": stage_names[rng.randrange(len(stage_names))],
                "Amount": float(rng.randrange(1, 500) * 1000),
                "CurrencyIsoCode": "USD" if "CurrencyIsoCode" in twin.schema["Opportunity"] else None,
                "CloseDate": (base + timedelta(days=30 + i % 200)).date(),
                "AccountId": account,
                "OwnerId": users[i % len(users)],
                "Description": f"Seeded deal {i}",
                "Sync_with_Partner_Center__c": rng.random() < opted_in_share,
            },
            stamp=stamp,
        )
        opps.append(opp)
        twin.add_row(
            "OpportunityContactRole",
            {
                "OpportunityId": opp,
                "ContactId": contacts[i % n_accounts],
                "Role": "Decision Maker",
                "IsPrimary": True,
            },
            stamp=stamp,
        )
        for k in range(1 + i % 2):
            twin.add_row(
                "OpportunityTeamMember",
                {
                    "OpportunityId": opp,
                    "UserId": users[(i + k + 1) % len(users)],
                    "TeamMemberRole": "Sales Rep",
                    "OpportunityAccessLevel": "Edit",
                },
                stamp=stamp,
            )
        for k in range(1 + i % 2):
            product = products[(i + k) % len(products)]
            twin.add_row(
                "OpportunityLineItem",
                {
                    "OpportunityId": opp,
                    "Product2Id": product,
                    "ProductCode": product_codes[product],
                    "Name": f"Solution {(i + k) % len(products)}",
                    "Quantity": 1.0,
                    "UnitPrice": 1000.0,
                    "TotalPrice": 1000.0,
                },
                stamp=stamp,
            )
    return SeedSummary(opps, accounts, users, contacts, products, {})
