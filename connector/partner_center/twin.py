"""A local HTTPS twin of the Partner Center Referrals API, at least as strict as the documentation.

Behaviour and its sources (partner-center-api.md; https://learn.microsoft.com/partner-center/developer/
referral-resources, …/create-a-referral, …/get-a-list-of-referrals, …/patch-a-referral):

- ``GET/POST /v1.0/engagements/referrals``, ``GET/PATCH …/{id}``; nothing else (no delete, PUT is obsolete);
- delegated bearer tokens issued by the :class:`~connector.remote.idp_twin.IdpTwin` (401 when missing,
  unknown or expired on the shared clock; app-only tokens are refused, §9);
- create answers ``Active/Accepted`` whatever was posted (§6.3) and sets the server fields; a repeated
  ``MS-RequestId`` returns the first result instead of creating again (§3);
- every write changes the ``eTag`` (a JSON string with its own quotes); ``If-Match`` mismatch → 412;
- PATCH takes a JSON Patch array with ``replace``/``add`` on the Swagger paths only (400 otherwise),
  ``Content-Type: application/json``; 204, or 200 + the referral with ``Prefer: return=representation``;
- status moves per §6.2 and substatuses per §6.1; a terminal referral never changes again (400);
- inbound referrals still ``New`` 14 days after creation become ``Closed/Expired`` (twin clock);
- list: ``$filter`` (the subset the connector sends: comparisons joined by ``and``), ``$orderby`` on
  ``createdDateTime``/``updatedDateTime`` only, ``$top`` capped at ``max_page_size``, ``@odata.nextLink``
  with an opaque ``$skiptoken`` bound to the query. ``next_link_style="published"`` reproduces the
  published sample's broken link (``http://``, no ``/engagements/``) to exercise the client's rewrite.

Tests inject 429/5xx through :meth:`Twin.inject` and lose a response after the write happened with
:meth:`PartnerCenterTwin.lose_response` (the "did my POST land?" case).
"""

from __future__ import annotations

import base64
import bisect
import copy
import functools
import hashlib
import json
import random
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from connector.partner_center.jsonpatch import JsonPatchError, apply_patch
from connector.partner_center.models import format_utc, utc_ticks
from connector.remote.http import json_bytes
from connector.remote.idp_twin import IdpTwin
from connector.remote.twin import Clock, Twin, TwinCA, TwinRequest, TwinResponse

__all__ = ["API_PREFIX", "PartnerCenterTwin"]

API_PREFIX = "/v1.0/engagements/referrals"
INBOUND_EXPIRY = timedelta(days=14)
#: Timestamps are re-read on every list (sort, filter, expiry); parse each distinct text once.
_ticks = functools.lru_cache(maxsize=1 << 16)(utc_ticks)

#: status -> allowed substatuses (§6.1). "Error" is not in the API enum.
SUBSTATUSES: dict[str, frozenset[str]] = {
    "None": frozenset({"None"}),
    "New": frozenset({"Pending", "Received"}),
    "Active": frozenset({"Accepted"}),
    "Closed": frozenset({"Won", "Lost", "Declined", "Expired"}),
}
#: status -> statuses it may move to (§6.2).
STATUS_MOVES: dict[str, frozenset[str]] = {
    "None": frozenset({"None", "New", "Active", "Closed"}),
    "New": frozenset({"New", "Active", "Closed"}),
    "Active": frozenset({"Active", "Closed"}),
    "Closed": frozenset({"Closed"}),
}
TERMINAL = frozenset({"Won", "Lost", "Declined", "Expired"})
#: Server-set fields a create must not carry.
SERVER_FIELDS = frozenset(
    {"id", "eTag", "createdDateTime", "updatedDateTime", "organizationId", "organizationName", "links"}
)
REQUIRED_ON_CREATE = ("type", "customerProfile", "consent", "details")

