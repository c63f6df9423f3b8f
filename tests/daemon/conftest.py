"""The daemon against the twins: the twins (identity provider, Partner Center, Salesforce) run in the
test process over real HTTPS; ``cosell run`` runs as a subprocess on a config file and environment
secrets pointing at them, signed in beforehand through the IdP twin's device code (the msal cache
under ``data_dir`` is what the subprocess then runs on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from connector.partner_center.twin import PartnerCenterTwin
from connector.remote.idp_twin import IdpTwin
from connector.remote.twin import TwinCA
from connector.salesforce.twin import SalesforceTwin
from connector.settings import Settings, load_settings
from tests.e2e.conftest import (  # the twin fixtures are shared with the end-to-end suite
    CONNECTION,
    PC_PASSWORD,
    PC_USER,
    SF_PASSWORD,
    SF_SECRET,
    ca,
    connection_config,
    idp,
    pc,
    sf,
)

__all__ = ["ca", "idp", "pc", "sf"]  # fixtures re-exported for this package's tests

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "COSELL_CONNECTIONS__ACME__CRM__AUTH__CLIENT_SECRET": SF_SECRET,
    "COSELL_CONNECTIONS__ACME__CRM__AUTH__PASSWORD": SF_PASSWORD,
}
CANARIES = (SF_SECRET, SF_PASSWORD, PC_PASSWORD)


def write_config(
    tmp_path: Path, ca: TwinCA, idp: IdpTwin, pc: PartnerCenterTwin, sf: SalesforceTwin, **schedule: Any
) -> Path:
    config: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
        "tls": {"ca_bundle": str(ca.write_pem(tmp_path / "twins-ca.pem"))},
        "log": {"format": "json", "level": "INFO"},
        "http": {"host": "127.0.0.1", "port": 0},
        "connections": {
            CONNECTION: {
                **connection_config(idp, pc, sf),
                "schedule": {"interval": 1, "jitter": 0, "full_reconcile": 3600, **schedule},
            }
        },
    }
    path = tmp_path / "cosell.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def sign_in(settings: Settings, idp: IdpTwin) -> None:
    """The operator's one-off device-code sign-in, approved on the identity provider twin."""
    idp.sign_in(settings, CONNECTION, PC_USER)


@dataclass
class Setup:
    config: Path
    settings: Settings
    env: dict[str, str]


@pytest.fixture
def make_setup(
    tmp_path: Path,
    ca: TwinCA,
    idp: IdpTwin,
    pc: PartnerCenterTwin,
    sf: SalesforceTwin,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Setup]:
    def make(**schedule: Any) -> Setup:
        config = write_config(tmp_path, ca, idp, pc, sf, **schedule)
        for name, value in SECRETS.items():
            monkeypatch.setenv(name, value)
        settings = load_settings(config)
        sign_in(settings, idp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("COSELL_")}
        env.update(SECRETS)
        env["PYTHONUNBUFFERED"] = "1"
        return Setup(config, settings, env)

    return make


@pytest.fixture
def setup(make_setup: Callable[..., Setup]) -> Setup:
    return make_setup()


# --- the subprocess ----------------------------------------------------------------------------


@dataclass
class Daemon:
    """``python -m connector run`` with its output collected line by line."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events() if e.get("event") == name), None)

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
        """Poll ``condition`` until it returns something truthy; fail with the daemon's output if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.output()[-6000:]}"
                )
            result = condition()
            if result:
                return result
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}:\n{self.output()[-6000:]}")

    @property
    def port(self) -> int:
        event = self.wait_for(lambda: self.event("http.listening"), "the HTTP server")
        return int(event["port"])

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, text = self.get("/metrics")
        assert status == 200
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and want <= ls)

    def readyz(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/readyz")
        return status, json.loads(body)


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(setup: Setup, *args: str) -> Daemon:
        proc = subprocess.Popen(
            [sys.executable, "-m", "connector", "--config", str(setup.config), "run", *args],
            cwd=REPO,
            env=setup.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        daemon = Daemon(proc)
        daemon._reader = threading.Thread(target=daemon._read, daemon=True)
        daemon._reader.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        daemon.proc.wait(10)
        if daemon._reader is not None:
            daemon._reader.join(5)
        if daemon.proc.stdout is not None:
            daemon.proc.stdout.close()
