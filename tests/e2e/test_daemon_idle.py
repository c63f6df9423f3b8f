"""The daemon keeps each connection's clients across runs: once warm, an idle run costs one read call
per system (the issue's target), where a one-off `cosell sync` pays its sign-in and metadata again."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from connector.daemon.metrics import Metrics
from connector.daemon.scheduler import Daemon
from connector.partner_center.twin import PartnerCenterTwin
from connector.remote.idp_twin import IdpTwin
from connector.remote.retry import RetryPolicy
from connector.salesforce.twin import SalesforceTwin
from connector.settings import Settings
from connector.state import SqlStateStore
from tests.e2e.conftest import CONNECTION, Run
from tests.e2e.test_sync import add_opportunity


def calls_by_system(metrics: Metrics) -> Counter[str]:
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == "cosell_api_calls_total" and s.labels.get("connection") == CONNECTION:
                out[s.labels["system"]] += int(s.value)
    return out


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_a_warm_daemon_pays_one_read_call_per_system_for_an_idle_run(
    settings: Settings,
    store: SqlStateStore,
    run: Run,
    idp: IdpTwin,
    pc: PartnerCenterTwin,
    sf: SalesforceTwin,
) -> None:
    for i in range(3):
        add_opportunity(sf, name=f"Deal {i}")
    metrics = Metrics(process=False)
    daemon = Daemon(settings, store, metrics=metrics, policy=RetryPolicy(sleep=lambda _s: None))
    try:
        per_run: list[Counter[str]] = []
        for _ in range(4):  # initial sync, its echo, then two idle runs
            for clock in (idp.clock, sf.clock):
                clock.advance(timedelta(minutes=10))
            before = calls_by_system(metrics)
            assert daemon.run_connection(CONNECTION, "incremental") == "ok"
            per_run.append(calls_by_system(metrics) - before)
    finally:
        daemon.stop(grace=5)
    assert per_run[0]["partner-center"] >= 3  # the creates
    assert per_run[2] == per_run[3] == Counter({"partner-center": 1, "salesforce": 1}), per_run
    # a one-off run (new clients) pays the sign-in and the org's metadata again
    cold = run().calls  # type: ignore[attr-defined]
    assert sum(n for k, n in cold.items() if k.system == "salesforce") > 1
