"""Behaviour of the state store, identical on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from connector.state import (
    AuditEntry,
    Conflict,
    DeadLetter,
    Link,
    LinkHead,
    OutboxEntry,
    OutboxState,
    RunRecord,
    SqlStateStore,
    System,
    open_store,
)
from connector.state.tables import metadata

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def entry(key: str = "k1", **changes: object) -> OutboxEntry:
    base = OutboxEntry(
        connection="acme",
        target=System.PARTNER_CENTER,
        operation="update",
        record_key="r-1",
        payload={"ops": [{"op": "replace", "path": "/details/notes", "value": "x"}]},
        idempotency_key=key,
        based_on='"etag-1"',
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# --- schema --------------------------------------------------------------------------------------


def test_migrations_match_the_table_model(store: SqlStateStore) -> None:
    with store.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diffs == []
    assert store.schema_revision()[0] == store.schema_revision()[1]


@contextmanager
def schema_at(store_url: str, revision: str) -> Iterator[sa.Connection]:
    """The store's database at an older release's ``revision``, for that release's rows to be put in
    (committed when the block ends)."""
    from alembic import command
    from alembic.config import Config

    from connector.state.store import MIGRATIONS

    engine = sa.create_engine(store_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            yield conn
    finally:
        engine.dispose()


def test_upgrade_from_the_first_schema_keeps_the_links(store_url: str) -> None:
    """A store created by an older release is upgraded in place at start, its rows intact."""
    with schema_at(store_url, "0001") as conn:
        conn.execute(
            sa.text(
                "INSERT INTO links (connection, crm_id, referral_id, snapshot, crm_written_hash, status,"
                " status_detail, updated_at) VALUES ('acme', '006A', 'r-1', '{\"name\": \"Deal\"}',"
                " :h, 'linked', 'synced', :at)"
            ),
            {"h": "h" * 64, "at": T0},
        )
    store = open_store(store_url)  # migrates to the newest revision
    try:
        assert store.schema_revision()[0] == store.schema_revision()[1] != "0001"
        link = store.link_by_crm("acme", "006A")
        assert link is not None and link.snapshot == {"name": "Deal"} and link.referral_id == "r-1"
        assert link.crm_written_hash == "h" * 64 and link.crm_written_fields is None
        assert link.pc_fingerprint is None and link.crm_fingerprint is None  # 0003: noted by the next run
        head = store.link_heads_by_crm_ids("acme", ["006A"])["006A"]
        assert not head.awaiting_read_back  # a row older than 0002 holds SQL NULL there
    finally:
        store.close()


def test_upgrade_to_0004_digests_the_team_members_of_stored_merge_bases(store_url: str) -> None:
    """Bases written before 0004 held whole team members (names, emails, phones): rewritten as the
    digests the merge keeps now, everything else in the base and the link untouched."""
    import importlib.util
    import json

    from connector.domain.merge import member_digest
    from connector.state.store import MIGRATIONS

    members = [
        {"first_name": "Ada", "last_name": "Seller", "email": "ada@partner.example", "phone": "+1 555 0100"},
        {"first_name": "Mo", "last_name": "Seller", "email": "mo@microsoft.example", "phone": ""},
    ]
    old_base = {"name": "Deal", "team": members, "crm:team": members[:1], "solutions": ["SOL-1"]}
    with schema_at(store_url, "0003") as conn:
        for crm_id, base in (("006A", old_base), ("006B", {"name": "No team yet"})):
            conn.execute(
                sa.text(
                    "INSERT INTO links (connection, crm_id, referral_id, snapshot, status, status_detail,"
                    " updated_at) VALUES ('acme', :crm_id, :rid, :snapshot, 'linked', 'synced', :at)"
                ),
                {"crm_id": crm_id, "rid": f"r-{crm_id}", "snapshot": json.dumps(base), "at": T0},
            )
    store = open_store(store_url)
    try:
        link = store.link_by_crm("acme", "006A")
        assert link is not None
        assert link.snapshot == {
            "name": "Deal",
            "team": sorted(member_digest(m) for m in members),
            "crm:team": [member_digest(members[0])],
            "solutions": ["SOL-1"],
        }
        assert "example" not in repr(link.snapshot) and "555" not in repr(link.snapshot)
        other = store.link_by_crm("acme", "006B")
        assert other is not None and other.snapshot == {"name": "No team yet"}
    finally:
        store.close()
    # the migration's frozen digest is the domain's
    path = next(MIGRATIONS.glob("versions/0004_*.py"))
    spec = importlib.util.spec_from_file_location("migration_0004", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    for member in members:
        assert migration.member_digest(member) == member_digest(member)


def test_migrate_is_idempotent(store_url: str) -> None:
    open_store(store_url).close()
    again = open_store(store_url)
    assert again.schema_revision()[0] is not None
    again.close()


# --- links ---------------------------------------------------------------------------------------


def test_links_round_trip_and_upsert_by_either_id(store: SqlStateStore) -> None:
    link = store.save_link(Link("acme", "006A", None, snapshot={"name": "Deal", "value": "100.00"}))
    assert link.updated_at is not None and link.updated_at.tzinfo is UTC
    store.save_link(replace(link, referral_id="r-1", pc_version='"e1"'))
    by_ref = store.link_by_referral("acme", "r-1")
    assert by_ref is not None and by_ref.crm_id == "006A" and by_ref.snapshot["value"] == "100.00"
    store.save_link(replace(by_ref, snapshot={"name": "Renamed"}))
    got = store.link_by_crm("acme", "006A")
    assert got is not None and got.snapshot == {"name": "Renamed"} and got.pc_version == '"e1"'
    assert store.link_by_crm("other", "006A") is None
    assert store.count_links("acme") == {"linked": 1}


def test_a_page_of_links_is_read_in_one_call_by_either_id(store: SqlStateStore) -> None:
    for i in range(1200):  # more than one IN chunk
        store.save_link(Link("acme", f"006{i:04d}", f"r-{i}" if i % 2 else None))
    store.save_link(Link("other", "0060001", "r-x"))
    wanted = [f"006{i:04d}" for i in range(0, 1200, 3)] + ["006-missing", "0060003"]
    by_crm = store.links_by_crm_ids("acme", wanted)
    assert set(by_crm) == {f"006{i:04d}" for i in range(0, 1200, 3)}
    assert by_crm["0060003"].referral_id == "r-3"
    by_ref = store.links_by_referral_ids("acme", ["r-1", "r-2", "r-1199", "r-x"])
    assert {k: v.crm_id for k, v in by_ref.items()} == {"r-1": "0060001", "r-1199": "0061199"}
    assert store.links_by_crm_ids("acme", []) == {}


def test_a_page_of_links_is_saved_in_one_batch(store: SqlStateStore) -> None:
    store.save_link(Link("acme", "006A", None, snapshot={"name": "old"}))
    store.save_link(Link("acme", None, "r-2", snapshot={"name": "referral only"}))
    store.save_links(
        [
            Link("acme", "006A", "r-1", snapshot={"name": "new"}),  # update, found by CRM id
            Link("acme", "006B", "r-2", snapshot={"name": "paired"}),  # update, found by referral id
            Link("acme", "006C", None, snapshot={"name": "first"}),  # insert
            Link("acme", "006C", "r-3", snapshot={"name": "twice in a page"}),  # the later one wins
        ]
    )
    got = store.links_by_crm_ids("acme", ["006A", "006B", "006C"])
    assert {k: (v.referral_id, v.snapshot["name"]) for k, v in got.items()} == {
        "006A": ("r-1", "new"),
        "006B": ("r-2", "paired"),
        "006C": ("r-3", "twice in a page"),
    }
    assert store.count_links("acme") == {"linked": 3}
    with pytest.raises(sa.exc.IntegrityError):  # one referral never pairs with a second opportunity
        store.save_links([Link("acme", "006C", "r-1")])


def test_a_pages_outbox_rows_are_enqueued_together_with_their_ids(store: SqlStateStore) -> None:
    saved = store.enqueue_many([entry(f"p{i}", record_key=f"r-{i}") for i in range(5)])
    assert [e.idempotency_key for e in saved] == [f"p{i}" for i in range(5)]
    ids = [e.id for e in saved]
    assert None not in ids and len(set(ids)) == 5
    by_id = {e.id: e for e in store.outbox_entries("acme")}
    assert all(by_id[e.id].record_key == e.record_key for e in saved)
    assert store.enqueue_many([]) == []


def test_written_fields_are_kept_until_read_back(store: SqlStateStore) -> None:
    store.save_link(
        Link("acme", "006A", "r-1", crm_written_hash="h" * 64, crm_written_fields=("notes", "value"))
    )
    store.save_link(Link("acme", "006B", "r-2", crm_written_hash="g" * 64, crm_written_fields=("name",)))
    got = store.link_by_crm("acme", "006A")
    assert (
        got is not None and got.crm_written_fields == ("notes", "value") and got.crm_written_hash == "h" * 64
    )
    store.forget_crm_writes("acme", ["006A"])
    after = store.links_by_crm_ids("acme", ["006A", "006B"])
    assert after["006A"].crm_written_hash is None and after["006A"].crm_written_fields is None
    assert after["006B"].crm_written_fields == ("name",)


def test_a_links_referral_fingerprint_is_kept_and_replaced_with_the_link(store: SqlStateStore) -> None:
    store.save_links([Link("acme", "006A", "r-1", pc_version="e1", pc_fingerprint="f" * 32)])
    assert store.links_by_referral_ids("acme", ["r-1"])["r-1"].pc_fingerprint == "f" * 32
    store.save_links([Link("acme", "006A", "r-1", pc_version="e2")])  # a new merge base: none yet
    assert store.links_by_referral_ids("acme", ["r-1"])["r-1"].pc_fingerprint is None


def test_link_heads_say_what_settles_a_listed_record_without_the_merge_base(store: SqlStateStore) -> None:
    store.save_links(
        [
            Link(
                "acme",
                "006A",
                "r-1",
                {"name": "A"},
                pc_version="e1",
                pc_fingerprint="p1",
                crm_fingerprint="c1",
            ),
            Link(
                "acme", "006B", "r-2", {"name": "B"}, crm_written_hash="h" * 64, crm_written_fields=("name",)
            ),
            Link("acme", "006C", None, status="orphaned"),
            Link("other", "006A", "r-9"),
        ]
    )
    by_crm = store.link_heads_by_crm_ids("acme", ["006A", "006B", "006C", "006Z"])
    assert by_crm["006A"] == LinkHead("006A", "r-1", "linked", "e1", "p1", "c1", awaiting_read_back=False)
    assert by_crm["006B"].awaiting_read_back and by_crm["006B"].pc_fingerprint is None
    assert by_crm["006C"].status == "orphaned" and "006Z" not in by_crm
    assert set(store.link_heads_by_referral_ids("acme", ["r-1", "r-2", "r-9"])) == {"r-1", "r-2"}
    store.forget_crm_writes("acme", ["006B"])  # read back: stored as JSON null, not SQL NULL
    assert not store.link_heads_by_crm_ids("acme", ["006B"])["006B"].awaiting_read_back
    assert [h.crm_id for h in store.iter_link_heads("acme", batch=2)] == ["006A", "006B", "006C"]


def test_one_referral_links_to_one_opportunity(store: SqlStateStore) -> None:
    store.save_link(Link("acme", "006A", "r-1"))
    store.save_link(Link("acme", "006B", None))
    with pytest.raises(sa.exc.IntegrityError):
        store.save_link(Link("acme", "006B", "r-1"))


def test_a_referral_only_link_gains_its_opportunity(store: SqlStateStore) -> None:
    store.save_link(Link("acme", None, "r-9", status="pending-crm"))
    store.save_link(Link("acme", "006Z", "r-9"))
    got = store.link_by_referral("acme", "r-9")
    assert got is not None and got.crm_id == "006Z" and got.status == "linked"
    assert store.count_links("acme") == {"linked": 1}


def test_iter_links_streams_in_pages(store: SqlStateStore) -> None:
    with store.transaction():
        for i in range(25):
            store.save_link(Link("acme", f"006{i:03d}", f"r-{i}"))
    store.save_link(Link("other", "006X", "r-x"))
    ids = [link.crm_id for link in store.iter_links("acme", batch=7)]
    assert ids == [f"006{i:03d}" for i in range(25)]


def test_naive_datetimes_are_refused(store: SqlStateStore) -> None:
    with pytest.raises(sa.exc.StatementError, match="naive"):
        store.start_run(RunRecord("run-n", "acme", started_at=datetime(2026, 1, 1)))  # noqa: DTZ001


# --- transactions and cursors ------------------------------------------------------------------


def test_a_transaction_commits_all_or_nothing(store: SqlStateStore) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.save_link(Link("acme", "006A", "r-1"))
        store.set_cursor("acme", "crm", "2026-11-01T00:00:00Z|006A")
        raise RuntimeError("crash between the records and the cursor")
    assert store.link_by_crm("acme", "006A") is None
    assert store.cursor("acme", "crm") is None
    with store.transaction():
        store.save_link(Link("acme", "006A", "r-1"))
        store.set_cursor("acme", "crm", "c1")
    assert store.cursor("acme", "crm") == "c1"
    assert store.cursors("acme") == {"crm": "c1"}
    store.set_cursor("acme", "crm", None)
    assert store.cursor("acme", "crm") is None


# --- outbox --------------------------------------------------------------------------------------


def test_outbox_is_idempotent_on_its_key(store: SqlStateStore) -> None:
    first = store.enqueue(entry())
    again = store.enqueue(entry(payload={"different": True}))
    assert first.id == again.id and again.payload == first.payload
    assert len(store.outbox_entries("acme")) == 1


def test_outbox_lifecycle(store: SqlStateStore) -> None:
    a = store.enqueue(entry("a"))
    b = store.enqueue(entry("b", operation="create"))
    assert [e.idempotency_key for e in store.due("acme")] == ["a", "b"]
    assert a.id is not None and b.id is not None
    store.mark_done(a.id)
    later = datetime.now(UTC) + timedelta(minutes=5)
    failed = store.mark_attempt_failed(b.id, "HTTP 503", retry_at=later)
    assert failed.attempts == 1 and failed.last_error == "HTTP 503"
    assert store.due("acme") == []
    assert [e.idempotency_key for e in store.due("acme", now=later)] == ["b"]
    store.mark_waiting(b.id, "stage-needs-accepted")
    waiting = store.outbox_entries("acme", [OutboxState.WAITING])
    assert [(e.idempotency_key, e.wait_reason) for e in waiting] == [("b", "stage-needs-accepted")]
    assert store.outbox_depth("acme") == {"waiting": 1}
    store.mark_dead(b.id, "400 bad request")
    assert store.outbox_depth("acme") == {"dead": 1}


# --- dead letters, conflicts, audit ------------------------------------------------------------


def test_dead_letters_count_attempts_and_can_be_retried_or_dropped(store: SqlStateStore) -> None:
    letter = DeadLetter(
        "acme", System.CRM, "006A", cause="INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", detail="StageName"
    )
    store.add_dead_letter(letter)
    again = store.add_dead_letter(replace(letter, detail="still bad"))
    assert again.attempts == 2 and again.detail == "still bad"
    [listed] = store.dead_letters("acme")
    assert listed.id is not None
    store.set_dead_letter_state(listed.id, "retry")
    assert store.dead_letters("acme") == [] and len(store.dead_letters("acme", state="retry")) == 1
    store.set_dead_letter_state(listed.id, "dropped")
    with pytest.raises(LookupError):
        store.set_dead_letter_state(9999, "dropped")
    store.clear_dead_letter("acme", System.CRM, "006A")
    assert store.dead_letters("acme", state="dropped") == []


def test_conflicts_queue_and_resolve(store: SqlStateStore) -> None:
    c = store.add_conflict(
        Conflict("acme", "006A", "r-1", "value", base="100", crm_value="150", pc_value="120")
    )
    store.add_conflict(replace(c, id=None, pc_value="130"))  # same open field: updated, not duplicated
    [open_one] = store.conflicts("acme")
    assert open_one.pc_value == "130" and open_one.id == c.id
    assert open_one.id is not None
    resolved = store.resolve_conflict(open_one.id, "crm")
    assert resolved.state == "resolved" and resolved.resolved_at is not None
    assert store.conflicts("acme") == []
    with pytest.raises(LookupError):
        store.resolve_conflict(open_one.id, "crm")
    with pytest.raises(ValueError, match="resolution"):
        store.resolve_conflict(open_one.id, "coin-flip")


def test_audit_is_append_only_and_filterable(store: SqlStateStore) -> None:
    entries = [
        AuditEntry(
            "acme", "run-1", "corr-1", "set", "crm->pc", "sales_stage", 20, 40, "label:Propose", "006A", "r-1"
        ),
        AuditEntry(
            "acme",
            "run-1",
            "corr-1",
            "refused",
            "crm->pc",
            "status",
            None,
            None,
            "terminal-immutable",
            "006B",
            "r-2",
        ),
    ]
    store.append_audit(entries)
    store.append_audit([])
    got = store.audit("acme", crm_id="006A")
    assert [(e.field, e.old, e.new, e.rule) for e in got] == [("sales_stage", 20, 40, "label:Propose")]
    assert got[0].at is not None and got[0].at.tzinfo is UTC
    assert [e.rule for e in store.audit(referral_id="r-2")] == ["terminal-immutable"]
    assert len(store.audit("acme")) == 2


# --- leases and runs -----------------------------------------------------------------------------


def test_lease_excludes_a_second_holder_until_it_expires(store: SqlStateStore) -> None:
    ttl = timedelta(minutes=5)
    assert store.acquire_lease("acme", "daemon-a", ttl, now=T0)
    assert not store.acquire_lease("acme", "daemon-b", ttl, now=T0 + timedelta(minutes=1))
    assert store.acquire_lease("acme", "daemon-a", ttl, now=T0 + timedelta(minutes=2))  # renew
    assert store.lease_holder("acme", now=T0 + timedelta(minutes=3)) == "daemon-a"
    assert store.acquire_lease("acme", "daemon-b", ttl, now=T0 + timedelta(minutes=8))  # expired: taken over
    assert not store.acquire_lease("acme", "daemon-a", ttl, now=T0 + timedelta(minutes=9))
    store.release_lease("acme", "daemon-a")  # not the holder: no effect
    assert store.lease_holder("acme", now=T0 + timedelta(minutes=9)) == "daemon-b"
    store.release_lease("acme", "daemon-b")
    assert store.acquire_lease("acme", "daemon-a", ttl, now=T0 + timedelta(minutes=9))
    assert store.acquire_lease("other", "daemon-b", ttl, now=T0)  # leases are per connection


def test_only_one_of_many_racing_daemons_gets_the_lease(store_url: str) -> None:
    stores = [open_store(store_url, migrate=False) for _ in range(6)]
    open_store(store_url).close()
    winners: list[str] = []
    barrier = threading.Barrier(len(stores))

    def race(i: int) -> None:
        barrier.wait()
        if stores[i].acquire_lease("acme", f"daemon-{i}", timedelta(minutes=5)):
            winners.append(f"daemon-{i}")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s in stores:
        s.close()
    assert len(winners) == 1


def test_runs_are_recorded(store: SqlStateStore) -> None:
    assert store.last_run("acme") is None
    store.start_run(RunRecord("run-1", "acme", started_at=T0))
    store.start_run(RunRecord("run-2", "acme", started_at=T0 + timedelta(hours=1)))
    store.finish_run("run-2", "partial", {"updated": 3, "failed": 1}, error="1 record failed")
    last = store.last_run("acme")
    assert last is not None and last.run_id == "run-2" and last.outcome == "partial"
    assert last.counts == {"updated": 3, "failed": 1} and last.finished_at is not None


def test_unreachable_database_is_retry_later() -> None:
    from connector.errors import RetryLater

    with pytest.raises(RetryLater, match="unreachable") as info:
        open_store("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(info.value)


def test_outbox_rows_are_marked_done_in_bulk(store: SqlStateStore) -> None:
    ids = [store.enqueue(entry(f"k{i}")).id for i in range(3)]
    store.mark_done_many([i for i in ids[:2] if i is not None])
    states = {e.idempotency_key: e.state for e in store.outbox_entries("acme")}
    assert states == {"k0": OutboxState.DONE, "k1": OutboxState.DONE, "k2": OutboxState.PENDING}


def test_old_done_entries_are_pruned_and_nothing_else(store: SqlStateStore) -> None:
    done, pending, waiting = (store.enqueue(entry(k)) for k in ("done", "pending", "waiting"))
    assert done.id is not None and waiting.id is not None
    store.mark_done(done.id)
    store.mark_waiting(waiting.id, "not-accepted-yet")
    assert store.prune_outbox("acme", datetime.now(UTC) - timedelta(days=1)) == 0  # not old enough
    assert store.prune_outbox("other", datetime.now(UTC) + timedelta(seconds=1)) == 0
    assert store.prune_outbox("acme", datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert sorted(e.idempotency_key for e in store.outbox_entries("acme")) == ["pending", "waiting"]
    _ = pending


def test_waiting_entries_are_released_by_key(store: SqlStateStore) -> None:
    waiting = store.enqueue(
        entry("wait:acme:r-1:stage-needs-accepted", state=OutboxState.WAITING, wait_reason="x")
    )
    store.enqueue(entry("k-pending"))
    store.complete_waiting(["wait:acme:r-1:stage-needs-accepted", "wait:acme:other:rule"])
    states = {e.idempotency_key: e.state for e in store.outbox_entries("acme")}
    assert states == {waiting.idempotency_key: OutboxState.DONE, "k-pending": OutboxState.PENDING}
    store.complete_waiting([])


def test_a_migration_that_stops_part_way_leaves_no_half_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite runs each migration in one real transaction (pysqlite emits no BEGIN before DDL by
    itself): a first start killed mid-migration once left tables without their revision, and every
    start after failed with "table audit already exists"."""
    from alembic.operations import Operations

    url = f"sqlite:///{tmp_path / 'state.db'}"
    real = Operations.create_table
    made: list[str] = []

    def create_then_die(self: Operations, name: str, *columns: Any, **kw: Any) -> Any:
        if len(made) == 3:
            raise KeyboardInterrupt("killed mid-migration")
        made.append(name)
        return real(self, name, *columns, **kw)

    monkeypatch.setattr(Operations, "create_table", create_then_die)
    with pytest.raises(KeyboardInterrupt):
        open_store(url)
    assert len(made) == 3
    with sqlite3.connect(tmp_path / "state.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == set(), tables  # rolled back whole: neither tables nor a revision
    monkeypatch.setattr(Operations, "create_table", real)
    store = open_store(url)  # the next start migrates from scratch
    try:
        assert store.schema_revision()[0] == store.schema_revision()[1]
    finally:
        store.close()


def test_opening_a_store_at_the_newest_revision_never_waits_for_the_write_lock(tmp_path: Path) -> None:
    """`cosell status` beside a running sync: a store already migrated is only read at open, so it
    does not queue behind the sync's write transaction (a migration takes BEGIN IMMEDIATE)."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    open_store(url).close()
    writer = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a sync's write transaction, held
    opened: list[SqlStateStore] = []
    try:
        opener = threading.Thread(target=lambda: opened.append(open_store(url)))
        opener.start()
        opener.join(timeout=10)  # a store that tried to migrate would wait out the 30 s busy timeout
        assert not opener.is_alive() and len(opened) == 1
        assert opened[0].schema_revision()[0] == opened[0].schema_revision()[1]
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        for store in opened:
            store.close()
