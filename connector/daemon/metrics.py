"""Prometheus metrics of the daemon, on a dedicated registry (never the global one: tests and the
sandbox build several daemons in one process, and the global registry refuses a second definition).

One finished run is recorded by :meth:`Metrics.record_run`; the state-store gauges (open conflicts,
open dead letters, outbox depth) are refreshed by :meth:`Metrics.record_store` after every run.
Label values are connection names, systems, operations, HTTP statuses and outcome words: bounded
sets, never record ids (an unbounded label would blow up the time-series count).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from connector.remote.calls import CallKey

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

#: Run durations span a targeted sync (under a second) to a full reconciliation of a large book (an hour).
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """Every metric the daemon exports; ``render()`` is the ``/metrics`` body."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        if process:  # CPU, memory, open fds, start time: what an operator checks first on a sick pod
            ProcessCollector(registry=r)
        self.runs = Counter(
            "cosell_runs",
            "Finished sync runs by connection, kind (incremental | full) and outcome (ok | partial | failed).",
            ("connection", "kind", "outcome"),
            registry=r,
        )
        self.run_duration = Histogram(
            "cosell_run_duration_seconds",
            "Wall time of one sync run.",
            ("connection", "kind"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.records = Counter(
            "cosell_records",
            "Records by what a run did with them (pc_created, crm_updated, unchanged, failed, blocked, ...).",
            ("connection", "outcome"),
            registry=r,
        )
        self.api_calls = Counter(
            "cosell_api_calls",
            "Remote API calls by system, operation and HTTP status ('error' for a transport failure).",
            ("connection", "system", "operation", "status"),
            registry=r,
        )
        self.conflicts = Gauge(
            "cosell_conflicts_open",
            "Conflicts waiting for a human (policy manual).",
            ("connection",),
            registry=r,
        )
        self.dead_letters = Gauge(
            "cosell_dead_letters_open",
            "Records isolated after failing, not yet resolved.",
            ("connection",),
            registry=r,
        )
        self.outbox_depth = Gauge(
            "cosell_outbox_depth", "Outbox entries not done, by state.", ("connection", "state"), registry=r
        )
        self.last_success = Gauge(
            "cosell_last_successful_run_timestamp_seconds",
            "When the last run that did not fail finished (Unix time, UTC).",
            ("connection",),
            registry=r,
        )
        self.consecutive_failures = Gauge(
            "cosell_connection_consecutive_failures",
            "Failed runs in a row; the connection backs off while this is above zero.",
            ("connection",),
            registry=r,
        )
        self.quota_used = Gauge(
            "cosell_api_quota_used",
            "The remote's own count of API calls used in its quota period (Salesforce Sforce-Limit-Info).",
            ("connection", "system"),
            registry=r,
        )
        self.quota_limit = Gauge(
            "cosell_api_quota_limit",
            "The remote's quota for the period (Salesforce daily API requests).",
            ("connection", "system"),
            registry=r,
        )
        # Webhook deliveries (connector.daemon.webhook). Both label sets are bounded: outcomes and
        # rejection reasons are fixed words, connections are configured names (never a record id).
        self.webhook_events = Counter(
            "cosell_webhook_events",
            "Verified Partner Center webhook events by connection and outcome "
            "(queued | duplicate: already queued | ignored: not a referral event | overflow | stopping).",
            ("connection", "outcome"),
            registry=r,
        )
        self.webhook_rejected = Counter(
            "cosell_webhook_rejected",
            "Webhook requests refused: unsigned, forged or malformed (reason is a fixed word).",
            ("reason",),
            registry=r,
        )
        self._outbox_states: dict[str, set[str]] = {}

    def declare(self, connection: str) -> None:
        """Create a connection's series at zero so dashboards and alerts see it before its first run."""
        for kind in ("incremental", "full"):
            for outcome in ("ok", "partial", "failed"):
                self.runs.labels(connection, kind, outcome)
        self.consecutive_failures.labels(connection).set(0)

    def record_run(
        self,
        connection: str,
        *,
        kind: str,
        outcome: str,
        duration: float,
        counts: Mapping[str, int] | None = None,
        calls: Mapping[CallKey, int] | None = None,
        finished_at: datetime | None = None,
        consecutive_failures: int = 0,
    ) -> None:
        """One finished run: its outcome and duration, its records by outcome (``RunReport.counts``),
        and its API calls (the run's ``CallCounter.snapshot()``, which counts from zero per run)."""
        self.runs.labels(connection, kind, outcome).inc()
        self.run_duration.labels(connection, kind).observe(max(0.0, duration))
        for what, n in (counts or {}).items():
            if n:
                self.records.labels(connection, what).inc(n)
        for key, n in (calls or {}).items():
            if n:
                self.api_calls.labels(connection, key.system, key.operation, key.status).inc(n)
        if outcome != "failed":
            self.last_success.labels(connection).set((finished_at or datetime.now(UTC)).timestamp())
        self.consecutive_failures.labels(connection).set(consecutive_failures)

    def record_store(
        self, connection: str, *, conflicts: int, dead_letters: int, outbox: Mapping[str, int]
    ) -> None:
        """The state store's view of a connection after a run."""
        self.conflicts.labels(connection).set(conflicts)
        self.dead_letters.labels(connection).set(dead_letters)
        # a state that emptied is absent from outbox_depth(); set it back to zero rather than leave
        # the last non-zero value standing
        seen = self._outbox_states.setdefault(connection, set())
        seen |= set(outbox)
        for state in seen:
            self.outbox_depth.labels(connection, state).set(outbox.get(state, 0))

    def record_quota(self, connection: str, system: str, used: int | None, limit: int | None) -> None:
        if used is not None:
            self.quota_used.labels(connection, system).set(used)
        if limit:
            self.quota_limit.labels(connection, system).set(limit)

    def render(self) -> bytes:
        return generate_latest(self.registry)
