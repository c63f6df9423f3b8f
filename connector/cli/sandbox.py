"""``cosell sandbox`` and ``cosell demo``: the local twins with a book of business and a ready config;
and the main job shown end to end on them in one command.

Exit codes: 0 done (the sandbox was stopped with Ctrl-C/SIGTERM; the demo completed); 2 the
directory cannot be used (not empty and not a sandbox's); 1 anything else failed.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated

import structlog
import typer
from rich.console import Console

from connector.logs import configure_logging
from connector.sandbox import DEFAULT_SEED, Sandbox
from connector.sandbox.demo import run_demo
from connector.state import open_store

__all__ = ["register"]

DEFAULT_SANDBOX_DIR = Path(".cosell/sandbox")


def _console() -> Console:
    # A fixed width off a terminal keeps the report's layout the same in CI logs and tests.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 140)


def _describe(console: Console, box: Sandbox) -> None:
    assert box.book is not None
    book, files = box.book, box.files
    referrals = sum(len(v) for v in book.referrals.values())
    console.print(
        f"sandbox seeded (seed {box.seed}): {len(book.salesforce)} Salesforce and {len(book.dynamics)} "
        f"Dynamics 365 opportunities, {referrals} Partner Center referrals, {len(book.companies)} customers"
    )
    console.print(f"  config:   {files.config}")
    console.print(f"  secrets:  {files.env} (environment variables; keep the file private)")
    console.print(f"  CA:       {files.ca}")
    console.print(f"  state:    {files.state_db}")


@contextmanager
def _until_stopped() -> Iterator[threading.Event]:
    """An event set by SIGTERM (Ctrl-C raises KeyboardInterrupt as usual); the old handler restored."""
    stop = threading.Event()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def sandbox(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the config, secrets, CA and state go.")
    ] = DEFAULT_SANDBOX_DIR,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the book of business.")] = DEFAULT_SEED,
) -> None:
    """Start the local twins (identity provider, Partner Center, Salesforce, Dataverse) seeded with a
    book of business, write a ready config, and run until Ctrl-C or SIGTERM."""
    console = _console()
    with _until_stopped() as stop, Sandbox(directory, seed=seed) as box:
        _describe(console, box)
        files = box.files
        console.print()
        console.print("Signed in to Partner Center for every connection. In another shell:")
        console.print(f"  set -a; . {files.env}; set +a")
        console.print(f"  cosell --config {files.config} sync")
        console.print(f"  cosell --config {files.config} mappings check --connection contoso_sf")
        console.print()
        console.print(
            "The twins listen on ephemeral ports: this config works only while this sandbox runs. "
            "Stop it with Ctrl-C."
        )
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    console.print("sandbox stopped")


def demo(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Keep the sandbox's files here (default: a temporary directory)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the book of business.")] = DEFAULT_SEED,
) -> None:
    """The main job in one command: sandbox, one full two-way sync of every connection with a report,
    a few changes on each side, and a second run to show them flow."""
    console = _console()
    # The report says what happened record by record; per-record log lines would only repeat it.
    configure_logging("console", "ERROR")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cosell-demo-") as scratch:
        where = directory if directory is not None else Path(scratch) / "sandbox"
        with Sandbox(where, seed=seed) as box:
            _describe(console, box)
            store = open_store(box.settings().state_url)
            try:
                console.print()
                run_demo(box, store, console)
            finally:
                store.close()
    console.print()
    console.print(f"demo completed in {time.monotonic() - started:.1f} s")
    if directory is not None:
        console.print(
            f"the sandbox's state and config are kept in {where}; the config pointed at twins that "
            "stopped with the demo (run `cosell sandbox` for a live one)"
        )
    structlog.reset_defaults()


def register(root: typer.Typer) -> None:
    root.command(name="sandbox")(sandbox)
    root.command(name="demo")(demo)
