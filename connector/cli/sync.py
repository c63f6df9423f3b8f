"""``cosell sync``: one run of every (or one) connection; ``--dry-run`` prints the plan and changes
nothing. Exit codes: 0 all records synced; 1 the run finished but some records failed or are
blocked; 2 bad configuration; 3 a remote or the state store could not be reached or signed into."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from connector.errors import ConfigError, RetryLater, SignInRequired
from connector.state import open_store
from connector.sync.engine import RunReport
from connector.sync.factory import run_context

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

EXIT_OK, EXIT_RECORDS, EXIT_UNREACHABLE = 0, 1, 3


def _plan_table(report: RunReport) -> Table:
    table = Table(title=f"{report.connection}: plan (dry run, nothing written)", title_justify="left")
    for column in ("record", "field", "direction", "before", "after", "rule"):
        table.add_column(column, overflow="fold")
    for item in report.planned:
        record = " / ".join(x for x in (item.crm_id, item.referral_id) if x) or item.name
        for fieldname, direction, old, new, rule in item.plan.explanations:
            table.add_row(record, fieldname, direction, _short(old), _short(new), rule)
        for refusal in item.plan.refusals:
            table.add_row(record, refusal.field, "blocked", "", "", f"{refusal.rule}: {refusal.message}")
        for waiting in item.plan.waiting:
            table.add_row(record, waiting.field, "waits", "", "", f"{waiting.rule}: {waiting.message}")
        for conflict in item.plan.conflicts:
            table.add_row(
                record,
                conflict.field,
                "conflict",
                _short(conflict.crm_value),
                _short(conflict.pc_value),
                "policy:manual",
            )
    return table


def _short(value: object) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _summary(reports: list[tuple[RunReport, dict[str, int]]]) -> Table:
    table = Table(title="summary", title_justify="left")
    columns = (
        "connection",
        "planned",
        "pc created",
        "pc updated",
        "crm created",
        "crm updated",
        "unchanged",
        "conflicts",
        "blocked",
        "waiting",
        "failed",
        "API calls",
    )
    for column in columns:
        table.add_column(column)
    for report, calls in reports:
        c = report.counts
        table.add_row(
            report.connection,
            *(
                str(c[k])
                for k in (
                    "planned",
                    "pc_created",
                    "pc_updated",
                    "crm_created",
                    "crm_updated",
                    "unchanged",
                    "conflicts",
                    "blocked",
                    "waiting",
                    "failed",
                )
            ),
            ", ".join(f"{system} {n}" for system, n in sorted(calls.items())) or "0",
        )
    return table


def sync(
    ctx: typer.Context,
    connection: Annotated[
        str | None, typer.Option("--connection", "-n", help="Only this connection.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; write nothing anywhere.")
    ] = False,
    full: Annotated[bool, typer.Option("--full", help="Ignore the cursors: compare everything.")] = False,
    opportunity: Annotated[
        str | None, typer.Option("--opportunity", help="Only this CRM opportunity id.")
    ] = None,
    referral: Annotated[str | None, typer.Option("--referral", help="Only this referral id.")] = None,
) -> None:
    """One run of every (or one) connection."""
    settings = ctx.obj.settings
    names = [connection] if connection else sorted(n for n, c in settings.connections.items() if c.enabled)
    if not names:
        raise ConfigError("no connections configured")
    for name in names:
        settings.connection(name)  # unknown names fail before anything runs
    try:
        store = open_store(settings.state_url)
    except RetryLater as exc:
        console.print(f"[bold red]state store unreachable[/] {exc}")
        raise typer.Exit(EXIT_UNREACHABLE) from None
    results: list[tuple[RunReport, dict[str, int]]] = []
    worst = EXIT_OK
    try:
        for name in names:
            try:
                with run_context(settings, name, store) as run:
                    report = run.engine.run(
                        dry_run=dry_run, full=full, crm_id=opportunity, referral_id=referral
                    )
                    calls: dict[str, int] = {}
                    for key, n in run.calls.snapshot().items():
                        calls[key.system] = calls.get(key.system, 0) + n
            except (RetryLater, SignInRequired) as exc:
                console.print(f"[bold red]{name}: cannot reach or sign in[/] {exc}")
                worst = max(worst, EXIT_UNREACHABLE)
                continue
            if dry_run:
                console.print(_plan_table(report))
            for record, cause, message in report.problems:
                console.print(f"{name}: {record}: {cause}: {message}")
            for kind, record, detail in report.drift:
                console.print(f"{name}: reconciliation found {kind}: {record}: {detail}")
            if report.counts["failed"] or report.counts["blocked"]:
                worst = max(worst, EXIT_RECORDS)
            results.append((report, calls))
    finally:
        store.close()
    if results:
        console.print(_summary(results))
    raise typer.Exit(worst)


def register(root: typer.Typer) -> None:
    root.command(name="sync")(sync)
