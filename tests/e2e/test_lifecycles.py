"""Every lifecycle of the co-sell domain (/work/shared/docs/cosell-domain.md), end to end.

The real engine, Partner Center client and CRM adapters (Salesforce and Dynamics), over real HTTPS
against the twins, signed in through real msal, with a real state store (SQLite everywhere, PostgreSQL
for a representative subset). Each test drives one lifecycle through its steps the way people would
(a seller in the CRM, Microsoft or the partner's staff in Partner Center), and checks:

- the final state on both twins (status/substatus, sales stage, fields; CRM stage and sync status);
- the audit rows (which rule or policy decided each change);
- the run report's counts;
- that one more run with no external change writes nothing anywhere (call counters by operation,
  and the twins' own request logs).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from connector.cli import main as cosell_main
from connector.dynamics.twin import DataverseTwin
from connector.partner_center.models import format_utc
from connector.partner_center.twin import INBOUND_EXPIRY, PartnerCenterTwin
from connector.remote.calls import CallKey
from connector.remote.idp_twin import IdpTwin
from connector.remote.twin import Clock, TwinCA
from connector.salesforce.twin import SalesforceTwin
from connector.salesforce.twin_soql import FieldDef
from connector.settings import Settings, load_settings
from connector.state import AuditEntry, SqlStateStore, open_store
from connector.sync.engine import RunReport
from connector.sync.factory import run_context
from tests.e2e.conftest import (
    CONNECTION,
    NO_SLEEP,
    PC_CLIENT,
    PC_USER,
    SF_PASSWORD,
    SF_SECRET,
    connection_config,
)
from tests.e2e.test_sync import REFERRAL_FIELD, STATUS_FIELD, add_opportunity

DV_CLIENT, DV_SECRET = "cosell-e2e-dataverse", "dv-secret-canary-2207"
LOSS_REASON_FIELD = "Loss_Reason__c"
#: (system, operation) pairs of the call counter that are writes; every other operation is a read
WRITE_OPERATIONS = frozenset(
    {
        ("partner-center", "create"),
        ("partner-center", "update"),
        ("salesforce", "composite"),
        ("salesforce", "sobject"),  # conditional one-by-one PATCH (If-Unmodified-Since)
        ("dynamics", "write"),
    }
)
MICROSOFT_SELLER = {
    "firstName": "Mia",
    "lastName": "Msft",
    "phoneNumber": "+1 425 555 0100",
    "email": "mia.msft@microsoft.example",
}


# --- the CRM side, one class per CRM -----------------------------------------------------------------


class SalesforceBook:
    """The Salesforce twin, in the CRM-neutral words the lifecycle tests use."""

    kind = "salesforce"
    #: the CRM's stage label for each Partner Center state of the default mapping
    label: ClassVar[dict[str, str]] = {
        "received": "Prospecting",
        "accepted": "Prospecting",
        "qualified": "Needs Analysis",
        "developed": "Value Proposition",
        "proposed": "Proposal/Price Quote",
        "negotiated": "Negotiation/Review",
        "won": "Closed Won",
        "lost": "Closed Lost",
        "declined": "Closed Lost",
        "expired": "Closed Lost",
    }

    def __init__(self, twin: SalesforceTwin) -> None:
        self.twin = twin
        # an org with a loss-reason picklist on Opportunity (configured as crm.fields.lost_reason)
        twin.schema["Opportunity"][LOSS_REASON_FIELD] = FieldDef(LOSS_REASON_FIELD, "picklist")
        for row in twin.tables["Opportunity"].values():
            row.setdefault(LOSS_REASON_FIELD, None)

    def add_opportunity(
        self,
        name: str,
        stage: str,
        *,
        share: bool = False,
        help_type: str | None = None,
        notes: str = "",
        **extra: Any,
    ) -> str:
        return add_opportunity(
            self.twin,
            name=name,
            stage=stage,
            Description=notes,
            Partner_Center_Visibility__c=share,
            Partner_Center_Help_Type__c=help_type,
            **extra,
        )

    def row(self, crm_id: str) -> dict[str, Any]:
        return self.twin.tables["Opportunity"][crm_id]

    def stage(self, crm_id: str) -> str:
        return str(self.row(crm_id)["StageName"])

    def move(self, crm_id: str, stage: str, *, reason: str | None = None) -> None:
        values: dict[str, Any] = {"StageName": stage}
        if reason is not None:
            values[LOSS_REASON_FIELD] = reason
        self.twin.update_row("Opportunity", crm_id, values)

    def update(self, crm_id: str, **values: Any) -> None:
        self.twin.update_row("Opportunity", crm_id, values)

    def referral_id(self, crm_id: str) -> str | None:
        return self.row(crm_id).get(REFERRAL_FIELD)

    def sync_status(self, crm_id: str) -> str:
        return str(self.row(crm_id).get(STATUS_FIELD) or "")

    def notes(self, crm_id: str) -> str:
        return str(self.row(crm_id).get("Description") or "")

    def set_notes(self, crm_id: str, notes: str) -> None:
        self.update(crm_id, Description=notes)

    def value(self, crm_id: str) -> float:
        return float(self.row(crm_id)["Amount"])

    def set_value(self, crm_id: str, value: float) -> None:
        self.update(crm_id, Amount=value)

    def by_referral(self, referral_id: str) -> list[str]:
        return [k for k, r in self.twin.tables["Opportunity"].items() if r.get(REFERRAL_FIELD) == referral_id]

    def opted_in(self, crm_id: str) -> bool:
        return self.row(crm_id).get("Sync_with_Partner_Center__c") is True

    def write_requests(self) -> int:
        return sum(len(self.twin.calls(m, "/services/data/")) for m in ("PATCH", "POST", "DELETE"))

    def later(self, delta: timedelta) -> None:
        self.twin.clock.advance(delta)


class DataverseBook:
    """The Dataverse twin, in the same words (closed stages are Dataverse's status reasons)."""

    kind = "dynamics"
    label: ClassVar[dict[str, str]] = {
        "received": "Qualify",
        "accepted": "Qualify",
        "qualified": "Qualify",
        "developed": "Develop",
        "proposed": "Propose",
        "negotiated": "Close",
        "won": "Won",
        "lost": "Out-Sold",
        "declined": "Canceled",
        "expired": "Canceled",
    }
    _SALESSTAGE: ClassVar[dict[str, int]] = {"Qualify": 0, "Develop": 1, "Propose": 2, "Close": 3}
    _CLOSED: ClassVar[dict[str, tuple[int, int]]] = {"Won": (1, 3), "Canceled": (2, 4), "Out-Sold": (2, 5)}

    def __init__(self, twin: DataverseTwin) -> None:
        self.twin = twin
        self._n = 0

    def add_opportunity(
        self, name: str, stage: str, *, notes: str = "", value: float = 50000.0, **extra: Any
    ) -> str:
        self._n += 1
        t = self.twin
        account = t.insert(
            "accounts",
            {"name": f"Fabrikam {self._n}", "address1_city": "Seattle", "address1_country": "United States"},
        )
        owner = t.insert(
            "systemusers",
            {"firstname": "Dana", "lastname": f"Seller{self._n}", "fullname": f"Dana Seller{self._n}",
             "internalemailaddress": f"dana{self._n}@partner.example", "address1_telephone1": "+1 555 0101"},
        )  # fmt: skip
        product = t.insert("products", {"name": "Fabrikam Cloud", "productnumber": "SOL-34104-EBB"})
        values: dict[str, Any] = {
            "name": name,
            "estimatedvalue": value,
            "estimatedclosedate": "2027-03-31",
            "description": notes,
            "_parentaccountid_value": account,
            "_customerid_value": account,
            "_ownerid_value": owner,
            "new_syncwithpartnercenter": True,
            **self._stage_values(stage),
            **extra,
        }
        oid = t.insert("opportunities", values)
        t.insert(
            "opportunityproducts",
            {"_opportunityid_value": oid, "_productid_value": product, "quantity": 1, "priceperunit": value},
        )
        return oid

    def _stage_values(self, stage: str) -> dict[str, Any]:
        if stage in self._CLOSED:
            state, status = self._CLOSED[stage]
            return {"statecode": state, "statuscode": status}
        return {"salesstage": self._SALESSTAGE[stage], "statecode": 0, "statuscode": 1}

    def row(self, crm_id: str) -> dict[str, Any]:
        return self.twin.row("opportunities", crm_id)

    def stage(self, crm_id: str) -> str:
        row = self.row(crm_id)
        if row["statecode"]:
            return self.twin.options.statuscode[row["statuscode"]][0]
        return self.twin.options.salesstage[row["salesstage"]]

    def move(self, crm_id: str, stage: str, *, reason: str | None = None) -> None:
        assert reason is None, "Dynamics' lost reason is the status reason: move to it"
        self.twin.update("opportunities", crm_id, **self._stage_values(stage))

    def update(self, crm_id: str, **values: Any) -> None:
        self.twin.update("opportunities", crm_id, **values)

    def referral_id(self, crm_id: str) -> str | None:
        return self.row(crm_id).get("new_referralid")

    def sync_status(self, crm_id: str) -> str:
        return str(self.row(crm_id).get("new_syncstatus") or "")

    def notes(self, crm_id: str) -> str:
        return str(self.row(crm_id).get("description") or "")

    def set_notes(self, crm_id: str, notes: str) -> None:
        self.update(crm_id, description=notes)

    def value(self, crm_id: str) -> float:
        return float(self.row(crm_id)["estimatedvalue"])

    def set_value(self, crm_id: str, value: float) -> None:
        self.update(crm_id, estimatedvalue=value)

    def by_referral(self, referral_id: str) -> list[str]:
        with self.twin._data:
            rows = list(self.twin.rows["opportunities"].items())
        return [k for k, r in rows if r.get("new_referralid") == referral_id]

    def opted_in(self, crm_id: str) -> bool:
        with self.twin._data:
            return self.twin.rows["opportunities"][crm_id].get("new_syncwithpartnercenter") is True

    def write_requests(self) -> int:
        with self.twin._lock:
            return sum(1 for p in self.twin.batch_parts if p.method != "GET") + sum(
                len(self.twin.calls(m, "/api/data/")) for m in ("PATCH", "DELETE")
            )

    def later(self, delta: timedelta) -> None:
        self.twin.clock.advance(delta)


# --- the harness ------------------------------------------------------------------------------------


@dataclass
class Harness:
    settings: Settings
    store: SqlStateStore
    pc: PartnerCenterTwin
    crm: Any  # SalesforceBook | DataverseBook (one duck-typed interface)
    config_path: Path

    def run(self, **kwargs: Any) -> RunReport:
        """One sync run of the connection, as `cosell sync` does it."""
        with run_context(self.settings, CONNECTION, self.store, policy=NO_SLEEP) as ctx:
            report = ctx.engine.run(**kwargs)
            report.calls = ctx.calls.snapshot()  # type: ignore[attr-defined]
            return report

    def clean_run(self, **kwargs: Any) -> RunReport:
        report = self.run(**kwargs)
        assert report.counts["failed"] == 0, report.problems
        return report

    def settle(self) -> RunReport:
        """One more run with no external change: it must write nothing, on either side."""
        before = (self.pc.count_writes(), self.crm.write_requests())
        report = self.run()
        assert write_calls(report) == {}, f"a settled book was written again: {write_calls(report)}"
        assert (self.pc.count_writes(), self.crm.write_requests()) == before
        for key in ("pc_created", "pc_updated", "crm_created", "crm_updated", "conflicts", "failed"):
            assert report.counts[key] == 0, (key, report.counts, report.planned)
        return report

    def later(self, delta: timedelta = timedelta(minutes=10)) -> None:
        """Time passes on every system (a schedule interval: past the cursors' lookback overlap)."""
        self.pc.clock.advance(delta)
        self.crm.later(delta)

    def audit(self, **kw: Any) -> list[AuditEntry]:
        return self.store.audit(CONNECTION, **kw)

    def cosell(self, *args: str) -> int:
        return cosell_main(["--config", str(self.config_path), *args])


def write_calls(report: RunReport) -> dict[CallKey, int]:
    calls: dict[CallKey, int] = report.calls  # type: ignore[attr-defined]
    return {k: n for k, n in calls.items() if (k.system, k.operation) in WRITE_OPERATIONS}


MakeHarness = Callable[..., Harness]


@pytest.fixture
def harness(
    tmp_path: Path,
    ca: TwinCA,
    idp: IdpTwin,
    pc: PartnerCenterTwin,
    state_url: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[MakeHarness]:
    """``harness(kind, policy=..., fields=...)``: the connection configured for one CRM, the way an
    operator does it (YAML + secrets in the environment), signed in to Partner Center."""
    opened: list[SqlStateStore] = []
    stops: list[Callable[[], None]] = []

    def make(
        kind: str = "salesforce",
        *,
        policy: dict[str, Any] | None = None,
        fields: dict[str, str] | None = None,
    ) -> Harness:
        book: Any
        if kind == "salesforce":
            sf: SalesforceTwin = request.getfixturevalue("sf")
            book = SalesforceBook(sf)
            conn = connection_config(idp, pc, sf)
            conn["crm"]["fields"] = {"lost_reason": LOSS_REASON_FIELD, **(fields or {})}
            monkeypatch.setenv("COSELL_CONNECTIONS__ACME__CRM__AUTH__CLIENT_SECRET", SF_SECRET)
            monkeypatch.setenv("COSELL_CONNECTIONS__ACME__CRM__AUTH__PASSWORD", SF_PASSWORD)
        else:
            dv = DataverseTwin(ca, clock=Clock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC)))
            idp.add_client(DV_CLIENT, secret=DV_SECRET)
            # only tokens the identity provider issued for this environment's scope are accepted
            dv.auth_check = lambda header: idp.validate(header, scope_prefix=dv.base_url) is not None
            dv.start()
            stops.append(dv.stop)
            book = DataverseBook(dv)
            conn = {
                "crm": {
                    "kind": "dynamics",
                    "base_url": dv.base_url,
                    "auth": {"tenant_id": idp.tenant_id, "client_id": DV_CLIENT, "authority": idp.authority},
                    # where the connector keeps its bookkeeping on the opportunity
                    "fields": {
                        "referral_id": "new_referralid",
                        "referral_link": "new_referrallink",
                        "sync_status": "new_syncstatus",
                        "audit_line": "new_syncaudit",
                        "synced_at": "new_lastsyncedon",
                        **(fields or {}),
                    },
                },
                "partner_center": {
                    "base_url": pc.api_base_url,
                    "authority": idp.authority,
                    "auth": {"mode": "device_code", "client_id": PC_CLIENT},
                    "location_id": "loc-1",
                },
                "mappings": ["builtin:dynamics-default.yaml"],
                "policy": {"default": "newest-wins"},
            }
            monkeypatch.setenv("COSELL_CONNECTIONS__ACME__CRM__AUTH__CLIENT_SECRET", DV_SECRET)
        if policy:
            conn["policy"] = policy
        config = {
            "data_dir": str(tmp_path / "data"),
            "state": {"url": state_url},
            "tls": {"ca_bundle": str(ca.write_pem(tmp_path / "twins-ca.pem"))},
            "connections": {CONNECTION: conn},
        }
        path = tmp_path / "cosell.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        settings = load_settings(path)
        idp.sign_in(settings, CONNECTION, PC_USER)
        store = open_store(settings.state_url)
        opened.append(store)
        return Harness(settings, store, pc, book, path)

    yield make
    for store in opened:
        store.close()
    for stop in stops:
        stop()


