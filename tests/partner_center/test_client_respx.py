"""The client's wire behaviour, one HTTP exchange at a time (respx), over the documented payloads."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
import respx

from connector.domain.model import Status, Substatus
from connector.errors import ConflictError, FatalError, RecordError, SignInRequired
from connector.partner_center.client import PartnerCenterClient, PartnerCenterPermissionError
from connector.remote.calls import CallCounter
from connector.remote.http import http_client
from connector.remote.retry import RetryPolicy
from connector.remote.session import ApiSession

from .conftest import fixture_json, new_deal

BASE = "https://api.partner.example/v1.0"
REFERRALS = f"{BASE}/engagements/referrals"
RID = "c5fbb3b6-be74-4795-9fb5-4324c73fed37"


class Tokens:
    def __init__(self) -> None:
        self.refreshes = 0

    def token(self, *, force_refresh: bool = False) -> str:
        self.refreshes += force_refresh
        return f"token-{self.refreshes}"


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def client(tokens: Tokens, waits: list[float]) -> Iterator[PartnerCenterClient]:
    session = ApiSession(
        "partner-center",
        http_client(None),
        tokens=tokens,
        policy=RetryPolicy(sleep=waits.append),
        calls=CallCounter(),
    )
    with PartnerCenterClient(session, base_url=BASE, correlation_id="run-1") as c:
        yield c


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


def referral(**changes: object) -> dict[str, object]:
    doc = fixture_json("referral-real-inbound-active-accepted.json")
    doc.update(changes)
    return doc


def test_published_next_link_is_rewritten_never_followed(
    client: PartnerCenterClient, api: respx.MockRouter
) -> None:
    second = {"value": [referral(id=str(uuid.uuid4()))]}
    route = api.get(REFERRALS).mock(
        side_effect=[
            httpx.Response(200, json=fixture_json("list-referrals-response.json")),
            httpx.Response(200, json=second),
        ]
    )
    trap = api.route(host="api.partner.microsoft.com").mock(return_value=httpx.Response(500))
    got = list(client.referrals(filters=("status eq 'New'",)))
    assert len(got) == 2 and not trap.called
    first, follow = (call.request for call in route.calls)
    assert follow.url.scheme == "https" and follow.url.path == "/v1.0/engagements/referrals"
    assert follow.url.params["$skiptoken"] == "k181pEdP0ykypkieJfcxX"
    for name in ("$filter", "$orderby", "$top"):
        assert follow.url.params[name] == first.url.params[name]


def test_next_link_on_our_base_url_is_followed_as_is(
    client: PartnerCenterClient, api: respx.MockRouter
) -> None:
    link = f"{REFERRALS}?$top=100&$skiptoken=abc"
    route = api.get(REFERRALS).mock(
        side_effect=[
            httpx.Response(200, json={"value": [], "@odata.nextLink": link}),
            httpx.Response(200, json={"value": []}),
        ]
    )
    list(client.referrals())
    assert str(route.calls[1].request.url) == link


def test_next_link_without_skiptoken_stops_the_scan(
    client: PartnerCenterClient, api: respx.MockRouter
) -> None:
    api.get(REFERRALS).mock(
        return_value=httpx.Response(200, json={"value": [], "@odata.nextLink": "http://x/y?a=1"})
    )
    with pytest.raises(FatalError, match="skiptoken"):
        list(client.referrals())


def test_headers_and_one_request_id_per_operation_across_retries(
    client: PartnerCenterClient, api: respx.MockRouter, waits: list[float]
) -> None:
    route = api.get(f"{REFERRALS}/{RID}").mock(
        side_effect=[
            httpx.Response(429, json=fixture_json("error-throttled-429.json"), headers={"Retry-After": "57"}),
            httpx.Response(200, json=fixture_json("get-referral-response.json")),
        ]
    )
    deal = client.get(RID)
    assert deal.referral_id == RID and (deal.status, deal.substatus) == (Status.NEW, Substatus.PENDING)
    assert waits == [57.0]
    first, second = (c.request for c in route.calls)
    assert first.headers["MS-RequestId"] == second.headers["MS-RequestId"]
    assert first.headers["MS-CorrelationId"] == "run-1" and first.headers["Accept"] == "application/json"
    assert first.headers["Authorization"] == "Bearer token-0"


def test_create_body_and_headers(client: PartnerCenterClient, api: respx.MockRouter) -> None:
    route = api.post(REFERRALS).mock(
        return_value=httpx.Response(200, json=fixture_json("create-referral-response.json"))
    )
    created = client.create(new_deal(), request_id="req-1")
    assert created.referral_id == "4111fffc-f9ee-4d53-bba6-569135228642"
    request = route.calls[0].request
    assert (
        request.headers["Content-Type"] == "application/json" and request.headers["MS-RequestId"] == "req-1"
    )
    body = json.loads(request.content)
    assert body["externalReferenceId"] == "0061x00000AbCdEAAV" and body["type"] == "Independent"
    assert body["consent"]["consentToShareReferralWithMicrosoftSellers"] is False


@pytest.mark.parametrize(
    ("status", "error", "detail"),
    [
        (400, RecordError, "pc-bad-request"),
        (404, RecordError, "pc-not-found"),
        (409, ConflictError, ""),
        (412, ConflictError, ""),
        (403, PartnerCenterPermissionError, "Referrals Admin"),
    ],
)
def test_statuses_map_to_error_families(
    client: PartnerCenterClient, api: respx.MockRouter, status: int, error: type[Exception], detail: str
) -> None:
    body = "x" * 5000
    api.patch(f"{REFERRALS}/{RID}").mock(
        return_value=httpx.Response(status, text=body, headers={"Request-ID": "rq-9"})
    )
    api.get(f"{REFERRALS}/{RID}").mock(return_value=httpx.Response(200, json=referral(id=RID)))
    before = client.get(RID)
    with pytest.raises(error) as caught:
        client.update(before, dataclasses.replace(before, notes="n"), request_id="r")
    message = str(caught.value)
    assert "Request-ID rq-9" in message and "MS-CorrelationId run-1" in message
    if status == 400:
        assert message.count("x") == 1024 and isinstance(caught.value, RecordError)
        assert caught.value.cause == detail
    elif isinstance(caught.value, RecordError):
        assert caught.value.cause == detail
    elif detail:
        assert detail in message


def test_401_after_one_refresh_is_sign_in_required(
    client: PartnerCenterClient, api: respx.MockRouter, tokens: Tokens
) -> None:
    api.get(f"{REFERRALS}/{RID}").mock(return_value=httpx.Response(401))
    with pytest.raises(SignInRequired, match="cosell auth login"):
        client.get(RID)
    assert tokens.refreshes == 1


def test_400_after_if_match_with_a_changed_etag_is_a_conflict(
    client: PartnerCenterClient, api: respx.MockRouter
) -> None:
    api.get(f"{REFERRALS}/{RID}").mock(
        side_effect=[
            httpx.Response(200, json=referral(id=RID)),
            httpx.Response(200, json=referral(id=RID, eTag='"changed"')),
        ]
    )
    api.patch(f"{REFERRALS}/{RID}").mock(return_value=httpx.Response(400, text="bad"))
    before = client.get(RID)
    with pytest.raises(ConflictError):
        client.update(before, dataclasses.replace(before, notes="n"), request_id="r")


def test_patch_wire_format(client: PartnerCenterClient, api: respx.MockRouter) -> None:
    api.get(f"{REFERRALS}/{RID}").mock(return_value=httpx.Response(200, json=referral(id=RID)))
    route = api.patch(f"{REFERRALS}/{RID}").mock(
        return_value=httpx.Response(
            200, json=referral(id=RID, status="Closed", substatus="Won", eTag='"new"')
        )
    )
    before = client.get(RID)
    after = client.update(
        before, dataclasses.replace(before, status=Status.CLOSED, substatus=Substatus.WON), request_id="r"
    )
    request = route.calls[0].request
    assert json.loads(request.content) == fixture_json("patch-close-won.json")
    assert request.headers["If-Match"] == '"69007a1e-0000-0800-0000-6217f4ce0000"'
    assert request.headers["Prefer"] == "return=representation"
    assert request.headers["Content-Type"] == "application/json"
    assert after.version is not None and after.version.value == '"new"'


def test_no_change_sends_nothing(client: PartnerCenterClient, api: respx.MockRouter) -> None:
    api.get(f"{REFERRALS}/{RID}").mock(return_value=httpx.Response(200, json=referral(id=RID)))
    before = client.get(RID)
    assert client.update(before, before, request_id="r") is before
    assert client.calls.total() == 1


def test_refused_updated_filter_falls_back_to_an_ordered_scan(
    client: PartnerCenterClient, api: respx.MockRouter
) -> None:
    newer = [referral(id=str(uuid.uuid4()), updatedDateTime=f"2026-03-02T09:0{i}:00Z") for i in (3, 2)]
    older = referral(id=str(uuid.uuid4()), updatedDateTime="2026-03-01T00:00:00Z")

    def answer(request: httpx.Request) -> httpx.Response:
        if "$filter" in request.url.params:
            return httpx.Response(400, text="filter not supported")
        if "$skiptoken" in request.url.params:
            return httpx.Response(
                200, json={"value": [newer[1], older], "@odata.nextLink": f"{REFERRALS}?$skiptoken=2"}
            )
        return httpx.Response(200, json={"value": [newer[0]], "@odata.nextLink": f"{REFERRALS}?$skiptoken=1"})

    api.get(REFERRALS).mock(side_effect=answer)
    pages = list(client.changes("2026-03-02T09:00:00.0000000Z"))
    assert client.updated_filter_supported is False
    assert [len(p.converted()[0]) for p in pages] == [1, 1]
    assert [p.cursor for p in pages] == [None, "2026-03-02T09:03:00Z"]  # only once the window was read


def test_unreadable_items_are_isolated_and_do_not_stop_the_page(
    client: PartnerCenterClient, api: respx.MockRouter
) -> None:
    bad_time = referral(id="bad-1", updatedDateTime="yesterday")
    bad_status = referral(id=str(uuid.uuid4()), status="Engaged", updatedDateTime="2026-03-02T10:00:00Z")
    good = referral(id=str(uuid.uuid4()), updatedDateTime="2026-03-02T09:00:00Z")
    api.get(REFERRALS).mock(return_value=httpx.Response(200, json={"value": [bad_time, bad_status, good]}))
    (page,) = list(client.changes(None))
    deals, failures = page.converted()
    assert [d.referral_id for d in deals] == [good["id"]]
    assert sorted(f.cause for f in failures) == ["pc-unknown-status", "pc-unreadable"]
    assert page.cursor == "2026-03-02T10:00:00Z"


def test_referral_ids_must_be_guids(client: PartnerCenterClient, api: respx.MockRouter) -> None:
    with pytest.raises(RecordError) as caught:
        client.get("../../webhooks")
    assert caught.value.cause == "pc-bad-id" and client.calls.total() == 0


def test_plain_http_base_url_is_refused() -> None:
    session = ApiSession("partner-center", http_client(None))
    try:
        with pytest.raises(Exception, match="must be https"):
            PartnerCenterClient(session, base_url="http://api.partner.microsoft.com/v1.0")
    finally:
        session.http.close()
