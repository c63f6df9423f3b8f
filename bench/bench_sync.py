"""Sync engine cost on the twins, for books of N linked deals (default 10,000).

The twins (identity provider, Partner Center, Salesforce) run in a process of their own
(bench/twins_process.py), and every measured phase runs in a fresh process of its own, so a phase's
peak memory is that of the connector alone. For each book size the phases are:

- initial sync: creates every referral (N Partner Center POSTs, N/200 Salesforce collection writes);
- echo run: reads the initial sync's own writes back, and must write nothing;
- idle run, cold (new clients, as a one-off ``cosell sync``) then warm (the same ``ConnectionClients``
  kept for the next runs, as the daemon does; median of ``--warm-runs``);
- 1% changed: warm clients, ``--changed-share`` of the opportunities changed in Salesforce;
- full reconciliation: ``engine.run(full=True)``;
- bare client, before the first run and after the last: in the twins process, a second Partner Center
  twin (so its POSTs stay out of the synced book) serves a plain httpx client (one connection) POSTing
  referrals and GETting one by id: the request rate the twin serves when the client costs nothing.
  The initial sync's rate is compared with the mean of the two.

Each run prints wall time, peak RSS (the process's VmHWM, reset before the run), the CPU seconds of
the connector's process and of the twins' process, API calls by system:operation as the connector
counted them, the requests the twins served (twin:METHOD:route) and the twins' handler time. A table
per size compares the figures with the targets (computed, never assumed); with two sizes or more, a
last table compares the warm idle run's cost at the largest size with the smallest. Asserts nothing.

Run: .venv/bin/python bench/bench_sync.py [--sizes 1000,10000,100000] [--phases initial,idle]
       [--state-url postgresql://postgres@127.0.0.1:5432/postgres]   (default: SQLite in a temp dir)
       [--set partner_center.max_concurrency=1]                       (a connection setting, A/B)
       [--profile DIR [--profile-phases initial,idle,full]] [--tracemalloc]
       [--save FILE] [--load FILE ...]      (e.g. combine a long 100k run with a 10k one: --sizes "")
A 10,000-deal run takes a few minutes; 100,000 takes about 20 (run it in the background).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from procstat import memory_mb  # bench/, beside this script

CONNECTION = "bench"
PHASES = ("initial", "echo", "idle", "changed", "full", "bare")
HERE = Path(__file__).resolve().parent
MB = 1024 * 1024


# --- measuring --------------------------------------------------------------------------------------
def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0), so a run's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Control:
    """The twins process's control channel (line commands, one JSON answer per line)."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._file = self._sock.makefile("rwb")

    def __call__(self, command: str) -> dict[str, Any]:
        self._file.write(command.encode("utf-8") + b"\n")
        self._file.flush()
        reply: dict[str, Any] = json.loads(self._file.readline())
        if not reply.get("ok"):
            raise RuntimeError(f"twins refused {command!r}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def profiled_call(profile: Path, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """``fn(**kwargs)`` under cProfile, in this thread and in every thread it starts (the engine sends
    a page's Partner Center writes from a pool): one merged .prof. In the main thread, the time spent
    waiting for the pool shows as ``{method 'acquire' of '_thread.lock' objects}``."""
    import cProfile
    import pstats
    import threading

    workers: list[cProfile.Profile] = []

    def start(_frame: Any, _event: str, _arg: Any) -> None:
        worker = cProfile.Profile()
        workers.append(worker)
        worker.enable()  # replaces this hook for the rest of the thread's life

    main = cProfile.Profile()
    threading.setprofile(start)
    try:
        result = main.runcall(fn, **kwargs)
    finally:
        threading.setprofile(None)
    stats = pstats.Stats(main)
    for worker in workers:
        stats.add(worker)
    stats.dump_stats(profile)
    print(f"\n  profiled the main thread and {len(workers)} thread(s) it started", flush=True)
    return result


class PeakTracer:
    """tracemalloc, plus a thread that snapshots the traced heap at each new high: what is alive at the
    peak, by allocation site (the engine is not instrumented; this only watches it)."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading
        import tracemalloc

        self._tm = tracemalloc
        tracemalloc.start(6)
        self._best = 0
        self._snapshot: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(interval,), daemon=True)
        self._thread.start()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            current = self._tm.get_traced_memory()[0]
            if current > self._best * 1.25:
                self._best = current
                self._snapshot = self._tm.take_snapshot()

    def stop(self, top: int = 15) -> None:
        self._stop.set()
        self._thread.join()
        current, peak = self._tm.get_traced_memory()
        final = self._tm.take_snapshot()
        self._tm.stop()
        print(f"\n  tracemalloc: traced peak {peak / MB:.0f} MB; alive at the largest snapshot "
              f"({self._best / MB:.0f} MB), by allocation site (innermost connector frames):")  # fmt: skip
        if self._snapshot is not None:
            self._print(self._snapshot, top)
        print(f"  tracemalloc: still alive when the run returned ({current / MB:.0f} MB):")
        self._print(final, top)
        sys.stdout.flush()

    def _print(self, snapshot: Any, top: int) -> None:
        snapshot = snapshot.filter_traces([self._tm.Filter(False, self._tm.__file__)])
        by_site: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        for stat in snapshot.statistics("traceback"):
            frames = [f for f in stat.traceback if "/connector/" in f.filename] or list(stat.traceback)[-1:]
            site = " <- ".join(f"{f.filename.split('/connector/')[-1]}:{f.lineno}" for f in frames[-3:][::-1])
            by_site[site] += stat.size
            counts[site] += stat.count
        for site, size in by_site.most_common(top):
            print(f"    {size / MB:8.1f} MB {counts[site]:9d} blocks  {site}")


def _fdelta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


# --- the phase processes -------------------------------------------------------------------------------
class Phase:
    """Runs inside a phase process: one or more measured runs against the twins."""

    def __init__(self, args: argparse.Namespace) -> None:
        from connector.logs import configure_logging
        from connector.remote.retry import RetryPolicy
        from connector.settings import load_settings
        from connector.state import open_store

        configure_logging("console", "WARNING")
        import connector.sync.factory  # noqa: F401 - what `cosell` has imported when it settles
        from connector.process import settle_collector

        settle_collector()  # as `cosell` does at start (connector/process.py)
        self.args = args
        self.settings = load_settings(Path(args.config))
        self.control = Control(args.control)
        self.store = open_store(self.settings.state_url)
        self.policy = RetryPolicy(sleep=lambda _s: None)
        self.runs: list[dict[str, Any]] = []
        self.baseline_mb = memory_mb()["rss_mb"]

    def advance(self) -> None:
        # runs are a schedule interval apart (longer than the cursors' lookback overlap)
        self.control(f"advance {self.args.advance}")

    def measure(self, label: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        before = self.control("stats")
        twins_cpu = self.control("rss")["cpu_s"]
        reset_ok = reset_peak()
        start_mb = memory_mb()["rss_mb"]
        cpu = time.process_time()
        start = time.perf_counter()
        out = body()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        mem = memory_mb()
        after = self.control("stats")
        served = _delta(after["requests"], before["requests"])
        handled = {k: round(v, 4) for k, v in _fdelta(after["seconds"], before["seconds"]).items()}
        twins = self.control("rss")
        run = {
            "label": label,
            "wall": wall,
            "cpu": cpu,
            "twins_cpu": twins["cpu_s"] - twins_cpu,
            "start_mb": start_mb,
            "peak_mb": mem["peak_mb"] if reset_ok else 0.0,
            "end_mb": mem["rss_mb"],
            "served": served,
            "twins_seconds": handled,
            "twins_rss_mb": twins["rss_mb"],
            **out,
        }
        self.runs.append(run)
        return run

    def sync(self, clients: Any = None, *, full: bool = False, profile: Path | None = None) -> dict[str, Any]:
        from connector.sync.factory import run_context

        with run_context(self.settings, CONNECTION, self.store, policy=self.policy, clients=clients) as ctx:
            tracer = PeakTracer() if self.args.tracemalloc else None
            try:
                if profile is not None:
                    report = profiled_call(profile, ctx.engine.run, full=full)
                else:
                    report = ctx.engine.run(full=full)
            finally:
                if tracer is not None:
                    tracer.stop()
            snapshot = ctx.calls.snapshot()
        calls: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for key, n in snapshot.items():
            calls[f"{key.system}:{key.operation}"] += n
            if not key.status.startswith("2"):
                errors[f"{key.system}:{key.operation}:{key.status}"] += n
        return {
            "calls": dict(sorted(calls.items())),
            "call_errors": dict(sorted(errors.items())),
            "records": dict(sorted(report.counts.items())),
            "problems": [list(p) for p in report.problems[:5]],
            "problem_count": len(report.problems),
        }

    def clients(self) -> Any:
        from connector.sync.factory import ConnectionClients

        return ConnectionClients(self.settings, CONNECTION, policy=self.policy)

    # --- phases -----------------------------------------------------------------------------------
    def profiled(self, label: str, *, full: bool = False) -> None:
        """One measured one-off run, under cProfile when asked (its wall time is then inflated)."""
        self.advance()
        profile = Path(self.args.profile) if self.args.profile else None
        self.measure(label, lambda: self.sync(full=full, profile=profile))
        if profile is not None:
            self.print_profile(label, profile)

    @staticmethod
    def print_profile(label: str, profile: Path) -> None:
        import pstats

        print(f"\n  cProfile of the {label} ({profile}), top 25 by cumulative time:", flush=True)
        stats = pstats.Stats(str(profile))
        stats.sort_stats("cumulative").print_stats(25)
        print(f"  {label}: top 25 by own time:", flush=True)
        stats.sort_stats("tottime").print_stats(25)
        sys.stdout.flush()

    def initial(self) -> None:
        self.profiled("initial sync")

    def echo(self) -> None:
        self.profiled("echo run")

    def idle(self) -> None:
        held: list[Any] = []

        def cold() -> dict[str, Any]:
            held.append(self.clients())  # built in the run, as a one-off `cosell sync` would
            return self.sync(held[0])

        self.advance()
        self.measure("idle cold", cold)
        try:
            for i in range(self.args.warm_runs):
                self.advance()
                self.measure(f"idle warm {i + 1}", lambda: self.sync(held[0]))
            if self.args.profile:  # one more warm run, under the profiler (kept out of the medians)
                self.advance()
                profile = Path(self.args.profile)
                self.measure("idle profiled", lambda: self.sync(held[0], profile=profile))
                self.print_profile("idle profiled", profile)
        finally:
            held[0].close()

    def changed(self) -> None:
        clients = self.clients()
        try:
            self.advance()
            self.measure("warm-up (cold)", lambda: self.sync(clients))
            k = max(1, round(self.args.n * self.args.changed_share))
            changed = self.control(f"change {k} {self.args.change_side}")
            self.advance()
            run = self.measure("1% changed", lambda: self.sync(clients))
            run.update(changed=changed["changed"], changed_crm=changed["crm"], changed_pc=changed["pc"])
        finally:
            clients.close()

    def full(self) -> None:
        self.profiled("full reconcil.", full=True)

    def bare(self) -> None:
        from connector.partner_center.models import Referral, create_body
        from connector.remote.http import http_client
        from connector.remote.signin import partner_center_signin

        url = f"{self.args.bare_url.rstrip('/')}/engagements/referrals"
        when = f" ({self.args.when})" if self.args.when else ""
        signin = partner_center_signin(self.settings, CONNECTION)
        try:
            token = signin.token()
        finally:
            signin.close()
        count = self.args.bare_requests
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        with http_client(self.settings.tls.ca_bundle) as http:
            listing = http.get(url, params={"$top": "20"}, headers=headers)
            listing.raise_for_status()
            docs = listing.json()["value"]
            template = create_body(Referral.model_validate(docs[0]))
            bodies = []
            for i in range(count):  # built before the clock starts: the client should cost nothing
                template["externalReferenceId"] = f"BARE{i:012d}"
                bodies.append(json.dumps(template).encode("utf-8"))
            post_headers = {**headers, "Content-Type": "application/json"}

            def posts() -> dict[str, Any]:
                statuses: Counter[str] = Counter()
                for body in bodies:
                    r = http.post(
                        url, content=body, headers={**post_headers, "MS-RequestId": str(uuid.uuid4())}
                    )
                    statuses[str(r.status_code)] += 1
                return {"calls": {"bare:POST referral": count}, "statuses": dict(statuses)}

            def gets() -> dict[str, Any]:
                statuses: Counter[str] = Counter()
                ids = [d["id"] for d in docs]
                for i in range(count):
                    r = http.get(f"{url}/{ids[i % len(ids)]}", headers=headers)
                    statuses[str(r.status_code)] += 1
                return {"calls": {"bare:GET referral": count}, "statuses": dict(statuses)}

            self.measure(f"bare POST{when}", posts)
            self.measure(f"bare GET{when}", gets)

    def close(self) -> None:
        self.store.close()
        self.control.close()


def child_main(args: argparse.Namespace) -> None:
    phase = Phase(args)
    try:
        getattr(phase, args.child)()
    finally:
        Path(args.result).write_text(
            json.dumps({"phase": args.child, "baseline_mb": phase.baseline_mb, "runs": phase.runs}),
            encoding="utf-8",
        )
        phase.close()


# --- the parent -------------------------------------------------------------------------------------
class TwinsProcess:
    def __init__(self, n: int, workdir: Path, *, mixed_stages: bool) -> None:
        cmd = [
            sys.executable,
            str(HERE / "twins_process.py"),
            "--opportunities",
            str(n),
            "--dir",
            str(workdir),
        ]
        if mixed_stages:
            cmd.append("--mixed-stages")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the twins process exited ({self.proc.wait()}) before it was ready")
        self.info: dict[str, Any] = json.loads(line)

    def command(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.command("stop")
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def state_url_for(args: argparse.Namespace, n: int, workdir: Path) -> Iterator[str | None]:
    """None (SQLite under data_dir), or a PostgreSQL database of our own on the given server."""
    if not args.state_url:
        yield None
        return
    import sqlalchemy as sa

    server = args.state_url.replace("postgresql://", "postgresql+psycopg://", 1)
    name = f"cosell_bench_{n}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield str(sa.engine.make_url(server).set(database=name).render_as_string(hide_password=False))
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def write_config(workdir: Path, info: dict[str, Any], state_url: str | None, overrides: list[str]) -> Path:
    config: dict[str, Any] = {
        "data_dir": str(workdir / "data"),
        "tls": {"ca_bundle": info["ca_pem"]},
        "connections": {
            CONNECTION: {
                "crm": {"kind": "salesforce", "login_url": info["sf_login_url"], "api_budget_share": 1.0,
                        "auth": {"flow": "password", "client_id": info["sf"]["client_id"],
                                 "username": info["sf"]["user"]}},
                "partner_center": {"base_url": info["pc_base_url"], "authority": info["idp_authority"],
                                   "auth": {"client_id": info["pc"]["client_id"]}, "location_id": "loc-1",
                                   "page_size": 1000},
                "mappings": ["builtin:salesforce-default.yaml"],
            }
        },
    }  # fmt: skip
    if state_url:
        config["state"] = {"url": state_url}
    for assignment in overrides:  # --set partner_center.max_concurrency=1
        dotted, _, raw = assignment.partition("=")
        node = config["connections"][CONNECTION]
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(raw)
    path = workdir / "cosell.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    # secrets never go in the YAML: the phase processes inherit them from the environment
    os.environ["COSELL_CONNECTIONS__BENCH__CRM__AUTH__CLIENT_SECRET"] = info["sf"]["client_secret"]
    os.environ["COSELL_CONNECTIONS__BENCH__CRM__AUTH__PASSWORD"] = info["sf"]["password"]
    return path


def sign_in(config: Path) -> None:
    """`cosell auth login`: the device code is approved by the IdP twin at its first poll."""
    from connector.remote.signin import partner_center_signin
    from connector.settings import load_settings

    signin = partner_center_signin(load_settings(config), CONNECTION)
    try:
        signin.login_device_code(lambda _message: None, sleep=lambda _seconds: None)
    finally:
        signin.close()


def run_phase(
    phase: str, n: int, args: argparse.Namespace, config: Path, info: dict[str, Any], when: str = ""
) -> dict[str, Any] | None:
    port = info["control_port"]
    result = config.parent / f"result-{phase}{when}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--config", str(config),
           "--control", str(port), "--result", str(result), "--n", str(n), "--advance", str(args.advance),
           "--warm-runs", str(args.warm_runs), "--changed-share", str(args.changed_share),
           "--change-side", args.change_side, "--bare-requests", str(args.bare_requests),
           "--bare-url", info["pc_bare_base_url"], "--when", when]  # fmt: skip
    if args.profile and phase in args.profile_phases:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        cmd += ["--profile", str(Path(args.profile) / f"{phase}-{n}.prof")]
    if args.tracemalloc and phase in args.profile_phases:
        cmd.append("--tracemalloc")
    proc = subprocess.run(cmd, check=False)
    if not result.exists():
        print(f"  !! phase {phase} failed (exit {proc.returncode}) and reported nothing")
        return None
    out: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    out["exit"] = proc.returncode
    if proc.returncode:
        print(f"  !! phase {phase} exited {proc.returncode}")
    return out


def print_run(run: dict[str, Any]) -> None:
    total = sum(run["calls"].values())
    rate = total / run["wall"] if run["wall"] else 0.0
    peak = f"{run['peak_mb']:7.1f}" if run["peak_mb"] else "    n/a"
    print(
        f"  {run['label']:<15} wall {run['wall']:8.3f} s  peak {peak} MB (start {run['start_mb']:6.1f})  "
        f"calls {total:7d} ({rate:6.0f} req/s)  twins rss {run['twins_rss_mb']:6.0f} MB"
    )
    print(f"      cpu     connector {run['cpu']:.2f} s, twins {run['twins_cpu']:.2f} s")
    print("      calls   " + ", ".join(f"{k} {v}" for k, v in run["calls"].items()))
    if run.get("call_errors"):
        print("      errors  " + ", ".join(f"{k} {v}" for k, v in run["call_errors"].items()))
    print("      served  " + ", ".join(f"{k} {v}" for k, v in run["served"].items()))
    busiest = sorted(run.get("twins_seconds", {}).items(), key=lambda kv: -kv[1])[:4]
    if busiest:
        print("      twins   " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in busiest) + " (handler time)")
    if run.get("records"):
        print(f"      records {run['records']}")
    if run.get("problem_count"):
        print(f"      problems {run['problem_count']}: {run['problems']}")
    if run.get("statuses"):
        print(f"      statuses {run['statuses']}")


# --- the targets ------------------------------------------------------------------------------------
def _served(run: dict[str, Any], twin: str, *, writes: bool | None = None) -> int:
    total = 0
    for key, n in run["served"].items():
        name, method, route = key.split(":", 2)
        if name != twin:
            continue
        # a Bulk API 2.0 query job is created with a POST but reads
        is_write = method != "GET" and route not in ("token", "jobs/query") and name != "idp"
        if writes is None or writes == is_write:
            total += n
    return total


def _writes(run: dict[str, Any]) -> tuple[int, int]:
    """(Partner Center writes, CRM writes) the twins served in a run."""
    return _served(run, "partner-center", writes=True), _served(run, "salesforce", writes=True)


def _rate(run: dict[str, Any]) -> float:
    return sum(run["calls"].values()) / run["wall"] if run["wall"] else 0.0


def summary(n: int, runs: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(target, measured, met, note) rows for one book size, computed from the runs."""
    rows: list[tuple[str, str, str, str]] = []

    def row(target: str, measured: str, ok: bool | None, note: str = "") -> None:
        rows.append((target, measured, "n/a" if ok is None else ("yes" if ok else "NO"), note))

    initial = runs.get("initial sync")
    linked = 0
    if initial:
        pc_w, crm_w = _writes(initial)
        linked = int(initial["records"].get("pc_created", 0))
        row("initial: one PC create per linked deal", f"{pc_w} writes / {linked} created", pc_w == linked)
        row("initial: CRM writes <= ceil(linked/200)", f"{crm_w} (<= {math.ceil(linked / 200)})",
            crm_w <= math.ceil(linked / 200))  # fmt: skip
        bare = [_rate(r) for label, r in runs.items() if label.startswith("bare POST")]
        if bare:
            rate = statistics.mean(bare)
            ratio = _rate(initial) / rate
            spread = "bare POST before/after " + " / ".join(f"{b:.0f}" for b in bare) + " req/s"
            profiled = "; profiled run" if initial.get("profiled") else ""
            row("initial: rate >= 0.5 x bare POST rate",
                f"{_rate(initial):.0f} / {rate:.0f} req/s = {ratio:.2f}",
                None if profiled else ratio >= 0.5, spread + profiled)  # fmt: skip
    echo = runs.get("echo run")
    if echo:
        pc_w, crm_w = _writes(echo)
        row("echo run writes nothing", f"PC {pc_w}, CRM {crm_w} writes", pc_w + crm_w == 0)
    warm = [r for label, r in runs.items() if label.startswith("idle warm ")]
    if warm:
        worst = max(warm, key=lambda r: sum(r["served"].values()))
        pc = _served(worst, "partner-center") + _served(worst, "idp")
        sf = _served(worst, "salesforce")
        writes = sum(_writes(worst))
        per_run = ",".join(
            f"{_served(r, 'partner-center') + _served(r, 'idp')}/{_served(r, 'salesforce')}" for r in warm
        )
        row("idle warm: <= 1 read per system, 0 writes", f"PC {pc} (incl. IdP), SF {sf}, writes {writes}",
            pc <= 1 and sf <= 1 and writes == 0, f"worst of {len(warm)} warm runs; PC/SF per run {per_run}")  # fmt: skip
    cold = runs.get("idle cold")
    if cold:
        pc = _served(cold, "partner-center") + _served(cold, "idp")
        row("idle cold (one-off): calls per system", f"PC {pc} (incl. IdP), SF {_served(cold, 'salesforce')}",
            None, "informative: the target is about the warm run")  # fmt: skip
    changed = runs.get("1% changed")
    if changed:
        k = int(changed.get("changed", 0)) or 1
        k_crm = int(changed.get("changed_crm", k))
        pc_w, crm_w = _writes(changed)
        row("1% changed: one PC write per CRM-side change", f"{pc_w}/{k_crm} = {pc_w / max(1, k_crm):.3f}",
            pc_w == k_crm, f"{k_crm} changed in the CRM, {k - k_crm} in Partner Center")  # fmt: skip
        row("1% changed: CRM writes <= ceil(changed/200)", f"{crm_w} for {k} = {crm_w / k:.4f}/record",
            crm_w <= math.ceil(k / 200), "1/200 of a write per record, batched")  # fmt: skip
        pc_r = _served(changed, "partner-center", writes=False)
        sf_r = _served(changed, "salesforce", writes=False)
        row("1% changed: reads (informative)", f"PC {pc_r} ({pc_r / k:.2f}/record), SF {sf_r}", None,
            "paging of what changed is allowed")  # fmt: skip
    full = runs.get("full reconcil.")
    if full:
        timed = not full.get("profiled")
        row("full reconciliation < 60 s", f"{full['wall']:.1f} s", full["wall"] < 60 if timed else None,
            f"connector CPU {full['cpu']:.0f} s, twins CPU {full['twins_cpu']:.0f} s"
            + ("" if timed else "; profiled run"))  # fmt: skip
        row("full reconciliation peak < 300 MB", f"{full['peak_mb']:.0f} MB",
            (0 < full["peak_mb"] < 300) if full["peak_mb"] and not full.get("traced") else None,
            "whole process (imports included)" + ("; traced run" if full.get("traced") else ""))  # fmt: skip
        pc_w, crm_w = _writes(full)
        row("full reconciliation writes nothing", f"PC {pc_w}, CRM {crm_w}", pc_w + crm_w == 0)
    return rows


def idle_cost(runs: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """The warm idle run's cost: medians over the warm runs (requests: the worst run)."""
    warm = [r for label, r in runs.items() if label.startswith("idle warm ")]
    if not warm:
        return None
    return {
        "wall": statistics.median(r["wall"] for r in warm),
        "cpu": statistics.median(r["cpu"] for r in warm),
        "twins_cpu": statistics.median(r["twins_cpu"] for r in warm),
        "requests": max(sum(r["served"].values()) for r in warm),
    }


def compare_idle(results: dict[int, dict[str, dict[str, Any]]]) -> None:
    costs = {n: c for n, runs in results.items() if (c := idle_cost(runs)) is not None}
    if len(costs) < 2:
        return
    small, large = min(costs), max(costs)
    s, g = costs[small], costs[large]

    def ratio(key: str, fmt: Callable[[float], str], note: str) -> tuple[str, str, str, str]:
        r = g[key] / s[key] if s[key] else math.inf
        return (
            f"idle {key} ratio <= 1.2",
            f"{fmt(g[key])} / {fmt(s[key])} = {r:.2f}",
            "yes" if r <= 1.2 else "NO",
            note,
        )

    def ms(v: float) -> str:
        return f"{v * 1000:.0f} ms"

    print_table(
        f"idle cost (warm runs), {large:,} vs {small:,} deals",
        [
            ratio("requests", lambda v: f"{v:.0f}", "requests the twins served (worst warm run)"),
            ratio("wall", ms, "median; includes the twins' own work (their listings are indexed)"),
            ratio("cpu", ms, "median CPU of the connector process (what the connector itself costs)"),
            ("idle: twins CPU (informative)", f"{ms(g['twins_cpu'])} / {ms(s['twins_cpu'])}", "n/a",
             "the twins process's CPU in the same runs"),
        ],
    )  # fmt: skip


def print_table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    print(f"\n{title}")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"  {'target':<{w0}}  {'measured':<{w1}}  met  note")
    for target, measured, met, note in rows:
        print(f"  {target:<{w0}}  {measured:<{w1}}  {met:<3}  {note}".rstrip())


def bench_size(n: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix=f"bench-sync-{n}-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        twins = TwinsProcess(n, workdir / "twins", mixed_stages=args.mixed_stages)
        try:
            info = twins.info
            print(f"\nbook of {n:,} opportunities: twins process pid {twins.proc.pid} ready in "
                  f"{time.perf_counter() - started:.1f} s (seeding {info['seed_seconds']} s), "
                  f"rss {info['rss_mb']:.0f} MB", flush=True)  # fmt: skip
            with state_url_for(args, n, workdir) as state_url:
                config = write_config(workdir, info, state_url, args.set or [])
                print(f"  state store: {state_url or 'SQLite under ' + str(workdir / 'data')}", flush=True)
                sign_in(config)
                wanted = [(p, "") for p in PHASES if p == "initial" or p in args.phases]
                if "bare" in args.phases:
                    # the bare client brackets the runs: the twins' load (their books, the machine) moves
                    wanted = [("bare", "before"), *wanted[:-1], ("bare", "after")]
                for phase, when in wanted:
                    out = run_phase(phase, n, args, config, info, when)
                    if out is None:
                        if phase == "initial":
                            break
                        continue
                    for run in out["runs"]:
                        if (args.profile or args.tracemalloc) and phase in args.profile_phases:
                            run["profiled"] = True
                            run["traced"] = bool(args.tracemalloc)
                        runs[run["label"]] = run
                        print_run(run)
                    sys.stdout.flush()
            twins_mem = twins.command("rss")
            print(f"  twins process: rss {twins_mem['rss_mb']:.0f} MB, peak {twins_mem['peak_mb']:.0f} MB")
        finally:
            twins.stop()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000", help="comma-separated book sizes (default 10000)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated, of {','.join(PHASES)} (initial always runs)")  # fmt: skip
    parser.add_argument("--state-url", help="PostgreSQL server (e.g. postgresql://postgres@127.0.0.1:5432/postgres): "
                        "a database is created and dropped per size; default SQLite under a temp dir")  # fmt: skip
    parser.add_argument(
        "--profile", metavar="DIR", help="cProfile the runs of --profile-phases into DIR/PHASE-N.prof"
    )
    parser.add_argument("--profile-phases", default="initial",
                        help="of initial,echo,idle,full (default: initial); idle profiles one extra warm run")  # fmt: skip
    parser.add_argument("--tracemalloc", action="store_true",
                        help="in the --profile-phases, report the allocation sites alive at the traced peak (slow)")  # fmt: skip
    parser.add_argument(
        "--advance", type=float, default=600.0, help="seconds between runs on the twin clocks"
    )
    # 15: an idle run is ~10 ms, mostly two round trips; a median of 5 moved by 30% between runs
    parser.add_argument("--warm-runs", type=int, default=15, help="warm idle runs (median wall is reported)")
    parser.add_argument("--changed-share", type=float, default=0.01)
    parser.add_argument("--change-side", choices=("crm", "pc", "both"), default="crm")
    parser.add_argument("--bare-requests", type=int, default=2000)
    parser.add_argument(
        "--mixed-stages", action="store_true", help="keep the seed's ~20%% closed deals (unlinked)"
    )
    parser.add_argument("--set", metavar="KEY=VALUE", action="append",
                        help="connection setting for the runs, e.g. partner_center.max_concurrency=1; repeatable")  # fmt: skip
    parser.add_argument("--save", metavar="FILE", help="write every size's measurements to FILE (JSON)")
    parser.add_argument("--load", metavar="FILE", action="append",
                        help="add the sizes of an earlier --save to the summary (e.g. a long 100k run); repeatable")  # fmt: skip
    # internal: a phase process
    parser.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--control", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--bare-url", help=argparse.SUPPRESS)
    parser.add_argument("--when", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    from connector.logs import configure_logging

    configure_logging("console", "WARNING")
    args.phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    args.profile_phases = {p.strip() for p in args.profile_phases.split(",") if p.strip()}
    unknown = (args.phases | args.profile_phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    if args.set:
        print(f"connection settings: {', '.join(args.set)}")
    print(f"sync benchmark: sizes {sizes}, phases {[p for p in PHASES if p == 'initial' or p in args.phases]}, "
          f"{os.cpu_count()} CPUs, twins in their own process, each phase in a fresh process", flush=True)  # fmt: skip
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for path in args.load or ():
        results.update(
            {int(n): runs for n, runs in json.loads(Path(path).read_text(encoding="utf-8")).items()}
        )
    for n in sizes:
        results[n] = bench_size(n, args)
        if args.save:
            Path(args.save).write_text(json.dumps(results, indent=1), encoding="utf-8")
    for n, runs in sorted(results.items()):
        rows = summary(n, runs)
        if rows:
            print_table(f"targets at {n:,} deals", rows)
    compare_idle(results)


if __name__ == "__main__":
    main()
