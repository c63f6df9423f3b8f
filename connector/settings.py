"""Settings: one YAML file, every key overridable from the environment, secrets never in the YAML.

Layering (pydantic-settings, highest first): environment (``COSELL_`` prefix, ``__`` for nesting,
e.g. ``COSELL_CONNECTIONS__ACME__CRM__BASE_URL``), then the YAML file (``--config`` or
``COSELL_CONFIG``), then defaults. Secrets (client secrets, passwords, private keys) come from the
environment or from a file named by the matching ``*_file`` key (e.g. ``/run/secrets/...``); a secret
written in the YAML in clear is refused. Every model is frozen.

Bad configuration raises :class:`~connector.errors.ConfigError` with one problem per bad key:
the file, the key path, what is wrong and what would be valid.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from connector.errors import ConfigError, ConfigProblem

__all__ = [
    "SECRET_KEYS",
    "ConflictPolicy",
    "Connection",
    "DynamicsCrm",
    "PartnerCenter",
    "SalesforceCrm",
    "Settings",
    "SyncPolicy",
    "WebhookSettings",
    "load_settings",
    "read_secret",
    "read_yaml_file",
]

ENV_PREFIX = "COSELL_"
CONNECTION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

#: Keys whose values are secrets: allowed from the environment, refused in the YAML file.
SECRET_KEYS = frozenset({"client_secret", "password", "private_key", "refresh_token", "webhook_secret"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def read_secret(value: SecretStr | None, file: Path | None, what: str) -> str | None:
    """The secret's value, from the environment-provided ``value`` or from ``file``; never logged."""
    if value is not None:
        return value.get_secret_value()
    if file is not None:
        try:
            return file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                [ConfigProblem(str(file), what, f"cannot read the secret file: {exc.strerror}")]
            ) from None
    return None


# --- CRM ---------------------------------------------------------------------------------------


class SalesforceAuth(_Frozen):
    """Salesforce OAuth 2.0, done by the connector itself (crm-apis.md §C)."""

    flow: Literal["jwt_bearer", "client_credentials", "password"] = "jwt_bearer"
    client_id: str
    username: str | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    private_key: SecretStr | None = None
    private_key_file: Path | None = None

    @model_validator(mode="after")
    def _flow_needs(self) -> SalesforceAuth:
        if self.flow in ("jwt_bearer", "password") and not self.username:
            raise ValueError(f"flow {self.flow} needs a username")
        return self


class SalesforceOptIn(_Frozen):
    """Which opportunities take part; same idea as Microsoft's "Sync with Partner Center" checkbox."""

    field: str | None = "Sync_with_Partner_Center__c"
    record_types: tuple[str, ...] = ()
    soql_filter: str | None = None


def _positive_ttl(v: timedelta) -> timedelta:
    if v <= timedelta(0):
        raise ValueError("metadata_ttl must be positive, e.g. PT1H")
    return v


#: how long the org's field and stage metadata (describe / option sets, stages, record types) is
#: reused by a long-lived adapter (the daemon's) before a run reads it again
MetadataTtl = Annotated[timedelta, AfterValidator(_positive_ttl)]


