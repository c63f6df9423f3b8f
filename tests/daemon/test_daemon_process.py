"""``cosell run`` as a subprocess against the twins: it syncs on its schedule, serves /healthz, /readyz
and /metrics, survives a Partner Center outage, and stops cleanly on SIGTERM with its state committed."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import pytest

from connector.partner_center.twin import PartnerCenterTwin
from connector.remote.twin import Fault, TwinRequest, TwinResponse
from connector.salesforce.twin import SalesforceTwin
from connector.state import open_store
from tests.daemon.conftest import CANARIES, Daemon, Setup
from tests.e2e.conftest import CONNECTION
from tests.e2e.test_sync import add_opportunity

StartDaemon = Callable[..., Daemon]
MakeSetup = Callable[..., Setup]
ACME = {"connection": CONNECTION}


def assert_no_canary(daemon: Daemon) -> None:
    out = daemon.output()
    for canary in CANARIES:
        assert canary not in out
    assert "eyJ" not in out  # no JWT (access/ID token) in any log line
    assert "@partner.example" not in out  # no user or contact e-mail address


def test_daemon_syncs_on_schedule_serves_health_survives_an_outage_and_stops_on_sigterm(
    make_setup: MakeSetup, start_daemon: StartDaemon, pc: PartnerCenterTwin, sf: SalesforceTwin
) -> None:
    setup = make_setup(full_reconcile=2)
    add_opportunity(sf, name="Contoso migration")
    daemon: Daemon = start_daemon(setup)

    # the first run happens at start and creates the referral
    daemon.wait_for(
        lambda: daemon.metric("cosell_records_total", outcome="pc_created", **ACME) >= 1, "first sync"
    )
    assert daemon.get("/healthz") == (200, "ok\n")
    status, ready = daemon.readyz()
    assert status == 200 and ready["status"] == "ready" and ready["store"] == "ok"
    assert ready["connections"][CONNECTION]["consecutive_failures"] == 0
    assert daemon.metric("cosell_runs_total", kind="incremental", outcome="ok", **ACME) >= 1
    assert daemon.metric("cosell_run_duration_seconds_count", kind="incremental", **ACME) >= 1
    assert (
        daemon.metric(
            "cosell_api_calls_total", system="partner-center", operation="create", status="200", **ACME
        )
        == 1
    )
    assert daemon.metric("cosell_last_successful_run_timestamp_seconds", **ACME) > 0
    assert daemon.metric("cosell_dead_letters_open", **ACME) == 0
    assert daemon.metric("cosell_conflicts_open", **ACME) == 0
    assert daemon.metric("cosell_connection_consecutive_failures", **ACME) == 0

    # on schedule, without a restart: a new opportunity is picked up by a later run
    add_opportunity(sf, name="Fabrikam expansion")
    daemon.wait_for(
        lambda: daemon.metric("cosell_records_total", outcome="pc_created", **ACME) >= 2, "the scheduled sync"
    )

    # Partner Center goes down: runs fail, the connection backs off and says so, the process lives on
    outage = Fault(TwinResponse(503, {"error": "service unavailable"}), times=10**6)
    with pc.faults(outage):
        daemon.wait_for(
            lambda: daemon.metric("cosell_runs_total", outcome="failed", **ACME) >= 1,
            "a failed run",
            timeout=30,
        )
        status, ready = daemon.readyz()
        conn = ready["connections"][CONNECTION]
        assert status == 200  # one failing connection does not make the daemon unready
        assert conn["consecutive_failures"] >= 1 and "RetryLater" in (conn["last_error"] or "")
        assert conn["last_run"]["outcome"] in ("failed", "running")  # the next attempt may have begun
        assert daemon.metric("cosell_api_calls_total", system="partner-center", status="503", **ACME) >= 1
        assert daemon.get("/healthz")[0] == 200
        ok_before = daemon.metric("cosell_runs_total", outcome="ok", **ACME)
    # ... and comes back: the next run succeeds and the back-off resets
    daemon.wait_for(
        lambda: daemon.metric("cosell_runs_total", outcome="ok", **ACME) > ok_before, "recovery", timeout=30
    )
    daemon.wait_for(
        lambda: daemon.readyz()[1]["connections"][CONNECTION]["consecutive_failures"] == 0, "back-off reset"
    )
    # the slower full reconciliation ran on its own schedule, between the incremental runs
    daemon.wait_for(
        lambda: daemon.metric("cosell_runs_total", kind="full", outcome="ok", **ACME) >= 1, "a full run"
    )
    assert any(e.get("event") == "run.start" and e.get("full") is True for e in daemon.events())
    failed_events = [e for e in daemon.events() if e.get("event") == "daemon.run_failed"]
    assert failed_events and all(e["connection"] == CONNECTION for e in failed_events)
    assert "retry_in_seconds" in failed_events[0] and failed_events[0]["error_type"] == "RetryLater"

    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert daemon.event("daemon.stopping") is not None and daemon.event("daemon.stopped") is not None
    store = open_store(setup.settings.state_url, migrate=False)
    try:
        last = store.last_run(CONNECTION)
        assert last is not None and last.outcome == "ok" and last.finished_at is not None
        assert store.lease_holder(CONNECTION) is None  # released: a restart syncs at once
    finally:
        store.close()
    assert_no_canary(daemon)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_lets_the_run_in_flight_finish_and_commit(
    signum: signal.Signals, setup: Setup, start_daemon: StartDaemon, pc: PartnerCenterTwin, sf: SalesforceTwin
) -> None:
    add_opportunity(sf)
    in_flight, release = threading.Event(), threading.Event()

    def hold_first_listing(request: TwinRequest) -> bool:
        # holds the first Partner Center listing of the first run until the test has sent SIGTERM
        if request.method == "GET" and not in_flight.is_set():
            in_flight.set()
            release.wait(20)
        return False  # never answers with a fault, only delays

    with pc.faults(Fault(TwinResponse(500), times=1, match=hold_first_listing)):
        daemon: Daemon = start_daemon(setup, "--grace", "20")
        daemon.wait_for(in_flight.is_set, "a run in flight")
        daemon.proc.send_signal(signum)
        daemon.wait_for(lambda: daemon.event("daemon.stopping"), "the daemon to take the signal")
        release.set()
        assert daemon.proc.wait(30) == 0

    events = [e.get("event") for e in daemon.events()]
    # the run started before the signal ended after it, and the daemon waited for it
    assert events.index("daemon.stopping") < events.index("run.end") < events.index("daemon.stopped")
    assert "daemon.stop_timeout" not in events
    assert pc.count_writes() == 1  # the referral was created by the run that finished
    store = open_store(setup.settings.state_url, migrate=False)
    try:
        last = store.last_run(CONNECTION)
        assert last is not None and last.outcome == "ok" and last.counts.get("pc_created") == 1
        assert store.lease_holder(CONNECTION) is None
        assert store.count_links(CONNECTION)  # the link (the new merge base) is committed
    finally:
        store.close()
    assert_no_canary(daemon)


def test_a_run_still_in_flight_after_the_grace_period_is_abandoned_safely_and_the_next_start_resumes(
    setup: Setup, start_daemon: StartDaemon, pc: PartnerCenterTwin, sf: SalesforceTwin
) -> None:
    add_opportunity(sf)
    in_flight, release = threading.Event(), threading.Event()

    def hold_first_request(request: TwinRequest) -> bool:
        if not in_flight.is_set():
            in_flight.set()
            release.wait(20)
        return False

    with pc.faults(Fault(TwinResponse(500), times=1, match=hold_first_request)):
        daemon = start_daemon(setup, "--grace", "0.5")
        daemon.wait_for(in_flight.is_set, "a run in flight")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0  # bounded: it did not wait for the held request
        release.set()
    events = [e.get("event") for e in daemon.events()]
    assert "daemon.stop_timeout" in events and "daemon.exit_with_run_in_flight" in events
    assert "run.end" not in events
    store = open_store(setup.settings.state_url, migrate=False)
    try:
        assert store.lease_holder(CONNECTION) is None  # released, so the next start need not wait
    finally:
        store.close()

    again = start_daemon(setup)
    again.wait_for(
        lambda: again.metric("cosell_records_total", outcome="pc_created", **ACME) >= 1, "resumed sync"
    )
    again.proc.send_signal(signal.SIGTERM)
    assert again.proc.wait(30) == 0
    assert pc.count_writes() == 1
    assert_no_canary(daemon)
    assert_no_canary(again)
