"""The connector's one door to Partner Center: the Referrals API over httpx, as a ReferralStore.

Built on the shared plumbing (:class:`~connector.remote.session.ApiSession`: bearer token, one refresh
on 401, tenacity retries on 429/5xx honouring ``Retry-After``, call counting). This module adds what
is specific to Partner Center (partner-center-api.md; public pages in its §0):

- headers (§3): ``MS-CorrelationId`` once per client (= per sync run), ``MS-RequestId`` once per
  logical operation and therefore identical on every retry of it;
- statuses (§4): 409/412 → :class:`ConflictError`, 400 → :class:`RecordError` with status, Request-ID
  and the first KB of the body, 401 after the refresh → :class:`SignInRequired`, 403 → a configuration
  (permission) error, 404 → :class:`RecordError`;
- paging (§2.2): follow ``@odata.nextLink`` page by page; a link not on our base URL is not followed —
  the original request is re-issued on our base URL with only its ``$skiptoken``; never plain http;
- incremental listing (§2.1): ``$filter=updatedDateTime ge <watermark - lookback>`` ordered ascending,
  the watermark being the server's largest ``updatedDateTime``; if the service refuses that filter
  (it is undocumented) the client falls back, once and for the client's life, to a descending scan
  that stops at the first record older than the window;
- creates whose earlier outcome is unknown look the referral up by ``externalReferenceId`` first
  (§3: de-duplication on ``MS-RequestId`` is undocumented);
- the co-sell rules (:mod:`connector.domain.rules`) refuse, before any request, what must not be sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import functools
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import structlog
from pydantic import ValidationError

from connector.domain.model import Deal
from connector.domain.rules import check_create, check_update, enforce
from connector.errors import (
    ConfigError,
    ConflictError,
    FatalError,
    RateLimited,
    RecordError,
    RetryLater,
    SignInRequired,
)
from connector.partner_center.convert import (
    SYSTEM,
    StageFormat,
    create_request_body,
    patch_operations,
    referral_to_deal,
)
from connector.partner_center.models import (
    Referral,
    format_utc,
    parse_utc,
    utc_ticks,
)
from connector.remote.calls import CallCounter
from connector.remote.http import USER_AGENT, http_client, json_bytes
from connector.remote.retry import RetryPolicy
from connector.remote.session import ApiSession
from connector.remote.tokens import TokenProvider
from connector.seams import ChangePage, Listed, RecordFailure, ReferralStore
from connector.settings import Settings

__all__ = ["PartnerCenterClient", "PartnerCenterPermissionError", "ReferralPage"]

log = structlog.get_logger(__name__)
_BODY_KEPT = 1024  # bytes of an error body kept in the error (format undocumented, §4)


class PartnerCenterPermissionError(ConfigError):
    """403: signed in, but the user lacks the role or location scope (partner-center-api.md §9)."""


@dataclass(frozen=True, slots=True)
class ReferralPage:
    """One page of a listing: parsed referrals, the raw items that did not parse, and the link on."""

    referrals: tuple[Referral, ...]
    failures: tuple[RecordFailure, ...]
    next_link: str | None
    #: largest server ``updatedDateTime`` on the page (raw text), parse failures included
    max_updated: str | None
    #: the server's clock (HTTP ``Date``) when the listing's first page was answered
    listing_started: str | None = None


@dataclass(frozen=True)
class _RawPage:
    """One page of a listing as it came: its items not yet validated."""

    items: list[Any]
    next_link: str | None
    listing_started: str | None

    @property
    def max_updated(self) -> str | None:
        """The largest server ``updatedDateTime`` on the page (raw text); malformed ones skipped."""
        newest: str | None = None
        for item in self.items:
            raw = item.get("updatedDateTime") if isinstance(item, dict) else None
            if isinstance(raw, str):
                with contextlib.suppress(ValueError):  # the item is reported unreadable when read
                    newest = _later(newest, raw)
        return newest


def _odata_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _later(a: str | None, b: str | None) -> str | None:
    """The later of two server timestamps (exact to 100 ns); raises ValueError for a malformed ``b``."""
    if b is None:
        return a
    b_ticks = utc_ticks(b)
    return a if a is not None and utc_ticks(a) >= b_ticks else b


class PartnerCenterClient:
    """Referrals API client implementing :class:`~connector.seams.ReferralStore`."""

    def __init__(
        self,
        session: ApiSession,
        *,
        base_url: str,
        stage_format: StageFormat = "percent_string",
        page_size: int = 100,
        lookback: timedelta = timedelta(minutes=5),
        allow_backward_stages: bool = False,
        patch_name: bool = False,
        correlation_id: str | None = None,
    ) -> None:
        if urlsplit(base_url).scheme != "https":
            raise ConfigError(f"partner_center.base_url must be https (got {base_url})")
        self.session = session
        # Creates are sent by a one-shot twin of the session: the retry loop is ours (see create()).
        self._once = ApiSession(
            session.system,
            session.http,
            tokens=session.tokens,
            policy=dataclasses.replace(session.policy, max_attempts=1),
            calls=session.calls,
        )
        self.base_url = base_url.rstrip("/")
        self.referrals_url = f"{self.base_url}/engagements/referrals"
        self.stage_format: StageFormat = stage_format
        self.page_size = page_size
        self.lookback = lookback
        self.allow_backward_stages = allow_backward_stages
        self.patch_name = patch_name
        self.correlation_id = correlation_id or str(uuid.uuid4())
        #: None until the first incremental listing tells whether `updatedDateTime` filters work
        self.updated_filter_supported: bool | None = None
        self._owned: list[Any] = []  # what from_settings built for us and close() must close

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        connection: str,
        *,
        tokens: TokenProvider | None = None,
        calls: CallCounter | None = None,
        policy: RetryPolicy | None = None,
        correlation_id: str | None = None,
    ) -> PartnerCenterClient:
        """A client for one configured connection, signed in from its persisted msal cache.

        Builds nothing and writes nothing until the first request (sign-in problems surface there).
        """
        conn = settings.connection(connection)
        pc = conn.partner_center
        owned: list[Any] = []
        if tokens is None:
            from connector.remote.signin import partner_center_signin

            tokens = partner_center_signin(settings, connection)
            owned.append(tokens)
        session = ApiSession(
            SYSTEM, http_client(settings.tls.ca_bundle), tokens=tokens, policy=policy, calls=calls
        )
        client = cls(
            session,
            base_url=pc.base_url,
            stage_format=pc.sales_stage_format,
            page_size=pc.page_size,
            lookback=pc.lookback,
            allow_backward_stages=conn.policy.allow_backward_stages,
            patch_name=pc.patch_name,
            correlation_id=correlation_id,
        )
        client._owned = owned
        return client

    @property
    def calls(self) -> CallCounter:
        return self.session.calls

    def close(self) -> None:
        self.session.http.close()
        for owned in self._owned:
            owned.close()

    def __enter__(self) -> PartnerCenterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------------------
    def _headers(self, request_id: str, *, write: bool = False) -> dict[str, str]:
        headers = {
            "Accept": "application/json",
            "MS-CorrelationId": self.correlation_id,
            "MS-RequestId": request_id,
            "MS-PartnerCenter-Application": USER_AGENT,
        }
        if write:
            # Docs and Swagger send PATCH as application/json, not json-patch+json (§2).
            headers["Content-Type"] = "application/json"
        return headers

    def _check(
        self,
        response: httpx.Response,
        operation: str,
        record_id: str,
        *,
        expected_version: str | None = None,
    ) -> None:
        status = response.status_code
        if status < 300:
            return
        request_id = response.headers.get("Request-ID", "-")
        where = f"HTTP {status}, Request-ID {request_id}, MS-CorrelationId {self.correlation_id}"
        what = f"Partner Center {operation}{' of referral ' + record_id if record_id else ''}"
        log.warning(
            "pc.error",
            operation=operation,
            record_id=record_id,
            status=status,
            request_id=request_id,
            correlation_id=self.correlation_id,
        )
        if status in (409, 412):
            raise ConflictError(
                f"{what}: the referral changed since it was read ({where}); re-read and merge",
                record_id=record_id,
                expected_version=expected_version,
            )
        if status == 401:
            raise SignInRequired(
                f"{what}: Partner Center refused the sign-in even after a token refresh ({where}); "
                "run `cosell auth login`"
            )
        if status == 403:
            raise PartnerCenterPermissionError(
                f"{what}: the signed-in user may not do this ({where}); it needs the Referrals Admin role "
                "(or Referrals User and membership of the referral's team)"
            )
        body = response.content[:_BODY_KEPT].decode("utf-8", "replace")
        if status == 404:
            raise RecordError(
                f"{what}: not found or not visible to this user ({where})",
                record_id=record_id,
                cause="pc-not-found",
            )
        cause = "pc-bad-request" if status == 400 else f"pc-http-{status}"
        raise RecordError(f"{what}: refused ({where}): {body}", record_id=record_id, cause=cause)

    def _referral(self, response: httpx.Response, record_id: str) -> Referral:
        try:
            # parsed and validated in one pass by pydantic-core (JSON mode), not json.loads first:
            # the answer to every create and update comes through here
            return Referral.model_validate_json(response.content)
        except (ValueError, ValidationError) as exc:
            raise RecordError(
                f"Partner Center answered an unreadable referral {record_id}: {type(exc).__name__}",
                record_id=record_id,
                cause="pc-unreadable",
            ) from None

    def _get_referral(self, referral_id: str) -> Referral:
        response = self.session.request(
            "get",
            "GET",
            f"{self.referrals_url}/{_path_id(referral_id)}",
            headers=self._headers(str(uuid.uuid4())),
            record_id=referral_id,
        )
        self._check(response, "get", referral_id)
        return self._referral(response, referral_id)

    # --- listing --------------------------------------------------------------------------------
    def pages(
        self,
        *,
        filters: tuple[str, ...] = (),
        orderby: str | None = "updatedDateTime asc",
        operation: str = "list",
    ) -> Iterator[ReferralPage]:
        """Every page of a listing, one request per page, following ``@odata.nextLink`` (§2.2)."""
        for raw in self._raw_pages(filters=filters, orderby=orderby, operation=operation):
            yield _page(raw)

    def _raw_pages(
        self, *, filters: tuple[str, ...], orderby: str | None, operation: str
    ) -> Iterator[_RawPage]:
        params: dict[str, str] = {"$top": str(self.page_size)}
        if filters:
            params["$filter"] = " and ".join(filters)
        if orderby:
            params["$orderby"] = orderby
        url: str = self.referrals_url
        query: dict[str, str] | None = dict(params)
        started: str | None = None
        while True:
            response = self.session.request(
                operation, "GET", url, headers=self._headers(str(uuid.uuid4())), params=query
            )
            self._check(response, operation, "")
            if started is None:
                started = _server_date(response)
            try:
                body = response.json()
                items = body["value"]
            except (ValueError, KeyError, TypeError):
                raise RecordError(
                    f"Partner Center {operation}: the page is not an OData list (Request-ID "
                    f"{response.headers.get('Request-ID', '-')})",
                    cause="pc-unreadable",
                ) from None
            next_link = body.get("@odata.nextLink")
            page = _RawPage(
                items if isinstance(items, list) else [],
                next_link if isinstance(next_link, str) and next_link else None,
                started,
            )
            yield page
            if not page.next_link:
                return
            url, query = self._follow(page.next_link, params)

    def _follow(self, link: str, params: Mapping[str, str]) -> tuple[str, dict[str, str] | None]:
        parts = urlsplit(link)
        if parts.scheme == "https" and link.startswith(self.referrals_url + "?"):
            return link, None
        # Published nextLinks use http:// and drop /engagements/ (§2.2): re-issue our own request on
        # our base URL with only the skiptoken taken from the link; never downgrade to http.
        tokens = parse_qs(parts.query).get("$skiptoken")
        if not tokens:
            raise FatalError(
                f"Partner Center returned a nextLink without $skiptoken ({parts.path}); restart the scan"
            )
        log.info("pc.next_link_rewritten", scheme=parts.scheme, path=parts.path)
        return self.referrals_url, {**params, "$skiptoken": tokens[-1]}

    def referrals(self, **kwargs: Any) -> Iterator[Referral]:
        """Every referral of a listing (see :meth:`pages`), streamed."""
        for page in self.pages(**kwargs):
            yield from page.referrals

    # --- ReferralStore --------------------------------------------------------------------------
    def changes(self, cursor: str | None) -> Iterator[ChangePage]:
        """Referrals changed since ``cursor`` (a server ``updatedDateTime``), page by page.

        The cursor of each page is the largest ``updatedDateTime`` read so far, so the engine can commit
        page by page; the next run starts ``lookback`` before it (overlap; processing is idempotent).
        """
        since = None if cursor is None else format_utc(parse_utc(cursor) - self.lookback)
        if since is None:
            yield from self._ascending(cursor, ())
            return
        if self.updated_filter_supported is not False:
            pages = self._ascending(cursor, (f"updatedDateTime ge {since}",))
            try:
                first = next(pages, None)
            except RecordError as exc:
                if self.updated_filter_supported is None and exc.cause == "pc-bad-request":
                    # The filter is undocumented (§2.1): the service refused it; scan instead.
                    log.warning("pc.updated_filter_refused", fallback="ordered scan")
                    self.updated_filter_supported = False
                    yield from self._descending(cursor, since)
                    return
                raise
            self.updated_filter_supported = True
            if first is not None:
                yield first
                yield from pages
            return
        yield from self._descending(cursor, since)

    def _ascending(self, cursor: str | None, filters: tuple[str, ...]) -> Iterator[ChangePage]:
        watermark = cursor
        for page in self._raw_pages(filters=filters, orderby="updatedDateTime asc", operation="changes"):
            watermark = _later(watermark, page.max_updated)
            if not page.next_link and page.listing_started is not None:
                # The whole window was read: the cursor may move up to the server's own clock at the
                # listing's start (the HTTP Date header, still the server's clock, never ours). Without
                # it an idle book would re-read the lookback window behind its last change forever.
                watermark = _later(watermark, page.listing_started)
            yield _change_page(page.items, watermark)

    def _descending(self, cursor: str | None, since: str) -> Iterator[ChangePage]:
        # Newest first, so a cursor is only safe once the whole window was read: last page only.
        floor = utc_ticks(since)
        watermark = cursor
        for page in self._raw_pages(filters=(), orderby="updatedDateTime desc", operation="changes"):
            fresh = [item for item in page.items if not _older(item, floor)]
            watermark = _later(watermark, page.max_updated)
            done = len(fresh) < len(page.items) or not page.next_link
            yield _change_page(fresh, watermark if done else None)
            if done:
                return

    def get(self, referral_id: str) -> Deal:
        return referral_to_deal(self._get_referral(referral_id))

    def find_by_external_reference(self, crm_id: str) -> Deal | None:
        """The referral carrying ``crm_id`` as ``externalReferenceId`` (filter support: assumption)."""
        found = [
            r
            for r in self.referrals(
                filters=(f"externalReferenceId eq {_odata_text(crm_id)}",), orderby=None, operation="find"
            )
            if r.crm_reference == crm_id
        ]
        if len(found) > 1:
            raise RecordError(
                f"{len(found)} referrals carry CRM id {crm_id}: "
                + ", ".join(sorted(r.id or "?" for r in found))
                + "; close the duplicates in Partner Center (Error / Duplicate)",
                record_id=crm_id,
                cause="pc-duplicate-external-reference",
            )
        return referral_to_deal(found[0]) if found else None

    def create(self, deal: Deal, *, request_id: str, resumed: bool = False) -> Deal:
        """POST a new referral for ``deal``.

        ``request_id`` is the outbox's ``MS-RequestId`` for this create. ``resumed=True`` says an earlier
        attempt may have reached Partner Center without its answer being recorded (crash, timeout):
        the referral is then looked up by ``externalReferenceId`` first and adopted if it exists. The
        same lookup runs before re-sending after an error that leaves the outcome unknown (5xx,
        connection loss) — but not after a 429, which means "not processed".
        """
        crm_ref = deal.external_reference_id or deal.crm_id
        enforce(check_create(deal), crm_ref or "")
        if not crm_ref:
            raise RecordError(
                f"{deal.label}: a referral is created only with the CRM id as externalReferenceId, so a "
                "retried create can be recognised",
                cause="pc-create-needs-crm-id",
            )
        if resumed and (existing := self.find_by_external_reference(crm_ref)) is not None:
            log.info(
                "pc.create_adopted", crm_id=crm_ref, referral_id=existing.referral_id, request_id=request_id
            )
            return existing
        body = json_bytes(create_request_body(deal, self.stage_format))
        headers = self._headers(request_id, write=True)
        outcome_unknown = False
        for attempt in self.session.policy.retrying():
            with attempt:
                if outcome_unknown and (existing := self.find_by_external_reference(crm_ref)) is not None:
                    log.info("pc.create_adopted", crm_id=crm_ref, referral_id=existing.referral_id)
                    return existing
                try:
                    response = self._once.request(
                        "create", "POST", self.referrals_url, headers=headers, content=body, record_id=crm_ref
                    )
                except RateLimited:
                    raise
                except RetryLater:
                    outcome_unknown = True
                    raise
                self._check(response, "create", crm_ref)
                created = referral_to_deal(self._referral(response, crm_ref))
                log.info("pc.created", crm_id=crm_ref, referral_id=created.referral_id, request_id=request_id)
                return created
        raise AssertionError("unreachable: tenacity re-raises")  # pragma: no cover

    def update(self, before: Deal, after: Deal, *, request_id: str) -> Deal:
        """PATCH the difference between ``before`` (as read, with its eTag) and ``after``.

        Refused locally, with no request, when a co-sell rule forbids the change (terminal referral,
        downgrade, immutable field) or the change has no PATCH path. Sends ``If-Match`` with the eTag
        the change was based on and ``Prefer: return=representation`` so the new eTag comes back.
        """
        rid = before.referral_id
        if not rid:
            raise RecordError(f"{before.label}: an update needs the referral id", cause="pc-no-referral-id")
        refusals = check_update(before, after)
        if self.allow_backward_stages:
            refusals = [r for r in refusals if r.rule != "stage-backward"]
        enforce(refusals, rid)
        plan = patch_operations(before, after, self.stage_format, patch_name=self.patch_name)
        blocked = [name for name in plan.unpatchable if name != "name"]
        if blocked:
            raise RecordError(
                f"referral {rid}: {', '.join(blocked)} cannot be changed through the Partner Center API "
                "(not a PATCH path); change it in the Partner Center UI",
                record_id=rid,
                cause="pc-not-patchable",
            )
        if "name" in plan.unpatchable:
            log.warning("pc.name_not_patched", referral_id=rid, reason="/name is not a Swagger PATCH path")
        if not plan.operations:
            return before
        etag = before.version.value if before.version and before.version.system == SYSTEM else None
        headers = self._headers(request_id, write=True)
        headers["Prefer"] = "return=representation"
        if etag:
            headers["If-Match"] = etag
        response = self.session.request(
            "update",
            "PATCH",
            f"{self.referrals_url}/{_path_id(rid)}",
            headers=headers,
            content=json_bytes(plan.body()),
            record_id=rid,
        )
        if response.status_code == 400 and etag:
            # The status on an eTag mismatch is undocumented (§12): a 400 may be one. Compare.
            current = self._get_referral(rid)
            if current.e_tag != etag:
                raise ConflictError(
                    f"Partner Center update of referral {rid}: refused and the referral changed since it was "
                    "read; re-read and merge",
                    record_id=rid,
                    expected_version=etag,
                )
        self._check(response, "update", rid, expected_version=etag)
        if response.status_code == 204:
            return self.get(rid)  # the service ignored Prefer: read the new eTag
        return referral_to_deal(self._referral(response, rid))


def _path_id(referral_id: str) -> str:
    # Referral ids are GUIDs; anything else must not become part of a URL path.
    try:
        return str(uuid.UUID(referral_id))
    except ValueError:
        raise RecordError(
            f"{referral_id!r} is not a referral id (a GUID)", record_id=referral_id, cause="pc-bad-id"
        ) from None


def _server_date(response: httpx.Response) -> str | None:
    """The response's ``Date`` header as a server timestamp (None when absent or unreadable)."""
    value = response.headers.get("Date")
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return format_utc(when)


