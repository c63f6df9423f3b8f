"""Incremental pull of 10,000 opportunities with related data from the Salesforce twin over HTTPS.

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

from connector.remote.retry import RetryPolicy
from connector.remote.twin import Clock, TwinCA
from connector.salesforce.adapter import SalesforceAdapter
from connector.salesforce.auth import SalesforceSignIn
from connector.salesforce.twin import SalesforceTwin, seed
from connector.settings import SalesforceAuth, SalesforceCrm

START = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)


def run(n: int, ca: TwinCA, bundle: Path, *, measure_memory: bool) -> dict[str, object]:
    with SalesforceTwin(ca, clock=Clock(START)) as twin:
        assert isinstance(twin, SalesforceTwin)
        crm = SalesforceCrm(
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
        policy = RetryPolicy(sleep=lambda _s: None)
        sign_in = SalesforceSignIn(crm, ca_bundle=bundle, policy=policy)
        with SalesforceAdapter(crm, ca_bundle=bundle, sign_in=sign_in, policy=policy) as adapter:
            cursor = list(adapter.pull(None))[-1].cursor  # empty org: the watermark is the signpost
            twin.clock.advance(timedelta(minutes=10))
            seed(twin, n, start=twin.stamp(), stamps=60)
            twin.clock.advance(timedelta(minutes=2))
            before_twin = len(twin.calls())
            before = adapter.calls.total()
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
            by_op: dict[str, int] = {}
            for key, count in adapter.calls.snapshot().items():
                by_op[key.operation] = by_op.get(key.operation, 0) + count
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
    print(
        f"salesforce incremental pull, {n} opportunities with account, contact role + contact, team + users, line items"
    )
    print(
        f"  rows read          {timed['rows']}  in {timed['pages']} pages (ceil(N/2000) = {math.ceil(n / 2000)})"
    )
    print(f"  API calls (run)    {timed['calls']}  (twin saw {timed['twin_requests']} requests)")
    print(f"  calls by operation {timed['by_op']}  (cumulative, incl. the empty first run)")
    print(f"  wall time          {timed['wall_s']:.2f} s")
    print(f"  peak memory        {memory['peak_mb']:.1f} MB (tracemalloc, Python allocations)")


if __name__ == "__main__":
    main()
