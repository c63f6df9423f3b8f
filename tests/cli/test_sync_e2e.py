"""``cosell sync`` end to end through ``connector.cli.main``: the real engine, Partner Center client and
Salesforce adapter over HTTPS against the twins, a real SQLite store, configured from a YAML file
with the secrets in the environment, and the exit codes issue 6 defines (0 synced, 1 some record
blocked or failed, 2 bad configuration, 3 a remote unreachable), plus what the operator commands
then show about that state."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import yaml

import connector.cli.sync as cli_sync
from connector.cli import main
from connector.partner_center.twin import PartnerCenterTwin
from connector.salesforce.twin import SalesforceTwin
from connector.settings import Settings
from connector.state import StateStore, open_store
from connector.sync.factory import run_context
from tests.e2e.conftest import CONNECTION, NO_SLEEP
from tests.e2e.test_sync import STATUS_FIELD, add_opportunity, writes

Capsys = pytest.CaptureFixture[str]


def cosell(capsys: Capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def cells(row: str) -> list[str]:
    """The cells of one row of a Rich table as printed off a terminal."""
    return [c.strip() for c in row.strip().strip("│").split("│")]


def _state(store: StateStore) -> tuple[object, ...]:
    """Everything a run could change in the state store, to compare before and after a dry run."""
    return (
        store.last_run(CONNECTION),
        list(store.iter_links(CONNECTION)),
        store.cursors(CONNECTION),
        store.outbox_entries(CONNECTION),
        store.audit(CONNECTION),
        store.conflicts(CONNECTION),
        store.dead_letters(CONNECTION),
    )


def test_cosell_sync_exit_codes_dry_run_and_operator_views(
    settings: Settings,
    pc: PartnerCenterTwin,
    sf: SalesforceTwin,
    capsys: Capsys,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # The retry policy's back-off would sleep for seconds once Partner Center is down; the command
    # is otherwise run exactly as an operator runs it.
    monkeypatch.setattr(cli_sync, "run_context", functools.partial(run_context, policy=NO_SLEEP))
    assert settings.config_file is not None
    config = str(settings.config_file)
    opp = add_opportunity(sf)

    # --dry-run: the plan, record by record (field, before -> after, direction, rule); nothing written
    code, out, err = cosell(capsys, "--config", config, "sync", "--dry-run")
    assert code == 0, out + err
    assert "plan (dry run, nothing written)" in out
    plan_rows = [line for line in out.splitlines() if opp in line]
    assert plan_rows, out
    # a new opportunity plans one create of its referral
    assert any({"referral", "crm->pc", "Contoso migration", "create"} <= set(cells(row)) for row in plan_rows)
    for column in ("record", "field", "direction", "before", "after", "rule"):
        assert column in out
    assert pc.referrals == {} and writes(pc, sf) == (0, 0)
    store = open_store(settings.state_url)
    try:
        assert store.last_run(CONNECTION) is None
        assert store.count_links(CONNECTION) == {} and store.cursors(CONNECTION) == {}
        assert store.audit(CONNECTION) == [] and store.outbox_depth(CONNECTION) == {}
    finally:
        store.close()

    # 0: every record synced
    code, out, err = cosell(capsys, "--config", config, "sync")
    assert code == 0, out + err
    [rid] = pc.referrals
    assert "summary" in out and CONNECTION in out

    # --dry-run of a field edit: each field's before -> after, direction and rule; still no write
    sf.update_row("Opportunity", opp, {"Amount": 75000.0, "StageName": "Proposal/Price Quote"})
    written = writes(pc, sf)
    store = open_store(settings.state_url)
    try:
        state_before = _state(store)
        code, out, err = cosell(capsys, "--config", config, "sync", "--dry-run")
        assert code == 0, out + err
        assert _state(store) == state_before  # no state change at all, not even a run record
    finally:
        store.close()
    assert writes(pc, sf) == written and pc.referrals[rid]["salesStage"] == "20"
    record = f"{opp} / {rid}"
    plan = {tuple(cells(line)) for line in out.splitlines() if record in line}
    assert (record, "value", "crm->pc", "50000", "75000", "changed in CRM") in plan, out
    # Partner Center's state moves qualified -> proposed because of the CRM stage, by the label rule
    stage_rows = [row for row in plan if row[1:5] == ("stage", "crm->pc", "qualified", "proposed")]
    assert stage_rows and stage_rows[0][5] == "label:Proposal/Price Quote", out

    # the same change for real: 0 again, and the plan was what happened
    code, out, err = cosell(capsys, "--config", config, "sync")
    assert code == 0, out + err
    assert pc.referrals[rid]["salesStage"] == "60"

    # 1: the referral closed Won in Partner Center, then the CRM edits the amount -> blocked, listed
    pc.edit(rid, lambda d: d.update(status="Closed", substatus="Won"))
    code, out, err = cosell(capsys, "--config", config, "sync")
    assert code == 0, out + err  # the CRM follows Partner Center to Closed Won
    sf.update_row("Opportunity", opp, {"Amount": 99000.0})
    before = pc.count_writes()
    code, out, err = cosell(capsys, "--config", config, "sync")
    assert code == 1, out + err
    assert f"{CONNECTION}: {opp}: terminal-immutable:" in out
    assert pc.count_writes() == before
    assert "terminal-immutable" in sf.tables["Opportunity"][opp][STATUS_FIELD]

    # what the operator commands make of that state
    code, out, err = cosell(capsys, "--config", config, "status", "--json")
    assert code == 0, err
    [status] = json.loads(out)["connections"]
    assert status["last_run"]["outcome"] == "partial" and status["last_run"]["counts"]["blocked"] == 1
    assert status["links"] == {"blocked": 1} and set(status["cursors"]) == {"crm", "partner_center"}
    code, out, err = cosell(capsys, "--config", config, "audit", "--opportunity", opp)
    assert code == 0, err
    assert "terminal-immutable" in out and "crm->pc" in out
    # the opportunity's owner is a team member with an e-mail and a phone in the twin
    assert "ada1@partner.example" not in out and "555 0100" not in out

    # 2: bad configuration (an unknown key; an unknown connection)
    broken = yaml.safe_load(Path(config).read_text())
    broken["connections"][CONNECTION]["crm"]["colour"] = "blue"
    bad = tmp_path / "broken.yaml"
    bad.write_text(yaml.safe_dump(broken))
    code, _, err = cosell(capsys, "--config", str(bad), "sync")
    assert code == 2 and "colour" in err and "Traceback" not in err
    code, _, err = cosell(capsys, "--config", config, "sync", "--connection", "nope")
    assert code == 2 and "unknown connection" in err

    # 3: Partner Center cannot be reached
    pc.stop()
    code, out, err = cosell(capsys, "--config", config, "sync")
    assert code == 3, out + err
    assert f"{CONNECTION}: cannot reach or sign in" in out and "Traceback" not in out + err
