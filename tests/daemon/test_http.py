"""The health/metrics server and the metrics in-process: answers, status codes, redaction, metric names."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from connector.daemon.http import HealthServer
from connector.daemon.metrics import Metrics
from connector.remote.calls import CallKey
from connector.state import RunRecord, SqlStateStore, open_store


def get(server: HealthServer, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStateStore]:
    s = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


def test_healthz_readyz_metrics_and_404(store: SqlStateStore) -> None:
    store.start_run(RunRecord("r1", "acme", started_at=datetime(2026, 3, 2, 9, 0, tzinfo=UTC)))
    store.finish_run("r1", "partial", {"failed": 1}, "")
    metrics = Metrics()
    metrics.declare("acme")
    status = {"acme": {"consecutive_failures": 0, "last_error": None}}
    with HealthServer(
        "127.0.0.1", 0, store=store, metrics=metrics, connections=["acme", "beta"], status=lambda: status
    ) as server:
        assert get(server, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
        code, ctype, body = get(server, "/readyz")
        assert code == 200 and ctype == "application/json"
        ready = json.loads(body)
        assert ready["status"] == "ready" and ready["store"] == "ok"
        assert ready["connections"]["acme"]["last_run"]["outcome"] == "partial"
        assert ready["connections"]["acme"]["last_run"]["started_at"] == "2026-03-02T09:00:00+00:00"
        assert ready["connections"]["acme"]["consecutive_failures"] == 0
        assert ready["connections"]["beta"] == {"last_run": None}
        code, ctype, body = get(server, "/metrics")
        assert code == 200 and ctype.startswith("text/plain; version=")
        assert 'cosell_runs_total{connection="acme",kind="incremental",outcome="ok"} 0.0' in body
        assert "process_start_time_seconds" in body
        assert get(server, "/nope")[0] == 404


def test_readyz_is_503_when_the_state_store_is_unreachable() -> None:
    # a real PostgreSQL URL on a port nobody listens on: the ping fails as it would in production
    store = SqlStateStore("postgresql+psycopg://cosell:s3cret-canary@127.0.0.1:1/cosell")
    try:
        with HealthServer(
            "127.0.0.1", 0, store=store, metrics=Metrics(process=False), connections=["acme"]
        ) as server:
            code, _, body = get(server, "/readyz")
            assert get(server, "/healthz")[0] == 200  # liveness does not depend on the database
    finally:
        store.close()
    assert code == 503
    ready = json.loads(body)
    assert ready["status"] == "not ready" and ready["store"].startswith("unreachable: state store")
    assert "s3cret-canary" not in body


def test_readyz_serves_error_texts_redacted(store: SqlStateStore) -> None:
    status = {"acme": {"last_error": "HTTP 401 for Bearer abc.def.ghi, user ops@contoso.example"}}
    with HealthServer(
        "127.0.0.1",
        0,
        store=store,
        metrics=Metrics(process=False),
        connections=["acme"],
        status=lambda: status,
    ) as server:
        _, _, body = get(server, "/readyz")
    error = json.loads(body)["connections"]["acme"]["last_error"]
    assert "abc.def.ghi" not in error and "ops@contoso.example" not in error and "HTTP 401" in error


def test_record_run_and_store_gauges() -> None:
    metrics = Metrics(process=False)
    finished = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    metrics.record_run(
        "acme",
        kind="incremental",
        outcome="partial",
        duration=2.0,
        counts={"pc_created": 2, "failed": 1, "blocked": 0},
        calls={CallKey("salesforce", "query", "200"): 5, CallKey("partner-center", "update", "412"): 1},
        finished_at=finished,
    )
    metrics.record_run("acme", kind="full", outcome="failed", duration=0.5, consecutive_failures=1)
    metrics.record_store("acme", conflicts=2, dead_letters=1, outbox={"pending": 3, "waiting": 1})
    metrics.record_store("acme", conflicts=0, dead_letters=1, outbox={"waiting": 1})
    metrics.record_quota("acme", "salesforce", 1200, 100_000)
    s = samples(metrics)

    def v(name: str, **labels: str) -> float:
        return s[(name, frozenset({"connection": "acme", **labels}.items()))]

    assert v("cosell_runs_total", kind="incremental", outcome="partial") == 1
    assert v("cosell_runs_total", kind="full", outcome="failed") == 1
    assert v("cosell_run_duration_seconds_count", kind="incremental") == 1
    assert v("cosell_run_duration_seconds_sum", kind="incremental") == 2.0
    assert v("cosell_records_total", outcome="pc_created") == 2
    assert v("cosell_records_total", outcome="failed") == 1
    assert ("cosell_records_total", frozenset({"connection": "acme", "outcome": "blocked"}.items())) not in s
    assert v("cosell_api_calls_total", system="salesforce", operation="query", status="200") == 5
    assert v("cosell_api_calls_total", system="partner-center", operation="update", status="412") == 1
    # a failed run does not move the last-success time
    assert v("cosell_last_successful_run_timestamp_seconds") == finished.timestamp()
    assert v("cosell_connection_consecutive_failures") == 1
    assert v("cosell_conflicts_open") == 0 and v("cosell_dead_letters_open") == 1
    assert v("cosell_outbox_depth", state="pending") == 0  # emptied, not left standing at 3
    assert v("cosell_outbox_depth", state="waiting") == 1
    assert v("cosell_api_quota_used", system="salesforce") == 1200
    assert v("cosell_api_quota_limit", system="salesforce") == 100_000


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # the global registry would refuse the second definition
    a.record_run("acme", kind="incremental", outcome="ok", duration=1.0)
    assert "cosell_runs_total" in a.render().decode()
    assert 'connection="acme"' not in b.render().decode()
