"""End to end: the sync engine with the real Partner Center client and Salesforce adapter, over real
HTTPS against the twins, with SQLite and PostgreSQL state."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from connector.partner_center import client as pc_client
from connector.partner_center.twin import PartnerCenterTwin
from connector.salesforce.adapter import SalesforceAdapter
from connector.salesforce.twin import SalesforceTwin
from connector.state import DeadLetter, SqlStateStore, System
from connector.sync import engine as engine_module
from tests.e2e.conftest import CONNECTION, Run

REFERRAL_FIELD = "Partner_Center_Referral_Id__c"
STATUS_FIELD = "Partner_Center_Sync_Status__c"


def add_account(sf: SalesforceTwin) -> str:
    return sf.add_row(
        "Account",
        {"Name": "Contoso Ltd", "BillingCity": "Redmond", "BillingCountry": "United States"},
    )


def add_user(sf: SalesforceTwin, n: int = 1) -> str:
    return sf.add_row(
        "User",
        {
            "FirstName": "Ada",
            "LastName": f"Seller{n}",
            "Name": f"Ada Seller{n}",
            "Email": f"ada{n}@partner.example",
            "Phone": "+1 555 0100",
            "IsActive": True,
        },
    )


def add_opportunity(
    sf: SalesforceTwin, name: str = "Contoso migration", stage: str = "Needs Analysis", **extra: object
) -> str:
    account = add_account(sf)
    owner = add_user(sf)
    product = sf.add_row(
        "Product2", {"Name": "Contoso Cloud", "ProductCode": "SOL-34104-EBB", "IsActive": True}
    )
    opp = sf.add_row(
        "Opportunity",
        {
            "Name": name,
            "StageName": stage,
            "Amount": 50000.0,
            "CurrencyIsoCode": "USD",
            "CloseDate": date(2027, 3, 31),
            "AccountId": account,
            "OwnerId": owner,
            "Description": "",
            "Sync_with_Partner_Center__c": True,
            **extra,
        },
    )
    sf.add_row(
        "OpportunityLineItem",
        {"OpportunityId": opp, "Product2Id": product, "ProductCode": "SOL-34104-EBB", "Name": "Contoso Cloud",
         "Quantity": 1.0, "UnitPrice": 50000.0, "TotalPrice": 50000.0},
    )  # fmt: skip
    return opp


def writes(pc: PartnerCenterTwin, sf: SalesforceTwin) -> tuple[int, int]:
    sf_writes = sf.request_count("composite/sobjects", "PATCH") + sf.request_count(
        "composite/sobjects", "POST"
    )
    return pc.count_writes(), sf_writes


def test_outbound_opportunity_creates_one_referral_and_a_second_run_writes_nothing(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore
) -> None:
    opp = add_opportunity(sf)
    report = run()
    assert report.counts["pc_created"] == 1, report.problems
    [referral] = pc.referrals.values()
    assert referral["externalReferenceId"] == opp
    assert referral["salesStage"] == "20"  # Needs Analysis -> Qualified
    assert sf.tables["Opportunity"][opp][REFERRAL_FIELD] == referral["id"]
    assert sf.tables["Opportunity"][opp][STATUS_FIELD] == "synced"
    link = store.link_by_crm(CONNECTION, opp)
    assert link is not None and link.referral_id == referral["id"]
    assert [e.action for e in store.audit(CONNECTION, crm_id=opp)][:1] == ["set"]

    before = writes(pc, sf)
    again = run()
    assert writes(pc, sf) == before, again.planned  # no ping-pong: zero writes on either side
    assert again.counts["pc_created"] == again.counts["pc_updated"] == again.counts["crm_updated"] == 0


def test_crm_stage_and_partner_center_notes_flow_both_ways(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin
) -> None:
    opp = add_opportunity(sf)
    run()
    [rid] = pc.referrals
    sf.update_row("Opportunity", opp, {"StageName": "Proposal/Price Quote"})
    pc.edit(rid, lambda d: d["details"].update(notes="Microsoft seller engaged"))
    report = run()
    assert report.counts["failed"] == 0, report.problems
    assert pc.referrals[rid]["salesStage"] == "60"
    assert sf.tables["Opportunity"][opp]["Description"] == "Microsoft seller engaged"


def test_dry_run_plans_and_writes_nothing(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore
) -> None:
    add_opportunity(sf)
    report = run(dry_run=True)
    assert report.counts["planned"] == 1 and report.planned[0].plan.pc_ops
    assert pc.referrals == {} and writes(pc, sf) == (0, 0)
    assert store.count_links(CONNECTION) == {} and store.cursors(CONNECTION) == {}
    assert store.last_run(CONNECTION) is None


def test_inbound_referral_creates_an_opportunity_and_accepting_in_crm_accepts_it(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin
) -> None:
    [rid] = pc.seed(1, mix=False)
    with pc._store:
        doc = pc.referrals[rid]
        doc.update(
            {
                "status": "New",
                "substatus": "Received",
                "direction": "Incoming",
                "externalReferenceId": None,
                "salesStage": None,
            }
        )
    report = run()
    assert report.counts["crm_created"] == 1, report.problems
    [opp] = [oid for oid, row in sf.tables["Opportunity"].items() if row.get(REFERRAL_FIELD) == rid]
    assert sf.tables["Opportunity"][opp]["StageName"] == "Prospecting"
    sf.update_row("Opportunity", opp, {"StageName": "Needs Analysis"})  # created opted in: no tick needed
    report = run()
    assert report.counts["failed"] == 0, report.problems
    assert (pc.referrals[rid]["status"], pc.referrals[rid]["substatus"]) == ("Active", "Accepted")
    assert pc.referrals[rid]["salesStage"] == "20"
    # what the CRM cannot carry (the team here) is never wiped from Partner Center
    assert [m["email"] for m in pc.referrals[rid]["team"]] == ["sam@contoso.com"]
    assert pc.referrals[rid]["externalReferenceId"] == opp


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_closed_referral_refuses_crm_edits_and_says_why(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore
) -> None:
    opp = add_opportunity(sf)
    run()
    [rid] = pc.referrals
    pc.edit(rid, lambda d: d.update(status="Closed", substatus="Won"))
    run()  # the CRM follows Partner Center to Closed Won
    assert sf.tables["Opportunity"][opp]["StageName"] == "Closed Won"
    sf.update_row("Opportunity", opp, {"Amount": 99000.0})
    before = pc.count_writes()
    report = run()
    assert pc.count_writes() == before
    assert report.counts["blocked"] == 1
    assert "terminal-immutable" in sf.tables["Opportunity"][opp][STATUS_FIELD]
    assert any(rule == "terminal-immutable" for _, rule, _ in report.problems)
    assert datetime.now(UTC)  # keeps the import honest for the time helpers above


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_a_manual_conflict_waits_for_a_human_and_their_choice_is_applied(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore, settings: Any
) -> None:
    opp = add_opportunity(sf)
    run()
    [rid] = pc.referrals
    sf.update_row("Opportunity", opp, {"Description": "crm notes"})
    pc.edit(rid, lambda d: d["details"].update(notes="pc notes"))
    conn = settings.connections[CONNECTION]
    policy = conn.policy.model_copy(update={"fields": {"notes": "manual"}})
    settings.connections[CONNECTION] = conn.model_copy(update={"policy": policy})  # as if configured so
    report = run()
    assert report.counts["conflicts"] == 1
    assert sf.tables["Opportunity"][opp]["Description"] == "crm notes"  # nothing overwritten
    assert pc.referrals[rid]["details"]["notes"] == "pc notes"
    [conflict] = store.conflicts(CONNECTION)
    assert (conflict.field, conflict.crm_value, conflict.pc_value) == ("notes", "crm notes", "pc notes")
    assert conflict.id is not None
    store.resolve_conflict(conflict.id, "crm")
    run()
    assert pc.referrals[rid]["details"]["notes"] == "crm notes"
    assert store.conflicts(CONNECTION) == [] and store.conflicts(CONNECTION, state="applied")


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_a_dead_letter_marked_for_retry_is_retried_whatever_its_count(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore
) -> None:
    def later() -> None:  # runs a schedule interval apart: past the cursors' lookback overlap
        sf.clock.advance(timedelta(minutes=10))
        pc.clock.advance(timedelta(minutes=10))

    opp = add_opportunity(sf)
    run()
    later()
    run()  # reads back our own write-back once (echo), then the book is quiet
    later()
    store.add_dead_letter(DeadLetter(CONNECTION, System.CRM, opp, cause="earlier failure", attempts=9))
    run()
    later()
    [letter] = store.dead_letters(CONNECTION)  # out of attempts and unchanged: left for a human
    assert letter.id is not None
    store.set_dead_letter_state(letter.id, "retry")  # `cosell dlq retry`
    run()
    later()
    assert store.dead_letters(CONNECTION) == [] and store.dead_letters(CONNECTION, state="retry") == []
    assert len(pc.referrals) == 1


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_a_settled_book_is_reconciled_without_reading_the_other_side_record_by_record(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin
) -> None:
    opps = [add_opportunity(sf, name=f"Deal {i}") for i in range(5)]
    run()
    run()  # reads the initial sync's own writes back
    before = writes(pc, sf)
    full = run(full=True)
    calls = full.calls  # type: ignore[attr-defined]
    assert full.counts["unchanged"] == 5 and writes(pc, sf) == before
    # each side listed once; no referral fetched by id for an opportunity, nor the reverse
    assert not [k for k in calls if k.system == "partner-center" and k.operation != "changes"], calls
    queries = [c.arg("q") or "" for c in sf.calls("GET", "/services/data/")]
    by_id = [q for q in queries if "FROM Opportunity WHERE Id IN" in q]
    assert by_id == [], by_id
    # an edit on either side is still found by the full run
    sf.update_row("Opportunity", opps[0], {"Description": "edited"})
    again = run(full=True)
    assert again.counts["pc_updated"] == 1 and again.counts["unchanged"] == 4


def test_full_reconciliation_reports_duplicates_orphans_and_drift(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore
) -> None:
    a, b, c = (add_opportunity(sf, name=f"Deal {i}") for i in range(3))
    run()
    by_ref = {doc["externalReferenceId"]: rid for rid, doc in pc.referrals.items()}
    # a second referral for opportunity a (someone registered it by hand), one referral gone from view,
    # and a change nobody told the cursors about (written straight into the twin's store)
    import copy

    twin_doc = copy.deepcopy(pc.referrals[by_ref[a]])
    twin_doc["id"] = "00000000-0000-4000-8000-00000000dup1"
    pc.put(twin_doc)
    with pc._store:
        del pc.referrals[by_ref[b]]
        pc.referrals[by_ref[c]]["details"]["notes"] = "edited where no cursor looks"
    report = run(full=True)
    kinds = {(kind, record) for kind, record, _ in report.drift}
    assert ("duplicate", a) in kinds
    assert ("orphan", by_ref[b]) in kinds
    assert any(kind == "drift" for kind, _, _ in report.drift)
    assert sf.tables["Opportunity"][c]["Description"] == "edited where no cursor looks"
    # the duplicate is reported, never paired: opportunity a stays with its original referral
    link = store.link_by_crm(CONNECTION, a)
    assert link is not None and link.referral_id == by_ref[a]
    assert pc.referrals["00000000-0000-4000-8000-00000000dup1"]["externalReferenceId"] == a


def test_a_referral_listed_as_last_synced_is_not_converted_and_an_edit_keeping_its_etag_is_found(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    opps = [add_opportunity(sf, name=f"Deal {i}") for i in range(3)]
    run()
    run()  # reads the initial sync's writes back: the referrals' fingerprints are noted then
    assert all((link := store.link_by_crm(CONNECTION, o)) and link.pc_fingerprint for o in opps)
    converted: list[str] = []
    real = pc_client._read
    monkeypatch.setattr(pc_client, "_read", lambda item: converted.append(item["id"]) or real(item))
    full = run(full=True)
    assert full.counts["unchanged"] == 3 and converted == []
    # written straight into the twin's store: new content, same eTag and updatedDateTime
    rid = next(r for r, doc in pc.referrals.items() if doc["externalReferenceId"] == opps[1])
    with pc._store:
        pc.referrals[rid]["details"]["notes"] = "edited, eTag kept"
    again = run(full=True)
    assert converted == [rid]
    assert again.counts["crm_updated"] == 1 and again.counts["unchanged"] == 2
    assert sf.tables["Opportunity"][opps[1]]["Description"] == "edited, eTag kept"


def test_an_opportunity_listed_as_last_synced_is_not_converted_until_its_content_or_our_reading_changes(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    opps = [add_opportunity(sf, name=f"Deal {i}") for i in range(3)]
    run()
    run()  # reads our writes back: each opportunity's fingerprint is noted then
    assert all((link := store.link_by_crm(CONNECTION, o)) and link.crm_fingerprint for o in opps)
    converted: list[str] = []
    real = SalesforceAdapter._read_row

    def counting(self: SalesforceAdapter, run_: Any, rec: Any) -> Any:
        converted.append(str(rec["Id"]))
        return real(self, run_, rec)

    monkeypatch.setattr(SalesforceAdapter, "_read_row", counting)
    assert run(full=True).counts["unchanged"] == 3 and converted == []
    # edited where no stamp shows it (same SystemModstamp): the content differs, so it is read
    stamp = sf.tables["Opportunity"][opps[2]]["SystemModstamp"]
    sf.update_row("Opportunity", opps[2], {"Description": "edited, stamp kept"}, stamp=stamp)
    again = run(full=True)
    assert converted == [opps[2]] and again.counts["pc_updated"] == 1
    # a new release (or mapping, or setting) reads every record afresh: its fingerprints were noted
    # under the old reading
    converted.clear()
    monkeypatch.setattr(engine_module, "__version__", "99.0.0")
    fresh = run(full=True)
    assert sorted(converted) == sorted(opps) and fresh.counts["unchanged"] == 3
    converted.clear()
    assert run(full=True).counts["unchanged"] == 3 and converted == []  # noted again under the new one


def test_the_state_store_keeps_who_is_on_the_team_never_their_contact_details(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore
) -> None:
    opp = add_opportunity(sf)
    run()
    [rid] = pc.referrals
    seller = {
        "firstName": "Mo",
        "lastName": "Seller",
        "email": "mo@microsoft.example",
        "phoneNumber": "+1 425 0199",
    }
    pc.edit(rid, lambda d: d["team"].append(seller))
    run()
    # the Microsoft seller added on Partner Center survives the CRM's next push ...
    sf.update_row("Opportunity", opp, {"Description": "scoping call held"})
    run()
    emails = [m["email"] for m in pc.referrals[rid]["team"]]
    assert "mo@microsoft.example" in emails and "ada1@partner.example" in emails
    assert pc.referrals[rid]["details"]["notes"] == "scoping call held"
    # ... and the merge base remembers the team as digests only
    link = store.link_by_crm(CONNECTION, opp)
    assert link is not None
    kept = repr(link.snapshot)
    for detail in ("microsoft.example", "partner.example", "425 0199", "555 0100", "Mo", "Ada"):
        assert detail not in kept, detail
    assert len(link.snapshot["team"]) == 2
    before = writes(pc, sf)
    run()
    assert writes(pc, sf) == before


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_changed_opportunities_read_their_referrals_together_and_one_that_fails_is_isolated(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore
) -> None:
    from connector.remote.twin import Fault, TwinResponse

    opps = [add_opportunity(sf, name=f"Deal {i}") for i in range(6)]
    run()
    for twin in (sf, pc):
        twin.clock.advance(timedelta(minutes=10))
    run()  # our own write-backs read back: the book is quiet
    for twin in (sf, pc):
        twin.clock.advance(timedelta(minutes=10))
    for i, opp in enumerate(opps):
        sf.update_row("Opportunity", opp, {"Description": f"call notes {i}"})
    broken = sf.tables["Opportunity"][opps[2]][REFERRAL_FIELD]
    gets_before = len(pc.calls("GET"))
    gone = Fault(
        TwinResponse(404, {"code": "NotFound", "message": "gone"}),
        times=5,
        match=lambda r: r.method == "GET" and r.path.endswith(broken),
    )
    with pc.faults(gone):
        report = run()
    gets = [r.path for r in pc.calls("GET")[gets_before:]]
    assert sum(1 for p in gets if not p.endswith("/referrals")) >= 6  # one read per changed record
    assert report.counts["pc_updated"] == 5, report.problems
    [letter] = store.dead_letters(CONNECTION)
    assert (letter.system, letter.record_id) == (System.PARTNER_CENTER, broken)
    notes = {r["externalReferenceId"]: r["details"]["notes"] for r in pc.referrals.values()}
    assert [notes[opp] for i, opp in enumerate(opps) if i != 2] == [
        f"call notes {i}" for i in (0, 1, 3, 4, 5)
    ]
