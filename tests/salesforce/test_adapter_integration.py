"""The Salesforce adapter driving real simple-salesforce over real HTTPS against the twin.

Every test runs with REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE naming an unrelated CA (conftest), so each one
also proves the adapter's session trusts exactly the connector's CA bundle.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.domain.model import DealType, Solution, SolutionKind, StandardStage, Status, Substatus
from connector.domain.stages import Band, StageMapping, StageTarget
from connector.errors import ConfigError, RateLimited
from connector.remote.twin import Clock, Fault, TwinCA, TwinResponse
from connector.salesforce.adapter import Cursor, PullPage, SalesforceAdapter
from connector.salesforce.auth import SalesforceSignIn
from connector.salesforce.twin import SalesforceTwin, seed
from connector.seams import CrmChange, CrmWrite
from tests.salesforce.conftest import NO_SLEEP, START, MakeAdapter, crm_settings

pytestmark = pytest.mark.integration


def ids_of(pages: list[PullPage]) -> list[str]:
    return [r.deal.crm_id or "" for p in pages for r in p.rows]


def soql_to(twin: SalesforceTwin, sobject: str) -> list[str]:
    return [q for q in twin.soql_log() if f" FROM {sobject} " in q + " "]


def opportunity_pages(twin: SalesforceTwin) -> int:
    """GET requests that returned a page of the opportunity scan (first page + nextRecordsUrl pages)."""
    first = [
        r
        for r in twin.calls("GET", "/services/data/")
        if (r.arg("q") or "").startswith("SELECT Id, Name, StageName")
    ]
    more = [r for r in twin.calls("GET", "/services/data/") if "/queryAll/01g" in r.path]
    return len(first) + len(more)


# --- transport and trust -----------------------------------------------------------------------------


def test_requests_would_trust_the_environment_but_the_adapter_does_not(
    twin: SalesforceTwin, make_adapter: MakeAdapter, ca_bundle: Path
) -> None:
    plain = requests.Session()
    plain.verify = str(ca_bundle)  # silently replaced by REQUESTS_CA_BUNDLE while trust_env is on
    with plain, pytest.raises(requests.exceptions.SSLError):
        plain.get(f"{twin.base_url}/services/data/v59.0/limits")
    seed(twin, 3)
    assert len(ids_of(list(make_adapter().pull(None)))) == 3


# --- incremental reads ---------------------------------------------------------------------------------


def test_full_load_then_incremental_sees_creates_updates_and_maps_related_data(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seeded = seed(twin, 20)
    twin.update_row("Opportunity", seeded.opportunities[5], {"Sync_with_Partner_Center__c": False})
    adapter = make_adapter()
    first = list(adapter.pull(None))
    assert len(first) == 1 and first[0].full_resync
    assert sorted(ids_of(first)) == sorted(o for i, o in enumerate(seeded.opportunities) if i != 5)
    row = first[0].rows[0]
    deal = row.deal
    assert deal.customer is not None and deal.customer.address.country == "US"
    assert deal.customer_contact is not None and deal.customer_contact.email.endswith("@customer.example")
    assert deal.team and all(m.email.endswith("@partner.example") for m in deal.team)
    assert deal.solutions and deal.solutions[0].id.startswith("SOL-")
    assert deal.value is not None and deal.value.currency == "USD"
    assert deal.updated_at is not None and deal.updated_at.tzinfo is UTC
    assert row.stage_name and deal.deal_type is DealType.PARTNER_LED

    twin.clock.advance(timedelta(minutes=10))
    twin.update_row("Opportunity", seeded.opportunities[1], {"Amount": 5.0})
    twin.update_row("Opportunity", seeded.opportunities[5], {"Sync_with_Partner_Center__c": True})
    new = twin.add_row(
        "Opportunity",
        {
            "Name": "Fresh",
            "StageName": "Prospecting",
            "CloseDate": START.date(),
            "Sync_with_Partner_Center__c": True,
        },
    )
    twin.clock.advance(timedelta(seconds=1))
    second = list(make_adapter().pull(first[-1].cursor))
    assert not any(p.full_resync for p in second)
    assert sorted(ids_of(second)) == sorted([seeded.opportunities[1], seeded.opportunities[5], new])
    fresh = next(r for p in second for r in p.rows if r.deal.crm_id == new)
    assert fresh.deal.customer is None and fresh.probability == 10


def test_stage_mapping_and_closed_flags(twin: SalesforceTwin, make_adapter: MakeAdapter) -> None:
    adapter = make_adapter()
    stages = adapter.stages()
    mapping = StageMapping(
        stages=tuple(stages),
        bands=(
            Band(0, 19, StageTarget.open(StandardStage.ACCEPTED)),
            Band(20, 49, StageTarget.open(StandardStage.QUALIFIED)),
            Band(50, 100, StageTarget.open(StandardStage.PROPOSED)),
        ),
    )
    won = twin.add_row(
        "Opportunity",
        {
            "Name": "W",
            "StageName": "Closed Won",
            "CloseDate": START.date(),
            "Sync_with_Partner_Center__c": True,
        },
    )
    open_ = twin.add_row(
        "Opportunity",
        {
            "Name": "O",
            "StageName": "Needs Analysis",
            "CloseDate": START.date(),
            "Sync_with_Partner_Center__c": True,
        },
    )
    rows = {r.deal.crm_id: r.deal for p in make_adapter(stage_mapping=mapping).pull(None) for r in p.rows}
    assert rows[won].status is Status.CLOSED and rows[won].substatus is Substatus.WON
    assert rows[won].sales_stage is StandardStage.WON
    assert rows[open_].sales_stage is StandardStage.QUALIFIED
    assert rows[open_].crm_stage is not None and rows[open_].crm_stage.label == "Needs Analysis"
    assert rows[open_].crm_stage.probability == 20 and rows[open_].crm_stage.modified == START


def test_apply_maps_canonical_changes_onto_configured_fields(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seeded = seed(twin, 2)
    adapter = make_adapter(fields={"notes": "Description"})
    list(adapter.pull(None))  # a run: describe tells the adapter this org is multi-currency
    results = adapter.apply(
        [
            CrmChange(
                seeded.opportunities[0],
                fields={
                    "value": 1234.5,
                    "currency": "EUR",
                    "close_date": "2025-06-30",
                    "notes": "n",
                    "team": [],
                },
                stage="Closed Won",
                referral_id="ref-1",
                sync_status="blocked: terminal-immutable",
                audit_line="pc->crm stage",
                synced_at=twin.stamp(),
                key="c1",
            ),
            CrmChange(
                None, fields={"name": "From PC", "close_date": "2025-07-01"}, stage="Prospecting", key="c2"
            ),
        ]
    )
    assert [r.key for r in results] == ["c1", "c2"] and all(r.ok for r in results)
    assert results[0].extra["skipped"] == ["team"]
    row = twin.tables["Opportunity"][seeded.opportunities[0]]
    assert (row["Amount"], row["CurrencyIsoCode"], row["StageName"], row["IsWon"]) == (
        1234.5,
        "EUR",
        "Closed Won",
        True,
    )
    assert row["Partner_Center_Sync_Status__c"] == "blocked: terminal-immutable"
    assert twin.tables["Opportunity"][results[1].crm_id or ""]["Name"] == "From PC"


def test_solutions_are_written_as_the_crms_codes_and_read_back_as_ours(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seeded = seed(twin, 1)
    opp = seeded.opportunities[0]
    adapter = make_adapter(
        fields={"solutions": "Partner_Center_Solutions__c"},
        solution_map={"AZ-DATA": Solution(SolutionKind.OWN, "SOL-34104-EBB")},
    )
    list(adapter.pull(None))
    [result] = adapter.apply(
        [CrmChange(opp, fields={"solutions": ["SOL-34104-EBB", "SOL-UNMAPPED"]}, key="s")]
    )
    assert result.ok, result.message
    # the multi-select holds the CRM's code for a mapped solution; an unmapped id goes as itself
    assert twin.tables["Opportunity"][opp]["Partner_Center_Solutions__c"] == "AZ-DATA;SOL-UNMAPPED"
    [deal] = adapter.get([opp])
    assert sorted(s.id for s in deal.solutions) == ["SOL-34104-EBB", "SOL-UNMAPPED"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(0, 5)),
            st.tuples(st.just("late"), st.integers(0, 5), st.integers(0, 240)),
            st.tuples(st.just("tick"), st.integers(0, 90)),
            st.tuples(st.just("pull")),
        ),
        max_size=12,
    )
)
def test_no_interleaving_of_writes_late_commits_and_pulls_loses_a_change(
    ca: TwinCA, ca_bundle_session: Path, steps: list[tuple[Any, ...]]
) -> None:
    """Equal second-granular stamps, pulls in the middle of a second, and transactions committed up
    to 4 minutes after their stamp (lookback 5 minutes): the last version of every record is seen."""
    with SalesforceTwin(ca, clock=Clock(START)) as twin:
        assert isinstance(twin, SalesforceTwin)
        opps = [
            twin.add_row(
                "Opportunity",
                {
                    "Name": f"o{i}",
                    "StageName": "Prospecting",
                    "CloseDate": START.date(),
                    "Description": "v0",
                    "Sync_with_Partner_Center__c": True,
                },
            )
            for i in range(6)
        ]
        written = dict.fromkeys(opps, "v0")
        seen: dict[str, str] = {}
        cursor: list[str | None] = [None]
        version = 0
        crm = crm_settings(twin)
        sign_in = SalesforceSignIn(crm, ca_bundle=ca_bundle_session, policy=NO_SLEEP)
        with SalesforceAdapter(crm, ca_bundle=ca_bundle_session, sign_in=sign_in, policy=NO_SLEEP) as adapter:

            def pull() -> None:
                adapter.reset_run()
                for page in adapter.pull(cursor[0]):
                    for row in page.rows:
                        seen[row.deal.crm_id or ""] = row.deal.notes
                    cursor[0] = page.cursor or cursor[0]

            for step in steps:
                version += 1
                if step[0] == "write":
                    twin.update_row("Opportunity", opps[step[1]], {"Description": f"v{version}"})
                    written[opps[step[1]]] = f"v{version}"
                elif step[0] == "late":
                    # stamped step[2] seconds ago, visible only now
                    when = twin.stamp() - timedelta(seconds=step[2])
                    if when >= START:
                        twin.update_row(
                            "Opportunity", opps[step[1]], {"Description": f"v{version}"}, stamp=when
                        )
                        written[opps[step[1]]] = f"v{version}"
                elif step[0] == "tick":
                    twin.clock.advance(timedelta(seconds=step[1]))
                else:
                    pull()
            twin.clock.advance(timedelta(seconds=1))
            pull()
    # A late commit can carry an older version number than what is stored... only the stored value counts.
    assert seen == {o: twin.tables["Opportunity"][o]["Description"] for o in opps}
    assert set(written) == set(seen)


@pytest.fixture(scope="module")
def ca_bundle_session(ca: TwinCA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca.write_pem(tmp_path_factory.mktemp("ca") / "connector-ca.pem")


def test_many_rows_sharing_one_timestamp_across_pages(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    """2,100 rows with a single SystemModstamp: nextRecordsUrl paging, then a locator that expires
    mid-scan and a keyset resume — every row still arrives."""
    seeded = seed(twin, 2100, stamps=1)
    pages = list(make_adapter().pull(None))
    assert sorted(set(ids_of(pages))) == sorted(seeded.opportunities)
    assert len(pages) == 2

    expired = Fault(
        TwinResponse(400, [{"message": "invalid query locator", "errorCode": "INVALID_QUERY_LOCATOR"}]),
        match=lambda r: "/queryAll/01g" in r.path,
    )
    with twin.faults(expired):
        again = list(make_adapter().pull(None))
    assert set(ids_of(again)) == set(seeded.opportunities)


def test_deletes_are_seen_soft_and_hard_when_every_run_sweeps(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    """delete_sweep 0: getDeleted every run, as before the sweep became periodic."""
    seeded = seed(twin, 10)
    first = list(make_adapter().pull(None))
    twin.clock.advance(timedelta(minutes=3))
    soft, hard = seeded.opportunities[2], seeded.opportunities[7]
    twin.delete_row("Opportunity", soft)
    twin.hard_delete_row("Opportunity", hard)  # only getDeleted still knows
    twin.clock.advance(timedelta(minutes=2))
    pages = list(make_adapter(delete_sweep=timedelta(0)).pull(first[-1].cursor))
    deleted = {d for p in pages for d in p.deleted_ids}
    assert {soft, hard} <= deleted
    assert soft not in ids_of(pages) and not any(p.full_resync for p in pages)
    assert twin.request_count("/sobjects/Opportunity/deleted") == 1


def test_cursor_older_than_the_delete_window_forces_a_full_resync(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seed(twin, 5)
    cursor = list(make_adapter().pull(None))[-1].cursor
    twin.clock.advance(timedelta(days=16))
    adapter = make_adapter()
    pages = list(adapter.pull(cursor))
    assert pages and all(p.full_resync for p in pages)
    assert "15-day" in adapter.last_full_resync_reason
    assert len(ids_of(pages)) == 5
    # ...and a delete log purged past the cursor does the same
    cursor = pages[-1].cursor
    twin.clock.advance(timedelta(hours=1))
    twin.purge_delete_log(twin.stamp())
    twin.clock.advance(timedelta(hours=1))
    adapter = make_adapter(delete_sweep=timedelta(hours=1))  # the sweep is due
    assert all(p.full_resync for p in adapter.pull(cursor))
    assert "purged" in adapter.last_full_resync_reason


def test_cursor_values_come_from_salesforce_never_the_local_clock(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seed(twin, 3)
    pages = list(make_adapter().pull(None))
    assert pages[-1].cursor is not None
    cursor = Cursor.decode(pages[-1].cursor)
    assert cursor.ts == START and cursor.deletes == START  # the twin's clock (2025), not today's date


def test_session_expiry_mid_run_is_transparent(twin: SalesforceTwin, make_adapter: MakeAdapter) -> None:
    seeded = seed(twin, 2100)
    adapter = make_adapter()
    seen: list[str] = []
    for i, page in enumerate(adapter.pull(None)):
        seen += [r.deal.crm_id or "" for r in page.rows]
        if i == 0:
            twin.expire_sessions()
    assert sorted(seen) == sorted(seeded.opportunities)
    assert twin.sign_ins == ["password", "password"]


RELATED_OBJECTS = (
    "Account",
    "OpportunityContactRole",
    "Contact",
    "OpportunityTeamMember",
    "User",
    "OpportunityLineItem",
)


def test_reading_pages_costs_query_pages_and_no_related_queries(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    """Related data comes with the opportunities (relationship fields and subqueries): not one query
    per related object and page (before: 6+ per page, ~130 at 10,000 opportunities). Child records
    count toward Salesforce's 2,000-record batch, so its pages hold fewer opportunities; the adapter
    joins them back into pages of 2,000."""
    n = 4100
    seed(twin, n)
    adapter = make_adapter()
    pages = list(adapter.pull(None))
    assert len(ids_of(pages)) == n
    assert [len(p.rows) for p in pages] == [2000, 2000, 100]
    # the seed gives each opportunity one contact role and one or two team members and line items
    # (alternating): five records a deal on average, so 400 deals fill a 2,000-record batch
    assert opportunity_pages(twin) == math.ceil(n / 400) == 11
    assert {obj: len(soql_to(twin, obj)) for obj in RELATED_OBJECTS} == dict.fromkeys(RELATED_OBJECTS, 0)
    # sign-in, two describes, OpportunityStage, RecordType, the count, 11 query pages
    assert len(twin.calls()) == 17, len(twin.calls())


def test_bulk_api_2_for_a_large_initial_load(twin: SalesforceTwin, make_adapter: MakeAdapter) -> None:
    seeded = seed(twin, 120)
    adapter = make_adapter(bulk_threshold=50)
    adapter._bulk_page_size = 50  # three result pages
    pages = list(adapter.pull(None))
    assert sorted(ids_of(pages)) == sorted(seeded.opportunities)
    assert [p.cursor is None for p in pages] == [True, True, False]
    assert all(p.full_resync for p in pages)
    assert len(twin.calls("POST", "/services/data/v59.0/jobs/query")) == 1
    # epoch-millisecond datetimes from Bulk are normalised like REST's ISO strings
    assert {r.system_modstamp.tzinfo for p in pages for r in p.rows} == {UTC}
    rest = {r.deal.crm_id: r.deal for p in make_adapter().pull(None) for r in p.rows}
    bulk = {r.deal.crm_id: r.deal for p in pages for r in p.rows}
    assert rest == bulk


def test_stages_with_record_types_are_read_once_and_cached(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    twin.add_record_type("Partner_Deal", ("Prospecting", "Closed Won", "Closed Lost"))
    adapter = make_adapter()
    stages = adapter.stages()
    by_label = {s.label: s for s in stages}
    assert (
        by_label["Closed Won"].is_won
        and by_label["Closed Lost"].is_closed
        and not by_label["Closed Lost"].is_won
    )
    assert by_label["Prospecting"].record_types == frozenset({"Partner_Deal"})
    assert by_label["Needs Analysis"].record_types == frozenset()
    before = len(twin.calls())
    assert adapter.stages() is stages and len(twin.calls()) == before


def test_get_by_ids(twin: SalesforceTwin, make_adapter: MakeAdapter) -> None:
    seeded = seed(twin, 8)
    deals = make_adapter().get(seeded.opportunities[:3])
    assert sorted(d.crm_id or "" for d in deals) == sorted(seeded.opportunities[:3])


def test_missing_custom_fields_are_a_config_error(twin: SalesforceTwin, make_adapter: MakeAdapter) -> None:
    with pytest.raises(ConfigError, match="Nope__c"):
        list(make_adapter(fields={"referral_id": "Nope__c"}).pull(None))
    with pytest.raises(ConfigError, match="unknown field role"):
        make_adapter(fields={"wat": "Name"})


def test_unrecognised_country_isolates_the_record(twin: SalesforceTwin, make_adapter: MakeAdapter) -> None:
    seeded = seed(twin, 8)  # two accounts, alternating
    twin.update_row("Account", seeded.accounts[0], {"BillingCountry": "Atlantis"})
    pages = list(make_adapter().pull(None))
    failures = [f for p in pages for f in p.failures]
    assert {f.cause for f in failures} == {"country-unmapped"}
    assert sorted(f.record_id for f in failures) == sorted(seeded.opportunities[0::2])
    assert sorted(ids_of(pages)) == sorted(seeded.opportunities[1::2])


# --- writes ----------------------------------------------------------------------------------------------


def test_one_bad_record_in_a_collection_does_not_sink_the_others(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seeded = seed(twin, 201)
    adapter = make_adapter()
    now = twin.stamp()
    writes = [
        adapter.sync_write(
            o,
            referral_id=f"ref-{i}",
            status="Synced",
            synced_at=now,
            audit="x" * 300,
            idempotency_key=f"k{i}",
        )
        for i, o in enumerate(seeded.opportunities)
    ]
    writes[57] = adapter.sync_write(
        seeded.opportunities[57], extra={"StageName": "Not A Stage"}, idempotency_key="k57"
    )
    twin.lock_rows([seeded.opportunities[120]], times=1)  # transient: retried and saved
    twin.lock_rows([seeded.opportunities[150]], times=99)  # stays locked: reported
    twin.validation_rules.append(
        lambda obj, row: (
            "Amount must be set" if row.get("Partner_Center_Referral_Id__c") == "ref-180" else None
        )
    )
    results = adapter.write(writes)
    assert [r.key for r in results] == [f"k{i}" for i in range(201)]
    failed = {r.key: r.error_code for r in results if not r.ok}
    assert failed == {
        "k57": "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
        "k150": "UNABLE_TO_LOCK_ROW",
        "k180": "FIELD_CUSTOM_VALIDATION_EXCEPTION",
    }
    assert results[150].extra["retryable"] is True
    row = twin.tables["Opportunity"][seeded.opportunities[120]]
    assert row["Partner_Center_Referral_Id__c"] == "ref-120" and len(row["Partner_Center_Audit__c"]) == 255
    assert twin.tables["Opportunity"][seeded.opportunities[0]]["Partner_Center_Last_Sync__c"] == now
    patches = twin.calls("PATCH", "/services/data/v59.0/composite/sobjects")
    assert [len(r.json()["records"]) for r in patches] == [200, 2, 1, 1, 1, 1]  # lock retries, then the 201st
    assert all(r.json()["allOrNone"] is False for r in patches)


def test_creates_report_required_fields_per_record(twin: SalesforceTwin, make_adapter: MakeAdapter) -> None:
    adapter = make_adapter()
    results = adapter.write(
        [
            CrmWrite(
                None,
                {"Name": "New deal", "StageName": "Prospecting", "CloseDate": START.date()},
                idempotency_key="a",
            ),
            CrmWrite(None, {"Name": "No stage"}, idempotency_key="b"),
            CrmWrite(
                None,
                {"Name": "Naive", "Partner_Center_Last_Sync__c": datetime(2025, 1, 1)},  # noqa: DTZ001
                idempotency_key="c",
            ),
        ]
    )
    assert results[0].ok and results[0].crm_id in twin.tables["Opportunity"]
    assert not results[1].ok and results[1].error_code == "REQUIRED_FIELD_MISSING"
    assert results[1].extra["fields"] == ["StageName", "CloseDate"]
    assert not results[2].ok and results[2].error_code == "INVALID_VALUE"


def test_if_unmodified_since_turns_a_concurrent_edit_into_a_conflict(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seeded = seed(twin, 2)
    adapter = make_adapter()
    read = {r.deal.crm_id: r for p in adapter.pull(None) for r in p.rows}
    first, second = seeded.opportunities
    version = read[first].deal.version
    assert version is not None
    twin.clock.advance(timedelta(minutes=1))
    twin.update_row("Opportunity", first, {"Amount": 1.0})  # someone else edits after our read
    results = adapter.write(
        [
            CrmWrite(first, {"Amount": 2.0}, based_on=version.value, idempotency_key="stale"),
            CrmWrite(
                second, {"Amount": 3.0}, based_on=read[second].deal.version.value, idempotency_key="fresh"
            ),  # type: ignore[union-attr]
        ]
    )
    assert results[0].conflict and not results[0].ok
    assert results[1].ok
    assert twin.tables["Opportunity"][first]["Amount"] == 1.0
    assert twin.tables["Opportunity"][second]["Amount"] == 3.0


# --- limits ----------------------------------------------------------------------------------------------


def test_the_budget_guard_stops_a_run_cleanly(twin: SalesforceTwin, make_adapter: MakeAdapter) -> None:
    seed(twin, 2100)
    twin.daily_api_limit = 10_000
    probe = make_adapter().pull(None)
    before = twin.api_used
    next(probe)
    first_page_cost = twin.api_used - before  # metadata, count, the query pages of 2,000 deals
    probe.close()
    # the first page's calls and not one more: the second page needs one more query page
    adapter = make_adapter(api_budget_share=(first_page_cost - 0.5) / 10_000)
    got: list[PullPage] = []
    with pytest.raises(RateLimited, match="budget for this run"):
        for page in adapter.pull(None):
            got.append(page)
    assert got and got[0].cursor is not None  # what was read is committable
    assert len(got) == 1


def test_request_limit_exceeded_is_stop_and_resume_later_not_a_retry(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    twin.api_used = twin.daily_api_limit
    adapter = make_adapter()
    with pytest.raises(RateLimited) as info:
        list(adapter.pull(None))
    assert info.value.retry_after == 3600.0
    assert len(twin.calls("GET", "/services/data/v59.0/")) == 1  # refused once, never retried


def test_day_share_stops_before_the_allocation_is_spent(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    twin.api_used = 850
    twin.daily_api_limit = 1000
    with pytest.raises(RateLimited, match="daily API usage"):
        list(make_adapter().pull(None))


# --- related data: relationship queries ----------------------------------------------------------------


def crowd(twin: SalesforceTwin) -> tuple[str, dict[str, Any]]:
    """Three seeded deals; the first gets more children than ``child_batch_size`` (2) of every
    kind, a primary contact role whose contact is gone (null lookup) ahead of the readable primary,
    and a team member in the recycle bin. Returns its id and what its deal must carry."""
    twin.child_batch_size = 2
    seeded = seed(twin, 3)
    opp = seeded.opportunities[0]
    account = twin.tables["Opportunity"][opp]["AccountId"]
    for role in [r for r in twin.tables["OpportunityContactRole"].values() if r["OpportunityId"] == opp]:
        twin.update_row("OpportunityContactRole", role["Id"], {"IsPrimary": False})
    contacts = [
        twin.add_row(
            "Contact",
            {
                "FirstName": "C",
                "LastName": f"Buyer{i}",
                "Email": f"c{i}@customer.example",
                "AccountId": account,
            },
        )
        for i in range(3)
    ]
    twin.delete_row("Contact", contacts[0])
    twin.purge_row("Contact", contacts[0])  # the role still names it: Contact comes back null
    for contact, primary in ((contacts[0], True), (contacts[1], False), (contacts[2], True)):
        twin.add_row(
            "OpportunityContactRole",
            {"OpportunityId": opp, "ContactId": contact, "Role": "Influencer", "IsPrimary": primary},
        )
    users = [
        twin.add_row(
            "User",
            {"FirstName": "U", "LastName": f"Seller{i}", "Email": f"u{i}@partner.example", "IsActive": True},
        )
        for i in range(5)
    ]
    members = [
        twin.add_row(
            "OpportunityTeamMember", {"OpportunityId": opp, "UserId": u, "TeamMemberRole": "Sales Rep"}
        )
        for u in users
    ]
    twin.delete_row("OpportunityTeamMember", members[-1])  # in the recycle bin: queryAll still shows it
    for i in range(3):
        twin.add_row(
            "OpportunityLineItem", {"OpportunityId": opp, "ProductCode": f"EXTRA-{i}", "Quantity": 1.0}
        )
    team = {f"u{i}@partner.example" for i in range(4)}
    return opp, {"contact": "c2@customer.example", "team": team, "codes": {f"EXTRA-{i}" for i in range(3)}}


def child_pages(twin: SalesforceTwin) -> list[str]:
    return [r.path for r in twin.calls("GET", "/services/data/") if "/queryAll/01g" in r.path]


def test_one_query_brings_related_data_and_child_pages_are_followed(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    opp, expected = crowd(twin)
    pages = list(make_adapter().pull(None))
    deals = {r.deal.crm_id: r.deal for p in pages for r in p.rows}
    deal = deals[opp]
    assert deal.customer_contact is not None and deal.customer_contact.email == expected["contact"]
    emails = {m.email for m in deal.team}
    assert expected["team"] <= emails and "u4@partner.example" not in emails  # the deleted member
    owner = twin.tables["User"][twin.tables["Opportunity"][opp]["OwnerId"]]["Email"]
    assert deal.team[0].email == owner and len(emails) == len(deal.team)  # owner first, no duplicates
    assert expected["codes"] <= {s.id for s in deal.solutions} and len(deal.solutions) == 4
    # one opportunity query (a single page); one more page for each of the crowded deal's subqueries
    assert opportunity_pages(twin) == 1 + 3 and len(child_pages(twin)) == 3
    assert {obj: len(soql_to(twin, obj)) for obj in RELATED_OBJECTS} == dict.fromkeys(RELATED_OBJECTS, 0)
    # Bulk API 2.0 has no subqueries: its rows read related data with IN queries, to the same deals
    bulk = {r.deal.crm_id: r.deal for p in make_adapter(bulk_threshold=1).pull(None) for r in p.rows}
    assert bulk == deals
    assert all(soql_to(twin, obj) for obj in RELATED_OBJECTS)


def test_an_expired_child_locator_reads_the_children_by_query(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    opp, expected = crowd(twin)
    reference = {r.deal.crm_id: r.deal for p in make_adapter().pull(None) for r in p.rows}
    expired = Fault(
        TwinResponse(400, [{"message": "invalid query locator", "errorCode": "INVALID_QUERY_LOCATOR"}]),
        match=lambda r: "/queryAll/01g" in r.path,
        times=2,
    )
    seen = len(list(twin.soql_log()))
    with twin.faults(expired):
        again = {r.deal.crm_id: r.deal for p in make_adapter().pull(None) for r in p.rows}
    assert again == reference
    assert (
        again[opp].customer_contact is not None and again[opp].customer_contact.email == expected["contact"]
    )
    fallback = [q for q in list(twin.soql_log())[seen:] if "WHERE OpportunityId = " in q]
    assert [q.split(" FROM ")[1].split(" ")[0] for q in fallback] == [
        "OpportunityContactRole",
        "OpportunityTeamMember",
    ]


def test_get_and_find_by_referral_read_related_data_in_the_same_query(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seeded = seed(twin, 8)
    for i, opp in enumerate(seeded.opportunities[:2]):
        twin.update_row("Opportunity", opp, {"Partner_Center_Referral_Id__c": f"REF-{i}"})
    adapter = make_adapter()
    pulled = {r.deal.crm_id: r.deal for p in adapter.pull(None) for r in p.rows}
    seen = len(twin.calls())
    deals = adapter.get(seeded.opportunities[:3])
    found = adapter.find_by_referral(["REF-0", "REF-1", "REF-404"])
    requests_made = twin.calls()[seen:]
    assert len(requests_made) == 2  # one query each, the related data inside
    for request in requests_made:
        q = request.arg("q") or ""
        assert (
            "Account.Name" in q and "FROM OpportunityContactRoles)" in q and "FROM OpportunityLineItems)" in q
        )
    assert {d.crm_id: d for d in deals} == {o: pulled[o] for o in seeded.opportunities[:3]}
    assert found == {f"REF-{i}": pulled[o] for i, o in enumerate(seeded.opportunities[:2])}


def test_a_solutions_multi_select_leaves_line_items_out_of_the_query(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seeded = seed(twin, 2)
    twin.update_row("Opportunity", seeded.opportunities[0], {"Partner_Center_Solutions__c": "A;B"})
    deals = {
        r.deal.crm_id: r.deal
        for p in make_adapter(fields={"solutions": "Partner_Center_Solutions__c"}).pull(None)
        for r in p.rows
    }
    assert [s.id for s in deals[seeded.opportunities[0]].solutions] == ["A", "B"]
    assert deals[seeded.opportunities[1]].solutions == ()
    assert not [q for q in twin.soql_log() if "OpportunityLineItem" in q]


def test_stage_resolution_is_cached_per_stage_probability_and_record_type(
    twin: SalesforceTwin, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(twin, 60)
    asked: list[tuple[str, int | None, str | None]] = []
    resolve = StageMapping.resolve

    def counting(
        self: StageMapping, label: str, probability: int | None = None, record_type: str | None = None
    ) -> Any:
        asked.append((label, probability, record_type))
        return resolve(self, label, probability, record_type)

    monkeypatch.setattr(StageMapping, "resolve", counting)
    adapter = make_adapter()
    # bands up to 49 only: deals at 50 % and above (open) cannot map
    mapping = StageMapping(
        stages=tuple(adapter.stages()), bands=(Band(0, 49, StageTarget.open(StandardStage.QUALIFIED)),)
    )
    adapter = make_adapter(stage_mapping=mapping)
    pages = list(adapter.pull(None))
    rows = [r for p in pages for r in p.rows]
    failures = [f for p in pages for f in p.failures]
    assert len(rows) + len(failures) == 60 and rows and failures
    assert {f.cause for f in failures} == {"stage-unmapped"}  # every such deal, not only the first
    distinct = {(r.stage_name, r.probability, r.record_type) for r in rows}
    assert len(asked) == len(set(asked)) <= 10 and distinct <= set(asked)
    adapter.refresh_metadata()  # the cache goes with the metadata
    list(adapter.pull(None))
    assert len(asked) == 2 * len(set(asked))


def test_sellers_are_shared_but_no_customer_contact_is_kept_in_a_cache(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    """A daemon keeps no customer's details beyond the record being read: customer contacts are
    built afresh for every read, while the sellers (a few dozen users on thousands of deals) are one
    instance each."""
    from connector.salesforce import adapter as adapter_module

    seeded = seed(twin, 4)
    adapter = make_adapter()
    first = {r.deal.crm_id: r.deal for page in adapter.pull(None) for r in page.rows}
    again = {d.crm_id: d for d in adapter.get(seeded.opportunities)}
    opp = seeded.opportunities[0]
    contact, contact_again = first[opp].customer_contact, again[opp].customer_contact
    assert contact is not None and contact == contact_again and contact is not contact_again
    assert first[opp].team and first[opp].team[0] is again[opp].team[0]
    assert adapter_module._seller.cache_info().currsize > 0
