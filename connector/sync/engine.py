"""One sync run of one connection: pull both sides, pair, plan, act, record.

The order of a run (docs/architecture.md):

1. take the connection's run lease (two daemons never sync one connection at once);
2. replay the outbox: creates whose answer was never recorded are resumed (looked up by
   ``externalReferenceId`` first, so a crash never duplicates a referral);
3. retry open dead letters by id;
4. Partner Center changes since its cursor, page by page: pair each referral with its opportunity
   (link, else ``externalReferenceId``), read those opportunities in one batched call, plan, act;
5. CRM changes since its cursor, page by page, skipping opportunities step 4 already reconciled;
6. each page ends with one batched CRM write, then one transaction that saves links (the new merge
   base), audit rows and the page's cursor — a cursor never moves past records not committed.

A record that fails is isolated (dead letter with its cause); a rule that refuses a change marks the
record blocked with the rule's words; a rule that only says "not yet" leaves the change waiting.
``dry_run`` plans everything and writes nothing, on either side or in the state store.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from connector import __version__
from connector.domain.merge import Policy, rewritten_fields, snapshot_of, values_hash
from connector.domain.model import Deal
from connector.errors import ConflictError, RecordError, RetryLater, RuleViolation
from connector.logs import _scrub
from connector.mappings import MappingSet
from connector.seams import (
    ChangePage,
    CrmAdapter,
    CrmChange,
    Listed,
    RecordFailure,
    ReferralStore,
    fingerprint,
)
from connector.settings import Connection
from connector.state import (
    AuditEntry,
    Conflict,
    DeadLetter,
    Link,
    LinkHead,
    OutboxEntry,
    OutboxState,
    RunRecord,
    StateStore,
    System,
)
from connector.sync.plan import (
    WAITING_RULES,
    CrmFacts,
    PairPlan,
    PcOp,
    PcOpKind,
    crm_side_settled,
    pc_side_settled,
    plan_pair,
)
from connector.sync.read_ahead import ReadAhead, read_ahead
from connector.sync.threads import map_in_threads

__all__ = ["PlannedRecord", "RunReport", "SyncEngine"]

log = structlog.get_logger(__name__)

PC_CURSOR, CRM_CURSOR = "partner_center", "crm"
#: plans a real run keeps in its report (all of them in a dry run)
KEPT_PLANS = 1000
#: done outbox rows are kept this long (for `cosell status` and an operator's questions), then pruned
OUTBOX_KEEP = timedelta(days=7)
MAX_RECORD_ATTEMPTS = 5  # a dead letter retried this many times stays dead until a human acts


@dataclass(frozen=True)
class PlannedRecord:
    """One record's plan, for the dry-run printout and the run report."""

    crm_id: str | None
    referral_id: str | None
    name: str
    plan: PairPlan


@dataclass
class RunReport:
    connection: str
    run_id: str
    correlation_id: str
    dry_run: bool
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (record, cause, message)
    planned: list[PlannedRecord] = field(default_factory=list)
    full_resync: bool = False
    #: full reconciliation only: (kind, record, detail) — what the cursors alone had missed
    drift: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        return "partial" if self.counts["failed"] or self.counts["blocked"] else "ok"


@dataclass
class _Pending:
    """A record whose Partner Center side is done and whose CRM write waits for the page's batch."""

    link: Link
    change: CrmChange | None
    audit: list[AuditEntry]
    #: resolved conflicts this record's plan applied; marked applied once the page commits
    applied_conflicts: list[int] = field(default_factory=list)
    #: waiting outbox entries of this record that no longer wait
    released_waits: list[str] = field(default_factory=list)
    #: this record's Partner Center outbox rows, done once the page commits
    outbox_ids: list[int] = field(default_factory=list)
    #: the referral as Partner Center holds it after this record's writes
    referral: Deal | None = None


@dataclass
class _Work:
    """One planned record whose Partner Center writes have not gone yet."""

    crm: Deal | None
    referral: Deal | None
    link: Link | None
    plan: PairPlan
    #: field -> (policy, conflict id): a human's conflict decisions this plan applied
    decided: dict[str, tuple[Policy, int]]
    depth: int = 0
    ops: list[tuple[PcOp, OutboxEntry]] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    #: our last CRM write to this record has now been read back (echo or peer rewrite, noted)
    read_back: bool = False

    @property
    def crm_id(self) -> str | None:
        return self.crm.crm_id if self.crm else (self.link.crm_id if self.link else None)


