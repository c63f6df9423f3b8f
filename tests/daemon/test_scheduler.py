"""The scheduler in-process, with the run itself replaced (the subprocess tests drive the real one):
triggers, back-off of a failing connection while the others keep their pace, no overlap of a
connection's two jobs, bounded stop."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from connector.daemon import scheduler as scheduler_module
from connector.daemon.metrics import Metrics
from connector.daemon.scheduler import Daemon, backoff_delay, build_trigger
from connector.errors import ConfigError, RateLimited, RetryLater, SignInRequired
from connector.remote.calls import CallCounter
from connector.settings import Schedule, Settings, load_settings
from connector.state import SqlStateStore, open_store
from connector.sync.engine import RunReport

CONFIG = """
connections:
  good:
    crm: {kind: dynamics, base_url: https://good.crm.dynamics.com, auth: {tenant_id: t, client_id: c}}
    partner_center: {authority: https://login.microsoftonline.com/t, auth: {client_id: c}}
    mappings: [builtin:dynamics-default.yaml]
    schedule: {interval: 60, jitter: 0}
  bad:
    crm: {kind: dynamics, base_url: https://bad.crm.dynamics.com, auth: {tenant_id: t, client_id: c}}
    partner_center: {authority: https://login.microsoftonline.com/t, auth: {client_id: c}}
    mappings: [builtin:dynamics-default.yaml]
    schedule: {cron: "*/5 * * * *", jitter: 5}
  paused:
    crm: {kind: dynamics, base_url: https://paused.crm.dynamics.com, auth: {tenant_id: t, client_id: c}}
    partner_center: {authority: https://login.microsoftonline.com/t, auth: {client_id: c}}
    mappings: [builtin:dynamics-default.yaml]
    enabled: false
"""


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Runs:
    """What each connection's run does: return counts, raise, or block until released."""

    def __init__(self) -> None:
        self.raises: dict[str, BaseException | None] = {}
        self.block: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self.calls: list[tuple[str, bool]] = []

    @contextmanager
    def context(
        self,
        settings: Settings,
        name: str,
        store: Any,
        *,
        policy: Any = None,
        holder: str | None = None,
        keep: Any = None,
    ) -> Iterator[Any]:
        calls = CallCounter()
        runs = self

        class Engine:
            crm = object()

            def run(self, *, full: bool = False) -> RunReport:
                runs.calls.append((name, full))
                calls.record("partner-center", "changes", 200 if name == "good" else 503)
                if name in runs.entered:
                    runs.entered[name].set()
                if name in runs.block:
                    runs.block[name].wait(10)
                error = runs.raises.get(name)
                if error is not None:
                    raise error
                return RunReport(name, "run-1", "corr-1", False, counts=Counter(pc_updated=2, unchanged=3))

        yield SimpleNamespace(engine=Engine(), calls=calls)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    path = tmp_path / "cosell.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    return load_settings(path)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStateStore]:
    s = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> Runs:
    r = Runs()
    monkeypatch.setattr(scheduler_module, "run_context", r.context)
    return r


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def daemon(settings: Settings, store: SqlStateStore, runs: Runs, clock: FakeClock) -> Daemon:
    return Daemon(settings, store, metrics=Metrics(process=False), clock=clock)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(
        s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.name == name and want <= set(s.labels.items())
    )


def test_triggers_are_utc_with_jitter_interval_or_cron() -> None:
    interval = build_trigger(Schedule(interval=timedelta(minutes=10), jitter=timedelta(seconds=30)))
    assert isinstance(interval, IntervalTrigger)
    assert interval.interval == timedelta(minutes=10) and interval.jitter == 30
    assert str(interval.timezone) == "UTC"
    cron = build_trigger(Schedule(cron="15 2 * * 1-5", jitter=timedelta(seconds=0)))
    assert isinstance(cron, CronTrigger) and str(cron.timezone) == "UTC" and cron.jitter is None
    fire = cron.get_next_fire_time(None, datetime(2026, 3, 2, 9, 0, tzinfo=UTC))  # a Monday
    assert fire is not None and fire.utcoffset() == timedelta(0)
    assert (fire.day, fire.hour, fire.minute) == (3, 2, 15)


def test_backoff_doubles_from_the_normal_pace_up_to_the_cap_and_honours_retry_after() -> None:
    base, cap = timedelta(minutes=1), timedelta(minutes=30)
    assert [backoff_delay(base, n, cap) for n in (0, 1, 2, 3, 4)] == [0, 60, 120, 240, 480]
    assert backoff_delay(base, 50, cap) == 1800
    assert backoff_delay(base, 1, cap, retry_after=900) == 900
    assert backoff_delay(timedelta(hours=2), 3, cap) == 7200  # the cap never undercuts the interval


def test_only_enabled_connections_run_and_an_unknown_one_is_refused(
    settings: Settings, store: SqlStateStore, runs: Runs
) -> None:
    assert Daemon(settings, store, metrics=Metrics(process=False)).names == ["bad", "good"]
    with pytest.raises(ConfigError, match="unknown connection"):
        Daemon(settings, store, connections=["nope"], metrics=Metrics(process=False))


def test_a_failing_connection_backs_off_and_reports_while_the_other_keeps_running(
    daemon: Daemon, runs: Runs, clock: FakeClock
) -> None:
    runs.raises["bad"] = RetryLater("partner-center changes: HTTP 503", system="partner-center")
    with capture_logs() as logs:
        assert daemon.run_connection("bad", "incremental") == "failed"
    failed = [e for e in logs if e["event"] == "daemon.run_failed"]
    assert failed[0]["connection"] == "bad" and failed[0]["retry_in_seconds"] == 60.0
    assert "backs off" in failed[0]["action"]

    # the failing connection skips its ticks until the back-off has passed; the other one runs
    assert daemon.run_connection("bad", "incremental") == "skipped:backoff"
    assert daemon.run_connection("good", "incremental") == "ok"
    clock.advance(30)
    assert daemon.run_connection("bad", "incremental") == "skipped:backoff"
    assert daemon.run_connection("good", "incremental") == "ok"
    clock.advance(30)
    assert daemon.run_connection("bad", "full") == "failed"  # second failure: the delay doubles
    status = daemon.status()["bad"]
    assert status["consecutive_failures"] == 2 and "HTTP 503" in status["last_error"]
    assert status["backing_off_until"] is not None and status["last_outcome"] == "failed"
    clock.advance(60)
    assert daemon.run_connection("bad", "incremental") == "skipped:backoff"
    clock.advance(60)
    runs.raises["bad"] = None  # the remote is back
    assert daemon.run_connection("bad", "incremental") == "ok"
    assert daemon.status()["bad"]["consecutive_failures"] == 0
    assert daemon.status()["bad"]["backing_off_until"] is None
    assert runs.calls.count(("bad", False)) == 2 and runs.calls.count(("bad", True)) == 1
    assert runs.calls.count(("good", False)) == 2

    m = daemon.metrics
    assert sample(m, "cosell_runs_total", connection="bad", kind="incremental", outcome="failed") == 1
    assert sample(m, "cosell_runs_total", connection="bad", kind="full", outcome="failed") == 1
    assert sample(m, "cosell_runs_total", connection="bad", outcome="ok") == 1
    assert sample(m, "cosell_runs_total", connection="good", outcome="ok") == 2
    # calls of failed runs count too: the 503s are what an operator looks for
    assert sample(m, "cosell_api_calls_total", connection="bad", status="503") == 3
    assert sample(m, "cosell_records_total", connection="good", outcome="pc_updated") == 4
    assert sample(m, "cosell_connection_consecutive_failures", connection="bad") == 0
    assert sample(m, "cosell_last_successful_run_timestamp_seconds", connection="bad") > 0


def test_retry_after_sign_in_and_config_failures_back_off_too(
    daemon: Daemon, runs: Runs, clock: FakeClock
) -> None:
    runs.raises["bad"] = RateLimited("slow down", system="salesforce", retry_after=600)
    assert daemon.run_connection("bad", "incremental") == "failed"
    clock.advance(300)
    assert daemon.run_connection("bad", "incremental") == "skipped:backoff"
    clock.advance(300)
    runs.raises["bad"] = SignInRequired("the Partner Center sign-in for connection bad has expired")
    with capture_logs() as logs:
        assert daemon.run_connection("bad", "incremental") == "failed"
    assert "cosell auth login" in next(e for e in logs if e["event"] == "daemon.run_failed")["action"]
    clock.advance(3600)
    runs.raises["bad"] = ValueError("a bug")
    with capture_logs() as logs:
        assert daemon.run_connection("bad", "incremental") == "failed"  # contained, not raised
    assert any(e["event"] == "daemon.run_crashed" for e in logs)
    assert daemon.status()["bad"]["consecutive_failures"] == 3


def test_a_connections_full_and_incremental_runs_never_overlap(daemon: Daemon, runs: Runs) -> None:
    runs.block["good"], runs.entered["good"] = threading.Event(), threading.Event()
    results: list[str] = []
    full = threading.Thread(target=lambda: results.append(daemon.run_connection("good", "full")))
    full.start()
    assert runs.entered["good"].wait(5)
    assert daemon.status()["good"]["running"] == "full"
    assert daemon.run_connection("good", "incremental") == "skipped:busy"
    assert daemon.run_connection("bad", "incremental") == "ok"  # other connections are not held up
    runs.block["good"].set()
    full.join(5)
    assert results == ["ok"]
    assert runs.calls.count(("good", False)) == 0


def test_stop_waits_for_the_run_in_flight_within_the_grace_period(daemon: Daemon, runs: Runs) -> None:
    runs.block["good"], runs.entered["good"] = threading.Event(), threading.Event()
    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(daemon.run_connection("good", "incremental")))
    worker.start()
    assert runs.entered["good"].wait(5)
    threading.Timer(0.2, runs.block["good"].set).start()
    assert daemon.stop(grace=10) is True  # returned once the run finished, well inside the grace
    worker.join(5)
    assert results == ["ok"]
    assert daemon.run_connection("good", "incremental") == "skipped:stopping"


def test_stop_gives_up_after_the_grace_period(settings: Settings, store: SqlStateStore, runs: Runs) -> None:
    daemon = Daemon(settings, store, metrics=Metrics(process=False))
    runs.block["good"], runs.entered["good"] = threading.Event(), threading.Event()
    worker = threading.Thread(target=daemon.run_connection, args=("good", "incremental"))
    worker.start()
    assert runs.entered["good"].wait(5)
    with capture_logs() as logs:
        assert daemon.stop(grace=0.1) is False
    assert any(e["event"] == "daemon.stop_timeout" and e["running"] == ["good:incremental"] for e in logs)
    runs.block["good"].set()
    worker.join(5)


def test_start_schedules_two_jobs_per_connection_and_runs_interval_connections_at_once(
    daemon: Daemon, runs: Runs
) -> None:
    runs.entered["good"] = threading.Event()
    daemon.start()
    try:
        jobs = {job.id: job for job in daemon.scheduler.get_jobs()}
        assert set(jobs) == {"good:incremental", "good:full", "bad:incremental", "bad:full"}
        for job in jobs.values():
            assert job.max_instances == 1 and job.coalesce is True
        assert isinstance(jobs["bad:incremental"].trigger, CronTrigger)
        assert jobs["bad:incremental"].trigger.jitter == 5
        full = jobs["good:full"].trigger
        assert isinstance(full, IntervalTrigger) and full.interval == timedelta(days=1)
        assert runs.entered["good"].wait(5)  # the interval connection synced right at start
    finally:
        assert daemon.stop(grace=5)
    assert ("bad", False) not in runs.calls  # the cron connection waits for its hour