def _older(item: Any, floor: int) -> bool:
    raw = item.get("updatedDateTime") if isinstance(item, dict) else None
    try:
        return isinstance(raw, str) and utc_ticks(raw) < floor
    except ValueError:
        return False  # kept: reading it reports it


def _validated(item: Any) -> Referral:
    """One listed item as a referral; an item that does not validate is named, with its count of
    invalid fields (the listing goes on without it)."""
    try:
        return Referral.model_validate(item)
    except ValidationError as exc:
        rid = str(item.get("id", "")) if isinstance(item, dict) else ""
        raise RecordError(
            f"{exc.error_count()} invalid field(s)", record_id=rid, cause="pc-unreadable"
        ) from None


def _read(item: Any) -> Deal:
    return referral_to_deal(_validated(item))


def _change_page(items: list[Any], cursor: str | None) -> ChangePage:
    """A page of changes whose referrals are validated and converted only when the engine asks
    (:class:`~connector.seams.Listed`): a full reconciliation finds nearly all of them unchanged."""
    listed: list[Listed] = []
    failures: list[RecordFailure] = []
    for item in items:
        rid = item.get("id") if isinstance(item, dict) else None
        if not isinstance(rid, str) or not rid:
            failures.append(RecordFailure("", "pc-unreadable", "a listed referral has no id"))
            continue
        etag, reference = item.get("eTag"), item.get("externalReferenceId")
        listed.append(
            Listed(
                record_id=rid,
                version=etag if isinstance(etag, str) and etag else None,
                reference=reference if isinstance(reference, str) and reference else None,
                content=item,
                read=functools.partial(_read, item),
            )
        )
    return ChangePage(deals=(), failures=tuple(failures), cursor=cursor, listed=tuple(listed))


def _page(raw: _RawPage) -> ReferralPage:
    referrals: list[Referral] = []
    failures: list[RecordFailure] = []
    for item in raw.items:
        try:
            referrals.append(_validated(item))
        except RecordError as exc:
            failures.append(RecordFailure(exc.record_id, exc.cause, str(exc)))
    return ReferralPage(
        tuple(referrals), tuple(failures), raw.next_link, raw.max_updated, raw.listing_started
    )


if TYPE_CHECKING:  # the client is the engine's ReferralStore (checked by mypy, costs nothing at run time)

    def _is_a_referral_store(client: PartnerCenterClient) -> ReferralStore:
        return client
