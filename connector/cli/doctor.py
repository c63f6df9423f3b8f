"""``cosell doctor [--connection NAME]``: is this installation able to sync, and if not, what to do.

Each check prints one line, ``PASS``, ``FAIL`` or ``WARN`` (worth knowing, does not stop a sync),
with what was found, and for a failure a ``fix:`` line saying what to do:

- the configuration loads;
- the state store is reachable and its schema is at the newest migration;
- per connection: the mapping files are valid; the Partner Center sign-in gives a token; the CRM
  signs in and answers with its stage metadata; the CRM's stages and the mapping's agree (a CRM stage
  the mapping does not know; a mapping stage the CRM does not have, which fails when the connector
  writes it);
- per connection, from the CRM's own field metadata (``CrmAdapter.opportunity_fields``): every field
  the configuration names (``crm.fields.*``, ``crm.opt_in.field``) exists on the opportunity — one
  the connector reads on every run or writes fails, one it merely reads when present warns with what
  is lost without it; and the restricted picklists take what the mapping makes the connector write
  into them (Salesforce's solutions multi-select gets the ``values.solutions`` targets), and hold
  values the connector can read back (help types; lost reasons without a ``values.reasons`` entry
  reach Partner Center as "Others"). Stage labels are the stage check's.

Exit codes: 0 every check passed; 1 some check failed; 2 the configuration does not load. Never
prints a secret or a token: remote error texts pass the log redaction before they are shown.
Nothing is written, except what a sign-in writes anyway (the refreshed msal token cache).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import sqlalchemy as sa
import structlog
import typer

from connector.domain.model import HelpType
from connector.domain.stages import CrmStage, StageMapping
from connector.domain.values import DECLINE_LOST_REASONS
from connector.errors import ConfigError, CosellError, MappingError, RecordError, RetryLater, SignInRequired
from connector.logs import configure_logging, redact
from connector.mappings import MappingSet
from connector.remote.calls import CallCounter
from connector.remote.retry import RetryPolicy
from connector.seams import CrmField
from connector.settings import DynamicsCrm, SalesforceCrm, Settings, read_yaml_file

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


def _crm_adapter(settings: Settings, name: str, closing: ExitStack) -> Any:
    """The connection's CRM adapter, built as :func:`connector.sync.factory.run_context` builds it;
    ``closing`` closes it and its sign-in client."""
    conn = settings.connection(name)
    calls = CallCounter()
    if isinstance(conn.crm, DynamicsCrm):
        from connector.dynamics.adapter import build_adapter, dataverse_signin

        tokens = dataverse_signin(conn.crm, settings.tls.ca_bundle)
        closing.callback(tokens.close)
        dyn = build_adapter(
            conn.crm, tokens=tokens, ca_bundle=settings.tls.ca_bundle, calls=calls, policy=DOCTOR_POLICY
        )
        closing.callback(dyn.close)
        return dyn
    from connector.salesforce.adapter import SalesforceAdapter

    sf = SalesforceAdapter(conn.crm, ca_bundle=settings.tls.ca_bundle, calls=calls, policy=DOCTOR_POLICY)
    closing.callback(sf.close)
    return sf


# --- the CRM's fields --------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldRole:
    """One opportunity field the configuration names, and what its absence costs."""

    role: str  # the role in the adapter (sync_status, opt_in, team_fields, ...)
    key: str  # where it is configured, under connections.NAME (crm.fields.sync_status, crm.opt_in.field)
    name: str  # the API / logical name the CRM's metadata lists it under
    create: str  # the type to create it with
    #: what is lost without it; "" when the connector cannot do without it (the check fails)
    without: str = ""
    why: str = "the connector needs it"  # for required ones: what breaks


_SF_NEEDED = "the connector writes it on every synced opportunity; the adapter refuses to run without it"
#: Salesforce field roles (connector.salesforce.adapter.DEFAULT_FIELDS): the type to create each with,
#: what is lost without it (the check warns) or else what breaks without it (the check fails)
_SF_ROLES: dict[str, tuple[str, str, str]] = {
    "referral_id": ("Text(64), External ID, Unique", "", _SF_NEEDED),
    "referral_link": ("URL", "", _SF_NEEDED),
    "sync_status": ("Text(255)", "", _SF_NEEDED),
    "last_sync": ("Date/Time", "", _SF_NEEDED),
    "audit": ("Text(255)", "", _SF_NEEDED),
    "notes": ("Long Text Area", "", "notes from Partner Center are written to it: those writes would fail"),
    "campaign": ("Text(64)", "", "Partner Center campaign ids are written to it: those writes would fail"),
    "solutions": ("Picklist (Multi-Select)", "", "solutions are written to it: those writes would fail"),
    "help_type": (
        "Picklist",
        "help requests are not read from the CRM (no deal asks Microsoft for help)",
        "",
    ),
    "visibility": ("Checkbox", "no deal is marked visible to Microsoft sellers from the CRM", ""),
    "contact_consent": ("Checkbox", "the customer's consent to share its contact always reads as no", ""),
    "lost_reason": (
        "Picklist",
        "lost deals reach Partner Center with the reason 'Others', declining a referral from the CRM "
        "is refused (a decline needs a reason), and deals lost or declined in Partner Center come "
        "without their reason",
        "",
    ),
}
#: Salesforce roles that are fields of another object than Opportunity (not in its describe)
_SF_NOT_ON_OPPORTUNITY = frozenset({"account_duns"})

_DV_READ = "every opportunity read selects it, and Dataverse would refuse those reads"
_DV_WRITTEN = "the connector writes it, and Dataverse would refuse those writes"
#: Dataverse columns the Dynamics adapter uses (DynamicsOptions.from_settings): type to create, what breaks
_DV_ROLES: dict[str, tuple[str, str]] = {
    "referral_id": (
        "Single line of text (100)",
        "every opportunity read selects it and the connector writes it",
    ),
    "referral_link": ("Single line of text (format URL)", _DV_WRITTEN),
    "sync_status": ("Single line of text", _DV_WRITTEN),
    "audit_line": ("Multiple lines of text", _DV_WRITTEN),
    "synced_at": ("Date and time", _DV_WRITTEN),
    "campaign_id": ("Single line of text", _DV_WRITTEN),
    "solutions_field": ("Single line of text", _DV_READ),
    "team_fields": ("Lookup (User)", _DV_READ),
}
#: crm.fields keys of a Dynamics connection that are settings, not columns
_DV_SETTINGS = frozenset(
    {"team_source", "solutions_source", "bpf_entity_set", "bpf_process_id", "change_tracking"}
)


def _field_roles(crm: SalesforceCrm | DynamicsCrm, adapter: Any) -> list[FieldRole]:
    """The opportunity fields the connection's configuration names, as its adapter resolved them."""
    roles: list[FieldRole] = []
    if isinstance(crm, SalesforceCrm):
        from connector.salesforce.adapter import REQUIRED_ROLES

        if crm.opt_in.field:
            roles.append(
                FieldRole("opt_in", "crm.opt_in.field", crm.opt_in.field, "Checkbox", why=_SF_NEEDED)
            )
        for role, name in adapter.fields.items():
            if not name or role in _SF_NOT_ON_OPPORTUNITY:
                continue
            create, without, why = _SF_ROLES.get(role, ("see config/example.yaml", "", ""))
            if role in REQUIRED_ROLES:
                without, why = "", why or _SF_NEEDED
            elif not without and not why:
                without = "the connector reads it only when it exists"
            roles.append(FieldRole(role, f"crm.fields.{role}", name, create, without, why))
        return roles
    o = adapter.options
    if o.opt_in_field:
        roles.append(FieldRole("opt_in", "crm.opt_in.field", o.opt_in_field, "Yes/No", why=_DV_READ))
    columns: list[tuple[str, str | None]] = [("referral_id", o.referral_id_field), *o.bookkeeping.items()]
    if o.solutions_source == "field":
        columns.append(("solutions_field", o.solutions_field))
    if o.team_source == "fields":
        # a lookup is read as its _<name>_value property; the column itself is <name>
        columns += [("team_fields", t.removeprefix("_").removesuffix("_value")) for t in o.team_fields]
    for role, name in columns:
        if name:
            create, why = _DV_ROLES.get(role, ("see config/example.yaml", _DV_READ))
            roles.append(FieldRole(role, f"crm.fields.{role}", name, create, why=why))
    return roles


