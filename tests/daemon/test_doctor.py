"""``cosell doctor`` against the twins, in-process through the CLI entry point."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from connector.cli import main
from connector.remote.twin import Fault, TwinResponse
from connector.salesforce.twin import SalesforceTwin
from connector.state import open_store
from tests.daemon.conftest import CANARIES, Setup

MakeSetup = Callable[..., Setup]


def doctor(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), "doctor", *args])
    out, err = capsys.readouterr()
    for canary in CANARIES:
        assert canary not in out and canary not in err
    assert "eyJ" not in out + err  # never a token
    return code, out, err


def lines(out: str, verdict: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(verdict)]


@pytest.fixture
def migrated(setup: Setup) -> Setup:
    open_store(setup.settings.state_url).close()
    return setup


def test_everything_passes_on_a_signed_in_installation(
    capsys: pytest.CaptureFixture[str], migrated: Setup
) -> None:
    code, out, _ = doctor(capsys, migrated.config)
    assert code == 0, out
    assert not lines(out, "FAIL") and not lines(out, "WARN")
    passed = "\n".join(lines(out, "PASS"))
    for what in (
        "configuration",
        "state store",
        "acme: mappings",
        "acme: Partner Center sign-in",
        "acme: CRM (salesforce) sign-in and stages",
        "acme: CRM stages vs mapping",
    ):
        assert f"PASS  {what}: " in passed
    assert "checks passed" in out


def test_stage_drift_between_crm_and_mapping_is_named_with_the_fix(
    capsys: pytest.CaptureFixture[str], migrated: Setup, sf: SalesforceTwin
) -> None:
    sf.add_row(
        "OpportunityStage",
        {"ApiName": "Legal Review", "MasterLabel": "Legal Review", "DefaultProbability": 85.0,
         "ForecastCategoryName": "Pipeline", "IsActive": True, "IsClosed": False, "IsWon": False, "SortOrder": 8},
    )  # fmt: skip
    for row in sf.tables["OpportunityStage"].values():
        if row["ApiName"] in ("Perception Analysis", "Closed Lost"):
            row["IsActive"] = False
    code, out, _ = doctor(capsys, migrated.config, "--connection", "acme")
    assert code == 1
    failures = lines(out, "FAIL")
    assert any("in the CRM but not in the mapping: Legal Review" in f for f in failures)
    # Closed Lost is where Partner Center's lost/declined lands: writing it would fail
    assert any("does not have as active: Closed Lost" in f for f in failures)
    assert any("Perception Analysis" in w for w in lines(out, "WARN"))
    assert "fix: add them under stages.crm in" in out and "salesforce-default.yaml" in out


def test_missing_sign_in_and_unreachable_crm_fail_with_what_to_do(
    capsys: pytest.CaptureFixture[str], migrated: Setup, sf: SalesforceTwin, tmp_path: Path
) -> None:
    (migrated.settings.data_dir / "signin" / "acme.partner-center.json").unlink()
    sf.inject(Fault(TwinResponse(503, [{"errorCode": "SERVER_UNAVAILABLE", "message": "down"}]), times=10))
    code, out, _ = doctor(capsys, migrated.config)
    assert code == 1
    assert "FAIL  acme: Partner Center sign-in: not signed in" in out
    assert "fix: run `cosell auth login --connection acme`" in out
    crm = next(line for line in lines(out, "FAIL") if "CRM (salesforce)" in line)
    assert "503" in crm or "unavailable" in crm.lower()
    assert "CRM stages vs mapping" not in out  # nothing to compare without the CRM's stages


def test_a_state_store_that_was_never_migrated_fails_without_creating_one(
    capsys: pytest.CaptureFixture[str], setup: Setup
) -> None:
    code, out, _ = doctor(capsys, setup.config)
    assert code == 1
    assert "FAIL  state store: no state database yet" in out and "cosell db upgrade" in out
    assert not Path(setup.settings.state_url.removeprefix("sqlite:///")).exists()


def test_bad_configuration_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("connections:\n  acme:\n    crm: {kind: oracle}\n", encoding="utf-8")
    code, out, _ = doctor(capsys, config)
    assert code == 2 and out.startswith("FAIL  configuration: ")
    code, out, _ = doctor(capsys, tmp_path / "missing.yaml")
    assert code == 2 and "config file not found" in out


def test_an_unknown_connection_exits_2(capsys: pytest.CaptureFixture[str], migrated: Setup) -> None:
    code, out, _ = doctor(capsys, migrated.config, "--connection", "nope")
    assert code == 2 and "unknown connection" in out and "acme" in out
