"""``cosell db upgrade|status``: apply the state store's schema migrations, show the revision."""

from __future__ import annotations

import typer

from connector.state import open_store

app = typer.Typer(help="State store schema (Alembic migrations).", no_args_is_help=True)


@app.command()
def upgrade(ctx: typer.Context) -> None:
    """Apply pending migrations (the daemon and `sync` also do this at start)."""
    store = open_store(ctx.obj.settings.state_url, migrate=True)
    current, head = store.schema_revision()
    store.close()
    typer.echo(f"state store at revision {current} (newest {head})")


@app.command()
def status(ctx: typer.Context) -> None:
    """Show the schema revision without changing anything."""
    store = open_store(ctx.obj.settings.state_url, migrate=False)
    current, head = store.schema_revision()
    store.close()
    typer.echo(f"state store at revision {current or 'none'} (newest {head})")
    if current != head:
        typer.echo("run `cosell db upgrade` to migrate")
        raise typer.Exit(1)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="db")