def _refused_roles(exc: ConfigError, roles: Sequence[FieldRole]) -> frozenset[str]:
    """The configured fields an adapter refused to go on without (it checks them when it reads the
    org's metadata); empty when the error is about something else."""
    keys = {r.key for r in roles}
    problems = exc.problems
    if problems and all(p.key in keys and "does not exist" in p.problem for p in problems):
        return frozenset(p.key for p in problems)
    return frozenset()


@dataclass(frozen=True)
class CrmReading:
    """What the CRM answered: its stages and opportunity fields (None when they could not be read)."""

    stages: Sequence[CrmStage] | None
    fields: Mapping[str, CrmField] | None
    roles: Sequence[FieldRole]
    #: configuration keys of fields the adapter itself reported missing (it reads no metadata without them)
    refused: frozenset[str] = frozenset()
    fields_error: str = ""


def check_crm(settings: Settings, name: str) -> tuple[Check, CrmReading | None]:
    crm = settings.connection(name).crm
    what = f"{name}: CRM ({crm.kind}) sign-in and stages"
    where = crm.base_url if isinstance(crm, DynamicsCrm) else (crm.instance_url or crm.login_url)
    closing = ExitStack()
    stages: list[CrmStage] | None = None
    fields: Mapping[str, CrmField] | None = None
    refused: frozenset[str] = frozenset()
    fields_error = ""
    try:
        adapter = _crm_adapter(settings, name, closing)
        roles = _field_roles(crm, adapter)
        try:
            stages = list(adapter.stages())
        except SignInRequired:
            raise
        except ConfigError as exc:
            refused = _refused_roles(exc, roles)
            if not refused:
                raise
        if not refused:
            try:
                fields = dict(adapter.opportunity_fields())
            except SignInRequired:
                raise
            except CosellError as exc:
                fields_error = _safe(exc)
    except SignInRequired as exc:
        return Check("FAIL", what, _safe(exc), "check crm.auth (client id, user, secret or key)"), None
    except RetryLater as exc:
        return Check("FAIL", what, _safe(exc), f"check that {where} is reachable, then try again"), None
    except CosellError as exc:
        return Check(
            "FAIL", what, _safe(exc), "check crm.auth, the CRM URL, the user's permissions and tls.ca_bundle"
        ), None
    finally:
        closing.close()
    reading = CrmReading(stages, fields, roles, refused, fields_error)
    if stages is None:
        return Check(
            "WARN",
            what,
            f"signed in at {where}; the adapter reads no stages until the configured fields exist (below)",
        ), reading
    active = sum(1 for s in stages if s.active)
    return Check("PASS", what, f"signed in at {where}; {len(stages)} stages ({active} active)"), reading


