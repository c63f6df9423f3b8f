"""Fixtures for the command-line tests.

The operator commands read a real SQLite state store that each test fills through the StateStore API
(never through SQL), so the tests see what the engine would have left behind. The one end-to-end
test reuses the twins and the signed-in configuration of tests/e2e: the fixture functions are
imported here (pytest registers fixtures found in a conftest's namespace), and ``state_url`` is
narrowed to SQLite because the PostgreSQL path of the engine is covered by tests/e2e already.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from connector.state import (
    AuditEntry,
    Conflict,
    DeadLetter,
    Link,
    OutboxEntry,
    OutboxState,
    RunRecord,
    SqlStateStore,
    System,
    open_store,
)
from tests.e2e.conftest import ca, idp, pc, settings, sf  # noqa: F401  (fixtures, used by name)

#: Contact details planted in the audit and the conflict queue; no command may ever print them.
PLANTED_EMAILS = ("jane.doe@customer.example", "sam.seller@partner.example", "ops@contoso.example")
PLANTED_PHONES = ("+44 20 7946 0958", "+1 (425) 555-0199")
PLANTED_NAMES = ("Jane", "Doe")

LONG_CURSOR = "sf:" + "0" * 20 + "|2026-03-02T09:00:00Z|" + "k" * 80


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    """SQLite only here (overrides the e2e fixture's SQLite/PostgreSQL parameters)."""
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def ops_config(tmp_path: Path, state_url: str) -> Path:
    """A config with two connections (acme, beta) on the test's SQLite store; no remote is used."""
    crm = {
        "kind": "dynamics",
        "base_url": "https://x.crm.dynamics.com",
        "auth": {"tenant_id": "t", "client_id": "c"},
    }
    pc_conf = {"authority": "https://login.microsoftonline.com/t", "auth": {"client_id": "c"}}
    connection = {"crm": crm, "partner_center": pc_conf, "mappings": ["builtin:dynamics-default.yaml"]}
    config = {
        "data_dir": str(tmp_path / "data"),
        "state": {"url": state_url},
        "connections": {"acme": connection, "beta": {**connection, "enabled": False}},
    }
    path = tmp_path / "cosell.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def seeded(state_url: str) -> Iterator[SqlStateStore]:
    """The store after some runs of ``acme`` (and a little of ``beta``), filled through its API."""
    store = open_store(state_url)
    try:
        _seed(store)
        yield store
    finally:
        store.close()


def _seed(store: SqlStateStore) -> None:
    t0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    store.start_run(RunRecord("run-old", "acme", started_at=t0))
    store.finish_run("run-old", "ok", {"pc_created": 3, "unchanged": 0})
    store.start_run(RunRecord("run-new", "acme", started_at=t0 + timedelta(hours=1)))
    store.finish_run("run-new", "partial", {"pc_updated": 2, "blocked": 1, "failed": 1}, "1 record failed")

    store.save_link(Link("acme", "006A", "ref-A", snapshot={"name": "A"}))
    store.save_link(Link("acme", "006B", "ref-B", snapshot={"name": "B"}))
    store.save_link(
        Link("acme", "006C", "ref-C", status="blocked", status_detail="blocked: terminal-immutable")
    )
    store.save_link(Link("beta", "006Z", "ref-Z"))

    store.set_cursor("acme", "crm", LONG_CURSOR)
    store.set_cursor("acme", "partner_center", "https://pc.example/delta?token=abc")

    pending = OutboxEntry("acme", System.PARTNER_CENTER, "update", "006A", {}, "key-pending")
    store.enqueue(pending)
    store.enqueue(
        OutboxEntry("acme", System.PARTNER_CENTER, "wait", "006B", {}, "key-wait",
                    state=OutboxState.WAITING, wait_reason="not-accepted")
    )  # fmt: skip
    done = store.enqueue(OutboxEntry("acme", System.PARTNER_CENTER, "create", "006C", {}, "key-done"))
    assert done.id is not None
    store.mark_done(done.id)

    store.add_dead_letter(
        DeadLetter("acme", System.CRM, "006D", cause="INVALID_FIELD",
                   detail=f"bad value; contact {PLANTED_EMAILS[2]} or {PLANTED_PHONES[1]}")
    )  # fmt: skip
    store.add_dead_letter(
        DeadLetter("acme", System.PARTNER_CENTER, "ref-E", cause="http-400", detail="validation", attempts=5)
    )
    store.add_dead_letter(DeadLetter("beta", System.CRM, "006Y", cause="no-result"))

    team_before = [
        {"first_name": "Jane", "last_name": "Doe", "email": PLANTED_EMAILS[0], "phone": PLANTED_PHONES[0]}
    ]
    team_after = [
        *team_before,
        {"first_name": "Sam", "last_name": "Seller", "email": PLANTED_EMAILS[1], "phone": ""},
    ]
    store.add_conflict(Conflict("acme", "006A", "ref-A", "value", "100", "150", "175"))
    store.add_conflict(Conflict("acme", "006B", "ref-B", "team", team_before, team_after, []))
    store.add_conflict(
        Conflict("beta", "006Z", "ref-Z", "close_date", "2026-01-01", "2026-02-01", "2026-03-01")
    )

    audit = [
        AuditEntry("acme", "run-new", "corr-1", "set", "crm->pc", "value", "100", "150", "changed in CRM",
                   crm_id="006A", referral_id="ref-A", at=t0 + timedelta(hours=1)),
        AuditEntry("acme", "run-new", "corr-1", "set", "crm->pc", "team", team_before, team_after, "set merge",
                   crm_id="006A", referral_id="ref-A", at=t0 + timedelta(hours=1, seconds=1)),
        AuditEntry("acme", "run-new", "corr-1", "set", "pc->crm", "notes", "",
                   f"call the buyer at {PLANTED_EMAILS[0]} / {PLANTED_PHONES[0]}", "changed in Partner Center",
                   crm_id="006B", referral_id="ref-B", at=t0 + timedelta(hours=1, seconds=2)),
        AuditEntry("acme", "run-new", "corr-1", "set", "pc->crm", "customer_contact", None,
                   {"first_name": "Jane", "last_name": "Doe", "email": PLANTED_EMAILS[0]}, "changed in Partner Center",
                   crm_id="006B", referral_id="ref-B", at=t0 + timedelta(hours=1, seconds=3)),
        AuditEntry("acme", "run-new", "corr-1", "refused", "none", "value", None, None, "terminal-immutable",
                   crm_id="006C", referral_id="ref-C", at=t0 + timedelta(hours=1, seconds=4)),
        AuditEntry("beta", "run-beta", "corr-2", "set", "crm->pc", "name", "Old", "New", "changed in CRM",
                   crm_id="006Z", referral_id="ref-Z", at=t0 + timedelta(hours=2)),
    ]  # fmt: skip
    store.append_audit(audit)
