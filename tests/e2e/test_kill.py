"""kill -9 during a real `cosell sync` process: killed repeatedly at random points of a 2,000-record
two-way run, then allowed to finish, the book converges — no duplicate referral, every open opted-in
opportunity paired exactly once, one opportunity per inbound referral — and a further run writes
nothing. (Comparing field by field with an uninterrupted run on a second set of twins is left to the
in-process crash tests, which do it record by record.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from connector.partner_center.twin import PartnerCenterTwin
from connector.salesforce.twin import SalesforceTwin, seed
from connector.settings import Settings
from tests.e2e.test_sync import REFERRAL_FIELD, writes

BOOK = 2000
INBOUND = 40


def sync_process(settings: Settings) -> subprocess.Popen[bytes]:
    assert settings.config_file is not None
    return subprocess.Popen(
        [sys.executable, "-m", "connector", "--config", str(settings.config_file), "sync"],
        env={**os.environ, "COSELL_LOG__LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def seed_book(sf: SalesforceTwin, pc: PartnerCenterTwin) -> None:
    seed(sf, BOOK, opted_in_share=1.0)
    for rid in pc.seed(INBOUND, mix=False, seed=11):
        with pc._store:
            pc.referrals[rid].update(
                {
                    "status": "New",
                    "substatus": "Received",
                    "direction": "Incoming",
                    "externalReferenceId": None,
                    "salesStage": None,
                }
            )


def outcome(sf: SalesforceTwin, pc: PartnerCenterTwin) -> dict[str, Any]:
    """The book as the two systems hold it, keyed by what survives across setups (CRM ids, names)."""
    by_ref: dict[str | None, list[dict[str, Any]]] = {}
    for doc in pc.referrals.values():
        by_ref.setdefault(doc.get("externalReferenceId"), []).append(doc)
    opps = sf.tables["Opportunity"]
    return {
        "referrals": len(pc.referrals),
        "duplicates": sorted(k for k, v in by_ref.items() if k and len(v) > 1),
        "unpaired_opportunities": sorted(
            oid
            for oid, row in opps.items()
            if row.get("Sync_with_Partner_Center__c")
            and not row.get(REFERRAL_FIELD)
            and not row.get("IsClosed")
        ),
        "opportunities": len(opps),
    }


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_kill_9_at_random_points_converges_to_the_uninterrupted_result(
    settings: Settings, sf: SalesforceTwin, pc: PartnerCenterTwin, tmp_path: Path
) -> None:
    seed_book(sf, pc)
    rng = random.Random(2026)
    kills = 0
    for _ in range(6):
        proc = sync_process(settings)
        time.sleep(rng.uniform(0.5, 4.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)  # reaps it and closes its pipe
        # a killed run keeps its lease until it expires: let it lapse, as a restarted daemon would
        _expire_leases(settings)
    assert kills >= 3, "the run finished before it could be killed often enough"
    for _ in range(3):  # then let it finish (each run resumes from the outbox and the cursors)
        proc = sync_process(settings)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, 1), err.decode()[-2000:]
    result = outcome(sf, pc)
    assert result["duplicates"] == []
    assert result["unpaired_opportunities"] == []
    inbound_opps = [
        r
        for r in sf.tables["Opportunity"].values()
        if r.get(REFERRAL_FIELD) and r["Name"].startswith("Seed deal")
    ]
    assert len(inbound_opps) == INBOUND  # one opportunity per inbound referral, no more
    before = writes(pc, sf)
    proc = sync_process(settings)
    proc.communicate(timeout=300)
    assert writes(pc, sf) == before, "a settled book must not be written again"


def _expire_leases(settings: Settings) -> None:
    from datetime import UTC, datetime

    from connector.state import open_store

    store = open_store(settings.state_url)
    try:
        holder = store.lease_holder("acme", now=datetime.now(UTC))
        if holder:
            store.release_lease("acme", holder)
    finally:
        store.close()
