"""Operator commands over the state store: ``cosell status``, ``cosell conflicts list|resolve``,
``cosell dlq list|retry|drop`` and ``cosell audit``.

They read (and, for resolve/retry/drop, flag) what the sync engine recorded; none talks to the CRM or
Partner Center. Output is a Rich table on a terminal, plain aligned text otherwise (pipes, logs,
``watch``), and JSON with ``--json``. Customer contact details never reach the output: the audit and
the conflict queue can hold team members with e-mails and phone numbers, so those values are shown
as counts or ``[redacted]`` in every format, JSON included.

Exit codes: 0 ok; 1 an id that does not exist (or is no longer open); 2 bad configuration or usage;
3 the state store cannot be reached.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from connector.errors import ConfigError, RetryLater
from connector.state import AuditEntry, Conflict, DeadLetter, RunRecord, StateStore, open_store
from connector.sync.engine import MAX_RECORD_ATTEMPTS

__all__ = ["register"]

EXIT_NOT_FOUND, EXIT_UNREACHABLE = 1, 3

ConnectionOption = Annotated[
    str | None, typer.Option("--connection", "-n", help="Only this connection.", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


# --- redaction ------------------------------------------------------------------------------------

REDACTED = "[redacted]"
#: Fields (and dict keys) whose values are people: shown as a count or [redacted], never verbatim.
_PERSON_KEYS = re.compile(
    r"(team|contact|member|person|people|email|e_mail|phone|mobile|first_?name|last_?name|full_?name)",
    re.IGNORECASE,
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# International phone numbers inside free text (notes, error details). Only the "+" form: a looser
# pattern would eat dates and amounts, which operators need to see.
_PHONE = re.compile(r"\+\d[\d ()./-]{5,}\d")


def _scrub_text(text: str) -> str:
    return _PHONE.sub(REDACTED, _EMAIL.sub(REDACTED, text))


def _safe(fieldname: str, value: Any) -> Any:
    """A JSON-ready copy of an audit/conflict value with every contact detail removed.

    A people field keeps only its shape (how many members), which is what an operator needs to
    follow a team edit; anything else is scrubbed recursively, e-mails and phones in free text too.
    """
    if value is None or isinstance(value, bool | int | float):
        return value  # e.g. contact_consent: a flag about a person, not a detail of one
    if _PERSON_KEYS.search(fieldname):
        if isinstance(value, list | tuple):
            return f"{len(value)} member{'s' if len(value) != 1 else ''} {REDACTED}"
        return REDACTED
    return _scrub(value)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, Mapping):
        return {str(k): (REDACTED if _PERSON_KEYS.search(str(k)) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _show(value: Any, width: int = 60) -> str:
    """One cell of text for an already-safe value: JSON for structures, shortened to ``width``."""
    if value is None:
        return "(none)"
    if value == "":
        return '""'  # an emptied field, as opposed to one that was never set
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = " ".join(text.split())  # one line per row, whatever the value held
    return text if len(text) <= width else text[: width - 3] + "..."


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else ""


# --- output ---------------------------------------------------------------------------------------


def _console() -> Console:
    # Built per call, not at import: the stream (and whether it is a terminal) is only known now.
    return Console(highlight=False, emoji=False, soft_wrap=False)


def _rows(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], wrap: Sequence[str] = ()
) -> None:
    """A table: Rich on a terminal, aligned plain text otherwise (no colours, no box drawing).

    On a narrow terminal only the ``wrap`` columns (values, messages) fold; ids and times stay on
    one line so they can still be copied into the next command.
    """
    console = _console()
    if console.is_terminal:
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column, overflow="fold", no_wrap=column not in wrap)
        for row in rows:
            # Text(...) rather than str: a cell such as "[redacted]" must not be read as markup.
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
        return
    cells = [list(columns), *([" ".join(c.split()) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    typer.echo(title)
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _pairs(title: str, items: Sequence[tuple[str, str]]) -> None:
    """A key/value block (one connection's status)."""
    console = _console()
    if console.is_terminal:
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in items:
            table.add_row(Text(key), Text(value))
        console.print(table)
        return
    typer.echo(title)
    width = max((len(k) for k, _ in items), default=0)
    for key, value in items:
        typer.echo(f"  {(key + ':').ljust(width + 1)} {value}")


def _json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _fail(message: str, code: int) -> typer.Exit:
    Console(stderr=True, highlight=False).print(Text(message), soft_wrap=True)
    return typer.Exit(code)


# --- the store ------------------------------------------------------------------------------------


@contextmanager
def _open(ctx: typer.Context) -> Iterator[StateStore]:
    """The configured state store, closed afterwards; unreachable -> exit 3 with the reason; a
    state.url that points at no usable database is a config error from open_store (exit 2)."""
    url = ctx.obj.settings.state_url  # a bad config raises ConfigError here: main() exits 2
    safe_url = _safe_url(url)
    try:
        store = open_store(url)
    except RetryLater as exc:
        raise _fail(f"state store unreachable: {exc}", EXIT_UNREACHABLE) from None
    try:
        yield store
    except sa.exc.OperationalError as exc:  # the database went away half-way through
        raise _fail(f"state store {safe_url} unreachable: {exc.orig or exc}", EXIT_UNREACHABLE) from None
    finally:
        store.close()


def _safe_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(unparseable URL)"


def _connections(ctx: typer.Context, connection: str | None) -> list[str]:
    """The configured connection names to report on; an unknown name is a config error (exit 2)."""
    settings = ctx.obj.settings
    if connection:
        settings.connection(connection)
        return [connection]
    names = sorted(settings.connections)
    if not names:
        raise ConfigError("no connections configured")
    return names


# --- status ---------------------------------------------------------------------------------------


def _run_json(run: RunRecord | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {
        "run_id": run.run_id,
        "started_at": _when(run.started_at),
        "finished_at": _when(run.finished_at) or None,
        "outcome": run.outcome,
        "counts": dict(run.counts),
        "error": _scrub_text(run.error),
    }


def _status_of(store: StateStore, name: str, enabled: bool) -> dict[str, Any]:
    return {
        "connection": name,
        "enabled": enabled,
        "last_run": _run_json(store.last_run(name)),
        "running": store.lease_holder(name),
        # The store keeps no per-cursor timestamp in its API; the values are opaque to us (SOQL
        # keysets, delta links), so the text view shortens them and JSON carries them whole.
        "cursors": store.cursors(name),
        "links": store.count_links(name),
        "outbox": store.outbox_depth(name),
        "conflicts_open": len(store.conflicts(name)),
        "dead_letters": {
            "open": len(store.dead_letters(name)),
            "retry": len(store.dead_letters(name, state="retry")),
        },
    }


def _counts(counts: Mapping[str, int]) -> str:
    shown = [f"{k} {v}" for k, v in sorted(counts.items()) if v]
    return ", ".join(shown) if shown else "none"


def _status_items(status: Mapping[str, Any]) -> list[tuple[str, str]]:
    run = status["last_run"]
    if run is None:
        last = "never"
    else:
        last = f"{run['started_at']} {run['outcome']}"
        if run["finished_at"]:
            last += f" (finished {run['finished_at']})"
    items = [("last run", last)]
    if run is not None:
        items.append(("run counts", _counts(run["counts"])))
        if run["error"]:
            items.append(("run error", _show(run["error"], 200)))
    if status["running"]:
        items.append(("running now", str(status["running"])))
    cursors = status["cursors"]
    if cursors:
        items += [(f"cursor {src}", _show(value, 48)) for src, value in sorted(cursors.items())]
    else:
        items.append(("cursors", "none (the next run reads everything)"))
    dead = status["dead_letters"]
    items += [
        ("links", _counts(status["links"])),
        ("outbox pending", _counts(status["outbox"])),
        ("open conflicts", str(status["conflicts_open"])),
        ("dead letters", f"open {dead['open']}, queued for retry {dead['retry']}"),
    ]
    return items


def status(ctx: typer.Context, connection: ConnectionOption = None, as_json: JsonOption = False) -> None:
    """Per connection: last run, cursors, links, pending outbox, open conflicts and dead letters."""
    names = _connections(ctx, connection)
    settings = ctx.obj.settings
    with _open(ctx) as store:
        report = [_status_of(store, name, settings.connections[name].enabled) for name in names]
    if as_json:
        _json({"connections": report})
        return
    for item in report:
        suffix = "" if item["enabled"] else " (disabled)"
        _pairs(f"connection {item['connection']}{suffix}", _status_items(item))


# --- conflicts ------------------------------------------------------------------------------------

conflicts_app = typer.Typer(help="The manual-conflict queue: list, resolve.", no_args_is_help=True)


class Take(StrEnum):
    CRM = "crm"
    PARTNER_CENTER = "partner-center"
    DISMISS = "dismiss"


#: CLI spelling -> what the store records.
_RESOLUTIONS = {Take.CRM: "crm", Take.PARTNER_CENTER: "partner_center", Take.DISMISS: "dismissed"}


def _conflict_json(c: Conflict) -> dict[str, Any]:
    return {
        "id": c.id,
        "connection": c.connection,
        "crm_id": c.crm_id,
        "referral_id": c.referral_id,
        "field": c.field,
        "base": _safe(c.field, c.base),
        "crm_value": _safe(c.field, c.crm_value),
        "pc_value": _safe(c.field, c.pc_value),
        "state": c.state,
        "resolution": c.resolution,
        "created_at": _when(c.created_at),
    }


@conflicts_app.command("list")
def conflicts_list(
    ctx: typer.Context, connection: ConnectionOption = None, as_json: JsonOption = False
) -> None:
    """Open conflicts: both sides changed a field differently under the "manual" policy."""
    with _open(ctx) as store:
        found = [_conflict_json(c) for c in store.conflicts(connection)]
    if as_json:
        _json({"conflicts": found})
        return
    if not found:
        typer.echo("no open conflicts")
        return
    rows = [
        [
            str(c["id"]),
            c["connection"],
            c["crm_id"] or "",
            c["referral_id"] or "",
            c["field"],
            _show(c["base"], 30),
            _show(c["crm_value"], 30),
            _show(c["pc_value"], 30),
            c["created_at"],
        ]
        for c in found
    ]
    columns = ("id", "connection", "crm id", "referral id", "field", "base", "crm", "partner center", "since")
    _rows(f"open conflicts ({len(rows)})", columns, rows, wrap=("base", "crm", "partner center"))


@conflicts_app.command("resolve")
def conflicts_resolve(
    ctx: typer.Context,
    conflict_id: Annotated[int, typer.Argument(metavar="ID", help="Conflict id from `conflicts list`.")],
    take: Annotated[
        Take,
        typer.Option("--take", help="Which side's value wins, or dismiss the conflict.", show_default=False),
    ],
) -> None:
    """Mark an open conflict resolved in favour of one side (or dismissed)."""
    with _open(ctx) as store:
        try:
            done = store.resolve_conflict(conflict_id, _RESOLUTIONS[take])
        except LookupError:
            raise _fail(
                f"no open conflict with id {conflict_id} (see `cosell conflicts list`)", EXIT_NOT_FOUND
            ) from None
    record = " / ".join(x for x in (done.crm_id, done.referral_id) if x)
    typer.echo(
        f"conflict {conflict_id} resolved ({done.resolution}): {done.connection} {record} {done.field}"
    )


# --- dead letters ---------------------------------------------------------------------------------

dlq_app = typer.Typer(help="Records that failed: list, retry, drop.", no_args_is_help=True)


def _letter_json(d: DeadLetter) -> dict[str, Any]:
    return {
        "id": d.id,
        "connection": d.connection,
        "system": d.system.value,
        "record_id": d.record_id,
        "cause": d.cause,
        "detail": _scrub_text(d.detail),
        "attempts": d.attempts,
        "state": d.state,
        "first_failed_at": _when(d.first_failed_at),
        "last_failed_at": _when(d.last_failed_at),
    }


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    connection: ConnectionOption = None,
    dropped: Annotated[bool, typer.Option("--dropped", help="Also list dropped letters.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Dead letters that are open or queued for retry (and dropped ones with --dropped)."""
    states = ("open", "retry", "dropped") if dropped else ("open", "retry")
    with _open(ctx) as store:
        letters = sorted(
            (d for state in states for d in store.dead_letters(connection, state=state)),
            key=lambda d: d.id or 0,
        )
    found = [_letter_json(d) for d in letters]
    if as_json:
        _json({"dead_letters": found, "max_attempts": MAX_RECORD_ATTEMPTS})
        return
    if not found:
        typer.echo("no dead letters")
        return
    rows = [
        [
            str(d["id"]),
            d["connection"],
            d["system"],
            d["record_id"],
            d["cause"],
            f"{d['attempts']}/{MAX_RECORD_ATTEMPTS}",
            d["state"],
            d["last_failed_at"],
            _show(d["detail"], 60),
        ]
        for d in found
    ]
    columns = ("id", "connection", "system", "record", "cause", "attempts", "state", "last failed", "detail")
    _rows(f"dead letters ({len(rows)})", columns, rows, wrap=("cause", "detail"))


def _set_letter(store: StateStore, letter_id: int, state: str) -> None:
    try:
        store.set_dead_letter_state(letter_id, state)
    except LookupError:
        raise _fail(f"no dead letter with id {letter_id} (see `cosell dlq list`)", EXIT_NOT_FOUND) from None


@dlq_app.command("retry")
def dlq_retry(
    ctx: typer.Context,
    letter_id: Annotated[
        int | None, typer.Argument(metavar="ID", help="Dead letter id from `dlq list`.", show_default=False)
    ] = None,
    retry_all: Annotated[bool, typer.Option("--all", help="Every open dead letter.")] = False,
    connection: ConnectionOption = None,
) -> None:
    """Queue a dead letter (or --all open ones) for the next sync run."""
    if (letter_id is None) == (not retry_all):
        raise typer.BadParameter("give either a dead-letter ID or --all")
    with _open(ctx) as store:
        if letter_id is not None:
            _set_letter(store, letter_id, "retry")
            typer.echo(f"dead letter {letter_id} queued for retry on the next sync run")
            return
        queued = 0
        for letter in store.dead_letters(connection):
            assert letter.id is not None
            try:
                store.set_dead_letter_state(letter.id, "retry")
            except LookupError:
                continue  # a run in progress just cleared it: nothing left to retry
            queued += 1
    typer.echo(f"{queued} dead letter{'s' if queued != 1 else ''} queued for retry")


@dlq_app.command("drop")
def dlq_drop(
    ctx: typer.Context,
    letter_id: Annotated[int, typer.Argument(metavar="ID", help="Dead letter id from `dlq list`.")],
) -> None:
    """Give up on a dead letter: it is no longer retried or listed (a new failure reopens it)."""
    with _open(ctx) as store:
        _set_letter(store, letter_id, "dropped")
    typer.echo(f"dead letter {letter_id} dropped")


# --- audit ----------------------------------------------------------------------------------------


def _audit_json(e: AuditEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": _when(e.at),
        "connection": e.connection,
        "run_id": e.run_id,
        "correlation_id": e.correlation_id,
        "crm_id": e.crm_id,
        "referral_id": e.referral_id,
        "action": e.action,
        "field": e.field,
        "old": _safe(e.field, e.old),
        "new": _safe(e.field, e.new),
        "direction": e.direction,
        "rule": _scrub_text(e.rule),
    }


def audit(
    ctx: typer.Context,
    connection: ConnectionOption = None,
    opportunity: Annotated[
        str | None, typer.Option("--opportunity", help="Only this CRM opportunity id.", show_default=False)
    ] = None,
    referral: Annotated[
        str | None, typer.Option("--referral", help="Only this referral id.", show_default=False)
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="The newest N entries.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """What the connector changed (or refused), oldest first, and which rule decided it."""
    if opportunity and referral:
        raise typer.BadParameter("give --opportunity or --referral, not both")
    with _open(ctx) as store:
        entries = [
            _audit_json(e)
            for e in store.audit(connection, crm_id=opportunity, referral_id=referral, limit=limit)
        ]
    if as_json:
        _json({"audit": entries})
        return
    if not entries:
        typer.echo("no audit entries")
        return
    rows = [
        [
            e["at"],
            e["connection"],
            e["run_id"],
            e["correlation_id"],
            e["crm_id"] or "",
            e["referral_id"] or "",
            e["action"],
            e["field"],
            f"{_show(e['old'])} -> {_show(e['new'])}",
            e["direction"],
            e["rule"],
        ]
        for e in entries
    ]
    columns = (
        "time",
        "connection",
        "run",
        "correlation",
        "crm id",
        "referral id",
        "action",
        "field",
        "old -> new",
        "direction",
        "rule",
    )
    _rows(f"audit ({len(rows)} entries, oldest first)", columns, rows, wrap=("old -> new", "rule"))


def register(root: typer.Typer) -> None:
    root.command(name="status")(status)
    root.add_typer(conflicts_app, name="conflicts")
    root.add_typer(dlq_app, name="dlq")
    root.command(name="audit")(audit)
