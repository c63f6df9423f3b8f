"""``cosell demo``: the main job, end to end, on the sandbox.

1. start the sandbox (twins, book of business, config, sign-in) with SQLite state;
2. one full two-way sync of every connection, and a report of what it did: links created, how
   stages were mapped (CRM stage -> Partner Center stage, with the rule), conflicts, blocked changes
   with the rule that blocked them, failures by cause, API calls by system;
3. a few changes made directly in the twins, on each side, as sellers and Microsoft would make them:
   a CRM stage move, a Partner Center notes edit, an inbound referral accepted by moving its
   opportunity off the "received" stage, and an edit to a deal Partner Center already closed as won
   (which the rules must block);
4. a second run, and its report: the changes flowed both ways, the closed deal was not touched.

Output is deterministic apart from ids and timestamps: the book is seeded, and every table is sorted.
Nothing printed carries a secret or a contact detail; ids and deal names only.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

from connector.domain.model import StandardStage
from connector.errors import RecordError
from connector.partner_center.models import format_utc
from connector.remote.retry import RetryPolicy
from connector.sandbox.book import CrmDeal
from connector.sandbox.sandbox import CRM_OF, DV_CONNECTION, SF_CONNECTION, Sandbox
from connector.settings import Settings
from connector.state import StateStore
from connector.sync.engine import RunReport
from connector.sync.factory import run_context

__all__ = ["ConnectionRun", "DemoChange", "DemoResult", "make_changes", "run_demo", "sync_all"]

#: Partner Center states (the reverse-mapping vocabulary) as the report names them
_PC_NAMES = {
    "received": "Received (inbound, unanswered)",
    "accepted": f"Created/Accepted ({StandardStage.ACCEPTED.value}%)",
    "qualified": f"Qualified ({StandardStage.QUALIFIED.value}%)",
    "developed": f"Developed ({StandardStage.DEVELOPED.value}%)",
    "proposed": f"Proposed ({StandardStage.PROPOSED.value}%)",
    "negotiated": f"Negotiated ({StandardStage.NEGOTIATED.value}%)",
    "won": "Won (closed)",
    "lost": "Lost (closed)",
    "declined": "Declined (closed)",
    "expired": "Expired (closed)",
}
#: Salesforce stages a deal moves forward from to Proposal/Price Quote, most typical first
_SF_EARLY = ("Needs Analysis", "Value Proposition", "Qualification", "Id. Decision Makers", "Prospecting")
_PC_NOTE = "Microsoft seller engaged: the customer wants a proof of concept next quarter."


@dataclass
class ConnectionRun:
    """One connection's run and what the report needs besides the engine's own report."""

    report: RunReport
    calls: dict[tuple[str, str], int]
    links_before: int
    links_after: int
    #: (direction, CRM stage, Partner Center state, rule) -> records
    stages: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)

    @property
    def links_created(self) -> int:
        return self.links_after - self.links_before


@dataclass(frozen=True)
class DemoChange:
    connection: str
    side: str
    record: str
    what: str


# --- running ---------------------------------------------------------------------------------


def sync_all(
    settings: Settings, store: StateStore, *, policy: RetryPolicy | None = None
) -> list[ConnectionRun]:
    """One run of every enabled connection, in name order, as ``cosell sync`` would do it."""
    out = []
    for name in sorted(n for n, c in settings.connections.items() if c.enabled):
        before = sum(store.count_links(name).values())
        with run_context(settings, name, store, policy=policy) as ctx:
            report = ctx.engine.run()
            calls: Counter[tuple[str, str]] = Counter()
            for key, n in ctx.calls.snapshot().items():
                calls[(key.system, key.operation)] += n
            run = ConnectionRun(report, dict(calls), before, sum(store.count_links(name).values()))
            run.stages = _stage_rows(report, ctx.mappings.stages)
        out.append(run)
    return out


def _stage_rows(report: RunReport, mapping: Any) -> Counter[tuple[str, str, str, str]]:
    """How stages were mapped in this run: every created or moved record, by its CRM stage and the
    Partner Center state it now has, with the mapping rule that decided it."""
    rows: Counter[tuple[str, str, str, str]] = Counter()
    for item in report.planned:
        plan = item.plan
        if plan.refusals and not plan.pc_ops and plan.crm_stage is None:
            continue  # nothing moved: reported as blocked instead
        crm_stage, pc_state = plan.base.get("crm_stage"), plan.base.get("pc_state")
        for fieldname, direction, _old, _new, rule in plan.explanations:
            if fieldname not in ("referral", "opportunity", "stage") or not crm_stage or not pc_state:
                continue
            if direction == "crm->pc":
                with contextlib.suppress(RecordError):  # unmapped: the plan's own rule stays
                    rule = mapping.resolve(crm_stage).rule
            rows[(direction, str(crm_stage), str(pc_state), rule)] += 1
            break
    return rows


# --- changing records in the twins -----------------------------------------------------------


def _touch_referral(
    sandbox: Sandbox, connection: str, referral_id: str, edit: Callable[[dict[str, Any]], None]
) -> None:
    """An edit made in Partner Center itself (a Microsoft seller, or the partner in the portal): the
    stored referral changes, with a new ``updatedDateTime`` and ``eTag`` as the service sets them."""
    twin = sandbox.partner_center[connection]
    doc = copy.deepcopy(twin.referrals[referral_id])
    edit(doc)
    doc["updatedDateTime"] = format_utc(twin.clock.now())
    doc["eTag"] = f'"demo-{referral_id[:8]}-{time.monotonic_ns()}"'
    twin.put(doc)


def _linked(
    store: StateStore, connection: str, deals: tuple[CrmDeal, ...], want: Callable[[CrmDeal], bool]
) -> list[tuple[CrmDeal, str]]:
    """Book deals matching ``want`` that the first run linked to a referral, as (deal, referral id)."""
    out = []
    for deal in deals:
        if want(deal):
            link = store.link_by_crm(connection, deal.id)
            if link is not None and link.referral_id:
                out.append((deal, link.referral_id))
    return out


def _inbound_opportunity(
    sandbox: Sandbox, store: StateStore, connection: str, substatus: str, stage: str | None
) -> tuple[str, str] | None:
    """(referral id, CRM id) of an inbound referral in this state that the first run created an
    opportunity for."""
    assert sandbox.book is not None
    for doc in sandbox.book.referrals[CRM_OF[connection]]:
        if doc["direction"] == "Incoming" and doc["substatus"] == substatus and doc["salesStage"] == stage:
            link = store.link_by_referral(connection, doc["id"])
            if link is not None and link.crm_id:
                return doc["id"], link.crm_id
    return None


def make_changes(sandbox: Sandbox, store: StateStore) -> list[DemoChange]:
    """The changes between the two runs, made directly in the twins."""
    assert sandbox.book is not None
    book = sandbox.book
    changes: list[DemoChange] = []
    sf, dv = sandbox.salesforce, sandbox.dataverse

    # --- Salesforce connection
    c = SF_CONNECTION
    open_linked = _linked(store, c, book.salesforce, lambda d: d.referral is None and d.stage in _SF_EARLY)
    open_linked.sort(key=lambda pair: (_SF_EARLY.index(pair[0].stage), pair[0].id))
    if open_linked:
        deal, _rid = open_linked[0]
        sf.update_row("Opportunity", deal.id, {"StageName": "Proposal/Price Quote"})
        changes.append(DemoChange(c, "Salesforce", deal.id, f"stage {deal.stage} -> Proposal/Price Quote"))
    if len(open_linked) > 1:
        deal, rid = open_linked[1]
        _touch_referral(sandbox, c, rid, lambda doc: doc["details"].update(notes=_PC_NOTE))
        changes.append(DemoChange(c, "Partner Center", rid, "notes edited by the Microsoft seller"))
    inbound = _inbound_opportunity(sandbox, store, c, "Received", None)
    if inbound:
        rid, crm_id = inbound
        sf.update_row(
            "Opportunity", crm_id, {"StageName": "Qualification", "Sync_with_Partner_Center__c": True}
        )
        changes.append(
            DemoChange(
                c,
                "Salesforce",
                crm_id,
                "inbound referral accepted: stage Prospecting -> Qualification, opted in",
            )
        )
    won = _linked(store, c, book.salesforce, lambda d: d.stage == "Closed Won" and d.referral is not None)
    if won:
        deal, _rid = won[0]
        sf.update_row("Opportunity", deal.id, {"Amount": float(deal.amount + 25_000)})
        changes.append(
            DemoChange(
                c,
                "Salesforce",
                deal.id,
                f"amount of a deal Partner Center closed as Won: {deal.amount} -> {deal.amount + 25_000}",
            )
        )

    # --- Dynamics 365 connection
    c = DV_CONNECTION
    moved = _linked(store, c, book.dynamics, lambda d: d.stage == "Qualify" and d.referral is None)
    if moved:
        deal, _rid = moved[0]
        dv.update("opportunities", deal.id, salesstage=2, closeprobability=60)
        changes.append(DemoChange(c, "Dynamics 365", deal.id, "stage Qualify -> Propose"))
    else:
        # Nothing of that stage was linked by the first run: move one anyway, the run will say why.
        deal = next(d for d in book.dynamics if d.stage == "Qualify" and d.opted_in and d.referral is None)
        dv.update("opportunities", deal.id, salesstage=2, closeprobability=60)
        changes.append(
            DemoChange(c, "Dynamics 365", deal.id, "stage Qualify -> Propose (not linked by the first run)")
        )
    active = _inbound_opportunity(sandbox, store, c, "Accepted", "40")
    if active:
        rid, _crm = active
        _touch_referral(
            sandbox,
            c,
            rid,
            lambda doc: doc["details"].update(notes="Microsoft seller engaged: budget confirmed."),
        )
        changes.append(DemoChange(c, "Partner Center", rid, "notes edited by the Microsoft seller"))
    inbound = _inbound_opportunity(sandbox, store, c, "Received", None)
    if inbound:
        rid, crm_id = inbound
        dv.update("opportunities", crm_id, salesstage=1, closeprobability=40, new_syncwithpartnercenter=True)
        changes.append(
            DemoChange(
                c, "Dynamics 365", crm_id, "inbound referral accepted: stage Qualify -> Develop, opted in"
            )
        )
    deal = next(d for d in book.dynamics if d.stage == "Won" and d.referral is not None)
    dv.update("opportunities", deal.id, estimatedvalue=float(Decimal(deal.amount) + 25_000))
    changes.append(
        DemoChange(
            c,
            "Dynamics 365",
            deal.id,
            f"value of a deal Partner Center closed as Won: {deal.amount} -> {deal.amount + 25_000}",
        )
    )
    return changes


# --- the report ------------------------------------------------------------------------------


def _summary(runs: list[ConnectionRun], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    columns = ("connection", "links created", "referrals created", "referrals updated", "opps created",
               "opps updated", "unchanged", "conflicts", "blocked", "waiting", "failed")  # fmt: skip
    table.add_column(columns[0], no_wrap=True)
    for column in columns[1:]:
        table.add_column(column, justify="right")
    for run in runs:
        c = run.report.counts
        table.add_row(
            run.report.connection,
            str(run.links_created),
            *(str(c[k]) for k in ("pc_created", "pc_updated", "crm_created", "crm_updated", "unchanged",
                                  "conflicts", "blocked", "waiting", "failed")),
        )  # fmt: skip
    return table


def _stages(runs: list[ConnectionRun]) -> Table:
    table = Table(title="stages mapped (CRM stage -> Partner Center stage)", title_justify="left")
    for column in ("connection", "direction", "CRM stage", "Partner Center stage", "rule", "records"):
        table.add_column(column, justify="right" if column == "records" else "left")
    for run in runs:
        for (direction, crm_stage, pc_state, rule), n in sorted(run.stages.items()):
            arrow = "CRM -> Partner Center" if direction == "crm->pc" else "Partner Center -> CRM"
            table.add_row(
                run.report.connection, arrow, crm_stage, _PC_NAMES.get(pc_state, pc_state), rule, str(n)
            )
    return table


def _problems(runs: list[ConnectionRun]) -> Table | None:
    table = Table(title="blocked changes, waiting changes and conflicts", title_justify="left")
    for column in ("connection", "record", "deal", "what", "rule", "why"):
        table.add_column(column, overflow="fold")
    rows = []
    for run in runs:
        for item in run.report.planned:
            record = " / ".join(x for x in (item.crm_id, item.referral_id) if x)
            for r in item.plan.refusals:
                rows.append((run.report.connection, record, item.name, "blocked", r.rule, r.message))
            for r in item.plan.waiting:
                rows.append((run.report.connection, record, item.name, "waiting", r.rule, r.message))
            for k in item.plan.conflicts:
                rows.append((run.report.connection, record, item.name, f"conflict on {k.field}", "policy:manual",
                             "both sides changed it; resolve with `cosell conflicts`"))  # fmt: skip
    if not rows:
        return None
    for row in sorted(rows):
        table.add_row(*row)
    return table


def _failures(runs: list[ConnectionRun]) -> Table | None:
    table = Table(
        title="failed records, by cause (each is a dead letter, retried next run)", title_justify="left"
    )
    for column in ("connection", "cause", "records", "first record", "message"):
        table.add_column(column, overflow="fold", justify="right" if column == "records" else "left")
    rows = 0
    for run in runs:
        blocked_rules = {r.rule for i in run.report.planned for r in i.plan.refusals}
        by_cause: dict[str, list[tuple[str, str]]] = {}
        for record, cause, message in run.report.problems:
            if cause not in blocked_rules:
                by_cause.setdefault(cause, []).append((record, message))
        for cause, items in sorted(by_cause.items()):
            first = sorted(items)[0]
            table.add_row(run.report.connection, cause, str(len(items)), first[0], first[1])
            rows += 1
    return table if rows else None


def _calls(runs: list[ConnectionRun]) -> Table:
    table = Table(title="API calls by system", title_justify="left")
    for column in ("connection", "system", "calls", "by operation"):
        table.add_column(column, overflow="fold", justify="right" if column == "calls" else "left")
    for run in runs:
        systems: dict[str, Counter[str]] = {}
        for (system, operation), n in run.calls.items():
            systems.setdefault(system, Counter())[operation] += n
        for system, ops in sorted(systems.items()):
            detail = ", ".join(f"{op} {n}" for op, n in sorted(ops.items()))
            table.add_row(run.report.connection, system, str(sum(ops.values())), detail)
    return table


def print_report(console: Console, runs: list[ConnectionRun], title: str) -> None:
    console.print(_summary(runs, title))
    if any(run.stages for run in runs):
        console.print(_stages(runs))
    for table in (_problems(runs), _failures(runs)):
        if table is not None:
            console.print(table)
    console.print(_calls(runs))


def _changes_table(changes: list[DemoChange]) -> Table:
    table = Table(title="changed directly in the twins", title_justify="left")
    for column in ("connection", "where", "record", "change"):
        table.add_column(column, overflow="fold")
    for ch in changes:
        table.add_row(ch.connection, ch.side, ch.record, ch.what)
    return table


@dataclass(frozen=True)
class DemoResult:
    first: list[ConnectionRun]
    changes: list[DemoChange]
    second: list[ConnectionRun]


def run_demo(sandbox: Sandbox, store: StateStore, console: Console) -> DemoResult:
    """Steps 2-4 of the module docstring on a started sandbox."""
    settings = sandbox.settings()
    # The twins answer at once; a transient failure here is a bug to see, not to wait out.
    policy = RetryPolicy(max_attempts=3, initial_wait=0.05, max_total_wait=5.0)
    first = sync_all(settings, store, policy=policy)
    print_report(console, first, "first run: one full two-way sync of every connection")
    changes = make_changes(sandbox, store)
    console.print()
    console.print(_changes_table(changes))
    second = sync_all(settings, store, policy=policy)
    print_report(console, second, "second run: the changes above, both ways")
    return DemoResult(first, changes, second)
