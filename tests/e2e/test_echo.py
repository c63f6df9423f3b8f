"""Echo suppression end to end: our own CRM writes read back are not changes; a peer automation that
rewrites them is counted and audited once, its value flows to Partner Center once, and nothing loops."""

from __future__ import annotations

from connector.partner_center.twin import PartnerCenterTwin
from connector.salesforce.twin import SalesforceTwin
from connector.state import SqlStateStore
from tests.e2e.conftest import CONNECTION, Run
from tests.e2e.test_sync import add_opportunity, writes


def test_a_peer_automation_rewriting_our_write_is_counted_once_and_never_loops(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore
) -> None:
    opp = add_opportunity(sf)
    run()
    [rid] = pc.referrals
    pc.edit(rid, lambda d: d["details"].update(notes="Microsoft seller engaged"))
    first = run()
    assert sf.tables["Opportunity"][opp]["Description"] == "Microsoft seller engaged"
    assert first.counts["peer_rewrites"] == 0
    link = store.link_by_crm(CONNECTION, opp)
    assert link is not None and link.crm_written_fields == ("notes",) and link.crm_written_hash

    # a CRM flow reacts to our write by rewriting the field (e.g. prefixing it)
    sf.update_row("Opportunity", opp, {"Description": "[flow] Microsoft seller engaged"})
    second = run()
    assert second.counts["peer_rewrites"] == 1, second.counts
    rewrite = [e for e in store.audit(CONNECTION, crm_id=opp) if e.action == "peer-rewrite"]
    assert [(e.field, e.old, e.new) for e in rewrite] == [
        ("notes", "Microsoft seller engaged", "[flow] Microsoft seller engaged")
    ]
    # the flow's value is the CRM's edit now: it goes to Partner Center once, nothing is written back
    assert pc.referrals[rid]["details"]["notes"] == "[flow] Microsoft seller engaged"
    link = store.link_by_crm(CONNECTION, opp)
    assert link is not None and link.crm_written_fields is None

    before = writes(pc, sf)
    third = run()
    assert writes(pc, sf) == before and third.counts["peer_rewrites"] == 0


def test_reading_back_our_own_write_is_an_echo_not_a_rewrite(
    run: Run, pc: PartnerCenterTwin, sf: SalesforceTwin, store: SqlStateStore
) -> None:
    opp = add_opportunity(sf)
    run()
    [rid] = pc.referrals
    pc.edit(rid, lambda d: d["details"].update(notes="from Microsoft"))
    run()
    before = writes(pc, sf)
    echo = run()
    assert echo.counts["peer_rewrites"] == 0 and writes(pc, sf) == before
    link = store.link_by_crm(CONNECTION, opp)
    assert link is not None and link.crm_written_fields is None  # read back: nothing left to check
