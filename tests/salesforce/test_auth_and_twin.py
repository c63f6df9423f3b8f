"""Sign-in flows against the twin's token endpoint, and the twin's wire shapes against the published
samples in tests/fixtures/salesforce (copied verbatim from the shared fixtures)."""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from connector.errors import ConfigError, SignInRequired
from connector.remote.http import requests_session
from connector.remote.twin import Clock, TwinCA, TwinRequest
from connector.salesforce.adapter import parse_sf_datetime
from connector.salesforce.auth import SalesforceSignIn, jwt_audience
from connector.salesforce.twin import SalesforceTwin, seed
from connector.salesforce.twin_soql import parse
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