def check_fields(name: str, crm: SalesforceCrm | DynamicsCrm, reading: CrmReading) -> list[Check]:
    """Every field the configuration names exists on the CRM's opportunity."""
    what = f"{name}: CRM fields"
    sf = isinstance(crm, SalesforceCrm)
    checks: list[Check] = []
    if reading.fields_error:
        checks.append(
            Check(
                "FAIL",
                what,
                f"the opportunity's field metadata could not be read: {reading.fields_error}",
                "let the connector's CRM user read the object metadata (Salesforce: describe of Opportunity;"
                " Dataverse: read on Entity and Attribute), then run doctor again",
            )
        )
    present = reading.fields or {}
    for role in reading.roles:
        missing = role.key in reading.refused or (reading.fields is not None and role.name not in present)
        if not missing:
            continue
        where = f"Opportunity.{role.name}" if sf else f"opportunity.{role.name}"
        create = (
            f"create custom field {role.name} (type {role.create}) on Opportunity"
            if sf
            else f"create custom column {role.name} (type {role.create}) on the Opportunity table"
        )
        setting = f"connections.{name}.{role.key}"
        if role.without:
            off = " ('' to do without it)" if sf and role.key.startswith("crm.fields.") else ""
            checks.append(
                Check(
                    "WARN",
                    what,
                    f"{where} ({role.key}) does not exist: {role.without}",
                    f"{create} or set {setting}{off}",
                )
            )
        else:
            checks.append(
                Check(
                    "FAIL",
                    what,
                    f"{where} ({role.key}) does not exist: {role.why}",
                    f"{create} or set {setting}",
                )
            )
    if not sf:
        unknown = sorted(set(crm.fields) - set(_DV_ROLES) - _DV_SETTINGS)
        if unknown:
            valid = ", ".join(sorted({*_DV_ROLES, *_DV_SETTINGS}))
            checks.append(
                Check(
                    "WARN",
                    what,
                    f"crm.fields.{', crm.fields.'.join(unknown)}: not a Dynamics field role, ignored",
                    f"rename under connections.{name}.crm.fields (valid: {valid}) or remove",
                )
            )
    if not checks and reading.fields is not None:
        checks.append(
            Check("PASS", what, f"all {len(reading.roles)} opportunity fields the configuration names exist")
        )
    return checks