class SyncEngine:
    """Runs one connection. Build a new engine (and new clients) per run: the Partner Center client's
    ``MS-CorrelationId`` is per run."""

    def __init__(
        self,
        name: str,
        connection: Connection,
        store: StateStore,
        crm: CrmAdapter,
        pc: ReferralStore,
        mappings: MappingSet,
        *,
        holder: str | None = None,
        lease_ttl: timedelta = timedelta(minutes=5),
        correlation_id: str | None = None,
    ) -> None:
        self.name = name
        self.connection = connection
        self.store = store
        self.crm = crm
        self.pc = pc
        self.mappings = mappings
        self.holder = holder or f"cosell-{uuid.uuid4().hex[:8]}"
        self.lease_ttl = lease_ttl
        self.correlation_id = correlation_id or str(uuid.uuid4())
        policy = connection.policy
        self.policies = {k: Policy(v) for k, v in policy.fields.items()}
        self.default_policy = Policy(policy.default)
        #: fields Partner Center is never sent: the name, unless /name patches are enabled
        self._pc_readonly = frozenset() if pc.patch_name else frozenset({"name"})
        self._report: RunReport | None = None
        self._touched_crm: set[str] = set()
        #: referrals this run already reconciled (an operator's conflict decision applied first)
        self._touched_referrals: set[str] = set()
        #: pairs whose referral was found settled and whose opportunity the CRM listing has not shown
        self._settled: set[str] = set()
        self._dead: set[tuple[System, str]] = set()
        #: this page's links whose pair agreed but whose versions moved
        self._versions: list[Link] = []
        #: record id -> fingerprint of its listed content, for the page being reconciled (per side)
        self._fingerprints: dict[str, str] = {}
        self._crm_fingerprints: dict[str, str] = {}
        # A fingerprint says "this content reads as the merge base" only under the reading that
        # noted it: a new mapping, setting or release must convert every record again, not settle
        # it on its old reading. So each is keyed with what the reading depends on.
        self._reading_key = fingerprint(
            {
                "release": __version__,
                "connection": connection.model_dump(mode="json"),
                "mappings": [repr(mappings.stages), repr(mappings.values)],
            }
        ).encode()
        #: this page's opportunities whose last write by us was read back, and what that found
        self._read_back: list[str] = []
        self._read_back_audit: list[AuditEntry] = []
        #: idempotency keys of the connection's waiting outbox rows (releasing one is then one UPDATE)
        self._waiting: set[str] = set()
        self._seen_referrals: set[str] = set()
        self._seen_opportunities: set[str] = set()
        #: full reconciliation: the first referral seen carrying each CRM id, and any further ones
        self._by_reference: dict[str, str] = {}
        self._more_by_reference: dict[str, list[str]] = {}
        #: record id -> field -> (policy, conflict id): human decisions from `cosell conflicts resolve`
        self._resolutions: dict[str, dict[str, tuple[Policy, int]]] = {}

    # --- the run ----------------------------------------------------------------------------------

    def run(
        self,
        *,
        dry_run: bool = False,
        full: bool = False,
        crm_id: str | None = None,
        referral_id: str | None = None,
    ) -> RunReport:
        run_id = uuid.uuid4().hex
        report = self._report = RunReport(self.name, run_id, self.correlation_id, dry_run)
        self._touched_crm, self._touched_referrals, self._settled = set(), set(), set()
        self._resolutions = self._load_resolutions()
        self._dead = {
            (d.system, d.record_id)
            for state in ("open", "retry")
            for d in self.store.dead_letters(self.name, state=state)
        }
        self._waiting = {
            e.idempotency_key for e in self.store.outbox_entries(self.name, [OutboxState.WAITING])
        }
        bound = log.bind(connection=self.name, run_id=run_id, correlation_id=self.correlation_id)
        if not dry_run and not self.store.acquire_lease(self.name, self.holder, self.lease_ttl):
            raise RetryLater(
                f"connection {self.name}: another process holds the run lease "
                f"({self.store.lease_holder(self.name)}); it will be retried",
                system="state",
            )
        if not dry_run:
            self.store.start_run(RunRecord(run_id, self.name, started_at=datetime.now(UTC)))
        bound.info("run.start", dry_run=dry_run, full=full)
        error = ""
        try:
            if crm_id or referral_id:
                self._targeted(crm_id, referral_id)
            else:
                if not dry_run:
                    self._replay_outbox()
                    self._retry_dead_letters()
                self._reconcile_resolved()
                self._seen_referrals, self._seen_opportunities = set(), set()
                self._by_reference, self._more_by_reference = {}, {}
                counts_before = Counter(report.counts)
                crm_cursor = None if full else self.store.cursor(self.name, CRM_CURSOR)
                # The CRM listing starts now, on its own thread, so the CRM answers while the
                # Partner Center phase runs; its pages are reconciled after that phase, as before
                # (what that phase wrote to the CRM is skipped there as touched).
                with ReadAhead(self.crm.changes(crm_cursor)) as crm_pages:
                    self._pc_phase(full)
                    self._crm_phase(full, crm_pages)
                if self._settled:
                    report.counts["unchanged"] += len(self._settled)
                if full:
                    self._drift_report(counts_before)
            if full and not dry_run:  # daily with the full reconciliation: it scans the done rows
                self.store.prune_outbox(self.name, datetime.now(UTC) - OUTBOX_KEEP)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if not dry_run:
                self.store.finish_run(
                    run_id, "failed" if error else report.outcome, dict(report.counts), error
                )
                self.store.release_lease(self.name, self.holder)
            bound.info("run.end", outcome="failed" if error else report.outcome, **dict(report.counts))
        return report

    def _load_resolutions(self) -> dict[str, dict[str, tuple[Policy, int]]]:
        chosen = {"crm": Policy.CRM_WINS, "partner_center": Policy.PARTNER_CENTER_WINS}
        out: dict[str, dict[str, tuple[Policy, int]]] = {}
        for conflict in self.store.conflicts(self.name, state="resolved"):
            assert conflict.id is not None
            policy = chosen.get(conflict.resolution)
            if policy is None:  # dismissed: closes the entry; it reopens if the sides still differ
                if not self._need_report().dry_run:
                    self.store.mark_conflict_applied(conflict.id)
                continue
            for key in (conflict.crm_id, conflict.referral_id):
                if key:
                    out.setdefault(key, {})[conflict.field] = (policy, conflict.id)
        return out

    # --- phases -----------------------------------------------------------------------------------

    def _pc_phase(self, full: bool) -> None:
        report = self._need_report()
        cursor = None if full else self.store.cursor(self.name, PC_CURSOR)
        for page in read_ahead(self.pc.changes(cursor)):
            report.full_resync |= page.full_resync
            self._failures(System.PARTNER_CENTER, page.failures)
            if full:
                self._census(page.deals, self._seen_referrals, "referral_id")
                self._census_listed(page.listed, self._seen_referrals)
            listed = [item for item in page.listed if item.record_id not in self._touched_referrals]
            self._reconcile_referrals(
                [d for d in page.deals if d.referral_id not in self._touched_referrals]
                + self._read_listed(System.PARTNER_CENTER, listed)
            )
            self._commit_cursor(PC_CURSOR, page.cursor)
        self._fingerprints = {}

    def _crm_phase(self, full: bool, pages: Iterable[ChangePage]) -> None:
        report = self._need_report()
        for page in pages:
            report.full_resync |= page.full_resync
            self._failures(System.CRM, page.failures)
            if full:
                self._census(page.deals, self._seen_opportunities, "crm_id")
                self._census_listed(page.listed, self._seen_opportunities)
            listed = [item for item in page.listed if item.record_id not in self._touched_crm]
            deals = [d for d in page.deals if d.crm_id and d.crm_id not in self._touched_crm]
            self._reconcile_opportunities(deals + self._read_listed(System.CRM, listed))
            for gone in page.deleted_ids:
                self._crm_deleted(gone)
            self._commit_cursor(CRM_CURSOR, page.cursor)

    def _census(self, deals: Sequence[Deal], seen: set[str], attr: str) -> None:
        """Full reconciliation: remember every id seen, and which referrals claim each CRM id."""
        for deal in deals:
            ident = getattr(deal, attr)
            if ident:
                seen.add(ident)
            if attr == "referral_id" and deal.external_reference_id and deal.referral_id:
                first = self._by_reference.setdefault(deal.external_reference_id, deal.referral_id)
                if first != deal.referral_id:
                    self._more_by_reference.setdefault(deal.external_reference_id, [first]).append(
                        deal.referral_id
                    )

    def _census_listed(self, listed: Sequence[Listed], seen: set[str]) -> None:
        """:meth:`_census` for records not converted: their ids and references are enough."""
        for item in listed:
            seen.add(item.record_id)
            if seen is self._seen_referrals and item.reference:
                first = self._by_reference.setdefault(item.reference, item.record_id)
                if first != item.record_id:
                    self._more_by_reference.setdefault(item.reference, [first]).append(item.record_id)

    def _drift_report(self, before: Counter[str]) -> None:
        """What a full comparison found that the cursors alone had not: duplicates (several referrals
        for one opportunity), orphans (a link whose side is gone or out of scope), and drift (pairs
        the full run had to change). Reported, never silently fixed by deleting anything."""
        report = self._need_report()
        reported = {record for kind, record, _ in report.drift if kind == "duplicate"}
        for crm_id, referral_ids in self._more_by_reference.items():
            if len(referral_ids) > 1 and crm_id not in reported:
                detail = f"{len(referral_ids)} referrals carry this CRM id: {', '.join(sorted(referral_ids))}"
                self._finding("duplicate", crm_id, detail)
        for link in self.store.iter_link_heads(self.name):
            if link.status == "orphaned":
                continue
            if link.referral_id and link.referral_id not in self._seen_referrals:
                report.drift.append(
                    ("orphan", link.referral_id, "the referral is no longer visible in Partner Center")
                )
            if link.crm_id and link.crm_id not in self._seen_opportunities and link.referral_id:
                report.drift.append(("orphan", link.crm_id, "the opportunity is gone or no longer opted in"))
        changed = sum(
            report.counts[k] - before[k] for k in ("pc_updated", "crm_updated", "pc_created", "crm_created")
        )
        if changed:
            self._finding("drift", "-", f"{changed} change(s) the incremental runs had missed")

    def _finding(self, kind: str, record: str, detail: str) -> None:
        report = self._need_report()
        report.drift.append((kind, record, detail))
        report.counts[kind] += 1
        log.warning("reconcile.finding", connection=self.name, kind=kind, record_id=record, detail=detail)

    def _targeted(self, crm_id: str | None, referral_id: str | None) -> None:
        if referral_id:
            self._reconcile_referrals([self.pc.get(referral_id)])
        if crm_id:
            self._reconcile_opportunities(list(self.crm.get([crm_id])))

    def _commit_cursor(self, source: str, cursor: str | None) -> None:
        if self._need_report().dry_run:
            return
        # Renew the lease at every page: a long run keeps it, a killed one loses it within lease_ttl.
        # A run that stalled past its lease has been taken over: it must stop writing at once.
        if not self.store.acquire_lease(self.name, self.holder, self.lease_ttl):
            raise RetryLater(
                f"connection {self.name}: the run lease was taken over; stopping this run", system="state"
            )
        if cursor is not None:
            self.store.set_cursor(self.name, source, cursor)

    # --- pairing ----------------------------------------------------------------------------------

    def _reconcile_referrals(self, referrals: Sequence[Deal]) -> None:
        ids = [r.referral_id for r in referrals if r.referral_id]
        by_referral = self.store.links_by_referral_ids(self.name, ids) if ids else {}
        unlinked_refs = [
            r.external_reference_id
            for r in referrals
            if r.referral_id and r.referral_id not in by_referral and r.external_reference_id
        ]
        by_crm = self.store.links_by_crm_ids(self.name, unlinked_refs) if unlinked_refs else {}
        pairs: list[tuple[Deal, Link | None, str | None]] = []
        for referral in referrals:
            if referral.referral_id is None:
                continue
            link = by_referral.get(referral.referral_id)
            if self._as_last_synced(link, System.PARTNER_CENTER, referral):
                continue
            crm_id = link.crm_id if link else (referral.external_reference_id or None)
            if link is None and crm_id:
                link = by_crm.get(crm_id)
                if link is not None and link.referral_id and link.referral_id != referral.referral_id:
                    # The opportunity is already paired with another referral: this one is a duplicate
                    # (registered twice, or by hand). Never re-pair or write it; report it for a human.
                    self._finding(
                        "duplicate", crm_id, f"referral {referral.referral_id} also carries this CRM id; "
                        f"it stays paired with {link.referral_id}",
                    )  # fmt: skip
                    continue
            pairs.append((referral, link, crm_id))
        # Referrals with no opportunity yet: one already created for them (its answer lost to a crash
        # before our commit) carries the referral id in the CRM; pair with it, never create another.
        orphans = [
            r.referral_id
            for r, link, c in pairs
            if link is None and c is None and r.referral_id and not r.is_terminal
        ]
        adopted = dict(self.crm.find_by_referral(orphans)) if orphans else {}
        pairs = [
            (
                r,
                link,
                adopted[r.referral_id].crm_id
                if link is None and c is None and r.referral_id in adopted
                else c,
            )
            for r, link, c in pairs
        ]
        wanted = sorted({c for _, _, c in pairs if c})
        opportunities = {d.crm_id: d for d in self._get_crm(wanted)} if wanted else {}
        works: list[_Work] = []
        for referral, link, crm_id in pairs:
            crm = opportunities.get(crm_id) if crm_id else None
            if crm_id and crm is None and link is not None and link.crm_id:
                self._orphan(link, f"opportunity {crm_id} is gone or no longer opted in")
                continue
            if crm_id and crm is None:
                # The referral names an opportunity we could not read (malformed id, unreadable
                # record, out of scope): creating another one would duplicate the deal.
                why = f"its externalReferenceId names opportunity {crm_id}, which could not be read"
                self._fail(
                    System.PARTNER_CENTER,
                    referral.referral_id or "?",
                    RecordError(why, cause="crm-reference-unreadable"),
                )
                continue
            if crm is not None and crm.crm_id:
                self._touched_crm.add(crm.crm_id)
            work = self._plan_record(crm, referral, link)
            if work is not None:
                works.append(work)
        self._execute_page(works)

    def _reconcile_opportunities(self, opportunities: Sequence[Deal]) -> None:
        ids = [crm.crm_id for crm in opportunities if crm.crm_id]
        links = self.store.links_by_crm_ids(self.name, ids) if ids else {}
        changed: list[tuple[Deal, Link | None]] = []
        for crm in opportunities:
            assert crm.crm_id is not None
            link = links.get(crm.crm_id)
            if self._as_last_synced(link, System.CRM, crm):
                continue
            self._settled.discard(crm.crm_id)
            changed.append((crm, link))
        # Their referrals, one GET each, on the page's threads as its writes are: one after the
        # other, a 1% change of 100,000 deals waited on 1,000 round trips (minutes at real latency).
        wanted = [link.referral_id for _, link in changed if link is not None and link.referral_id]
        workers = self.connection.partner_center.max_concurrency
        found = map_in_threads(self._read_referral, wanted, workers, name=f"cosell-{self.name}")
        read = dict(zip(wanted, found, strict=True))
        works: list[_Work] = []
        for crm, link in changed:
            referral = None
            if link is not None and link.referral_id:
                got = read[link.referral_id]
                if isinstance(got, RecordError):
                    self._fail(System.PARTNER_CENTER, link.referral_id, got, crm_id=crm.crm_id)
                    continue
                referral = got
            work = self._plan_record(crm, referral, link)
            if work is not None:
                works.append(work)
        self._execute_page(works)

    def _read_referral(self, referral_id: str) -> Deal | RecordError:
        """One referral by id; a record's failure is handed back (to be filed on the page's thread),
        anything else raised."""
        try:
            return self.pc.get(referral_id)
        except RecordError as exc:
            return exc

    def _read_listed(self, side: System, listed: Sequence[Listed]) -> list[Deal]:
        """The listed records not as their last sync left them, converted (a failure isolated). The
        others are settled on their link's head alone: neither converted nor their merge base read."""
        if not listed:
            return []
        ids = [item.record_id for item in listed]
        heads = (
            self.store.link_heads_by_referral_ids(self.name, ids)
            if side is System.PARTNER_CENTER
            else self.store.link_heads_by_crm_ids(self.name, ids)
        )
        fingerprints = self._fingerprints if side is System.PARTNER_CENTER else self._crm_fingerprints
        fingerprints.clear()
        out: list[Deal] = []
        for item in listed:
            head = heads.get(item.record_id)
            keyed = None
            if head is not None:  # no link, nothing to compare a fingerprint with nor to note it on
                keyed = fingerprint(item.content, key=self._reading_key)
                if self._quiet(head, side) and self._listed_as_last_synced(head, side, item, keyed):
                    continue
            try:
                deal = item.read()
            except RecordError as exc:
                self._fail(side, item.record_id, exc)
                continue
            if keyed is not None:
                fingerprints[item.record_id] = keyed
            out.append(deal)
        return out

    def _execute_page(self, works: list[_Work]) -> None:
        """A page's planned records: their outbox rows in one commit, then their Partner Center
        writes, then one batched CRM write and one commit of links, audit and outbox completions."""
        pending: list[_Pending] = []
        try:
            self._execute(works, pending)
        except Exception:
            self._flush(pending)  # what was already written to Partner Center keeps its new base
            raise
        self._flush(pending)

    def _get_crm(self, crm_ids: Sequence[str]) -> Sequence[Deal]:
        try:
            return self.crm.get(crm_ids)
        except (RecordError, ValueError) as exc:  # one malformed id must not sink the page: one by one
            out: list[Deal] = []
            for crm_id in crm_ids:
                try:
                    out += self.crm.get([crm_id])
                except (RecordError, ValueError) as inner:
                    log.info(
                        "crm.get_refused", connection=self.name, crm_id=crm_id, error=type(inner).__name__
                    )
            log.info("crm.get_isolated", connection=self.name, error=type(exc).__name__)
            return out

    # --- one pair ---------------------------------------------------------------------------------

    def _plan_record(
        self, crm: Deal | None, referral: Deal | None, link: Link | None, depth: int = 0
    ) -> _Work | None:
        """Plan one pair; None when there is nothing to do (or the dry run only reports it)."""
        report = self._need_report()
        # a re-plan after a 412 (depth 1) re-reads the referral, not the opportunity: checked once
        read_back = self._check_read_back(crm, referral, link) if depth == 0 else True
        decided: dict[str, tuple[Policy, int]] = {}
        for key in (crm.crm_id if crm else None, referral.referral_id if referral else None):
            if key:
                decided |= self._resolutions.get(key, {})
        policies = {**self.policies, **{f: p for f, (p, _) in decided.items()}}
        try:
            facts = CrmFacts.of(crm) if crm is not None else None
            if facts is not None and facts.lost_reason:
                facts = replace(facts, lost_reason=self._reason(facts.lost_reason))
            plan = plan_pair(
                crm,
                facts,
                referral,
                link.snapshot if link and link.snapshot else None,
                self.mappings.stages,
                policies=policies,
                default_policy=self.default_policy,
                create_referrals=self.connection.policy.create_referrals,
                create_opportunities=self.connection.policy.create_opportunities,
                location_id=self.connection.partner_center.location_id,
                crm_readonly=self.crm.write_unsupported,
                pc_readonly=self._pc_readonly,
            )
        except RecordError as exc:
            self._fail(*self._retry_key(crm, referral), exc)
            return None
        name = (crm or referral).name if (crm or referral) else "?"  # type: ignore[union-attr]
        already_said = plan.skipped and link is not None and link.status_detail == f"skipped: {plan.skipped}"
        # a record blocked or waiting earlier whose cause is gone (e.g. help requested in Partner Center):
        # nothing to write but its status — the CRM's sync-status field must stop saying "blocked"
        stale_status = (
            plan.is_noop and link is not None and link.status_detail.startswith(("blocked:", "waiting:"))
        )
        # the same block as last run and nothing else to do: reported then, the CRM says so; stay quiet
        still_blocked = (
            bool(plan.refusals)
            and link is not None
            and link.status_detail == f"blocked: {plan.refusals[0].rule}"
            and not (plan.pc_ops or plan.crm_changes or plan.crm_stage or plan.waiting or plan.conflicts)
        )
        if still_blocked:
            report.counts["still_blocked"] += 1
            return None
        if (plan.is_noop and not stale_status) or (
            already_said and not (plan.pc_ops or plan.crm_changes or plan.crm_stage)
        ):
            report.counts["skipped" if plan.skipped else "unchanged"] += 1
            if not report.dry_run:
                self._clear_dead(crm.crm_id if crm else None, referral.referral_id if referral else None)
            if plan.is_noop:
                self._note_versions(crm, referral, link, read_back)
            return None
        # A dry run prints every plan; a real run keeps the first few for its report (the demo's
        # tables) — keeping all of them held 100,000 plans of an initial sync in memory (800 MB).
        if report.dry_run or len(report.planned) < KEPT_PLANS:
            report.planned.append(
                PlannedRecord(
                    crm.crm_id if crm else None, referral.referral_id if referral else None, name, plan
                )
            )
        if report.dry_run:
            report.counts["planned"] += 1
            return None
        return _Work(crm, referral, link, plan, decided, depth, read_back=read_back)

    def _quiet(self, link: Link | LinkHead | None, side: System) -> bool:
        """A linked pair with nothing pending on it: no write of ours still to be read back, no dead
        letter for this side, no conflict decision to apply."""
        if (
            link is None
            or not link.crm_id
            or not link.referral_id
            or link.status not in ("linked", "blocked")
            or link.awaiting_read_back
        ):
            return False
        record = (
            (System.CRM, link.crm_id) if side is System.CRM else (System.PARTNER_CENTER, link.referral_id)
        )
        return not (
            record in self._dead or link.crm_id in self._resolutions or link.referral_id in self._resolutions
        )

    def _count_settled(self, crm_id: str, side: System) -> None:
        if side is System.PARTNER_CENTER:
            # counted at the end of the run unless the CRM listing shows its other side changed
            self._settled.add(crm_id)
        else:
            self._settled.discard(crm_id)
            self._need_report().counts["unchanged"] += 1

    def _listed_as_last_synced(self, head: LinkHead, side: System, item: Listed, keyed: str) -> bool:
        """:meth:`_as_last_synced` for a record still only listed: by its fingerprint against the one
        noted when its content was last found equal to the merge base (any edit since, even one that
        somehow kept a referral's eTag, changes it), and for a referral its eTag too."""
        if side is System.PARTNER_CENTER:
            settled = (
                item.version is not None and item.version == head.pc_version and keyed == head.pc_fingerprint
            )
        else:
            settled = keyed == head.crm_fingerprint
        if settled:
            assert head.crm_id is not None
            self._count_settled(head.crm_id, side)
        return settled

    def _as_last_synced(self, link: Link | None, side: System, deal: Deal) -> bool:
        """This side of a linked pair is as our last sync left it (the referral's eTag and content;
        the opportunity's content against the merge base): nothing on it to reconcile, and the other
        side, if it changed, is reached through its own listing. Reading the other side for it would
        cost a call per record — what made a full reconciliation of 100,000 deals read every
        opportunity twice."""
        if link is None or not self._quiet(link, side):
            return False
        assert link.crm_id is not None and link.referral_id is not None
        if side is System.PARTNER_CENTER:
            # an eTag changes with every write to the referral: a true version
            if deal.version is None or link.pc_version is None or deal.version.value != link.pc_version:
                return False
            if not pc_side_settled(deal, link.crm_id, link.snapshot):
                return False
        elif not crm_side_settled(
            deal,
            link.referral_id,
            link.snapshot,
            self.crm.write_unsupported,
            self._pc_readonly,
        ):
            return False
        self._count_settled(link.crm_id, side)
        noted = self._with_fingerprints(link, deal if side is System.CRM else None,
                                        deal if side is System.PARTNER_CENTER else None)  # fmt: skip
        if noted != link:
            self._versions.append(noted)
        return True

    def _with_fingerprints(self, link: Link, crm: Deal | None, referral: Deal | None) -> Link:
        """``link`` with the fingerprints of the listed sides found, by content, as its merge base
        has them: the next listing of them is then settled without converting them."""
        crm_id, referral_id = link.crm_id, link.referral_id
        if self._need_report().dry_run or not crm_id or not referral_id:
            return link
        pc_found = self._fingerprints.get(referral_id) if referral is not None else None
        if (
            referral is not None
            and pc_found is not None
            and pc_found != link.pc_fingerprint
            and referral.version is not None
            and referral.version.value == link.pc_version
            and pc_side_settled(referral, crm_id, link.snapshot)
        ):
            link = replace(link, pc_fingerprint=pc_found)
        crm_found = self._crm_fingerprints.get(crm_id) if crm is not None else None
        if (
            crm is not None
            and crm_found is not None
            and crm_found != link.crm_fingerprint
            and crm_side_settled(
                crm, referral_id, link.snapshot, self.crm.write_unsupported, self._pc_readonly
            )
        ):
            link = replace(link, crm_fingerprint=crm_found)
        return link

    def _note_versions(
        self, crm: Deal | None, referral: Deal | None, link: Link | None, read_back: bool
    ) -> None:
        """A pair found in agreement whose versions moved (our own writes read back): remember the
        versions, so the next run knows this pair without reading its other side; and the listed
        sides' fingerprints, so their next listing needs no conversion either."""
        if link is None or self._need_report().dry_run:
            return
        crm_version = crm.version.value if crm is not None and crm.version else link.crm_version
        pc_version = referral.version.value if referral is not None and referral.version else link.pc_version
        noted = replace(link, crm_version=crm_version, pc_version=pc_version)
        if read_back:  # read back just now: the merge base is what both sides hold
            noted = replace(noted, crm_written_hash=None, crm_written_fields=None)
        noted = self._with_fingerprints(noted, crm, referral)
        if noted != link:
            self._versions.append(noted)

    def _check_read_back(self, crm: Deal | None, referral: Deal | None, link: Link | None) -> bool:
        """The first read of an opportunity after we wrote it: our own echo, or a peer automation
        (a Flow, a workflow rule, a plug-in) that rewrote our values — counted, logged and audited."""
        if crm is None or link is None or not link.crm_written_hash or link.crm_written_fields is None:
            return False
        if self._need_report().dry_run:
            return False
        assert crm.crm_id is not None
        now = snapshot_of(crm)
        rewritten = rewritten_fields(link.crm_written_fields, link.crm_written_hash, now, link.snapshot)
        if rewritten:
            self._need_report().counts["peer_rewrites"] += 1
            log.warning("crm.peer_rewrite", connection=self.name, crm_id=crm.crm_id, fields=list(rewritten))
            self._read_back_audit += [
                self._audit("peer-rewrite", "none", f, link.snapshot.get(f), now.get(f), "echo-check",
                            crm.crm_id, referral)
                for f in rewritten
            ]  # fmt: skip
        self._read_back.append(crm.crm_id)
        return True

    def _execute(self, works: Sequence[_Work], pending: list[_Pending]) -> None:
        """Send the works' Partner Center writes; what each record then needs goes into ``pending``
        (also when a fatal error stops the page: the caller flushes what did go)."""
        if not works:
            return
        # Every Partner Center write of the page is in the outbox, with its idempotency key and the
        # eTag it was based on, before the first request goes: one commit per page, not three per record.
        with self.store.transaction():
            planned = [(work, op, entry) for work in works for op, entry in self._stage(work)]
            saved = self.store.enqueue_many([entry for _, _, entry in planned])
            for (work, op, _), entry in zip(planned, saved, strict=True):
                work.ops.append((op, entry))
        # The requests of different records are independent (one record's stay in order): they go
        # out on a few threads so the page does not wait on one round trip at a time.
        workers = min(self.connection.partner_center.max_concurrency, sum(1 for w in works if w.ops))
        outcomes = map_in_threads(self._send_ops, works, workers, name=f"cosell-{self.name}")
        fatal: BaseException | None = None
        for work, (sent, current, error) in zip(works, outcomes, strict=True):
            if error is not None and not isinstance(error, ConflictError | RuleViolation | RecordError):
                # e.g. Partner Center unreachable: the records that did go are still recorded below;
                # this one's outbox rows stay pending for the next run's replay
                fatal = fatal or error
                continue
            self._send(work, sent, current, error, pending)
        if fatal is not None:
            raise fatal

    def _send_ops(
        self, work: _Work
    ) -> tuple[list[tuple[PcOp, OutboxEntry]], Deal | None, BaseException | None]:
        """One record's Partner Center writes, in order; what went, the referral after them, and
        what stopped them. Runs on a worker thread: touches nothing but the Partner Center client."""
        sent: list[tuple[PcOp, OutboxEntry]] = []
        current = work.referral
        try:
            for op, entry in work.ops:
                current = self._pc_write(op, entry, current)
                sent.append((op, entry))
        except Exception as exc:  # noqa: BLE001 - handed back to the page's own thread, which decides
            return sent, current, exc
        return sent, current, None

    def _stage(self, work: _Work) -> list[tuple[PcOp, OutboxEntry]]:
        """Conflicts and waiting changes of one planned record, and its outbox rows to be (inside the
        page's commit)."""
        report = self._need_report()
        referral, plan = work.referral, work.plan
        crm_id = work.crm_id
        for conflict in plan.conflicts:
            self.store.add_conflict(
                Conflict(self.name, crm_id, referral.referral_id if referral else None, conflict.field,
                         conflict.base, conflict.crm_value, conflict.pc_value)
            )  # fmt: skip
            work.audit.append(
                self._audit("conflict", "none", conflict.field, conflict.crm_value, conflict.pc_value,
                            "policy:manual", crm_id, referral)
            )  # fmt: skip
            report.counts["conflicts"] += 1
        for refusal in plan.refusals:
            work.audit.append(
                self._audit("refused", "none", refusal.field, None, None, refusal.rule, crm_id, referral)
            )
        for waiting in plan.waiting:
            work.audit.append(
                self._audit("waiting", "none", waiting.field, None, None, waiting.rule, crm_id, referral)
            )
            self._wait(
                crm_id or (referral.referral_id if referral else None) or "?", waiting.rule, waiting.message
            )
        return [(op, self._outbox_row(op.kind, crm_id, referral, op.rule)) for op in _coalesce(plan.pc_ops)]

    def _outbox_row(
        self, kind: PcOpKind, crm_id: str | None, referral: Deal | None, rule: str
    ) -> OutboxEntry:
        """A Partner Center write to be, with a fresh idempotency key (sent as its MS-RequestId) and
        the eTag it is based on."""
        return OutboxEntry(
            self.name,
            System.PARTNER_CENTER,
            kind.value,
            crm_id or (referral.referral_id if referral else "") or "?",
            payload={
                "crm_id": crm_id,
                "referral_id": referral.referral_id if referral else None,
                "rule": rule,
            },
            idempotency_key=str(uuid.uuid4()),
            based_on=referral.version.value if referral and referral.version else None,
        )

    def _send(
        self,
        work: _Work,
        sent: list[tuple[PcOp, OutboxEntry]],
        current: Deal | None,
        error: BaseException | None,
        pending: list[_Pending],
    ) -> None:
        """After one record's Partner Center writes: its pending CRM change and link, or what its
        failure means (re-read after a 412, blocked by a rule, a dead letter)."""
        report = self._need_report()
        crm, referral, link = work.crm, work.referral, work.link
        record = work.crm_id or (referral.referral_id if referral else None) or "?"
        for op, _ in sent:
            report.counts["pc_created" if op.kind is PcOpKind.CREATE else "pc_updated"] += 1
        try:
            if error is not None:
                raise error
            done = self._pending(work, current)
            done.outbox_ids = [e.id for _, e in work.ops if e.id is not None]
            done.applied_conflicts = [cid for _, cid in work.decided.values()]
            pending.append(done)
        except ConflictError as exc:
            self._settle(work, sent)
            if work.depth == 0 and referral is not None and referral.referral_id:
                # The referral changed between our read and our write (412): re-read, re-plan, once.
                report.counts["reread"] += 1
                fresh = self.pc.get(referral.referral_id)
                again = self._plan_record(crm, fresh, link, depth=1)
                if again is not None:
                    self._execute([again], pending)
                return
            self._fail(
                *self._retry_key(crm, referral), RecordError(str(exc), record_id=record, cause="pc-conflict")
            )
        except RuleViolation as exc:
            self._settle(work, sent)
            self._blocked(crm, referral, link, [(exc.rule, str(exc))])
        except RecordError as exc:
            self._settle(work, sent)
            self._fail(*self._retry_key(crm, referral), exc)

    def _settle(self, work: _Work, sent: Sequence[tuple[PcOp, OutboxEntry]]) -> None:
        """A record whose writes stopped part-way: its outbox rows are done, except a create that
        landed — that one stays pending so the next run adopts the referral by externalReferenceId."""
        landed_creates = {id(e) for op, e in sent if op.kind is PcOpKind.CREATE}
        self.store.mark_done_many(
            [e.id for _, e in work.ops if e.id is not None and id(e) not in landed_creates]
        )

    def _crm_reason(self, pc_reason: str) -> str | None:
        """Partner Center's lost/decline reason in the CRM's words (the reasons value map, read
        backwards); None when the map has no entry for it: a CRM picklist may refuse unknown text,
        and the close it comes with must not fail for it."""
        try:
            return self.mappings.values["reasons"].to_crm(pc_reason)
        except RecordError:
            log.info("crm.reason_unmapped", connection=self.name)  # free text: not logged
            return None

    def _reason(self, crm_reason: str) -> str:
        """The CRM's lost/decline reason in Partner Center's words (the reasons value map)."""
        try:
            return self.mappings.values["reasons"].to_partner_center(crm_reason, passthrough=True)
        except RecordError:
            return "Others"

    @staticmethod
    def _retry_key(crm: Deal | None, referral: Deal | None) -> tuple[System, str]:
        """Where a failed pair is filed so that a retry can read it again: by its opportunity when it
        has one, else by its referral."""
        if crm is not None and crm.crm_id:
            return System.CRM, crm.crm_id
        return System.PARTNER_CENTER, (referral.referral_id if referral else None) or "?"

    def _pending(self, work: _Work, current: Deal | None) -> _Pending:
        """After the Partner Center writes: the record's CRM change (for the page's batch) and link."""
        report = self._need_report()
        crm, referral, link, plan = work.crm, work.referral, work.link, work.plan
        crm_id = work.crm_id
        audit = work.audit
        fields = dict(plan.crm_changes)
        not_written: set[str] = set()
        if "lost_reason" in fields:
            fields["lost_reason"] = self._crm_reason(str(fields["lost_reason"]))
            if fields["lost_reason"] is None:
                del fields["lost_reason"]
                not_written.add("lost_reason")
        # audited after the writes, so a created referral's id is on its rows
        for fieldname, direction, old, new, rule in plan.explanations:
            action = "set"
            if fieldname in not_written:
                action, rule, new = "not-written", f"{rule}: not in the reasons value map", old
            elif fieldname == "lost_reason":
                new = fields["lost_reason"]  # in the CRM's words
            audit.append(
                self._audit(action, direction, fieldname, old, new, rule, crm_id, current or referral)
            )
        status = "synced"
        if plan.skipped:
            status = f"skipped: {plan.skipped}"
            report.counts["skipped"] += 1
        elif plan.refusals:
            status = f"blocked: {plan.refusals[0].rule}"
            report.counts["blocked"] += 1
            report.problems.append((crm_id or "?", plan.refusals[0].rule, plan.refusals[0].message))
        elif plan.waiting:
            status = f"waiting: {plan.waiting[0].rule}"
            report.counts["waiting"] += 1
        change: CrmChange | None = None
        new_referral_id = current.referral_id if current else None
        wants_crm = bool(fields or plan.crm_stage) or (
            new_referral_id and (link is None or link.referral_id != new_referral_id)
        )
        status_changed = link is None or link.status_detail != status
        if wants_crm or status_changed:
            fields.pop("referral_id", None)
            change = CrmChange(
                crm_id=crm_id,
                fields=fields,
                stage=plan.crm_stage,
                referral_id=new_referral_id,
                sync_status=status,
                audit_line=_audit_line(plan, status, not_written),
                synced_at=datetime.now(UTC),
                # Salesforce sends conditional writes one by one (If-Unmodified-Since); only pass the
                # version where the adapter can still batch them (Dataverse $batch with If-Match).
                based_on=crm.version.value
                if crm and crm.version and self.crm.conditional_writes_batched
                else None,
                key=uuid.uuid4().hex,
            )
        base = dict(plan.base)
        # what we write now is checked when first read back; fields the adapter cannot write are not
        # (a close's reason is written once, with the close, and is no synced field to read back)
        written = {
            f: v for f, v in fields.items() if f not in self.crm.write_unsupported and f != "lost_reason"
        }
        written_hash, written_fields = (
            (link.crm_written_hash, link.crm_written_fields) if link and not work.read_back else (None, None)
        )
        if written:
            written_hash, written_fields = values_hash(written), tuple(sorted(written))
        new_link = Link(
            self.name,
            crm_id,
            new_referral_id,
            snapshot=base,
            crm_version=crm.version.value if crm and crm.version else (link.crm_version if link else None),
            pc_version=current.version.value
            if current and current.version
            else (link.pc_version if link else None),
            crm_written_hash=written_hash,
            crm_written_fields=written_fields,
            pc_written_hash=link.pc_written_hash if link else None,
            status="blocked" if plan.refusals else "linked",
            status_detail=status,
        )
        still = {w.rule for w in plan.waiting}
        record_key = crm_id or (referral.referral_id if referral else None) or "?"
        released = [
            key
            for key in (self._wait_key(record_key, rule) for rule in WAITING_RULES if rule not in still)
            if key in self._waiting
        ]
        return _Pending(new_link, change, audit, released_waits=released, referral=current)

    def _pc_write(self, op: PcOp, entry: OutboxEntry, current: Deal | None) -> Deal:
        """One Partner Center write; its outbox row was committed with the page's before the request
        and is marked done in the page's final commit."""
        if op.kind is PcOpKind.CREATE:
            return self.pc.create(op.after, request_id=entry.idempotency_key)
        assert current is not None
        after = replace(op.after, version=current.version)
        return self.pc.update(current, after, request_id=entry.idempotency_key)

    def _flush(self, pending: list[_Pending]) -> None:
        """End of a page: one batched CRM write, then links + audit in one transaction."""
        read_back, notes, versions = self._read_back, self._read_back_audit, self._versions
        self._read_back, self._read_back_audit, self._versions = [], [], []
        if not pending and not read_back and not versions:
            return
        report = self._need_report()
        changes = [p.change for p in pending if p.change is not None]
        results = {r.key: r for r in self.crm.apply(changes)} if changes else {}
        audit: list[AuditEntry] = list(notes)
        links: list[Link] = []
        #: (index in links, referral, new CRM id): inbound referrals whose opportunity was just created
        pairings: list[tuple[int, Deal, str]] = []
        with self.store.transaction():
            # before the links are saved: a link written in this page carries its new write's hash
            self.store.forget_crm_writes(self.name, read_back)
            self.store.save_links(versions)
            self.store.mark_done_many([i for p in pending for i in p.outbox_ids])
            for p in pending:
                link = p.link
                if p.change is not None:
                    result = results.get(p.change.key)
                    if result is None or not result.ok:
                        cause = result.error_code if result else "no-result"
                        message = result.message if result else "the CRM returned no result for this record"
                        self._fail(
                            System.CRM,
                            link.crm_id or link.referral_id or "?",
                            RecordError(message, cause=cause),
                        )
                        continue
                    if p.change.crm_id is None and result.crm_id:
                        link = replace(link, crm_id=result.crm_id)
                        report.counts["crm_created"] += 1
                        # the new opportunity's id goes on every row of its record
                        p.audit[:] = [a if a.crm_id else replace(a, crm_id=result.crm_id) for a in p.audit]
                        p.audit.append(
                            self._audit("create", "pc->crm", "opportunity", None, result.crm_id,
                                        "inbound referral", result.crm_id, p.referral)
                        )  # fmt: skip
                        if p.referral is not None and not p.referral.is_terminal:
                            pairings.append((len(links), p.referral, result.crm_id))
                    elif p.change.fields or p.change.stage:
                        report.counts["crm_updated"] += 1
                    if result.new_version:
                        link = replace(link, crm_version=result.new_version)
                if link.crm_id is None and link.referral_id is None:
                    continue
                links.append(link)
                for conflict_id in p.applied_conflicts:
                    self.store.mark_conflict_applied(conflict_id)
                if p.released_waits:
                    self.store.complete_waiting(p.released_waits)
                    self._waiting -= set(p.released_waits)
                self._clear_dead(link.crm_id, link.referral_id)
                audit += p.audit
                report.counts["synced"] += 1
            self.store.save_links(links)
            self.store.append_audit(audit)
        if pairings:
            self._pair_created(pairings, links)

    def _pair_created(self, pairings: list[tuple[int, Deal, str]], links: list[Link]) -> None:
        """Inbound referrals whose opportunity this page created learn its id (``externalReferenceId``)
        in the same run — left to the next run, it would be a write with no external change. Outbox
        rows first, as for every Partner Center write; a refusal here is left to the next run's plan,
        which pairs any referral still without the CRM id."""
        entries = self.store.enqueue_many(
            [
                self._outbox_row(PcOpKind.PATCH, crm_id, referral, "pairing")
                for _, referral, crm_id in pairings
            ]
        )
        saved: list[Link] = []
        audit: list[AuditEntry] = []
        for (index, referral, crm_id), entry in zip(pairings, entries, strict=True):
            try:
                updated = self.pc.update(
                    referral,
                    replace(referral, external_reference_id=crm_id),
                    request_id=entry.idempotency_key,
                )
            except (ConflictError, RecordError) as exc:
                log.info("pc.pairing_deferred", connection=self.name, crm_id=crm_id, error=type(exc).__name__)
                continue
            self._need_report().counts["pc_updated"] += 1
            link = links[index]
            saved.append(
                replace(link, pc_version=updated.version.value if updated.version else link.pc_version)
            )
            audit.append(
                self._audit("set", "crm->pc", "external_reference_id", referral.external_reference_id, crm_id,
                            "pairing", crm_id, referral)
            )  # fmt: skip
        with self.store.transaction():
            self.store.mark_done_many([e.id for e in entries if e.id is not None])
            self.store.save_links(saved)
            self.store.append_audit(audit)

    # --- outbox, dead letters, problems -----------------------------------------------------------

    def _replay_outbox(self) -> None:
        """Creates that were sent but whose answer was never recorded: resume them exactly once."""
        report = self._need_report()
        for entry in self.store.due(self.name):
            if entry.state is OutboxState.WAITING:
                continue  # re-evaluated when its record is planned again
            assert entry.id is not None
            crm_id = entry.payload.get("crm_id")
            if entry.operation == PcOpKind.CREATE.value and crm_id:
                found = self.pc.find_by_external_reference(str(crm_id))
                existing = self.store.link_by_crm(self.name, str(crm_id))
                if found is not None and (existing is None or existing.referral_id != found.referral_id):
                    self.store.save_link(
                        Link(
                            self.name,
                            str(crm_id),
                            found.referral_id,
                            snapshot={},
                            status="linked",
                            status_detail="adopted",
                        )
                    )
                    report.counts["pc_adopted"] += 1
                    self._touched_crm.discard(str(crm_id))
                # Not found: the POST never landed; the CRM phase re-plans and creates it.
            self.store.mark_done(entry.id)

    def _clear_dead(self, crm_id: str | None, referral_id: str | None) -> None:
        """A record that reconciles cleanly leaves the dead-letter queue."""
        if crm_id and (System.CRM, crm_id) in self._dead:
            self.store.clear_dead_letter(self.name, System.CRM, crm_id)
        if referral_id and (System.PARTNER_CENTER, referral_id) in self._dead:
            self.store.clear_dead_letter(self.name, System.PARTNER_CENTER, referral_id)

    def _reconcile_resolved(self) -> None:
        """Records with a human's conflict decision are reconciled now, changed or not."""
        crm_ids = set()
        for conflict in self.store.conflicts(self.name, state="resolved"):
            if conflict.crm_id:
                crm_ids.add(conflict.crm_id)
        if crm_ids:
            self._reconcile_opportunities(list(self._get_crm(sorted(crm_ids))))
            self._touched_crm |= crm_ids
            # their referrals show up again in this run's listing (we may just have patched them)
            self._touched_referrals |= {
                link.referral_id
                for link in self.store.links_by_crm_ids(self.name, sorted(crm_ids)).values()
                if link.referral_id
            }

    def _retry_dead_letters(self) -> None:
        """Open letters are retried while they have attempts left; a letter an operator marked for
        retry (`cosell dlq retry`) is retried whatever its count."""
        asked = self.store.dead_letters(self.name, state="retry")
        for letter in asked:
            assert letter.id is not None
            self.store.set_dead_letter_state(letter.id, "open")
        due = [
            letter for letter in self.store.dead_letters(self.name) if letter.attempts < MAX_RECORD_ATTEMPTS
        ]
        for letter in {(x.system, x.record_id): x for x in [*asked, *due]}.values():
            try:
                if letter.system is System.CRM:
                    found = self._get_crm([letter.record_id])
                    if not found:
                        raise RecordError(
                            f"opportunity {letter.record_id} could not be read", cause="crm-unreadable"
                        )
                    self._reconcile_opportunities(list(found))
                else:
                    self._reconcile_referrals([self.pc.get(letter.record_id)])
            except (RecordError, ValueError) as exc:
                error = exc if isinstance(exc, RecordError) else RecordError(str(exc), cause="bad-id")
                self._fail(letter.system, letter.record_id, error)

    def _fail(self, system: System, record_id: str, exc: RecordError, crm_id: str | None = None) -> None:
        report = self._need_report()
        report.counts["failed"] += 1
        report.problems.append((record_id, exc.cause or type(exc).__name__, str(exc)))
        log.warning(
            "record.failed", connection=self.name, system=system.value, record_id=record_id, cause=exc.cause
        )
        if not report.dry_run:
            self.store.add_dead_letter(
                DeadLetter(
                    self.name,
                    system,
                    record_id,
                    cause=exc.cause or type(exc).__name__,
                    # error bodies can echo customer data: the stored detail is scrubbed like a log line
                    detail=str(_scrub(str(exc)))[:2000],
                )
            )

    def _failures(self, system: System, failures: Iterable[RecordFailure]) -> None:
        for failure in failures:
            self._fail(
                system, failure.record_id, RecordError(failure.detail or failure.cause, cause=failure.cause)
            )

    def _blocked(
        self, crm: Deal | None, referral: Deal | None, link: Link | None, refusals: list[tuple[str, str]]
    ) -> None:
        report = self._need_report()
        report.counts["blocked"] += 1
        crm_id = crm.crm_id if crm else None
        for rule, message in refusals:
            report.problems.append(
                (crm_id or (referral.referral_id if referral else "?") or "?", rule, message)
            )
        if link is not None and not report.dry_run:
            self.store.save_link(replace(link, status="blocked", status_detail=f"blocked: {refusals[0][0]}"))

    def _wait_key(self, record_key: str, rule: str) -> str:
        return f"wait:{self.name}:{record_key}:{rule}"

    def _wait(self, record_key: str, rule: str, message: str) -> None:
        entry = self.store.enqueue(
            OutboxEntry(
                self.name,
                System.PARTNER_CENTER,
                "wait",
                record_key,
                payload={"rule": rule, "message": message},
                idempotency_key=self._wait_key(record_key, rule),
                state=OutboxState.WAITING,
                wait_reason=rule,
            )
        )
        assert entry.id is not None
        self._waiting.add(entry.idempotency_key)

    def _orphan(self, link: Link, why: str) -> None:
        report = self._need_report()
        report.counts["orphaned"] += 1
        if not report.dry_run:
            self.store.save_link(replace(link, status="orphaned", status_detail=why))

    def _crm_deleted(self, crm_id: str) -> None:
        link = self.store.link_by_crm(self.name, crm_id)
        if link is not None:
            self._orphan(link, "opportunity deleted in the CRM")

    def _audit(
        self,
        action: str,
        direction: str,
        fieldname: str,
        old: Any,
        new: Any,
        rule: str,
        crm_id: str | None,
        referral: Deal | None,
    ) -> AuditEntry:
        report = self._need_report()
        return AuditEntry(
            self.name,
            report.run_id,
            self.correlation_id,
            action,
            direction,
            fieldname,
            _people_safe(fieldname, old),
            _people_safe(fieldname, new),
            rule,
            crm_id,
            referral.referral_id if referral else None,
        )

    def _need_report(self) -> RunReport:
        assert self._report is not None, "no run in progress"
        return self._report