_COMPARISON = re.compile(
    r"\s*(?P<field>[A-Za-z]+)\s+(?P<op>eq|ne|gt|ge|lt|le)\s+"
    r"(?P<value>'(?:[^']|'')*'|\d{4}-\d{2}-\d{2}T[\d:.]+(?:Z|[+-]\d{2}:\d{2})|null|true|false)\s*",
)
_FILTERABLE = {
    "updatedDateTime": "time",
    "createdDateTime": "time",
    "status": "text",
    "substatus": "text",
    "direction": "text",
    "type": "text",
    "qualification": "text",
    "externalReferenceId": "text",
    "engagementId": "text",
}
_ORDERABLE = frozenset({"createdDateTime", "updatedDateTime"})


class _BadRequest(Exception):
    pass


@dataclass(frozen=True)
class _Comparison:
    field: str
    op: str
    value: Any

    def matches(self, doc: dict[str, Any]) -> bool:
        have = doc.get(self.field)
        want = self.value
        if _FILTERABLE[self.field] == "time" and have is not None and want is not None:
            have, want = _ticks(have), _ticks(want)
        if self.op == "eq":
            return bool(have == want)
        if self.op == "ne":
            return bool(have != want)
        if have is None or want is None:
            return False
        outcome: bool = {
            "gt": have > want,
            "ge": have >= want,
            "lt": have < want,
            "le": have <= want,
        }[self.op]
        return outcome


def _parse_filter(text: str, *, updated_filter: bool) -> list[_Comparison]:
    text = text.strip()
    while text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    out: list[_Comparison] = []
    pos = 0
    while True:
        m = _COMPARISON.match(text, pos)
        if m is None:
            raise _BadRequest(f"$filter not supported near: {text[pos : pos + 40]!r}")
        field = m["field"]
        if field not in _FILTERABLE or (field == "updatedDateTime" and not updated_filter):
            raise _BadRequest(f"$filter on {field} is not supported")
        raw = m["value"]
        value: Any
        if raw.startswith("'"):
            value = raw[1:-1].replace("''", "'")
        else:
            value = {"null": None, "true": True, "false": False}.get(raw, raw)
        if _FILTERABLE[field] == "time" and value is not None:
            try:
                utc_ticks(value)
            except ValueError:
                raise _BadRequest(f"$filter: {raw} is not a timestamp") from None
        out.append(_Comparison(field, m["op"], value))
        pos = m.end()
        if pos == len(text):
            return out
        joiner = re.compile(r"and\s+", re.IGNORECASE).match(text, pos)
        if joiner is None:
            raise _BadRequest(f"$filter: only 'and' joins are supported (near {text[pos : pos + 20]!r})")
        pos = joiner.end()


