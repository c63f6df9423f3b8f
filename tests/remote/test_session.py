"""ApiSession: one refresh on 401, retries with Retry-After, bounded give-up, call counting."""

from __future__ import annotations

import httpx
import pytest
import respx

from connector.errors import RateLimited, RetryLater
from connector.remote.calls import CallCounter
from connector.remote.http import http_client
from connector.remote.retry import RetryPolicy, parse_retry_after
from connector.remote.session import ApiSession

URL = "https://api.example.test/thing"


class Tokens:
    def __init__(self) -> None:
        self.issued = 0
        self.forced = 0

    def token(self, *, force_refresh: bool = False) -> str:
        self.forced += force_refresh
        self.issued += 1
        return f"t{self.issued}"


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def session(waits: list[float]) -> ApiSession:
    return ApiSession(
        "test",
        http_client(None),
        tokens=Tokens(),
        policy=RetryPolicy(max_attempts=4, sleep=waits.append),
        calls=CallCounter(),
    )


@respx.mock
def test_429_honours_retry_after_then_succeeds(session: ApiSession, waits: list[float]) -> None:
    route = respx.get(URL).mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "7"}),
            httpx.Response(200, json={"ok": True}),
        ]
    )
    assert session.request("get-thing", "GET", URL).json() == {"ok": True}
    assert waits == [7.0] and route.call_count == 2
    assert session.calls.total("test", "get-thing") == 2


@respx.mock
def test_retry_after_is_capped(waits: list[float]) -> None:
    s = ApiSession(
        "test", http_client(None), policy=RetryPolicy(max_attempts=2, max_wait=30, sleep=waits.append)
    )
    respx.get(URL).mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": "3600"}), httpx.Response(204)]
    )
    assert s.request("op", "GET", URL).status_code == 204
    assert waits == [30.0]


@respx.mock
def test_5xx_backs_off_and_gives_up_bounded(session: ApiSession, waits: list[float]) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(503))
    with pytest.raises(RetryLater, match="HTTP 503"):
        session.request("create", "POST", URL, json={}, record_id="r-9")
    assert route.call_count == 4 and len(waits) == 3
    assert all(0 <= w <= 60 for w in waits)


@respx.mock
def test_headers_identical_on_every_retry(session: ApiSession) -> None:
    route = respx.post(URL).mock(side_effect=[httpx.Response(502), httpx.Response(201)])
    session.request("create", "POST", URL, headers={"MS-RequestId": "req-1"}, json={})
    assert [c.request.headers["MS-RequestId"] for c in route.calls] == ["req-1", "req-1"]


@respx.mock
def test_401_refreshes_the_token_once(session: ApiSession) -> None:
    route = respx.get(URL).mock(side_effect=[httpx.Response(401), httpx.Response(200)])
    assert session.request("op", "GET", URL).status_code == 200
    assert [c.request.headers["Authorization"] for c in route.calls] == ["Bearer t1", "Bearer t2"]
    assert session.tokens.forced == 1  # type: ignore[union-attr]


@respx.mock
def test_second_401_is_returned_not_looped(session: ApiSession) -> None:
    route = respx.get(URL).mock(return_value=httpx.Response(401))
    assert session.request("op", "GET", URL).status_code == 401
    assert route.call_count == 2


@respx.mock
def test_transport_errors_are_retry_later(session: ApiSession) -> None:
    respx.get(URL).mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(RetryLater, match="connection failed"):
        session.request("op", "GET", URL)
    assert session.calls.snapshot()


@respx.mock
def test_rate_limited_is_a_retry_later(waits: list[float]) -> None:
    s = ApiSession("test", http_client(None), policy=RetryPolicy(max_attempts=1, sleep=waits.append))
    respx.get(URL).mock(return_value=httpx.Response(429))
    with pytest.raises(RateLimited) as info:
        s.request("op", "GET", URL)
    assert info.value.retry_after is None and waits == []


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5", 5.0), (" 1.5 ", 1.5), ("-3", 0.0), ("Wed, 21 Oct 2026 07:28:00 GMT", None), (None, None)],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


@respx.mock
def test_a_response_is_freed_without_the_garbage_collector(session: ApiSession) -> None:
    """httpx's response refers to itself through its stream; the session breaks that cycle, so a
    listing page's body goes as soon as its page is done (tests the cause of an 80 MB peak)."""
    import gc
    import weakref

    respx.get(URL).mock(return_value=httpx.Response(200, json={"value": list(range(1000))}))
    gc.collect()
    gc.disable()
    try:
        response = session.request("list", "GET", URL)
        assert response.json()["value"][-1] == 999
        assert list(response.iter_bytes()) == [response.content]  # still readable
        gone = weakref.ref(response)
        del response
        assert gone() is None
    finally:
        gc.enable()
