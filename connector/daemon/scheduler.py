"""The scheduler behind ``cosell run``: every enabled connection on its own schedule.

Per connection, two APScheduler 3.x jobs (``max_instances=1``, ``coalesce=True``, timezone UTC set
explicitly because APScheduler 3 defaults to the host's local zone, crm-apis.md §E):

- ``<name>:incremental`` on ``schedule.interval`` (with ``schedule.jitter``) or ``schedule.cron``;
  an interval schedule also runs once right at start;
- ``<name>:full`` every ``schedule.full_reconcile``: ``engine.run(full=True)``, which ignores the
  cursors and compares everything.

The two jobs of one connection never overlap (a per-connection lock; the engine's run lease would
refuse the second anyway, but as an error): an incremental tick that finds the connection busy is
skipped, a full run waits for the incremental one to finish.

A run that fails as a whole (remote down, sign-in revoked, bad mapping) is logged, counted and
reported on ``/readyz``; the connection then backs off: after ``n`` failures in a row its ticks are
skipped until ``base * 2**(n-1)`` (capped) has passed since the failed run started, where ``base`` is
the interval (one minute for cron schedules). The other connections keep their own pace. A run that
finishes, even with failed records, resets the back-off: record failures are the engine's business
(dead letters), not the schedule's.

A verified Partner Center webhook event (connector.daemon.webhook) asks for a targeted sync of one
referral (:meth:`Daemon.request_referral_sync`): the referral id joins the connection's queue (a
referral already queued is not queued twice) and one ``<name>:referrals`` job drains the queue, one
``engine.run(referral_id=...)`` at a time, each waiting its turn on the connection's lock like a full
run. A queued referral is dropped on stop, in back-off or past :data:`MAX_QUEUED_REFERRALS`: webhooks
are hints, the scheduled poll is the backstop.

Stopping (:meth:`Daemon.stop`) takes no new work, waits a bounded time for runs in flight (the engine
commits page by page and releases its lease when it returns), then shuts the scheduler down.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from connector.daemon.metrics import Metrics
from connector.errors import ConfigError, RetryLater
from connector.remote.calls import CallCounter
from connector.remote.retry import RetryPolicy
from connector.settings import Schedule, Settings
from connector.state import StateStore
from connector.sync.factory import ConnectionClients, run_context

__all__ = ["DAEMON_RETRY_POLICY", "ConnectionStatus", "Daemon", "build_trigger", "connection_names"]

log = structlog.get_logger(__name__)

Kind = Literal["incremental", "full", "referral"]

#: Inside the daemon the schedule is the outer retry loop, so one call retries only enough to ride out
#: a blip; a longer outage fails the run quickly and the connection backs off instead of holding a
#: worker thread (and the run lease) through minutes of sleeping.
DAEMON_RETRY_POLICY = RetryPolicy(max_attempts=3, initial_wait=0.5, max_wait=30.0, max_total_wait=90.0)

#: The back-off base for cron schedules, which have no interval to double.
CRON_BACKOFF_BASE = timedelta(minutes=1)
#: A gated tick may fire a little before the back-off has passed (the trigger's own timing, jitter);
#: that much early is still on time.
GATE_SLACK = 0.1
#: Webhook-triggered referrals waiting per connection; beyond it an event is dropped (the poll sees
#: the change anyway), so a flood of events cannot grow memory or the run queue without bound.
MAX_QUEUED_REFERRALS = 1000


def build_trigger(schedule: Schedule) -> IntervalTrigger | CronTrigger:
    """The incremental job's trigger for a connection's schedule."""
    jitter = schedule.jitter.total_seconds() or None
    if schedule.cron:
        trigger = CronTrigger.from_crontab(schedule.cron, timezone="UTC")
        # from_crontab takes no jitter argument; the attribute is what get_next_fire_time reads
        trigger.jitter = jitter
        return trigger
    interval = schedule.interval or timedelta(minutes=10)
    return IntervalTrigger(seconds=interval.total_seconds(), jitter=jitter, timezone="UTC")


def backoff_base(schedule: Schedule) -> timedelta:
    if schedule.cron or not schedule.interval:
        return CRON_BACKOFF_BASE
    return schedule.interval


def backoff_delay(base: timedelta, failures: int, cap: timedelta, retry_after: float | None = None) -> float:
    """Seconds to wait after ``failures`` failed runs in a row: the normal pace after the first, then
    doubling, never above ``cap`` (but never below what the remote asked for with Retry-After)."""
    if failures <= 0:
        return 0.0
    delay: float = min(base.total_seconds() * 2.0 ** (failures - 1), max(cap, base).total_seconds())
    return max(delay, retry_after or 0.0)


@dataclass
class ConnectionStatus:
    """What the daemon knows about one connection beyond the state store (for ``/readyz``)."""

    name: str
    base: timedelta
    running: Kind | None = None
    consecutive_failures: int = 0
    last_error: str = ""
    last_error_at: datetime | None = None
    last_outcome: str | None = None
    last_finished_at: datetime | None = None
    retry_not_before: datetime | None = None  # wall clock, for people
    not_before: float = 0.0  # the daemon's clock, for the gate
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat(timespec="seconds") if value else None

        return {
            "running": self.running,
            "consecutive_failures": self.consecutive_failures,
            "last_outcome": self.last_outcome,
            "last_finished_at": iso(self.last_finished_at),
            "last_error": self.last_error or None,
            "last_error_at": iso(self.last_error_at),
            "backing_off_until": iso(self.retry_not_before) if self.consecutive_failures else None,
        }


def connection_names(settings: Settings, connections: Iterable[str] | None = None) -> list[str]:
    """The connections to run: those named, else every enabled one. Raises ConfigError for an
    unknown name or when there is nothing to run (checked before the state store is opened)."""
    names = list(connections or ()) or sorted(n for n, c in settings.connections.items() if c.enabled)
    if not names:
        raise ConfigError("no enabled connections configured: nothing to run")
    for name in names:
        settings.connection(name)
    return names


def default_holder() -> str:
    """The run-lease holder name: which host and process holds a connection, for `lease_holder`."""
    return f"cosell-run-{socket.gethostname()}-{os.getpid()}"


class Daemon:
    """Runs the connections on their schedules until :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        *,
        connections: Iterable[str] | None = None,
        metrics: Metrics | None = None,
        policy: RetryPolicy | None = DAEMON_RETRY_POLICY,
        holder: str | None = None,
        max_backoff: timedelta = timedelta(minutes=30),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.names = names = connection_names(settings, connections)
        self.metrics = metrics or Metrics()
        self.policy = policy
        self.holder = holder or default_holder()
        self.max_backoff = max_backoff
        self._clock = clock
        self._status = {n: ConnectionStatus(n, backoff_base(settings.connection(n).schedule)) for n in names}
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._inflight = 0
        self._idle = threading.Condition()
        # webhook-triggered referrals per connection (a dict as an insertion-ordered set), and the
        # connections whose drain job is scheduled or running
        self._queued: dict[str, dict[str, None]] = {n: {} for n in names}
        self._draining: set[str] = set()
        self._queue_lock = threading.Lock()
        # Each connection's clients live across its runs (one run at a time per connection), so an
        # idle run pays one read call per system, not a sign-in and the CRM's metadata every time.
        self._clients: dict[str, ConnectionClients] = {}
        self.scheduler = BackgroundScheduler(
            timezone="UTC",
            executors={"default": ThreadPoolExecutor(max_workers=2 * len(names) + 1)},
            # misfire_grace_time None: a tick that fires late (busy host, suspended VM) still runs,
            # coalesced to one run; APScheduler's default of 1 s would silently drop it.
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
        )

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        now = datetime.now(UTC)
        for name in self.names:
            schedule = self.settings.connection(name).schedule
            self.metrics.declare(name)
            self._refresh_store_metrics(name)
            self.scheduler.add_job(
                self.run_connection,
                build_trigger(schedule),
                args=(name, "incremental"),
                id=f"{name}:incremental",
                name=f"{name} incremental sync",
                # an interval schedule syncs at start; a cron schedule keeps to its hours (it is
                # usually chosen to spare the API quota)
                next_run_time=None if schedule.cron else now,
            )
            self.scheduler.add_job(
                self.run_connection,
                IntervalTrigger(
                    seconds=schedule.full_reconcile.total_seconds(),
                    jitter=schedule.jitter.total_seconds() or None,
                    timezone="UTC",
                ),
                args=(name, "full"),
                id=f"{name}:full",
                name=f"{name} full reconciliation",
            )
        self.scheduler.start()
        log.info(
            "daemon.start",
            connections=self.names,
            holder=self.holder,
            schedules={n: _describe(self.settings.connection(n).schedule) for n in self.names},
        )

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, grace: float = 20.0) -> bool:
        """Take no new work, wait up to ``grace`` seconds for the runs in flight, shut down.

        Returns False when runs were still in flight after ``grace`` (the caller exits anyway: the
        engine's per-page commits and outbox make an interrupted run lose nothing)."""
        self._stopping.set()
        if self.scheduler.running:
            self.scheduler.pause()  # no new submissions; jobs already running continue
        deadline = self._clock() + grace
        with self._idle:
            while self._inflight and not self._abort.is_set():
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._idle.wait(min(left, 0.5))
            clean = self._inflight == 0
        if self.scheduler.running:
            # wait=False: our own bounded wait above replaced APScheduler's unbounded one
            self.scheduler.shutdown(wait=False)
        if clean:
            for name in list(self._clients):
                self._drop_clients(name)
            log.info("daemon.stopped")
        else:
            log.warning("daemon.stop_timeout", grace_seconds=grace, running=self.running())
        return clean

    def abort(self) -> None:
        """Stop waiting for the runs in flight (a second SIGTERM/SIGINT while stopping). Only sets a
        flag: it runs in a signal handler, and stop() waits in short slices."""
        self._abort.set()

    def running(self) -> list[str]:
        return [f"{s.name}:{s.running}" for s in self._status.values() if s.running]

    def release_leases(self) -> None:
        """Give up this process's run leases (used when exiting with a run still in flight, so the
        next start does not wait out the lease's time to live)."""
        for name in self.names:
            with contextlib.suppress(RetryLater):  # store unreachable: the lease expires by itself
                self.store.release_lease(name, self.holder)

    # --- status -----------------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        return {n: s.as_dict() for n, s in self._status.items()}

    # --- the job ----------------------------------------------------------------------------------

    def run_connection(self, name: str, kind: Kind, referral_id: str | None = None) -> str:
        """One scheduled run of ``name`` (``kind`` referral: a targeted sync of ``referral_id``);
        returns the outcome, or why it was skipped."""
        status = self._status[name]
        if self._stopping.is_set():
            return "skipped:stopping"
        if status.consecutive_failures and self._clock() < status.not_before:
            log.debug("daemon.run_skipped", connection=name, kind=kind, reason="backing off")
            return "skipped:backoff"
        if not self._acquire(status, kind):
            return "skipped:busy"
        with self._idle:
            self._inflight += 1
        try:
            if self._stopping.is_set():  # the stop came while we waited for the lock
                return "skipped:stopping"
            status.running = kind
            # every line logged during the run (adapters, sign-in) carries the connection and kind
            with structlog.contextvars.bound_contextvars(connection=name, kind=kind):
                return self._execute(status, kind, referral_id)
        finally:
            status.running = None
            status.lock.release()
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _acquire(self, status: ConnectionStatus, kind: Kind) -> bool:
        if kind == "incremental":
            # busy = a full reconciliation is running, which covers everything this tick would do
            if status.lock.acquire(blocking=False):
                return True
            log.info(
                "daemon.run_skipped",
                connection=status.name,
                kind=kind,
                reason=f"{status.running} run in progress",
            )
            return False
        # a full run is rare: wait for the incremental run to finish rather than lose a day; a
        # targeted run waits too, because the run in progress may have read the referral before the
        # change its webhook announced
        while not self._stopping.is_set():
            if status.lock.acquire(timeout=0.5):
                return True
        return False

    def _execute(self, status: ConnectionStatus, kind: Kind, referral_id: str | None = None) -> str:
        name = status.name
        started = self._clock()
        calls: CallCounter | None = None
        counts: dict[str, int] | None = None
        error: BaseException | None = None
        outcome = "failed"
        try:
            with run_context(
                self.settings, name, self.store, policy=self.policy, holder=self.holder, keep=self._clients
            ) as ctx:
                calls = ctx.calls
                try:
                    if referral_id is not None:
                        report = ctx.engine.run(referral_id=referral_id)
                    else:
                        report = ctx.engine.run(full=kind == "full")
                finally:
                    self._record_quota(name, ctx.engine.crm)
            outcome, counts = report.outcome, dict(report.counts)
        except (RetryLater, ConfigError) as exc:  # SignInRequired is a ConfigError
            error = exc
        except Exception as exc:  # a bug in one connection must not stop the others
            error = exc
            log.exception("daemon.run_crashed", connection=name, kind=kind)
        duration = self._clock() - started
        finished = datetime.now(UTC)
        if error is None:
            status.consecutive_failures = 0
            status.last_error = ""
            status.not_before = 0.0
            status.retry_not_before = None
        else:
            # a failed run starts the next one from fresh clients: a new sign-in, re-read metadata
            self._drop_clients(name)
            status.consecutive_failures += 1
            delay = backoff_delay(
                status.base,
                status.consecutive_failures,
                self.max_backoff,
                error.retry_after if isinstance(error, RetryLater) else None,
            )
            status.not_before = started + delay * (1 - GATE_SLACK)
            status.retry_not_before = finished + timedelta(seconds=max(0.0, delay - duration))
            status.last_error = f"{type(error).__name__}: {error}"[:500]
            status.last_error_at = finished
            log.warning(
                "daemon.run_failed",
                connection=name,
                kind=kind,
                error_type=type(error).__name__,
                error=str(error)[:500],
                action=_action(error),
                consecutive_failures=status.consecutive_failures,
                retry_in_seconds=round(delay, 1),
            )
        status.last_outcome = outcome
        status.last_finished_at = finished
        self.metrics.record_run(
            name,
            kind=kind,
            outcome=outcome,
            duration=duration,
            counts=counts,
            calls=calls.snapshot() if calls else None,
            finished_at=finished,
            consecutive_failures=status.consecutive_failures,
        )
        self._refresh_store_metrics(name)
        return outcome

    def _drop_clients(self, name: str) -> None:
        clients = self._clients.pop(name, None)
        if clients is not None:
            try:
                clients.close()
            except Exception:  # closing a broken connection must not hide the run's own error
                log.warning("daemon.clients_close_failed", connection=name, exc_info=True)

    # --- webhook-triggered targeted syncs ---------------------------------------------------------

    def request_referral_sync(self, name: str, referral_id: str) -> str:
        """Queue a targeted sync of ``referral_id`` on connection ``name`` (a webhook's trigger).

        Returns ``queued``, ``duplicate`` (already waiting: one sync will see the latest state),
        ``overflow`` (queue full; the poll covers it) or ``stopping``. Never blocks on a run."""
        if name not in self._queued:
            raise KeyError(name)
        if self._stopping.is_set():
            return "stopping"
        with self._queue_lock:
            queue = self._queued[name]
            if referral_id in queue:
                return "duplicate"
            if len(queue) >= MAX_QUEUED_REFERRALS:
                log.warning("daemon.referral_queue_full", connection=name, queued=len(queue))
                return "overflow"
            queue[referral_id] = None
            if name in self._draining:
                return "queued"
            self._draining.add(name)
        self.scheduler.add_job(
            self._drain_referrals,
            "date",
            run_date=datetime.now(UTC),
            args=(name,),
            name=f"{name} webhook-triggered referral syncs",
        )
        return "queued"

    def queued_referrals(self, name: str) -> list[str]:
        with self._queue_lock:
            return list(self._queued.get(name, {}))

    def _drain_referrals(self, name: str) -> None:
        """The ``<name>:referrals`` job: targeted runs until the connection's queue is empty."""
        finished = False
        try:
            while not self._stopping.is_set():
                with self._queue_lock:
                    queue = self._queued[name]
                    if not queue:
                        self._draining.discard(name)
                        finished = True
                        return
                    # taken off the queue before the run: an event arriving during the run queues a
                    # new one, since this run may already have read the referral
                    referral_id = next(iter(queue))
                    del queue[referral_id]
                outcome = self.run_connection(name, "referral", referral_id)
                if outcome.startswith("skipped"):
                    log.info(
                        "daemon.referral_sync_skipped",
                        connection=name,
                        referral_id=referral_id,
                        reason=outcome.removeprefix("skipped:"),
                    )
        finally:
            if not finished:  # stopping, or a crash: let a later event schedule a new drain job
                with self._queue_lock:
                    dropped = len(self._queued[name])
                    self._queued[name].clear()
                    self._draining.discard(name)
                if dropped:
                    log.info("daemon.referral_syncs_dropped", connection=name, count=dropped)

    def _record_quota(self, name: str, crm: object) -> None:
        budget = getattr(crm, "budget", None)  # only the Salesforce adapter reports its org's quota
        if budget is not None:
            self.metrics.record_quota(
                name, "salesforce", getattr(budget, "used", None), getattr(budget, "total", None)
            )

    def _refresh_store_metrics(self, name: str) -> None:
        try:
            self.metrics.record_store(
                name,
                conflicts=len(self.store.conflicts(name)),
                dead_letters=len(self.store.dead_letters(name)),
                outbox=self.store.outbox_depth(name),
            )
        except RetryLater as exc:
            log.warning("daemon.store_unreachable", connection=name, error=str(exc)[:500])


def _action(error: BaseException) -> str:
    """What an operator should do, in words, for the run-level failure families."""
    from connector.errors import SignInRequired

    if isinstance(error, SignInRequired):
        return "sign in again (cosell auth login --connection NAME); the connection retries on its own"
    if isinstance(error, ConfigError):
        return "fix the configuration or mapping (cosell doctor); the connection retries on its own"
    if isinstance(error, RetryLater):
        return "none: a remote or the state store is unavailable; the connection backs off and retries"
    return "report a bug with this log line; the connection backs off and retries"


def _describe(schedule: Schedule) -> str:
    every = f"cron '{schedule.cron}'" if schedule.cron else f"every {schedule.interval}"
    return f"{every}, jitter {schedule.jitter}, full reconciliation every {schedule.full_reconcile}"
