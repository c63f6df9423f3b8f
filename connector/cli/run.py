"""``cosell run``: the daemon. Every enabled connection on its schedule, ``/healthz``, ``/readyz`` and
``/metrics`` on ``http.host``:``http.port`` (plus the Partner Center webhook receiver when
``webhook.enabled``), until SIGTERM or SIGINT.

On a signal it takes no new work, lets the runs in flight finish for up to ``--grace`` seconds, and
exits 0 (a second signal stops the wait). A run still in flight after the grace period is abandoned
the way a kill would abandon it, which the engine makes safe (outbox first, page-by-page commits);
its run lease is released first so the next start does not wait out the lease.

Exit codes: 0 stopped by a signal; 2 bad configuration; 3 the state store is unreachable at start
(the orchestrator's restart policy retries).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Annotated

import structlog
import typer

from connector.daemon.http import HealthServer
from connector.daemon.metrics import Metrics
from connector.daemon.scheduler import Daemon, connection_names
from connector.daemon.webhook import WebhookReceiver
from connector.errors import ConfigError, ConfigProblem
from connector.logs import configure_logging
from connector.state import open_store

log = structlog.get_logger("connector.daemon")


class _ToStructlog(logging.Handler):
    """Sends stdlib logging (APScheduler, SQLAlchemy, Alembic, msal) through structlog, so that in a
    container every line is one JSON object and passes the same redaction."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            structlog.get_logger(record.name).log(
                record.levelno, record.getMessage(), logger=record.name, exc_info=record.exc_info or None
            )
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def _route_stdlib_logging() -> None:
    logging.root.handlers = [_ToStructlog()]
    # APScheduler logs every tick at INFO ("Running job ...", "executed successfully"); the engine
    # already logs one line per run. httpx logs one INFO line per request. Warnings still pass.
    for noisy in ("apscheduler", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(
    ctx: typer.Context,
    connection: Annotated[
        list[str] | None,
        typer.Option(
            "--connection", "-n", help="Only this connection (repeatable). Default: every enabled one."
        ),
    ] = None,
    grace: Annotated[
        float,
        typer.Option(
            "--grace",
            min=0,
            help="Seconds to let runs in flight finish after SIGTERM/SIGINT (keep below the orchestrator's stop timeout).",
        ),
    ] = 20.0,
) -> None:
    """Run the daemon: every connection on its schedule, health and metrics over HTTP, until stopped."""
    settings = ctx.obj.settings
    configure_logging(settings.log.format, settings.log.level)
    _route_stdlib_logging()

    names = connection_names(settings, connection)  # config problems first, before any state exists
    store = open_store(settings.state_url)  # applies pending migrations; unreachable -> exit 3
    metrics = Metrics()
    webhook: WebhookReceiver | None = None
    try:
        daemon = Daemon(settings, store, connections=names, metrics=metrics)
        webhook = WebhookReceiver.from_settings(
            settings, connections=daemon.names, trigger=daemon.request_referral_sync, metrics=metrics
        )
        http = HealthServer(
            settings.http.host,
            settings.http.port,
            store=store,
            metrics=metrics,
            connections=daemon.names,
            status=daemon.status,
            webhook=webhook,
        )
    except ConfigError:
        if webhook is not None:
            webhook.close()
        store.close()
        raise
    except OSError as exc:
        if webhook is not None:
            webhook.close()
        store.close()
        raise ConfigError(
            [
                ConfigProblem(
                    str(settings.config_file or "configuration"),
                    "http.port",
                    f"cannot listen on {settings.http.host}:{settings.http.port}: {exc.strerror}",
                    "a free port (0 picks one)",
                )
            ]
        ) from None

    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # runs in the main thread between bytecodes: only set flags here
        received.append(signal.Signals(signum).name)
        if stop.is_set():
            daemon.abort()
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    clean = True
    try:
        http.start()
        daemon.start()
        while not stop.wait(0.5):
            pass
        log.info("daemon.stopping", signal=received[0] if received else None, grace_seconds=grace)
        clean = daemon.stop(grace)
    finally:
        if not clean:
            # A run thread is still inside the engine; the interpreter would wait for it at exit.
            # Leave the way kill -9 would, minus the stale lease.
            daemon.release_leases()
            http.stop()
            log.warning("daemon.exit_with_run_in_flight")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        http.stop()
        if webhook is not None:
            webhook.close()
        store.close()
    raise typer.Exit(0)


def register(root: typer.Typer) -> None:
    root.command(name="run")(run)
