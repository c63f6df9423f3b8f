"""The console entry point: exit codes and messages, never a traceback for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector import __version__
from connector.cli import main

SF = "builtin:salesforce-default.yaml"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"cosell {__version__}\n", "")
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "mappings" in out


def test_mappings_check_on_shipped_defaults_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "mappings", "check")
    assert code == 0
    assert "Negotiation/Review" in out and "Negotiated" in out and "80" in out
    assert "OK shipped default salesforce-default.yaml" in out
    assert "OK shipped default dynamics-default.yaml" in out


def test_mappings_check_on_a_broken_file_exits_2_naming_file_and_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "stages:\n  crm:\n    - {label: A, probability: 10}\n  bands:\n    - {from: 0, to: 50, maps_to: Qualified}\n"
    )
    code, out, err = run(capsys, "mappings", "check", "--file", str(broken))
    assert code == 2
    assert "INVALID" in out
    assert str(broken) in err and "stages.bands" in err and "gap: probabilities 51..100%" in err
    assert "Traceback" not in err


def test_mappings_check_with_config_and_connection(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "connections:\n  acme:\n    crm: {kind: dynamics, base_url: https://x.crm.dynamics.com,"
        " auth: {tenant_id: t, client_id: c}}\n"
        "    partner_center: {authority: https://login.microsoftonline.com/t, auth: {client_id: c}}\n"
        "    mappings: [builtin:dynamics-default.yaml]\n"
    )
    code, out, _ = run(capsys, "--config", str(config), "mappings", "check", "--connection", "acme")
    assert code == 0 and "OK connection acme" in out
    code, _, err = run(capsys, "--config", str(config), "mappings", "check", "--connection", "nope")
    assert code == 2 and "unknown connection" in err and "acme" in err


def test_bad_config_exits_2_without_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("log:\n  colour: true\n")
    code, _, err = run(capsys, "--config", str(config), "mappings", "check")
    assert code == 2
    assert f"{config}" in err and "log.colour" in err and "valid: format, level" in err
    assert "Traceback" not in err


def test_explain_says_which_rule_fired(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "mappings", "explain", "--stage", "Value Proposition", "--probability", "70", "-f", SF
    )
    assert code == 0
    assert "Developed (40%)" in out and "label:Value Proposition" in out and "stages.rules[3]" in out
    assert "band:55-79 -> Proposed (60%)" in out
    code, out, _ = run(capsys, "mappings", "explain", "--stage", "Custom Stage", "-p", "45", "-f", SF)
    assert code == 0 and "band:35-54" in out and "record's probability 45%" in out
    code, out, _ = run(capsys, "mappings", "explain", "--from-partner-center", "declined", "-f", SF)
    assert code == 0 and "'Closed Lost'" in out and "reverse:declined" in out


def test_explain_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "mappings", "explain", "--stage", "Unknown", "-f", "builtin:dynamics-default.yaml"
    )
    assert code == 1 and "not a stage this mapping knows" in err
    code, _, err = run(capsys, "mappings", "explain", "--stage", "Qualify")
    assert code == 2 and "choose a mapping file" in err and "builtin:dynamics-default.yaml" in err
    code, _, _ = run(capsys, "mappings", "explain", "-f", SF)
    assert code == 2


def test_db_upgrade_and_status(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COSELL_CONFIG", str(tmp_path / "empty.yaml"))
    (tmp_path / "empty.yaml").write_text(f"data_dir: {tmp_path / 'data'}\n")
    code, out, _ = run(capsys, "db", "status")
    assert code == 1 and "revision none" in out
    code, out, _ = run(capsys, "db", "upgrade")
    assert code == 0 and "revision 0004 (newest 0004)" in out
    assert (tmp_path / "data" / "state.db").exists()
    code, out, _ = run(capsys, "db", "status")
    assert code == 0


def test_the_example_config_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "example.yaml"
    code, out, _ = run(capsys, "--config", str(example), "mappings", "check")
    assert code == 0 and "OK connection acme_sf" in out and "OK connection contoso_d365" in out
