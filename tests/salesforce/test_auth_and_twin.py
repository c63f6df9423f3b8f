"""Sign-in flows against the twin's token endpoint, and the twin's wire shapes against the published
samples in tests/fixtures/salesforce (copied verbatim from the shared fixtures)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from connector.errors import ConfigError, SignInRequired
from connector.remote.http import requests_session
from connector.remote.twin import Clock, Fault, TwinCA, TwinRequest, TwinResponse
from connector.salesforce.adapter import _parse_sf_datetime, parse_sf_datetime
from connector.salesforce.auth import SalesforceSignIn, jwt_audience
from connector.salesforce.twin import RELATIONSHIPS, SalesforceTwin, seed
from connector.salesforce.twin_soql import SoqlError, parse
from connector.settings import SalesforceAuth
from tests.salesforce.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    NO_SLEEP,
    START,
    USERNAME,
    crm_settings,
    fixture,
)


def sign_in(twin: SalesforceTwin, ca_bundle: Path, auth: SalesforceAuth) -> SalesforceSignIn:
    return SalesforceSignIn(
        crm_settings(twin, auth=auth), ca_bundle=ca_bundle, policy=NO_SLEEP, now=twin.clock.now
    )


def test_jwt_bearer_client_credentials_and_password(
    twin: SalesforceTwin, ca_bundle: Path, rsa_keys: tuple[bytes, bytes], tmp_path: Path
) -> None:
    key_file = tmp_path / "sf.key"
    key_file.write_bytes(rsa_keys[0])
    flows = [
        SalesforceAuth(flow="jwt_bearer", client_id=CLIENT_ID, username=USERNAME, private_key_file=key_file),
        SalesforceAuth(
            flow="client_credentials", client_id=CLIENT_ID, client_secret=SecretStr(CLIENT_SECRET)
        ),
        SalesforceAuth(
            flow="password",
            client_id=CLIENT_ID,
            username=USERNAME,
            client_secret=SecretStr(CLIENT_SECRET),
            password=SecretStr("twin-password"),
        ),
    ]
    for auth in flows:
        provider = sign_in(twin, ca_bundle, auth)
        token = provider.current()
        assert token.instance_url == twin.base_url and token.access_token in twin.sessions
        assert token.access_token not in repr(token)
        assert provider.token() == token.access_token  # cached
        assert provider.token(force_refresh=True) != token.access_token
        provider.close()
    assert (
        twin.sign_ins
        == ["urn:ietf:params:oauth:grant-type:jwt-bearer"] * 2 + ["client_credentials"] * 2 + ["password"] * 2
    )


def test_refused_sign_ins_say_what_to_fix(twin: SalesforceTwin, ca_bundle: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cases = [
        SalesforceAuth(
            flow="jwt_bearer", client_id=CLIENT_ID, username=USERNAME, private_key=SecretStr(wrong.decode())
        ),
        SalesforceAuth(
            flow="password",
            client_id=CLIENT_ID,
            username=USERNAME,
            client_secret=SecretStr(CLIENT_SECRET),
            password=SecretStr("wrong"),
        ),
        SalesforceAuth(flow="client_credentials", client_id="other", client_secret=SecretStr(CLIENT_SECRET)),
    ]
    for auth in cases:
        provider = sign_in(twin, ca_bundle, auth)
        with pytest.raises(SignInRequired, match="refused"):
            provider.token()
        provider.close()
    provider = sign_in(twin, ca_bundle, SalesforceAuth(flow="client_credentials", client_id=CLIENT_ID))
    with pytest.raises(ConfigError, match="client secret"):
        provider.token()
    provider.close()
    with pytest.raises(ConfigError, match="https"):
        SalesforceSignIn(crm_settings(twin, login_url="http://localhost:1"), ca_bundle=ca_bundle)


def test_jwt_audience() -> None:
    assert jwt_audience("https://acme.my.salesforce.com") == "https://login.salesforce.com"
    assert jwt_audience("https://test.salesforce.com/") == "https://test.salesforce.com"
    assert jwt_audience("https://acme--uat.sandbox.my.salesforce.com") == "https://test.salesforce.com"
    assert jwt_audience("https://localhost:8443") == "https://localhost:8443"


def test_datetimes_from_the_published_samples_parse_as_utc() -> None:
    deleted = fixture("get-deleted.json")
    assert (
        parse_sf_datetime(deleted["deletedRecords"][0]["deletedDate"]).isoformat()
        == "2013-05-07T22:07:19+00:00"
    )
    assert (
        parse_sf_datetime(fixture("get-updated.json")["latestDateCovered"]).isoformat()
        == "2013-05-08T21:20:00+00:00"
    )
    assert (
        parse_sf_datetime(fixture("bulk2-create-query-job-response.json")["createdDate"]).tzinfo is not None
    )
    assert parse_sf_datetime("1741003200000") == parse_sf_datetime(
        "2025-03-03T12:00:00.000+0000"
    )  # Bulk epoch ms
    with pytest.raises(ValueError):
        parse_sf_datetime("2025-03-03T12:00:00")  # naive: refused


def test_twin_wire_shapes_match_the_published_samples(twin: SalesforceTwin, ca_bundle: Path) -> None:
    provider = sign_in(
        twin,
        ca_bundle,
        SalesforceAuth(
            flow="client_credentials", client_id=CLIENT_ID, client_secret=SecretStr(CLIENT_SECRET)
        ),
    )
    seeded = seed(twin, 3)
    base = f"{twin.base_url}/services/data/v59.0"
    with requests_session(ca_bundle) as s:
        s.headers["Authorization"] = f"Bearer {provider.token()}"
        query = s.get(f"{base}/query", params={"q": "SELECT Name FROM Account"}).json()
        assert set(query) == set(fixture("query-response.json"))
        assert set(query["records"][0]["attributes"]) == {"type", "url"}
        twin.delete_row("Opportunity", seeded.opportunities[0])
        twin.clock.advance(timedelta(minutes=2))
        window = {"start": (START - timedelta(days=1)).isoformat(), "end": twin.stamp().isoformat()}
        deleted = s.get(f"{base}/sobjects/Opportunity/deleted/", params=window)
        assert set(deleted.json()) == set(fixture("get-deleted.json"))
        assert deleted.json()["deletedRecords"][0]["id"] == seeded.opportunities[0]
        assert set(s.get(f"{base}/sobjects/Opportunity/updated/", params=window).json()) == set(
            fixture("get-updated.json")
        )
        too_old = {"start": (START - timedelta(days=20)).isoformat(), "end": twin.stamp().isoformat()}
        refused = s.get(f"{base}/sobjects/Opportunity/deleted/", params=too_old)
        assert refused.status_code == 400 and refused.json()[0]["errorCode"] == "INVALID_REPLICATION_DATE"
        job = s.post(
            f"{base}/jobs/query", json={"operation": "query", "query": "SELECT Id FROM Account"}
        ).json()
        assert set(fixture("bulk2-create-query-job-response.json")) <= set(job)
        created = s.post(f"{base}/sobjects/Account", json={"Name": "New"})
        assert created.status_code == 201 and set(created.json()) == set(
            fixture("upsert-create-response.json")
        )
        bad = s.get(
            f"{base}/query",
            params={"q": "SELECT Id FROM Opportunity WHERE Name = 'x' AND Id = 'y' OR Name = 'z'"},
        )
        assert (
            bad.status_code == 400
            and bad.json() == [bad.json()[0]]
            and bad.json()[0]["errorCode"] == "MALFORMED_QUERY"
        )
        long = s.get(
            f"{base}/query", params={"q": "SELECT Id FROM Account WHERE Name = '" + "x" * 17_000 + "'"}
        )
        assert long.status_code == 414
        assert s.get(f"{base}/limits").headers["Sforce-Limit-Info"].startswith("api-usage=")
        twin.clock.advance(timedelta(hours=3))
        expired = s.get(f"{base}/limits")
        assert expired.status_code == 401 and expired.json()[0]["errorCode"] == "INVALID_SESSION_ID"
    provider.close()


def test_twin_deletes_behave_like_salesforce(twin: SalesforceTwin, ca_bundle: Path) -> None:
    """query hides deleted rows; queryAll returns them with IsDeleted = true until purged; a delete
    moves SystemModstamp; getDeleted lists purged and hard-deleted rows within its window."""
    provider = sign_in(
        twin,
        ca_bundle,
        SalesforceAuth(
            flow="client_credentials", client_id=CLIENT_ID, client_secret=SecretStr(CLIENT_SECRET)
        ),
    )
    seeded = seed(twin, 4)
    soft, purged, hard = seeded.opportunities[:3]
    twin.clock.advance(timedelta(minutes=5))
    twin.delete_row("Opportunity", soft)
    twin.delete_row("Opportunity", purged)
    twin.purge_row("Opportunity", purged)
    twin.hard_delete_row("Opportunity", hard)
    twin.clock.advance(timedelta(minutes=2))
    base = f"{twin.base_url}/services/data/v59.0"
    soql = "SELECT Id, IsDeleted, SystemModstamp FROM Opportunity ORDER BY Id"
    with requests_session(ca_bundle) as s:
        s.headers["Authorization"] = f"Bearer {provider.token()}"
        live = s.get(f"{base}/query", params={"q": soql}).json()["records"]
        assert [r["Id"] for r in live] == [seeded.opportunities[3]]
        assert (
            s.get(
                f"{base}/query", params={"q": soql.replace("ORDER", "WHERE IsDeleted = true ORDER")}
            ).json()["records"]
            == []
        )
        every = {r["Id"]: r for r in s.get(f"{base}/queryAll", params={"q": soql}).json()["records"]}
        assert set(every) == {soft, seeded.opportunities[3]}  # purged rows are gone from queryAll too
        assert every[soft]["IsDeleted"] is True and every[seeded.opportunities[3]]["IsDeleted"] is False
        # the delete moved the stamp (seeded an hour before START, deleted five minutes after)
        assert parse_sf_datetime(every[soft]["SystemModstamp"]) == START + timedelta(minutes=5)
        window = {"start": START.isoformat(), "end": twin.stamp().isoformat()}
        listed = s.get(f"{base}/sobjects/Opportunity/deleted/", params=window).json()["deletedRecords"]
        assert {d["id"] for d in listed} == {soft, purged, hard}
        assert s.get(f"{base}/sobjects/Opportunity/{soft}").status_code == 404
    with pytest.raises(ValueError):
        twin.purge_row("Opportunity", seeded.opportunities[3])  # not in the recycle bin
    provider.close()


def test_twin_describe_has_picklist_values_and_restrictions(twin: SalesforceTwin, ca_bundle: Path) -> None:
    provider = sign_in(
        twin,
        ca_bundle,
        SalesforceAuth(
            flow="client_credentials", client_id=CLIENT_ID, client_secret=SecretStr(CLIENT_SECRET)
        ),
    )
    row = next(r for r in twin.tables["OpportunityStage"].values() if r["ApiName"] == "Closed Lost")
    row["IsActive"] = False
    with requests_session(ca_bundle) as s:
        s.headers["Authorization"] = f"Bearer {provider.token()}"
        body = s.get(f"{twin.base_url}/services/data/v59.0/sobjects/Opportunity/describe").json()
    fields = {f["name"]: f for f in body["fields"]}
    stage = fields["StageName"]
    assert stage["type"] == "picklist" and stage["restrictedPicklist"] is True
    assert {"value", "label", "active", "defaultValue", "validFor"} <= set(stage["picklistValues"][0])
    assert [v["value"] for v in stage["picklistValues"]][:2] == ["Prospecting", "Qualification"]
    assert {v["value"]: v["active"] for v in stage["picklistValues"]}["Closed Lost"] is False
    loss = {v["value"]: v["active"] for v in fields["Loss_Reason__c"]["picklistValues"]}
    assert loss["Lost to Competitor"] is True and loss["Discontinued Product"] is False
    help_type = fields["Partner_Center_Help_Type__c"]["picklistValues"][0]
    assert (help_type["value"], help_type["label"]) == (
        "WorkloadSpecificValueProposition",
        "Workload value proposition",
    )
    assert fields["Name"]["picklistValues"] == [] and fields["Name"]["restrictedPicklist"] is False
    provider.close()


def _soql_time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _random_where(rng: random.Random, ids: list[str], stamps: list[datetime]) -> str:
    """Conditions the twin indexes (Id / lookup / string IN and =, SystemModstamp ranges) and ones it
    does not, joined by AND (mostly) or OR, nested in parentheses, sometimes under NOT."""
    accounts = ["001Tw0000000000AAA", "001Tw0000000001AAA", "001Tw0000000002AAA"]

    def ids_literal(k: int) -> str:
        picked = [*rng.sample(ids, min(k, len(ids))), "006Tw00000NoSuchAAA"]
        return ",".join(f"'{i}'" for i in picked)

    def one() -> str:
        stamp = _soql_time(rng.choice(stamps) + timedelta(seconds=rng.choice([-1, 0, 0, 1])))
        return rng.choice(
            [
                f"Id IN ({ids_literal(rng.randrange(1, 8))})",
                f"Id = '{rng.choice(ids)}'",
                f"AccountId IN ({','.join(repr(a) for a in rng.sample(accounts, 2))})",
                f"AccountId = '{rng.choice(accounts)}'",
                "AccountId = null",
                f"AccountId NOT IN ('{rng.choice(accounts)}')",
                f"SystemModstamp {rng.choice(['>=', '>', '<=', '<', '=', '!='])} {stamp}",
                f"Partner_Center_Referral_Id__c IN ('REF-{rng.randrange(5)}', 'ref-{rng.randrange(5)}')",
                f"Partner_Center_Referral_Id__c = 'Ref-{rng.randrange(5)}'",
                f"Sync_with_Partner_Center__c = {rng.choice(['true', 'false'])}",
                f"Amount > {rng.randrange(0, 5000)}",
            ]
        )

    def group(depth: int) -> str:
        parts = [
            one() if depth > 1 or rng.random() < 0.7 else group(depth + 1) for _ in range(rng.randrange(1, 4))
        ]
        joined = f" {rng.choice(['AND', 'AND', 'OR'])} ".join(parts)
        if rng.random() < 0.15:
            return f"NOT ({joined})"
        return f"({joined})" if len(parts) > 1 or rng.random() < 0.3 else joined

    return group(0)


@pytest.mark.parametrize("rng_seed", range(6))
def test_indexed_queries_return_exactly_what_a_scan_returns(ca: TwinCA, rng_seed: int) -> None:
    """The twin answers selective queries from indexes (Id, lookups, strings, SystemModstamp); over a
    small random table written, deleted, purged and rolled back between queries, every query returns
    the same rows in the same order as the plain scan (the same query stripped of index bounds)."""
    rng = random.Random(rng_seed)
    twin = SalesforceTwin(ca, clock=Clock(START))
    accounts = ["001Tw0000000000AAA", "001Tw0000000001AAA", "001Tw0000000002AAA", None]
    stamps: list[datetime] = []
    purged: list[str] = []
    indexed = 0

    def values() -> dict[str, object]:
        ref = rng.choice([None, f"REF-{rng.randrange(5)}", f"ref-{rng.randrange(5)}"])
        return {
            "Name": f"Deal {rng.randrange(100)}",
            "StageName": "Prospecting",
            "CloseDate": START.date(),
            "AccountId": rng.choice(accounts),
            "Amount": float(rng.randrange(0, 5000)),
            "Partner_Center_Referral_Id__c": ref,
            "Sync_with_Partner_Center__c": rng.random() < 0.7,
        }

    def stamp() -> datetime:
        twin.clock.advance(timedelta(seconds=rng.choice([0, 0, 1, 2])))
        stamps.append(twin.stamp())
        return twin.stamp()

    for _ in range(30):
        twin.add_row("Opportunity", values(), stamp=stamp())
    for step in range(300):
        table = twin.tables["Opportunity"]
        ids = list(table)
        live = [i for i in ids if not table[i]["IsDeleted"]]
        action = rng.randrange(10)
        if action == 0:
            twin.add_row("Opportunity", values(), stamp=stamp())
        elif action == 1 and live:
            # sometimes an older stamp, as a late-committing transaction writes
            when = rng.choice(stamps) if rng.random() < 0.3 else stamp()
            twin.update_row("Opportunity", rng.choice(live), values(), stamp=when)
        elif action == 2 and live:
            stamp()
            twin.delete_row("Opportunity", rng.choice(live))
        elif action == 3:
            binned = [i for i in ids if table[i]["IsDeleted"]]
            if binned:
                purged.append(rng.choice(binned))
                twin.purge_row("Opportunity", purged[-1])
        elif action == 4 and purged:
            # an id purged earlier comes back (at the end of the table, as a dict re-insert does)
            twin.add_row("Opportunity", {**values(), "Id": purged.pop()}, stamp=stamp())
        elif action == 5 and len(live) >= 2:
            # an allOrNone collection with one bad record: everything is rolled back
            records = [
                {"attributes": {"type": "Opportunity"}, "id": live[0], "AccountId": rng.choice(accounts)},
                {"attributes": {"type": "Opportunity"}, "id": live[1], "StageName": "No Such Stage"},
            ]
            body = json.dumps({"allOrNone": True, "records": records}).encode()
            response = twin._collection(TwinRequest("PATCH", "/", {}, {}, body), creating=False)
            assert not response.body[0]["success"]
        for _ in range(3):
            where = _random_where(rng, ids or ["006Tw00000NoSuchAAA"], stamps)
            order = rng.choice(
                ["", " ORDER BY SystemModstamp, Id", " ORDER BY AccountId DESC NULLS LAST", " ORDER BY Name"]
            )
            limit = rng.choice(["", "", f" LIMIT {rng.randrange(1, 10)}"])
            soql = f"SELECT Id FROM Opportunity WHERE {where}{order}{limit}"  # noqa: S608 - test SOQL
            parsed = parse(soql, twin.schema)
            scan = dataclasses.replace(parsed, bounds=())
            include_deleted = rng.random() < 0.5
            indexed += twin._candidates(parsed) is not None
            got = [r["Id"] for r in twin._rows(parsed, include_deleted)]
            assert got == [r["Id"] for r in twin._rows(scan, include_deleted)], (step, soql)
    assert indexed > 200  # the index path was taken, not only the scan


# --- relationship queries ---------------------------------------------------------------------------


def _client(twin: SalesforceTwin, ca_bundle: Path) -> tuple[SalesforceSignIn, str]:
    provider = sign_in(
        twin,
        ca_bundle,
        SalesforceAuth(
            flow="client_credentials", client_id=CLIENT_ID, client_secret=SecretStr(CLIENT_SECRET)
        ),
    )
    return provider, f"{twin.base_url}/services/data/v59.0"


def test_twin_relationship_queries_nest_as_documented(twin: SalesforceTwin, ca_bundle: Path) -> None:
    """Parent fields as a nested record (attributes type and url) or null; subqueries as a nested
    query result or null; more than child_batch_size children: done false and a nextRecordsUrl that
    query/<locator> serves (and that also expires like a top-level locator)."""
    twin.child_batch_size = 2
    seeded = seed(twin, 2)
    lonely = twin.add_row(
        "Opportunity", {"Name": "No account", "StageName": "Prospecting", "CloseDate": START.date()}
    )
    busy = seeded.opportunities[0]
    extra = [
        twin.add_row(
            "OpportunityTeamMember",
            {"OpportunityId": busy, "UserId": seeded.users[0], "TeamMemberRole": f"Role {i}"},
        )
        for i in range(4)
    ]
    provider, base = _client(twin, ca_bundle)
    soql = (
        "SELECT Id, account.Name, Owner.Email, Owner.Title, "
        "(SELECT Id, TeamMemberRole, User.Email FROM opportunityteammembers), "
        "(SELECT Id, Contact.LastName FROM OpportunityContactRoles) "
        "FROM Opportunity ORDER BY Name"
    )
    with requests_session(ca_bundle) as s:
        s.headers["Authorization"] = f"Bearer {provider.token()}"
        body = s.get(f"{base}/query", params={"q": soql}).json()
        records = {r["Id"]: r for r in body["records"]}
        first = records[busy]
        assert list(first) == [
            "attributes",
            "Id",
            "Account",
            "Owner",
            "OpportunityTeamMembers",
            "OpportunityContactRoles",
        ]
        account = twin.tables["Opportunity"][busy]["AccountId"]
        assert first["Account"] == {
            "attributes": {"type": "Account", "url": f"/services/data/v59.0/sobjects/Account/{account}"},
            "Name": twin.tables["Account"][account]["Name"],
        }
        assert set(first["Owner"]) == {"attributes", "Email", "Title"}
        assert first["Owner"]["attributes"]["type"] == "User"
        roles = first["OpportunityContactRoles"]
        assert roles["totalSize"] == 1 and roles["done"] is True and "nextRecordsUrl" not in roles
        assert set(roles["records"][0]) == {"attributes", "Id", "Contact"}
        assert roles["records"][0]["Contact"]["attributes"]["type"] == "Contact"
        # an empty lookup is null, and so is a subquery without children
        assert records[lonely]["Account"] is None and records[lonely]["OpportunityTeamMembers"] is None
        # five team members, two inline: the rest behind the nested result's own locator
        team = first["OpportunityTeamMembers"]
        assert team["totalSize"] == 5 and team["done"] is False and len(team["records"]) == 2
        assert team["records"][0]["attributes"]["type"] == "OpportunityTeamMember"
        rest = s.get(f"{twin.base_url}{team['nextRecordsUrl']}").json()
        assert rest["done"] is True and rest["totalSize"] == 5
        members = [r["Id"] for r in team["records"] + rest["records"]]
        assert members[-4:] == extra and len(set(members)) == 5  # every child once, in order
        assert rest["records"][-1]["User"]["Email"] == twin.tables["User"][seeded.users[0]]["Email"]
        with twin.faults(
            Fault(TwinResponse(400, [{"errorCode": "INVALID_QUERY_LOCATOR", "message": "expired"}]))
        ):
            expired = s.get(f"{twin.base_url}{team['nextRecordsUrl']}")
        assert expired.json()[0]["errorCode"] == "INVALID_QUERY_LOCATOR"
        assert s.get(f"{base}/query/01gNoSuchLocator-2").json()[0]["errorCode"] == "INVALID_QUERY_LOCATOR"
    provider.close()


def test_children_count_toward_the_batch_size(twin: SalesforceTwin, ca_bundle: Path) -> None:
    """'Child objects count toward the number of records for the batch size' (Query Options header):
    a page of parents with children holds fewer parents; one parent per page at least."""
    seed(twin, 300)  # five records per opportunity on average (itself, 1 role, 1-2 members and items)
    provider, base = _client(twin, ca_bundle)
    soql = "SELECT Id, (SELECT Id FROM OpportunityLineItems), (SELECT Id FROM OpportunityTeamMembers) FROM Opportunity"
    with requests_session(ca_bundle) as s:
        s.headers["Authorization"] = f"Bearer {provider.token()}"
        s.headers["Sforce-Query-Options"] = "batchSize=200"
        sizes, url = [], f"{base}/query?q={soql}"
        while url:
            body = s.get(url).json()
            weights = [
                1
                + sum(
                    len((r[k] or {"records": []})["records"])
                    for k in ("OpportunityLineItems", "OpportunityTeamMembers")
                )
                for r in body["records"]
            ]
            assert sum(weights) <= 200
            sizes.append(len(body["records"]))
            url = f"{twin.base_url}{body['nextRecordsUrl']}" if not body["done"] else ""
        assert sum(sizes) == 300 and max(sizes) < 200  # 1 + 1..2 + 1..2 records per opportunity
        plain = s.get(f"{base}/query", params={"q": "SELECT Id FROM Opportunity"}).json()
        assert len(plain["records"]) == 200  # without subqueries: the batch size in parents
    provider.close()


def test_queryall_subqueries_return_deleted_children_and_lookups_to_deleted_rows_are_null(
    twin: SalesforceTwin, ca_bundle: Path
) -> None:
    seeded = seed(twin, 1)
    opp = seeded.opportunities[0]
    member = next(r["Id"] for r in twin.tables["OpportunityTeamMember"].values() if r["OpportunityId"] == opp)
    twin.delete_row("OpportunityTeamMember", member)
    twin.delete_row("Account", twin.tables["Opportunity"][opp]["AccountId"])
    provider, base = _client(twin, ca_bundle)
    soql = "SELECT Id, Account.Name, (SELECT Id, IsDeleted FROM OpportunityTeamMembers) FROM Opportunity"
    with requests_session(ca_bundle) as s:
        s.headers["Authorization"] = f"Bearer {provider.token()}"
        live = s.get(f"{base}/query", params={"q": soql}).json()["records"][0]
        every = s.get(f"{base}/queryAll", params={"q": soql}).json()["records"][0]
    assert live["Account"] is None and every["Account"] is None
    assert live["OpportunityTeamMembers"] is None  # its only member is in the recycle bin
    assert every["OpportunityTeamMembers"]["records"] == [
        {
            "attributes": {
                "type": "OpportunityTeamMember",
                "url": f"/services/data/v59.0/sobjects/OpportunityTeamMember/{member}",
            },
            "Id": member,
            "IsDeleted": True,
        }
    ]
    provider.close()


def test_twin_refuses_relationship_queries_salesforce_refuses(twin: SalesforceTwin) -> None:
    cases = {
        # unknown lookups and fields on either side, in Salesforce's words and codes
        "SELECT Id, Acount.Name FROM Opportunity": (
            "INVALID_FIELD",
            "Didn't understand relationship 'Acount' in field path",
        ),
        "SELECT Id, AccountId.Name FROM Opportunity": (
            "INVALID_FIELD",
            "Didn't understand relationship 'AccountId'",
        ),
        "SELECT Id, Account.Nope FROM Opportunity": (
            "INVALID_FIELD",
            "No such column 'Nope' on entity 'Account'",
        ),
        "SELECT Id, Owner.Account.Name FROM Opportunity": (
            "INVALID_FIELD",
            "relationship 'Account' in field path",
        ),
        "SELECT Id, Account FROM Opportunity": ("INVALID_FIELD", "No such column 'Account'"),
        "SELECT Id, (SELECT Id FROM Contacts) FROM Opportunity": (
            "INVALID_TYPE",
            "Didn't understand relationship 'Contacts' in FROM part of query call",
        ),
        "SELECT Id, (SELECT Id FROM OpportunityContactRole) FROM Opportunity": (
            "INVALID_TYPE",
            "relationship",
        ),
        "SELECT Id, (SELECT Id FROM Account) FROM Opportunity": ("INVALID_TYPE", "relationship 'Account'"),
        "SELECT Id, (SELECT Nope FROM OpportunityContactRoles) FROM Opportunity": (
            "INVALID_FIELD",
            "No such column 'Nope' on entity 'OpportunityContactRole'",
        ),
        "SELECT Id, (SELECT Contact.Nope FROM OpportunityContactRoles) FROM Opportunity": (
            "INVALID_FIELD",
            "No such column 'Nope' on entity 'Contact'",
        ),
        "SELECT Id, (SELECT Id FROM OpportunityLineItems) FROM Account": ("INVALID_TYPE", "relationship"),
        # beyond the twin's subset (Salesforce takes them), or malformed
        "SELECT Id, (SELECT Id FROM OpportunityLineItems WHERE ProductCode = 'x') FROM Opportunity": (
            "MALFORMED_QUERY",
            "subquery",
        ),
        "SELECT Id, (SELECT Id, (SELECT Id FROM Contacts) FROM OpportunityContactRoles) FROM Opportunity": (
            "MALFORMED_QUERY",
            "subquery",
        ),
        "SELECT Id FROM Opportunity WHERE Account.Name = 'x'": ("MALFORMED_QUERY", "relationship path"),
        "SELECT Id FROM Opportunity ORDER BY Owner.Email": ("MALFORMED_QUERY", "relationship path"),
        "SELECT Id, (SELECT Id FROM OpportunityLineItems FROM Opportunity": ("MALFORMED_QUERY", ""),
        "SELECT Id, Account..Name FROM Opportunity": ("MALFORMED_QUERY", ""),
        "SELECT Id, Account.Name FROM Opportunity.Account": ("MALFORMED_QUERY", ""),
    }
    for query, (code, words) in cases.items():
        with pytest.raises(SoqlError) as info:
            parse(query, twin.schema, RELATIONSHIPS)
        assert (info.value.code, words in info.value.message) == (code, True), (query, info.value.message)
    # case-insensitive names, canonical paths
    parsed = parse(
        "SELECT id, ACCOUNT.name, owner.EMAIL, (SELECT contact.email FROM opportunitycontactroles) FROM opportunity",
        twin.schema,
        RELATIONSHIPS,
    )
    assert parsed.fields == ["Id", "Account.Name", "Owner.Email"]
    assert list(parsed.select) == ["Id", "Account", "Owner", "OpportunityContactRoles"]
    assert parsed.has_subqueries and not parsed.plain


def test_bulk_reads_parent_fields_as_columns_and_refuses_subqueries(
    twin: SalesforceTwin, ca_bundle: Path
) -> None:
    seeded = seed(twin, 2)
    lonely = twin.add_row(
        "Opportunity", {"Name": "Alone", "StageName": "Prospecting", "CloseDate": START.date()}
    )
    provider, base = _client(twin, ca_bundle)
    twin.bulk_polls_in_progress = 0
    with requests_session(ca_bundle) as s:
        s.headers["Authorization"] = f"Bearer {provider.token()}"
        refused = s.post(
            f"{base}/jobs/query",
            json={
                "operation": "query",
                "query": "SELECT Id, (SELECT Id FROM OpportunityLineItems) FROM Opportunity",
            },
        )
        assert refused.status_code == 400 and refused.json()[0]["errorCode"] == "INVALIDJOB"
        job = s.post(
            f"{base}/jobs/query",
            json={
                "operation": "query",
                "query": "SELECT Id, Account.Name, Owner.Email FROM Opportunity ORDER BY Name",
            },
        ).json()
        s.get(f"{base}/jobs/query/{job['id']}")
        text = s.get(f"{base}/jobs/query/{job['id']}/results").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["Id", "Account.Name", "Owner.Email"]
    by_id = {r["Id"]: r for r in rows}
    opp = twin.tables["Opportunity"][seeded.opportunities[0]]
    assert by_id[opp["Id"]]["Account.Name"] == twin.tables["Account"][opp["AccountId"]]["Name"]
    assert by_id[opp["Id"]]["Owner.Email"] == twin.tables["User"][opp["OwnerId"]]["Email"]
    assert by_id[lonely]["Account.Name"] == "" and by_id[lonely]["Owner.Email"] == ""
    provider.close()


@pytest.mark.parametrize("rng_seed", range(4))
def test_children_from_the_index_are_what_a_scan_finds(ca: TwinCA, rng_seed: int) -> None:
    """A subquery's children come from the index on the child's reference field: over child rows
    added, moved to another parent, deleted, purged, re-added and rolled back, they are exactly the
    rows a scan of the child table finds, in table order."""
    rng = random.Random(rng_seed)
    twin = SalesforceTwin(ca, clock=Clock(START))
    parents = [
        twin.add_row("Opportunity", {"Name": f"o{i}", "StageName": "Prospecting", "CloseDate": START.date()})
        for i in range(4)
    ]
    choices = [*parents, None]
    purged: list[str] = []
    rel = RELATIONSHIPS["Opportunity"]["OpportunityContactRoles"]
    table = twin.tables["OpportunityContactRole"]

    def values() -> dict[str, object]:
        return {
            "OpportunityId": rng.choice(choices),
            "ContactId": "003Tw0000000000AAA",
            "IsPrimary": rng.random() < 0.3,
        }

    checked = 0
    for _step in range(200):
        table = twin.tables["OpportunityContactRole"]
        ids = list(table)
        live = [i for i in ids if not table[i]["IsDeleted"]]
        action = rng.randrange(6)
        if action == 0 or not live:
            twin.add_row("OpportunityContactRole", values())
        elif action == 1:
            twin.update_row(
                "OpportunityContactRole", rng.choice(live), {"OpportunityId": rng.choice(choices)}
            )
        elif action == 2:
            twin.delete_row("OpportunityContactRole", rng.choice(live))
        elif action == 3:
            binned = [i for i in ids if table[i]["IsDeleted"]]
            if binned:
                purged.append(rng.choice(binned))
                twin.purge_row("OpportunityContactRole", purged[-1])
        elif action == 4 and purged:
            twin.add_row("OpportunityContactRole", {**values(), "Id": purged.pop()})
        elif action == 5 and len(live) >= 2:
            records = [
                {
                    "attributes": {"type": "OpportunityContactRole"},
                    "id": live[0],
                    "OpportunityId": rng.choice(parents),
                },
                {"attributes": {"type": "OpportunityContactRole"}, "id": live[1], "Nope__c": 1},
            ]
            body = json.dumps({"allOrNone": True, "records": records}).encode()
            response = twin._collection(TwinRequest("PATCH", "/", {}, {}, body), creating=False)
            assert not response.body[0]["success"]
        children_of = twin._children_of(rel)
        for parent in parents:
            scan = [r for r in twin.tables["OpportunityContactRole"].values() if r["OpportunityId"] == parent]
            assert children_of(parent) == scan
            checked += bool(scan)
    assert checked > 100


@settings(max_examples=300)
@given(
    st.datetimes(
        min_value=datetime(1971, 1, 1),  # noqa: DTZ001 - hypothesis takes naive bounds
        max_value=datetime(2200, 1, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    st.integers(-14 * 60, 14 * 60),
    st.sampled_from(["+hhmm", "+hh:mm", "Z", "none"]),
    st.booleans(),
)
def test_the_datetime_fast_path_agrees_with_the_full_parser(
    when: datetime, offset_minutes: int, style: str, millis: bool
) -> None:
    """REST's ``2025-03-03T12:00:00.000+0000`` goes through fromisoformat directly; whatever it
    parses must be what the full parser gives (and what it refuses, the full parser decides)."""
    zone = timezone(timedelta(minutes=offset_minutes)) if style != "Z" else UTC
    local = when.astimezone(zone)
    text = local.strftime("%Y-%m-%dT%H:%M:%S") + (f".{local.microsecond // 1000:03d}" if millis else "")
    sign = "-" if offset_minutes < 0 else "+"
    hh, mm = divmod(abs(offset_minutes), 60)
    text += {"+hhmm": f"{sign}{hh:02d}{mm:02d}", "+hh:mm": f"{sign}{hh:02d}:{mm:02d}", "Z": "Z", "none": ""}[
        style
    ]
    try:
        slow = _parse_sf_datetime(text)
    except ValueError:
        with pytest.raises(ValueError):
            parse_sf_datetime(text)
        assert style == "none"
        return
    fast = parse_sf_datetime(text)
    assert fast == slow and fast.tzinfo is UTC and slow.tzinfo is UTC
    assert fast == when.replace(microsecond=when.microsecond // 1000 * 1000 if millis else 0)
