"""Benchmark: read 10,000 Dynamics opportunities with related data through the real adapter.

Real msal against the identity-provider twin, real HTTPS against the Dataverse twin (both in this
process, so wall time and memory include the twins' own work). Prints calls by kind, wall time and
peak memory for a full load at two page sizes, then one delta read after 100 changes.
"""

from __future__ import annotations

import math
import resource
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

from pydantic import SecretStr

from connector.dynamics.adapter import build_adapter, dataverse_signin
from connector.dynamics.twin import API_PATH, DataverseTwin
from connector.remote.calls import CallCounter
from connector.remote.http import http_client
from connector.remote.idp_twin import IdpTwin
from connector.remote.retry import RetryPolicy
from connector.remote.twin import Clock, TwinCA
from connector.settings import DynamicsAuth, DynamicsCrm

N = 10_000
BENCH_SECRET = "bench-" + "only"  # a twin credential, not a secret


def main() -> int:
    ca = TwinCA()
    with tempfile.TemporaryDirectory() as tmp:
        pem = ca.write_pem(Path(tmp) / "ca.pem")
        clock = Clock(start=datetime(2026, 3, 2, 9, 0, tzinfo=UTC))
        idp = IdpTwin(ca, clock=clock)
        idp.add_client("bench-app", secret=BENCH_SECRET)
        with idp:
            twin = DataverseTwin(ca, clock=clock)
            twin.auth_check = lambda h: idp.validate(h, scope_prefix=twin.base_url) is not None
            with twin:
                t0 = time.perf_counter()
                seeded = twin.seed(N, products=40)
                print(f"seeded {N:,} opportunities in {time.perf_counter() - t0:.1f} s")
                for page_size in (500, 5000):
                    run(twin, idp, pem, page_size, seeded.opportunities)
    return 0


def run(twin: DataverseTwin, idp: IdpTwin, pem: Path, page_size: int, ids: list[str]) -> None:
    crm = DynamicsCrm(
        kind="dynamics",
        base_url=twin.base_url,
        auth=DynamicsAuth(
            tenant_id=idp.tenant_id,
            client_id="bench-app",
            authority=idp.authority,
            client_secret=SecretStr(BENCH_SECRET),
        ),
        page_size=page_size,
    )
    signin_http = http_client(pem)
    calls = CallCounter()
    adapter = build_adapter(
        crm,
        tokens=dataverse_signin(crm, pem, http=signin_http),
        ca_bundle=pem,
        calls=calls,
        policy=RetryPolicy(),
    )
    with adapter:
        adapter.stages()  # sign-in and metadata outside the measured read
        twin.requests.clear()
        twin.batch_parts.clear()
        t0 = time.perf_counter()
        deals = 0
        cursor = None
        for page in adapter.changes(None):
            deals += len(page.deals)
            cursor = page.cursor
        wall = time.perf_counter() - t0
        pages = sum(1 for r in twin.requests if r.path == f"{API_PATH}/opportunities")
        batches = sum(1 for r in twin.requests if r.path.endswith("$batch"))
        parts = len(twin.batch_parts)
        calls_made = len(twin.requests)
        # memory in a second, traced load (tracemalloc slows the run, so it is not timed)
        tracemalloc.start()
        for _page in adapter.changes(None):
            pass
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"page size {page_size:>5}: {deals:,} deals, {calls_made} HTTP calls "
            f"({pages} opportunity pages [bound {math.ceil(N / page_size)}], {batches} $batch with {parts} "
            f"related GETs, {calls_made - pages - batches} metadata), {wall:.2f} s, "
            f"peak traced memory {peak / 2**20:.0f} MiB (adapter and twin in one process)"
        )
        for oid in ids[:100]:
            twin.update("opportunities", oid, description="bench change")
        twin.requests.clear()
        t0 = time.perf_counter()
        changed = sum(len(p.deals) for p in adapter.changes(cursor))
        print(
            f"                  delta after 100 changes: {changed} deals, {len(twin.requests)} HTTP calls, "
            f"{time.perf_counter() - t0:.2f} s"
        )
    signin_http.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"                  process max RSS so far (twin + adapter): {rss:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
