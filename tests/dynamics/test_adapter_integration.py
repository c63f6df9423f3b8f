"""The real Dynamics adapter, signed in with real msal against the IdP twin, over real HTTPS against
the Dataverse twin. Waits are recorded by the retry policy, never slept."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from structlog.testing import capture_logs

from connector.domain.model import StandardStage, Status, Substatus
from connector.domain.stages import LabelRule, StageMapping, StageTarget
from connector.dynamics.adapter import DynamicsAdapter
from connector.dynamics.twin import API_PATH, EXPIRED_TEXT, THROTTLE_TIME, DataverseTwin, OptionSets
from connector.errors import ConfigError
from connector.remote.idp_twin import IdpTwin
from connector.remote.twin import Clock, TwinCA
from connector.seams import ChangePage, CrmChange, CrmWrite
from tests.dynamics.conftest import AdapterFactory, fixture, start_dataverse

pytestmark = pytest.mark.integration


def _ids(pages: Iterable[ChangePage]) -> set[str]:
    return {d.crm_id for p in pages for d in p.deals if d.crm_id}


def _opted_in(twin: DataverseTwin) -> set[str]:
    return {k for k, r in twin.rows["opportunities"].items() if r["new_syncwithpartnercenter"] is True}


def _client(twin: DataverseTwin, ca: TwinCA) -> httpx.Client:
    return httpx.Client(base_url=twin.base_url + API_PATH, verify=ca.client_context())


# --- reads ---------------------------------------------------------------------------------------


def test_initial_load_reads_opted_in_deals_with_related_data(
    dataverse: DataverseTwin, adapter: DynamicsAdapter
) -> None:
    seeded = dataverse.seed(40, opted_in=0.7)
    oid = next(i for i in seeded.opportunities if i in _opted_in(dataverse))
    dataverse.update("opportunities", oid, new_referralid="ref-123")
    pages = list(adapter.changes(None))
    assert _ids(pages) == _opted_in(dataverse)
    assert not any(p.failures for p in pages)
    assert pages[-1].cursor is not None and pages[-1].cursor.startswith("dv1:delta:https://localhost:")
    assert not any(p.full_resync for p in pages)
    deal = next(d for p in pages for d in p.deals if d.crm_id == oid)
    row = dataverse.row("opportunities", oid)
    account = dataverse.row("accounts", row["_parentaccountid_value"])
    assert deal.referral_id == "ref-123"
    assert deal.customer is not None and deal.customer.name == account["name"]
    assert len(deal.customer.address.country) == 2
    assert deal.customer_contact is not None and deal.customer_contact.email.endswith("@customer.example")
    assert [m.email for m in deal.team] == [
        dataverse.row("systemusers", row["_ownerid_value"])["internalemailaddress"]
    ]
    assert len(deal.solutions) == 2 and all(s.id.startswith("SOL-") for s in deal.solutions)
    currency = dataverse.row("transactioncurrencies", row["_transactioncurrencyid_value"])["isocurrencycode"]
    assert deal.value is not None and deal.value.currency == currency
    assert deal.value.amount == Decimal(str(row["estimatedvalue"]))
    assert deal.close_date is not None and deal.close_date.isoformat() == row["estimatedclosedate"]
    assert deal.notes == row["description"]
    assert deal.version is not None and deal.version.value == f'W/"{row["versionnumber"]}"'
    assert deal.updated_at is not None and deal.updated_at.tzinfo is not None


def test_an_adapter_kept_across_runs_pays_one_call_for_an_idle_run(
    dataverse: DataverseTwin, make_adapter: AdapterFactory, clock: Clock
) -> None:
    dataverse.seed(10)
    adapter = make_adapter(dataverse, now=clock.now)
    calls = adapter.session.calls
    cursor = list(adapter.changes(None))[-1].cursor

    def one_run() -> dict[str, int]:
        nonlocal cursor
        before = calls.snapshot()
        pages = list(adapter.changes(cursor))
        cursor = pages[-1].cursor
        return {
            k.operation: n - before.get(k, 0) for k, n in calls.snapshot().items() if n - before.get(k, 0)
        }

    # the daemon keeps the adapter: the option sets read at the first run are still fresh
    assert sum(one_run().values()) == 1
    clock.advance(timedelta(hours=1, minutes=1))  # past metadata_ttl: orgs do change their stages
    stale = one_run()
    assert stale.get("metadata", 0) >= 1 and sum(stale.values()) == stale["metadata"] + 1
    assert sum(one_run().values()) == 1


def test_delta_tracking_sees_creates_updates_and_deletes(
    dataverse: DataverseTwin, adapter: DynamicsAdapter
) -> None:
    seeded = dataverse.seed(12)
    cursor = list(adapter.changes(None))[-1].cursor
    created = dataverse.insert(
        "opportunities", {"name": "Brand new", "new_syncwithpartnercenter": True, "estimatedvalue": 5}
    )
    dataverse.update("opportunities", seeded.opportunities[0], name="Renamed")
    dataverse.delete("opportunities", seeded.opportunities[1])
    transient = dataverse.insert("opportunities", {"name": "Gone soon", "new_syncwithpartnercenter": True})
    dataverse.delete("opportunities", transient)  # created then deleted: shows as a delete

    pages = list(adapter.changes(cursor))
    deals = {d.crm_id: d for p in pages for d in p.deals}
    assert set(deals) == {created, seeded.opportunities[0]}
    assert deals[seeded.opportunities[0]].name == "Renamed"
    assert {i for p in pages for i in p.deleted_ids} == {seeded.opportunities[1], transient}
    assert not any(p.full_resync for p in pages)
    # nothing new: an empty delta, and a fresh cursor
    again = list(adapter.changes(pages[-1].cursor))
    assert _ids(again) == set() and not any(p.deleted_ids for p in again)
    assert again[-1].cursor and again[-1].cursor != cursor


def test_delta_pages_follow_next_links_and_keep_the_old_cursor_until_the_end(
    dataverse: DataverseTwin, make_adapter: AdapterFactory
) -> None:
    seeded = dataverse.seed(30)
    adapter = make_adapter(dataverse, page_size=4)
    cursor = list(adapter.changes(None))[-1].cursor
    for oid in seeded.opportunities[:10]:
        dataverse.update("opportunities", oid, description="changed")
    pages = list(adapter.changes(cursor))
    assert len(pages) == 3
    assert [p.cursor for p in pages[:-1]] == [cursor, cursor]  # a delta link counts only once all applied
    assert pages[-1].cursor != cursor
    assert _ids(pages) == set(seeded.opportunities[:10])
    tracked = [r for r in dataverse.calls("GET", f"{API_PATH}/opportunities") if r.arg("$deltatoken")]
    assert all(r.headers.get("prefer", "").endswith("odata.maxpagesize=4") for r in tracked)


def test_an_expired_delta_token_leads_to_a_full_resync_with_no_record_lost(
    dataverse: DataverseTwin, make_adapter: AdapterFactory, clock: Clock
) -> None:
    seeded = dataverse.seed(45)
    adapter = make_adapter(dataverse, page_size=7)  # many rows share one modifiedon second
    cursor = list(adapter.changes(None))[-1].cursor
    clock.advance(timedelta(days=8))  # beyond ExpireChangeTrackingInDays (7)
    gap_created = dataverse.insert(
        "opportunities", {"name": "During the gap", "new_syncwithpartnercenter": True}
    )
    dataverse.update("opportunities", seeded.opportunities[3], name="Changed in the gap")
    dataverse.delete("opportunities", seeded.opportunities[4])
    with capture_logs() as logs:
        pages: list[ChangePage] = []
        for page in adapter.changes(cursor):
            if len(pages) == 1:
                # changes while the resync runs: one row already read, one not read yet
                read = next(iter(_ids(pages)))
                dataverse.update("opportunities", read, description="changed after it was read")
                later_created = dataverse.insert(
                    "opportunities", {"name": "Created mid-resync", "new_syncwithpartnercenter": True}
                )
            pages.append(page)
    assert any(e["event"] == "dynamics.full_resync" and e["reason"] == "delta token expired" for e in logs)
    assert all(p.full_resync for p in pages)
    old_token = parse_qs(urlsplit((cursor or "").removeprefix("dv1:delta:")).query)["$deltatoken"][0]
    assert any(r.arg("$deltatoken") == old_token for r in dataverse.requests), "the old token is tried first"
    seen = _ids(pages)
    assert _opted_in(dataverse) - {later_created} <= seen  # every opted-in row present before the resync
    assert gap_created in seen and seeded.opportunities[4] not in seen
    assert all(p.cursor and p.cursor.startswith("dv1:resync:") for p in pages[:-1])
    final = pages[-1].cursor
    assert final is not None and final.startswith("dv1:delta:")
    # the fresh token predates the resync, so what changed meanwhile arrives in the next delta
    after = list(adapter.changes(final))
    assert {read, later_created} <= _ids(after)
    assert not any(p.full_resync for p in after)


def test_the_expired_token_error_is_the_documented_one(
    dataverse: DataverseTwin, make_adapter: AdapterFactory, clock: Clock, ca: TwinCA, idp: IdpTwin
) -> None:
    dataverse.seed(3)
    adapter = make_adapter(dataverse)
    link = (list(adapter.changes(None))[-1].cursor or "").removeprefix("dv1:delta:")
    clock.advance(timedelta(days=7, seconds=1))
    # msal's cache runs on wall time, the IdP twin on the twin clock: ask for a fresh token
    token = adapter.session.tokens.token(force_refresh=True)  # type: ignore[union-attr]
    with httpx.Client(verify=ca.client_context()) as http:
        response = http.get(
            link, headers={"Authorization": f"Bearer {token}", "Prefer": "odata.track-changes"}
        )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == EXPIRED_TEXT


def test_without_change_tracking_the_adapter_polls_modifiedon_with_a_compound_cursor(
    ca: TwinCA, clock: Clock, idp: IdpTwin, make_adapter: AdapterFactory
) -> None:
    twin = start_dataverse(ca, clock, idp, tracking=False)
    try:
        seeded = twin.seed(23, opted_in=0.8)
        adapter = make_adapter(twin, page_size=5)
        with capture_logs() as logs:
            pages = list(adapter.changes(None))
        assert any(e["event"] == "dynamics.full_resync" for e in logs)
        assert all(p.full_resync for p in pages)
        assert _ids(pages) == _opted_in(twin)
        cursor = pages[-1].cursor
        assert cursor is not None and cursor.startswith("dv1:poll:")
        # the opt-in filter is applied by the server in this mode
        filters = [r.arg("$filter") or "" for r in twin.calls("GET", f"{API_PATH}/opportunities")]
        assert all("new_syncwithpartnercenter eq true" in f for f in filters[1:])
        first, second = sorted(_opted_in(twin))[:2]
        clock.advance(timedelta(hours=1))
        twin.update("opportunities", first, name="Polled change")
        run2 = list(adapter.changes(cursor))
        assert first in _ids(run2)  # with everything else still inside the 5-minute lookback
        clock.advance(timedelta(hours=1))
        twin.update("opportunities", second, name="Another polled change")
        run3 = list(adapter.changes(run2[-1].cursor))
        # the row at the previous watermark is inside the lookback window again; nothing older is
        assert _ids(run3) == {first, second}
        assert not any(p.full_resync for p in run2 + run3)
        assert seeded.opportunities
    finally:
        twin.stop()


def test_opt_in_by_filter_is_checked_in_batch_for_tracked_changes(
    dataverse: DataverseTwin, make_adapter: AdapterFactory
) -> None:
    seeded = dataverse.seed(20)
    for i, oid in enumerate(seeded.opportunities):
        dataverse.update("opportunities", oid, closeprobability=80 if i % 2 else 10)
    adapter = make_adapter(dataverse, opt_in_field=None, opt_in_filter="closeprobability ge 50")
    pages = list(adapter.changes(None))
    assert _ids(pages) == set(seeded.opportunities[1::2])


def test_stages_come_from_option_set_metadata(
    ca: TwinCA, clock: Clock, idp: IdpTwin, make_adapter: AdapterFactory
) -> None:
    options = OptionSets(
        salesstage={100000000: "Discover", 100000001: "Shape", 100000002: "Commit"},
        statuscode={
            1: ("In Progress", 0),
            3: ("Won", 1),
            100000005: ("Won via partner", 1),
            4: ("Canceled", 2),
        },
    )
    twin = start_dataverse(ca, clock, idp, options=options)
    try:
        adapter = make_adapter(twin)
        stages = adapter.stages()
        assert [s.label for s in stages if not s.is_closed] == ["Discover", "Shape", "Commit"]
        assert {s.label for s in stages if s.is_won} == {"Won", "Won via partner"}
        assert {s.label for s in stages if s.is_closed and not s.is_won} == {"Canceled"}
        by_status = make_adapter(twin, stage_source="statuscode").stages()
        assert [s.label for s in by_status if not s.is_closed] == ["In Progress"]
        # deals resolve through a mapping validated against those labels
        mapping = StageMapping(
            stages=tuple(stages),
            rules=(
                LabelRule("Discover", StageTarget.open(StandardStage.QUALIFIED)),
                LabelRule("Shape", StageTarget.open(StandardStage.DEVELOPED)),
                LabelRule("Commit", StageTarget.open(StandardStage.NEGOTIATED)),
            ),
        )
        mapped = make_adapter(twin, stage_mapping=mapping)
        open_id = twin.insert(
            "opportunities", {"name": "Open", "salesstage": 100000001, "new_syncwithpartnercenter": True}
        )
        won_id = twin.insert("opportunities", {"name": "Won", "new_syncwithpartnercenter": True})
        twin.update("opportunities", won_id, statecode=1, statuscode=100000005)
        deals = {d.crm_id: d for p in mapped.changes(None) for d in p.deals}
        assert deals[open_id].sales_stage is StandardStage.DEVELOPED
        assert deals[won_id].sales_stage is StandardStage.WON
        assert (deals[won_id].status, deals[won_id].substatus) == (Status.CLOSED, Substatus.WON)
        assert deals[won_id].status_reason == "Won via partner"
    finally:
        twin.stop()


def test_business_process_flow_stage_source(dataverse: DataverseTwin, make_adapter: AdapterFactory) -> None:
    process = "919e14d1-6489-4852-abd0-a63a6ecaac5d"
    stage_ids = [
        dataverse.insert(
            "processstages", {"stagename": name, "stagecategory": cat, "_processid_value": process}
        )
        for cat, name in enumerate(["Qualify", "Develop", "Propose", "Close"])
    ]
    dataverse.insert("processstages", {"stagename": "Other BPF", "stagecategory": 0})
    oid = dataverse.insert("opportunities", {"name": "BPF deal", "new_syncwithpartnercenter": True})
    dataverse.insert(
        "opportunitysalesprocesses",
        {"_opportunityid_value": oid, "_activestageid_value": stage_ids[2], "_processid_value": process},
    )
    adapter = make_adapter(dataverse, stage_source="bpf", bpf_process_id=process)
    labels = [s.label for s in adapter.stages() if not s.is_closed]
    assert labels == ["Qualify", "Develop", "Propose", "Close"]
    mapping = StageMapping(
        stages=tuple(adapter.stages()),
        rules=tuple(
            LabelRule(lab, StageTarget.open(st))
            for lab, st in zip(
                labels,
                [
                    StandardStage.QUALIFIED,
                    StandardStage.DEVELOPED,
                    StandardStage.PROPOSED,
                    StandardStage.NEGOTIATED,
                ],
                strict=True,
            )
        ),
    )
    adapter = make_adapter(dataverse, stage_source="bpf", bpf_process_id=process, stage_mapping=mapping)
    (deal,) = [d for p in adapter.changes(None) for d in p.deals]
    assert deal.sales_stage is StandardStage.PROPOSED


def test_team_from_connections(dataverse: DataverseTwin, make_adapter: AdapterFactory) -> None:
    seeded = dataverse.seed(3)
    oid = seeded.opportunities[0]
    for user in seeded.users[:2]:
        dataverse.insert(
            "connections", {"_record1id_value": oid, "_record2id_value": user, "record2objecttypecode": 8}
        )
    dataverse.insert(
        "connections",
        {"_record1id_value": oid, "_record2id_value": seeded.contacts[0], "record2objecttypecode": 2},
    )
    adapter = make_adapter(dataverse, team_source="connections")
    deals = {d.crm_id: d for p in adapter.changes(None) for d in p.deals}
    emails = {m.email for m in deals[oid].team}
    assert emails == {dataverse.row("systemusers", u)["internalemailaddress"] for u in seeded.users[:2]}
    assert deals[seeded.opportunities[1]].team == ()


def test_get_reads_by_id_in_batches(dataverse: DataverseTwin, adapter: DynamicsAdapter) -> None:
    seeded = dataverse.seed(250)
    adapter.stages()
    before = len(dataverse.requests)
    deals = adapter.get(seeded.opportunities[:230])
    assert {d.crm_id for d in deals} == set(seeded.opportunities[:230])
    new = dataverse.requests[before:]
    assert {r.path for r in new} == {f"{API_PATH}/$batch"}
    assert len(new) == 3  # the opportunities, then two levels of related rows


# --- writes ---------------------------------------------------------------------------------------


def test_update_create_and_a_412_conflict(dataverse: DataverseTwin, adapter: DynamicsAdapter) -> None:
    seeded = dataverse.seed(3)
    deals = {d.crm_id: d for p in adapter.changes(None) for d in p.deals}
    a, b = seeded.opportunities[:2]
    dataverse.update("opportunities", b, name="Edited by a seller meanwhile")
    results = adapter.write(
        [
            CrmWrite(
                a,
                {"name": "Synced name", "estimatedvalue": Decimal("1234.50")},
                based_on=deals[a].version.value,
            ),  # type: ignore[union-attr]
            CrmWrite(b, {"name": "Would overwrite"}, based_on=deals[b].version.value),  # type: ignore[union-attr]
            CrmWrite(
                None,
                {
                    "name": "Created by sync",
                    "new_syncwithpartnercenter": True,
                    "parentaccountid@odata.bind": f"/accounts({seeded.accounts[0]})",
                },
                idempotency_key="k-new",
            ),
        ]
    )
    ok, conflict, created = results
    assert ok.ok and ok.new_version == dataverse.etag("opportunities", a)
    assert dataverse.row("opportunities", a)["estimatedvalue"] == 1234.5
    assert not conflict.ok and conflict.conflict and conflict.error_code == "conflict"
    assert conflict.message == fixture("error-precondition-failed.json")["error"]["message"]
    assert dataverse.row("opportunities", b)["name"] == "Edited by a seller meanwhile"
    assert created.ok and created.key == "k-new" and created.crm_id
    assert dataverse.row("opportunities", created.crm_id)["_parentaccountid_value"] == seeded.accounts[0]
    posts = [p for p in dataverse.batch_parts if p.method == "POST"]
    assert posts and posts[-1].path == f"{API_PATH}/opportunities"


def test_won_and_lost_go_through_the_actions(dataverse: DataverseTwin, adapter: DynamicsAdapter) -> None:
    seeded = dataverse.seed(4)
    won, lost, bad, new_won = *seeded.opportunities[:3], None
    results = adapter.write(
        [
            CrmWrite(
                won,
                {
                    "statecode": 1,
                    "opportunityclose": {
                        "subject": "Won in Partner Center",
                        "actualrevenue": Decimal("90000"),
                        "actualend": "2026-03-01",
                    },
                },
            ),
            CrmWrite(lost, {"statecode": 2, "statuscode": 5, "description": "Lost to a competitor"}),
            CrmWrite(bad, {"statecode": 2, "statuscode": 3}),  # Won is not a Lost status reason
            CrmWrite(new_won, {"name": "Created closed", "statecode": 1}),
        ]
    )
    assert [r.ok for r in results] == [True, True, False, True]
    assert results[2].error_code == "invalid-status"
    row = dataverse.row("opportunities", won)
    assert (row["statecode"], row["statuscode"], row["actualvalue"], row["actualclosedate"]) == (
        1,
        3,
        90000.0,
        "2026-03-01",
    )
    row = dataverse.row("opportunities", lost)
    assert (row["statecode"], row["statuscode"], row["description"]) == (2, 5, "Lost to a competitor")
    assert dataverse.row("opportunities", bad)["statecode"] == 0
    assert dataverse.row("opportunities", results[3].crm_id or "")["statecode"] == 1
    closes = {r["_opportunityid_value"]: r for r in dataverse.rows["opportunitycloses"].values()}
    assert closes[won]["subject"] == "Won in Partner Center" and lost in closes
    actions = [p.path.rsplit("/", 1)[1] for p in dataverse.batch_parts if p.path.endswith("Opportunity")]
    assert actions == ["WinOpportunity", "LoseOpportunity", "WinOpportunity"]
    # no statecode to Won/Lost ever went out in an update
    patches = [p for p in dataverse.batch_parts if p.method == "PATCH"]
    assert len(patches) == 1  # the lost record's description, in the same change set as its action


def test_the_twin_refuses_closing_by_update(
    dataverse: DataverseTwin, adapter: DynamicsAdapter, ca: TwinCA
) -> None:
    oid = dataverse.seed(1).opportunities[0]
    token = adapter.session.tokens.token(force_refresh=True)  # type: ignore[union-attr]
    with _client(dataverse, ca) as http:
        response = http.patch(
            f"/opportunities({oid})",
            json={"statecode": 1, "statuscode": 3},
            headers={"Authorization": f"Bearer {token}", "OData-Version": "4.0", "If-Match": "*"},
        )
        assert response.status_code == 400
        assert "WinOpportunity" in response.json()["error"]["message"]
        assert http.get("/opportunities").status_code == 401  # no bearer token
        bad = http.get("/opportunities", headers={"Authorization": "Bearer forged"})
        assert bad.status_code == 401


def test_a_bad_record_in_a_batch_does_not_sink_the_others(
    dataverse: DataverseTwin, adapter: DynamicsAdapter
) -> None:
    seeded = dataverse.seed(4)
    a, b, c, d = seeded.opportunities
    dataverse.update("opportunities", d, statecode=1, statuscode=3)  # already closed: the action fails
    results = adapter.write(
        [
            CrmWrite(a, {"name": "fine"}),
            CrmWrite(b, {"name": "x" * 301}),  # longer than the column allows
            CrmWrite(c, {"description": "fine too"}),
            CrmWrite(d, {"description": "rolled back with its action", "statecode": 2}),
            CrmWrite("00000000-0000-0000-0000-000000000001", {"name": "missing row"}),
        ]
    )
    assert [r.ok for r in results] == [True, False, True, False, False]
    assert results[1].error_code == "0x80044331" and "maximum allowed length of '300'" in results[1].message
    assert results[4].error_code == "not-found"
    assert dataverse.row("opportunities", a)["name"] == "fine"
    assert dataverse.row("opportunities", c)["description"] == "fine too"
    # the change set of d is atomic: its PATCH was undone when its LoseOpportunity failed
    assert dataverse.row("opportunities", d)["description"] != "rolled back with its action"
    assert len(dataverse.calls("POST", f"{API_PATH}/$batch")) == 1


def test_429_retry_after_is_honoured_on_reads_and_writes(
    dataverse: DataverseTwin, adapter: DynamicsAdapter, waits: list[float]
) -> None:
    seeded = dataverse.seed(5)
    dataverse.throttle(times=2, retry_after=7, match=lambda r: r.path == f"{API_PATH}/opportunities")
    pages = list(adapter.changes(None))
    assert _ids(pages) == set(seeded.opportunities)
    assert waits == [7, 7]
    dataverse.throttle(times=1, retry_after=11, code=THROTTLE_TIME, match=lambda r: r.path.endswith("$batch"))
    results = adapter.write([CrmWrite(seeded.opportunities[0], {"name": "after throttling"})])
    assert results[0].ok and waits == [7, 7, 11]
    throttled = sum(n for k, n in adapter.session.calls.snapshot().items() if k.status == "429")
    assert throttled == 3


def test_write_concurrency_stays_within_the_configured_limit(
    dataverse: DataverseTwin, make_adapter: AdapterFactory
) -> None:
    seeded = dataverse.seed(120)
    adapter = make_adapter(dataverse, write_batch_size=10, max_concurrency=3)
    results = adapter.write(
        [CrmWrite(o, {"description": f"bulk {i}"}) for i, o in enumerate(seeded.opportunities)]
    )
    assert all(r.ok for r in results)
    assert [r.crm_id for r in results] == seeded.opportunities  # request order kept
    assert len(dataverse.calls("POST", f"{API_PATH}/$batch")) == 12
    assert dataverse.peak_concurrency <= 3


def test_a_wrong_client_secret_is_a_configuration_error(
    dataverse: DataverseTwin, make_adapter: AdapterFactory
) -> None:
    adapter = make_adapter(dataverse, secret="wrong")
    with pytest.raises(ConfigError):
        adapter.stages()


# --- cost -----------------------------------------------------------------------------------------


def _count(parts: Sequence[Any], entity_set: str) -> int:
    return sum(1 for p in parts if p.path == f"{API_PATH}/{entity_set}")


def test_reading_10000_opportunities_costs_pages_plus_batched_related_reads(
    dataverse: DataverseTwin, make_adapter: AdapterFactory
) -> None:
    n, page = 10_000, 500
    seeded = dataverse.seed(n, products=40)
    adapter = make_adapter(dataverse, page_size=page)
    pages = list(adapter.changes(None))
    assert sum(len(p.deals) for p in pages) == n and not any(p.failures for p in pages)
    pages_needed = math.ceil(n / page)
    top = dataverse.requests
    opportunity_pages = [r for r in top if r.path == f"{API_PATH}/opportunities"]
    batches = [r for r in top if r.path == f"{API_PATH}/$batch"]
    metadata = [r for r in top if "EntityDefinitions" in r.path]
    assert len(opportunity_pages) == pages_needed
    assert len(batches) <= 2 * pages_needed  # related rows: two dependent levels per page, batched
    assert len(metadata) == 3
    assert len(top) == len(opportunity_pages) + len(batches) + len(metadata)
    chunk = adapter.options.related_chunk
    parts = dataverse.batch_parts
    per_page_chunks = math.ceil(page / chunk)
    for entity in ("accounts", "contacts", "systemusers", "opportunityproducts"):
        assert _count(parts, entity) <= pages_needed * per_page_chunks, entity
    assert _count(parts, "products") <= pages_needed * math.ceil(40 / chunk)
    assert _count(parts, "transactioncurrencies") == 1  # currencies are cached
    assert not any(
        "(" in r.path.rsplit("/", 1)[1]
        for r in top
        if r.method == "GET" and "EntityDefinitions" not in r.path
    )
    assert len(seeded.opportunities) == n


def test_apply_maps_canonical_changes_onto_dataverse_columns(
    dataverse: DataverseTwin, make_adapter: AdapterFactory
) -> None:
    seeded = dataverse.seed(3, currencies=("USD", "EUR"))
    adapter = make_adapter(
        dataverse,
        bookkeeping={
            "sync_status": "new_syncstatus",
            "synced_at": "new_lastsyncedon",
            "referral_link": "new_referrallink",
        },
    )
    a, b, c = seeded.opportunities
    synced = datetime(2026, 3, 2, 10, 30, tzinfo=UTC)
    results = adapter.apply(
        [
            CrmChange(
                a,
                {
                    "name": "From Partner Center",
                    "value": 2500,
                    "currency": "EUR",
                    "close_date": "2027-06-30",
                    "notes": "n",
                    "team": [],
                },
                stage="Propose",
                referral_id="ref-9",
                referral_link="https://partner.microsoft.com/x",
                sync_status="synced",
                synced_at=synced,
                key="k-a",
            ),
            CrmChange(b, stage="Out-Sold", key="k-b"),
            CrmChange(c, stage="No such stage", key="k-c"),
        ]
    )
    assert [r.ok for r in results] == [True, True, False]
    assert results[0].key == "k-a" and results[0].extra.get("skipped") == ["team"]
    assert results[2].error_code == "stage-unmapped"
    row = dataverse.row("opportunities", a)
    assert (row["name"], row["estimatedvalue"], row["estimatedclosedate"], row["salesstage"]) == (
        "From Partner Center",
        2500.0,
        "2027-06-30",
        2,
    )
    assert row["_transactioncurrencyid_value"] == seeded.currencies["EUR"]
    assert (row["new_referralid"], row["new_syncstatus"], row["new_lastsyncedon"]) == (
        "ref-9",
        "synced",
        "2026-03-02T10:30:00Z",
    )
    assert (
        dataverse.row("opportunities", b)["statecode"],
        dataverse.row("opportunities", b)["statuscode"],
    ) == (2, 5)