def _values_file(mappings: MappingSet, map_name: str, crm_value: str | None = None) -> str:
    """The mapping file a value map (entry) comes from: the last file that sets it, as the merge does."""
    for path in reversed(mappings.files):
        try:
            raw = read_yaml_file(path, "mapping file", MappingError)
        except MappingError:
            continue
        entries = ((raw or {}).get("values") or {}).get(map_name) if isinstance(raw, dict) else None
        if isinstance(entries, dict) and (crm_value is None or crm_value in entries):
            return str(path)
    return str(mappings.files[-1]) if mappings.files else "the mapping files"


def _unmapped_reasons(values: Sequence[str], mappings: MappingSet) -> list[str]:
    """CRM reasons the engine cannot put in Partner Center's words (it then sends 'Others')."""
    out = []
    for value in values:
        try:
            mappings.values["reasons"].to_partner_center(value, passthrough=True)
        except RecordError:
            out.append(value)
    return out


def check_picklists(
    name: str, crm: SalesforceCrm | DynamicsCrm, reading: CrmReading, mappings: MappingSet
) -> list[Check]:
    """The CRM's restricted picklists against what the mapping writes into them, and picklist values
    the connector cannot read back. Where each value lands follows the adapters: Salesforce writes the
    CRM's solution codes (the ``values.solutions`` keys; an unmapped Partner Center id as itself)
    into the solutions multi-select and the
    stage label into StageName (the stage check's); it reads help types as Partner Center's codes and
    lost reasons through ``values.reasons``. Dynamics writes stages only (salesstage / status reasons);
    its lost reasons are the Lost status reasons."""
    what = f"{name}: CRM picklists vs mapping"
    fields = reading.fields
    if fields is None:
        return []
    roles = {r.role: r for r in reading.roles}
    checks: list[Check] = []
    checked: list[str] = []

    def picklist(role: str) -> CrmField | None:
        r = roles.get(role)
        found = fields.get(r.name) if r is not None else None
        return found if found is not None and found.picklist_values else None

    if isinstance(crm, SalesforceCrm):
        solutions = picklist("solutions")
        if solutions is not None and solutions.restricted:
            checked.append(f"{solutions.name} takes every values.solutions code")
            for crm_value, _ in mappings.values["solutions"].pairs:
                written = crm_value
                if written not in solutions.picklist_values:
                    source = _values_file(mappings, "solutions", crm_value)
                    checks.append(
                        Check(
                            "FAIL",
                            what,
                            f"Opportunity.{solutions.name} ({solutions.type}, restricted) has no value "
                            f"{_safe(written)!r}, which values.solutions.{crm_value} in {source} writes",
                            "add the value to the picklist or change the mapping",
                        )
                    )
        help_type = picklist("help_type")
        if help_type is not None:
            codes = {h.value for h in HelpType}
            checked.append(f"{help_type.name} holds Partner Center help types")
            unreadable = [v for v in help_type.picklist_values if v not in codes]
            if unreadable:
                checks.append(
                    Check(
                        "WARN",
                        what,
                        f"Opportunity.{help_type.name} has value(s) that are not Partner Center help types: "
                        f"{_safe(', '.join(unreadable))}; deals with them are read as asking for no help",
                        f"use Partner Center's codes as the picklist's API values ({', '.join(sorted(codes))})",
                    )
                )
        lost = picklist("lost_reason")
        lost_values = list(lost.picklist_values) if lost is not None else []
        lost_where = f"Opportunity.{lost.name}" if lost is not None else ""
        if lost is not None and lost.restricted:
            # the other way: Partner Center's reason goes back through the map into this field with
            # a close made in Partner Center; a value the picklist lacks fails that close's write
            checked.append(f"{lost.name} takes every reason values.reasons writes back")
            refused = sorted({v for v in _reasons_written_back(mappings) if v not in lost.picklist_values})
            if refused:
                checks.append(
                    Check(
                        "FAIL",
                        what,
                        f"{lost_where} (picklist, restricted) has no value {_safe(', '.join(refused))}, which "
                        "values.reasons writes back for a deal lost or declined in Partner Center",
                        f"add them to the picklist or map those reasons to its values in "
                        f"{_values_file(mappings, 'reasons')}",
                    )
                )
    else:
        stages = reading.stages or ()
        lost_values = [s.label for s in stages if s.is_closed and not s.is_won]
        lost_where = "opportunity.statuscode (Lost status reasons)"
    if lost_values:
        checked.append(f"every {lost_where} value has a values.reasons entry")
        unmapped = _unmapped_reasons(lost_values, mappings)
        if unmapped:
            checks.append(
                Check(
                    "WARN",
                    what,
                    f"{lost_where} value(s) with no entry in values.reasons: {_safe(', '.join(unmapped))}; "
                    "they reach Partner Center as 'Others'",
                    f"add them under values.reasons in {_values_file(mappings, 'reasons')}",
                )
            )
    if not checks:
        detail = (
            "; ".join(checked) if checked else "no restricted picklist takes a mapped value besides the stage"
        )
        checks.append(Check("PASS", what, detail))
    return checks


