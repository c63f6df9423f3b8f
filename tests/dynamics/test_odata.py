"""Unit tests of the OData helpers: literals and filters, query encoding, $batch, error bodies."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx
from hypothesis import given
from hypothesis import strategies as st

from connector.dynamics import odata
from connector.dynamics.adapter import DynamicsAdapter, DynamicsOptions, split_delta_entries
from connector.dynamics.odata import ChangeSet, Filter, Part, Query
from connector.dynamics.twin import And, Cmp, FilterSyntaxError, Not, Or, parse_filter
from connector.remote.retry import RetryPolicy
from connector.remote.session import ApiSession
from connector.remote.tokens import StaticToken
from tests.dynamics.conftest import fixture, fixture_text

GUID = "60c4e274-0d87-e711-80e5-00155db19e6d"


# --- literals and filters ------------------------------------------------------------------------


def test_literals_render_each_type() -> None:
    assert odata.literal("O'Brien") == "'O''Brien'"
    assert odata.literal(None) == "null"
    assert odata.literal(True) == "true"
    assert odata.literal(42) == "42"
    assert odata.literal(Decimal("10.50")) == "10.50"
    assert odata.literal(date(2027, 3, 31)) == "2027-03-31"
    assert odata.literal(odata.Guid(GUID.upper())) == GUID
    cet = timezone(timedelta(hours=1))
    assert odata.literal(datetime(2026, 3, 2, 10, 0, 5, tzinfo=cet)) == "2026-03-02T09:00:05Z"


def test_naive_datetimes_and_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        odata.literal(datetime(2026, 3, 2))  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError, match="property name"):
        odata.eq("name eq 'x' or name", "y")
    with pytest.raises(ValueError, match="GUID"):
        odata.Guid("1 or 1 eq 1")
    with pytest.raises(ValueError):
        odata.in_("accountid", [])
    with pytest.raises(TypeError):
        odata.literal(object())


def test_guid_validation() -> None:
    assert odata.is_guid(GUID)
    assert odata.guid(GUID.upper()) == GUID
    assert not odata.is_guid(GUID + "0")
    assert odata.guid(uuid.UUID(GUID)) == GUID


def test_filter_combinators_parse_as_intended() -> None:
    f = (odata.eq("statecode", 0) & odata.gt("estimatedvalue", 10)) | ~odata.eq("name", "x")
    tree = parse_filter(f.text)
    assert isinstance(tree, Or)
    assert isinstance(tree.items[0], And)
    assert isinstance(tree.items[1], Not)
    chain = parse_filter(odata.in_("accountid", [odata.Guid(GUID), odata.Guid(str(uuid.UUID(int=1)))]).text)
    assert isinstance(chain, Or) and all(isinstance(c, Cmp) and c.kind == "guid" for c in chain.items)


@given(st.text(max_size=60))
def test_a_hostile_value_stays_one_literal(value: str) -> None:
    """Whatever the text, the filter keeps its shape: one comparison with exactly that value, ANDed
    with the opt-in; and the URL encoding gives the server back exactly the filter we wrote."""
    flt = odata.eq("name", value) & odata.eq("new_syncwithpartnercenter", True)
    tree = parse_filter(flt.text)
    assert tree == And(
        (Cmp("name", "eq", value, "string"), Cmp("new_syncwithpartnercenter", "eq", True, "bool"))
    )
    url = Query("opportunities", ("name",), flt).url("https://org.example/api/data/v9.2/")
    decoded = parse_qs(urlsplit(url).query, keep_blank_values=True)
    assert decoded["$filter"] == [flt.text]
    assert decoded["$select"] == ["name"]
    assert set(decoded) == {"$filter", "$select"}


@pytest.mark.parametrize(
    "text", ["name eq 'x", "contains(name,'x')", "name eq", "name eq 'a' or", "(name eq 'a'"]
)
def test_the_twin_refuses_syntax_outside_the_subset(text: str) -> None:
    with pytest.raises(FilterSyntaxError):
        parse_filter(text)


def test_query_url_encodes_spaces_as_percent_20() -> None:
    q = Query(
        "opportunities",
        ("name", "modifiedon"),
        odata.eq("name", "a+b & c"),
        (("modifiedon", False), ("opportunityid", True)),
    )
    url = q.url("https://org.example/api/data/v9.2/")
    assert "+" not in urlsplit(url).query
    assert "%20" in url and "%26" in url and "%2B" in url
    assert "$orderby=modifiedon%20asc,opportunityid%20desc" in url


def test_entity_id_from_url() -> None:
    assert odata.entity_id_from_url(f"https://org.example/api/data/v9.2/opportunities({GUID})") == (
        "opportunities",
        GUID,
    )
    assert odata.entity_id_from_url(f"/accounts({GUID.upper()})") == ("accounts", GUID)
    assert odata.entity_id_from_url("https://org.example/api/data/v9.2/opportunities") is None


# --- errors ----------------------------------------------------------------------------------------


def test_error_bodies_from_the_documentation() -> None:
    conflict = odata.parse_error(412, fixture_text("error-precondition-failed.json"))
    assert conflict.code == ""
    assert (
        conflict.message
        == "The version of the existing record doesn't match the RowVersion property provided."
    )
    missing = odata.parse_error(404, fixture_text("error-not-found.json").encode())
    assert missing.message.endswith("Does Not Exist")
    part = odata.parse_error(400, fixture("batch-part-error.json"))
    assert part.code == "0x80044331"
    assert "error occurred.  The length" in part.message  # the double space is kept


def test_error_parsing_tolerates_other_bodies() -> None:
    assert odata.parse_error(503, b"<html>Service Unavailable</html>").message.startswith("<html>")
    assert odata.parse_error(500, b"").message == ""
    assert odata.parse_error(400, b'{"message": "not the usual shape"}') == odata.ODataError(400)


# --- $batch ----------------------------------------------------------------------------------------


def _sample_items() -> list[odata.BatchItem]:
    root = "https://org.example/api/data/v9.2/"
    return [
        ChangeSet(
            (
                Part.json("POST", f"{root}opportunities", {"name": "A"}, content_id="1"),
                Part.json(
                    "POST",
                    f"{root}WinOpportunity",
                    {"Status": 3, "OpportunityClose": {"subject": "s", "opportunityid@odata.bind": "$1"}},
                    content_id="2",
                ),
            )
        ),
        Part(
            "GET",
            Query("accounts", ("name",), odata.eq("name", "x y")).url(root),
            (("Accept", "application/json"),),
        ),
        ChangeSet(
            (
                Part.json(
                    "PATCH",
                    f"{root}opportunities({GUID})",
                    {"name": "B"},
                    headers={"If-Match": 'W/"1"'},
                    content_id="3",
                ),
            )
        ),
    ]


def test_batch_request_round_trip() -> None:
    items = _sample_items()
    body, content_type = odata.encode_batch(items)
    assert content_type.startswith("multipart/mixed; boundary=batch_")
    assert b"\r\nContent-Transfer-Encoding: binary\r\n" in body
    assert b"Content-ID: 2" in body
    decoded = odata.decode_batch_request(body, content_type)
    assert len(decoded) == 3
    first = decoded[0]
    assert isinstance(first, ChangeSet)
    assert [p.method for p in first.parts] == ["POST", "POST"]
    assert first.parts[1].payload()["OpportunityClose"]["opportunityid@odata.bind"] == "$1"
    assert isinstance(decoded[1], Part) and decoded[1].url == items[1].url  # type: ignore[union-attr]
    third = decoded[2]
    assert isinstance(third, ChangeSet) and third.parts[0].header("if-match") == 'W/"1"'


def test_batch_limits() -> None:
    with pytest.raises(ValueError, match="GET"):
        ChangeSet((Part("GET", "https://org.example/x"),))
    many = [Part("GET", f"https://org.example/api/data/v9.2/accounts?n={i}") for i in range(1001)]
    with pytest.raises(ValueError, match="1000"):
        odata.encode_batch(many)
    assert odata.count_requests(_sample_items()) == 4


def test_batch_response_round_trip_and_a_failed_change_set() -> None:
    ok = odata.ChangeSetResponse(
        (
            odata.PartResponse(
                204,
                (("OData-EntityId", f"https://org.example/api/data/v9.2/opportunities({GUID})"),),
                b"",
                "1",
            ),
        )
    )
    failed = odata.PartResponse(
        400, (("Content-Type", "application/json"),), fixture_text("batch-part-error.json").encode(), "3"
    )
    body, content_type = odata.encode_batch_response([ok, failed])
    results = odata.decode_batch_response(body, content_type)
    assert isinstance(results[0], odata.ChangeSetResponse) and results[0].ok
    assert results[0].responses[0].header("odata-entityid").endswith(f"({GUID})")  # type: ignore[union-attr]
    assert isinstance(results[1], odata.PartResponse)
    assert results[1].status == 400 and results[1].content_id == "3"
    assert results[1].error().code == "0x80044331"


def test_decodes_a_documentation_shaped_response_with_bare_line_feeds() -> None:
    text = (
        "--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f\n"
        "Content-Type: multipart/mixed; boundary=changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc\n"
        "\n"
        "--changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc\n"
        "Content-Type: application/http\n"
        "Content-Transfer-Encoding: binary\n"
        "Content-ID: 1\n"
        "\n"
        "HTTP/1.1 204 No Content\n"
        "OData-Version: 4.0\n"
        f"OData-EntityId: [Organization URI]/api/data/v9.2/tasks({GUID})\n"
        "\n"
        "\n"
        "--changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc--\n"
        "--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f\n"
        "Content-Type: application/http\n"
        "Content-Transfer-Encoding: binary\n"
        "\n"
        "HTTP/1.1 400 Bad Request\n"
        "Content-Type: application/json; odata.metadata=minimal\n"
        "OData-Version: 4.0\n"
        "\n"
        + fixture_text("batch-part-error.json")
        + "\n--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f--\n"
    )
    results = odata.decode_batch_response(
        text.encode(), "multipart/mixed; boundary=batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f"
    )
    assert isinstance(results[0], odata.ChangeSetResponse)
    assert results[0].responses[0].status == 204
    assert odata.entity_id_from_url(results[0].responses[0].header("OData-EntityId") or "") == ("tasks", GUID)
    assert isinstance(results[1], odata.PartResponse) and results[1].error().code == "0x80044331"


# --- documented payloads through the adapter's parsing (respx) --------------------------------------


def test_delta_entries_split_changes_from_deletes() -> None:
    changed, deleted = split_delta_entries(fixture("delta-response.json")["value"])
    assert [c["accountid"] for c in changed] == ["60c4e274-0d87-e711-80e5-00155db19e6d"]
    assert deleted == ["2e451703-c686-e711-80e5-00155db19e6d"]
    initial = fixture("change-tracking-initial-response.json")
    assert "$deltatoken=919042%2108%2f22%2f2017" in initial["@odata.deltaLink"]
    assert split_delta_entries(initial["value"])[1] == []


@respx.mock(assert_all_called=True)
def test_next_links_are_followed_verbatim(respx_mock: respx.MockRouter) -> None:
    org = "https://org.example"
    page1 = json.loads(fixture_text("paging-response.json").replace("[Organization URI]", org))
    next_link = page1["@odata.nextLink"]
    page2 = {"value": [{"fullname": "Third (sample)", "contactid": str(uuid.UUID(int=3))}]}
    seen: list[str] = []

    def second(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json=page2)

    respx_mock.route(url__startswith=f"{org}/api/data/v9.2/contacts?$select=fullname&$skiptoken=").mock(
        side_effect=second
    )
    # registered after the more specific route: respx matches params by inclusion
    first = respx_mock.get(f"{org}/api/data/v9.2/contacts", params={"$select": "fullname"}).mock(
        return_value=httpx.Response(200, json=page1)
    )
    session = ApiSession(
        "dynamics", httpx.Client(), tokens=StaticToken("t"), policy=RetryPolicy(sleep=lambda _s: None)
    )
    adapter = DynamicsAdapter(DynamicsOptions(base_url=org), session)
    rows = adapter._read_all("contacts", f"{org}/api/data/v9.2/contacts?$select=fullname")
    assert [r["fullname"] for r in rows] == [
        "Yvonne McKay (sample)",
        "Susanna Stubberod (sample)",
        "Third (sample)",
    ]
    assert seen == [next_link]  # byte for byte: the paging cookie is not re-encoded or extended
    request = first.calls.last.request
    assert request.headers["Prefer"] == "odata.maxpagesize=5000"
    assert request.headers["OData-Version"] == "4.0" and request.headers["If-None-Match"] == "null"


def test_win_request_has_the_documented_shape() -> None:
    documented = fixture("win-opportunity-request.json")
    session = ApiSession("dynamics", httpx.Client(), tokens=StaticToken("t"))
    adapter = DynamicsAdapter(DynamicsOptions(base_url="https://org.example"), session)
    adapter._meta, adapter._meta_read_at = adapter_meta(), datetime.now(UTC)
    from connector.seams import CrmWrite

    part = adapter._close_part(
        CrmWrite("b3828ac8-917a-e511-80d2-00155d2a68d2", {}),
        1,
        None,
        {"subject": "Won Opportunity"},
        "/opportunities(b3828ac8-917a-e511-80d2-00155d2a68d2)",
        "1",
    )
    body = part.payload()
    assert part.url.endswith("/api/data/v9.2/WinOpportunity")
    assert body.keys() == documented.keys()
    assert body["Status"] == documented["Status"] == 3
    assert body["OpportunityClose"].keys() == documented["OpportunityClose"].keys()
    assert body["OpportunityClose"]["opportunityid@odata.bind"].endswith(
        documented["OpportunityClose"]["opportunityid@odata.bind"].split("/v9.2")[1]
    )


def adapter_meta():  # type: ignore[no-untyped-def]
    from connector.dynamics.adapter import _Metadata

    return _Metadata(
        {0: "Qualify"},
        {1: ("In Progress", 0), 3: ("Won", 1), 4: ("Canceled", 2), 5: ("Out-Sold", 2)},
        {0: "Open"},
        {},
    )


def test_filter_trusted_refuses_empty_and_options_validate() -> None:
    with pytest.raises(ValueError):
        Filter.trusted("  ")
    with pytest.raises(Exception, match="max_concurrency"):
        DynamicsOptions(base_url="https://org.example", max_concurrency=53)
    with pytest.raises(Exception, match="page_size"):
        DynamicsOptions(base_url="https://org.example", page_size=5001)
    assert (
        DynamicsOptions(base_url="https://org.example/").service_root == "https://org.example/api/data/v9.2/"
    )


def test_utc_helper_roundtrip() -> None:
    assert odata.literal(datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)) == "2026-01-01T00:00:00.5Z"
