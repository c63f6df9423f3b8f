"""Incremental pull of 10,000 opportunities with related data from the Salesforce twin over HTTPS,
and what an idle run costs on a new (cold) adapter and on one kept across runs (warm, as the daemon
keeps it).

Prints API calls (by operation), query pages, wall time and peak Python memory. Memory is measured
in a second, identical run under tracemalloc (which slows Python down) so the timing stays honest.
Run: .venv/bin/python bench/bench_salesforce.py [N]
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from pydantic import SecretStr

from connector.remote.calls import CallCounter, CallKey
from connector.remote.retry import RetryPolicy
from connector.remote.twin import Clock, TwinCA
from connector.salesforce.adapter import SalesforceAdapter
from connector.salesforce.auth import SalesforceSignIn
from connector.salesforce.twin import SalesforceTwin, seed
from connector.settings import SalesforceAuth, SalesforceCrm

START = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)


def _crm(twin: SalesforceTwin) -> SalesforceCrm:
    return SalesforceCrm(
        kind="salesforce",
        login_url=twin.base_url,
        auth=SalesforceAuth(
            flow="password",
            client_id=twin.client_id,
            username="integration@example.com",
            password=SecretStr("twin-password"),
            client_secret=SecretStr(twin.client_secret),
        ),
    )


def _adapter(twin: SalesforceTwin, bundle: Path) -> SalesforceAdapter:
    crm = _crm(twin)
    policy = RetryPolicy(sleep=lambda _s: None)
    calls = CallCounter()
    sign_in = SalesforceSignIn(crm, ca_bundle=bundle, policy=policy, calls=calls, now=twin.clock.now)
    return SalesforceAdapter(
        crm, ca_bundle=bundle, sign_in=sign_in, policy=policy, calls=calls, now=twin.clock.now
    )


def _by_op(before: dict[CallKey, int], after: dict[CallKey, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, count in after.items():
        if count - before.get(key, 0):
            out[key.operation] = out.get(key.operation, 0) + count - before.get(key, 0)
    return out


def idle_runs(ca: TwinCA, bundle: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Calls of an idle run (nothing changed since the last sync) on a new adapter, then on the same
    adapter one schedule interval later."""
    with SalesforceTwin(ca, clock=Clock(START)) as twin:
        assert isinstance(twin, SalesforceTwin)
        seed(twin, 1000, stamps=60)
        twin.add_record_type("Partner_Deal", ("Prospecting", "Closed Won", "Closed Lost"))
        with _adapter(twin, bundle) as first:
            cursor = list(first.pull(None))[-1].cursor
        twin.clock.advance(timedelta(minutes=10))  # one schedule interval, past the lookback
        with _adapter(twin, bundle) as adapter:
            before = adapter.calls.snapshot()
            pages = list(adapter.pull(cursor))
            cold = _by_op(before, adapter.calls.snapshot())
            twin.clock.advance(timedelta(minutes=10))
            before = adapter.calls.snapshot()
            list(adapter.pull(pages[-1].cursor))
            warm = _by_op(before, adapter.calls.snapshot())
        return cold, warm


def run(n: int, ca: TwinCA, bundle: Path, *, measure_memory: bool) -> dict[str, object]:
    with SalesforceTwin(ca, clock=Clock(START)) as twin:
        assert isinstance(twin, SalesforceTwin)
        with _adapter(twin, bundle) as adapter:
            cursor = list(adapter.pull(None))[-1].cursor  # empty org: the watermark is the signpost
            twin.clock.advance(timedelta(minutes=10))
            seed(twin, n, start=twin.stamp(), stamps=60)
            twin.clock.advance(timedelta(minutes=2))
            before_twin = len(twin.calls())
            before = adapter.calls.total()
            snapshot = adapter.calls.snapshot()
            adapter.reset_run()
            if measure_memory:
                tracemalloc.start()
            t0 = time.perf_counter()
            rows = 0
            pages = 0
            for page in adapter.pull(cursor):
                rows += len(page.rows)
                pages += 1
            wall = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] if measure_memory else 0
            if measure_memory:
                tracemalloc.stop()
            by_op = _by_op(snapshot, adapter.calls.snapshot())
            return {
                "rows": rows,
                "pages": pages,
                "calls": adapter.calls.total() - before,
                "twin_requests": len(twin.calls()) - before_twin,
                "wall_s": wall,
                "peak_mb": peak / 1e6,
                "by_op": by_op,
            }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    ca = TwinCA()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = ca.write_pem(Path(tmp) / "ca.pem")
        timed = run(n, ca, bundle, measure_memory=False)
        memory = run(n, ca, bundle, measure_memory=True)
        cold, warm = idle_runs(ca, bundle)
    print(
        f"salesforce incremental pull, {n} opportunities with account, contact role + contact, team + users, line items"
    )
    print(
        f"  rows read          {timed['rows']}  in {timed['pages']} pages (ceil(N/2000) = {math.ceil(n / 2000)})"
    )
    print(f"  API calls (run)    {timed['calls']}  (twin saw {timed['twin_requests']} requests)")
    print(f"  calls by operation {timed['by_op']}  (this run; the adapter is warm from the first)")
    print(f"  wall time          {timed['wall_s']:.2f} s")
    print(f"  peak memory        {memory['peak_mb']:.1f} MB (tracemalloc, Python allocations)")
    print("salesforce idle run (nothing changed since the last sync), 1,000 opportunities, 1 record type")
    print(f"  cold adapter (new)       {sum(cold.values())} calls  {dict(sorted(cold.items()))}")
    print(
        f"  warm adapter (kept)      {sum(warm.values())} call{'s' * (sum(warm.values()) != 1)}  {dict(sorted(warm.items()))}"
    )


if __name__ == "__main__":
    main()
