"""The sandbox: a deterministic book of business in the twins, a config that loads and checks, the
secrets only in the env file, and ``cosell sandbox`` serving until SIGTERM."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.cli import main
from connector.domain.model import DealType
from connector.errors import ConfigError
from connector.partner_center.convert import referral_to_deal
from connector.partner_center.models import Referral
from connector.sandbox import DV_CONNECTION, SF_CONNECTION, Sandbox, build_book
from connector.sandbox.book import DV_STAGES, SF_STAGES
from connector.settings import load_settings

ANCHOR = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def fingerprint(box: Sandbox) -> dict[str, Any]:
    """What the twins hold, without the times (they follow the clock)."""
    sf = sorted(
        (r["Id"], r["Name"], r["StageName"], r["Amount"], r["Sync_with_Partner_Center__c"])
        for r in box.salesforce.tables["Opportunity"].values()
    )
    dv = sorted(
        (r["opportunityid"], r["name"], r["salesstage"], r["statecode"], r["estimatedvalue"])
        for r in box.dataverse.rows["opportunities"].values()
    )
    pc = {
        name: sorted((d["id"], d["name"], d["status"], d["substatus"]) for d in twin.referrals.values())
        for name, twin in box.partner_center.items()
    }
    return {"sf": sf, "dv": dv, "pc": pc}


def test_same_seed_same_book_and_every_state_is_there() -> None:
    book = build_book(7, ANCHOR)
    assert book == build_book(7, ANCHOR)
    assert book != build_book(8, ANCHOR)
    assert len(book.salesforce) >= 200 and len(book.dynamics) >= 200
    assert {d.stage for d in book.salesforce} == {s[0] for s in SF_STAGES}
    assert {d.stage for d in book.dynamics} == {s[1] for s in DV_STAGES} | {"Won", "Lost"}
    for crm in ("salesforce", "dynamics"):
        docs = book.referrals[crm]
        states = {(d["direction"], d["status"], d["substatus"]) for d in docs}
        for state in ("Received", "Accepted", "Won", "Lost", "Declined", "Expired"):
            assert any(s[2] == state for s in states if s[0] == "Incoming"), (crm, state)
        accepted_stages = {
            d["salesStage"] for d in docs if d["direction"] == "Incoming" and d["status"] == "Active"
        }
        assert accepted_stages == {"10", "20", "40", "60", "80"}
        # hand-registered referrals carry their opportunity's id, open and closed
        outbound = [d for d in docs if d["direction"] == "Outgoing"]
        assert {d["substatus"] for d in outbound} >= {"Accepted", "Won", "Lost"}
        deal_types = {referral_to_deal(Referral.model_validate(d)).deal_type for d in docs}
        assert deal_types >= {DealType.PRIVATE, DealType.PARTNER_LED, DealType.CO_SELL}


def test_two_sandboxes_with_one_seed_hold_the_same_records(tmp_path: Path) -> None:
    with Sandbox(tmp_path / "a", seed=11, salesforce=30, dynamics=30) as a:
        first = fingerprint(a)
    with Sandbox(tmp_path / "b", seed=11, salesforce=30, dynamics=30) as b:
        assert fingerprint(b) == first
    with Sandbox(tmp_path / "c", seed=12, salesforce=30, dynamics=30) as c:
        assert fingerprint(c) != first


def test_config_loads_checks_and_keeps_secrets_in_the_env_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Sandbox(tmp_path / "sb", salesforce=20, dynamics=20) as box:
        files = box.files
        settings = load_settings(files.config)  # no secret is needed to load it
        assert sorted(settings.connections) == sorted([SF_CONNECTION, DV_CONNECTION])
        assert settings.tls.ca_bundle == files.ca and files.ca.read_text().startswith(
            "-----BEGIN CERTIFICATE"
        )
        assert settings.state_url == f"sqlite:///{files.state_db}"
        assert settings.connection(SF_CONNECTION).mappings == ("builtin:salesforce-default.yaml",)
        assert settings.connection(DV_CONNECTION).mappings == ("builtin:dynamics-default.yaml",)
        config_text = files.config.read_text()
        env_text = files.env.read_text()
        for name, value in box.environment().items():
            assert value not in config_text
            assert f"{name}={value}" in env_text
        assert stat.S_IMODE(files.env.stat().st_mode) == 0o600
        # signed in: each connection's msal cache is on disk
        for name in settings.connections:
            assert (files.data_dir / "signin" / f"{name}.partner-center.json").exists()
        with_secrets = box.settings()
        assert with_secrets.connection(SF_CONNECTION).crm.auth.password is not None  # type: ignore[union-attr]
        for name in (SF_CONNECTION, DV_CONNECTION):
            assert main(["--config", str(files.config), "mappings", "check", "--connection", name]) == 0
    out = capsys.readouterr().out
    assert all(value not in out for value in box.environment().values())


def test_a_directory_that_is_not_a_sandbox_is_never_cleared(tmp_path: Path) -> None:
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError):
        Sandbox(keep, salesforce=5, dynamics=5).start()
    assert (keep / "notes.txt").read_text() == "precious"
    assert main(["demo", "--dir", str(keep)]) == 2
    # a sandbox's own directory is reused: its files are replaced
    with Sandbox(tmp_path / "again", salesforce=5, dynamics=5):
        pass
    with Sandbox(tmp_path / "again", salesforce=5, dynamics=5) as box:
        assert yaml.safe_load(box.files.config.read_text())["connections"]


def test_cosell_sandbox_serves_a_usable_config_until_sigterm(tmp_path: Path) -> None:
    directory = tmp_path / "live"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    entry = "import sys; from connector.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", entry, "sandbox", "--dir", str(directory), "--seed", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(lines)
        config = directory / "cosell.yaml"
        assert str(config) in text and "only while this sandbox runs" in text
        # another process uses the config with the env file, as the printed instructions say
        secrets = dict(
            line.split("=", 1)
            for line in (directory / "sandbox.env").read_text().splitlines()
            if line and not line.startswith("#")
        )
        sync = subprocess.run(
            [sys.executable, "-c", entry, "--config", str(config), "sync", "--connection", SF_CONNECTION],
            capture_output=True,
            text=True,
            env={**env, **secrets},
            timeout=120,
        )
        assert sync.returncode in (0, 1), sync.stdout + sync.stderr  # 1: some records blocked by a rule
        assert SF_CONNECTION in sync.stdout and "summary" in sync.stdout
        assert all(value not in sync.stdout + sync.stderr for value in secrets.values())
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "sandbox stopped" in rest