class SalesforceCrm(_Frozen):
    kind: Literal["salesforce"]
    login_url: str = "https://login.salesforce.com"
    instance_url: str | None = None
    api_version: str = "59.0"
    auth: SalesforceAuth
    opt_in: SalesforceOptIn = SalesforceOptIn()
    fields: dict[str, str] = Field(default_factory=dict)
    lookback: timedelta = timedelta(minutes=5)
    metadata_ttl: MetadataTtl = timedelta(hours=1)
    #: full loads above this many opportunities go through a Bulk API 2.0 job. Bulk cannot carry
    #: subqueries, so its related data costs ~5 IN queries per 2,000 deals, where a REST read brings
    #: it nested in one call per page (~400 deals with their children): REST is the cheaper read in
    #: calls at any size, and Bulk is kept for very large orgs only.
    bulk_threshold: int = Field(default=1_000_000, ge=1)
    api_budget_share: float = Field(default=0.25, gt=0, le=1)
    #: how often getDeleted sweeps for hard deletes and recycle-bin purges (soft deletes, the usual
    #: way a seller deletes, arrive with every run's queryAll); 0 = every run. Daily by default, like
    #: the full reconciliation, so an idle run stays one call. At most 14 days: getDeleted keeps 15.
    delete_sweep: timedelta = timedelta(days=1)

    @field_validator("api_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not re.fullmatch(r"\d{2,3}\.0", v):
            raise ValueError("api_version looks like 59.0")
        return v

    @field_validator("delete_sweep")
    @classmethod
    def _delete_sweep(cls, v: timedelta) -> timedelta:
        if not timedelta(0) <= v <= timedelta(days=14):
            raise ValueError("delete_sweep must be between 0 and 14 days (getDeleted keeps 15), e.g. PT1H")
        return v


class DynamicsAuth(_Frozen):
    """Client credentials for an application user in the environment (crm-apis.md §C)."""

    tenant_id: str
    client_id: str
    authority: str | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    certificate_file: Path | None = None
    certificate_thumbprint: str | None = None
    private_key_file: Path | None = None


class DynamicsOptIn(_Frozen):
    field: str | None = "new_syncwithpartnercenter"
    odata_filter: str | None = None


class DynamicsCrm(_Frozen):
    kind: Literal["dynamics"]
    base_url: str
    api_version: str = "9.2"
    auth: DynamicsAuth
    opt_in: DynamicsOptIn = DynamicsOptIn()
    fields: dict[str, str] = Field(default_factory=dict)
    stage_source: Literal["salesstage", "bpf", "statuscode"] = "salesstage"
    page_size: int = Field(default=500, ge=1, le=5000)
    lookback: timedelta = timedelta(minutes=5)
    metadata_ttl: MetadataTtl = timedelta(hours=1)


Crm = Annotated[SalesforceCrm | DynamicsCrm, Field(discriminator="kind")]


# --- Partner Center ----------------------------------------------------------------------------


class PartnerCenterAuth(_Frozen):
    """Delegated user sign-in (the Referrals API takes user tokens only, partner-center-api.md §9)."""

    mode: Literal["device_code", "password"] = "device_code"
    client_id: str
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    scopes: tuple[str, ...] = ("https://api.partner.microsoft.com/.default",)

    @model_validator(mode="after")
    def _mode_needs(self) -> PartnerCenterAuth:
        if self.mode == "password" and not self.username:
            raise ValueError("mode password needs a username")
        return self


class PartnerCenter(_Frozen):
    base_url: str = "https://api.partner.microsoft.com/v1.0"
    authority: str
    auth: PartnerCenterAuth
    sales_stage_format: Literal["percent_string", "percent_number", "stage_word"] = "percent_string"
    page_size: int = Field(default=100, ge=1, le=1000)
    lookback: timedelta = timedelta(minutes=5)
    location_id: str | None = None
    #: send CRM renames as a JSON-Patch on ``/name``: not a path the Swagger definition lists
    #: (partner-center-api.md), so off until confirmed against the live API for this tenant
    patch_name: bool = False
    #: referral writes in flight at once (different referrals; one referral's stay in order).
    #: Partner Center documents no limit for the referrals API; 429s are retried with Retry-After.
    max_concurrency: int = Field(default=4, ge=1, le=16)

    @field_validator("authority")
    @classmethod
    def _authority(cls, v: str) -> str:
        # msal refuses an authority without a path segment (crm-apis.md §C).
        if not re.fullmatch(r"https://[^/\s]+/[^/\s]+/?", v):
            raise ValueError("authority looks like https://login.microsoftonline.com/<tenant-id>")
        return v.rstrip("/")


# --- schedule and policy -----------------------------------------------------------------------


class Schedule(_Frozen):
    interval: timedelta | None = timedelta(minutes=10)
    jitter: timedelta = timedelta(seconds=30)
    cron: str | None = None
    full_reconcile: timedelta = timedelta(days=1)

    @model_validator(mode="after")
    def _one_trigger(self) -> Schedule:
        if self.cron and self.interval and "interval" in self.model_fields_set:
            raise ValueError("give either interval or cron, not both")
        if self.cron and len(self.cron.split()) != 5:
            raise ValueError("cron needs five fields (minute hour day month weekday)")
        return self


ConflictPolicy = Literal["crm-wins", "partner-center-wins", "newest-wins", "manual"]

#: Fields a sync policy may name (the canonical deal's synced fields).
POLICY_FIELDS = frozenset(
    {
        "name",
        "value",
        "close_date",
        "notes",
        "sales_stage",
        "status",
        "team",
        "solutions",
        "campaign_id",
        "customer_contact",
        "help_requested",
        "external_reference_id",
    }
)


class SyncPolicy(_Frozen):
    default: ConflictPolicy = "newest-wins"
    fields: dict[str, ConflictPolicy] = Field(default_factory=dict)
    allow_backward_stages: bool = False
    create_referrals: bool = True
    create_opportunities: bool = True
    dry_run: bool = False

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - POLICY_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(POLICY_FIELDS))}"
            )
        return v


