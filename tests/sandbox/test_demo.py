"""``cosell demo`` end to end: sandbox, a full two-way sync of every connection with its report,
changes on both sides, and a second run that carries them - and blocks the one the rules forbid."""

from __future__ import annotations

import gc
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from rich.console import Console

from connector.cli import main
from connector.sandbox import SF_CONNECTION, Sandbox
from connector.sandbox.demo import run_demo
from connector.state import open_store


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # the demo quiets logging for its own process
    gc.collect()  # the leaked sockets (see pytestmark) are reported here, under this module's filter


def summary_row(section: str, connection: str) -> list[int]:
    """The numbers of ``connection``'s row in the first summary table of ``section``."""
    match = re.search(rf"│ {connection}\s*│([^\n]*)", section)
    assert match, section
    return [int(x) for x in re.findall(r"\d+", match.group(1))]


def test_demo_runs_end_to_end_and_reports_both_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "demo"
    assert main(["demo", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    first, _, second = out.partition("changed directly in the twins")
    _, _, second = second.partition("second run")
    assert "first run" in first and "demo completed" in second
    # links created, referrals created from opted-in opportunities, opportunities from inbound referrals
    links, pc_created, _pc_updated, crm_created, *_ = summary_row(first, SF_CONNECTION)
    assert links > 100 and pc_created > 100 and crm_created >= 20
    # stages mapped, both ways, with the rule that decided
    assert re.search(
        r"CRM -> Partner Center │ Needs Analysis\s+│ Qualified \(20%\)\s+│ label:Needs Analysis", first
    )
    assert re.search(
        r"Partner Center -> CRM │ Prospecting\s+│ Received \(inbound, unanswered\)\s+│ reverse:received",
        first,
    )
    # second run: both directions moved, and the closed-won deal's edit was blocked by its rule
    _links, _created, pc_updated, _crm_created, crm_updated, *_ = summary_row(second, SF_CONNECTION)
    assert pc_updated >= 2 and crm_updated >= 1
    assert re.search(r"Proposal/Price Quote\s+│ Proposed \(60%\)", second)
    assert re.search(r"Qualification\s+│ Qualified \(20%\)", second)
    # the table wraps the rule's words; compare them with the table drawing and line breaks removed
    flat = " ".join(re.sub(r"[│┃]", " ", second).split())
    assert "terminal-immutable" in flat and "can never be changed" in flat
    assert "API calls by system" in second and "partner-center" in second
    # nothing secret or personal on the screen
    secrets = [
        line.split("=", 1)[1]
        for line in (directory / "sandbox.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    ]
    assert secrets and not any(s in out for s in secrets)
    assert "@customer.example" not in out and "@partner.example" not in out


def test_second_run_carries_changes_both_ways_and_leaves_the_closed_deal_alone(tmp_path: Path) -> None:
    with Sandbox(tmp_path / "sb", salesforce=80, dynamics=40) as box:
        store = open_store(box.settings().state_url)
        try:
            result = run_demo(box, store, Console(file=io.StringIO(), width=140))
        finally:
            store.close()
        made = {
            c.what.split(":")[0].split(" ")[0]: c.record
            for c in result.changes
            if c.connection == SF_CONNECTION
        }
        assert set(made) == {"stage", "notes", "inbound", "amount"}, result.changes
        pc = box.partner_center[SF_CONNECTION]
        sf = box.salesforce.tables["Opportunity"]
        # a CRM stage move reached Partner Center through the mapping
        link = store_link = _link(box, made["stage"])
        assert store_link and pc.referrals[link]["salesStage"] == "60"
        # a Partner Center notes edit reached the CRM
        [noted] = [
            oid for oid, row in sf.items() if str(row["Description"]).startswith("Microsoft seller engaged")
        ]
        assert pc.referrals[made["notes"]]["externalReferenceId"] == noted
        # the inbound referral was accepted through its opportunity's stage
        accepted = next(r for r in pc.referrals.values() if r["externalReferenceId"] == made["inbound"])
        assert (accepted["status"], accepted["substatus"], accepted["salesStage"]) == (
            "Active",
            "Accepted",
            "20",
        )
        # the deal Partner Center closed as won was not touched, and the run says which rule blocked it
        won = next(r for r in pc.referrals.values() if r["externalReferenceId"] == made["amount"])
        assert won["substatus"] == "Won" and won["details"]["dealValue"] != sf[made["amount"]]["Amount"]
        sf_run = next(r for r in result.second if r.report.connection == SF_CONNECTION)
        assert (made["amount"], "terminal-immutable") in {
            (rec, rule) for rec, rule, _m in sf_run.report.problems
        }
        assert sf_run.report.counts["failed"] == 0


def _link(box: Sandbox, crm_id: str) -> str | None:
    store = open_store(box.settings().state_url)
    try:
        link = store.link_by_crm(SF_CONNECTION, crm_id)
        return link.referral_id if link else None
    finally:
        store.close()
