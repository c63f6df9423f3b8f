"""The sync benchmark's twins, in a process of their own.

Started by ``bench/bench_sync.py`` so that the twins' in-memory books neither inflate the measured
process's peak memory nor compete with it for the GIL. Builds one certificate authority, the identity
provider, Partner Center and Salesforce twins, seeds Salesforce with ``--opportunities`` deals, then
prints ONE JSON line on stdout (``{"ready": true, ...}``: base URLs, CA path, credentials, the control
port) and serves until told to stop.

A second Partner Center twin in the same process (``pc_bare_base_url``) serves the benchmark's bare
client, so its requests never touch the book the sync works on.

Control channel: line commands, one JSON line answered per command, on stdin (answers on stdout) and
on a TCP socket at 127.0.0.1:<control_port> (so that the bench's phase processes can drive it too):

    advance SECONDS          move both twins' clocks forward
    change K [crm|pc|both]   change K opportunities (crm: Description; pc: the referral's dealValue;
                             both: half each), spread evenly over the book
    rss                      this process's resident and peak memory (MB) and CPU seconds so far
    stats                    requests served so far and the seconds spent handling them, by
                             twin:METHOD:route (cumulative)
    stop                     stop serving and exit (EOF on stdin does the same)

Run alone: .venv/bin/python bench/twins_process.py --opportunities 1000 --dir /tmp/twins
(without arguments, as ``make bench`` runs it: a self-check that drives each command once and exits.)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import socketserver
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from procstat import memory_mb  # bench/, beside this script

from connector.partner_center.models import format_utc
from connector.partner_center.twin import API_PREFIX, PartnerCenterTwin
from connector.remote.idp_twin import IdpTwin
from connector.remote.twin import Clock, Twin, TwinCA, TwinRequest, TwinResponse
from connector.salesforce.twin import STANDARD_STAGES, SalesforceTwin, seed

PC_CLIENT, PC_USER, PC_PASSWORD = "bench-pc", "bench@partner.example", "bench-pass"
SF_CLIENT, SF_SECRET, SF_USER, SF_PASSWORD = "bench-sf", "bench-sf-secret", "sf@partner.example", "sf-pass"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
_OPEN_STAGES = [s[0] for s in STANDARD_STAGES if not s[3]]
_CLOSED_STAGES = {s[0] for s in STANDARD_STAGES if s[3]}


def _route(twin: str, path: str) -> str:
    """A coarse name for what a request asked (for the twin-side tally)."""
    if twin in ("partner-center", "pc-bare"):
        return "referrals" if path.rstrip("/") == API_PREFIX else "referral"
    if twin == "salesforce":
        if path.endswith("/oauth2/token"):
            return "token"
        parts = [p for p in path.split("/") if p][3:]  # after services/data/vXX.X
        if not parts:
            return "other"
        if parts[0] == "sobjects" and len(parts) >= 3:
            return f"sobjects/{parts[-1] if parts[-1] in ('describe', 'deleted', 'updated') else 'id'}"
        return "/".join(parts[:2]) if parts[0] in ("composite", "jobs") else parts[0]
    return path.rsplit("/", 1)[-1] or "other"


class CountingLog(list[TwinRequest]):
    """Replaces a twin's request log: counts requests instead of keeping them (the log of a 100,000-deal
    initial sync would hold every request body for the life of the process)."""

    def __init__(self, twin: str, tally: Counter[str], lock: threading.Lock) -> None:
        super().__init__()
        self._twin, self._tally, self._lock = twin, tally, lock

    def append(self, request: TwinRequest) -> None:
        key = f"{self._twin}:{request.method}:{_route(self._twin, request.path)}"
        with self._lock:
            self._tally[key] += 1


class Twins:
    def __init__(self, n: int, workdir: Path, *, mixed_stages: bool, token_hours: float) -> None:
        self.n = n
        self.ca = TwinCA()
        self.ca_pem = self.ca.write_pem(workdir / "ca.pem")
        lifetime = timedelta(hours=token_hours)
        self.clock = Clock(START)
        self.idp = IdpTwin(self.ca, clock=self.clock, token_lifetime=lifetime)
        self.idp.add_client(PC_CLIENT)
        self.idp.add_user(PC_USER, PC_PASSWORD)
        self.idp.auto_approve = PC_USER  # the bench's device-code sign-in is approved at its first poll
        self.pc = PartnerCenterTwin(self.ca, idp=self.idp, max_page_size=1000)
        # The bare client's own Partner Center (same process, same server code, same IdP): its POSTs
        # never land in the book the sync works on, so it can be measured before and after the runs.
        self.pc_bare = PartnerCenterTwin(self.ca, idp=self.idp, organization_name="Bare client")
        self.sf = SalesforceTwin(
            self.ca,
            clock=Clock(START),
            client_id=SF_CLIENT,
            client_secret=SF_SECRET,
            users={SF_USER: SF_PASSWORD},
            session_ttl=lifetime,
            daily_api_limit=1_000_000_000,
        )
        self.tally: Counter[str] = Counter()
        self._tally_lock = threading.Lock()
        self.twins: list[Twin] = [self.idp, self.pc, self.pc_bare, self.sf]
        self.seconds: dict[str, float] = {}
        for twin in self.twins:
            name = "pc-bare" if twin is self.pc_bare else twin.name
            twin.requests = CountingLog(name, self.tally, self._tally_lock)
            setattr(twin, "handle", self._timed(name, twin.handle))  # noqa: B010 - wraps a bound method
        self._lock = threading.Lock()
        self._changes = 0
        started = time.perf_counter()
        seed(self.sf, n)
        if not mixed_stages:
            # Every deal can be co-sold, so the book's N opportunities become N linked deals: the seed's
            # closed deals move to an open stage, keeping their SystemModstamp.
            for i, row in enumerate(self.sf.tables["Opportunity"].values()):
                if row["StageName"] in _CLOSED_STAGES:
                    self.sf.update_row(
                        "Opportunity",
                        row["Id"],
                        {"StageName": _OPEN_STAGES[i % len(_OPEN_STAGES)]},
                        stamp=row["SystemModstamp"],
                    )
        self.seed_seconds = time.perf_counter() - started
        # The seeded book lives as long as the process: keep it out of the collector's full passes.
        gc.collect()
        gc.freeze()
        for twin in self.twins:
            twin.start()
        self.pc_bare.seed(100, mix=False)  # referrals for the bare GETs (their links need the base URL)

    def _timed(
        self, name: str, handle: Callable[[TwinRequest], TwinResponse]
    ) -> Callable[[TwinRequest], TwinResponse]:
        """The twin's handler, timed: where the twins spend their time, by twin:METHOD:route."""

        def timed(request: TwinRequest) -> TwinResponse:
            start = time.perf_counter()
            try:
                return handle(request)
            finally:
                key = f"{name}:{request.method}:{_route(name, request.path)}"
                with self._tally_lock:
                    self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        return timed

    def stop(self) -> None:
        for twin in reversed(self.twins):
            twin.stop()

    # --- commands ---------------------------------------------------------------------------------
    def command(self, line: str) -> dict[str, Any]:
        words = line.split()
        if not words:
            return {"ok": False, "error": "empty command"}
        try:
            with self._lock:
                return self._command(words[0], words[1:])
        except Exception as exc:  # noqa: BLE001 - a bad command must answer, not kill the twins
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _command(self, verb: str, args: list[str]) -> dict[str, Any]:
        if verb == "advance":
            delta = timedelta(seconds=float(args[0]))
            for clock in (self.clock, self.sf.clock):
                clock.advance(delta)
            return {"ok": True, "now": self.clock.now().isoformat()}
        if verb == "change":
            return self._change(int(args[0]), args[1] if len(args) > 1 else "crm")
        if verb == "rss":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return {"ok": True, **memory_mb(), "cpu_s": usage.ru_utime + usage.ru_stime}
        if verb == "stats":
            with self._tally_lock:
                return {"ok": True, "requests": dict(self.tally), "seconds": dict(self.seconds)}
        if verb == "stop":
            return {"ok": True, "stopping": True}
        return {"ok": False, "error": f"unknown command {verb!r}"}

    def _change(self, k: int, side: str) -> dict[str, Any]:
        if side not in ("crm", "pc", "both"):
            raise ValueError("side must be crm, pc or both")
        self._changes += 1
        opps = list(self.sf.tables["Opportunity"])
        k = max(0, min(k, len(opps)))
        stride = max(1, len(opps) // max(1, k))
        chosen = opps[::stride][:k]
        crm_ids = chosen if side == "crm" else chosen[: k // 2] if side == "both" else []
        on_crm = set(crm_ids)
        pc_crm_ids = [c for c in chosen if c not in on_crm]
        for opp in crm_ids:
            self.sf.update_row("Opportunity", opp, {"Description": f"changed in round {self._changes}"})
        changed_pc = 0
        if pc_crm_ids:
            wanted = set(pc_crm_ids)
            by_crm = {
                doc.get("externalReferenceId"): doc
                for doc in self.pc.referrals.values()
                if doc.get("externalReferenceId") in wanted
            }
            now = format_utc(self.pc.clock.now())
            for crm_id in pc_crm_ids:
                doc = by_crm.get(crm_id)
                if doc is None:
                    continue
                new = copy.deepcopy(doc)
                details = new.setdefault("details", {})
                details["dealValue"] = (details.get("dealValue") or 0) + 1000
                new["updatedDateTime"] = now
                new["eTag"] = self.pc._etag()
                self.pc.put(new)
                changed_pc += 1
        return {"ok": True, "crm": len(crm_ids), "pc": changed_pc, "changed": len(crm_ids) + changed_pc}


def serve_control(twins: Twins, stop: threading.Event) -> socketserver.ThreadingTCPServer:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for raw in self.rfile:
                reply = twins.command(raw.decode("utf-8"))
                self.wfile.write((json.dumps(reply) + "\n").encode("utf-8"))
                self.wfile.flush()
                if reply.get("stopping"):
                    stop.set()
                    return

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    return server


def self_check(n: int = 1000) -> None:
    """Run alone (``make bench`` runs every bench/*.py without arguments): start the twins in this
    process, drive the control commands once, print what they answer, stop."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        twins = Twins(n, Path(tmp), mixed_stages=False, token_hours=24.0)
        print(f"twins for {n:,} opportunities ready in {time.perf_counter() - started:.2f} s "
              f"(seeding {twins.seed_seconds:.2f} s)")  # fmt: skip
        try:
            for command in ("rss", "advance 600", f"change {n // 100} crm", "stats", "stop"):
                print(f"  {command:<16} -> {json.dumps(twins.command(command))}")
        finally:
            twins.stop()


def main() -> None:
    if len(sys.argv) == 1:
        self_check()
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--opportunities", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="where the CA bundle is written")
    parser.add_argument("--mixed-stages", action="store_true", help="keep the seed's closed deals (~20%%)")
    parser.add_argument("--token-hours", type=float, default=24.0, help="IdP token / Salesforce session life")
    args = parser.parse_args()
    # Twins log nothing useful here; stdout is the control channel.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    twins = Twins(args.opportunities, args.dir, mixed_stages=args.mixed_stages, token_hours=args.token_hours)
    stop = threading.Event()
    control = serve_control(twins, stop)
    ready = {
        "ready": True,
        "opportunities": args.opportunities,
        "seed_seconds": round(twins.seed_seconds, 2),
        "ca_pem": str(twins.ca_pem),
        "idp_authority": twins.idp.authority,
        "pc_base_url": twins.pc.api_base_url,
        "pc_bare_base_url": twins.pc_bare.api_base_url,
        "sf_login_url": twins.sf.base_url,
        "control_port": control.server_address[1],
        "pc": {"client_id": PC_CLIENT, "user": PC_USER},
        "sf": {"client_id": SF_CLIENT, "client_secret": SF_SECRET, "user": SF_USER, "password": SF_PASSWORD},
        **memory_mb(),
    }
    print(json.dumps(ready), flush=True)

    def read_stdin() -> None:
        for raw in sys.stdin:
            reply = twins.command(raw)
            print(json.dumps(reply), flush=True)
            if reply.get("stopping"):
                break
        stop.set()  # "stop", or EOF: the bench is gone

    threading.Thread(target=read_stdin, daemon=True).start()
    stop.wait()
    control.shutdown()
    twins.stop()


if __name__ == "__main__":
    main()
