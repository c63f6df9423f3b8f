"""``cosell auth login|status``: the operator's one-off Partner Center sign-in, and who is signed in.

The Referrals API takes delegated user tokens only (partner-center-api.md §9), so an operator signs
in once per connection (device code; or username/password where the tenant has no MFA); the daemon
then runs on the refresh token in the msal cache under the state directory. Nothing here ever prints
a token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from connector.remote.signin import SignInStatus, partner_center_signin
from connector.settings import Settings, load_settings

__all__ = ["app"]

app = typer.Typer(help="Partner Center sign-in (delegated user, msal).", no_args_is_help=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (default: the global --config or $COSELL_CONFIG)."),
]


def _settings(ctx: typer.Context, config: Path | None) -> Settings:
    if config is not None:
        return load_settings(config)
    state: Any = ctx.find_root().obj
    if state is not None and hasattr(state, "settings"):
        settings: Settings = state.settings
        return settings
    return load_settings(None)


def _describe(status: SignInStatus) -> list[str]:
    if not status.signed_in:
        return [
            f"connection {status.connection}: not signed in ({status.mode}, {status.authority})",
            f"  run `cosell auth login --connection {status.connection}`",
        ]
    last = status.refresh_token_last_used
    return [
        f"connection {status.connection}: signed in as {status.username} ({status.mode}, {status.authority})",
        f"  refresh token last used: {last.isoformat(timespec='seconds') if last else 'unknown'}",
        f"  token cache: {status.cache_file}",
    ]


@app.command()
def login(
    ctx: typer.Context,
    connection: Annotated[str, typer.Option("--connection", "-n", help="Connection name from the config.")],
    config: ConfigOption = None,
) -> None:
    """Sign in to Partner Center for CONNECTION (device code, or the configured service account)."""
    settings = _settings(ctx, config)
    signin = partner_center_signin(settings, connection)
    try:
        if signin.mode == "password":
            typer.echo(
                "warning: username/password sign-in fails in tenants that enforce multi-factor "
                "authentication; use partner_center.auth.mode: device_code there.",
                err=True,
            )
            status = signin.login_password()
        else:
            status = signin.login_device_code(lambda message: typer.echo(message, err=True))
    finally:
        signin.close()
    for line in _describe(status):
        typer.echo(line)


@app.command()
def status(
    ctx: typer.Context,
    connection: Annotated[
        str | None, typer.Option("--connection", "-n", help="One connection (default: all).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Who is signed in to Partner Center, per connection (from the token cache; no network)."""
    settings = _settings(ctx, config)
    names = [connection] if connection else sorted(settings.connections)
    missing = False
    for name in names:
        signin = partner_center_signin(settings, name)
        try:
            current = signin.status()
        finally:
            signin.close()
        missing |= not current.signed_in
        for line in _describe(current):
            typer.echo(line)
    if missing:
        raise typer.Exit(1)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="auth")
