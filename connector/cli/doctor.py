"""``cosell doctor [--connection NAME]``: is this installation able to sync, and if not, what to do.

Each check prints one line, ``PASS``, ``FAIL`` or ``WARN`` (worth knowing, does not stop a sync),
with what was found, and for a failure a ``fix:`` line saying what to do:

- the configuration loads;
- the state store is reachable and its schema is at the newest migration;
- per connection: the mapping files are valid; the Partner Center sign-in gives a token; the CRM
  signs in and answers with its stage metadata; the CRM's stages and the mapping's agree (a CRM stage
  the mapping does not know; a mapping stage the CRM does not have, which fails when the connector
  writes it).

Exit codes: 0 every check passed; 1 some check failed; 2 the configuration does not load. Never
prints a secret or a token: remote error texts pass the log redaction before they are shown.
Nothing is written, except what a sign-in writes anyway (the refreshed msal token cache).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import sqlalchemy as sa
import structlog
import typer

from connector.domain.stages import CrmStage, StageMapping
from connector.errors import ConfigError, CosellError, RetryLater, SignInRequired
from connector.logs import configure_logging, redact
from connector.mappings import MappingSet
from connector.remote.calls import CallCounter
from connector.remote.retry import RetryPolicy
from connector.settings import DynamicsCrm, Settings

__all__ = ["Check", "doctor"]

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2

#: A doctor answers in seconds: one retry for a blip, no minutes of back-off against a dead remote.
DOCTOR_POLICY = RetryPolicy(max_attempts=2, initial_wait=0.5, max_wait=2.0, max_total_wait=5.0)

Verdict = Literal["PASS", "FAIL", "WARN"]


@dataclass(frozen=True)
class Check:
    verdict: Verdict
    what: str
    detail: str
    fix: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.verdict}  {self.what}: {self.detail}"]
        if self.fix and self.verdict != "PASS":
            out.append(f"      fix: {self.fix}")
        return out


def _safe(text: object) -> str:
    """An error text as the log redaction would let it through (no token, no e-mail address)."""
    return str(redact(None, "", {"text": str(text)})["text"])


class Report:
    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.checks: list[Check] = []

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        for line in check.lines():
            self.echo(line)
        return check

    @property
    def failed(self) -> int:
        return sum(1 for c in self.checks if c.verdict == "FAIL")


# --- the checks --------------------------------------------------------------------------------


def check_store(settings: Settings) -> Check:
    from connector.state import open_store

    url = settings.state_url
    safe_url = sa.engine.make_url(url).render_as_string(hide_password=True)
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        # opening a missing SQLite file would create it; a doctor should not leave one behind
        if path and path != ":memory:" and not Path(path).exists():
            return Check(
                "FAIL",
                "state store",
                f"no state database yet at {path}",
                "run `cosell db upgrade` (or start `cosell run`, which migrates at start)",
            )
    try:
        store = open_store(url, migrate=False)
    except ConfigError as exc:
        return Check("FAIL", "state store", _safe(exc), "set state.url to a valid database URL")
    try:
        store.ping()
        current, head = store.schema_revision()
    except (RetryLater, sa.exc.SQLAlchemyError) as exc:
        return Check(
            "FAIL",
            "state store",
            f"{safe_url} unreachable: {_safe(getattr(exc, 'orig', None) or exc)}".strip(),
            "check state.url (COSELL_STATE__URL) and that the database is up and accepts this user",
        )
    finally:
        store.close()
    if current != head:
        return Check(
            "FAIL",
            "state store",
            f"{safe_url} is at schema revision {current or 'none'}, this version needs {head}",
            "run `cosell db upgrade` (or start `cosell run`, which migrates at start)",
        )
    return Check("PASS", "state store", f"{safe_url} reachable, schema at the newest revision ({head})")


def check_mappings(settings: Settings, name: str) -> tuple[Check, MappingSet | None]:
    from connector.sync.factory import connection_mappings

    what = f"{name}: mappings"
    try:
        mappings = connection_mappings(settings, name)
    except ConfigError as exc:
        problems = "; ".join(str(p) for p in exc.problems)
        return Check(
            "FAIL", what, _safe(problems), f"`cosell mappings check --connection {name}` shows the full table"
        ), None
    files = ", ".join(p.name for p in mappings.files)
    return Check("PASS", what, f"{files} valid ({len(mappings.stages.stages)} CRM stages mapped)"), mappings


def check_partner_center(settings: Settings, name: str) -> Check:
    from connector.remote.signin import partner_center_signin

    what = f"{name}: Partner Center sign-in"
    login = f"run `cosell auth login --connection {name}`"
    try:
        signin = partner_center_signin(settings, name)
    except ConfigError as exc:
        return Check("FAIL", what, _safe(exc), "fix partner_center.auth in the configuration")
    try:
        status = signin.status()
        if signin.mode == "device_code" and not status.signed_in:
            return Check("FAIL", what, f"not signed in ({status.authority})", login)
        signin.token()  # refreshes through the identity provider when the cached token is stale
    except SignInRequired as exc:
        return Check("FAIL", what, _safe(exc), login)
    except RetryLater as exc:
        return Check(
            "FAIL", what, _safe(exc), "check partner_center.authority and the network, then try again"
        )
    except CosellError as exc:
        return Check("FAIL", what, _safe(exc), "check partner_center.auth and tls.ca_bundle")
    finally:
        signin.close()
    who = f" as {status.username}" if status.username else ""
    return Check("PASS", what, f"token available{who} ({signin.mode}, {status.authority})")


def _crm_adapter(settings: Settings, name: str) -> Any:
    """The connection's CRM adapter, built as :func:`connector.sync.factory.run_context` builds it."""
    conn = settings.connection(name)
    calls = CallCounter()
    if isinstance(conn.crm, DynamicsCrm):
        from connector.dynamics.adapter import build_adapter, dataverse_signin

        tokens = dataverse_signin(conn.crm, settings.tls.ca_bundle)
        return build_adapter(
            conn.crm, tokens=tokens, ca_bundle=settings.tls.ca_bundle, calls=calls, policy=DOCTOR_POLICY
        )
    from connector.salesforce.adapter import SalesforceAdapter

    return SalesforceAdapter(conn.crm, ca_bundle=settings.tls.ca_bundle, calls=calls, policy=DOCTOR_POLICY)


