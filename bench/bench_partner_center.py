"""Listing 5,000 referrals from the Partner Center twin over HTTPS, with real msal sign-in.

Prints API calls (by operation and status), pages, wall time and peak Python memory of the client
side. The twin runs in this process, so memory is measured in a second, identical pass under
tracemalloc (which slows Python down) and the twin's own store is built before tracing starts.
Run: .venv/bin/python bench/bench_partner_center.py [N] [PAGE_SIZE]
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import structlog
import yaml

from connector.partner_center.client import PartnerCenterClient
from connector.partner_center.twin import PartnerCenterTwin
from connector.remote.calls import CallCounter
from connector.remote.idp_twin import IdpTwin
from connector.remote.signin import partner_center_signin
from connector.remote.twin import TwinCA
from connector.settings import Settings, load_settings

CONNECTION = "bench"
USER = "pc-service@partner.example"


def settings_for(root: Path, idp: IdpTwin, pc: PartnerCenterTwin, ca_pem: Path, page_size: int) -> Settings:
    config = {
        "data_dir": str(root / "state"),
        "tls": {"ca_bundle": str(ca_pem)},
        "connections": {
            CONNECTION: {
                "crm": {"kind": "salesforce", "auth": {"flow": "client_credentials", "client_id": "sf"}},
                "partner_center": {
                    "base_url": pc.api_base_url,
                    "authority": idp.authority,
                    "auth": {"client_id": "bench-app"},
                    "page_size": page_size,
                },
                "mappings": ["mappings/default.yaml"],
            }
        },
    }
    path = root / "cosell.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return load_settings(path)


def list_all(settings: Settings, calls: CallCounter) -> tuple[int, int]:
    deals = pages = 0
    with PartnerCenterClient.from_settings(settings, CONNECTION, calls=calls) as client:
        for page in client.changes(None):
            pages += 1
            deals += len(page.converted()[0])  # streamed: nothing is kept across pages
    return deals, pages


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    page_size = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    ca = TwinCA()
    with tempfile.TemporaryDirectory() as tmp, IdpTwin(ca) as idp, PartnerCenterTwin(ca, idp=idp) as pc:
        assert isinstance(idp, IdpTwin) and isinstance(pc, PartnerCenterTwin)
        root = Path(tmp)
        idp.add_client("bench-app")
        idp.add_user(USER, "unused")
        idp.auto_approve = USER
        settings = settings_for(root, idp, pc, ca.write_pem(root / "ca.pem"), page_size)
        signin = partner_center_signin(settings, CONNECTION)
        signin.login_device_code(lambda _message: None)
        signin.close()
        pc.seed(n)

        calls = CallCounter()
        start = time.perf_counter()
        deals, pages = list_all(settings, calls)
        wall = time.perf_counter() - start

        tracemalloc.start()
        list_all(settings, CallCounter())
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    print(f"referrals listed:      {deals:,} (seeded {n:,}, page size {page_size})")
    print(f"pages:                 {pages}")
    for key, count in sorted(calls.snapshot().items()):
        print(f"calls {key.operation} {key.status}:      {count}")
    print(f"wall time:             {wall:.2f} s  ({deals / wall:,.0f} referrals/s, twin in-process)")
    print(f"peak traced memory:    {peak / 1e6:.1f} MB (client and twin serving, one process)")


if __name__ == "__main__":
    main()