def _reasons_written_back(mappings: MappingSet) -> list[str]:
    """The CRM values the reasons map writes for Partner Center's reasons (first entry per reason)."""
    out: list[str] = []
    for reason in DECLINE_LOST_REASONS:
        try:
            out.append(mappings.values["reasons"].to_crm(reason))
        except RecordError:
            continue  # not mapped back: not written (the engine says so in the audit)
    return out


def _stage_fields(crm: SalesforceCrm | DynamicsCrm) -> tuple[str, str]:
    """Where the connector writes an open and a closed stage label."""
    if isinstance(crm, SalesforceCrm):
        return "Opportunity.StageName", "Opportunity.StageName"
    open_field = {
        "salesstage": "opportunity.salesstage",
        "statuscode": "opportunity.statuscode",
        "bpf": "the business process flow's stages",
    }[crm.stage_source]
    return open_field, "opportunity.statuscode (Won/Lost status reasons)"


def check_stages(
    name: str,
    crm_stages: Sequence[CrmStage],
    mapping: StageMapping,
    fields: tuple[str, str] = ("the CRM's stages", "the CRM's stages"),
) -> list[Check]:
    """The CRM's stages against the mapping file's, matched the way the mapping matches labels.
    ``fields``: where an open and a closed stage label is written (named in a failure)."""
    what = f"{name}: CRM stages vs mapping"
    source = mapping.source or "the mapping file"
    crm = StageMapping(tuple(crm_stages))  # only for its label index (same normalisation as the mapping)
    unmapped = [s.label for s in crm_stages if s.active and mapping.stage(s.label) is None]
    reverse_keys: dict[str, list[str]] = {}
    for key, record_type, label in mapping.reverse:
        at = f"@{record_type}" if record_type else ""
        reverse_keys.setdefault(label, []).append(f"stages.reverse.{key.value}{at}")
    absent: list[str] = []
    inactive: list[str] = []
    for stage in mapping.stages:
        found = crm.stage(stage.label)
        if found is None:
            absent.append(stage.label)
        elif not found.active:
            inactive.append(stage.label)
    written = [label for label in absent + inactive if label in reverse_keys]
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

        def named(label: str) -> str:
            stage = mapping.stage(label)
            field = fields[1] if stage is not None and stage.is_closed else fields[0]
            return f"{label} ({', '.join(reverse_keys[label])} -> {field})"

        checks.append(
            Check(
                "FAIL",
                what,
                f"the mapping sets CRM stage(s) the CRM does not have as active: {'; '.join(map(named, written))}",
                f"point stages.reverse in {source} at active CRM stages, or add / activate them in the CRM",
            )
        )
    others = {
        "not in the CRM": [label for label in absent if label not in reverse_keys],
        "inactive in the CRM": [label for label in inactive if label not in reverse_keys],
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
    """Check configuration, state store, sign-ins, stage mappings and the CRM's fields; print what to fix."""
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
        crm_check, reading = check_crm(settings, name)
        report.add(crm_check)
        if reading is None:
            continue
        crm = settings.connection(name).crm
        if reading.stages is not None and mappings is not None:
            for check in check_stages(name, reading.stages, mappings.stages, _stage_fields(crm)):
                report.add(check)
        for check in check_fields(name, crm, reading):
            report.add(check)
        if mappings is not None:
            for check in check_picklists(name, crm, reading, mappings):
                report.add(check)
    return report.failed


def register(root: typer.Typer) -> None:
    root.command(name="doctor")(doctor)