def check_crm(settings: Settings, name: str) -> tuple[Check, Sequence[CrmStage] | None]:
    crm = settings.connection(name).crm
    what = f"{name}: CRM ({crm.kind}) sign-in and stages"
    where = crm.base_url if isinstance(crm, DynamicsCrm) else (crm.instance_url or crm.login_url)
    adapter = None
    try:
        adapter = _crm_adapter(settings, name)
        stages = list(adapter.stages())
    except SignInRequired as exc:
        return Check("FAIL", what, _safe(exc), "check crm.auth (client id, user, secret or key)"), None
    except RetryLater as exc:
        return Check("FAIL", what, _safe(exc), f"check that {where} is reachable, then try again"), None
    except CosellError as exc:
        return Check(
            "FAIL", what, _safe(exc), "check crm.auth, the CRM URL, the user's permissions and tls.ca_bundle"
        ), None
    finally:
        if adapter is not None:
            adapter.close()
    active = sum(1 for s in stages if s.active)
    return Check("PASS", what, f"signed in at {where}; {len(stages)} stages ({active} active)"), stages


def check_stages(name: str, crm_stages: Sequence[CrmStage], mapping: StageMapping) -> list[Check]:
    """The CRM's stages against the mapping file's, matched the way the mapping matches labels."""
    what = f"{name}: CRM stages vs mapping"
    source = mapping.source or "the mapping file"
    crm = StageMapping(tuple(crm_stages))  # only for its label index (same normalisation as the mapping)
    unmapped = [s.label for s in crm_stages if s.active and mapping.stage(s.label) is None]
    reverse_targets = {label for _key, _rt, label in mapping.reverse}
    absent: list[str] = []
    inactive: list[str] = []
    for stage in mapping.stages:
        found = crm.stage(stage.label)
        if found is None:
            absent.append(stage.label)
        elif not found.active:
            inactive.append(stage.label)
    written = [label for label in absent + inactive if label in reverse_targets]
    checks: list[Check] = []
    if unmapped:
        checks.append(
            Check(
                "FAIL",
                what,
                f"in the CRM but not in the mapping: {', '.join(unmapped)}",
                f"add them under stages.crm in {source} (with probability, and closed/won for closing stages)",
            )
        )
    if written:
        checks.append(
            Check(
                "FAIL",
                what,
                f"the mapping sets CRM stage(s) the CRM does not have as active: {', '.join(written)}",
                f"point stages.reverse in {source} at active CRM stages, or activate them in the CRM",
            )
        )
    others = {
        "not in the CRM": [label for label in absent if label not in reverse_targets],
        "inactive in the CRM": [label for label in inactive if label not in reverse_targets],
    }
    elsewhere = "; ".join(f"{how}: {', '.join(labels)}" for how, labels in others.items() if labels)
    if elsewhere:
        checks.append(
            Check(
                "WARN",
                what,
                f"in the mapping but {elsewhere}",
                f"harmless unless records still carry them; remove them from {source} to keep it true",
            )
        )
    if not checks:
        checks.append(
            Check("PASS", what, f"all {len(crm_stages)} CRM stages are in the mapping and vice versa")
        )
    return checks