# --- Partner Center side helpers ---------------------------------------------------------------------


def add_inbound(
    pc: PartnerCenterTwin, *, name: str = "Inbound from Microsoft", age: timedelta = timedelta(0)
) -> str:
    """An inbound referral sent to the partner, unanswered ("New/Received"), created ``age`` ago."""
    created = format_utc(pc.clock.now() - age)
    doc = {
        "id": str(uuid.uuid4()),
        "name": name,
        "createdDateTime": created,
        "updatedDateTime": created,
        "status": "New",
        "substatus": "Received",
        "type": "Shared",
        "qualification": "SalesQualified",
        "direction": "Incoming",
        "customerProfile": {
            "name": "Northwind Traders",
            "address": {"city": "Redmond", "state": "WA", "postalCode": "98052", "country": "US"},
            "team": [],
            "ids": [],
        },
        "consent": {
            "consentToToShareInfoWithOthers": True,
            "consentToContact": True,
            "consentToShareReferralWithMicrosoftSellers": True,
        },
        "details": {
            "notes": "Customer wants a migration assessment",
            "dealValue": 120000,
            "currency": "USD",
            "closingDateTime": "2027-06-30T00:00:00Z",
            "requirements": {"solutions": [{"id": "SOL-34104-EBB", "name": "Contoso", "type": "Name"}]},
        },
        "team": [copy.deepcopy(MICROSOFT_SELLER)],
    }
    return str(pc.put(doc)["id"])