class Connection(_Frozen):
    """One CRM org paired with one Partner Center account."""

    crm: Crm
    partner_center: PartnerCenter
    mappings: tuple[str, ...] = Field(min_length=1)
    schedule: Schedule = Schedule()
    policy: SyncPolicy = SyncPolicy()
    enabled: bool = True


# --- global ------------------------------------------------------------------------------------


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "cosell"


class StateSettings(_Frozen):
    url: str | None = None  # default: sqlite under data_dir


class LogSettings(_Frozen):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class TlsSettings(_Frozen):
    ca_bundle: Path | None = None


class HttpSettings(_Frozen):
    host: str = "0.0.0.0"  # noqa: S104 - the container's health/metrics port must be reachable
    port: int = Field(default=9464, ge=0, le=65535)


class WebhookSettings(_Frozen):
    """The optional Partner Center webhook receiver on the daemon's HTTP server (partner-center-api.md
    §10; :mod:`connector.daemon.webhook`). Off by default: the scheduled poll is the sync path, the
    webhook only makes a referral's change arrive sooner."""

    enabled: bool = False
    #: POST ``<path>/<connection>`` (or ``<path>`` alone when the daemon runs one connection)
    path: str = Field(default="/webhooks/partner-center", pattern=r"^/[A-Za-z0-9._~/-]*[A-Za-z0-9._~-]$")
    #: hosts the signing certificate (``X-MS-Certificate-Url``) may be fetched from, over HTTPS only
    allowed_certificate_hosts: tuple[str, ...] = ("3psostorageacct.blob.core.windows.net",)
    #: PEM file of the root certificate(s) the signing certificate must chain to (the Microsoft roots)
    trusted_roots_file: Path | None = None
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)

    @model_validator(mode="after")
    def _roots_when_enabled(self) -> WebhookSettings:
        if self.enabled and self.trusted_roots_file is None:
            raise ValueError("enabled needs trusted_roots_file (PEM of the Microsoft root certificates)")
        if self.enabled and not self.allowed_certificate_hosts:
            raise ValueError("enabled needs at least one allowed_certificate_hosts entry")
        return self


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        frozen=True,
        extra="forbid",
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    state: StateSettings = StateSettings()
    log: LogSettings = LogSettings()
    tls: TlsSettings = TlsSettings()
    http: HttpSettings = HttpSettings()
    webhook: WebhookSettings = WebhookSettings()
    connections: dict[Annotated[str, Field(pattern=CONNECTION_NAME.pattern)], Connection] = Field(
        default_factory=dict
    )
    #: where the config came from (directory mapping paths are resolved against); set by load_settings
    config_file: Path | None = None

    @property
    def state_url(self) -> str:
        return self.state.url or f"sqlite:///{self.data_dir / 'state.db'}"

    def connection(self, name: str) -> Connection:
        try:
            return self.connections[name]
        except KeyError:
            known = ", ".join(sorted(self.connections)) or "none configured"
            raise ConfigError(
                [
                    ConfigProblem(
                        str(self.config_file or "configuration"),
                        f"connections.{name}",
                        "unknown connection",
                        known,
                    )
                ]
            ) from None

    def resolve_path(self, path: str | Path) -> Path:
        """A path from the config file, relative to the file's directory."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.config_file is None:
            return p
        return self.config_file.parent / p

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init carries the parsed YAML (see load_settings); the environment wins over it.
        return (env_settings, init_settings)


# --- loading -----------------------------------------------------------------------------------


def _secrets_in(data: Any, path: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            here = f"{path}.{key}" if path else str(key)
            if key in SECRET_KEYS and value not in (None, ""):
                found.append(here)
            found += _secrets_in(value, here)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += _secrets_in(value, f"{path}[{i}]")
    return found


def _env_name(key_path: str) -> str:
    return ENV_PREFIX + key_path.replace(".", "__").upper()


def _valid_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """The keys accepted where an unknown key ``loc[-1]`` was found (for 'unknown key' errors)."""
    current: Any = model
    parts = list(loc[:-1])
    while True:
        origin, args = get_origin(current), get_args(current)
        if origin is Annotated:
            current = args[0]
        elif origin in (dict, Mapping) and parts:
            parts.pop(0)
            current = args[1]
        elif origin in (tuple, list) and parts:
            parts.pop(0)
            current = args[0]
        elif origin in (Union, UnionType):
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            tagged = [
                m
                for m in models
                if parts and get_args(m.model_fields.get("kind", _NO_KIND).annotation) == (parts[0],)
            ]
            if tagged:
                parts.pop(0)
                current = tagged[0]
            elif len(models) == 1:
                current = models[0]
            else:
                return ""
        elif isinstance(current, type) and issubclass(current, BaseModel):
            if not parts:
                return ", ".join(current.model_fields)
            field = current.model_fields.get(str(parts.pop(0)))
            if field is None:
                return ""
            current = field.annotation
        else:
            return ""


_NO_KIND = FieldInfo(annotation=None)


def _problems(exc: ValidationError, source: str) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ("salesforce", "dynamics")))
        key = ".".join(str(p) for p in loc)
        message = err["msg"].removeprefix("Value error, ")
        valid = ""
        if err["type"] == "extra_forbidden":
            message = "unknown key"
            valid = _valid_keys(Settings, tuple(err["loc"]))
        elif err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] == "string_pattern_mismatch" and len(loc) == 3 and loc[0] == "connections":
            key = ".".join(str(p) for p in loc[:2])
            message = (
                f"connection name {loc[1]!r} is not allowed (it is also used in environment variable names)"
            )
            valid = "lower-case letters, digits and underscores, starting with a letter"
        elif err["type"] == "literal_error" or err["type"] == "union_tag_invalid":
            valid = str(err.get("ctx", {}).get("expected", ""))
        problems.append(
            ConfigProblem(f"{source} (or env {_env_name(key)})" if key else source, key, message, valid)
        )
    return problems


def read_yaml_file(path: Path, what: str, error: type[ConfigError], missing_hint: str = "") -> Any:
    """Parse one YAML file; every way it can be unreadable becomes ``error`` naming the file (and the
    line and column of a syntax error)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error([ConfigProblem(str(path), "", f"{what} not found", missing_hint)]) from None
    except OSError as exc:
        raise error([ConfigProblem(str(path), "", f"cannot read {what}: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(
            [ConfigProblem(str(path), where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]
        ) from None


def load_settings(config_file: Path | str | None = None) -> Settings:
    """Read the YAML file (``config_file`` or ``$COSELL_CONFIG``), overlay the environment, validate."""
    path_text = str(config_file) if config_file is not None else os.environ.get("COSELL_CONFIG")
    path = Path(path_text).expanduser().resolve() if path_text else None
    data: dict[str, Any] = {}
    source = str(path) if path else "environment"
    if path is not None:
        loaded = read_yaml_file(path, "config file", ConfigError)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([ConfigProblem(str(path), "", "the config file must be a mapping of keys")])
        data = loaded
        secrets = _secrets_in(data)
        if secrets:
            raise ConfigError(
                [
                    ConfigProblem(
                        str(path),
                        key,
                        "secrets must not be written in the config file",
                        f"set {_env_name(key)} or use {key.rsplit('.', 1)[-1]}_file: /run/secrets/...",
                    )
                    for key in secrets
                ]
            )
        data.pop("config_file", None)
    try:
        return Settings(**data, config_file=path)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, source)) from None