# --- the command -------------------------------------------------------------------------------


def doctor(
    ctx: typer.Context,
    connection: Annotated[
        str | None, typer.Option("--connection", "-n", help="Only this connection.", show_default=False)
    ] = None,
) -> None:
    """Check configuration, state store, sign-ins and stage mappings; print what to fix."""
    report = Report(typer.echo)
    try:
        settings: Settings = ctx.obj.settings
        names = [connection] if connection else sorted(settings.connections)
        for name in names:
            settings.connection(name)
        if not names:
            raise ConfigError("no connections configured (see config/example.yaml)")
    except ConfigError as exc:
        for problem in exc.problems:
            report.add(
                Check(
                    "FAIL",
                    "configuration",
                    str(problem),
                    "correct the key (config/example.yaml documents every key)",
                )
            )
        raise typer.Exit(EXIT_CONFIG) from None
    with _logs_to_stderr(settings):
        failed = _run_checks(report, settings, names)
    typer.echo(
        f"{len(report.checks)} checks: {failed} failed" if failed else f"{len(report.checks)} checks passed"
    )
    sys.stdout.flush()
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


@contextmanager
def _logs_to_stderr(settings: Settings) -> Iterator[None]:
    """Remote clients log their sign-ins; keep those off stdout, where the checks are, and put the
    caller's structlog configuration back afterwards (doctor also runs in-process, from tests)."""
    previous = structlog.get_config()
    configure_logging(settings.log.format, "WARNING")
    try:
        yield
    finally:
        structlog.configure(**previous)


def _run_checks(report: Report, settings: Settings, names: list[str]) -> int:
    where = settings.config_file or "environment"
    report.add(Check("PASS", "configuration", f"{where} loaded ({', '.join(names)})"))
    report.add(check_store(settings))
    for name in names:
        if not settings.connection(name).enabled:
            report.add(Check("WARN", name, "connection disabled (enabled: false); checked anyway"))
        mapping_check, mappings = check_mappings(settings, name)
        report.add(mapping_check)
        report.add(check_partner_center(settings, name))
        crm_check, stages = check_crm(settings, name)
        report.add(crm_check)
        if stages is not None and mappings is not None:
            for check in check_stages(name, stages, mappings.stages):
                report.add(check)
    return report.failed


def register(root: typer.Typer) -> None:
    root.command(name="doctor")(doctor)