def state(pc: PartnerCenterTwin, rid: str) -> tuple[str, str, str | None]:
    doc = pc.referrals[rid]
    return doc["status"], doc["substatus"], doc.get("salesStage")


def rules_of(entries: list[AuditEntry], *, field: str | None = None, action: str | None = None) -> list[str]:
    return [
        e.rule
        for e in entries
        if (field is None or e.field == field) and (action is None or e.action == action)
    ]


BOTH = pytest.mark.parametrize("kind", ["salesforce", "dynamics"])
SQLITE = pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)


# --- inbound: received -> accepted -> stages -> won ---------------------------------------------------


@BOTH
def test_inbound_received_accepted_through_the_stages_to_won(harness: MakeHarness, kind: str) -> None:
    h = harness(kind)
    crm, pc = h.crm, h.pc
    rid = add_inbound(pc)

    # Microsoft's referral arrives: an opportunity parked on the "received" stage, nothing answered yet;
    # the referral learns the new opportunity's id in the same run (one pairing PATCH)
    report = h.clean_run()
    assert (report.counts["crm_created"], report.counts["synced"], report.counts["pc_updated"]) == (1, 1, 1)
    [opp] = crm.by_referral(rid)
    assert crm.stage(opp) == crm.label["received"]
    assert crm.notes(opp) == "Customer wants a migration assessment"
    assert crm.value(opp) == 120000
    assert crm.sync_status(opp) == "synced"
    assert crm.opted_in(opp)  # in sync from birth: the seller's answer in the CRM is read back
    assert state(pc, rid) == ("New", "Received", None)
    created = {(e.action, e.direction, e.field, e.rule) for e in h.audit()}
    assert ("create", "pc->crm", "opportunity", "inbound referral") in created
    assert ("set", "pc->crm", "opportunity", "reverse:received") in created
    assert pc.referrals[rid]["externalReferenceId"] == opp
    h.settle()

    # the seller works it: moving off the received stage accepts it, at the stage it was moved to
    crm.move(opp, crm.label["developed"])
    h.later()
    report = h.clean_run()
    assert (report.counts["pc_updated"], report.counts["crm_updated"]) == (1, 0)
    assert state(pc, rid) == ("Active", "Accepted", "40")
    assert pc.referrals[rid]["team"] == [MICROSOFT_SELLER]  # what the CRM cannot carry is never wiped
    assert pc.referrals[rid]["details"]["notes"] == "Customer wants a migration assessment"
    assert "CRM moved the referral off its received stage" in rules_of(h.audit(crm_id=opp), field="stage")
    h.settle()

    crm.move(opp, crm.label["proposed"])
    h.later()
    report = h.clean_run()
    assert report.counts["pc_updated"] == 1
    assert state(pc, rid) == ("Active", "Accepted", "60")
    assert f"label:{crm.label['proposed']}" in rules_of(h.audit(crm_id=opp), field="stage")
    h.settle()

    crm.move(opp, crm.label["won"])
    h.later()
    report = h.clean_run()
    assert report.counts["pc_updated"] == 1
    assert state(pc, rid)[:2] == ("Closed", "Won")
    assert pc.referrals[rid]["closedDateTime"] is not None
    assert crm.stage(opp) == crm.label["won"] and crm.sync_status(opp) == "synced"
    won = [e for e in h.audit(crm_id=opp) if e.field == "stage" and e.new == "won"]
    assert [(e.direction, e.rule) for e in won] == [("crm->pc", "closed-flag:won")]
    h.settle()
    assert len(pc.referrals) == 1 and crm.by_referral(rid) == [opp]


