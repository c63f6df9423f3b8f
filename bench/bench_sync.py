"""Sync engine cost on the twins: initial sync, the run that reads its writes back, an idle run, and a
run with 1% changed.

Prints, per book size: wall time, peak RSS, and API calls by system and operation for each run, and
the request rate of the initial sync against a bare httpx client hitting the same twin. Asserts
nothing. Run: .venv/bin/python bench/bench_sync.py [--sizes 1000,10000]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from connector.partner_center.twin import PartnerCenterTwin
from connector.remote.http import http_client
from connector.remote.idp_twin import IdpTwin
from connector.remote.retry import RetryPolicy
from connector.remote.signin import partner_center_signin
from connector.remote.twin import Clock, TwinCA
from connector.salesforce.twin import SalesforceTwin, seed
from connector.settings import load_settings
from connector.state import open_store
from connector.sync.factory import run_context

PC_CLIENT, PC_USER, PC_PASSWORD = "bench-pc", "bench@partner.example", "bench-pass"
SF_CLIENT, SF_SECRET, SF_USER, SF_PASSWORD = "bench-sf", "bench-sf-secret", "sf@partner.example", "sf-pass"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(n: int, workdir: Path) -> None:
    ca = TwinCA()
    clock = Clock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))
    with IdpTwin(ca, clock=clock) as idp:
        idp.add_client(PC_CLIENT)
        idp.add_user(PC_USER, PC_PASSWORD)
        with PartnerCenterTwin(ca, idp=idp, max_page_size=1000) as pc:
            sf = SalesforceTwin(ca, clock=Clock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC)), client_id=SF_CLIENT,
                                client_secret=SF_SECRET, users={SF_USER: SF_PASSWORD})  # fmt: skip
            sf.start()
            try:
                seed(sf, n)
                config = {
                    "data_dir": str(workdir / "data"),
                    "tls": {"ca_bundle": str(ca.write_pem(workdir / "ca.pem"))},
                    "connections": {
                        "bench": {
                            "crm": {"kind": "salesforce", "login_url": sf.base_url, "api_budget_share": 1.0,
                                    "auth": {"flow": "password", "client_id": SF_CLIENT, "username": SF_USER}},
                            "partner_center": {"base_url": pc.api_base_url, "authority": idp.authority,
                                               "auth": {"client_id": PC_CLIENT}, "location_id": "loc-1",
                                               "page_size": 1000},
                            "mappings": ["builtin:salesforce-default.yaml"],
                        }
                    },
                }  # fmt: skip
                path = workdir / "cosell.yaml"
                path.write_text(yaml.safe_dump(config), encoding="utf-8")
                os.environ["COSELL_CONNECTIONS__BENCH__CRM__AUTH__CLIENT_SECRET"] = SF_SECRET
                os.environ["COSELL_CONNECTIONS__BENCH__CRM__AUTH__PASSWORD"] = SF_PASSWORD
                settings = load_settings(path)
                idp.sign_in(settings, "bench", PC_USER)
                signin = partner_center_signin(settings, "bench")  # for the bare client's token
                store = open_store(settings.state_url)
                policy = RetryPolicy(sleep=lambda _s: None)

                def one_run(label: str) -> None:
                    # runs are a schedule interval apart (longer than the cursors' lookback overlap)
                    for c in (clock, sf.clock):
                        c.advance(timedelta(minutes=10))
                    start = time.perf_counter()
                    with run_context(settings, "bench", store, policy=policy) as ctx:
                        report = ctx.engine.run()
                        calls = ctx.calls.snapshot()
                    wall = time.perf_counter() - start
                    by: Counter[str] = Counter()
                    for key, count in calls.items():
                        by[f"{key.system}:{key.operation}"] += count
                    total = sum(by.values())
                    print(f"  {label:<14} wall {wall:7.2f} s  rss {rss_mb():7.1f} MB  calls {total:6d}  "
                          f"({total / wall:6.0f} req/s)  records {dict(report.counts)}")  # fmt: skip
                    print("                 " + ", ".join(f"{k} {v}" for k, v in sorted(by.items())))

                print(f"book of {n:,} opportunities")
                one_run("initial sync")
                one_run("echo run")  # reads the initial sync's own writes back once: no write follows
                one_run("idle run")
                changed = list(sf.tables["Opportunity"])[: max(1, n // 100)]
                for opp in changed:
                    sf.update_row("Opportunity", opp, {"Description": "changed for the 1% run"})
                one_run("1% changed")
                # the same twin's rate for a bare client: GET one referral repeatedly
                rid = next(iter(pc.referrals))
                token = signin.token()
                with http_client(workdir / "ca.pem") as bare:
                    start = time.perf_counter()
                    for _ in range(500):
                        bare.get(f"{pc.api_base_url}/engagements/referrals/{rid}",
                                 headers={"Authorization": f"Bearer {token}"})  # fmt: skip
                    print(
                        f"  bare client    {500 / (time.perf_counter() - start):6.0f} req/s (GET by id, same twin)"
                    )
                signin.close()
                store.close()
            finally:
                sf.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000")
    args = parser.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            bench(n, Path(tmp))


if __name__ == "__main__":
    main()
