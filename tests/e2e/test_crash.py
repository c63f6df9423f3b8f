"""Crash safety: a run killed at any point, then started again, ends in the same state as an
uninterrupted run — no duplicate referral, no lost update — and a further run writes nothing.

The crash is injected in-process as a BaseException at a chosen call (after a POST reached
Partner Center, before the page's CRM batch, inside the CRM batch, before the cursor commit), which
skips every ``except Exception`` exactly like a kill -9 skips everything. ``finally`` blocks still
run (the lease is released): the subprocess kill -9 variant belongs to the daemon tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from connector.partner_center.client import PartnerCenterClient
from connector.salesforce.adapter import SalesforceAdapter
from connector.state import SqlStateStore
from tests.e2e.conftest import CONNECTION, Run
from tests.e2e.test_sync import REFERRAL_FIELD, add_opportunity, writes


class Crash(BaseException):
    """Stands for the process dying: no `except Exception` catches it."""


@contextmanager
def crash_on(target: Any, method: str, nth: int, *, after: bool = False) -> Iterator[list[int]]:
    """Make the ``nth`` call of ``target.method`` crash (before or after the real call)."""
    original = getattr(target, method)
    calls = [0]

    lock = threading.Lock()

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with lock:  # Partner Center writes go out on several threads: each call keeps its own number
            calls[0] += 1
            n = calls[0]
        if n == nth and not after:
            raise Crash(f"{method} #{nth}")
        result = original(*args, **kwargs)
        if n == nth and after:
            raise Crash(f"after {method} #{nth}")
        return result

    setattr(target, method, wrapper)
    try:
        yield calls
    finally:
        setattr(target, method, original)


POINTS: dict[str, Callable[[int], Any]] = {}


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("point", "nth"),
    [
        ("pc-create-landed", 1),  # the POST reached Partner Center; the answer was never recorded
        ("pc-create-landed", 7),
        ("crm-batch", 1),  # died while writing the page's CRM batch
        ("in-page-commit", 1),  # died inside the page commit (links saved, audit not yet)
        ("before-cursor", 1),  # died after the page, before its cursor
        ("pc-patch-landed", 2),  # a field change reached Partner Center; the base was not saved
    ],
)
def test_a_crash_anywhere_converges_without_duplicates(
    run: Run, pc: Any, sf: Any, store: SqlStateStore, point: str, nth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    opps = [add_opportunity(sf, name=f"Deal {i}") for i in range(12)]
    if point == "pc-patch-landed":
        run()  # first create everything, then crash while pushing changes
        for opp in opps[:6]:
            sf.update_row("Opportunity", opp, {"Description": "updated in the CRM"})
    target: tuple[Any, str, bool]
    target = {
        "pc-create-landed": (PartnerCenterClient, "create", True),
        "pc-patch-landed": (PartnerCenterClient, "update", True),
        "crm-batch": (SalesforceAdapter, "apply", False),
        "in-page-commit": (SqlStateStore, "append_audit", False),
        "before-cursor": (SqlStateStore, "set_cursor", False),
    }[point]
    cls, method, after = target
    with crash_on(cls, method, nth, after=after), pytest.raises(Crash):
        run()
    report = run()  # the restart
    assert report.counts["failed"] == 0, report.problems

    referrals_by_opp: dict[str, list[str]] = {}
    for rid, doc in pc.referrals.items():
        referrals_by_opp.setdefault(doc["externalReferenceId"], []).append(rid)
    assert sorted(referrals_by_opp) == sorted(opps), "a referral is missing or unpaired"
    assert all(len(v) == 1 for v in referrals_by_opp.values()), f"duplicate referrals: {referrals_by_opp}"
    for opp in opps:
        [rid] = referrals_by_opp[opp]
        assert sf.tables["Opportunity"][opp][REFERRAL_FIELD] == rid
        link = store.link_by_crm(CONNECTION, opp)
        assert link is not None and link.referral_id == rid
    if point == "pc-patch-landed":
        for opp in opps[:6]:
            [rid] = referrals_by_opp[opp]
            assert pc.referrals[rid]["details"]["notes"] == "updated in the CRM"
    before = writes(pc, sf)
    run()
    assert writes(pc, sf) == before, "a settled book must not be written again"


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_a_crash_after_the_crm_created_opportunities_never_duplicates_them(
    run: Run, pc: Any, sf: Any, store: SqlStateStore
) -> None:
    inbound = pc.seed(5, mix=False, seed=3)
    with pc._store:
        for rid in inbound:
            pc.referrals[rid].update(
                {
                    "status": "New",
                    "substatus": "Received",
                    "direction": "Incoming",
                    "externalReferenceId": None,
                    "salesStage": None,
                }
            )
    # the CRM answered the page's batch (opportunities exist), then the process died before our commit
    with crash_on(SalesforceAdapter, "apply", 1, after=True), pytest.raises(Crash):
        run()
    report = run()
    assert report.counts["failed"] == 0, report.problems
    for rid in inbound:
        opps = [oid for oid, row in sf.tables["Opportunity"].items() if row.get(REFERRAL_FIELD) == rid]
        assert len(opps) == 1, f"referral {rid} has opportunities {opps}"
        link = store.link_by_referral(CONNECTION, rid)
        assert link is not None and link.crm_id == opps[0]