@BOTH
@SQLITE
def test_inbound_accepted_and_won_in_one_move(harness: MakeHarness, kind: str) -> None:
    """A seller who goes straight from "received" to won: accept, then win (two status steps, in order)."""
    h = harness(kind)
    crm, pc = h.crm, h.pc
    rid = add_inbound(pc)
    h.clean_run()
    [opp] = crm.by_referral(rid)
    h.clean_run()
    crm.move(opp, crm.label["won"])
    h.later()
    report = h.clean_run()
    assert report.counts["pc_updated"] == 2  # Partner Center takes New -> Active -> Closed in steps
    assert state(pc, rid)[:2] == ("Closed", "Won")
    stages = [(e.old, e.new, e.rule) for e in h.audit(crm_id=opp) if e.field == "stage"]
    assert stages == [
        ("received", "accepted", "CRM moved the referral off its received stage"),
        ("received", "won", "closed-flag:won"),
    ], stages
    assert crm.stage(opp) == crm.label["won"] and crm.sync_status(opp) == "synced"
    h.settle()


@SQLITE
def test_an_inbound_referral_is_paired_in_the_run_that_creates_its_opportunity(harness: MakeHarness) -> None:
    h = harness("salesforce")
    rid = add_inbound(h.pc)
    h.clean_run()
    [opp] = h.crm.by_referral(rid)
    assert h.pc.referrals[rid]["externalReferenceId"] == opp  # fails: None until the next run
    h.settle()  # fails too: the second run sends the pairing PATCH


# --- inbound: declined, with its reason ------------------------------------------------------------


@BOTH
@SQLITE
def test_inbound_declined_with_its_reason(harness: MakeHarness, kind: str) -> None:
    h = harness(kind)
    crm, pc = h.crm, h.pc
    rid = add_inbound(pc)
    h.clean_run()
    [opp] = crm.by_referral(rid)
    h.clean_run()

    if kind == "salesforce":
        # a lost stage without a reason cannot decline: blocked, with the rule's words, nothing sent
        crm.move(opp, "Closed Lost")
        h.later()
        writes_before = h.pc.count_writes()
        report = h.run()
        assert report.counts["blocked"] == 1 and report.counts["pc_updated"] == 0
        assert (opp, "decline-needs-reason", "Declining a referral needs a reason.") in report.problems
        assert h.pc.count_writes() == writes_before
        assert state(pc, rid) == ("New", "Received", None)
        assert crm.sync_status(opp) == "blocked: decline-needs-reason"
        assert "decline-needs-reason" in rules_of(h.audit(crm_id=opp), action="refused")
        crm.move(opp, "Closed Lost", reason="Lost to Competitor")  # the seller gives the reason
    else:
        crm.move(opp, "Out-Sold")  # Dynamics: the status reason of the lost state is the reason
    h.later()
    report = h.clean_run()
    assert report.counts["pc_updated"] == 1 and report.counts["blocked"] == 0
    assert state(pc, rid)[:2] == ("Closed", "Declined")
    # the CRM's words through the reasons value map
    assert pc.referrals[rid]["statusReason"] == "Customer chose another vendor"
    assert crm.sync_status(opp) == "synced"
    assert crm.stage(opp) == crm.label["lost"]
    assert "CRM moved the unanswered referral to a lost stage" in rules_of(
        h.audit(crm_id=opp), field="stage", action="set"
    )
    h.settle()


# --- inbound: expired after 14 days unanswered -----------------------------------------------------


@BOTH
@SQLITE
def test_inbound_unanswered_for_14_days_expires_and_the_crm_follows(harness: MakeHarness, kind: str) -> None:
    h = harness(kind)
    crm, pc = h.crm, h.pc
    rid = add_inbound(pc, age=INBOUND_EXPIRY - timedelta(minutes=5))
    h.clean_run()
    [opp] = crm.by_referral(rid)
    h.clean_run()
    assert state(pc, rid)[:2] == ("New", "Received")

    h.later()  # nobody answered: on Partner Center's clock the 14 days are over
    report = h.clean_run()
    assert state(pc, rid)[:2] == ("Closed", "Expired")
    assert (report.counts["crm_updated"], report.counts["pc_updated"]) == (1, 0)
    assert crm.stage(opp) == crm.label["expired"]
    assert crm.sync_status(opp) == "synced"
    expired = [e for e in h.audit(crm_id=opp) if e.field == "stage" and e.rule == "reverse:expired"]
    assert [(e.direction, e.new) for e in expired] == [("pc->crm", crm.label["expired"])]
    h.settle()

    # an expired referral can never change again: a later CRM edit is refused, and the CRM says so
    crm.set_notes(opp, "edited after expiry")
    h.later()
    writes_before = pc.count_writes()
    report = h.run()
    assert report.counts["blocked"] == 1 and pc.count_writes() == writes_before
    assert [rule for _, rule, _ in report.problems] == ["terminal-immutable"]
    assert "can never be changed again" in report.problems[0][2]
    assert crm.sync_status(opp) == "blocked: terminal-immutable"
    assert pc.referrals[rid]["details"]["notes"] == "Customer wants a migration assessment"
    assert "terminal-immutable" in rules_of(h.audit(crm_id=opp), action="refused")
    h.settle()


