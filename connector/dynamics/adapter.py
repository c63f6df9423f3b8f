"""Dynamics 365 opportunities through the Dataverse Web API: the :class:`~connector.seams.CrmAdapter`.

Reads
    Change tracking is the incremental mechanism (``Prefer: odata.track-changes``; the delta link is
    the cursor, persisted by the engine only after the page is committed). When the table has no
    change tracking, or the delta token expired ("Version stamp associated with the client has
    expired. Please perform a full sync."), the adapter falls back to a full resync ordered by the
    compound key ``(modifiedon, opportunityid)``, page by page and resumable, flags every page
    ``full_resync`` and logs it.
    https://learn.microsoft.com/power-apps/developer/data-platform/use-change-tracking-synchronize-data-external-systems

    Related data (account, contact, currency, team, products / solutions, business process stage)
    is read per page of opportunities in at most two ``$batch`` requests of chunked ``or``-filters,
    never one request per opportunity.

Writes
    Each record is one change set in a ``$batch`` with ``Prefer: odata.continue-on-error``, so one
    bad record fails alone. Updates carry ``If-Match`` with the ``@odata.etag`` read (412 -> conflict);
    creates are ``POST`` and answer ``OData-EntityId``. Won/Lost go only through the
    ``WinOpportunity`` / ``LoseOpportunity`` actions: Dataverse refuses closing by a ``statecode``
    update (crm-apis.md §B.3), and so does this adapter, before sending anything.

Limits
    429 with ``Retry-After`` is retried by :class:`~connector.remote.session.ApiSession`; write batches
    run on at most ``max_concurrency`` threads, far below the documented 52 concurrent requests per
    user (https://learn.microsoft.com/power-apps/developer/data-platform/api-limits).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import structlog

from connector.domain.codes import ISO_3166_ALPHA2, ISO_4217
from connector.domain.model import (
    Address,
    Contact,
    CrmStageInfo,
    Customer,
    Deal,
    DealType,
    Direction,
    Money,
    Solution,
    SolutionKind,
    StandardStage,
    Status,
    Substatus,
    VersionTag,
)
from connector.domain.stages import CrmStage, Outcome, StageMapping
from connector.dynamics import odata
from connector.dynamics.odata import ChangeSet, Filter, Part, Query
from connector.errors import ConfigError, FatalError, RateLimited, RecordError, RetryLater
from connector.remote.calls import CallCounter
from connector.remote.http import http_client
from connector.remote.retry import RetryPolicy, parse_retry_after
from connector.remote.session import ApiSession
from connector.remote.tokens import TokenProvider
from connector.seams import (
    ChangePage,
    CrmAdapter,
    CrmChange,
    CrmField,
    CrmWrite,
    RecordFailure,
    WriteResult,
)
from connector.settings import DynamicsCrm, read_secret

if TYPE_CHECKING:
    from connector.remote.signin import ClientCredentials

__all__ = [
    "EXPIRED_DELTA_TEXT",
    "DynamicsAdapter",
    "DynamicsOptions",
    "build_adapter",
    "dataverse_signin",
    "split_delta_entries",
]

log = structlog.get_logger(__name__)
SYSTEM = "dynamics"

#: The documented error text of an expired delta token (use-change-tracking-synchronize-data-external-systems).
EXPIRED_DELTA_TEXT = "Version stamp associated with the client has expired"
#: Documented concurrency limit per user and web server (api-limits).
MAX_DOCUMENTED_CONCURRENCY = 52

_READ_HEADERS = {
    "Accept": "application/json",
    "OData-MaxVersion": "4.0",
    "OData-Version": "4.0",
    # Dataverse's documented way to make sure a GET is not answered from a cache.
    "If-None-Match": "null",
}
_WRITE_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}

STATE_OPEN, STATE_WON, STATE_LOST = 0, 1, 2
_BOOKKEEPING = frozenset({"referral_link", "sync_status", "audit_line", "synced_at", "campaign_id"})

#: Common English country names -> ISO 3166 alpha-2 (Dataverse's address1_country is free text).
COUNTRY_NAMES: Mapping[str, str] = {
    "united states": "US", "united states of america": "US", "usa": "US", "u.s.a.": "US",
    "united kingdom": "GB", "uk": "GB", "great britain": "GB", "england": "GB", "germany": "DE",
    "deutschland": "DE", "france": "FR", "netherlands": "NL", "the netherlands": "NL", "japan": "JP",
    "canada": "CA", "australia": "AU", "india": "IN", "ireland": "IE", "spain": "ES", "italy": "IT",
    "sweden": "SE", "norway": "NO", "denmark": "DK", "finland": "FI", "switzerland": "CH",
    "austria": "AT", "belgium": "BE", "poland": "PL", "brazil": "BR", "mexico": "MX", "china": "CN",
    "singapore": "SG", "new zealand": "NZ", "south africa": "ZA", "portugal": "PT", "israel": "IL",
}  # fmt: skip


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DynamicsOptions:
    """Everything the adapter needs to know about one environment. Build with :meth:`from_settings`."""

    base_url: str
    api_version: str = "9.2"
    page_size: int = 500
    stage_source: Literal["salesstage", "bpf", "statuscode"] = "salesstage"
    #: business process flow instance table and the process whose stages count (custom BPFs differ)
    bpf_entity_set: str = "opportunitysalesprocesses"
    bpf_process_id: str | None = None
    opt_in_field: str | None = "new_syncwithpartnercenter"
    opt_in_filter: str | None = None
    referral_id_field: str | None = None
    #: where apply() writes the bookkeeping values (unset = not written): referral link, sync status,
    #: audit line, last sync time, Partner Center campaign id
    bookkeeping: Mapping[str, str] = field(default_factory=dict)
    team_source: Literal["none", "fields", "connections"] = "fields"
    #: user lookups on the opportunity whose users form the deal team (source "fields")
    team_fields: tuple[str, ...] = ("_ownerid_value",)
    #: only connections in these roles count (source "connections"); empty = all
    connection_roles: tuple[str, ...] = ()
    solutions_source: Literal["none", "opportunityproduct", "field"] = "opportunityproduct"
    solutions_field: str | None = None
    solution_kind: SolutionKind = SolutionKind.OWN
    deal_type: DealType = DealType.CO_SELL
    direction: Direction = Direction.OUTBOUND
    lookback: timedelta = timedelta(minutes=5)
    #: option-set / stage metadata is reused this long by an adapter kept across runs
    metadata_ttl: timedelta = timedelta(hours=1)
    change_tracking: bool = True
    #: ids per or-filter of a related read (keeps each URL far below the documented length limits)
    related_chunk: int = 100
    #: change sets per write $batch (each batch stays <= 1,000 requests)
    write_batch_size: int = 200
    max_concurrency: int = 4
    country_names: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.page_size <= 5000:
            # "odata.maxpagesize ... default and maximum 5,000" (page-results).
            raise ConfigError("dynamics page_size must be between 1 and 5000")
        if not 1 <= self.max_concurrency <= MAX_DOCUMENTED_CONCURRENCY:
            raise ConfigError(f"dynamics max_concurrency must be between 1 and {MAX_DOCUMENTED_CONCURRENCY}")
        if not 1 <= self.related_chunk <= 500:
            raise ConfigError("dynamics related_chunk must be between 1 and 500")
        if not 1 <= self.write_batch_size <= odata.MAX_BATCH_REQUESTS // 2:
            raise ConfigError("dynamics write_batch_size must be between 1 and 500 (two requests per record)")
        for name in (
            self.opt_in_field,
            self.referral_id_field,
            self.solutions_field,
            *self.team_fields,
            *self.bookkeeping.values(),
        ):
            if name is not None:
                odata.prop(name)
        if self.bpf_process_id is not None:
            odata.guid(self.bpf_process_id)

    @property
    def service_root(self) -> str:
        return f"{self.base_url.rstrip('/')}/api/data/v{self.api_version}/"

    @classmethod
    def from_settings(cls, crm: DynamicsCrm, **overrides: Any) -> DynamicsOptions:
        """Options from the settings model. Keys the settings model has no slot for yet are read from
        ``crm.fields`` (``referral_id``, ``team_source``, ``team_fields``, ``solutions_source``,
        ``solutions_field``, ``bpf_entity_set``, ``bpf_process_id``, ``change_tracking``)."""
        f = crm.fields
        kw: dict[str, Any] = {
            "base_url": crm.base_url,
            "api_version": crm.api_version,
            "page_size": crm.page_size,
            "stage_source": crm.stage_source,
            "opt_in_field": crm.opt_in.field,
            "opt_in_filter": crm.opt_in.odata_filter,
            "lookback": crm.lookback,
            "metadata_ttl": crm.metadata_ttl,
            "referral_id_field": f.get("referral_id"),
            "bookkeeping": {k: v for k, v in f.items() if k in _BOOKKEEPING},
        }
        if "team_source" in f:
            kw["team_source"] = f["team_source"]
        if "team_fields" in f:
            kw["team_fields"] = tuple(x.strip() for x in f["team_fields"].split(",") if x.strip())
        for key in ("solutions_source", "solutions_field", "bpf_entity_set", "bpf_process_id"):
            if key in f:
                kw[key] = f[key]
        if "change_tracking" in f:
            kw["change_tracking"] = f["change_tracking"].strip().lower() in ("1", "true", "yes")
        kw.update(overrides)
        return cls(**kw)


# --- cursor --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cursor:
    """The opaque cursor: ``dv1:delta:<deltaLink>`` | ``dv1:resync:<ts>|<id>|<deltaLink>`` |
    ``dv1:poll:<watermark>|<ts>|<id>`` (keyset position empty between runs)."""

    kind: Literal["start", "delta", "resync", "poll"]
    link: str = ""
    after: tuple[datetime, str] | None = None
    watermark: datetime | None = None

    def encode(self) -> str:
        after = f"{_iso(self.after[0])}|{self.after[1]}" if self.after else "|"
        if self.kind == "delta":
            return f"dv1:delta:{self.link}"
        if self.kind == "resync":
            return f"dv1:resync:{after}|{self.link}"
        if self.kind == "poll":
            return f"dv1:poll:{_iso(self.watermark) if self.watermark else ''}|{after}"
        raise ValueError("the start cursor is None")

    @classmethod
    def parse(cls, text: str | None) -> _Cursor:
        if text is None:
            return cls("start")
        try:
            version, kind, rest = text.split(":", 2)
            if version != "dv1":
                raise ValueError(version)
            if kind == "delta":
                return cls("delta", link=rest)
            if kind == "resync":
                ts, oid, link = rest.split("|", 2)
                return cls("resync", link=link, after=_after(ts, oid))
            if kind == "poll":
                wm, ts, oid = rest.split("|", 2)
                return cls("poll", watermark=_parse_dt(wm) if wm else None, after=_after(ts, oid))
        except ValueError:
            pass
        raise FatalError(
            "the stored Dynamics cursor is not one this adapter wrote; reset the connection's cursor"
        )


def _after(ts: str, oid: str) -> tuple[datetime, str] | None:
    return (_parse_dt(ts), odata.guid(oid)) if ts and oid else None


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_dt(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.utcoffset() is None:
        value = value.replace(tzinfo=UTC)  # the Web API returns UTC; a bare value is UTC
    return value.astimezone(UTC)


class _TokenExpired(Exception):
    pass


class _TrackingUnavailable(Exception):
    pass


# --- metadata ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Metadata:
    salesstage: Mapping[int, str]
    statuscode: Mapping[int, tuple[str, int]]  # value -> (label, state)
    statecode: Mapping[int, str]
    bpf_stages: Mapping[str, tuple[str, int]]  # processstageid -> (name, category)


def _option_label(option: Mapping[str, Any]) -> str:
    """An option's label in the caller's language (``Label.UserLocalizedLabel.Label``), else the first
    localized one, else its value."""
    lab = option.get("Label") or {}
    user = lab.get("UserLocalizedLabel") or {}
    text = user.get("Label") or next((x.get("Label") for x in lab.get("LocalizedLabels") or []), "")
    return str(text or option.get("Value"))


#: Attribute metadata types that carry an option set (``OptionSet`` / ``GlobalOptionSet``); each needs
#: its own cast, EnumAttributeMetadata cannot be cast to (query-metadata-web-api).
_OPTION_SET_TYPES = (
    "PicklistAttributeMetadata",
    "MultiSelectPicklistAttributeMetadata",
    "StatusAttributeMetadata",
    "StateAttributeMetadata",
)


# --- the adapter ---------------------------------------------------------------------------------


class DynamicsAdapter:
    """The Dataverse implementation of :class:`connector.seams.CrmAdapter`."""

    system = SYSTEM

    def __init__(
        self,
        options: DynamicsOptions,
        session: ApiSession,
        *,
        stage_mapping: StageMapping | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.options = options
        self.session = session
        self.stage_mapping = stage_mapping
        #: the clock metadata_ttl is measured on (tests pass the twin's)
        self._now = now or (lambda: datetime.now(UTC))
        self._meta: _Metadata | None = None
        self._meta_read_at: datetime | None = None
        self._meta_lock = threading.RLock()
        self._currencies: dict[str, str] = {}  # transactioncurrencyid -> ISO code (stable)
        self._tracking_known_off = not options.change_tracking

    @property
    def write_unsupported(self) -> frozenset[str]:
        """Canonical fields apply() cannot write yet: the engine lets them flow to Partner Center only
        (and without a referral-id column, the referral id cannot be written back at all)."""
        # lost_reason: Dataverse's reason for a loss is the status reason of the close, which the
        # stage mapping already chooses (LoseOpportunity's Status)
        unsupported = {"team", "solutions", "lost_reason"}
        if not self.options.referral_id_field:
            unsupported.add("referral_id")
        return frozenset(unsupported)

    #: If-Match writes still go in one $batch, so the engine may send every write conditionally
    conditional_writes_batched = True

    @property
    def root(self) -> str:
        return self.options.service_root

    def close(self) -> None:
        self.session.http.close()

    def __enter__(self) -> DynamicsAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------------

    def _get(self, operation: str, url: str, *, prefer: Sequence[str] = ()) -> httpx.Response:
        headers = dict(_READ_HEADERS)
        if prefer:
            headers["Prefer"] = ",".join(prefer)
        return self.session.request(operation, "GET", url, headers=headers)

    def _json(self, response: httpx.Response, what: str) -> Any:
        if response.status_code != 200:
            raise self._error(response, what)
        return response.json()

    @staticmethod
    def _error(response: httpx.Response, what: str) -> Exception:
        err = odata.parse_error(response.status_code, response.content)
        if response.status_code in (401, 403):
            return ConfigError(
                f"Dynamics refused {what} ({err}): check the application user's security roles"
            )
        if response.status_code == 400:
            return ConfigError(
                f"Dynamics rejected {what} ({err}): check the configured column names and filter"
            )
        return FatalError(f"Dynamics {what} failed ({err})")

    def _page_prefs(self, size: int | None = None) -> list[str]:
        return [f"odata.maxpagesize={size or self.options.page_size}"]

    # --- stages ----------------------------------------------------------------------------------

    def _attribute_options(self, attribute: str, cast: str) -> list[dict[str, Any]]:
        url = (
            f"{self.root}EntityDefinitions(LogicalName='opportunity')/Attributes(LogicalName='{attribute}')/"
            f"Microsoft.Dynamics.CRM.{cast}?$select=LogicalName&$expand=OptionSet($select=Options)"
        )
        body = self._json(self._get("metadata", url), f"the {attribute} option set")
        options = (body.get("OptionSet") or {}).get("Options") or []
        return list(options)

    def _load_metadata(self) -> _Metadata:
        sales = {
            int(o["Value"]): _option_label(o)
            for o in self._attribute_options("salesstage", "PicklistAttributeMetadata")
        }
        status = {
            int(o["Value"]): (_option_label(o), int(o.get("State", 0)))
            for o in self._attribute_options("statuscode", "StatusAttributeMetadata")
        }
        state = {
            int(o["Value"]): _option_label(o)
            for o in self._attribute_options("statecode", "StateAttributeMetadata")
        }
        bpf: dict[str, tuple[str, int]] = {}
        if self.options.stage_source == "bpf":
            flt = (
                odata.eq("_processid_value", odata.Guid(self.options.bpf_process_id))
                if self.options.bpf_process_id
                else None
            )
            q = Query("processstages", ("processstageid", "stagename", "stagecategory"), flt)
            for row in self._read_all("processstages", q.url(self.root)):
                bpf[row["processstageid"]] = (
                    str(row.get("stagename") or ""),
                    int(row.get("stagecategory") or 0),
                )
        meta = _Metadata(sales, status, state, bpf)
        self._meta, self._meta_read_at = meta, self._now()
        return meta

    def _metadata(self) -> _Metadata:
        """The option sets, re-read once ``metadata_ttl`` has passed: orgs change their stages (prior-art
        §5 class 4), but an adapter kept across runs must not pay three metadata reads every few minutes."""
        with self._meta_lock:  # the listing (its own thread) and the engine's reads may ask at once
            fresh = (
                self._meta_read_at is not None
                and self._now() - self._meta_read_at < self.options.metadata_ttl
            )
            return self._meta if self._meta is not None and fresh else self._load_metadata()

    def refresh_metadata(self) -> None:
        """Read the option sets again at the next use (e.g. after `cosell doctor` found a change)."""
        self._meta_read_at = None

    def stages(self) -> Sequence[CrmStage]:
        """The org's stages from option-set metadata (re-read once ``metadata_ttl`` has passed).

        Open stages come from the configured source; closed stages are the Won and Lost status
        reasons, flagged closed/won from their ``statecode`` (never guessed from a label)."""
        meta = self._metadata()
        out: list[CrmStage] = []
        src = self.options.stage_source
        if src == "salesstage":
            out += [CrmStage(label, sort_order=v) for v, label in sorted(meta.salesstage.items())]
        elif src == "bpf":
            ordered = sorted(meta.bpf_stages.values(), key=lambda s: (s[1], s[0]))
            out += [CrmStage(name, sort_order=i) for i, (name, _) in enumerate(ordered)]
        else:
            out += [
                CrmStage(lab, sort_order=v)
                for v, (lab, st) in sorted(meta.statuscode.items())
                if st == STATE_OPEN
            ]
        out += [
            CrmStage(lab, is_closed=True, is_won=st == STATE_WON, sort_order=1000 + v)
            for v, (lab, st) in sorted(meta.statuscode.items())
            if st in (STATE_WON, STATE_LOST)
        ]
        return out

    # --- field metadata ---------------------------------------------------------------------------

    def opportunity_fields(self) -> Mapping[str, CrmField]:
        """The opportunity table's columns by logical name, from attribute metadata; choice columns
        (option sets, status reasons, states) with their options' labels. Dataverse refuses a value
        outside an option set, so every one of them is restricted.

        One read of the attribute list, one per option-set type (a cast per type; metadata queries are
        not paged). https://learn.microsoft.com/power-apps/developer/data-platform/webapi/query-metadata-web-api"""
        attributes = f"{self.root}EntityDefinitions(LogicalName='opportunity')/Attributes"
        body = self._json(
            self._get("metadata", f"{attributes}?$select=LogicalName,AttributeType,AttributeTypeName"),
            "the opportunity attribute metadata",
        )
        fields: dict[str, CrmField] = {}
        for attr in body.get("value") or []:
            name = str(attr.get("LogicalName") or "")
            kind = str(attr.get("AttributeType") or "")
            if kind == "Virtual":  # multi-select choices are Virtual; their type name says which
                kind = str((attr.get("AttributeTypeName") or {}).get("Value") or kind).removesuffix("Type")
            if name:
                fields[name] = CrmField(name, kind)
        for cast in _OPTION_SET_TYPES:
            url = (
                f"{attributes}/Microsoft.Dynamics.CRM.{cast}?$select=LogicalName"
                "&$expand=OptionSet($select=Options),GlobalOptionSet($select=Options)"
            )
            body = self._json(self._get("metadata", url), f"the opportunity {cast}")
            for attr in body.get("value") or []:
                name = str(attr.get("LogicalName") or "")
                # a local option set is in OptionSet, a global one in GlobalOptionSet (the other is null)
                options = (attr.get("OptionSet") or attr.get("GlobalOptionSet") or {}).get("Options") or []
                known = fields.get(name) or CrmField(name, cast.removesuffix("AttributeMetadata"))
                labels = tuple(dict.fromkeys(_option_label(o) for o in options))
                fields[name] = replace(known, picklist_values=labels, restricted=True)
        return fields

    # --- reads -----------------------------------------------------------------------------------

    def _columns(self) -> tuple[str, ...]:
        o = self.options
        cols = [
            "opportunityid", "name", "estimatedvalue", "estimatedclosedate", "closeprobability", "salesstage",
            "statecode", "statuscode", "description", "_parentaccountid_value", "_customerid_value",
            "_parentcontactid_value", "_transactioncurrencyid_value", "createdon", "modifiedon",
        ]  # fmt: skip
        extra = [
            o.opt_in_field,
            o.referral_id_field,
            o.solutions_field if o.solutions_source == "field" else None,
        ]
        if o.team_source == "fields":
            extra += list(o.team_fields)
        cols += [c for c in extra if c]
        return tuple(dict.fromkeys(cols))

    def _opt_in_filter(self) -> Filter | None:
        o = self.options
        return odata.all_of(
            odata.eq(o.opt_in_field, True) if o.opt_in_field else None,
            Filter.trusted(o.opt_in_filter) if o.opt_in_filter else None,
        )

    def changes(self, cursor: str | None) -> Iterator[ChangePage]:
        state = _Cursor.parse(cursor)
        self._metadata()  # re-described once metadata_ttl has passed (prior-art §5 class 4)
        if state.kind == "delta":
            try:
                yield from self._delta(state.link, cursor)
                return
            except _TokenExpired:
                log.warning("dynamics.full_resync", reason="delta token expired", entity="opportunity")
            yield from self._resync()
        elif state.kind == "resync":
            yield from self._keyset(state, full=True)
        elif state.kind == "poll":
            yield from self._poll(state)
        else:
            if not self._tracking_known_off:
                try:
                    yield from self._initial()
                    return
                except _TrackingUnavailable:
                    self._tracking_known_off = True
                    log.warning(
                        "dynamics.full_resync", reason="change tracking is not enabled", entity="opportunity"
                    )
            yield from self._keyset(_Cursor("poll"), full=True)

    def _initial(self) -> Iterator[ChangePage]:
        """Initial change-tracking load: every row, then a delta link on the last page."""
        url = Query("opportunities", self._columns()).url(self.root)
        first = True
        while True:
            response = self._get("read", url, prefer=["odata.track-changes", *self._page_prefs()])
            body = self._json(response, "the opportunity change-tracking read")
            if first and "odata.track-changes" not in response.headers.get("Preference-Applied", ""):
                raise _TrackingUnavailable
            first = False
            rows = body.get("value") or []
            next_link, delta_link = body.get("@odata.nextLink"), body.get("@odata.deltaLink")
            # no $filter on tracking reads: the opt-in is checked on the rows themselves
            deals, failures = self._convert(rows, in_scope_check=True)
            # The initial load is resumable only as a whole: pages before the last carry None ("start
            # over"); the delta link on the last page is the first real cursor.
            cursor = _Cursor("delta", link=delta_link).encode() if delta_link else None
            yield ChangePage(deals, (), failures, cursor)
            if not next_link:
                if not delta_link:
                    raise FatalError("Dynamics ended a change-tracking read without a delta link")
                return
            url = _next(body, url)  # absolute: follow verbatim (page-results)

    def _delta(self, link: str, cursor: str | None) -> Iterator[ChangePage]:
        url = link
        while True:
            response = self._get("delta", url, prefer=["odata.track-changes", *self._page_prefs()])
            if response.status_code != 200:
                err = odata.parse_error(response.status_code, response.content)
                if EXPIRED_DELTA_TEXT.lower() in err.message.lower():
                    raise _TokenExpired
                raise self._error(response, "the opportunity delta read")
            body = response.json()
            changed, deleted = split_delta_entries(body.get("value") or [])
            deals, failures = self._convert(changed, in_scope_check=True)
            next_link, delta_link = body.get("@odata.nextLink"), body.get("@odata.deltaLink")
            # Mid-sequence pages keep the old cursor: re-reading from the old token is idempotent,
            # and a delta link is valid only once the whole sequence is applied.
            page_cursor = _Cursor("delta", link=delta_link).encode() if delta_link else cursor
            yield ChangePage(deals, tuple(deleted), failures, page_cursor)
            if not next_link:
                return
            url = _next(body, url)

    def _resync(self) -> Iterator[ChangePage]:
        """Full resync after the delta token expired.

        A new token is taken *before* the keyset read, so whatever changes while the resync runs is in
        the next delta; the keyset read by ``(modifiedon, opportunityid)`` never misses a row (a row
        modified meanwhile only moves forward). Deletes from the expired window cannot be listed: the
        ``full_resync`` pages together hold every opted-in opportunity, for reconciliation by absence."""
        link = self._fresh_delta_link()
        yield from self._keyset(_Cursor("resync", link=link), full=True)

    def _fresh_delta_link(self) -> str:
        url = Query("opportunities", self._columns()).url(self.root)
        while True:
            body = self._json(
                self._get("reseed", url, prefer=["odata.track-changes", "odata.maxpagesize=5000"]),
                "the opportunity change-tracking re-seed",
            )
            if body.get("@odata.nextLink"):
                url = _next(body, url)
                continue
            link = body.get("@odata.deltaLink")
            if not link:
                raise FatalError("Dynamics answered a change-tracking read without a delta link")
            return str(link)

    def _poll(self, state: _Cursor) -> Iterator[ChangePage]:
        if state.after is None and state.watermark is not None:
            # a new run: re-read the lookback window (late commits), dedupe downstream
            start = state.watermark - self.options.lookback
            yield from self._keyset(_Cursor("poll", watermark=state.watermark), full=False, since=start)
        else:
            yield from self._keyset(state, full=state.watermark is None)

    def _keyset(self, state: _Cursor, *, full: bool, since: datetime | None = None) -> Iterator[ChangePage]:
        """Pages ordered by ``(modifiedon, opportunityid)``, each query resuming after the last row
        read. Timestamps are second-granular and shared by many rows, hence the id tie-break
        (prior-art §5 class 1)."""
        after = state.after
        watermark = state.watermark
        while True:
            keyset = None
            if after is not None:
                ts, oid = after
                keyset = odata.gt("modifiedon", ts) | (
                    odata.eq("modifiedon", ts) & odata.gt("opportunityid", odata.Guid(oid))
                )
            flt = odata.all_of(
                self._opt_in_filter(), odata.ge("modifiedon", since) if since else None, keyset
            )
            q = Query(
                "opportunities", self._columns(), flt, (("modifiedon", False), ("opportunityid", False))
            )
            body = self._json(
                self._get("read", q.url(self.root), prefer=self._page_prefs()), "the opportunity read"
            )
            rows = body.get("value") or []
            deals, failures = self._convert(rows, in_scope_check=False)
            if rows:
                last = rows[-1]
                after = (_parse_dt(last["modifiedon"]), odata.guid(last["opportunityid"]))
                if watermark is None or after[0] > watermark:
                    watermark = after[0]
            more = bool(body.get("@odata.nextLink")) and bool(rows)
            if state.kind == "resync":
                cursor = (
                    _Cursor("resync", link=state.link, after=after)
                    if more
                    else _Cursor("delta", link=state.link)
                ).encode()
            else:
                cursor = _Cursor("poll", watermark=watermark, after=after if more else None).encode()
            yield ChangePage(deals, (), failures, cursor, full_resync=full)
            if not more:
                return

    def get(self, crm_ids: Sequence[str]) -> Sequence[Deal]:
        ids = [odata.guid(i) for i in dict.fromkeys(crm_ids)]
        rows: list[dict[str, Any]] = []
        queries = [
            (
                "opportunities",
                Query("opportunities", self._columns(), odata.in_("opportunityid", map(odata.Guid, chunk))),
            )
            for chunk in _chunks(ids, self.options.related_chunk)
        ]
        if queries:
            self._metadata()
            rows = self._batch_read(queries).get("opportunities", [])
        deals, _ = self._convert(rows, in_scope_check=False)
        return deals

    def find_by_referral(self, referral_ids: Sequence[str]) -> Mapping[str, Deal]:
        """Opportunities already carrying these referral ids (a create whose answer was lost)."""
        column = self.options.referral_id_field
        wanted = list(dict.fromkeys(referral_ids))
        if not column or not wanted:
            return {}
        queries = [
            ("opportunities", Query("opportunities", self._columns(), odata.in_(column, chunk)))
            for chunk in _chunks(wanted, self.options.related_chunk)
        ]
        self._metadata()
        rows = self._batch_read(queries).get("opportunities", [])
        deals, _ = self._convert(rows, in_scope_check=False)
        return {d.referral_id: d for d in deals if d.referral_id}

    def _read_all(self, operation: str, url: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while url:
            body = self._json(
                self._get(operation, url, prefer=["odata.maxpagesize=5000"]), f"the {operation} read"
            )
            out += body.get("value") or []
            url = _next(body, url)
        return out

    # --- related data, batched -------------------------------------------------------------------------

    def _batch_read(self, queries: Sequence[tuple[str, Query]]) -> dict[str, list[dict[str, Any]]]:
        """Run GET queries inside ``$batch`` requests (≤ 1,000 each); results merged per key.

        ``$batch`` also lifts the GET URL length limit, which long or-filters would otherwise hit
        (execute-batch-operations-using-web-api)."""
        out: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in queries}
        for chunk in _chunks(list(queries), odata.MAX_BATCH_REQUESTS):
            parts = [
                Part("GET", q.url(self.root), (*_READ_HEADERS.items(), ("Prefer", "odata.maxpagesize=5000")))
                for _, q in chunk
            ]
            results = self._send_batch(parts, "related-read")
            for (key, _), result in zip(chunk, results, strict=False):
                if not isinstance(result, odata.PartResponse) or not result.ok:
                    status = result.status if isinstance(result, odata.PartResponse) else 0
                    err = result.error() if isinstance(result, odata.PartResponse) else odata.ODataError(0)
                    if status == 429 or status >= 500:
                        retry = (
                            parse_retry_after(result.header("Retry-After"))
                            if isinstance(result, odata.PartResponse)
                            else None
                        )
                        raise RateLimited(
                            f"Dynamics throttled a related read ({err})", system=SYSTEM, retry_after=retry
                        )
                    raise FatalError(f"Dynamics related read of {key} failed ({err})")
                body = result.json() or {}
                out[key] += body.get("value") or []
                if body.get("@odata.nextLink"):
                    out[key] += self._read_all(key, body["@odata.nextLink"])
            if len(results) < len(chunk):
                raise FatalError("Dynamics answered a read batch with fewer responses than requests")
        return out

    def _send_batch(
        self, items: Sequence[odata.BatchItem], operation: str, *, continue_on_error: bool = False
    ) -> list[odata.BatchResult]:
        body, content_type = odata.encode_batch(items)
        headers = {**_WRITE_HEADERS, "Content-Type": content_type}
        if continue_on_error:
            headers["Prefer"] = "odata.continue-on-error"
        response = self.session.request(
            operation, "POST", f"{self.root}$batch", headers=headers, content=body
        )
        if response.status_code != 200:
            raise self._error(response, f"a $batch ({operation})")
        return odata.decode_batch_response(response.content, response.headers.get("Content-Type", ""))

    def _related(
        self, rows: Sequence[Mapping[str, Any]], in_scope_check: bool
    ) -> dict[str, list[dict[str, Any]]]:
        """Level 1: rows referenced from the opportunities; level 2: rows referenced from level 1."""
        o = self.options
        ids = [r["opportunityid"] for r in rows]
        accounts = _distinct(
            v for r in rows for v in (r.get("_parentaccountid_value"), r.get("_customerid_value"))
        )
        contacts = _distinct(r.get("_parentcontactid_value") for r in rows)
        currencies = _distinct(
            r.get("_transactioncurrencyid_value")
            for r in rows
            if r.get("_transactioncurrencyid_value") not in self._currencies
        )
        users = _distinct(r.get(f) for r in rows for f in o.team_fields) if o.team_source == "fields" else []
        level1: list[tuple[str, Query]] = []
        level1 += self._by_ids(
            "accounts",
            "accountid",
            accounts,
            (
                "name",
                "address1_line1",
                "address1_line2",
                "address1_city",
                "address1_stateorprovince",
                "address1_postalcode",
                "address1_country",
            ),
        )
        level1 += self._by_ids(
            "contacts",
            "contactid",
            contacts,
            ("firstname", "lastname", "emailaddress1", "telephone1", "jobtitle"),
        )
        level1 += self._by_ids(
            "transactioncurrencies", "transactioncurrencyid", currencies, ("isocurrencycode",)
        )
        level1 += self._by_ids("systemusers", "systemuserid", users, _USER_COLUMNS)
        if o.solutions_source == "opportunityproduct":
            level1 += self._by_ids(
                "opportunityproducts",
                "_opportunityid_value",
                ids,
                ("_opportunityid_value", "_productid_value", "productdescription"),
            )
        if o.team_source == "connections":
            level1 += self._by_ids(
                "connections",
                "_record1id_value",
                ids,
                ("_record1id_value", "_record2id_value", "record2objecttypecode", "_record2roleid_value"),
            )
        if o.stage_source == "bpf":
            level1 += self._by_ids(
                o.bpf_entity_set,
                "_opportunityid_value",
                ids,
                ("_opportunityid_value", "_activestageid_value", "_processid_value"),
                key="bpf",
            )
        if in_scope_check and o.opt_in_filter:
            # Tracking reads cannot carry $filter (change-tracking docs): check the opt-in filter for the
            # changed rows in the same batch instead.
            optin = Filter.trusted(o.opt_in_filter)
            level1 += [
                (
                    "in_scope",
                    Query(
                        "opportunities",
                        ("opportunityid",),
                        optin & odata.in_("opportunityid", map(odata.Guid, c)),
                    ),
                )
                for c in _chunks(ids, o.related_chunk)
            ]
        found = self._batch_read(level1) if level1 else {}
        for cur in found.get("transactioncurrencies", []):
            self._currencies[cur["transactioncurrencyid"]] = str(cur.get("isocurrencycode") or "")
        level2: list[tuple[str, Query]] = []
        products = _distinct(p.get("_productid_value") for p in found.get("opportunityproducts", []))
        level2 += self._by_ids("products", "productid", products, ("name", "productnumber"))
        if o.team_source == "connections":
            roles = set(o.connection_roles)
            conns = [
                c for c in found.get("connections", [])
                if c.get("record2objecttypecode") == 8 and (not roles or c.get("_record2roleid_value") in roles)
            ]  # fmt: skip
            found["connections"] = conns
            level2 += self._by_ids(
                "systemusers",
                "systemuserid",
                _distinct(c.get("_record2id_value") for c in conns),
                _USER_COLUMNS,
            )
        if level2:
            for key, values in self._batch_read(level2).items():
                found.setdefault(key, []).extend(values)
        return found

    def _by_ids(
        self,
        entity_set: str,
        column: str,
        ids: Sequence[str],
        select: Sequence[str],
        *,
        key: str | None = None,
    ) -> list[tuple[str, Query]]:
        key_select = tuple(dict.fromkeys((_KEYS.get(entity_set, column), *select)))
        return [
            (key or entity_set, Query(entity_set, key_select, odata.in_(column, map(odata.Guid, chunk))))
            for chunk in _chunks([i for i in ids if odata.is_guid(i)], self.options.related_chunk)
        ]

    # --- conversion ----------------------------------------------------------------------------------

    def _convert(
        self, rows: Sequence[Mapping[str, Any]], *, in_scope_check: bool
    ) -> tuple[list[Deal], list[RecordFailure]]:
        o = self.options
        if in_scope_check and o.opt_in_field:
            rows = [r for r in rows if r.get(o.opt_in_field) is True]
        if not rows:
            return [], []
        found = self._related(rows, in_scope_check)
        if in_scope_check and o.opt_in_filter:
            keep = {r["opportunityid"] for r in found.get("in_scope", [])}
            rows = [r for r in rows if r["opportunityid"] in keep]
        ctx = _Related.build(found, self._currencies)
        meta = self._metadata()
        deals: list[Deal] = []
        failures: list[RecordFailure] = []
        for row in rows:
            rid = str(row.get("opportunityid", ""))
            try:
                deals.append(self._deal(row, ctx, meta))
            except (ValueError, TypeError, KeyError, InvalidOperation) as exc:
                # The message names the rule broken, never the offending value (it may be contact data).
                failures.append(RecordFailure(rid, "convert", f"{type(exc).__name__}: {exc}"[:300]))
        return deals, failures

    def _stage_label(self, row: Mapping[str, Any], ctx: _Related, meta: _Metadata) -> str | None:
        state, status, sales = (
            _int(row.get("statecode")),
            _int(row.get("statuscode")),
            _int(row.get("salesstage")),
        )
        if state in (STATE_WON, STATE_LOST) and status is not None and status in meta.statuscode:
            return meta.statuscode[status][0]
        src = self.options.stage_source
        if src == "salesstage":
            return meta.salesstage.get(sales) if sales is not None else None
        if src == "statuscode":
            return meta.statuscode[status][0] if status is not None and status in meta.statuscode else None
        stage_id = ctx.bpf.get(str(row.get("opportunityid")))
        return meta.bpf_stages[stage_id][0] if stage_id is not None and stage_id in meta.bpf_stages else None

    def _deal(self, row: Mapping[str, Any], ctx: _Related, meta: _Metadata) -> Deal:
        o = self.options
        rid = odata.guid(row["opportunityid"])
        name = str(row.get("name") or "").strip()
        if not name:
            raise ValueError("the opportunity has no name (Topic)")
        state = int(row.get("statecode") or 0)
        status, substatus = {
            STATE_WON: (Status.CLOSED, Substatus.WON),
            STATE_LOST: (Status.CLOSED, Substatus.LOST),
        }.get(state, (Status.ACTIVE, Substatus.ACCEPTED))
        stage: StandardStage | None = None
        label = self._stage_label(row, ctx, meta)
        if self.stage_mapping is not None and label is not None:
            try:
                target = self.stage_mapping.resolve(label, row.get("closeprobability")).target
                stage = target.stage if target.outcome is not Outcome.LOST else None
            except RecordError:
                log.warning("dynamics.stage_unmapped", crm_id=rid, stage=label)
        value = None
        if row.get("estimatedvalue") is not None:
            code = self._currencies.get(str(row.get("_transactioncurrencyid_value")), "")
            if code in ISO_4217:
                value = Money(Decimal(str(row["estimatedvalue"])), code)
            else:
                log.warning("dynamics.currency_unknown", crm_id=rid)
        reason = _int(row.get("statuscode"))
        status_reason = None
        if state != STATE_OPEN and reason is not None and reason in meta.statuscode:
            status_reason = meta.statuscode[reason][0]
        etag = row.get("@odata.etag")
        modified = _parse_dt(row["modifiedon"]) if row.get("modifiedon") else None
        crm_stage = (
            CrmStageInfo(
                label,
                probability=_int(row.get("closeprobability")),
                modified=modified,
                lost_reason=status_reason if state == STATE_LOST else None,
            )
            if label is not None
            else None
        )
        return Deal(
            name=name,
            direction=o.direction,
            deal_type=o.deal_type,
            status=status,
            substatus=substatus,
            referral_id=(str(row.get(o.referral_id_field) or "") or None) if o.referral_id_field else None,
            crm_id=rid,
            sales_stage=stage,
            customer=self._customer(row, ctx, rid),
            customer_contact=ctx.contacts.get(str(row.get("_parentcontactid_value"))),
            value=value,
            close_date=_date(row.get("estimatedclosedate")),
            notes=str(row.get("description") or ""),
            status_reason=status_reason or None,
            team=self._team(row, ctx),
            solutions=self._solutions(row, ctx),
            created_at=_parse_dt(row["createdon"]) if row.get("createdon") else None,
            updated_at=modified,
            version=VersionTag(SYSTEM, str(etag)) if etag else None,
            crm_stage=crm_stage,
        )

    def _customer(self, row: Mapping[str, Any], ctx: _Related, rid: str) -> Customer | None:
        account = ctx.accounts.get(str(row.get("_parentaccountid_value"))) or ctx.accounts.get(
            str(row.get("_customerid_value"))
        )
        if account is None or not str(account.get("name") or "").strip():
            return None
        country = self._country(account.get("address1_country"))
        if country is None:
            log.warning("dynamics.customer_country_unknown", crm_id=rid)
            return None
        address = Address(
            country=country,
            line1=str(account.get("address1_line1") or ""),
            line2=str(account.get("address1_line2") or ""),
            city=str(account.get("address1_city") or ""),
            state=str(account.get("address1_stateorprovince") or ""),
            postal_code=str(account.get("address1_postalcode") or ""),
        )
        return Customer(str(account["name"]).strip(), address)

    def _country(self, text: Any) -> str | None:
        if not text:
            return None
        raw = str(text).strip()
        if raw.upper() in ISO_3166_ALPHA2:
            return raw.upper()
        key = raw.casefold()
        custom = {k.casefold(): v for k, v in self.options.country_names.items()}
        return custom.get(key) or COUNTRY_NAMES.get(key)

    def _team(self, row: Mapping[str, Any], ctx: _Related) -> tuple[Contact, ...]:
        o = self.options
        if o.team_source == "fields":
            ids = [str(row.get(f)) for f in o.team_fields if row.get(f)]
        elif o.team_source == "connections":
            ids = ctx.connections.get(str(row["opportunityid"]), [])
        else:
            return ()
        members = [ctx.users[i] for i in dict.fromkeys(ids) if i in ctx.users]
        return tuple(members)

    def _solutions(self, row: Mapping[str, Any], ctx: _Related) -> tuple[Solution, ...]:
        o = self.options
        if o.solutions_source == "field" and o.solutions_field:
            raw = str(row.get(o.solutions_field) or "")
            ids = [s.strip() for s in raw.replace(";", ",").split(",") if s.strip()]
            return tuple(Solution(o.solution_kind, i) for i in dict.fromkeys(ids))
        if o.solutions_source != "opportunityproduct":
            return ()
        out: dict[str, Solution] = {}
        for line in ctx.lines.get(str(row["opportunityid"]), []):
            product = ctx.products.get(str(line.get("_productid_value")))
            if product is not None:
                sid = str(product.get("productnumber") or product.get("name") or "").strip()
                name = str(product.get("name") or "")
            else:  # a write-in product: its description is all there is
                sid = str(line.get("productdescription") or "").strip()
                name = sid
            if sid:
                out.setdefault(sid, Solution(o.solution_kind, sid, name))
        return tuple(out.values())

    # --- writes ------------------------------------------------------------------------------------

    def apply(self, changes: Sequence[CrmChange]) -> Sequence[WriteResult]:
        """Canonical changes mapped onto Dataverse columns, then written like :meth:`write`.

        A closed stage label becomes the Win/Lose action with that status reason; team and solution
        changes are not written to Dynamics yet (reported in ``WriteResult.extra["skipped"]``)."""
        planned: list[tuple[int, CrmWrite, list[str]]] = []
        results: list[WriteResult | None] = [None] * len(changes)
        for i, change in enumerate(changes):
            try:
                w, skipped = self._to_write(change)
                planned.append((i, w, skipped))
            except (RecordError, ValueError) as exc:
                cause = exc.cause if isinstance(exc, RecordError) else "invalid-change"
                results[i] = WriteResult(
                    change.key or change.crm_id or f"new-{i}", False, change.crm_id, cause, str(exc)
                )
        written = self.write([w for _, w, _ in planned])
        for (i, _, skipped), result in zip(planned, written, strict=True):
            if skipped:
                result = replace(result, extra={**result.extra, "skipped": skipped})
            results[i] = result
        return [r for r in results if r is not None]

    def _to_write(self, change: CrmChange) -> tuple[CrmWrite, list[str]]:
        o = self.options
        f = dict(change.fields)
        values: dict[str, object] = {}
        direct = {
            "name": "name",
            "value": "estimatedvalue",
            "close_date": "estimatedclosedate",
            "notes": "description",
        }
        for canonical, column in direct.items():
            if canonical in f:
                values[column] = f.pop(canonical)
        if values.get("estimatedvalue") is not None:
            # canonical amounts are exact decimal strings; the money column is an Edm.Decimal number
            values["estimatedvalue"] = Decimal(str(values["estimatedvalue"]))
        if "currency" in f:
            values["transactioncurrencyid@odata.bind"] = (
                f"/transactioncurrencies({self._currency_id(str(f.pop('currency')))})"
            )
        if change.stage is not None:
            values.update(self._stage_values(change.stage, change.crm_id))
        extras = {
            "referral_link": change.referral_link,
            "sync_status": change.sync_status,
            "audit_line": change.audit_line,
            "synced_at": change.synced_at,
            "campaign_id": f.pop("campaign_id", None),
        }
        for name, value in extras.items():
            if value is not None and name in o.bookkeeping:
                values[o.bookkeeping[name]] = value
        if change.referral_id is not None and o.referral_id_field:
            values[o.referral_id_field] = change.referral_id
        if change.crm_id is None and o.opt_in_field:
            # an opportunity created for a referral is in sync from birth: without the flag the seller's
            # accept or decline in the CRM would never be read back
            values[o.opt_in_field] = True
        skipped = sorted(f)  # team, solutions and anything else without a Dynamics column
        return CrmWrite(change.crm_id, values, based_on=change.based_on, idempotency_key=change.key), skipped

    def _stage_values(self, label: str, crm_id: str | None) -> dict[str, object]:
        meta = self._metadata()
        norm = " ".join(label.split()).casefold()

        def same(text: str) -> bool:
            return " ".join(text.split()).casefold() == norm

        for value, (text, state) in sorted(meta.statuscode.items()):
            if same(text) and state in (STATE_WON, STATE_LOST):
                return {"statecode": state, "statuscode": value}  # closed: becomes the action
        src = self.options.stage_source
        if src == "salesstage":
            for value, text in meta.salesstage.items():
                if same(text):
                    return {"salesstage": value}
        elif src == "statuscode":
            for value, (text, state) in meta.statuscode.items():
                if same(text) and state == STATE_OPEN:
                    return {"statuscode": value}
        else:
            raise RecordError(
                "setting a business process flow stage is not supported yet; set it in Dynamics",
                record_id=crm_id or "",
                cause="stage-unsupported",
            )
        raise RecordError(
            f"{label!r} is not a stage of this Dynamics org", record_id=crm_id or "", cause="stage-unmapped"
        )

    def _currency_id(self, code: str) -> str:
        if code not in self._currencies.values():
            q = Query("transactioncurrencies", ("transactioncurrencyid", "isocurrencycode"))
            for row in self._read_all("currencies", q.url(self.root)):
                self._currencies[row["transactioncurrencyid"]] = str(row.get("isocurrencycode") or "")
        for cid, iso in self._currencies.items():
            if iso == code:
                return cid
        raise RecordError(f"currency {code} is not enabled in this Dynamics org", cause="currency-unknown")

    def write(self, writes: Sequence[CrmWrite]) -> Sequence[WriteResult]:
        """Each write is one change set; change sets go in ``$batch`` requests with
        ``odata.continue-on-error`` so a failure stays with its record (results in request order)."""
        results: list[WriteResult | None] = [None] * len(writes)
        planned: list[tuple[int, ChangeSet, bool]] = []  # (index, change set, closes)
        counter = iter(range(1, 10**9))
        for i, w in enumerate(writes):
            try:
                cs, closes = self._plan(w, counter)
                planned.append((i, cs, closes))
            except (RecordError, ValueError, TypeError) as exc:
                cause = exc.cause if isinstance(exc, RecordError) else "invalid-write"
                results[i] = WriteResult(_key(w, i), False, w.crm_id, error_code=cause, message=str(exc))
        batches = _chunks(planned, self.options.write_batch_size)
        workers = max(1, min(self.options.max_concurrency, len(batches)))
        if batches:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dynamics-write") as pool:
                for batch, outcome in zip(batches, pool.map(self._write_batch, batches), strict=True):
                    for (i, _, closes), result in zip(batch, outcome, strict=True):
                        results[i] = self._result(writes[i], i, result, closes)
        return [r for r in results if r is not None]

    def _write_batch(
        self, batch: Sequence[tuple[int, ChangeSet, bool]]
    ) -> list[odata.BatchResult | Exception | None]:
        try:
            answers: list[odata.BatchResult | Exception | None] = list(
                self._send_batch([cs for _, cs, _ in batch], "write", continue_on_error=True)
            )
        except (RetryLater, ConfigError, FatalError) as exc:
            return [exc] * len(batch)
        return answers + [None] * (len(batch) - len(answers))

    def _plan(self, w: CrmWrite, counter: Iterator[int]) -> tuple[ChangeSet, bool]:
        values = dict(w.values)
        state = values.pop("statecode", None)
        status = values.pop("statuscode", None)
        close = values.pop("opportunityclose", None)
        closes = state in (STATE_WON, STATE_LOST)
        if state is not None and state not in (STATE_OPEN, STATE_WON, STATE_LOST):
            raise RecordError(
                f"statecode {state!r} is not Open (0), Won (1) or Lost (2)",
                record_id=w.crm_id or "",
                cause="invalid-state",
            )
        if close is not None and not closes:
            raise RecordError(
                "close details without statecode Won or Lost", record_id=w.crm_id or "", cause="invalid-state"
            )
        payload = {k: _jsonable(v) for k, v in values.items()}
        for k in payload:
            odata.prop(k.removesuffix("@odata.bind"))
        if state == STATE_OPEN:
            payload["statecode"] = STATE_OPEN  # reopening: statuscode goes with statecode (crm-apis.md §B.3)
            if status is not None:
                payload["statuscode"] = status
        elif status is not None and not closes:
            payload["statuscode"] = status
        parts: list[Part] = []
        cid = str(next(counter))
        if w.crm_id is None:
            parts.append(
                Part.json(
                    "POST",
                    f"{self.root}opportunities?$select=opportunityid",
                    payload,
                    headers={**_WRITE_HEADERS, "Prefer": "return=representation"},
                    content_id=cid,
                )
            )
            target = f"${cid}"
        else:
            oid = odata.guid(w.crm_id)
            target = f"{self.root}opportunities({oid})"
            if payload or not closes:
                # If-Match: the version read, or "*" so an update never silently creates a row.
                parts.append(
                    Part.json(
                        "PATCH",
                        f"{target}?$select=opportunityid",
                        payload,
                        content_id=cid,
                        headers={
                            **_WRITE_HEADERS,
                            "If-Match": w.based_on or "*",
                            "Prefer": "return=representation",
                        },
                    )
                )
            target = f"/opportunities({oid})"
        if closes:
            parts.append(self._close_part(w, int(state), status, close, target, str(next(counter))))  # type: ignore[arg-type]
        return ChangeSet(tuple(parts)), closes

    def _close_part(self, w: CrmWrite, state: int, status: Any, close: Any, target: str, cid: str) -> Part:
        """``WinOpportunity`` / ``LoseOpportunity``: the only way to close an opportunity.
        https://learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/winopportunity"""
        meta = self._metadata()
        default = {STATE_WON: 3, STATE_LOST: 4}[state]
        code = default if status is None else status
        if not isinstance(code, int) or meta.statuscode.get(code, ("", -1))[1] != state:
            valid = ", ".join(f"{v} {lab}" for v, (lab, st) in sorted(meta.statuscode.items()) if st == state)
            raise RecordError(
                f"status reason {code!r} is not a {'Won' if state == STATE_WON else 'Lost'} status in this org (valid: {valid})",
                record_id=w.crm_id or "",
                cause="invalid-status",
            )
        details = dict(close or {})
        unknown = set(details) - {"subject", "actualrevenue", "actualend", "description"}
        if unknown:
            raise RecordError(
                f"unknown close detail(s) {', '.join(sorted(unknown))}",
                record_id=w.crm_id or "",
                cause="invalid-write",
            )
        details.setdefault("subject", "Won (co-sell)" if state == STATE_WON else "Lost (co-sell)")
        body = {
            "Status": code,
            "OpportunityClose": {
                **{k: _jsonable(v) for k, v in details.items()},
                "opportunityid@odata.bind": target,
            },
        }
        action = "WinOpportunity" if state == STATE_WON else "LoseOpportunity"
        return Part.json("POST", f"{self.root}{action}", body, headers=_WRITE_HEADERS, content_id=cid)

    def _result(
        self, w: CrmWrite, i: int, answer: odata.BatchResult | Exception | None, closes: bool
    ) -> WriteResult:
        key = _key(w, i)
        if answer is None:
            return WriteResult(
                key,
                False,
                w.crm_id,
                error_code="not-attempted",
                message="the batch stopped before this record",
            )
        if isinstance(answer, Exception):
            code = "retry-later" if isinstance(answer, RetryLater) else "batch-failed"
            return WriteResult(key, False, w.crm_id, error_code=code, message=str(answer))
        if isinstance(answer, odata.ChangeSetResponse) and answer.ok:
            first = answer.responses[0] if answer.responses else None
            crm_id = w.crm_id
            version = None
            if first is not None:
                ref = odata.entity_id_from_url(first.header("OData-EntityId") or "")
                crm_id = ref[1] if ref else crm_id
                body = first.json() if first.body else None
                if isinstance(body, dict):
                    crm_id = str(body.get("opportunityid") or crm_id)
                    # after a close action the version moved again: the engine must re-read it
                    version = None if closes else body.get("@odata.etag")
            return WriteResult(key, True, crm_id, new_version=version)
        failed = (
            answer
            if isinstance(answer, odata.PartResponse)
            else next(r for r in answer.responses if not r.ok)
        )
        err = failed.error()
        if failed.status == 412:
            # Someone changed the record since we read it: merge, never overwrite blindly.
            return WriteResult(
                key, False, w.crm_id, error_code="conflict", message=err.message, conflict=True
            )
        code = {404: "not-found", 429: "throttled"}.get(failed.status, err.code or f"http-{failed.status}")
        extra: dict[str, object] = {"status": failed.status}
        if failed.status == 429:
            extra["retry_after"] = parse_retry_after(failed.header("Retry-After"))
        return WriteResult(key, False, w.crm_id, error_code=code, message=err.message, extra=extra)


