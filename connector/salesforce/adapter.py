"""The Salesforce CRM adapter: reads and writes opportunities through simple-salesforce in direct mode.

One adapter lives as long as its connection (the daemon keeps it across runs), so what does not change
from run to run is paid once: the sign-in (a 401 ``INVALID_SESSION_ID`` signs in again once and resends),
the HTTP connections, and the org's **metadata** — describe of Opportunity and Account, OpportunityStage,
record types and their stage values. Metadata is re-read after ``crm.metadata_ttl`` (default 1 h), on
:meth:`SalesforceAdapter.refresh_metadata`, and at the next run after a write was refused for an unknown
field or picklist value (``INVALID_FIELD``, ``INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST``...). An idle run
on a warm adapter costs **one call**: the opportunity ``queryAll``.

Reading (:meth:`SalesforceAdapter.changes`), per run:

1. Metadata from the cache (or read as above); the configured fields are checked against describe.
2. Opportunities: one ``queryAll`` ``ORDER BY SystemModstamp, Id`` from ``watermark - lookback``
   (``>=``), paged by ``nextRecordsUrl`` (2,000 records, children included: step 5). ``queryAll``
   also returns soft-deleted rows (recycle bin, merges) with ``IsDeleted = true``: they are reported
   as ``deleted_ids``, never as deals (https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_queryall.htm).
   Each page's cursor is its last ``(SystemModstamp, Id)``; should the query locator expire, the scan
   resumes by keyset from that pair. Rows sharing a timestamp and late commits within the lookback
   are re-read, never skipped; duplicates are harmless because the engine applies idempotently.
3. The **signpost** — Salesforce's own clock, never ours (crm-apis.md §A.3) — is the ``Date`` header
   of the run's first query response (floored to the second, SystemModstamp's granularity); there is
   no separate ``GET /limits`` for it any more. Why the cursor stays correct:

   - The first query cannot be capped (the signpost is not known yet). Its snapshot is taken at a
     server time ``T`` shortly before the response is stamped, so ``T`` and the signpost differ by
     the query's own duration (bounded by the request timeout) and the header's second granularity.
   - Every later query of the run (keyset resume, full-load scans and counts, Bulk jobs, the
     getDeleted sweep) is capped ``SystemModstamp <= signpost`` / ``end = signpost``, so a run ends.
   - Intermediate cursors are ``min((row stamp, Id), (signpost, ""))``; the final cursor is the
     signpost, so an idle book does not re-read its lookback window forever. The next run starts at
     ``signpost - lookback``.
   - A record modified during the run is committed after ``T``, so its stamp is at least
     ``T - (its transaction's length)``, i.e. ``>= signpost - lookback`` as long as the lookback
     (default 5 min) covers the longest late commit plus the first query's duration: the next run
     reads it. (A signpost read before the query, as ``GET /limits`` used to give, needed the
     lookback to cover late commits only; the query's duration is seconds against minutes.) Rows the uncapped first page returned past the signpost are simply read again next
     run (the engine applies idempotently). Tested by a record changed between two pages of one run.
4. Deletes: soft deletes arrive through ``queryAll`` (step 2). Hard deletes and recycle-bin purges
   are invisible to ``queryAll``, so ``getDeleted`` sweeps for them when the cursor's delete coverage
   (``Cursor.deletes``) is older than ``crm.delete_sweep`` (default 1 day), from that coverage minus the
   lookback to the signpost. If the coverage is older than getDeleted's 15-day window, or Salesforce
   says its delete log starts later (``earliestDateAvailable``), the run becomes a **full resync** —
   flagged on every page and logged (the incremental first page is dropped unread).
   A full load above ``bulk_threshold`` rows uses a Bulk API 2.0 query job instead of REST.
5. Related data comes in the same query, as relationship fields and subqueries
   (https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_relationships_understanding.htm):
   ``Account.*`` and ``Owner.*`` (null when the lookup is empty or not readable), and per opportunity
   ``(SELECT ... Contact.* FROM OpportunityContactRoles)``, ``(SELECT ... User.* FROM
   OpportunityTeamMembers)`` and, without a configured solutions multi-select,
   ``(SELECT Id, ProductCode FROM OpportunityLineItems)`` — no related query per page. A subquery's
   nested result may stop at ``done: false``: its ``nextRecordsUrl`` is followed (should that child
   locator expire, the opportunity's children are read by a query of their own). Child records count
   toward the 2,000-row batch, so Salesforce pages hold fewer opportunities; the adapter joins them
   back into pages of ``page_size`` rows. ``get`` and ``find_by_referral`` use the same query shape.
   Bulk API 2.0 cannot run subqueries (crm-apis.md §A.3): a Bulk load reads related data per page with
   IN queries (chunked under the 16,384-byte URI limit) instead.

Writing (:meth:`SalesforceAdapter.write`): sObject Collections of up to 200 records with
``allOrNone=false``; each record's error is reported on its own :class:`~connector.seams.WriteResult`
(row locks are retried a few times first); writes that carry ``based_on`` go one by one with
``If-Unmodified-Since`` so a 412 becomes a conflict.

Limits: every response's ``Sforce-Limit-Info`` feeds an :class:`ApiBudget`; a run stops with
:class:`~connector.errors.RateLimited` at its share of the daily allocation, and 403
``REQUEST_LIMIT_EXCEEDED`` is "stop and resume later", never a short retry.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import itertools
import json
import re
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from email.utils import format_datetime, parsedate_to_datetime
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, cast

import requests
import structlog
from simple_salesforce.api import Salesforce, SFType
from simple_salesforce.exceptions import SalesforceError, SalesforceExpiredSession
from simple_salesforce.util import exception_handler

from connector.domain.model import (
    Address,
    Contact,
    CrmStageInfo,
    Customer,
    Deal,
    DealType,
    Direction,
    HelpType,
    Money,
    Solution,
    SolutionKind,
    StandardStage,
    Status,
    Substatus,
    VersionTag,
)
from connector.domain.stages import CrmStage, Outcome, StageMapping
from connector.errors import (
    ConfigError,
    ConfigProblem,
    ConflictError,
    CosellError,
    FatalError,
    RateLimited,
    RecordError,
    RetryLater,
    SignInRequired,
)
from connector.remote.calls import CallCounter
from connector.remote.http import requests_session
from connector.remote.retry import RetryPolicy
from connector.salesforce import soql
from connector.salesforce.auth import SalesforceSignIn
from connector.salesforce.countries import country_code
from connector.seams import (
    ChangePage,
    CrmAdapter,
    CrmChange,
    CrmField,
    CrmWrite,
    Listed,
    RecordFailure,
    WriteResult,
)
from connector.settings import SalesforceCrm

__all__ = [
    "DEFAULT_FIELDS",
    "ApiBudget",
    "Cursor",
    "OpportunityRow",
    "PullPage",
    "SalesforceAdapter",
    "SalesforceApiError",
    "parse_sf_datetime",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

SYSTEM = "salesforce"
#: Field roles the connector reads/writes -> default API names (override with ``crm.fields``).
DEFAULT_FIELDS: Mapping[str, str] = {
    "referral_id": "Partner_Center_Referral_Id__c",
    "referral_link": "Partner_Center_Referral_Link__c",
    "sync_status": "Partner_Center_Sync_Status__c",
    "last_sync": "Partner_Center_Last_Sync__c",
    "audit": "Partner_Center_Audit__c",
    "help_type": "Partner_Center_Help_Type__c",
    # checkboxes: "Microsoft sellers may view this deal" (partner-led) and the customer's consent to
    # share its contact with Microsoft (needed for co-sell; cosell-domain.md "Deal fields")
    "visibility": "Partner_Center_Visibility__c",
    "contact_consent": "Partner_Center_Contact_Consent__c",
    "solutions": "",  # a multi-select picklist of solution codes; empty = OpportunityLineItem.ProductCode
    "account_duns": "DunsNumber",
    "notes": "Description",
    # Partner Center's campaignId is Microsoft's marketing campaign id, not a Salesforce Campaign
    # record id: synced only when a text field for it is configured (e.g. Microsoft_Campaign_Id__c)
    "campaign": "",
    "lost_reason": "",  # e.g. Loss_Reason__c: the CRM's words for why a deal was lost
}
#: Roles whose field must exist in the org (the rest are read when present).
REQUIRED_ROLES = frozenset({"referral_id", "referral_link", "sync_status", "last_sync", "audit"})
AUDIT_MAX = 255
#: getDeleted covers 15 days (https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_getdeleted.htm);
#: we keep an hour of margin so Salesforce's clock and ours never disagree at the edge.
DELETE_WINDOW = timedelta(days=15) - timedelta(hours=1)
#: Refusals that mean the cached describe / picklist values no longer match the org (a field deleted
#: or made read-only, a picklist value removed): the next run reads the metadata again.
STALE_METADATA_CODES = frozenset(
    {
        "INVALID_FIELD",
        "INVALID_FIELD_FOR_INSERT_UPDATE",
        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
        "INVALID_TYPE",
    }
)
COLLECTION_MAX = 200  # https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections.htm
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_OPP_BASE = (
    "Id",
    "Name",
    "StageName",
    "Probability",
    "Amount",
    "CloseDate",
    "IsClosed",
    "IsWon",
    "AccountId",
    "OwnerId",
    "RecordTypeId",
    "CreatedDate",
    "LastModifiedDate",
    "SystemModstamp",
    "IsDeleted",
)
_PERSON_FIELDS = ("FirstName", "LastName", "Email", "Phone", "Title")
_PERSON = ("Id", *_PERSON_FIELDS)
#: Opportunity's child relationships the read selects -> the child object (for a re-read by query)
_CHILD_OBJECTS: Mapping[str, str] = {
    "OpportunityContactRoles": "OpportunityContactRole",
    "OpportunityTeamMembers": "OpportunityTeamMember",
    "OpportunityLineItems": "OpportunityLineItem",
}
_HELP_VALUES = frozenset(h.value for h in HelpType)
_STAGE_CACHE_MAX = 4096
_ACCOUNT = (
    "Id",
    "Name",
    "BillingStreet",
    "BillingCity",
    "BillingState",
    "BillingPostalCode",
    "BillingCountry",
)
_USAGE = re.compile(r"api-usage=(\d+)/(\d+)")


# --- small records ---------------------------------------------------------------------------------


def parse_sf_datetime(value: object) -> datetime:
    """A Salesforce datetime as aware UTC: REST ISO (``…+0000``, ``Z``, ``+00:00``) or Bulk epoch ms."""
    if type(value) is str and len(value) > 19 and value[10] == "T":
        # Fast path (three per record): Python 3.11's fromisoformat reads REST's ``.000+0000`` as is.
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is UTC:
                return parsed
            if parsed.tzinfo is not None:
                return parsed.astimezone(UTC)
    return _parse_sf_datetime(value)


def _parse_sf_datetime(value: object) -> datetime:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return EPOCH + timedelta(milliseconds=float(value))
    if not isinstance(value, str) or not value:
        raise ValueError("not a Salesforce datetime")
    text = value.strip()
    if text.lstrip("-").isdigit():
        return EPOCH + timedelta(milliseconds=int(text))
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    text = re.sub(r"([+-]\d{2})(\d{2})$", r"\1:\2", text)
    parsed = datetime.fromisoformat(text)
    if parsed.utcoffset() is None:
        raise ValueError("a Salesforce datetime without an offset")
    return parsed.astimezone(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Cursor:
    """Where a pull resumes: the last ``(SystemModstamp, Id)`` read (the signpost once a run
    completes) and how far the getDeleted sweep has covered hard deletes (``deletes``; soft deletes
    come with every run's ``queryAll``, so this only moves when the sweep runs).

    Both timestamps are Salesforce's own (row stamps, the signpost, getDeleted's latestDateCovered).
    """

    ts: datetime
    id: str
    deletes: datetime

    def encode(self) -> str:
        return "sf1:" + json.dumps({"ts": _iso(self.ts), "id": self.id, "del": _iso(self.deletes)})

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            if not text.startswith("sf1:"):
                raise ValueError("unknown cursor version")
            data = json.loads(text[4:])
            ident = str(data["id"])
            if ident:
                soql.sf_id(ident)
            return cls(parse_sf_datetime(data["ts"]), ident, parse_sf_datetime(data["del"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise FatalError(
                f"stored Salesforce cursor is corrupt ({exc}); reset it to run a full resync"
            ) from None


@dataclass(frozen=True)
class OpportunityRow:
    """One opportunity as read: the canonical deal plus the CRM facts the stage mapping needs."""

    deal: Deal
    stage_name: str
    probability: int | None
    record_type: str | None
    system_modstamp: datetime
    last_modified: datetime


@dataclass(frozen=True)
class PullPage:
    rows: tuple[OpportunityRow, ...]
    deleted_ids: tuple[str, ...] = ()
    failures: tuple[RecordFailure, ...] = ()
    cursor: str | None = None
    full_resync: bool = False
    listed: tuple[Listed, ...] = ()

    def to_change_page(self) -> ChangePage:
        return ChangePage(
            deals=tuple(r.deal for r in self.rows),
            deleted_ids=self.deleted_ids,
            failures=self.failures,
            cursor=self.cursor,
            full_resync=self.full_resync,
            listed=self.listed,
        )


#: one record of a scan page as converted: its row (or, lazily, its listing), its failure, or
#: (deleted) its id
_Converted = OpportunityRow | Listed | RecordFailure | str


class SalesforceApiError(CosellError):
    """A Salesforce error the caller must classify (400/404/412...): status, errorCode, message."""

    def __init__(self, status: int, code: str, message: str, fields: Sequence[str] = ()) -> None:
        super().__init__(f"Salesforce HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.fields = tuple(fields)


@dataclass
class ApiBudget:
    """Stops a run at ``run_share`` of the daily allocation used by this run, or once the day's usage
    reaches ``day_share`` (tap-salesforce's 25 % / 80 %, prior-art.md §6 #7). Fed by ``Sforce-Limit-Info``
    (https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/headers_api_usage.htm)."""

    run_share: float = 0.25
    day_share: float = 0.80
    used: int | None = None
    total: int | None = None
    run_start: int | None = None

    def begin_run(self) -> None:
        self.run_start = self.used

    def observe(self, used: int, total: int) -> None:
        if self.run_start is None:
            self.run_start = max(0, used - 1)
        self.used, self.total = used, total

    def check(self) -> None:
        if self.used is None or not self.total:
            return
        run_used = self.used - (self.run_start or 0)
        if run_used >= self.run_share * self.total:
            raise RateLimited(
                f"Salesforce API budget for this run is spent ({run_used} calls, "
                f"{self.run_share:.0%} of the daily {self.total}); the run stops and resumes next time",
                system=SYSTEM,
            )
        if self.used >= self.day_share * self.total:
            raise RateLimited(
                f"Salesforce daily API usage is at {self.used}/{self.total} "
                f"(stop at {self.day_share:.0%}); resume later",
                system=SYSTEM,
                retry_after=3600.0,
            )


class _NoRetry(Exception):
    """Carries an error through tenacity without a retry (RateLimited from Salesforce is not short)."""

    def __init__(self, error: CosellError) -> None:
        super().__init__(str(error))
        self.error = error


class _LocatorExpired(Exception):
    pass


@dataclass(frozen=True)
class _Metadata:
    """The org's metadata as one consistent snapshot, kept across runs until ``metadata_ttl``."""

    read_at: datetime  # the adapter's clock: only ever compared with metadata_ttl, never a cursor
    opp_fields: Mapping[str, str]  # name -> type
    account_fields: Mapping[str, str]
    opp_describe: Mapping[str, CrmField]
    stages: tuple[CrmStage, ...]
    record_types: Mapping[str, str]  # record type id -> DeveloperName


@dataclass
class _Run:
    """One pull: the metadata snapshot it started with and, once the first query answered, the signpost."""

    meta: _Metadata
    signpost: datetime | None = None
    #: live records handed over unconverted (``seams.Listed``), for the engine to convert on demand
    lazy: bool = False

    @property
    def opp_fields(self) -> Mapping[str, str]:
        return self.meta.opp_fields

    @property
    def account_fields(self) -> Mapping[str, str]:
        return self.meta.account_fields

    def capped(self) -> datetime:
        assert self.signpost is not None, "the run's first query sets the signpost"
        return self.signpost


@dataclass
class _Related:
    """A page's related data, by opportunity (from its subqueries) or by id (Bulk's IN queries)."""

    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    contact_of: dict[str, dict[str, Any]] = field(default_factory=dict)  # opp id -> contact
    team_of: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # opp id -> users
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    codes_of: dict[str, list[str]] = field(default_factory=dict)  # opp id -> product codes


# --- the adapter -----------------------------------------------------------------------------------


class SalesforceAdapter:
    """:class:`~connector.seams.CrmAdapter` for Salesforce. One instance per connection, kept across
    runs: the sign-in and the org's metadata (until ``metadata_ttl``) are reused; per-run state is
    only the signpost."""

    system = SYSTEM
    #: conditional writes (If-Unmodified-Since) are single-record requests in Salesforce
    conditional_writes_batched = False

    def __init__(
        self,
        crm: SalesforceCrm,
        *,
        ca_bundle: Path | None = None,
        sign_in: SalesforceSignIn | None = None,
        calls: CallCounter | None = None,
        policy: RetryPolicy | None = None,
        stage_mapping: StageMapping | None = None,
        solution_map: Mapping[str, Solution] | None = None,
        day_share: float = 0.80,
        default_currency: str = "USD",
        default_deal_type: DealType = DealType.PARTNER_LED,
        page_size: int = 2000,
        bulk_page_size: int = 10_000,
        bulk_max_wait: float = 600.0,
        timeout: float = 120.0,
        proxies: dict[str, str] | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._crm = crm
        self.calls = calls or CallCounter()
        self._policy = policy or RetryPolicy()
        self._sign_in = sign_in or SalesforceSignIn(
            crm, ca_bundle=ca_bundle, policy=self._policy, calls=self.calls
        )
        self._mapping = stage_mapping
        self._solutions = dict(solution_map or {})
        # writing goes back through the same map: the multi-select holds the CRM's codes, not ours
        self._solution_codes = {solution.id: code for code, solution in self._solutions.items()}
        self._default_currency = default_currency
        self._default_deal_type = default_deal_type
        self._page_size = page_size
        self._bulk_page_size = bulk_page_size
        self._bulk_max_wait = bulk_max_wait
        self._timeout = timeout
        self.budget = ApiBudget(run_share=crm.api_budget_share, day_share=day_share)
        self.fields = self._resolve_fields(crm.fields)
        self._opt_in = self._opt_in_conds(crm)
        # one requests session for the whole adapter: trust_env=False so the connector's CA bundle
        # wins over REQUESTS_CA_BUNDLE (crm-apis.md §D); the hook sees every response.
        self._session = requests_session(ca_bundle, proxies=proxies)
        self._session.hooks["response"].append(self._on_response)
        self._sf: Salesforce | None = None
        # the latest response's Date, per thread: the signpost is the Date of the listing's own first
        # query, never of a read the engine made meanwhile on another thread
        self._dates = threading.local()
        self._meta_lock = threading.RLock()
        self._run: _Run | None = None
        # Metadata age is judged on this clock (tests pass the twin's); it never feeds a cursor.
        self._now = now or (lambda: datetime.now(UTC))
        self._meta: _Metadata | None = None
        # (stage, probability, record type) -> the mapped Partner Center stage, or why none maps;
        # emptied with every metadata read (stages and record types come with it)
        self._stage_cache: dict[tuple[str, int | None, str | None], StandardStage | RecordError | None] = {}
        self._meta_stale = ""  # why the cached metadata must be read again at the next run ("" = fine)
        self.last_full_resync_reason = ""

    @property
    def write_unsupported(self) -> frozenset[str]:
        """Canonical fields apply() cannot write: the engine lets them flow to Partner Center only."""
        unsupported = {"team"}  # OpportunityTeamMember writes (users by email) are not built yet
        if not self.fields["solutions"]:
            unsupported.add("solutions")  # line items need a price book; only a multi-select is written
        reason_field = self.fields["lost_reason"]
        if not reason_field or (self._meta is not None and reason_field not in self._meta.opp_fields):
            # no field for it (or the org lacks the one configured): a close from Partner Center comes
            # without its reason rather than failing on INVALID_FIELD, the stage change with it
            unsupported.add("lost_reason")
        if self._meta is not None and "CurrencyIsoCode" not in self._meta.opp_fields:
            # single-currency org: reads report the org's currency; writing Partner Center's would fail
            unsupported.add("currency")
        return frozenset(unsupported)

    def close(self) -> None:
        """Close the HTTP connections (the requests session and the sign-in client)."""
        self._session.close()
        self._sign_in.close()

    def __enter__(self) -> SalesforceAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- configuration ----------------------------------------------------------------------------
    @staticmethod
    def _resolve_fields(overrides: Mapping[str, str]) -> dict[str, str]:
        problems = []
        for role, name in overrides.items():
            if role not in DEFAULT_FIELDS:
                problems.append(
                    ConfigProblem(
                        "configuration", f"crm.fields.{role}", "unknown field role", ", ".join(DEFAULT_FIELDS)
                    )
                )
            elif name:
                try:
                    soql.field_name(name)
                except ValueError as exc:
                    problems.append(ConfigProblem("configuration", f"crm.fields.{role}", str(exc)))
        if problems:
            raise ConfigError(problems)
        return {**DEFAULT_FIELDS, **overrides}

    @staticmethod
    def _opt_in_conds(crm: SalesforceCrm) -> list[soql.Cond]:
        conds: list[soql.Cond] = []
        try:
            if crm.opt_in.field:
                conds.append(soql.eq(crm.opt_in.field, True))
            if crm.opt_in.record_types:
                conds.append(soql.in_("RecordTypeId", crm.opt_in.record_types, ids=True))
            if crm.opt_in.soql_filter:
                conds.append(soql.trusted_filter(crm.opt_in.soql_filter))
        except ValueError as exc:
            raise ConfigError(
                [
                    ConfigProblem(
                        "configuration",
                        "crm.opt_in",
                        str(exc),
                        "a checkbox field API name, record type ids, a SOQL condition",
                    )
                ]
            ) from None
        return conds

    # --- plumbing ---------------------------------------------------------------------------------
    @property
    def _server_date(self) -> datetime | None:
        date: datetime | None = getattr(self._dates, "latest", None)
        return date

    @_server_date.setter
    def _server_date(self, value: datetime | None) -> None:
        self._dates.latest = value

    def _on_response(self, response: requests.Response, *args: object, **kwargs: object) -> None:
        path = response.request.path_url if response.request is not None else ""
        self.calls.record(SYSTEM, _operation(path), response.status_code)
        match = _USAGE.search(response.headers.get("Sforce-Limit-Info", ""))
        if match:
            self.budget.observe(int(match.group(1)), int(match.group(2)))
        date_header = response.headers.get("Date")
        if date_header:
            with contextlib.suppress(TypeError, ValueError):
                self._server_date = parsedate_to_datetime(date_header).astimezone(UTC)

    def _client(self, *, refresh: bool = False) -> Salesforce:
        if self._sf is None or refresh:
            token = self._sign_in.current(force_refresh=refresh)
            # Direct mode is the only way to aim simple-salesforce at a My Domain or emulator of our
            # choosing, and it never refreshes on its own (crm-apis.md §A.7).
            self._sf = Salesforce(
                instance_url=token.instance_url,
                session_id=token.access_token,
                session=self._session,
                version=self._crm.api_version,
                # None: json's own dicts, built in C. simple-salesforce's default (OrderedDict), and
                # even ``dict`` as a hook, make the decoder call back into Python once per object:
                # 28% slower on a page of nested opportunities, most of a full read's CPU.
                object_pairs_hook=None,
            )
        return self._sf

    def _call(self, operation: str, fn: Callable[[Salesforce], T]) -> T:
        """One logical call: budget check, one re-sign-in on an expired session, retries on transient
        failures, errors classified by what the caller must do."""
        self.budget.check()
        try:
            for attempt in self._policy.retrying():
                with attempt:
                    try:
                        return self._call_signed_in(operation, fn)
                    except RateLimited as exc:
                        raise _NoRetry(exc) from None
        except _NoRetry as wrapped:
            raise wrapped.error from None
        except SalesforceApiError as exc:
            if exc.code in STALE_METADATA_CODES:
                self._metadata_is_stale(f"{operation}: {exc.code}")
            raise
        raise AssertionError("unreachable: tenacity re-raises")  # pragma: no cover

    def _call_signed_in(self, operation: str, fn: Callable[[Salesforce], T]) -> T:
        try:
            return self._classified(operation, fn, self._client())
        except SalesforceExpiredSession:
            # Sessions end on their own schedule (timeout policy, admin revocation); prior-art.md §5
            # class 5. Sign in again once, rebuild the client, resend.
            log.info("salesforce session expired; signing in again", operation=operation)
            try:
                return self._classified(operation, fn, self._client(refresh=True))
            except SalesforceExpiredSession:
                raise SignInRequired(
                    [
                        ConfigProblem(
                            "salesforce",
                            "crm.auth",
                            "a fresh session was refused at once (revoked app or user?)",
                        )
                    ]
                ) from None

    def _classified(self, operation: str, fn: Callable[[Salesforce], T], sf: Salesforce) -> T:
        try:
            return fn(sf)
        except SalesforceExpiredSession:
            raise
        except SalesforceError as exc:
            raise _classify(exc, operation) from None
        except requests.RequestException as exc:
            raise RetryLater(
                f"salesforce {operation}: connection failed ({type(exc).__name__})", system=SYSTEM
            ) from None

    def _query_pages(
        self, query: str, *, include_deleted: bool = False, operation: str = "query"
    ) -> Iterator[dict[str, Any]]:
        result = self._call(
            operation, lambda sf: sf.query(query, include_deleted=include_deleted, timeout=self._timeout)
        )
        yield result
        while not result.get("done", True):
            url = str(result["nextRecordsUrl"])
            try:
                result = self._call(operation, partial(_query_more, url=url, timeout=self._timeout))
            except SalesforceApiError as exc:
                if exc.code == "INVALID_QUERY_LOCATOR":
                    raise _LocatorExpired() from None
                raise
            yield result

    def _query_all(self, query: str, operation: str = "query") -> list[dict[str, Any]]:
        try:
            return [rec for page in self._query_pages(query, operation=operation) for rec in page["records"]]
        except _LocatorExpired:
            raise RetryLater("Salesforce query locator expired mid-read", system=SYSTEM) from None
        except SalesforceApiError as exc:
            raise _read_error(exc) from None

    # --- metadata (kept across runs) ----------------------------------------------------------------
    def reset_run(self) -> None:
        """Forget per-run state (the signpost). The org's metadata is kept: it expires on its own
        after ``metadata_ttl`` (see :meth:`refresh_metadata`)."""
        self._run = None

    def refresh_metadata(self) -> None:
        """Read the org's metadata (describe, stages, record types) again now."""
        self._meta = self._load_metadata()

    def _metadata_is_stale(self, why: str) -> None:
        if self._meta is not None and not self._meta_stale:
            log.info("salesforce metadata will be read again next run", reason=why)
        self._meta_stale = why

    def _metadata(self, *, run_start: bool = False) -> _Metadata:
        """The cached metadata, read again when missing or older than ``metadata_ttl`` — and, at a
        run's start, when a refused write said the org changed (so that happens once per run)."""
        with self._meta_lock:  # the listing (its own thread) and the engine's reads may ask at once
            meta = self._meta
            if (
                meta is None
                or (run_start and self._meta_stale)
                or self._now() - meta.read_at >= self._crm.metadata_ttl
            ):
                meta = self._meta = self._load_metadata()
            return meta

    def _load_metadata(self) -> _Metadata:
        read_at = self._now()
        opp = self._describe("Opportunity")
        account = self._describe("Account")
        opp_types = {name: f.type for name, f in opp.items()}
        missing = [
            ConfigProblem(
                "salesforce org",
                f"crm.fields.{role}",
                f"field Opportunity.{self.fields[role]} does not exist",
            )
            for role in sorted(REQUIRED_ROLES)
            if self.fields[role] and self.fields[role] not in opp_types
        ]
        if self._crm.opt_in.field and self._crm.opt_in.field not in opp_types:
            missing.append(
                ConfigProblem(
                    "salesforce org",
                    "crm.opt_in.field",
                    f"field Opportunity.{self._crm.opt_in.field} does not exist",
                )
            )
        if missing:
            raise ConfigError(missing)
        stages, record_types = self._read_stages()
        self._meta_stale = ""
        self._stage_cache = {}
        return _Metadata(
            read_at=read_at,
            opp_fields=opp_types,
            account_fields={name: f.type for name, f in account.items()},
            opp_describe=opp,
            stages=stages,
            record_types=record_types,
        )

    def _describe(self, sobject: str) -> dict[str, CrmField]:
        try:
            body = self._call(
                "describe", lambda sf: sf.restful(f"sobjects/{sobject}/describe", timeout=self._timeout)
            )
        except SalesforceApiError as exc:
            raise _read_error(exc) from None
        # Field shape: https://developer.salesforce.com/docs/atlas.en-us.api.meta/api/sforce_api_calls_describesobjects_describesobjectresult.htm
        out: dict[str, CrmField] = {}
        for f in (body or {}).get("fields", []):
            out[str(f["name"])] = CrmField(
                name=str(f["name"]),
                type=str(f["type"]),
                picklist_values=tuple(
                    str(v["value"]) for v in f.get("picklistValues") or () if v.get("active", True)
                ),
                restricted=bool(f.get("restrictedPicklist")),
            )
        return out

    def opportunity_fields(self) -> Mapping[str, CrmField]:
        """Opportunity's fields from the (cached) describe: type, active picklist values, restricted."""
        return MappingProxyType(dict(self._metadata().opp_describe))

    # --- stages -----------------------------------------------------------------------------------
    def stages(self) -> Sequence[CrmStage]:
        """OpportunityStage rows with the record types (by DeveloperName) whose sales process allows
        each; from the cached metadata."""
        return self._metadata().stages

    def _read_stages(self) -> tuple[tuple[CrmStage, ...], dict[str, str]]:
        rows = self._query_all(
            soql.Query(
                "OpportunityStage",
                (
                    "ApiName",
                    "MasterLabel",
                    "DefaultProbability",
                    "ForecastCategoryName",
                    "IsActive",
                    "IsClosed",
                    "IsWon",
                    "SortOrder",
                ),
                order_by=("SortOrder",),
            ).render(),
            operation="stages",
        )
        types = self._query_all(
            soql.Query(
                "RecordType",
                ("Id", "DeveloperName"),
                where=soql.all_of(soql.eq("SobjectType", "Opportunity"), soql.eq("IsActive", True)),
            ).render(),
            operation="stages",
        )
        allowed: dict[str, set[str]] = {}
        record_types: dict[str, str] = {}
        for rt in types:
            rt_id, dev = soql.sf_id(rt["Id"]), str(rt["DeveloperName"])
            record_types[rt_id] = dev
            # Values per record type (API 41.0+):
            # https://developer.salesforce.com/docs/atlas.en-us.uiapi.meta/uiapi/ui_api_resources_picklist_values.htm
            try:
                path = f"ui-api/object-info/Opportunity/picklist-values/{rt_id}/StageName"
                body = self._call("stages", partial(_get_json, path=path, timeout=self._timeout))
            except SalesforceApiError as exc:
                raise _read_error(exc) from None
            for value in (body or {}).get("values", []):
                allowed.setdefault(str(value["value"]), set()).add(dev)
        stages = tuple(
            CrmStage(
                label=str(r["ApiName"]),
                probability=int(r["DefaultProbability"]) if r.get("DefaultProbability") is not None else None,
                is_closed=bool(r["IsClosed"]),
                is_won=bool(r["IsWon"]),
                sort_order=int(r.get("SortOrder") or 0),
                active=bool(r["IsActive"]),
                record_types=frozenset(allowed.get(str(r["ApiName"]), ())),
            )
            for r in rows
        )
        return stages, record_types

    # --- reading ----------------------------------------------------------------------------------
    def changes(self, cursor: str | None) -> Iterator[ChangePage]:
        """:meth:`pull` for the engine: REST pages' live records listed unconverted (their
        fingerprint covers the nested related data), so a settled one costs no conversion."""
        for page in self.pull(cursor, lazy=True):
            yield page.to_change_page()

    def pull(self, cursor: str | None, *, lazy: bool = False) -> Iterator[PullPage]:
        """Pages of opted-in opportunities changed since ``cursor`` (None = full load), with deletes.

        The order of calls and why the cursor stays correct: see the module docstring."""
        prev = Cursor.decode(cursor) if cursor else None
        self.budget.begin_run()
        run = self._run = _Run(self._metadata(run_start=True), lazy=lazy)
        if prev is None:
            yield from self._pull_full(run, "no cursor (first run)", first_run=True)
            return
        lookback = self._crm.lookback
        base = [*self._opt_in, soql.ge("SystemModstamp", prev.ts - lookback)]
        scan = self._scan(run, base)
        first = next(scan)  # the run's first query: its response carries the signpost
        signpost = run.capped()
        deleted, covered, reason = self._sweep(prev, signpost)
        if reason:
            scan.close()  # the incremental first page is dropped unread: a full read replaces it
            yield from self._pull_full(run, reason, first_run=False)
            return
        self.last_full_resync_reason = ""
        yield from self._pages(
            run,
            itertools.chain([first], scan),
            full=False,
            deletes_so_far=prev.deletes,
            final=Cursor(signpost, "", covered),
            deleted=deleted,
        )

    def _take_signpost(self) -> datetime:
        """Salesforce's clock from the last response's ``Date``, floored to the second."""
        if self._server_date is None:
            raise FatalError("Salesforce sent no Date header; cannot take the run's signpost from its clock")
        return self._server_date.replace(microsecond=0)

    def _sweep(self, prev: Cursor, signpost: datetime) -> tuple[list[str], datetime, str]:
        """Hard deletes and recycle-bin purges, which ``queryAll`` no longer returns: getDeleted from
        the cursor's delete coverage, when that is older than ``delete_sweep``
        (https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_getdeleted.htm).

        Returns the deleted ids, the new coverage, and why a full resync is needed ("" = not)."""
        if signpost - prev.deletes < self._crm.delete_sweep:
            return [], prev.deletes, ""
        # getDeleted wants start more than a minute before end
        start = min(prev.deletes - self._crm.lookback, signpost - timedelta(minutes=2))
        if start < signpost - DELETE_WINDOW:
            return [], signpost, "the cursor is older than getDeleted's 15-day window"
        try:
            body = self._call("deleted", lambda sf: _opportunity(sf).deleted(start, signpost))
        except SalesforceApiError as exc:
            if exc.code != "INVALID_REPLICATION_DATE":
                raise _read_error(exc) from None
            body = {"earliestDateAvailable": _iso(signpost)}  # Salesforce says: too old
        earliest = parse_sf_datetime(body["earliestDateAvailable"])
        if earliest > start:
            return [], signpost, "Salesforce purged its delete log past our cursor"
        deleted = [str(d["id"]) for d in body.get("deletedRecords", [])]
        return deleted, parse_sf_datetime(body["latestDateCovered"]), ""

    def _pull_full(self, run: _Run, reason: str, *, first_run: bool) -> Iterator[PullPage]:
        """Every opted-in opportunity up to the signpost (REST, or Bulk API 2.0 above ``bulk_threshold``)."""
        self.last_full_resync_reason = reason
        if first_run:
            log.info("salesforce full load", reason=reason)
        else:
            log.warning("salesforce full resync", reason=reason)
        # On a first run the count is the run's first query and sets the signpost.
        total = self._count(run, self._opt_in)
        signpost = run.capped()
        final = Cursor(signpost, "", signpost)
        if total > self._crm.bulk_threshold:
            base = [*self._opt_in, soql.le("SystemModstamp", signpost)]
            yield from self._pull_bulk(run, base, final)
            return
        yield from self._pages(
            run,
            self._scan(run, list(self._opt_in)),
            full=True,
            deletes_so_far=signpost,
            final=final,
            deleted=[],
        )

    def _flag(self, rec: Mapping[str, Any], role: str) -> bool:
        name = self.fields[role]
        return bool(name and rec.get(name))

    def _opp_fields(self, run: _Run) -> tuple[str, ...]:
        wanted = list(_OPP_BASE)
        for name in (
            "CurrencyIsoCode",
            self.fields["notes"],
            self.fields["campaign"],
            self.fields["referral_id"],
            self.fields["help_type"],
            self.fields["visibility"],
            self.fields["contact_consent"],
            self.fields["solutions"],
            self.fields["lost_reason"],
        ):
            if name and name in run.opp_fields:
                wanted.append(name)
        return tuple(dict.fromkeys(wanted))

    def _account_fields(self, run: _Run) -> tuple[str, ...]:
        fields = list(_ACCOUNT)
        for name in ("BillingCountryCode", self.fields["account_duns"]):
            if name and name in run.account_fields:
                fields.append(name)
        return tuple(fields)

    def _child_queries(self) -> tuple[soql.Query, ...]:
        """The parent-to-child subqueries of the opportunity read. ``IsDeleted`` is selected because
        what a subquery of ``queryAll`` returns of deleted children is not documented: they are skipped."""
        roles = soql.Query(
            "OpportunityContactRoles",
            ("Id", "ContactId", "Role", "IsPrimary", "IsDeleted", *(f"Contact.{f}" for f in _PERSON_FIELDS)),
        )
        members = soql.Query(
            "OpportunityTeamMembers",
            ("Id", "UserId", "TeamMemberRole", "IsDeleted", *(f"User.{f}" for f in _PERSON_FIELDS)),
        )
        if self.fields["solutions"]:
            return (roles, members)
        return (roles, members, soql.Query("OpportunityLineItems", ("Id", "ProductCode", "IsDeleted")))

    def _opp_query(self, run: _Run, where: soql.Cond | None, *, order_by: tuple[str, ...] = ()) -> soql.Query:
        """The opportunity read with its related data: ONE query (module docstring, step 5)."""
        fields = (
            *self._opp_fields(run),
            *(f"Account.{f}" for f in self._account_fields(run) if f != "Id"),
            *(f"Owner.{f}" for f in _PERSON_FIELDS),
        )
        return soql.Query(
            "Opportunity", fields, where=where, order_by=order_by, children=self._child_queries()
        )

    def _count(self, run: _Run, conds: Sequence[soql.Cond]) -> int:
        where = list(conds)
        if run.signpost is not None:
            where.append(soql.le("SystemModstamp", run.signpost))
        query = soql.Query(
            "Opportunity", (), where=soql.all_of(*where) if where else None, count=True
        ).render()
        try:
            if run.signpost is None:
                self._server_date = None
                body = self._call("count", lambda sf: sf.query(query, timeout=self._timeout))
                run.signpost = self._take_signpost()
            else:
                body = self._call("count", lambda sf: sf.query(query, timeout=self._timeout))
        except SalesforceApiError as exc:
            raise _read_error(exc) from None
        return int(body.get("totalSize", 0))

    def _scan(
        self, run: _Run, base: list[soql.Cond]
    ) -> Generator[tuple[list[dict[str, Any]], bool], None, None]:
        """The opportunity ``queryAll`` as (records, done) pages, ordered by (SystemModstamp, Id).

        Uncapped when it is the run's first query (its response sets ``run.signpost``), capped
        ``SystemModstamp <= signpost`` otherwise; an expired query locator resumes by keyset."""
        after: tuple[datetime, str] | None = None
        while True:
            where = list(base)
            if run.signpost is not None:
                where.append(soql.le("SystemModstamp", run.signpost))
            if after is not None:
                # Keyset resume (locator expired). The literal is second-floored, so this reads a
                # superset of the rows after (ts, id): never fewer.
                ts, rid = after
                where.append(
                    soql.any_of(
                        soql.gt("SystemModstamp", ts),
                        soql.all_of(soql.eq("SystemModstamp", ts), soql.gt("Id", rid)),
                    )
                )
            query = self._opp_query(run, soql.all_of(*where), order_by=("SystemModstamp", "Id")).render()
            first_query = run.signpost is None
            if first_query:
                self._server_date = None
            try:
                # queryAll: soft-deleted opted-in rows come back with IsDeleted = true (module docstring)
                for page in self._query_pages(query, include_deleted=True, operation="opportunities"):
                    if first_query:
                        run.signpost = self._take_signpost()
                        first_query = False
                    records = page["records"]
                    if records:
                        last = records[-1]
                        after = (parse_sf_datetime(last["SystemModstamp"]), str(last["Id"]))
                    done = bool(page.get("done", True))
                    yield records, done
                    if done:
                        return
            except _LocatorExpired:
                log.info("salesforce query locator expired; resuming by keyset")
                continue
            except SalesforceApiError as exc:
                raise _read_error(exc) from None

    def _pages(
        self,
        run: _Run,
        scan: Iterator[tuple[list[dict[str, Any]], bool]],
        *,
        full: bool,
        deletes_so_far: datetime,
        final: Cursor,
        deleted: list[str],
    ) -> Iterator[PullPage]:
        """Scan pages -> PullPages of ``page_size`` records (Salesforce's pages are smaller when
        child records fill its batch): live rows converted with their related data, ``IsDeleted``
        rows as deletes; each page's cursor its last (SystemModstamp, Id) — never past the signpost —
        and the last page's the final cursor (with the getDeleted sweep's ids).

        Each Salesforce page is converted as it arrives, so its nested related data is let go before
        the next one is read; only the converted records wait for their PullPage."""
        signpost = run.capped()
        size = max(1, self._page_size)
        pending: list[tuple[tuple[object, str], _Converted]] = []
        for records, done in scan:
            pending.extend(self._converted(run, records))
            while len(pending) > size or (len(pending) == size and not done):
                chunk, pending = pending[:size], pending[size:]
                stamp, rid = chunk[-1][0]
                ts = parse_sf_datetime(stamp)
                at = (
                    Cursor(ts, rid, deletes_so_far)
                    if ts <= signpost
                    else Cursor(signpost, "", deletes_so_far)
                )
                yield _pull_page([c for _key, c in chunk], at.encode(), full)
            if done:
                yield _pull_page([c for _key, c in pending], final.encode(), full, deleted)
                return

    def _converted(
        self, run: _Run, records: Sequence[Mapping[str, Any]]
    ) -> list[tuple[tuple[object, str], _Converted]]:
        """Each record, in order, as its cursor key (SystemModstamp, Id) and what it became: a row,
        a failure, or (``IsDeleted``) its id."""
        live = [r for r in records if not r.get("IsDeleted")]
        # listed lazily, a record's related data is gathered only if it is converted (most of a full
        # reconciliation's are not)
        rel = None if run.lazy else self._nested_related(live)
        return [
            (
                (rec["SystemModstamp"], str(rec["Id"])),
                str(rec["Id"])
                if rec.get("IsDeleted")
                else (self._listed(run, rec) if rel is None else self._convert_one(run, rec, rel)),
            )
            for rec in records
        ]

    def _listed(self, run: _Run, rec: Mapping[str, Any]) -> Listed | RecordFailure:
        try:
            rid = soql.sf_id(rec["Id"])
        except (ValueError, KeyError, TypeError) as exc:
            return RecordFailure(str(rec.get("Id") or ""), "invalid-record", f"{type(exc).__name__}: {exc}")
        referral = rec.get(self.fields["referral_id"]) if self.fields["referral_id"] else None
        stamp = rec.get("SystemModstamp")
        return Listed(
            record_id=rid,
            version=stamp if isinstance(stamp, str) else None,
            reference=str(referral) if referral else None,
            # the whole record as read, its relationship fields and subqueries included: a child
            # list still paged (nextRecordsUrl) carries a fresh locator, so it never matches
            content=rec,
            read=partial(self._read_row, run, rec),
        )

    def _read_row(self, run: _Run, rec: Mapping[str, Any]) -> Deal:
        got = self._convert_one(run, rec, self._nested_related([rec]))
        if isinstance(got, RecordFailure):
            raise RecordError(got.detail, record_id=got.record_id, cause=got.cause)
        return got.deal

    def _pull_bulk(self, run: _Run, base: list[soql.Cond], final: Cursor) -> Iterator[PullPage]:
        """Initial load through a Bulk API 2.0 query job (https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/queries.htm).

        Bulk results are not in keyset order, so intermediate pages carry no cursor: only a finished
        load moves the watermark (to the signpost). Bulk API 2.0 runs no subqueries (crm-apis.md
        §A.3), so its rows carry only the opportunity's own fields and each result page reads its
        related data with IN queries (:meth:`_related`)."""
        fields = self._opp_fields(run)
        query = soql.Query(
            "Opportunity", tuple(f for f in fields if f != "IsDeleted"), where=soql.all_of(*base)
        ).render()
        try:
            job = self._call(
                "bulk2",
                lambda sf: (
                    sf.restful(
                        "jobs/query",
                        method="POST",
                        json={"operation": "query", "query": query},
                        timeout=self._timeout,
                    )
                    or {}
                ),
            )
            job_id = str(job["id"])
            waited, delay = 0.0, 0.5
            while True:
                info = self._call(
                    "bulk2", lambda sf: sf.restful(f"jobs/query/{job_id}", timeout=self._timeout) or {}
                )
                state = str(info.get("state"))
                if state == "JobComplete":
                    break
                if state in ("Failed", "Aborted"):
                    raise RetryLater(
                        f"Salesforce Bulk API 2.0 query job {job_id} ended {state}", system=SYSTEM
                    )
                if waited >= self._bulk_max_wait:
                    raise RetryLater(
                        f"Salesforce Bulk API 2.0 query job {job_id} still {state}", system=SYSTEM
                    )
                self._policy.sleep(delay)
                waited += delay
                delay = min(delay * 2, 30.0)
            locator = ""
            while True:
                text, locator = self._call(
                    "bulk2", partial(self._bulk_results, job_id=job_id, locator=locator)
                )
                records = [_typed(row, run.opp_fields) for row in csv.DictReader(io.StringIO(text))]
                rows, failures = self._convert(run, records, nested=False)
                if not locator:
                    yield PullPage(rows, (), failures, final.encode(), True)
                    return
                yield PullPage(rows, (), failures, None, True)
        except SalesforceApiError as exc:
            raise _read_error(exc) from None

    def _bulk_results(self, sf: Salesforce, *, job_id: str, locator: str) -> tuple[str, str]:
        params: dict[str, str | int] = {"maxRecords": self._bulk_page_size}
        if locator:
            params["locator"] = locator
        response = sf.session.get(
            f"{sf.base_url}jobs/query/{job_id}/results",
            headers={**sf.headers, "Accept": "text/csv"},
            params=params,
            timeout=self._timeout,
        )
        if response.status_code >= 300:
            exception_handler(response, "bulk2-results")
        nxt = response.headers.get("Sforce-Locator", "")
        return response.content.decode("utf-8").replace("\x00", ""), "" if nxt in ("", "null") else nxt

    def get(self, crm_ids: Sequence[str]) -> Sequence[Deal]:
        """Opportunities by id with related data (IN by Id, chunked under the URI limit; the related
        data comes with them, as in :meth:`pull`)."""
        run = _Run(self._metadata())
        ids = [soql.sf_id(i) for i in crm_ids]
        records: list[dict[str, Any]] = []
        for query in soql.chunk_in_values(
            ids, lambda chunk: self._opp_query(run, soql.in_("Id", chunk, ids=True)).render()
        ):
            records.extend(self._query_all(query, operation="opportunities"))
        rows, _failures = self._convert(run, records)
        return [r.deal for r in rows]

    def find_by_referral(self, referral_ids: Sequence[str]) -> Mapping[str, Deal]:
        """Opportunities already carrying these referral ids: a create whose answer was lost (a crash
        between the CRM's reply and our commit) is found here instead of being made twice."""
        run = _Run(self._metadata())
        field = self.fields["referral_id"]
        wanted = sorted(set(referral_ids))
        if not wanted or not field:
            return {}
        records: list[dict[str, Any]] = []
        for query in soql.chunk_in_values(
            wanted, lambda chunk: self._opp_query(run, soql.in_(field, chunk)).render()
        ):
            records.extend(self._query_all(query, operation="find-by-referral"))
        rows, _failures = self._convert(run, records)
        return {r.deal.referral_id: r.deal for r in rows if r.deal.referral_id}

    # --- related data and conversion --------------------------------------------------------------
    def _nested_related(self, records: Sequence[Mapping[str, Any]]) -> _Related:
        """The related data the opportunity query brought along (relationship fields, subqueries)."""
        rel = _Related()
        for rec in records:
            rid = str(rec["Id"])
            account = rec.get("Account")
            if account:  # null: no account, or one the integration user cannot read
                rel.accounts[str(rec.get("AccountId") or "")] = account
            owner = rec.get("Owner")
            if owner:
                rel.users[str(rec.get("OwnerId") or "")] = owner
            chosen: tuple[bool, dict[str, Any]] | None = None
            for role in self._child_records(rec, "OpportunityContactRoles"):
                contact = role.get("Contact")
                if contact is None or role.get("IsDeleted"):
                    continue  # OpportunityContactRole may name a contact the user cannot read
                primary = bool(role.get("IsPrimary"))
                if chosen is None or (primary and not chosen[0]):
                    chosen = (primary, contact)
            if chosen is not None:
                rel.contact_of[rid] = chosen[1]
            team = [
                m["User"]
                for m in self._child_records(rec, "OpportunityTeamMembers")
                if m.get("User") and not m.get("IsDeleted")
            ]
            if team:
                rel.team_of[rid] = team
            if not self.fields["solutions"]:
                codes = [
                    str(item["ProductCode"])
                    for item in self._child_records(rec, "OpportunityLineItems")
                    if item.get("ProductCode") and not item.get("IsDeleted")
                ]
                if codes:
                    rel.codes_of[rid] = codes
        return rel

    def _child_records(self, rec: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
        """One subquery's records for one opportunity: the nested result, followed through its
        ``nextRecordsUrl`` while ``done`` is false ("you might need to use queryMore() to retrieve all
        the records if there are many children", relationship query results doc)."""
        result = rec.get(name)
        if not result:
            return []  # null: no children
        records: list[dict[str, Any]] = result.get("records") or []
        url = None if result.get("done", True) else result.get("nextRecordsUrl")
        if not url:
            return records
        records = list(records)
        try:
            while url:
                page = self._call("related", partial(_query_more, url=str(url), timeout=self._timeout))
                records.extend(page.get("records") or [])
                url = None if page.get("done", True) else page.get("nextRecordsUrl")
        except SalesforceApiError as exc:
            if exc.code != "INVALID_QUERY_LOCATOR":
                raise _read_error(exc) from None
            # The child locator expired: read this opportunity's children with a query of their own.
            log.info("salesforce child query locator expired; reading the children again", relationship=name)
            (child,) = [q for q in self._child_queries() if q.sobject == name]
            query = soql.Query(
                _CHILD_OBJECTS[name], child.fields, where=soql.eq("OpportunityId", soql.sf_id(rec["Id"]))
            ).render()
            records = self._query_all(query, operation=f"related:{_CHILD_OBJECTS[name]}")
        return records

    def _in_query(
        self,
        sobject: str,
        fields: Sequence[str],
        key: str,
        ids: Iterable[str],
        extra: soql.Cond | None = None,
    ) -> list[dict[str, Any]]:
        unique = sorted({soql.sf_id(i) for i in ids if i})
        out: list[dict[str, Any]] = []
        if not unique:
            return out

        def build(chunk: Sequence[str]) -> str:
            return soql.Query(
                sobject, tuple(fields), where=soql.all_of(soql.in_(key, chunk, ids=True), extra)
            ).render()

        for query in soql.chunk_in_values(unique, build):
            out.extend(self._query_all(query, operation=f"related:{sobject}"))
        return out

    def _related(self, run: _Run, records: Sequence[Mapping[str, Any]]) -> _Related:
        """Related data by IN queries per page: only for Bulk API 2.0 rows, which cannot carry
        subqueries (crm-apis.md §A.3); REST reads bring it along (:meth:`_nested_related`)."""
        rel = _Related()
        opp_ids = [str(r["Id"]) for r in records]
        if not opp_ids:
            return rel
        rel.accounts = {
            a["Id"]: a
            for a in self._in_query(
                "Account",
                self._account_fields(run),
                "Id",
                (str(r.get("AccountId") or "") for r in records),
            )
        }
        roles = self._in_query(
            "OpportunityContactRole",
            ("Id", "OpportunityId", "ContactId", "Role", "IsPrimary"),
            "OpportunityId",
            opp_ids,
        )
        # OpportunityContactRole may name contacts the user cannot read: re-query Contact (crm-apis.md §A.1).
        contacts = {
            c["Id"]: c
            for c in self._in_query("Contact", _PERSON, "Id", (str(r.get("ContactId") or "") for r in roles))
        }
        chosen: dict[str, tuple[bool, dict[str, Any]]] = {}
        for role in roles:
            contact = contacts.get(str(role.get("ContactId") or ""))
            if contact is None:
                continue
            opp, primary = str(role["OpportunityId"]), bool(role.get("IsPrimary"))
            if opp not in chosen or (primary and not chosen[opp][0]):
                chosen[opp] = (primary, contact)
        rel.contact_of = {k: v[1] for k, v in chosen.items()}
        members = self._in_query(
            "OpportunityTeamMember",
            ("Id", "OpportunityId", "UserId", "TeamMemberRole"),
            "OpportunityId",
            opp_ids,
        )
        user_ids = [str(r.get("OwnerId") or "") for r in records] + [
            str(m.get("UserId") or "") for m in members
        ]
        rel.users = {u["Id"]: u for u in self._in_query("User", _PERSON, "Id", user_ids)}
        for m in members:
            user = rel.users.get(str(m.get("UserId") or ""))
            if user is not None:
                rel.team_of.setdefault(str(m["OpportunityId"]), []).append(user)
        if not self.fields["solutions"]:
            for item in self._in_query(
                "OpportunityLineItem", ("Id", "OpportunityId", "ProductCode"), "OpportunityId", opp_ids
            ):
                if item.get("ProductCode"):
                    rel.codes_of.setdefault(str(item["OpportunityId"]), []).append(str(item["ProductCode"]))
        return rel

    def _convert(
        self, run: _Run, records: Sequence[Mapping[str, Any]], *, nested: bool = True
    ) -> tuple[tuple[OpportunityRow, ...], tuple[RecordFailure, ...]]:
        """Records -> rows; their related data came nested in them (REST) or, ``nested=False``
        (Bulk), is read with IN queries."""
        rel = self._nested_related(records) if nested else self._related(run, records)
        converted = [self._convert_one(run, rec, rel) for rec in records]
        return (
            tuple(c for c in converted if isinstance(c, OpportunityRow)),
            tuple(c for c in converted if isinstance(c, RecordFailure)),
        )

    def _convert_one(
        self, run: _Run, rec: Mapping[str, Any], rel: _Related
    ) -> OpportunityRow | RecordFailure:
        try:
            return self._row(run, rec, rel)
        except RecordError as exc:
            return RecordFailure(str(rec.get("Id") or ""), exc.cause or "invalid", str(exc))
        except (ValueError, KeyError, TypeError, InvalidOperation) as exc:
            return RecordFailure(str(rec.get("Id") or ""), "invalid-record", f"{type(exc).__name__}: {exc}")

    def _row(self, run: _Run, rec: Mapping[str, Any], rel: _Related) -> OpportunityRow:
        rid = soql.sf_id(rec["Id"])
        stage_name = str(rec.get("StageName") or "")
        probability = int(Decimal(str(rec["Probability"]))) if rec.get("Probability") is not None else None
        record_type = run.meta.record_types.get(str(rec.get("RecordTypeId") or ""))
        closed, won = bool(rec.get("IsClosed")), bool(rec.get("IsWon"))
        status, substatus = (
            (Status.CLOSED, Substatus.WON if won else Substatus.LOST)
            if closed
            else (Status.ACTIVE, Substatus.ACCEPTED)
        )
        sales_stage = self._sales_stage(stage_name, probability, record_type)
        amount = rec.get("Amount")
        currency = str(rec.get("CurrencyIsoCode") or self._default_currency)
        help_value = rec.get(self.fields["help_type"]) if self.fields["help_type"] else None
        help_type = HelpType(help_value) if help_value in _HELP_VALUES else None
        close = rec.get("CloseDate")
        stamp = parse_sf_datetime(rec["SystemModstamp"])
        modified = parse_sf_datetime(rec["LastModifiedDate"])
        deal = Deal(
            name=str(rec.get("Name") or ""),
            direction=Direction.OUTBOUND,
            # Asking Microsoft for help makes it co-sell (cosell-domain.md "Deal types").
            deal_type=DealType.CO_SELL
            if help_type is not None
            else (DealType.PARTNER_LED if self._flag(rec, "visibility") else self._default_deal_type),
            status=status,
            substatus=substatus,
            referral_id=(
                str(rec[self.fields["referral_id"]]) if rec.get(self.fields["referral_id"]) else None
            ),
            crm_id=rid,
            sales_stage=sales_stage,
            customer=self._customer(rel.accounts.get(str(rec.get("AccountId") or ""))),
            customer_contact=_person(rel.contact_of.get(rid), seller=False),
            value=Money(Decimal(str(amount)), currency) if amount is not None else None,
            close_date=date.fromisoformat(str(close)) if close else None,
            notes=str(rec.get(self.fields["notes"]) or "") if self.fields["notes"] else "",
            campaign_id=_text_or_none(rec.get(self.fields["campaign"])) if self.fields["campaign"] else None,
            team=self._team(rec, rel),
            solutions=self._solutions_of(rid, rec, rel),
            help_requested=help_type,
            share_with_microsoft=help_type is not None or self._flag(rec, "visibility"),
            contact_consent=self._flag(rec, "contact_consent"),
            created_at=parse_sf_datetime(rec["CreatedDate"]) if rec.get("CreatedDate") else None,
            updated_at=stamp,
            version=VersionTag(SYSTEM, _iso(modified)),
            crm_stage=CrmStageInfo(
                label=stage_name,
                probability=probability,
                record_type=record_type,
                modified=modified,
                lost_reason=_text_or_none(rec.get(self.fields["lost_reason"]))
                if self.fields["lost_reason"]
                else None,
            ),
        )
        return OpportunityRow(deal, stage_name, probability, record_type, stamp, modified)

    def _sales_stage(
        self, stage_name: str, probability: int | None, record_type: str | None
    ) -> StandardStage | None:
        """The Partner Center stage the mapping gives, cached per (stage, probability, record type):
        a page holds thousands of opportunities and a handful of distinct combinations."""
        if self._mapping is None:
            return None
        key = (stage_name, probability, record_type)
        if key in self._stage_cache:
            cached = self._stage_cache[key]
        else:
            try:
                target = self._mapping.resolve(stage_name, probability, record_type).target
                cached = StandardStage.WON if target.outcome is Outcome.WON else target.stage
            except RecordError as exc:
                cached = exc  # unmapped: every record with this stage fails the same way
            if len(self._stage_cache) >= _STAGE_CACHE_MAX:
                self._stage_cache.clear()
            self._stage_cache[key] = cached
        if isinstance(cached, RecordError):
            raise RecordError(str(cached), record_id=cached.record_id, cause=cached.cause)
        return cached

    def _customer(self, account: Mapping[str, Any] | None) -> Customer | None:
        if account is None:
            return None
        raw_country = account.get("BillingCountryCode") or account.get("BillingCountry")
        code = country_code(str(raw_country or ""))
        if code is None:
            # Partner Center needs an ISO-2 country; guessing would file the deal in the wrong market.
            raise RecordError(
                "the account's billing country is missing or not recognised", cause="country-unmapped"
            )
        duns_raw = account.get(self.fields["account_duns"]) if self.fields["account_duns"] else None
        duns = re.sub(r"\D", "", str(duns_raw or "")) or None
        return Customer(
            name=str(account.get("Name") or ""),
            address=Address(
                country=code,
                line1=str(account.get("BillingStreet") or ""),
                city=str(account.get("BillingCity") or ""),
                state=str(account.get("BillingState") or ""),
                postal_code=str(account.get("BillingPostalCode") or ""),
            ),
            duns=duns if duns and len(duns) == 9 else None,
        )

    def _team(self, rec: Mapping[str, Any], rel: _Related) -> tuple[Contact, ...]:
        people = [rel.users.get(str(rec.get("OwnerId") or "")), *rel.team_of.get(str(rec["Id"]), [])]
        seen: dict[str, Contact] = {}
        for user in people:
            contact = _person(user, seller=True)
            if contact is not None and contact.key not in seen:
                seen[contact.key] = contact
        return tuple(seen.values())

    def _solutions_of(self, rid: str, rec: Mapping[str, Any], rel: _Related) -> tuple[Solution, ...]:
        if self.fields["solutions"]:
            codes = [c.strip() for c in str(rec.get(self.fields["solutions"]) or "").split(";") if c.strip()]
        else:
            codes = rel.codes_of.get(rid, [])
        out: dict[str, Solution] = {}
        for code in codes:
            solution = self._solutions.get(code) or Solution(SolutionKind.OWN, code)
            out.setdefault(solution.id, solution)
        return tuple(out.values())

    # --- writing ----------------------------------------------------------------------------------
    def sync_write(
        self,
        crm_id: str | None,
        *,
        referral_id: str | None = None,
        referral_link: str | None = None,
        status: str | None = None,
        synced_at: datetime | None = None,
        audit: str | None = None,
        extra: Mapping[str, object] | None = None,
        based_on: str | None = None,
        idempotency_key: str = "",
    ) -> CrmWrite:
        """A write of the connector's own fields (referral id/link, sync status, last sync, audit line)."""
        values: dict[str, object] = dict(extra or {})
        for role, value in (
            ("referral_id", referral_id),
            ("referral_link", referral_link),
            ("sync_status", status),
            ("last_sync", synced_at),
            ("audit", audit[:AUDIT_MAX] if audit is not None else None),
        ):
            if value is not None and self.fields[role]:
                values[self.fields[role]] = value
        return CrmWrite(
            soql.sf_id(crm_id) if crm_id is not None else None,
            values,
            based_on=based_on,
            idempotency_key=idempotency_key,
        )

    def apply(self, changes: Sequence[CrmChange]) -> Sequence[WriteResult]:
        """Canonical changes -> Opportunity field writes (configurable API names), one batch.

        Team changes need OpportunityTeamMember rows (and users looked up by email): not written yet;
        they are named in ``WriteResult.extra["skipped"]`` so nothing is dropped silently.
        """
        writes: list[CrmWrite] = []
        skipped: list[list[str]] = []
        for change in changes:
            values: dict[str, object] = {}
            left_out: list[str] = []
            for name, value in change.fields.items():
                target = self._canonical_field(name)
                if target is None:
                    left_out.append(name)
                elif name == "solutions":
                    ids = (str(v.get("id") if isinstance(v, Mapping) else v) for v in value or [])
                    values[target] = ";".join(self._solution_codes.get(i, i) for i in ids)
                elif name == "close_date" and isinstance(value, str):
                    values[target] = date.fromisoformat(value)
                elif name == "value" and value is not None:
                    # canonical amounts are decimal strings (exact); Salesforce's currency field is a number
                    values[target] = float(Decimal(str(value)))
                else:
                    values[target] = value
            if change.stage is not None:
                values["StageName"] = change.stage
            if change.crm_id is None and self._crm.opt_in.field:
                # an opportunity created for a referral is in sync from birth: without the checkbox
                # the seller's accept or decline in the CRM would never be read back
                values[self._crm.opt_in.field] = True
            write = self.sync_write(
                change.crm_id,
                referral_id=change.referral_id,
                referral_link=change.referral_link,
                status=change.sync_status[:AUDIT_MAX] if change.sync_status is not None else None,
                synced_at=change.synced_at,
                audit=change.audit_line,
                extra=values,
                based_on=change.based_on,
                idempotency_key=change.key,
            )
            writes.append(write)
            skipped.append(left_out)
        results = self.write(writes)
        return [
            replace(r, extra={**r.extra, "skipped": left_out}) if left_out else r
            for r, left_out in zip(results, skipped, strict=True)
        ]

    def _canonical_field(self, name: str) -> str | None:
        run_fields = self._meta.opp_fields if self._meta is not None else {}
        mapping = {
            "name": "Name",
            "value": "Amount",
            "close_date": "CloseDate",
            "notes": self.fields["notes"],
            "campaign_id": self.fields["campaign"],
            "solutions": self.fields["solutions"],
            "lost_reason": self.fields["lost_reason"],
            # only multi-currency orgs have the field (crm-apis.md §A.1); the adapter saw it in describe
            "currency": "CurrencyIsoCode" if "CurrencyIsoCode" in run_fields else "",
        }
        return mapping.get(name) or None

    def write(self, writes: Sequence[CrmWrite]) -> Sequence[WriteResult]:
        results: list[WriteResult | None] = [None] * len(writes)
        updates: list[tuple[int, dict[str, Any]]] = []
        creates: list[tuple[int, dict[str, Any]]] = []
        conditional: list[tuple[int, dict[str, Any]]] = []
        for i, w in enumerate(writes):
            key = _key(w, i)
            try:
                body = _body(w)
            except ValueError as exc:
                results[i] = WriteResult(key, False, w.crm_id, "INVALID_VALUE", str(exc))
                continue
            if w.crm_id is None:
                creates.append((i, body))
            elif w.based_on:
                conditional.append((i, body))
            else:
                updates.append((i, body))
        for method, items in (("PATCH", updates), ("POST", creates)):
            for start in range(0, len(items), COLLECTION_MAX):
                self._collection(method, items[start : start + COLLECTION_MAX], writes, results)
        for i, body in conditional:
            results[i] = self._conditional(writes[i], body, _key(writes[i], i))
        done = [r for r in results if r is not None]
        stale = sorted({r.error_code for r in done if not r.ok and r.error_code in STALE_METADATA_CODES})
        if stale:
            # A field or picklist value the cached describe promised was refused: the org changed.
            self._metadata_is_stale(f"write refused: {', '.join(stale)}")
        return done

    def _collection(
        self,
        method: str,
        items: list[tuple[int, dict[str, Any]]],
        writes: Sequence[CrmWrite],
        results: list[WriteResult | None],
    ) -> None:
        pending = items
        for attempt in range(self._policy.max_attempts):
            records = [body for _i, body in pending]
            try:
                answer = self._call(
                    "composite",
                    partial(_collection_call, method=method, records=records, timeout=self._timeout),
                )
            except SalesforceApiError as exc:
                # The whole request was refused (malformed): every record in it carries the cause.
                for i, _body in pending:
                    results[i] = WriteResult(
                        _key(writes[i], i), False, writes[i].crm_id, exc.code, exc.message
                    )
                return
            retry: list[tuple[int, dict[str, Any]]] = []
            # Results come back in request order; a 200 does not mean every record was saved.
            for (i, body), res in zip(pending, answer or [], strict=True):
                key = _key(writes[i], i)
                if res.get("success"):
                    results[i] = WriteResult(key, True, str(res.get("id") or writes[i].crm_id or ""))
                    continue
                errors = res.get("errors") or [{}]
                code = str(errors[0].get("statusCode") or errors[0].get("errorCode") or "UNKNOWN")
                message = str(errors[0].get("message") or "")
                if code == "UNABLE_TO_LOCK_ROW" and attempt + 1 < self._policy.max_attempts:
                    retry.append((i, body))
                    continue
                results[i] = WriteResult(
                    key,
                    False,
                    writes[i].crm_id,
                    code,
                    message,
                    extra={
                        "fields": list(errors[0].get("fields") or []),
                        "retryable": code == "UNABLE_TO_LOCK_ROW",
                    },
                )
            if not retry:
                return
            # Row locks are transient (another transaction holds the record): back off, resend those only.
            self._policy.sleep(min(self._policy.max_wait, self._policy.initial_wait * 2**attempt))
            pending = retry

    def _conditional(self, write: CrmWrite, body: dict[str, Any], key: str) -> WriteResult:
        assert write.crm_id is not None and write.based_on is not None
        crm_id = write.crm_id
        try:
            since = format_datetime(parse_sf_datetime(write.based_on), usegmt=True)
        except ValueError:
            return WriteResult(key, False, crm_id, "INVALID_VALUE", "based_on is not a Salesforce datetime")
        fields = {k: v for k, v in body.items() if k not in ("attributes", "id")}
        try:
            # If-Unmodified-Since compares LastModifiedDate to the second; Opportunity has no ETag
            # (https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/intro_rest_conditional_requests.htm).
            self._call(
                "sobject-update",
                lambda sf: _opportunity(sf).update(crm_id, fields, headers={"If-Unmodified-Since": since}),
            )
        except ConflictError as exc:
            return WriteResult(key, False, crm_id, "PRECONDITION_FAILED", str(exc), conflict=True)
        except SalesforceApiError as exc:
            return WriteResult(key, False, crm_id, exc.code, exc.message)
        return WriteResult(key, True, crm_id)


# --- helpers -----------------------------------------------------------------------------------------


def _pull_page(
    converted: Sequence[_Converted], cursor: str, full: bool, deleted: Sequence[str] = ()
) -> PullPage:
    gone = [c for c in converted if isinstance(c, str)]
    return PullPage(
        tuple(c for c in converted if isinstance(c, OpportunityRow)),
        tuple(dict.fromkeys([*gone, *deleted])),
        tuple(c for c in converted if isinstance(c, RecordFailure)),
        cursor,
        full,
        tuple(c for c in converted if isinstance(c, Listed)),
    )


def _collection_call(sf: Salesforce, *, method: str, records: list[dict[str, Any]], timeout: float) -> Any:
    # allOrNone=false: one bad record must not sink the other 199 (collections doc above).
    body = {"allOrNone": False, "records": records}
    return sf.restful("composite/sobjects", method=method, json=body, timeout=timeout)


def _get_json(sf: Salesforce, *, path: str, timeout: float) -> Any:
    return sf.restful(path, timeout=timeout)


def _query_more(sf: Salesforce, *, url: str, timeout: float) -> Any:
    return sf.query_more(url, identifier_is_url=True, timeout=timeout)


def _opportunity(sf: Salesforce) -> SFType:
    return cast("SFType", sf.Opportunity)


def _operation(path: str) -> str:
    p = path.split("?", 1)[0].rstrip("/")
    for marker, name in (
        ("/oauth2/token", "oauth-token"),
        ("/queryAll/", "query-more"),
        ("/query/", "query-more"),
        ("/queryAll", "query"),
        ("/query", "query"),
        ("/jobs/query", "bulk2"),
        ("/composite/sobjects", "composite"),
        ("/deleted", "get-deleted"),
        ("/updated", "get-updated"),
        ("/describe", "describe"),
        ("/ui-api/", "ui-api"),
        ("/limits", "limits"),
        ("/sobjects/", "sobject"),
    ):
        if marker in p:
            return name
    return "other"


def _classify(exc: SalesforceError, operation: str) -> CosellError:
    status = int(getattr(exc, "status", 0) or 0)
    content = getattr(exc, "content", None)
    first = content[0] if isinstance(content, list) and content and isinstance(content[0], dict) else {}
    code = str(first.get("errorCode") or "")
    message = str(first.get("message") or "")[:500]
    if status == 403 and code == "REQUEST_LIMIT_EXCEEDED":
        # Allocation (rolling 24 h) or concurrency limit: stop and resume later (crm-apis.md §A.5).
        return RateLimited(
            f"Salesforce refused {operation}: REQUEST_LIMIT_EXCEEDED", system=SYSTEM, retry_after=3600.0
        )
    if status == 412:
        return ConflictError(f"Salesforce {operation}: the record changed since it was read")
    if status == 429:
        return RateLimited(f"Salesforce throttled {operation}", system=SYSTEM)
    if status >= 500:
        return RetryLater(f"Salesforce {operation}: HTTP {status}", system=SYSTEM)
    if status == 403:
        return FatalError(
            f"Salesforce refused {operation} (403 {code}): check the integration user's permissions"
        )
    if status == 414:
        return FatalError(f"Salesforce {operation}: URI too long (a query was not chunked)")
    return SalesforceApiError(status, code or f"HTTP_{status}", message, tuple(first.get("fields") or ()))


def _read_error(exc: SalesforceApiError) -> CosellError:
    if exc.code in ("INVALID_FIELD", "INVALID_TYPE", "INSUFFICIENT_ACCESS"):
        return ConfigError([ConfigProblem("salesforce org", "crm.fields", f"{exc.code}: {exc.message}")])
    return FatalError(f"Salesforce refused a read: {exc.code}: {exc.message}")


def _person(row: Mapping[str, Any] | None, *, seller: bool) -> Contact | None:
    if row is None:
        return None
    values = (
        str(row.get("FirstName") or ""),
        str(row.get("LastName") or ""),
        str(row.get("Email") or ""),
        str(row.get("Phone") or ""),
        str(row.get("Title") or ""),
    )
    # A customer's contact is built afresh: a daemon must not hold customers' details beyond the
    # record being read (as the Partner Center conversion, which caches no contact at all).
    return _seller(*values) if seller else Contact(*values)


@functools.lru_cache(maxsize=4096)
def _seller(first_name: str, last_name: str, email: str, phone: str, title: str) -> Contact:
    # Contact is frozen, so one instance serves every opportunity the same seller appears on (the
    # owner and team of thousands of deals are a few dozen users); building one checks its email.
    return Contact(first_name=first_name, last_name=last_name, email=email, phone=phone, title=title)


def _text_or_none(value: object) -> str | None:
    return str(value) if value not in (None, "") else None


def _key(write: CrmWrite, index: int) -> str:
    return write.idempotency_key or write.crm_id or f"new-{index}"


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError("naive datetimes are refused: give a timezone-aware value")
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("a number must be finite")
        return float(value)
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise ValueError(f"cannot send a {type(value).__name__} to Salesforce")


def _body(write: CrmWrite) -> dict[str, Any]:
    body: dict[str, Any] = {"attributes": {"type": "Opportunity"}}
    if write.crm_id is not None:
        body["id"] = soql.sf_id(write.crm_id)
    for name, value in write.values.items():
        if name.lower() in ("id", "attributes"):
            raise ValueError(f"{name} cannot be written")
        soql.field_name(name)
        body[name] = _json_value(value)
    return body


def _typed(row: Mapping[str, str], types: Mapping[str, str]) -> dict[str, Any]:
    """A Bulk CSV row with REST-like types (empty -> None, booleans, numbers; datetimes stay text)."""
    out: dict[str, Any] = {}
    for name, text in row.items():
        kind = types.get(name, "string")
        if text == "":
            out[name] = None
        elif kind == "boolean":
            out[name] = text.lower() == "true"
        elif kind in ("double", "currency", "percent", "int"):
            out[name] = float(text)
        else:
            out[name] = text
    return out


def _conforms(adapter: SalesforceAdapter) -> CrmAdapter:
    return adapter  # mypy proves SalesforceAdapter satisfies the engine's seam