@SQLITE
def test_a_refused_change_is_audited_as_refused_not_as_written(harness: MakeHarness) -> None:
    h = harness("salesforce")
    crm, pc = h.crm, h.pc
    opp = crm.add_opportunity("Closed deal", crm.label["qualified"], notes="before")
    h.clean_run()
    [rid] = pc.referrals
    pc.edit(rid, lambda d: d.update(status="Closed", substatus="Won"))
    h.later()
    h.clean_run()  # the CRM follows Partner Center to Closed Won
    assert crm.stage(opp) == "Closed Won"
    crm.set_notes(opp, "edited after the win")
    h.later()
    report = h.run()
    assert report.counts["blocked"] == 1 and pc.referrals[rid]["details"]["notes"] == "before"
    sent = [e for e in h.audit(crm_id=opp) if e.action == "set" and e.field == "notes"]
    assert sent == [], f"audited as sent to Partner Center, which never received it: {sent}"


# --- outbound: private -> partner-led -> co-sell -> won ---------------------------------------------


def test_outbound_private_to_partner_led_to_co_sell_to_won(harness: MakeHarness) -> None:
    h = harness("salesforce")
    crm, pc = h.crm, h.pc
    opp = crm.add_opportunity("Private deal", crm.label["qualified"])

    report = h.clean_run()
    assert report.counts["pc_created"] == 1
    [rid] = pc.referrals
    doc = pc.referrals[rid]
    assert (doc["status"], doc["substatus"], doc["salesStage"], doc["direction"]) == (
        "Active", "Accepted", "20", "Outgoing"
    )  # fmt: skip
    assert doc["consent"]["consentToShareReferralWithMicrosoftSellers"] is False  # private
    assert not (doc.get("inviteContext") or {}).get("assistanceRequestCode")
    assert doc["externalReferenceId"] == opp and crm.referral_id(opp) == rid
    h.settle()

    # "Microsoft sellers may view this deal": partner-led, through the one PATCH path there is
    crm.update(opp, Partner_Center_Visibility__c=True)
    h.later()
    report = h.clean_run()
    assert report.counts["pc_updated"] == 1
    assert pc.referrals[rid]["consent"]["consentToShareReferralWithMicrosoftSellers"] is True
    upgrades = [e for e in h.audit(crm_id=opp) if e.field == "deal_type"]
    assert [(e.old, e.new, e.rule) for e in upgrades] == [
        ("private", "partner-led", "upgrade: private -> partner-led")
    ]
    h.settle()

    # asking Microsoft for help would make it co-sell, but help is not a PATCH path: refused, said
    crm.update(opp, Partner_Center_Help_Type__c="ProofOfConceptOrDemo")
    h.later()
    writes_before = pc.count_writes()
    report = h.run()
    assert report.counts["blocked"] == 1 and report.counts["pc_updated"] == 0
    assert pc.count_writes() == writes_before
    [(record, rule, message)] = report.problems
    assert (record, rule) == (opp, "help-not-patchable")
    assert "request the help in Partner Center" in message
    assert crm.sync_status(opp) == "blocked: help-not-patchable"
    assert "request the help in Partner Center" in crm.row(opp)["Partner_Center_Audit__c"]
    refused = [e for e in h.audit(crm_id=opp) if e.action == "refused"]
    assert [(e.field, e.rule) for e in refused] == [("help_requested", "help-not-patchable")]
    assert not (pc.referrals[rid].get("inviteContext") or {}).get("assistanceRequestCode")
    h.settle()  # refused once, not again and again

    # a person requests the help in Partner Center, as the message says: the deal is co-sell
    pc.edit(rid, lambda d: d.update(inviteContext={"assistanceRequestCode": "ProofOfConceptOrDemo"}))
    h.later()
    h.clean_run()
    assert not h.store.conflicts(CONNECTION)

    crm.move(opp, crm.label["won"])
    h.later()
    report = h.clean_run()
    assert report.counts["pc_updated"] == 1 and report.counts["blocked"] == 0
    doc = pc.referrals[rid]
    assert (doc["status"], doc["substatus"]) == ("Closed", "Won")
    assert doc["inviteContext"]["assistanceRequestCode"] == "ProofOfConceptOrDemo"
    assert doc["consent"]["consentToShareReferralWithMicrosoftSellers"] is True
    assert crm.stage(opp) == "Closed Won" and crm.sync_status(opp) == "synced"
    link = h.store.link_by_crm(CONNECTION, opp)
    assert link is not None and (link.referral_id, link.status) == (rid, "linked")
    h.settle()
    assert len(pc.referrals) == 1


@SQLITE
def test_a_blocked_record_is_unblocked_once_the_help_is_requested_in_partner_center(
    harness: MakeHarness,
) -> None:
    h = harness("salesforce")
    crm, pc = h.crm, h.pc
    opp = crm.add_opportunity("Needs help", crm.label["qualified"], share=True)
    h.clean_run()
    [rid] = pc.referrals
    crm.update(opp, Partner_Center_Help_Type__c="QuotesOrLicensing")
    h.later()
    assert h.run().counts["blocked"] == 1
    assert crm.sync_status(opp) == "blocked: help-not-patchable"
    pc.edit(rid, lambda d: d.update(inviteContext={"assistanceRequestCode": "QuotesOrLicensing"}))
    h.later()
    h.clean_run()
    link = h.store.link_by_crm(CONNECTION, opp)
    assert link is not None and link.status == "linked", link
    assert crm.sync_status(opp) == "synced"


# --- lost, with the reason mapped -------------------------------------------------------------------


@SQLITE
@pytest.mark.parametrize(
    ("kind", "lost_stage", "reason", "pc_reason"),
    [
        ("salesforce", "Closed Lost", "Lost to Competitor", "Customer chose another vendor"),
        ("salesforce", "Closed Lost", "Timing", "Proposed time line was too short"),
        ("salesforce", "Closed Lost", None, "Others"),  # no reason given: Partner Center's catch-all
        ("dynamics", "Out-Sold", None, "Customer chose another vendor"),
        ("dynamics", "Canceled", None, "Others"),
    ],
)
def test_lost_with_its_reason_mapped(
    harness: MakeHarness, kind: str, lost_stage: str, reason: str | None, pc_reason: str
) -> None:
    h = harness(kind)
    crm, pc = h.crm, h.pc
    opp = crm.add_opportunity("Deal to lose", crm.label["qualified"])
    h.clean_run()
    [rid] = pc.referrals
    h.later()
    crm.move(opp, crm.label["proposed"])
    h.later()
    h.clean_run()
    assert state(pc, rid) == ("Active", "Accepted", "60")

    crm.move(opp, lost_stage, reason=reason)
    h.later()
    report = h.clean_run()
    assert (report.counts["pc_updated"], report.counts["crm_updated"]) == (1, 0)
    assert state(pc, rid)[:2] == ("Closed", "Lost")
    assert pc.referrals[rid]["statusReason"] == pc_reason
    assert crm.stage(opp) == lost_stage and crm.sync_status(opp) == "synced"
    lost = [e for e in h.audit(crm_id=opp) if e.field == "stage" and e.new == "lost"]
    assert [(e.direction, e.rule) for e in lost] == [("crm->pc", "closed-flag:lost")]
    h.settle()


