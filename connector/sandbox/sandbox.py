"""The local sandbox: every remote system the connector talks to, as HTTPS twins on this machine,
seeded with a book of business, plus a ready config that points at them.

:class:`Sandbox` starts, under one throwaway certificate authority:

- the identity provider (Entra ID twin): Partner Center's delegated sign-in and Dataverse's
  client-credentials sign-in;
- two Partner Center accounts: one per connection. Each CRM org belongs to its own partner account
  (a partner's Salesforce business unit and its Dynamics business unit file their own referrals);
  sharing one account between two CRMs would make each connection create the other's inbound
  referrals a second time;
- Salesforce and Dataverse.

It writes into its directory the CA bundle (``ca.pem``), the config (``cosell.yaml``: two
connections, the shipped mappings, SQLite state under ``data/``), and the secrets in an env file
(``sandbox.env``, mode 0600) - never in the YAML, as for a real deployment - and then performs each
connection's Partner Center device-code sign-in, approving the code on the identity provider the
way an operator would in a browser. The msal token cache lands under ``data/signin/``.

The twins listen on ephemeral ports, so the config is valid only while the sandbox that wrote it runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from connector.dynamics.twin import DataverseTwin
from connector.errors import ConfigError, ConfigProblem
from connector.partner_center.twin import PartnerCenterTwin
from connector.remote.idp_twin import IdpTwin
from connector.remote.twin import Clock, Twin, TwinCA
from connector.salesforce.twin import SalesforceTwin
from connector.sandbox.book import Book, build_book
from connector.sandbox.seeding import seed_dataverse, seed_partner_center, seed_salesforce
from connector.settings import Settings, load_settings

__all__ = [
    "DEFAULT_SEED",
    "DV_CONNECTION",
    "SF_CONNECTION",
    "Sandbox",
    "SandboxFiles",
]

DEFAULT_SEED = 7
SF_CONNECTION = "contoso_sf"
DV_CONNECTION = "contoso_d365"
#: connection -> which CRM it pairs (the book's key)
CRM_OF = {SF_CONNECTION: "salesforce", DV_CONNECTION: "dynamics"}

PC_CLIENT = "cosell-sandbox-partner-center"
PC_USER = "cosell-service@partner.example"
SF_CLIENT = "3MVG9-cosell-sandbox"
SF_USER = "integration@partner.example"
DV_CLIENT = "cosell-sandbox-dataverse"
#: identifies a directory this module wrote; only such a directory is ever cleared
MARKER = ".cosell-sandbox"
_OWNED = ("cosell.yaml", "sandbox.env", "ca.pem", "data", MARKER)


@dataclass(frozen=True)
class SandboxFiles:
    directory: Path
    config: Path
    env: Path
    ca: Path
    data_dir: Path

    @property
    def state_db(self) -> Path:
        return self.data_dir / "state.db"

    @classmethod
    def under(cls, directory: Path) -> SandboxFiles:
        d = directory.expanduser().resolve()
        return cls(d, d / "cosell.yaml", d / "sandbox.env", d / "ca.pem", d / "data")


def _env_name(connection: str, *path: str) -> str:
    return "COSELL_CONNECTIONS__" + "__".join((connection, *path)).upper()


class Sandbox:
    """Twins + book + config. Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        directory: Path,
        *,
        seed: int = DEFAULT_SEED,
        salesforce: int = 240,
        dynamics: int = 200,
        clock: Clock | None = None,
    ) -> None:
        self.files = SandboxFiles.under(directory)
        self.seed = seed
        self.sizes = (salesforce, dynamics)
        # A running clock: twin timestamps move like real ones, so cursors and "newest wins" behave
        # as they would against the real services.
        self.clock = clock or Clock()
        self.ca = TwinCA()
        self.idp = IdpTwin(self.ca, clock=self.clock, device_interval=1)
        self.partner_center = {
            SF_CONNECTION: PartnerCenterTwin(
                self.ca, idp=self.idp, organization_name="Contoso Americas", port=0
            ),
            DV_CONNECTION: PartnerCenterTwin(
                self.ca,
                idp=self.idp,
                organization_id="4c0e5f2b-8d51-4a9e-9a43-1c2f8b7d6e10",
                organization_name="Contoso EMEA",
            ),
        }
        # Fresh credentials per sandbox: the env file is the only place they are written.
        self._secrets = {
            "sf_client_secret": secrets.token_urlsafe(24),
            "sf_password": secrets.token_urlsafe(18),
            "dv_client_secret": secrets.token_urlsafe(24),
            "pc_password": secrets.token_urlsafe(18),
        }
        self.salesforce = SalesforceTwin(
            self.ca,
            clock=self.clock,
            client_id=SF_CLIENT,
            client_secret=self._secrets["sf_client_secret"],
            users={SF_USER: self._secrets["sf_password"]},
        )
        self.dataverse = DataverseTwin(self.ca, clock=self.clock)
        self.book: Book | None = None
        self._started: list[Twin] = []

    # --- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Sandbox:
        try:
            self._prepare_directory()
            self.ca.write_pem(self.files.ca)
            self.idp.add_client(PC_CLIENT)  # a public client: device code, no secret
            self.idp.add_user(PC_USER, self._secrets["pc_password"])
            self.idp.add_client(DV_CLIENT, secret=self._secrets["dv_client_secret"])
            dv = self.dataverse
            # Only tokens the identity provider issued for this environment's scope are accepted.
            dv.auth_check = lambda header: self.idp.validate(header, scope_prefix=dv.base_url) is not None
            for twin in (self.idp, *self.partner_center.values(), self.salesforce, self.dataverse):
                twin.start()
                self._started.append(twin)
            self.book = build_book(
                self.seed,
                self.clock.now().replace(minute=0, second=0, microsecond=0),
                salesforce=self.sizes[0],
                dynamics=self.sizes[1],
            )
            seed_salesforce(self.salesforce, self.book)
            seed_dataverse(self.dataverse, self.book)
            for connection, crm in CRM_OF.items():
                seed_partner_center(self.partner_center[connection], self.book, crm)
            self._write_config()
            self._sign_in()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        while self._started:
            self._started.pop().stop()

    # --- files ------------------------------------------------------------------------------------
    def _prepare_directory(self) -> None:
        """Start from a clean directory; clear only what an earlier sandbox wrote there."""
        d = self.files.directory
        if d.exists() and any(d.iterdir()):
            if not (d / MARKER).exists():
                raise ConfigError(
                    [
                        ConfigProblem(
                            str(d),
                            "--dir",
                            "the directory is not empty and was not written by a sandbox",
                            "an empty or new directory",
                        )
                    ]
                )
            for name in _OWNED:
                target = d / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        d.mkdir(parents=True, exist_ok=True)
        (d / MARKER).write_text("written by `cosell sandbox`; safe to delete\n", encoding="utf-8")
        self.files.data_dir.mkdir(mode=0o700, exist_ok=True)

    def config_dict(self) -> dict[str, Any]:
        pc = self.partner_center
        partner_center = {
            name: {
                "base_url": twin.api_base_url,
                "authority": self.idp.authority,
                "auth": {"mode": "device_code", "client_id": PC_CLIENT},
                "location_id": f"sandbox-location-{i + 1}",
            }
            for i, (name, twin) in enumerate(pc.items())
        }
        return {
            "data_dir": str(self.files.data_dir),
            "state": {"url": f"sqlite:///{self.files.state_db}"},
            "tls": {"ca_bundle": str(self.files.ca)},
            "log": {"format": "auto", "level": "INFO"},
            "connections": {
                SF_CONNECTION: {
                    "crm": {
                        "kind": "salesforce",
                        "login_url": self.salesforce.base_url,
                        "auth": {"flow": "password", "client_id": SF_CLIENT, "username": SF_USER},
                        # the twin's whole daily allowance is the sandbox's to use
                        "api_budget_share": 1.0,
                    },
                    "partner_center": partner_center[SF_CONNECTION],
                    "mappings": ["builtin:salesforce-default.yaml"],
                },
                DV_CONNECTION: {
                    "crm": {
                        "kind": "dynamics",
                        "base_url": self.dataverse.base_url,
                        "auth": {
                            "tenant_id": self.idp.tenant_id,
                            "client_id": DV_CLIENT,
                            "authority": self.idp.authority,
                        },
                        # where the connector keeps its bookkeeping on the opportunity
                        "fields": {
                            "referral_id": "new_referralid",
                            "referral_link": "new_referrallink",
                            "sync_status": "new_syncstatus",
                            "audit_line": "new_syncaudit",
                            "synced_at": "new_lastsyncedon",
                        },
                    },
                    "partner_center": partner_center[DV_CONNECTION],
                    "mappings": ["builtin:dynamics-default.yaml"],
                },
            },
        }

    def environment(self) -> dict[str, str]:
        """The secrets, as the environment variables the config expects them in."""
        return {
            _env_name(SF_CONNECTION, "crm", "auth", "client_secret"): self._secrets["sf_client_secret"],
            _env_name(SF_CONNECTION, "crm", "auth", "password"): self._secrets["sf_password"],
            _env_name(DV_CONNECTION, "crm", "auth", "client_secret"): self._secrets["dv_client_secret"],
        }

    def _write_config(self) -> None:
        header = (
            "# Written by `cosell sandbox` for its local twins. The twins listen on ephemeral ports: this\n"
            "# file is valid only while the sandbox that wrote it is running.\n"
            f"# Secrets are not here: load {self.files.env.name} into the environment first.\n"
        )
        self.files.config.write_text(
            header + yaml.safe_dump(self.config_dict(), sort_keys=False), encoding="utf-8"
        )
        # The env file holds secrets: created private, never world-readable even for a moment.
        env = self.files.env
        env.unlink(missing_ok=True)
        fd = os.open(env, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(
                "# cosell sandbox secrets (valid while the sandbox runs). Load with: set -a; . ./sandbox.env; set +a\n"
            )
            for name, value in self.environment().items():
                handle.write(f"{name}={value}\n")

    @contextlib.contextmanager
    def _env(self) -> Iterator[None]:
        """The secrets in ``os.environ`` for the duration (settings read them there), then restored."""
        saved = {k: os.environ.get(k) for k in self.environment()}
        os.environ.update(self.environment())
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def settings(self) -> Settings:
        """The sandbox config loaded as ``cosell --config`` would load it, with the env file applied."""
        with self._env():
            return load_settings(self.files.config)

    def _sign_in(self) -> None:
        """Each connection's one-off device-code sign-in, approved on the identity provider the way the
        operator would approve it in a browser (the code is never shown: nobody needs to type it)."""
        settings = self.settings()
        for name in settings.connections:
            self.idp.sign_in(settings, name, PC_USER)

    # --- for the demo -----------------------------------------------------------------------------
    def now(self) -> datetime:
        return self.clock.now()
