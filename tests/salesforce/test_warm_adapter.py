"""One adapter kept across runs (what the daemon does), against the HTTPS twin: an idle run costs one
call, metadata is cached until its ttl, soft deletes arrive with the query and hard deletes with the
periodic getDeleted sweep, the signpost comes from the first query's Date header and a record changed
in the middle of a run is read by the next one."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import pytest

from connector.mappings import load_mapping_files
from connector.remote.calls import CallKey
from connector.remote.twin import Fault, TwinResponse
from connector.salesforce.adapter import Cursor, PullPage
from connector.salesforce.twin import (
    HELP_TYPES,
    LOSS_REASONS,
    LOSS_REASONS_INACTIVE,
    STANDARD_STAGES,
    SalesforceTwin,
    seed,
)
from connector.seams import CrmField, CrmWrite
from tests.salesforce.conftest import START, MakeAdapter

pytestmark = pytest.mark.integration

DESCRIBE = "/sobjects/Opportunity/describe"
GET_DELETED = "/sobjects/Opportunity/deleted"


def ids_of(pages: Iterable[PullPage]) -> list[str]:
    return [r.deal.crm_id or "" for p in pages for r in p.rows]


def deleted_of(pages: Iterable[PullPage]) -> set[str]:
    return {d for p in pages for d in p.deleted_ids}


def final_cursor(pages: list[PullPage]) -> str:
    cursor = pages[-1].cursor
    assert cursor is not None
    return cursor


def by_operation(before: dict[CallKey, int], after: dict[CallKey, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, n in after.items():
        if n - before.get(key, 0):
            out[key.operation] = out.get(key.operation, 0) + n - before.get(key, 0)
    return out


# --- call counts ---------------------------------------------------------------------------------------


def test_a_warm_idle_run_costs_one_call(twin: SalesforceTwin, make_adapter: MakeAdapter) -> None:
    seed(twin, 30)
    twin.add_record_type("Partner_Deal", ("Prospecting", "Closed Won", "Closed Lost"))
    cursor = final_cursor(list(make_adapter().pull(None)))
    twin.clock.advance(timedelta(minutes=10))  # past the lookback: nothing left to re-read

    adapter = make_adapter()
    before = adapter.calls.snapshot()
    cold = list(adapter.pull(cursor))
    assert not ids_of(cold) and not deleted_of(cold)
    # sign-in, two describes, OpportunityStage + RecordType, one record type's stage values, the query
    assert by_operation(before, adapter.calls.snapshot()) == {
        "oauth-token": 1,
        "describe": 2,
        "query": 3,
        "ui-api": 1,
    }
    cursor = final_cursor(cold)

    for _ in range(3):
        twin.clock.advance(timedelta(minutes=10))
        seen = len(twin.calls())
        before = adapter.calls.snapshot()
        warm = list(adapter.pull(cursor))
        assert by_operation(before, adapter.calls.snapshot()) == {"query": 1}
        (request,) = twin.calls()[seen:]  # the twin saw exactly that one request, no sign-in
        assert request.path.startswith("/services/data/v59.0/queryAll")
        assert "SystemModstamp <=" not in (request.arg("q") or "")  # the first query is not capped
        assert not ids_of(warm) and not deleted_of(warm)
        # the cursor moved to Salesforce's clock at the query (its Date header): no lookback re-reads
        assert Cursor.decode(final_cursor(warm)).ts == twin.stamp()
        cursor = final_cursor(warm)
    assert twin.sign_ins == ["password", "password"]  # one per adapter


def test_the_session_is_reused_and_signed_in_again_once_when_it_expires(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seed(twin, 3)
    adapter = make_adapter()
    cursor = final_cursor(list(adapter.pull(None)))
    twin.clock.advance(timedelta(minutes=10))
    cursor = final_cursor(list(adapter.pull(cursor)))
    assert twin.sign_ins == ["password"]
    twin.expire_sessions()
    twin.clock.advance(timedelta(minutes=10))
    before = adapter.calls.snapshot()
    list(adapter.pull(cursor))
    assert twin.sign_ins == ["password", "password"]
    assert by_operation(before, adapter.calls.snapshot()) == {"query": 2, "oauth-token": 1}  # 401, resent


# --- metadata --------------------------------------------------------------------------------------------


def test_metadata_is_kept_across_runs_and_read_again_after_its_ttl(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seed(twin, 5)
    adapter = make_adapter(metadata_ttl=timedelta(minutes=30))
    cursor = final_cursor(list(adapter.pull(None)))
    assert twin.request_count(DESCRIBE) == 1
    twin.add_row(
        "OpportunityStage",
        {
            "ApiName": "Shortlisted",
            "MasterLabel": "Shortlisted",
            "DefaultProbability": 30.0,
            "ForecastCategoryName": "Pipeline",
            "IsActive": True,
            "IsClosed": False,
            "IsWon": False,
            "SortOrder": 11,
        },
    )

    twin.clock.advance(timedelta(minutes=20))
    adapter.reset_run()  # per-run state only: the metadata stays
    cursor = final_cursor(list(adapter.pull(cursor)))
    assert twin.request_count(DESCRIBE) == 1
    assert "Shortlisted" not in {s.label for s in adapter.stages()}
    assert "Shortlisted" not in adapter.opportunity_fields()["StageName"].picklist_values

    twin.clock.advance(timedelta(minutes=11))  # 31 minutes since the read
    cursor = final_cursor(list(adapter.pull(cursor)))
    assert twin.request_count(DESCRIBE) == 2
    assert "Shortlisted" in {s.label for s in adapter.stages()}
    assert "Shortlisted" in adapter.opportunity_fields()["StageName"].picklist_values

    twin.clock.advance(timedelta(minutes=1))
    list(adapter.pull(cursor))
    assert twin.request_count(DESCRIBE) == 2
    adapter.refresh_metadata()  # forced
    assert twin.request_count(DESCRIBE) == 3


def test_a_write_refused_for_an_unknown_field_or_value_reads_metadata_again_next_run(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seeded = seed(twin, 2)
    adapter = make_adapter()
    cursor = final_cursor(list(adapter.pull(None)))
    target = seeded.opportunities[0]
    for values, code in (
        ({"StageName": "Not A Stage"}, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"),
        ({"Dropped_Field__c": "x"}, "INVALID_FIELD"),
    ):
        (result,) = adapter.write([CrmWrite(target, values, idempotency_key="k")])
        assert not result.ok and result.error_code == code
        reads = twin.request_count(DESCRIBE)
        twin.clock.advance(timedelta(minutes=1))
        cursor = final_cursor(list(adapter.pull(cursor)))
        assert twin.request_count(DESCRIBE) == reads + 1
        twin.clock.advance(timedelta(minutes=1))
        cursor = final_cursor(list(adapter.pull(cursor)))
        assert twin.request_count(DESCRIBE) == reads + 1  # once: the fresh read is trusted again
    # an accepted write, or a refusal that says nothing about the org's metadata, keeps the cache
    twin.validation_rules.append(lambda _obj, row: "no" if row.get("Amount") == 13.0 else None)
    results = adapter.write(
        [
            CrmWrite(target, {"Amount": 5.0}, idempotency_key="ok"),
            CrmWrite(seeded.opportunities[1], {"Amount": 13.0}, idempotency_key="rule"),
        ]
    )
    assert [r.error_code for r in results] == ["", "FIELD_CUSTOM_VALIDATION_EXCEPTION"]
    reads = twin.request_count(DESCRIBE)
    twin.clock.advance(timedelta(minutes=1))
    list(adapter.pull(cursor))
    assert twin.request_count(DESCRIBE) == reads


def test_opportunity_fields_come_from_the_cached_describe(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    adapter = make_adapter(fields={"lost_reason": "Loss_Reason__c"})
    fields = adapter.opportunity_fields()
    stage = fields["StageName"]
    assert stage.type == "picklist" and stage.restricted
    assert stage.picklist_values == tuple(s[0] for s in STANDARD_STAGES)
    loss = fields["Loss_Reason__c"]
    assert loss == CrmField("Loss_Reason__c", "picklist", LOSS_REASONS, restricted=True)
    assert not set(LOSS_REASONS_INACTIVE) & set(loss.picklist_values)  # deactivated: not offered
    assert fields["Partner_Center_Help_Type__c"] == CrmField(
        "Partner_Center_Help_Type__c", "picklist", HELP_TYPES, restricted=True
    )
    assert fields["Partner_Center_Solutions__c"] == CrmField("Partner_Center_Solutions__c", "multipicklist")
    assert fields["Name"] == CrmField("Name", "string")
    assert fields["Partner_Center_Visibility__c"].type == "boolean"
    # what `cosell doctor` compares: the shipped mapping's stages and loss reasons are values this org takes
    mapping = load_mapping_files(["builtin:salesforce-default.yaml"])
    assert {s.label for s in mapping.stages.stages} <= set(stage.picklist_values)
    assert {crm for crm, _pc in mapping.values["reasons"].pairs} <= set(loss.picklist_values)

    seen = len(twin.calls())
    assert adapter.opportunity_fields() == fields and adapter.stages()
    assert len(twin.calls()) == seen  # cached
    # a stage deactivated in the org leaves the active values once the metadata is read again
    row = next(r for r in twin.tables["OpportunityStage"].values() if r["ApiName"] == "Perception Analysis")
    row["IsActive"] = False
    adapter.refresh_metadata()
    assert "Perception Analysis" not in adapter.opportunity_fields()["StageName"].picklist_values
    assert "Perception Analysis" in {s.label for s in adapter.stages() if not s.active}
    with pytest.raises(TypeError):
        adapter.opportunity_fields()["Name"] = fields["Name"]  # type: ignore[index]


# --- deletes ----------------------------------------------------------------------------------------------


def test_a_soft_delete_arrives_with_the_query_without_getdeleted(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seeded = seed(twin, 10)
    adapter = make_adapter()
    cursor = final_cursor(list(adapter.pull(None)))
    twin.clock.advance(timedelta(minutes=10))
    gone = seeded.opportunities[3]
    twin.delete_row("Opportunity", gone)
    twin.clock.advance(timedelta(seconds=5))
    before = adapter.calls.snapshot()
    pages = list(adapter.pull(cursor))
    assert deleted_of(pages) == {gone} and not ids_of(pages)  # reported as a delete, not as a deal
    assert by_operation(before, adapter.calls.snapshot()) == {"query": 1}
    assert twin.request_count(GET_DELETED) == 0
    assert Cursor.decode(final_cursor(pages)).deletes == START  # the sweep's coverage is unchanged


def test_hard_deletes_and_purges_are_found_by_the_periodic_sweep(
    twin: SalesforceTwin, make_adapter: MakeAdapter
) -> None:
    seeded = seed(twin, 10)
    adapter = make_adapter(delete_sweep=timedelta(hours=1))
    cursor = final_cursor(list(adapter.pull(None)))  # deletes covered up to START
    twin.clock.advance(timedelta(minutes=10))
    hard, purged = seeded.opportunities[1], seeded.opportunities[2]
    twin.hard_delete_row("Opportunity", hard)
    twin.delete_row("Opportunity", purged)
    twin.purge_row("Opportunity", purged)  # emptied from the recycle bin before any run saw it
    twin.clock.advance(timedelta(minutes=10))

    pages = list(adapter.pull(cursor))  # 20 minutes: no sweep yet, and queryAll cannot see them
    assert not deleted_of(pages) and twin.request_count(GET_DELETED) == 0
    cursor = final_cursor(pages)
    assert Cursor.decode(cursor).deletes == START

    twin.clock.advance(timedelta(minutes=41))  # the coverage is now older than delete_sweep (1 h)
    pages = list(adapter.pull(cursor))
    assert deleted_of(pages) == {hard, purged} and not any(p.full_resync for p in pages)
    assert twin.request_count(GET_DELETED) == 1
    cursor = final_cursor(pages)
    assert Cursor.decode(cursor).deletes == twin.stamp().replace(second=0)  # latestDateCovered

    twin.clock.advance(timedelta(minutes=10))
    list(adapter.pull(cursor))
    assert twin.request_count(GET_DELETED) == 1  # not again until the next hour


# --- the signpost ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("locator_expires", [False, True], ids=["paged", "keyset-resume"])
def test_a_record_changed_between_two_pages_of_a_run_is_read_by_the_next_run(
    twin: SalesforceTwin, make_adapter: MakeAdapter, locator_expires: bool
) -> None:
    seeded = seed(twin, 2100)
    # no lookback: only the cursor itself keeps the changed record from being skipped
    adapter = make_adapter(lookback=timedelta(0))
    cursor = final_cursor(list(adapter.pull(None)))
    twin.clock.advance(timedelta(minutes=10))
    for opp in seeded.opportunities:  # 2,100 changed rows: two pages, all on one stamp
        twin.update_row("Opportunity", opp, {"Description": "v1"})
    twin.clock.advance(timedelta(seconds=1))
    run_start = twin.stamp()

    def queries() -> list[str]:
        return [q for r in twin.calls("GET", "/services/data/v59.0/queryAll") if (q := r.arg("q") or "")]

    earlier = len(queries())
    pull = adapter.pull(cursor)
    first = next(pull)
    assert len(first.rows) == 2000
    early = first.rows[0].deal.crm_id or ""
    late = next(o for o in seeded.opportunities if o not in set(ids_of([first])))
    twin.clock.advance(timedelta(seconds=1))
    twin.update_row("Opportunity", early, {"Description": "v2"})  # already read this run
    twin.update_row("Opportunity", late, {"Description": "v2"})  # on the page not fetched yet
    twin.clock.advance(timedelta(seconds=1))  # the rest of the run answers later still
    expired = Fault(
        TwinResponse(400, [{"message": "invalid query locator", "errorCode": "INVALID_QUERY_LOCATOR"}]),
        match=lambda r: "/queryAll/01g" in r.path,
        times=1 if locator_expires else 0,
    )
    with twin.faults(expired):
        rest = list(pull)
    pages = [first, *rest]
    signpost = Cursor.decode(final_cursor(pages)).ts
    assert signpost == run_start  # the first query's Date header
    for page in pages:
        assert page.cursor is None or Cursor.decode(page.cursor).ts <= signpost
    notes = {r.deal.crm_id: r.deal.notes for p in pages for r in p.rows}
    assert notes[early] == "v1"  # this run saw no "v2"
    ran = queries()[earlier:]
    assert "SystemModstamp <= " not in ran[0]  # the run's first query is not capped
    if locator_expires:
        # the keyset resume is capped at the signpost, so the moved record waits for the next run
        assert len(ran) == 2 and "SystemModstamp <= " in ran[1]
        assert late not in notes and set(notes) == set(seeded.opportunities) - {late}
    else:
        # nextRecordsUrl pages come from the query's snapshot
        assert len(ran) == 1 and notes[late] == "v1" and set(notes) == set(seeded.opportunities)

    twin.clock.advance(timedelta(seconds=30))
    again = {r.deal.crm_id: r.deal.notes for p in adapter.pull(final_cursor(pages)) for r in p.rows}
    assert again[early] == "v2" and again[late] == "v2"


@pytest.mark.parametrize(
    ("configured", "writes_reason"),
    [("Loss_Reason__c", True), ("No_Such_Reason__c", False), ("", False)],
)
def test_a_lost_reason_is_written_only_to_a_field_the_org_has(
    make_adapter: MakeAdapter, configured: str, writes_reason: bool
) -> None:
    """A configured reason field the org lacks would fail the close it comes with (INVALID_FIELD):
    then no reason is sent, as for a connection without one."""
    adapter = make_adapter(fields={"lost_reason": configured})
    adapter.opportunity_fields()  # the describe is read
    assert ("lost_reason" not in adapter.write_unsupported) is writes_reason