# --- helpers -------------------------------------------------------------------------------------

_USER_COLUMNS = (
    "firstname",
    "lastname",
    "internalemailaddress",
    "address1_telephone1",
    "mobilephone",
    "title",
)
_KEYS = {
    "accounts": "accountid", "contacts": "contactid", "systemusers": "systemuserid",
    "transactioncurrencies": "transactioncurrencyid", "products": "productid",
    "opportunityproducts": "opportunityproductid", "connections": "connectionid",
    "opportunities": "opportunityid", "opportunitysalesprocesses": "businessprocessflowinstanceid",
}  # fmt: skip


@dataclass(frozen=True)
class _Related:
    accounts: Mapping[str, Mapping[str, Any]]
    contacts: Mapping[str, Contact]
    users: Mapping[str, Contact]
    lines: Mapping[str, list[Mapping[str, Any]]]
    products: Mapping[str, Mapping[str, Any]]
    connections: Mapping[str, list[str]]
    bpf: Mapping[str, str]

    @classmethod
    def build(cls, found: Mapping[str, list[dict[str, Any]]], currencies: Mapping[str, str]) -> _Related:
        lines: dict[str, list[Mapping[str, Any]]] = {}
        for line in found.get("opportunityproducts", []):
            lines.setdefault(str(line.get("_opportunityid_value")), []).append(line)
        conns: dict[str, list[str]] = {}
        for c in found.get("connections", []):
            conns.setdefault(str(c.get("_record1id_value")), []).append(str(c.get("_record2id_value")))
        bpf = {
            str(r.get("_opportunityid_value")): str(r.get("_activestageid_value"))
            for r in found.get("bpf", [])
        }
        return cls(
            accounts={a["accountid"]: a for a in found.get("accounts", [])},
            contacts={
                c["contactid"]: k
                for c in found.get("contacts", [])
                if (k := _person(c, "emailaddress1", ("telephone1",), "jobtitle"))
            },
            users={
                u["systemuserid"]: k
                for u in found.get("systemusers", [])
                if (k := _person(u, "internalemailaddress", ("address1_telephone1", "mobilephone"), "title"))
            },
            lines=lines,
            products={p["productid"]: p for p in found.get("products", [])},
            connections=conns,
            bpf=bpf,
        )