def moved_in_partner_center(h: Harness, move: dict[str, str]) -> tuple[str, str, RunReport]:
    """An opportunity synced and settled, then its referral edited in Partner Center (``move``) and
    the run after: (opportunity id, referral id, that run's report)."""
    opp = h.crm.add_opportunity("Deal moved in Partner Center", h.crm.label["qualified"])
    h.clean_run()
    [rid] = h.pc.referrals
    h.later()
    h.clean_run()
    h.pc.edit(rid, lambda d: d.update(move))
    h.later()
    return opp, rid, h.clean_run()


@BOTH
@SQLITE
@pytest.mark.parametrize(
    ("move", "pc_state", "crm_key", "rule"),
    [
        ({"salesStage": "80"}, ("Active", "Accepted", "80"), "negotiated", "reverse-default:negotiated"),
        ({"status": "Closed", "substatus": "Won"}, ("Closed", "Won", "20"), "won", "reverse-default:won"),
        (
            {"status": "Closed", "substatus": "Lost", "statusReason": "Customer chose another vendor"},
            ("Closed", "Lost", "20"),
            "lost",
            "reverse",  # Salesforce: reverse-default:lost; Dynamics: an explicit reverse entry
        ),
    ],
    ids=["stage", "won", "lost"],
)
def test_partner_center_moves_reach_the_crm_through_the_reverse_mapping(
    harness: MakeHarness,
    kind: str,
    move: dict[str, str],
    pc_state: tuple[str, str, str],
    crm_key: str,
    rule: str,
) -> None:
    """Stages, Won and Lost set in Partner Center (by the partner's staff, or Microsoft) come to the
    CRM as the CRM's own stage; a Dynamics opportunity is closed through Win/LoseOpportunity."""
    h = harness(kind)
    crm, pc = h.crm, h.pc
    opp, rid, report = moved_in_partner_center(h, move)
    assert (report.counts["crm_updated"], report.counts["pc_updated"]) == (1, 0)
    assert state(pc, rid) == pc_state
    assert crm.stage(opp) == crm.label[crm_key] and crm.sync_status(opp) == "synced"
    moved = [e for e in h.audit(crm_id=opp) if e.field == "stage"]
    assert [(e.direction, e.new) for e in moved] == [("pc->crm", crm.label[crm_key])]
    assert moved[0].rule.startswith(rule)
    if kind == "dynamics" and crm_key in ("won", "lost"):
        closes = [r for r in crm.twin.rows["opportunitycloses"].values() if r["_opportunityid_value"] == opp]
        assert len(closes) == 1  # closed by the action, as Dataverse requires
    reasons = [(e.direction, e.old, e.new) for e in h.audit(crm_id=opp) if e.field == "lost_reason"]
    if kind == "salesforce" and crm_key == "lost":
        # the reason comes with the close, in the CRM's words (the reasons value map, backwards)
        assert crm.row(opp)[LOSS_REASON_FIELD] == "Lost to Competitor"
        assert reasons == [("pc->crm", None, "Lost to Competitor")]
    else:  # Dataverse's loss reason is the close's status reason, chosen by the stage mapping
        assert reasons == []
    h.settle()


# --- team and solutions, edited on either side ------------------------------------------------------


@BOTH
@SQLITE
def test_team_and_solutions_added_in_partner_center_survive_a_crm_push(
    harness: MakeHarness, kind: str
) -> None:
    """Neither CRM adapter writes teams (nor, by default, solutions): `write_unsupported`. What Partner
    Center adds to them (a Microsoft seller, a Microsoft solution) is kept there and never removed by a
    CRM push; the CRM is not written with it (architecture.md, "Guarantees")."""
    h = harness(kind)
    crm, pc = h.crm, h.pc
    opp = crm.add_opportunity("Team deal", crm.label["qualified"])
    h.clean_run()
    [rid] = pc.referrals
    h.later()
    h.clean_run()
    crm_team = [m["email"] for m in pc.referrals[rid]["team"]]
    assert len(crm_team) == 1  # the opportunity's owner
    azure = {"id": "SOL-MSFT-AZURE", "name": "Azure", "type": "Name"}

    def microsoft_joins(doc: dict[str, Any]) -> None:
        doc["team"].append(copy.deepcopy(MICROSOFT_SELLER))
        doc["details"]["requirements"]["solutions"].append(dict(azure))

    pc.edit(rid, microsoft_joins)
    h.later()
    crm_writes = crm.write_requests()
    report = h.clean_run()
    assert report.counts["crm_updated"] == 0 and crm.write_requests() == crm_writes  # nothing to write there
    h.settle()

    crm.set_notes(opp, "pushed from the CRM")  # a CRM push of the record
    h.later()
    report = h.clean_run()
    assert report.counts["pc_updated"] == 1
    doc = pc.referrals[rid]
    assert doc["details"]["notes"] == "pushed from the CRM"
    assert [m["email"] for m in doc["team"]] == [*crm_team, MICROSOFT_SELLER["email"]]
    assert azure["id"] in {s["id"] for s in doc["details"]["requirements"]["solutions"]}
    assert "SOL-34104-EBB" in {s["id"] for s in doc["details"]["requirements"]["solutions"]}
    notes = [e for e in h.audit(crm_id=opp) if e.field == "notes"]
    assert [(e.direction, e.rule) for e in notes] == [("crm->pc", "changed in CRM")]
    if kind == "salesforce":
        team_rows = [
            r for r in crm.twin.tables["OpportunityTeamMember"].values() if r["OpportunityId"] == opp
        ]
        assert team_rows == []  # Microsoft's seller is not written to Salesforce (write_unsupported)
        lines = [r for r in crm.twin.tables["OpportunityLineItem"].values() if r["OpportunityId"] == opp]
        assert [r["ProductCode"] for r in lines] == ["SOL-34104-EBB"]
    else:
        lines = [r for r in crm.twin.rows["opportunityproducts"].values() if r["_opportunityid_value"] == opp]
        assert len(lines) == 1
    h.settle()