class PartnerCenterTwin(Twin):
    """The Referrals API for one partner organisation."""

    name = "partner-center"

    def __init__(
        self,
        ca: TwinCA,
        *,
        idp: IdpTwin | None,
        clock: Clock | None = None,
        default_page_size: int = 100,
        max_page_size: int = 500,
        next_link_style: Literal["absolute", "published"] = "absolute",
        updated_filter: bool = True,
        scope_prefix: str = "https://api.partner.microsoft.com",
        organization_id: str = "7d23e5ca-19dc-4eaa-aac8-5e6b559f0d1d",
        organization_name: str = "Contoso Company",
        port: int = 0,
    ) -> None:
        super().__init__(ca, clock=clock or (idp.clock if idp else None), port=port)
        self.idp = idp
        self.default_page_size = default_page_size
        self.max_page_size = max_page_size
        self.next_link_style = next_link_style
        self.updated_filter = updated_filter
        self.scope_prefix = scope_prefix
        self.organization_id = organization_id
        self.organization_name = organization_name
        #: tokens accepted without an IdP (unit tests of the twin itself)
        self.static_tokens: set[str] = set()
        self.referrals: dict[str, dict[str, Any]] = {}
        self._by_request_id: dict[str, str] = {}
        self._pending_inbound: set[str] = set()
        self._lost: list[tuple[Callable[[TwinRequest], bool], int]] = []
        self._store = threading.RLock()
        #: bumped on every write; a listing's filtered, sorted ids are reused while it is unchanged
        self._version = 0
        self._listing: tuple[tuple[str, int], list[str]] | None = None
        #: per time field, (store version, sorted (ticks, id)): a listing with a lower bound on the
        #: field starts from a bisect instead of parsing every referral's timestamp (at 100,000
        #: referrals an idle incremental listing cost the twin 0.3 s; the real service has indexes)
        self._time_index: dict[str, tuple[int, list[tuple[int, str]]]] = {}
        self.use_indexes = True

    @property
    def api_base_url(self) -> str:
        """What ``partner_center.base_url`` points at."""
        return f"{self.base_url}/v1.0"

    # --- test controls ----------------------------------------------------------------------------
    def lose_response(self, match: Callable[[TwinRequest], bool], *, status: int = 504) -> None:
        """Process the next matching request, then answer ``status`` instead (the write happened)."""
        with self._store:
            self._lost.append((match, status))

    def put(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Store a referral as given (a fixture, a hand-made edge case); fills the fields writes need."""
        return copy.deepcopy(self._insert(copy.deepcopy(doc)))

    def edit(self, referral_id: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """An edit made in Partner Center itself (by Microsoft, or in the portal), not through the
        API the connector uses: ``change`` is applied to the stored referral, which gets a new
        ``updatedDateTime`` and eTag as the service stamps every change."""
        with self._store:
            doc = self.referrals[referral_id]
            change(doc)
            doc["updatedDateTime"] = self._now()
            doc["eTag"] = self._etag()
            self._version += 1
            return copy.deepcopy(doc)

    def _insert(self, doc: dict[str, Any]) -> dict[str, Any]:
        stored = self._complete(doc)
        with self._store:
            self.referrals[stored["id"]] = stored
            self._track(stored)
            self._version += 1
        return stored

    def seed(
        self,
        count: int,
        *,
        start: datetime | None = None,
        step: timedelta = timedelta(seconds=1),
        seed: int = 7,
        mix: bool = True,
    ) -> list[str]:
        """Create ``count`` referrals deterministically (same ``seed`` → same ids, names, values).

        ``updatedDateTime`` increases by ``step`` from ``start`` (default: ``count * step`` before the
        clock's now). ``mix`` makes ~20% inbound ``New/Received`` and ~10% ``Closed/Won``.
        """
        rng = random.Random(seed)  # noqa: S311 - deterministic test data, not secrets
        begin = start or self.clock.now() - step * count
        ids: list[str] = []
        for i in range(count):
            at = format_utc(begin + step * i)
            roll = rng.random() if mix else 0.5
            inbound = roll < 0.2
            status, substatus = ("New", "Received") if inbound else ("Active", "Accepted")
            if 0.2 <= roll < 0.3:
                status, substatus = "Closed", "Won"
            rid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            doc = {
                "id": rid,
                "engagementId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "name": f"Seed deal {i:05d}",
                "externalReferenceId": None if inbound else f"006SEED{i:011d}",
                "createdDateTime": at,
                "updatedDateTime": at,
                "acceptedDateTime": None if inbound else at,
                "status": status,
                "substatus": substatus,
                "type": "Shared",
                "qualification": "SalesQualified",
                "direction": "Incoming" if inbound else "Outgoing",
                "salesStage": None if inbound else str(rng.choice((10, 20, 40, 60, 80))),
                "customerProfile": {
                    "name": f"Customer {i:05d}",
                    "address": {"city": "Redmond", "state": "WA", "postalCode": "98052", "country": "US"},
                    "size": "10to50employees",
                    "team": [],
                    "ids": [],
                },
                "consent": {
                    "consentToToShareInfoWithOthers": True,
                    "consentToContact": True,
                    "consentToShareReferralWithMicrosoftSellers": True,
                },
                "details": {
                    "notes": f"seeded {i}",
                    "dealValue": rng.randrange(5_000, 500_000, 500),
                    "currency": "USD",
                    "closingDateTime": "2030-06-30T00:00:00Z",
                    "requirements": {
                        "solutions": [{"id": "SOL-34104-EBB", "name": "Contoso", "type": "Name"}]
                    },
                },
                "team": [
                    {
                        "firstName": "Sam",
                        "lastName": "Seller",
                        "phoneNumber": "5550100",
                        "email": "sam@contoso.com",
                    }
                ],
            }
            self._insert(doc)
            ids.append(rid)
        return ids

    def count_writes(self) -> int:
        return len(self.calls("POST", API_PREFIX)) + len(self.calls("PATCH", API_PREFIX))

    # --- store helpers ----------------------------------------------------------------------------
    def _now(self) -> str:
        return format_utc(self.clock.now())

    @staticmethod
    def _etag() -> str:
        return f'"{uuid.uuid4()}"'

    def _complete(self, doc: dict[str, Any]) -> dict[str, Any]:
        now = self._now()
        doc.setdefault("id", str(uuid.uuid4()))
        doc.setdefault("engagementId", str(uuid.uuid4()))
        doc.setdefault("organizationId", self.organization_id)
        doc.setdefault("organizationName", self.organization_name)
        doc.setdefault("createdDateTime", now)
        doc.setdefault("updatedDateTime", doc["createdDateTime"])
        for key in (
            "externalReferenceId",
            "expirationDateTime",
            "closedDateTime",
            "statusReason",
            "salesStage",
        ):
            doc.setdefault(key, None)
        for key in ("campaignId", "referralProgram"):
            doc.setdefault(key, None)
        doc.setdefault("status", "Active")
        doc.setdefault("substatus", "Accepted")
        doc.setdefault("registrationStatus", "None")
        doc.setdefault("eTag", self._etag())
        if not isinstance(doc.get("team"), list):
            doc["team"] = [doc["team"]] if isinstance(doc.get("team"), dict) else []
        profile = doc.setdefault("customerProfile", {}) or {}
        doc["customerProfile"] = profile
        if not isinstance(profile.get("team"), list):
            profile["team"] = [profile["team"]] if isinstance(profile.get("team"), dict) else []
        consent = doc.setdefault("consent", {}) or {}
        doc["consent"] = consent
        consent.setdefault("consentToShareReferralWithMicrosoftSellers", False)
        details = doc.setdefault("details", {}) or {}
        doc["details"] = details
        for key in ("notes", "dealValue", "currency", "closingDateTime"):
            details.setdefault(key, None)
        requirements = details.setdefault("requirements", {}) or {}
        details["requirements"] = requirements
        if requirements.get("solutions") is None:
            requirements["solutions"] = []
        doc["links"] = {
            "self": {"uri": f"{self.base_url}{API_PREFIX}/{doc['id']}", "method": "GET"},
            "relatedReferrals": {
                "uri": f"{self.base_url}{API_PREFIX}?$filter=engagementId eq '{doc['engagementId']}'",
                "method": "GET",
            },
        }
        return doc

    def _track(self, doc: dict[str, Any]) -> None:
        if doc.get("direction") == "Incoming" and doc.get("status") == "New":
            self._pending_inbound.add(doc["id"])
        else:
            self._pending_inbound.discard(doc["id"])

    def _expire(self) -> None:
        # Unanswered inbound referrals close as Expired after 14 days (partner-center-api.md §6.3).
        now = format_utc(self.clock.now())
        cutoff = _ticks(now) - int(INBOUND_EXPIRY.total_seconds()) * 10_000_000
        with self._store:
            for rid in list(self._pending_inbound):
                doc = self.referrals[rid]
                if _ticks(doc["createdDateTime"]) <= cutoff:
                    expired_at = now
                    doc.update(
                        status="Closed",
                        substatus="Expired",
                        closedDateTime=expired_at,
                        updatedDateTime=expired_at,
                        eTag=self._etag(),
                    )
                    self._pending_inbound.discard(rid)
                    self._version += 1

    # --- HTTP -------------------------------------------------------------------------------------
    def handle(self, request: TwinRequest) -> TwinResponse:
        request_id = str(uuid.uuid4())
        echo = {"Request-ID": request_id}
        if "ms-correlationid" in request.headers:
            echo["MS-CorrelationId"] = request.headers["ms-correlationid"]
        if "ms-requestid" in request.headers:
            echo["MS-RequestId"] = request.headers["ms-requestid"]
        response = self._route(request)
        response.headers.update(echo)
        with self._store:
            for i, (match, status) in enumerate(self._lost):
                if match(request):
                    del self._lost[i]
                    return TwinResponse(status, "upstream timed out", echo)
        return response

    def _route(self, request: TwinRequest) -> TwinResponse:
        if not (request.path == API_PREFIX or request.path.startswith(API_PREFIX + "/")):
            return TwinResponse(404, {"error": "not found"})
        auth = self._authorise(request)
        if auth is not None:
            return auth
        self._expire()
        rest = request.path[len(API_PREFIX) :].strip("/")
        try:
            if not rest and request.method == "GET":
                return self._list(request)
            if not rest and request.method == "POST":
                return self._create(request)
            if rest and "/" not in rest and request.method == "GET":
                return self._get(rest)
            if rest and "/" not in rest and request.method == "PATCH":
                return self._patch(rest, request)
        except _BadRequest as exc:
            return TwinResponse(400, {"code": "BadRequest", "message": str(exc)})
        return TwinResponse(405, {"code": "MethodNotAllowed", "message": f"{request.method} not supported"})

    def _authorise(self, request: TwinRequest) -> TwinResponse | None:
        header = request.headers.get("authorization")
        if self.idp is None:
            if header and header.removeprefix("Bearer ").strip() in self.static_tokens:
                return None
            return self._unauthorised()
        issued = self.idp.validate(header, scope_prefix=self.scope_prefix)
        if issued is None:
            return self._unauthorised()
        if issued.app_only:
            # Referral endpoints take delegated user tokens only (referral-api-authentication).
            return TwinResponse(403, {"code": "Forbidden", "message": "app-only tokens are not supported"})
        return None

    @staticmethod
    def _unauthorised() -> TwinResponse:
        return TwinResponse(
            401,
            {"code": "Unauthorized", "message": "missing, invalid or expired token"},
            {"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )

    def _get(self, rid: str) -> TwinResponse:
        with self._store:
            doc = self.referrals.get(rid)
            if doc is None:
                return TwinResponse(404, {"code": "NotFound", "message": f"referral {rid} not found"})
            return TwinResponse(200, copy.deepcopy(doc))

    # --- list -------------------------------------------------------------------------------------
    def _list(self, request: TwinRequest) -> TwinResponse:
        filter_text = request.arg("$filter")
        orderby = request.arg("$orderby")
        top_text = request.arg("$top")
        comparisons = _parse_filter(filter_text, updated_filter=self.updated_filter) if filter_text else []
        key: tuple[str, bool] | None = None
        if orderby:
            parts = orderby.split()
            if (
                len(parts) not in (1, 2)
                or parts[0] not in _ORDERABLE
                or parts[-1] not in (parts[0], "asc", "desc")
            ):
                raise _BadRequest("$orderby supports createdDateTime and updatedDateTime, asc or desc")
            key = (parts[0], len(parts) == 2 and parts[1] == "desc")
        try:
            top = min(int(top_text), self.max_page_size) if top_text else self.default_page_size
        except ValueError:
            raise _BadRequest("$top must be an integer") from None
        if top < 1:
            raise _BadRequest("$top must be positive")
        query_hash = hashlib.sha256(f"{filter_text}|{orderby}".encode()).hexdigest()[:16]
        offset = 0
        if token := request.arg("$skiptoken"):
            offset = self._read_skiptoken(token, query_hash)
        with self._store:
            if self._listing is not None and self._listing[0] == (query_hash, self._version):
                ids = self._listing[1]
            else:
                docs = [d for d in self._candidates(comparisons) if all(c.matches(d) for c in comparisons)]
                if key is not None:
                    field, desc = key
                    docs.sort(key=lambda d: (_ticks(d[field]), d["id"]), reverse=desc)
                ids = [d["id"] for d in docs]
                self._listing = ((query_hash, self._version), ids)
            body: dict[str, Any] = {
                "@odata.context": f"{self.base_url}/v1.0/$metadata#Referrals",
                "value": [self.referrals[rid] for rid in ids[offset : offset + top]],
            }
            if request.arg("$count") == "true":
                body["@odata.count"] = len(ids)
            if offset + top < len(ids):
                body["@odata.nextLink"] = self._next_link(request, offset + top, query_hash)
            # encoded under the lock (a consistent page) instead of deep-copying each document to
            # encode later: the copies were most of the twin's time serving a listing
            encoded = json_bytes(body)
        return TwinResponse(200, encoded, {"Content-Type": "application/json; charset=utf-8"})

    def _candidates(self, comparisons: list[_Comparison]) -> list[dict[str, Any]]:
        """The referrals a filter can match: those at or after a time lower bound when there is one
        (from the index), else all. The full filter is still applied to each (exact semantics)."""
        bound = next(
            (
                c
                for c in comparisons
                if c.op in ("ge", "gt") and c.value is not None and _FILTERABLE[c.field] == "time"
            ),
            None,
        )
        if bound is None or not self.use_indexes:
            return list(self.referrals.values())
        cached = self._time_index.get(bound.field)
        if cached is None or cached[0] != self._version:
            entries = sorted(
                (_ticks(d[bound.field]), rid)
                for rid, d in self.referrals.items()
                if d.get(bound.field) is not None
            )
            cached = (self._version, entries)
            self._time_index[bound.field] = cached
        entries = cached[1]
        start = bisect.bisect_left(entries, (_ticks(bound.value), ""))
        return [self.referrals[rid] for _, rid in entries[start:]]

    @staticmethod
    def _skiptoken(offset: int, query_hash: str) -> str:
        return (
            base64.urlsafe_b64encode(json.dumps({"o": offset, "q": query_hash}).encode()).decode().rstrip("=")
        )

    @staticmethod
    def _read_skiptoken(token: str, query_hash: str) -> int:
        try:
            data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            offset = int(data["o"])
        except (ValueError, KeyError, TypeError):
            raise _BadRequest("$skiptoken is invalid") from None
        if data.get("q") != query_hash:
            raise _BadRequest("$skiptoken does not belong to this query")
        return offset

    def _next_link(self, request: TwinRequest, offset: int, query_hash: str) -> str:
        from urllib.parse import urlencode, urlsplit

        token = self._skiptoken(offset, query_hash)
        if self.next_link_style == "published":
            # As in the published sample: plain http, no /engagements/, only the skiptoken.
            return f"http://{urlsplit(self.base_url).netloc}/v1.0/referrals?$skiptoken={token}"
        params = [(k, v[-1]) for k, v in request.query.items() if k != "$skiptoken"]
        params.append(("$skiptoken", token))
        return f"{self.base_url}{API_PREFIX}?{urlencode(params)}"

    # --- create -----------------------------------------------------------------------------------
    def _create(self, request: TwinRequest) -> TwinResponse:
        _require_json(request)
        request_id = request.headers.get("ms-requestid")
        with self._store:
            if request_id and request_id in self._by_request_id:
                return TwinResponse(200, copy.deepcopy(self.referrals[self._by_request_id[request_id]]))
        try:
            body = request.json()
        except ValueError:
            raise _BadRequest("body is not JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("body must be a referral object")
        missing = [k for k in REQUIRED_ON_CREATE if not body.get(k)]
        if missing:
            raise _BadRequest(f"missing required field(s): {', '.join(missing)}")
        server = sorted(SERVER_FIELDS & body.keys())
        if server:
            raise _BadRequest(f"server-set field(s) cannot be posted: {', '.join(server)}")
        country = ((body.get("customerProfile") or {}).get("address") or {}).get("country")
        if not (isinstance(country, str) and re.fullmatch(r"[A-Z]{2}", country)):
            raise _BadRequest("customerProfile.address.country must be an ISO 3166 two-letter code")
        details = body["details"]
        if "dealValue" in details:
            details["dealValue"] = _deal_value(details["dealValue"])
        now = self._now()
        doc = copy.deepcopy(body)
        # Create answers Active/Accepted whatever was posted (create-a-referral sample).
        doc.update(
            status="Active",
            substatus="Accepted",
            direction="Outgoing",
            createdDateTime=now,
            updatedDateTime=now,
            acceptedDateTime=now,
        )
        stored = self._complete(doc)
        with self._store:
            self.referrals[stored["id"]] = stored
            self._version += 1
            if request_id:
                self._by_request_id[request_id] = stored["id"]
            return TwinResponse(200, copy.deepcopy(stored))

    # --- patch ------------------------------------------------------------------------------------
    def _patch(self, rid: str, request: TwinRequest) -> TwinResponse:
        _require_json(request)
        try:
            ops = request.json()
        except ValueError:
            raise _BadRequest("body is not JSON") from None
        if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
            raise _BadRequest("body must be a JSON Patch array")
        with self._store:
            doc = self.referrals.get(rid)
            if doc is None:
                return TwinResponse(404, {"code": "NotFound", "message": f"referral {rid} not found"})
            if_match = request.headers.get("if-match")
            if if_match is not None and if_match.strip() not in ("*", doc["eTag"]):
                return TwinResponse(
                    412, {"code": "PreconditionFailed", "message": "the referral changed (eTag mismatch)"}
                )
            if doc["substatus"] in TERMINAL:
                raise _BadRequest(f"referral is {doc['status']}/{doc['substatus']} and cannot be changed")
            try:
                new = apply_patch(doc, ops, strict=True)
            except JsonPatchError as exc:
                raise _BadRequest(str(exc)) from None
            self._validate_patched(doc, new)
            now = self._now()
            new["updatedDateTime"] = now
            new["eTag"] = self._etag()
            if new["status"] == "Closed" and doc["status"] != "Closed":
                new["closedDateTime"] = now
            self.referrals[rid] = new
            self._track(new)
            self._version += 1
            if "return=representation" in request.headers.get("prefer", ""):
                return TwinResponse(200, copy.deepcopy(new))
        return TwinResponse(204)

    @staticmethod
    def _validate_patched(old: dict[str, Any], new: dict[str, Any]) -> None:
        status, substatus = new.get("status"), new.get("substatus")
        if status not in SUBSTATUSES or substatus not in SUBSTATUSES[status]:
            raise _BadRequest(f"{status}/{substatus} is not a valid status/substatus pair")
        if status not in STATUS_MOVES[old["status"]]:
            raise _BadRequest(f"status cannot move from {old['status']} to {status}")
        if substatus == "Expired" and old["substatus"] != "Expired":
            raise _BadRequest("only Partner Center expires a referral")
        details = new.get("details") or {}
        if details.get("dealValue") is not None:
            details["dealValue"] = _deal_value(details["dealValue"])
        consent = new.get("consent") or {}
        if old["consent"].get("consentToShareReferralWithMicrosoftSellers") and not consent.get(
            "consentToShareReferralWithMicrosoftSellers"
        ):
            raise _BadRequest("sharing with Microsoft sellers cannot be withdrawn")
        for path in ("team",):
            if not isinstance(new.get(path), list):
                raise _BadRequest(f"{path} must be an array")


def _require_json(request: TwinRequest) -> None:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise _BadRequest(f"Content-Type must be application/json (got {content_type or 'none'})")


def _deal_value(value: Any) -> int | float:
    # Stored as a number; PATCH samples send a numeric string (patch-a-referral).
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise _BadRequest(f"dealValue {value!r} is not a number") from None
    if number < 0:
        raise _BadRequest("dealValue cannot be negative")
    return int(number) if number == number.to_integral_value() else float(number)
