"""What an operator's log pipeline and database may hold (issue 7, "What an operator sees"): canary
secrets and canary customer contact details are planted in the twins, the environment and the
config; a full two-way sync runs through ``cosell sync`` (JSON logs, DEBUG) and then the daemon;
every captured log line, every audit row and every column of every table of the SQLite state store
is scanned.

- Secrets (client secret, passwords, every access and refresh token the identity provider and
  Salesforce issued during the runs, the webhook-style ``webhook_secret`` env value) must appear
  nowhere: not in logs, not in any table.
- Customer contact details (a unique e-mail and phone on the Salesforce contact, the Partner Center
  customer contact and a Partner Center team member) must not appear in logs or the audit table.
  None of them appears anywhere in the store: the merge base keeps team members as digests
  (``merge.member_digest``; until migration 0004 it held their e-mail and phone).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from connector.partner_center.twin import PartnerCenterTwin
from connector.remote.idp_twin import IdpTwin
from connector.salesforce.twin import SalesforceTwin
from tests.daemon.conftest import REPO, Daemon, Setup
from tests.e2e.conftest import PC_PASSWORD, SF_PASSWORD, SF_SECRET
from tests.e2e.test_sync import REFERRAL_FIELD, add_opportunity

# Planted contact details: unique, so a hit is this data and nothing else.
SF_CONTACT_EMAIL, SF_CONTACT_PHONE = "ines.canary.4417@customer-sf.example", "+1 425 555 4417"
PC_CUSTOMER_EMAIL, PC_CUSTOMER_PHONE = "olu.canary.8830@customer-pc.example", "+44 20 7946 8830"
PC_TEAM_EMAIL, PC_TEAM_PHONE = "mika.canary.2291@microsoft-pc.example", "+49 30 5557 2291"
CONTACTS = (
    SF_CONTACT_EMAIL,
    SF_CONTACT_PHONE,
    PC_CUSTOMER_EMAIL,
    PC_CUSTOMER_PHONE,
    PC_TEAM_EMAIL,
    PC_TEAM_PHONE,
)
#: A secret given to the process that nothing should ever echo (the settings refuse it in YAML).
UNUSED_SECRET_ENV = {"COSELL_UNUSED_WEBHOOK_SECRET": "webhook-secret-canary-3187"}


def plant_salesforce_contact(sf: SalesforceTwin, opp: str) -> None:
    account = sf.tables["Opportunity"][opp]["AccountId"]
    contact = sf.add_row(
        "Contact",
        {"FirstName": "Ines", "LastName": "Canary", "Email": SF_CONTACT_EMAIL, "Phone": SF_CONTACT_PHONE,
         "Title": "CIO", "AccountId": account},
    )  # fmt: skip
    sf.add_row(
        "OpportunityContactRole",
        {"OpportunityId": opp, "ContactId": contact, "Role": "Decision Maker", "IsPrimary": True},
    )


def plant_inbound_referral(pc: PartnerCenterTwin) -> str:
    [rid] = pc.seed(1, mix=False, seed=99)
    with pc._store:
        doc = pc.referrals[rid]
        doc.update(
            {"status": "New", "substatus": "Received", "direction": "Incoming", "externalReferenceId": None,
             "salesStage": None}
        )  # fmt: skip
        doc["customerProfile"]["team"] = [
            {"firstName": "Olu", "lastName": "Canary", "email": PC_CUSTOMER_EMAIL,
             "phoneNumber": PC_CUSTOMER_PHONE}
        ]  # fmt: skip
        doc["team"] = [
            {"firstName": "Mika", "lastName": "Canary", "email": PC_TEAM_EMAIL, "phoneNumber": PC_TEAM_PHONE}
        ]
    return rid


def issued_tokens(idp: IdpTwin, sf: SalesforceTwin) -> set[str]:
    """Every access and refresh token the remotes handed out during the test."""
    with idp._state:
        tokens = set(idp._access) | set(idp._refresh)
    return tokens | set(sf.sessions)


def state_rows(db: Path) -> dict[str, list[tuple[str, str]]]:
    """Every column value of every row of every table: table -> [(column, value as text)]."""
    out: dict[str, list[tuple[str, str]]] = {}
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names from sqlite_master
            columns = [d[0] for d in cursor.description]
            out[table] = [(c, str(v)) for row in cursor for c, v in zip(columns, row, strict=True)]
    conn.close()
    return out


def hits(
    texts: dict[str, list[tuple[str, str]]], needles: tuple[str, ...] | set[str]
) -> set[tuple[str, str, str]]:
    return {
        (table, column, n) for table, cells in texts.items() for column, v in cells for n in needles if n in v
    }


def test_no_secret_anywhere_and_no_contact_detail_in_logs_or_audit(
    make_setup: Callable[..., Setup],
    start_daemon: Callable[..., Daemon],
    pc: PartnerCenterTwin,
    sf: SalesforceTwin,
    idp: IdpTwin,
) -> None:
    setup = make_setup(interval=3600)
    # the most talkative level an operator could choose: DEBUG must not leak either
    config = yaml.safe_load(setup.config.read_text(encoding="utf-8"))
    config["log"] = {"format": "json", "level": "DEBUG"}
    setup.config.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**setup.env, **UNUSED_SECRET_ENV}

    opp = add_opportunity(sf, name="Canary outbound")
    plant_salesforce_contact(sf, opp)
    rid = plant_inbound_referral(pc)

    # a full two-way sync through the CLI, JSON logs on stderr
    sync = subprocess.run(
        [sys.executable, "-m", "connector", "--config", str(setup.config), "sync", "--full"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert sync.returncode == 0, sync.stdout + sync.stderr
    # the sync did move the planted data both ways (or the scan below would prove nothing)
    [outbound] = [d for d in pc.referrals.values() if d.get("externalReferenceId") == opp]
    assert [m["email"] for m in outbound["customerProfile"]["team"]] == [SF_CONTACT_EMAIL]
    assert any(row.get(REFERRAL_FIELD) == rid for row in sf.tables["Opportunity"].values())

    # ... then the daemon briefly: a run at start, a Partner Center-side change, SIGTERM
    pc.edit(rid, lambda d: d["details"].update(notes="changed by Microsoft"))
    daemon = start_daemon(Setup(setup.config, setup.settings, env))
    daemon.wait_for(lambda: daemon.event("run.end"), "a daemon run")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0

    logs = sync.stdout + "\n" + sync.stderr + "\n" + daemon.output()
    log_events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "run.end" for e in log_events)  # the logs really were captured

    secrets = {SF_SECRET, SF_PASSWORD, PC_PASSWORD, *UNUSED_SECRET_ENV.values(), *issued_tokens(idp, sf)}
    assert len(secrets) > 5  # tokens were issued (and are scanned for)
    assert [s for s in secrets if s in logs] == []
    assert "eyJ" not in logs  # no JWT (the ID token) either
    assert [c for c in CONTACTS if c in logs] == []

    db = Path(setup.settings.state_url.removeprefix("sqlite:///"))
    state = state_rows(db)
    assert {"links", "audit", "runs", "cursors"} <= set(state)
    assert state["audit"], "the audit table is empty: nothing was scanned"
    assert hits(state, secrets) == set()
    assert not any("eyJ" in v for cells in state.values() for _, v in cells)
    assert hits({"audit": state["audit"]}, CONTACTS) == set()
    assert hits({"runs": state["runs"], "cursors": state["cursors"]}, CONTACTS) == set()
    # the merge base keeps who is on the team as digests: no contact detail anywhere in the store
    assert hits(state, CONTACTS) == set()
    assert state["links"], "the links table is empty: nothing was scanned"
