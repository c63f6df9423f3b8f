"""The Referrals twin is at least as strict as the documentation (raw HTTP, no client in between)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from connector.partner_center.twin import API_PREFIX, PartnerCenterTwin
from connector.remote.http import http_client
from connector.remote.idp_twin import IdpTwin
from connector.remote.twin import Clock

from .conftest import CLIENT_ID, PASSWORD, USER, fixture_json


def mint(idp: IdpTwin, ca_pem: Path) -> str:
    """A delegated access token, fresh on the twin clock (ROPC straight at the IdP twin)."""
    with http_client(ca_pem) as http:
        answer = http.post(
            f"{idp.authority}/oauth2/v2.0/token",
            data={
                "grant_type": "password",
                "client_id": CLIENT_ID,
                "username": USER,
                "password": PASSWORD,
                "scope": "https://api.partner.microsoft.com/.default offline_access",
            },
        ).json()
    assert answer["expires_in"] > 300 and "refresh_token" in answer
    return str(answer["access_token"])


@pytest.fixture
def token(idp: IdpTwin, ca_pem: Path) -> str:
    return mint(idp, ca_pem)


@pytest.fixture
def api(pc: PartnerCenterTwin, ca_pem: Path, token: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with http_client(ca_pem, base_url=f"{pc.base_url}{API_PREFIX}", headers=headers) as client:
        yield client


def created(api: httpx.Client, **headers: str) -> dict[str, Any]:
    response = api.post("", json=fixture_json("create-referral-request.json"), headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_create_answers_active_accepted_with_server_fields(api: httpx.Client) -> None:
    body = created(api)
    assert (body["status"], body["substatus"]) == ("Active", "Accepted")  # posted New/Pending
    assert body["eTag"].startswith('"') and body["eTag"].endswith('"')
    assert uuid.UUID(body["id"]) and body["createdDateTime"].endswith("Z")


def test_repeated_request_id_returns_the_first_referral(api: httpx.Client, pc: PartnerCenterTwin) -> None:
    first = created(api, **{"MS-RequestId": "r-1"})
    again = created(api, **{"MS-RequestId": "r-1"})
    other = created(api, **{"MS-RequestId": "r-2"})
    assert first["id"] == again["id"] != other["id"] and len(pc.referrals) == 2


def test_create_refuses_server_fields_and_missing_required(api: httpx.Client) -> None:
    body = fixture_json("create-referral-request.json")
    assert api.post("", json={**body, "eTag": '"x"'}).status_code == 400
    del body["consent"]
    assert api.post("", json=body).status_code == 400


def test_every_write_changes_the_etag_and_if_match_is_checked(api: httpx.Client) -> None:
    ref = created(api)
    ops = [{"op": "replace", "path": "/details/notes", "value": "one"}]
    assert api.patch(ref["id"], json=ops, headers={"If-Match": '"stale"'}).status_code == 412
    ok = api.patch(ref["id"], json=ops, headers={"If-Match": ref["eTag"]})
    assert ok.status_code == 204 and ok.content == b""
    after = api.get(ref["id"]).json()
    assert after["eTag"] != ref["eTag"] and after["details"]["notes"] == "one"
    shown = api.patch(ref["id"], json=ops, headers={"Prefer": "return=representation"})
    assert shown.status_code == 200 and shown.json()["eTag"] != after["eTag"]


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "replace", "path": "/name", "value": "x"}],
        [{"op": "remove", "path": "/details/notes"}],
        [
            {"op": "replace", "path": "/status", "value": "Closed"},
            {"op": "replace", "path": "/substatus", "value": "Accepted"},
        ],
        [
            {"op": "replace", "path": "/status", "value": "New"},
            {"op": "replace", "path": "/substatus", "value": "Pending"},
        ],
        [{"op": "replace", "path": "/substatus", "value": "Error"}],
        {"op": "replace", "path": "/details/notes", "value": "not an array"},
    ],
)
def test_patch_refuses_what_the_api_refuses(api: httpx.Client, ops: Any) -> None:
    ref = created(api)
    assert api.patch(ref["id"], json=ops).status_code == 400


def test_patch_needs_application_json(api: httpx.Client) -> None:
    ref = created(api)
    response = api.patch(ref["id"], content=b"[]", headers={"Content-Type": "application/json-patch+json"})
    assert response.status_code == 400


def test_documented_patches_and_terminal_immutability(api: httpx.Client) -> None:
    ref = created(api)
    for name in ("patch-deal-value-and-team.json", "patch-deal-value-and-notes.json", "patch-close-won.json"):
        assert api.patch(ref["id"], json=fixture_json(name)).status_code == 204, name
    won = api.get(ref["id"]).json()
    assert (won["status"], won["substatus"], won["details"]["dealValue"]) == ("Closed", "Won", 10000)
    assert won["closedDateTime"] is not None
    late = api.patch(ref["id"], json=[{"op": "replace", "path": "/details/notes", "value": "late"}])
    assert late.status_code == 400 and "cannot be changed" in late.text


def test_inbound_referrals_expire_after_14_days(
    api: httpx.Client, pc: PartnerCenterTwin, idp: IdpTwin, ca_pem: Path, clock: Clock
) -> None:
    inbound = pc.put(fixture_json("get-referral-response.json") | {"createdDateTime": pc._now()})
    clock.advance(timedelta(days=13, hours=23))
    api.headers["Authorization"] = f"Bearer {mint(idp, ca_pem)}"
    assert api.get(inbound["id"]).json()["substatus"] == "Pending"
    clock.advance(timedelta(hours=1))
    api.headers["Authorization"] = f"Bearer {mint(idp, ca_pem)}"
    expired = api.get(inbound["id"]).json()
    assert (expired["status"], expired["substatus"]) == ("Closed", "Expired")
    assert expired["eTag"] != inbound["eTag"]


def test_paging_filters_and_the_page_cap(api: httpx.Client, pc: PartnerCenterTwin) -> None:
    pc.seed(1200)
    first = api.get(
        "", params={"$top": "5000", "$filter": "status eq 'Active' and direction eq 'Outgoing'"}
    ).json()
    assert len(first["value"]) == pc.max_page_size and "@odata.nextLink" in first
    assert {(r["status"], r["direction"]) for r in first["value"]} == {("Active", "Outgoing")}
    assert api.get("", params={"$orderby": "name asc"}).status_code == 400
    assert api.get("", params={"$filter": "name eq 'x'"}).status_code == 400
    link = first["@odata.nextLink"]
    assert api.get(link.replace("status+eq", "status+ne")).status_code == 400  # token bound to its query


def test_tokens_missing_expired_or_app_only(
    pc: PartnerCenterTwin, idp: IdpTwin, ca_pem: Path, token: str, clock: Clock
) -> None:
    with http_client(ca_pem, base_url=f"{pc.base_url}{API_PREFIX}") as http:
        assert http.get("").status_code == 401
        assert http.get("", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        clock.advance(timedelta(hours=1))
        assert http.get("", headers={"Authorization": f"Bearer {token}"}).status_code == 401
        idp.add_client("daemon", secret="s")
        app_only = http.post(
            f"{idp.authority}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "daemon",
                "client_secret": "s",
                "scope": "https://api.partner.microsoft.com/.default",
            },
        ).json()["access_token"]
        assert http.get("", headers={"Authorization": f"Bearer {app_only}"}).status_code == 403


def test_seed_is_deterministic(ca: Any, idp: IdpTwin) -> None:
    with PartnerCenterTwin(ca, idp=idp) as one, PartnerCenterTwin(ca, idp=idp) as two:
        assert one.seed(50, seed=3) == two.seed(50, seed=3)
        assert [d["details"]["dealValue"] for d in one.referrals.values()] == [
            d["details"]["dealValue"] for d in two.referrals.values()
        ]


def test_listings_from_the_time_index_equal_a_full_scan(api: httpx.Client, pc: PartnerCenterTwin) -> None:
    ids = pc.seed(300, step=timedelta(minutes=1))
    docs = sorted(pc.referrals.values(), key=lambda d: d["updatedDateTime"])
    queries = [
        f"updatedDateTime ge {docs[0]['updatedDateTime']}",
        f"updatedDateTime gt {docs[150]['updatedDateTime']}",
        f"updatedDateTime ge {docs[299]['updatedDateTime']}",
        f"createdDateTime ge {docs[100]['createdDateTime']} and updatedDateTime lt {docs[200]['updatedDateTime']}",
        "updatedDateTime ge 2999-01-01T00:00:00Z",
    ]

    def listing(flt: str) -> list[str]:
        got: list[str] = []
        params: dict[str, str] | None = {"$filter": flt, "$orderby": "updatedDateTime asc", "$top": "40"}
        url = ""
        while True:
            answer = api.get(url, params=params)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            got += [d["id"] for d in body["value"]]
            if "@odata.nextLink" not in body:
                return got
            url, params = body["@odata.nextLink"], None

    def both(flt: str) -> tuple[list[str], list[str]]:
        pc.use_indexes = True
        indexed = listing(flt)
        pc.use_indexes = False
        scanned = listing(flt)
        pc.use_indexes = True
        return indexed, scanned

    for flt in queries:
        indexed, scanned = both(flt)
        assert indexed == scanned, flt
    # a write moves a referral to the end of the time order: the index follows it
    doc = pc.referrals[ids[5]]
    answer = api.patch(f"/{ids[5]}", json=[{"op": "replace", "path": "/details/notes", "value": "moved"}],
                       headers={"If-Match": doc["eTag"]})  # fmt: skip
    assert answer.status_code in (200, 204), answer.text
    for flt in queries:
        indexed, scanned = both(flt)
        assert indexed == scanned, flt
    assert listing(queries[0])[-1] == ids[5]