def _person(row: Mapping[str, Any], email: str, phones: Sequence[str], title: str) -> Contact | None:
    first, last = str(row.get("firstname") or ""), str(row.get("lastname") or "")
    if not (first or last):
        return None
    try:
        return Contact(
            first,
            last,
            email=str(row.get(email) or ""),
            phone=next((str(row[p]) for p in phones if row.get(p)), ""),
            title=str(row.get(title) or ""),
        )
    except ValueError:
        # a malformed e-mail address: keep the person without it rather than drop the deal
        return Contact(first, last, phone=next((str(row[p]) for p in phones if row.get(p)), ""))


def _distinct(values: Any) -> list[str]:
    return [str(v).lower() for v in dict.fromkeys(v for v in values if v)]


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def split_delta_entries(entries: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Changed rows and deleted ids of a delta page. Deletes come as ``$deletedEntity`` entries
    (``{"@odata.context": ".../$deletedEntity", "id", "reason": "deleted"}``), or in OData's
    ``@removed`` form; both are accepted."""
    changed: list[dict[str, Any]] = []
    deleted: list[str] = []
    for entry in entries:
        if str(entry.get("@odata.context", "")).endswith("$deletedEntity") or "@removed" in entry:
            rid = entry.get("id") or entry.get("opportunityid")
            if rid:
                deleted.append(str(rid).lower())
        else:
            changed.append(dict(entry))
    return changed, deleted


def _next(body: Mapping[str, Any], current: str) -> str:
    """The next link, absolute and followed verbatim; a link back to the same page would loop forever."""
    link = str(body.get("@odata.nextLink") or "")
    if link and link == current:
        raise FatalError("Dynamics returned a next link to the page just read")
    return link


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _date(value: Any) -> date | None:
    if not value:
        return None
    return date.fromisoformat(str(value)[:10])


def _key(w: CrmWrite, i: int) -> str:
    return w.idempotency_key or w.crm_id or f"new-{i}"


def _jsonable(value: Any) -> Any:
    """A JSON-ready value: Decimal as a number, dates ISO, datetimes aware UTC, enums by value."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("a non-finite number cannot be written")
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("a non-finite number cannot be written")
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError("datetimes written to Dynamics must be timezone-aware")
        return _iso(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    json.dumps(value)  # raises TypeError for anything else
    return value


# --- construction ---------------------------------------------------------------------------------


def dataverse_signin(
    crm: DynamicsCrm, ca_bundle: Path | None, *, http: httpx.Client | None = None
) -> ClientCredentials:
    """Client-credentials sign-in for the environment's application user (crm-apis.md §C):
    scope ``<org>/.default``, the configured authority (default: the tenant's Entra ID), a secret or a
    certificate."""
    from connector.remote.signin import ClientCredentials  # msal is imported only when signing in

    auth = crm.auth
    authority = (auth.authority or f"https://login.microsoftonline.com/{auth.tenant_id}").rstrip("/")
    secret = read_secret(auth.client_secret, auth.client_secret_file, "client_secret")
    key = None
    if secret is None and auth.private_key_file is not None:
        try:
            key = auth.private_key_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the Dynamics private key file: {exc.strerror}") from None
    if secret is None and key is None:
        raise ConfigError("Dynamics sign-in needs auth.client_secret (environment) or a certificate key file")
    return ClientCredentials(
        authority=authority,
        client_id=auth.client_id,
        scopes=[f"{crm.base_url.rstrip('/')}/.default"],
        http=http or http_client(ca_bundle),
        secret=secret,
        private_key_pem=key,
        thumbprint=auth.certificate_thumbprint,
    )


def build_adapter(
    crm: DynamicsCrm,
    *,
    tokens: TokenProvider,
    ca_bundle: Path | None,
    calls: CallCounter | None = None,
    policy: RetryPolicy | None = None,
    stage_mapping: StageMapping | None = None,
    now: Callable[[], datetime] | None = None,
    **overrides: Any,
) -> DynamicsAdapter:
    """The adapter for one configured environment, on the shared HTTP plumbing."""
    options = DynamicsOptions.from_settings(crm, **overrides)
    session = ApiSession(SYSTEM, http_client(ca_bundle), tokens=tokens, policy=policy, calls=calls)
    return DynamicsAdapter(options, session, stage_mapping=stage_mapping, now=now)


def _satisfies_the_seam(adapter: DynamicsAdapter) -> CrmAdapter:
    return adapter  # mypy proves the adapter implements connector.seams.CrmAdapter