@SQLITE
def test_salesforce_team_edits_flow_to_partner_center_and_keep_microsoft_sellers(
    harness: MakeHarness,
) -> None:
    from tests.e2e.test_sync import add_user

    h = harness("salesforce")
    crm, pc = h.crm, h.pc
    opp = crm.add_opportunity("Team deal", crm.label["qualified"])
    h.clean_run()
    [rid] = pc.referrals
    owner = pc.referrals[rid]["team"][0]["email"]
    pc.edit(rid, lambda d: d["team"].append(copy.deepcopy(MICROSOFT_SELLER)))
    h.later()
    h.clean_run()

    # the CRM adds a team member and a product
    user = add_user(crm.twin, 7)
    member = crm.twin.add_row(
        "OpportunityTeamMember", {"OpportunityId": opp, "UserId": user, "TeamMemberRole": "Sales Rep"}
    )
    product = crm.twin.add_row("Product2", {"Name": "Extra", "ProductCode": "SOL-EXTRA-01", "IsActive": True})
    crm.twin.add_row(
        "OpportunityLineItem",
        {"OpportunityId": opp, "Product2Id": product, "ProductCode": "SOL-EXTRA-01", "Name": "Extra",
         "Quantity": 1.0, "UnitPrice": 1.0, "TotalPrice": 1.0},
    )  # fmt: skip
    crm.set_notes(opp, "team grew")  # related rows do not stamp the opportunity: a seller edit does
    h.later()
    report = h.clean_run()
    assert report.counts["pc_updated"] == 1
    doc = pc.referrals[rid]
    assert sorted(m["email"] for m in doc["team"]) == sorted(
        [owner, "ada7@partner.example", MICROSOFT_SELLER["email"]]
    )
    assert {s["id"] for s in doc["details"]["requirements"]["solutions"]} == {"SOL-34104-EBB", "SOL-EXTRA-01"}
    merged = {(e.field, e.direction, e.rule) for e in h.audit(crm_id=opp)}
    assert {("team", "crm->pc", "set merge"), ("solutions", "crm->pc", "set merge")} <= merged
    h.settle()

    # the CRM removes its member again: gone from Partner Center too, Microsoft's seller stays
    crm.twin.delete_row("OpportunityTeamMember", member)
    crm.set_notes(opp, "team shrank")
    h.later()
    h.clean_run()
    assert sorted(m["email"] for m in pc.referrals[rid]["team"]) == sorted([owner, MICROSOFT_SELLER["email"]])
    h.settle()


@SQLITE
def test_solutions_edited_on_either_side_round_trip_through_a_multi_select_field(
    harness: MakeHarness,
) -> None:
    """With a multi-select field configured for solutions, Salesforce is written too: both sides' edits
    (additions and removals) reach the other side."""
    h = harness("salesforce", fields={"solutions": "Partner_Center_Solutions__c"})
    crm, pc = h.crm, h.pc
    opp = crm.add_opportunity(
        "Solutions deal", crm.label["qualified"], Partner_Center_Solutions__c="SOL-34104-EBB"
    )
    h.clean_run()
    [rid] = pc.referrals

    def solutions() -> list[str]:
        return sorted(s["id"] for s in pc.referrals[rid]["details"]["requirements"]["solutions"])

    pc.edit(
        rid,
        lambda d: d["details"]["requirements"]["solutions"].append({"id": "SOL-MSFT-AZURE", "type": "Name"}),
    )
    h.later()
    report = h.clean_run()
    assert (report.counts["crm_updated"], report.counts["pc_updated"]) == (1, 0)
    assert sorted(crm.row(opp)["Partner_Center_Solutions__c"].split(";")) == [
        "SOL-34104-EBB",
        "SOL-MSFT-AZURE",
    ]
    assert ("solutions", "pc->crm", "set merge") in {
        (e.field, e.direction, e.rule) for e in h.audit(crm_id=opp)
    }
    h.settle()

    crm.update(opp, Partner_Center_Solutions__c="SOL-MSFT-AZURE;SOL-CRM-NEW")  # one added, one removed
    h.later()
    report = h.clean_run()
    assert (report.counts["crm_updated"], report.counts["pc_updated"]) == (0, 1)
    assert solutions() == ["SOL-CRM-NEW", "SOL-MSFT-AZURE"]
    h.settle()


# --- conflicting edits, under each policy -----------------------------------------------------------

POLICIES = {
    # policy, which side edits last -> (winner, audit rule)
    ("crm-wins", "pc"): ("crm", "policy:crm-wins"),
    ("partner-center-wins", "crm"): ("pc", "policy:partner-center-wins"),
    ("newest-wins", "crm"): ("crm", "policy:newest-wins (CRM newer)"),
    ("newest-wins", "pc"): ("pc", "policy:newest-wins (Partner Center newer)"),
}


@BOTH
@SQLITE
@pytest.mark.parametrize(("policy", "last"), list(POLICIES), ids=[f"{p}-{s}-last" for p, s in POLICIES])
def test_conflicting_edits_follow_the_policy(harness: MakeHarness, kind: str, policy: str, last: str) -> None:
    winner, rule = POLICIES[(policy, last)]
    h = harness(kind, policy={"default": policy})
    crm, pc = h.crm, h.pc
    opp = crm.add_opportunity("Contested deal", crm.label["qualified"], notes="agreed")
    h.clean_run()
    [rid] = pc.referrals
    h.later()
    h.clean_run()

    def crm_edit() -> None:
        crm.set_notes(opp, "crm notes")
        crm.set_value(opp, 61000.0)

    def pc_side() -> None:
        pc.edit(rid, lambda d: d["details"].update(notes="pc notes", dealValue=72000))

    first, second = (pc_side, crm_edit) if last == "crm" else (crm_edit, pc_side)
    first()
    h.later(timedelta(minutes=1))  # the other side edits a minute later
    second()
    h.later()
    report = h.clean_run()

    notes, value = ("crm notes", 61000) if winner == "crm" else ("pc notes", 72000)
    assert (
        pc.referrals[rid]["details"]["notes"] == notes and pc.referrals[rid]["details"]["dealValue"] == value
    )
    assert crm.notes(opp) == notes and crm.value(opp) == value
    expected = {"pc_updated": 1, "crm_updated": 0} if winner == "crm" else {"pc_updated": 0, "crm_updated": 1}
    assert {k: report.counts[k] for k in expected} == expected and report.counts["conflicts"] == 0
    direction = "crm->pc" if winner == "crm" else "pc->crm"
    decided = {e.field: (e.direction, e.rule) for e in h.audit(crm_id=opp) if e.field in ("notes", "value")}
    assert decided == {"notes": (direction, rule), "value": (direction, rule)}
    assert h.store.conflicts(CONNECTION) == []
    h.settle()