def _coalesce(ops: Sequence[PcOp]) -> list[PcOp]:
    """Fold consecutive operations into one PATCH where Partner Center allows it: a changed record
    costs one write. Status transitions that must happen in steps (accept, then win) stay apart."""
    out: list[PcOp] = []
    for op in ops:
        if out and op.kind not in (PcOpKind.CREATE,) and out[-1].kind is not PcOpKind.CREATE:
            prev = out[-1]
            status_steps = sum(
                1
                for o in (prev, op)
                if o.kind in (PcOpKind.ACCEPT, PcOpKind.DECLINE, PcOpKind.WIN, PcOpKind.LOSE)
            )
            if status_steps <= 1:
                kind = op.kind if op.kind is not PcOpKind.PATCH else prev.kind
                out[-1] = PcOp(kind, op.after, f"{prev.rule}; {op.rule}", prev.fields + op.fields)
                continue
        out.append(op)
    return out


def _audit_line(plan: PairPlan, status: str, not_written: set[str] | frozenset[str] = frozenset()) -> str:
    changed = sorted({e[0] for e in plan.explanations} - not_written)
    text = f"{datetime.now(UTC):%Y-%m-%d %H:%M}Z {status}"
    if changed:
        text += ": " + ", ".join(changed)
    if plan.refusals:
        text += f" | {plan.refusals[0].message}"
    return text[:255]


PEOPLE_FIELDS = frozenset({"team", "customer_contact"})


def _people_safe(fieldname: str, value: Any) -> Any:
    """Audit rows name who changed, not their details: team members and contacts become counts."""
    if fieldname in PEOPLE_FIELDS and value is not None:
        return f"{len(value)} member(s)" if isinstance(value, list | tuple) else "[contact]"
    return _jsonable(value)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)
