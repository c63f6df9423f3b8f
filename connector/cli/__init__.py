"""The ``cosell`` command line: a thin shell over the engine.

Exit codes: 0 ok; 1 failed (see the message); 2 bad configuration or mapping (the message names the
file, the key and what would be valid); 3 a remote system or the state store could not be reached or
signed into (try again later, or sign in).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from connector import __version__
from connector.errors import ConfigError, CosellError, RetryLater
from connector.logs import configure_logging
from connector.process import settle_collector
from connector.settings import Settings, load_settings

__all__ = ["app", "main"]

EXIT_FAILED, EXIT_CONFIG, EXIT_TEMPFAIL = 1, 2, 3

app = typer.Typer(
    name="cosell",
    help="Keeps CRM opportunities (Salesforce, Dynamics 365) and Partner Center co-sell referrals in agreement.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True, highlight=False)


class State:
    """What the global options decided; commands read settings through it, lazily."""

    def __init__(self, config: Path | None) -> None:
        self.config = config
        self._settings: Settings | None = None

    @property
    def has_config(self) -> bool:
        return self.config is not None or bool(os.environ.get("COSELL_CONFIG"))

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config)
            configure_logging(self._settings.log.format, self._settings.log.level)
        return self._settings


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cosell {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="YAML config file (default: $COSELL_CONFIG).", show_default=False
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = State(config)


#: Command modules, each with ``register(app)``. A module still being written is skipped; every
#: command has tests that run it through ``main``, so a missing one cannot go unnoticed.
COMMAND_MODULES = ("mappings", "db", "auth", "sync", "ops", "run", "doctor", "sandbox")
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"connector.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"connector.cli.{name}":
                raise
            continue
        module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: maps the error families to exit codes, never a traceback for bad input.

    Typer/click handle usage errors themselves (exit 2); our errors are mapped here.
    """
    _register()
    settle_collector()  # after the command modules' imports: see connector/process.py
    # Logs go to stderr, redacted, from the first line on; the config's format and level apply once
    # it is loaded. stdout is for what the command prints.
    configure_logging("auto", "WARNING")
    try:
        app(args=argv, prog_name="cosell")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAILED)
    except ConfigError as exc:
        for problem in exc.problems:
            err_console.print(f"[bold red]config error[/] {problem}", soft_wrap=True)
        return EXIT_CONFIG
    except RetryLater as exc:
        err_console.print(f"[bold yellow]try again later[/] {exc}", soft_wrap=True)
        return EXIT_TEMPFAIL
    except CosellError as exc:
        err_console.print(f"[bold red]error[/] {exc}", soft_wrap=True)
        return EXIT_FAILED
    return 0


def run() -> None:  # pragma: no cover - console script shim
    sys.exit(main())