@pytest.mark.parametrize(
    ("kind", "state_url"),
    [("salesforce", "sqlite"), ("salesforce", "postgresql"), ("dynamics", "sqlite")],
    indirect=["state_url"],
)
def test_manual_conflicts_wait_for_the_operator_whose_choice_the_next_run_applies(
    harness: MakeHarness, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    h = harness(kind, policy={"default": "manual"})
    crm, pc = h.crm, h.pc
    opp = crm.add_opportunity("Contested deal", crm.label["qualified"], notes="agreed")
    h.clean_run()
    [rid] = pc.referrals
    h.later()
    h.clean_run()

    # both sides change the notes, the value and the stage, differently
    crm.set_notes(opp, "crm notes")
    crm.set_value(opp, 61000.0)
    crm.move(opp, crm.label["proposed"])
    pc.edit(
        rid, lambda d: (d["details"].update(notes="pc notes", dealValue=72000), d.update(salesStage="80"))
    )
    h.later()
    writes_before = (pc.count_writes(), crm.write_requests())
    report = h.clean_run()
    assert report.counts["conflicts"] == 3
    # nothing overwritten on either side (the run writes only its own sync status)
    assert pc.count_writes() == writes_before[0]
    assert (crm.notes(opp), crm.value(opp), crm.stage(opp)) == ("crm notes", 61000, crm.label["proposed"])
    assert (
        state(pc, rid) == ("Active", "Accepted", "80") and pc.referrals[rid]["details"]["notes"] == "pc notes"
    )
    conflict_rules = {e.field: e.rule for e in h.audit(crm_id=opp) if e.action == "conflict"}
    assert conflict_rules == dict.fromkeys(("notes", "value", "sales_stage"), "policy:manual")

    capsys.readouterr()
    assert h.cosell("conflicts", "list", "--json") == 0
    listed = {c["field"]: c for c in json.loads(capsys.readouterr().out)["conflicts"]}
    assert set(listed) == {"notes", "value", "sales_stage"}
    assert (listed["notes"]["base"], listed["notes"]["crm_value"], listed["notes"]["pc_value"]) == (
        "agreed", "crm notes", "pc notes"
    )  # fmt: skip
    assert (listed["sales_stage"]["crm_value"], listed["sales_stage"]["pc_value"]) == (
        crm.label["proposed"], "negotiated"
    )  # fmt: skip
    h.later()
    h.settle()  # an open conflict waits: no write, and it is not queued twice
    assert len(h.store.conflicts(CONNECTION)) == 3

    # the operator decides: notes from the CRM, the stage from Partner Center, the value dismissed
    assert h.cosell("conflicts", "resolve", str(listed["notes"]["id"]), "--take", "crm") == 0
    assert h.cosell("conflicts", "resolve", str(listed["sales_stage"]["id"]), "--take", "partner-center") == 0
    assert h.cosell("conflicts", "resolve", str(listed["value"]["id"]), "--take", "dismiss") == 0
    assert h.cosell("conflicts", "resolve", "999999", "--take", "crm") == 1  # unknown id
    h.later()
    h.clean_run()
    assert pc.referrals[rid]["details"]["notes"] == "crm notes" and crm.notes(opp) == "crm notes"
    assert crm.stage(opp) == crm.label["negotiated"] and state(pc, rid) == ("Active", "Accepted", "80")
    decided = {(e.field, e.direction, e.rule) for e in h.audit(crm_id=opp) if e.action == "set"}
    assert ("notes", "crm->pc", "policy:crm-wins") in decided
    assert ("stage", "pc->crm", "reverse-default:negotiated") in decided
    applied = {c.field for c in h.store.conflicts(CONNECTION, state="applied")}
    assert {"notes", "sales_stage", "value"} <= applied
    # dismissed while the sides still differ: the value conflict opens again, nothing was overwritten
    [reopened] = h.store.conflicts(CONNECTION)
    assert (reopened.field, reopened.crm_value, reopened.pc_value) == ("value", "61000", "72000")
    assert (crm.value(opp), pc.referrals[rid]["details"]["dealValue"]) == (61000, 72000)

    assert reopened.id is not None
    assert h.cosell("conflicts", "resolve", str(reopened.id), "--take", "partner-center") == 0
    h.later()
    h.clean_run()
    assert crm.value(opp) == 72000 and h.store.conflicts(CONNECTION) == []
    h.later()
    h.settle()


@SQLITE
def test_a_record_with_a_resolved_conflict_is_reconciled_once_per_run(harness: MakeHarness) -> None:
    h = harness("salesforce", policy={"default": "manual"})
    crm, pc = h.crm, h.pc
    opp = crm.add_opportunity("Contested deal", crm.label["qualified"], notes="agreed")
    h.clean_run()
    [rid] = pc.referrals
    h.later()
    crm.set_notes(opp, "crm notes")
    crm.set_value(opp, 61000.0)
    pc.edit(rid, lambda d: d["details"].update(notes="pc notes", dealValue=72000))
    h.later()
    assert h.clean_run().counts["conflicts"] == 2
    notes, value = sorted(h.store.conflicts(CONNECTION), key=lambda c: c.field)
    assert notes.id is not None and value.id is not None
    h.store.resolve_conflict(notes.id, "crm")  # `cosell conflicts resolve ID --take crm`
    h.store.resolve_conflict(value.id, "dismissed")  # ... --take dismiss: reopens while the sides differ
    h.later()
    report = h.clean_run()
    assert pc.referrals[rid]["details"]["notes"] == "crm notes"
    assert len(h.store.conflicts(CONNECTION)) == 1  # the value, open again
    rows = [e for e in h.audit(crm_id=opp) if e.action == "conflict" and e.run_id == report.run_id]
    assert (report.counts["conflicts"], len(rows)) == (1, 1)


@SQLITE
def test_a_partner_center_reason_the_reasons_map_lacks_is_not_written_and_says_so(
    harness: MakeHarness,
) -> None:
    """Partner Center's reason is free text; a CRM picklist may refuse text it does not list, and the
    close must not fail for it: the stage moves, the reason field is left alone, the audit says why."""
    h = harness("salesforce")
    crm = h.crm
    opp, _rid, report = moved_in_partner_center(
        h, {"status": "Closed", "substatus": "Lost", "statusReason": "Budget moved to 2028"}
    )
    assert report.counts["crm_updated"] == 1
    assert crm.stage(opp) == crm.label["lost"] and crm.row(opp).get(LOSS_REASON_FIELD) is None
    [said] = [e for e in h.audit(crm_id=opp) if e.field == "lost_reason"]
    assert (said.action, said.new) == ("not-written", None) and "not in the reasons value map" in said.rule
    assert "lost_reason" not in crm.row(opp)["Partner_Center_Audit__c"]  # the CRM's line names what was set
    h.settle()
