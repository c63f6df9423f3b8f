"""SOQL building: ids, names and values cannot change a query's shape.

The twin's SOQL parser (an independent, strict lexer of Salesforce's escape rules) is the judge:
whatever string goes in as a value must come back out as exactly that value, in exactly one
comparison, and nothing else.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.salesforce import soql
from connector.salesforce.soql import id_checksum
from connector.salesforce.twin_soql import FieldDef, SoqlError, parse

SCHEMA = {
    "Opportunity": {
        "Id": FieldDef("Id", "id"),
        "Name": FieldDef("Name", "string"),
        "SystemModstamp": FieldDef("SystemModstamp", "datetime"),
        "CloseDate": FieldDef("CloseDate", "date"),
        "Amount": FieldDef("Amount", "currency"),
        "IsWon": FieldDef("IsWon", "boolean"),
    }
}
ID15 = "006Tw0000000abc"
ID18 = ID15 + id_checksum(ID15)

# SOQL has no way to put these in a string literal; Salesforce rejects them, so do we.
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


def matches(query: str, row: dict[str, object]) -> bool:
    parsed = parse(query, SCHEMA)
    assert parsed.where is not None
    return parsed.where(row)


def test_ids_are_checked_including_the_18_character_checksum() -> None:
    assert soql.sf_id(ID15) == ID15
    assert soql.sf_id(ID18) == ID18
    for bad in (
        "",
        "006",
        ID18[:-1] + ("A" if ID18[-1] != "A" else "B"),
        ID15 + "'OR'",
        "006Tw0000000ab'",
        15,
    ):
        with pytest.raises(ValueError):
            soql.sf_id(bad)


@given(st.text(max_size=40))
def test_an_arbitrary_string_is_an_id_only_if_it_looks_like_one(value: str) -> None:
    try:
        soql.sf_id(value)
    except ValueError:
        return
    assert value.isascii() and value.isalnum() and len(value) in (15, 18)


def test_field_names_are_strict() -> None:
    for good in ("Name", "Sync_with_Partner_Center__c", "ns__Field__c", "BillingCountryCode"):
        assert soql.field_name(good) == good
    for bad in ("Name, Id", "Name--", "Id FROM User", "1Name", "a__b__c__d", "OR", "Na me", "", "x" * 81):
        with pytest.raises(ValueError):
            soql.field_name(bad)


def test_literals() -> None:
    assert soql.literal("O'Brien") == "'O\\'Brien'"
    assert soql.literal(True) == "true"
    assert soql.literal(None) == "null"
    assert soql.literal(Decimal("12.50")) == "12.50"
    assert soql.literal(date(2025, 3, 3)) == "2025-03-03"
    cet = timezone(timedelta(hours=1))
    assert soql.literal(datetime(2025, 3, 3, 13, 0, 5, 999, tzinfo=cet)) == "2025-03-03T12:00:05Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        soql.literal(datetime(2025, 3, 3, 12, 0))  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError):
        soql.literal(1.5)
    with pytest.raises(ValueError):
        soql.literal(Decimal("NaN"))


@settings(max_examples=300)
@given(text)
def test_a_hostile_value_stays_one_value(value: str) -> None:
    query = soql.Query("Opportunity", ("Id",), where=soql.eq("Name", value)).render()
    assert matches(query, {"Name": value})
    assert not matches(query, {"Name": value + "x"})
    assert not matches(query, {"Name": None})


@settings(max_examples=150)
@given(st.lists(text, min_size=1, max_size=5), text)
def test_hostile_values_in_an_in_list_and_a_compound_condition(values: list[str], other: str) -> None:
    where = soql.all_of(
        soql.in_("Name", values), soql.any_of(soql.eq("IsWon", True), soql.ge("Amount", Decimal(5)))
    )
    query = soql.Query("Opportunity", ("Id", "Name"), where=where, order_by=("Name",), limit=10).render()
    for v in values:
        assert matches(query, {"Name": v, "IsWon": True, "Amount": 1.0})
        assert not matches(query, {"Name": v, "IsWon": False, "Amount": 1.0})
    if other.casefold() not in {v.casefold() for v in values}:
        assert not matches(query, {"Name": other, "IsWon": True, "Amount": 10.0})


def test_a_hostile_id_cannot_inject() -> None:
    with pytest.raises(ValueError):
        soql.in_("Id", [ID18, "006000000000000' OR Name != '"], ids=True)


def test_trusted_filter_only_adds_a_condition() -> None:
    assert soql.trusted_filter("Type = 'New Customer'").text == "(Type = 'New Customer')"
    for bad in (
        "Type = 'x') OR (Name != 'y'",
        "Type = 'x' LIMIT 1",
        "Id IN (SELECT Id FROM Account)",
        "a = 'b",
        "x = 1; DROP",
        "x = 1) ORDER BY (y",
    ):
        with pytest.raises(ValueError):
            soql.trusted_filter(bad)


def test_chunked_in_queries_stay_under_the_uri_limit_and_cover_every_id() -> None:
    ids = [f"006Tw{n:010d}" for n in range(3000)]

    def build(chunk: object) -> str:
        return soql.Query(
            "OpportunityLineItem", ("Id",), where=soql.in_("OpportunityId", chunk, ids=True)
        ).render()  # type: ignore[arg-type]

    queries = list(soql.chunk_in_values(ids, build))
    assert all(len(quote_plus(q)) <= soql.MAX_ENCODED_QUERY for q in queries)
    assert 3 <= len(queries) <= 10
    # as few queries as fit: every chunk but the last is full (one more id would not fit)
    one_more = len(quote_plus(",'006Tw0000000000'"))
    assert all(len(quote_plus(q)) + one_more > soql.MAX_ENCODED_QUERY for q in queries[:-1])
    seen = [i for q in queries for i in q.split("(", 1)[1].rstrip(")").replace("'", "").split(",")]
    assert seen == ids


def test_the_twin_rejects_what_salesforce_rejects() -> None:
    cases = {
        "SELECT Id FROM Opportunity WHERE Name = 'a' AND IsWon = true OR Amount > 1": "MALFORMED_QUERY",
        "SELECT Id FROM Opportunity WHERE SystemModstamp > '2025-01-01T00:00:00Z'": "MALFORMED_QUERY",
        "SELECT Id FROM Opportunity WHERE Name = 'a\\x'": "MALFORMED_QUERY",
        "SELECT Id FROM Opportunity; DELETE": "MALFORMED_QUERY",
        "SELECT Id FROM Opportunity WHERE Name = 'a' --": "MALFORMED_QUERY",
        "SELECT Nope FROM Opportunity": "INVALID_FIELD",
        "SELECT Id FROM Nope": "INVALID_TYPE",
        # Salesforce: "Didn't understand relationship 'Contacts' in FROM part of query call"
        "SELECT Id, (SELECT Id FROM Contacts) FROM Opportunity": "INVALID_TYPE",
        "SELECT Id, Account.Name FROM Opportunity": "INVALID_FIELD",  # no relationships in SCHEMA
        "SELECT Id FROM Opportunity WHERE Id IN (SELECT Id FROM Opportunity)": "MALFORMED_QUERY",
        "SELECT Id FROM Opportunity WHERE IsWon > true": "MALFORMED_QUERY",
    }
    for query, code in cases.items():
        with pytest.raises(SoqlError) as info:
            parse(query, SCHEMA)
        assert info.value.code == code, query


def test_the_twin_compares_datetimes_as_instants() -> None:
    stamp = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)
    query = "SELECT Id FROM Opportunity WHERE SystemModstamp >= 2025-03-03T13:00:00+01:00"
    assert matches(query, {"SystemModstamp": stamp})
    assert not matches(query, {"SystemModstamp": stamp - timedelta(seconds=1)})


def test_relationship_paths_and_subqueries_render_checked() -> None:
    query = soql.Query(
        "Opportunity",
        ("Id", "Account.Name", "Owner.Email", "Account.Name"),
        where=soql.eq("Name", "x"),
        order_by=("Id",),
        children=(soql.Query("OpportunityContactRoles", ("Id", "Contact.Email")),),
    ).render()
    assert query == (
        "SELECT Id, Account.Name, Owner.Email, (SELECT Id, Contact.Email FROM OpportunityContactRoles) "
        "FROM Opportunity WHERE Name = 'x' ORDER BY Id"
    )
    assert soql.field_path("A.B.C.D.E.Name") == "A.B.C.D.E.Name"
    for bad in (
        "Account..Name",
        "Account.",
        ".Name",
        "Account.Name, Id",
        "A.B.C.D.E.F.Name",
        "Account.FROM",
        3,
    ):
        with pytest.raises(ValueError):
            soql.field_path(bad)
    nested = soql.Query("Contacts", ("Id",), children=(soql.Query("Cases", ("Id",)),))
    with pytest.raises(ValueError, match="nest"):
        soql.Query("Account", ("Id",), children=(nested,)).render()
    with pytest.raises(ValueError):
        soql.Query("Account", ("Id",), children=(soql.Query("Contacts; DELETE", ("Id",)),)).render()
    with pytest.raises(ValueError):
        soql.Query("Account", (), count=True, children=(soql.Query("Contacts", ("Id",)),)).render()


@settings(max_examples=200)
@given(
    st.lists(
        st.one_of(st.text("abcXYZ019", min_size=1, max_size=20), text.filter(bool)),
        min_size=1,
        max_size=40,
    ),
    st.integers(120, 600),
)
def test_chunks_are_as_full_as_the_limit_allows_for_plain_and_hostile_values(
    values: list[str], limit: int
) -> None:
    """The fast path (plain letters and digits: the value between two encoded quotes) and the slow
    path (quote_plus of the escaped literal) size chunks alike: each under the limit, each as full as
    it can be, every value once and in order."""

    def build(chunk: object) -> str:
        return soql.Query("Opportunity", ("Id",), where=soql.in_("Name", chunk)).render()  # type: ignore[arg-type]

    try:
        queries = list(soql.chunk_in_values(values, build, limit=limit))
    except ValueError:
        assert any(len(quote_plus(build([v]))) > limit for v in values)
        return
    start = 0
    for query in queries:
        size = next(k for k in range(1, len(values) - start + 1) if build(values[start : start + k]) == query)
        assert len(quote_plus(query)) <= limit
        if start + size < len(values):
            assert len(quote_plus(build(values[start : start + size + 1]))) > limit
        start += size
    assert start == len(values)
