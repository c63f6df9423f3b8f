"""The operator commands (status, conflicts, dlq, audit) through ``connector.cli.main``, against a real
SQLite state store filled through the StateStore API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.cli import main
from connector.state import SqlStateStore
from tests.cli.conftest import LONG_CURSOR, PLANTED_EMAILS, PLANTED_NAMES, PLANTED_PHONES

Capsys = pytest.CaptureFixture[str]


def cosell(capsys: Capsys, config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def as_json(capsys: Capsys, config: Path, *args: str) -> Any:
    code, out, err = cosell(capsys, config, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_no_contact_details(*texts: str) -> None:
    for text in texts:
        for secret in (*PLANTED_EMAILS, *PLANTED_PHONES, *PLANTED_NAMES):
            assert secret not in text, f"{secret!r} leaked"


# --- status ---------------------------------------------------------------------------------------


def status_blocks(out: str) -> dict[str, dict[str, str]]:
    """The plain-text status as {connection title: {key: value}} (alignment is not the contract)."""
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            current = blocks.setdefault(line, {})
            continue
        key, _, value = line.strip().partition(":")
        current[key] = value.strip()
    return blocks


def test_status_plain_text_per_connection(capsys: Capsys, ops_config: Path, seeded: SqlStateStore) -> None:
    code, out, err = cosell(capsys, ops_config, "status")
    assert code == 0, err
    blocks = status_blocks(out)
    assert list(blocks) == ["connection acme", "connection beta (disabled)"]
    acme, beta = blocks["connection acme"], blocks["connection beta (disabled)"]
    assert acme["last run"].startswith("2026-03-02T10:00:00+00:00 partial (finished ")  # the newest run
    assert acme["run counts"] == "blocked 1, failed 1, pc_updated 2"
    assert acme["run error"] == "1 record failed"
    # cursor values are opaque: shown shortened, never the whole keyset
    assert acme["cursor crm"].startswith(LONG_CURSOR[:40]) and acme["cursor crm"].endswith("...")
    assert len(acme["cursor crm"]) == 48
    assert acme["cursor partner_center"] == "https://pc.example/delta?token=abc"
    assert acme["links"] == "blocked 1, linked 2"
    assert acme["outbox pending"] == "pending 1, waiting 1"  # done rows are not pending
    assert acme["open conflicts"] == "2"
    assert acme["dead letters"] == "open 2, queued for retry 0"
    assert "running now" not in acme
    assert (
        beta["last run"] == "never"
        and beta["links"] == "linked 1"
        and beta["dead letters"].startswith("open 1")
    )
    assert "\x1b[" not in out and "┃" not in out  # no colours or box drawing off a terminal


def test_status_json_and_one_connection(capsys: Capsys, ops_config: Path, seeded: SqlStateStore) -> None:
    from datetime import timedelta

    assert seeded.acquire_lease("acme", "daemon-7", timedelta(minutes=5))
    data = as_json(capsys, ops_config, "status", "--connection", "acme")
    [acme] = data["connections"]
    assert acme["connection"] == "acme" and acme["enabled"] is True
    assert acme["last_run"]["run_id"] == "run-new" and acme["last_run"]["outcome"] == "partial"
    assert acme["last_run"]["counts"] == {"pc_updated": 2, "blocked": 1, "failed": 1}
    assert acme["running"] == "daemon-7"
    assert acme["cursors"]["crm"] == LONG_CURSOR  # JSON carries the whole value
    assert acme["links"] == {"linked": 2, "blocked": 1}
    assert acme["outbox"] == {"pending": 1, "waiting": 1}
    assert acme["conflicts_open"] == 2
    assert acme["dead_letters"] == {"open": 2, "retry": 0}


def test_status_on_an_empty_store(capsys: Capsys, ops_config: Path) -> None:
    code, out, _ = cosell(capsys, ops_config, "status", "--connection", "acme")
    assert code == 0
    acme = status_blocks(out)["connection acme"]
    assert acme["last run"] == "never" and acme["cursors"].startswith("none")
    assert acme["links"] == acme["outbox pending"] == "none"


def test_status_unknown_connection_is_a_config_error(capsys: Capsys, ops_config: Path) -> None:
    code, _, err = cosell(capsys, ops_config, "status", "--connection", "nope")
    assert code == 2 and "unknown connection" in err and "acme" in err


def test_rich_table_on_a_terminal(
    capsys: Capsys, ops_config: Path, seeded: SqlStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rich's own switch for "this stream is a terminal"; NO_COLOR keeps the assertions readable.
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = cosell(capsys, ops_config, "status", "--connection", "acme")
    assert code == 0 and "connection acme" in out and "│" in out and "partial" in out
    code, out, _ = cosell(capsys, ops_config, "audit")
    assert code == 0 and "┃" in out and "[redacted]" in out  # a cell is text, not Rich markup
    assert_no_contact_details(out)
    code, out, _ = cosell(capsys, ops_config, "conflicts", "list")
    assert code == 0 and "┃" in out
    assert_no_contact_details(out)


# --- conflicts ------------------------------------------------------------------------------------


def test_conflicts_list(capsys: Capsys, ops_config: Path, seeded: SqlStateStore) -> None:
    code, out, err = cosell(capsys, ops_config, "conflicts", "list")
    assert code == 0, err
    assert out.startswith("open conflicts (3)")
    lines = out.splitlines()
    assert any("006A" in line and "value" in line and "150" in line and "175" in line for line in lines)
    assert any("006Z" in line and "beta" in line for line in lines)
    # the team conflict shows how many members each side has, never who they are
    [team] = [line for line in lines if " team " in line]
    assert "1 member [redacted]" in team and "2 members [redacted]" in team
    assert_no_contact_details(out, err)

    code, out, _ = cosell(capsys, ops_config, "conflicts", "list", "--connection", "beta")
    assert code == 0 and "006Z" in out and "006A" not in out

    data = as_json(capsys, ops_config, "conflicts", "list", "--connection", "acme")
    assert [c["field"] for c in data["conflicts"]] == ["value", "team"]
    assert data["conflicts"][1]["crm_value"] == "2 members [redacted]"
    assert_no_contact_details(json.dumps(data))


def test_conflicts_resolve_each_way(capsys: Capsys, ops_config: Path, seeded: SqlStateStore) -> None:
    ids = {c.field: c.id for c in seeded.conflicts()}
    for fieldname, take, stored in (
        ("value", "crm", "crm"),
        ("team", "partner-center", "partner_center"),
        ("close_date", "dismiss", "dismissed"),
    ):
        code, out, err = cosell(
            capsys, ops_config, "conflicts", "resolve", str(ids[fieldname]), "--take", take
        )
        assert code == 0, err
        assert f"conflict {ids[fieldname]} resolved ({stored})" in out and fieldname in out
    assert seeded.conflicts() == []
    assert {c.field: c.resolution for c in seeded.conflicts(state="resolved")} == {
        "value": "crm",
        "team": "partner_center",
        "close_date": "dismissed",
    }
    code, out, _ = cosell(capsys, ops_config, "conflicts", "list")
    assert code == 0 and out == "no open conflicts\n"


def test_conflicts_resolve_unknown_or_closed_id_exits_1(
    capsys: Capsys, ops_config: Path, seeded: SqlStateStore
) -> None:
    code, _, err = cosell(capsys, ops_config, "conflicts", "resolve", "999", "--take", "crm")
    assert code == 1 and "no open conflict with id 999" in err and "Traceback" not in err
    first = seeded.conflicts()[0].id
    assert cosell(capsys, ops_config, "conflicts", "resolve", str(first), "--take", "crm")[0] == 0
    code, _, err = cosell(capsys, ops_config, "conflicts", "resolve", str(first), "--take", "dismiss")
    assert code == 1 and f"no open conflict with id {first}" in err


def test_conflicts_resolve_usage_errors_exit_2(
    capsys: Capsys, ops_config: Path, seeded: SqlStateStore
) -> None:
    assert cosell(capsys, ops_config, "conflicts", "resolve", "1", "--take", "both")[0] == 2
    assert cosell(capsys, ops_config, "conflicts", "resolve", "1")[0] == 2  # --take is required
    assert cosell(capsys, ops_config, "conflicts", "resolve", "one", "--take", "crm")[0] == 2
    assert len(seeded.conflicts()) == 3  # nothing changed


# --- dead letters ---------------------------------------------------------------------------------


def test_dlq_list(capsys: Capsys, ops_config: Path, seeded: SqlStateStore) -> None:
    code, out, err = cosell(capsys, ops_config, "dlq", "list")
    assert code == 0, err
    assert out.startswith("dead letters (3)")
    lines = out.splitlines()
    assert any("006D" in line and "INVALID_FIELD" in line and "1/5" in line for line in lines)
    assert any("ref-E" in line and "partner_center" in line and "5/5" in line for line in lines)
    assert_no_contact_details(out)  # the planted detail names an e-mail and a phone number
    code, out, _ = cosell(capsys, ops_config, "dlq", "list", "--connection", "beta")
    assert code == 0 and "006Y" in out and "006D" not in out
    data = as_json(capsys, ops_config, "dlq", "list", "--connection", "acme")
    assert [d["record_id"] for d in data["dead_letters"]] == ["006D", "ref-E"]
    assert data["max_attempts"] == 5 and "[redacted]" in data["dead_letters"][0]["detail"]


def test_dlq_retry_one_and_all(capsys: Capsys, ops_config: Path, seeded: SqlStateStore) -> None:
    first = seeded.dead_letters("acme")[0].id
    code, out, err = cosell(capsys, ops_config, "dlq", "retry", str(first))
    assert code == 0 and f"dead letter {first} queued for retry" in out, err
    assert [d.id for d in seeded.dead_letters(state="retry")] == [first]
    code, out, _ = cosell(capsys, ops_config, "dlq", "list")
    assert any(str(first) in line and "retry" in line for line in out.splitlines())

    code, out, _ = cosell(capsys, ops_config, "dlq", "retry", "--all", "--connection", "acme")
    assert code == 0 and "1 dead letter queued for retry" in out  # the other acme one
    assert {d.record_id for d in seeded.dead_letters(state="retry")} == {"006D", "ref-E"}
    assert [d.record_id for d in seeded.dead_letters()] == ["006Y"]  # beta's is untouched
    code, out, _ = cosell(capsys, ops_config, "dlq", "retry", "--all")
    assert code == 0 and "1 dead letter queued" in out and seeded.dead_letters() == []


def test_dlq_drop(capsys: Capsys, ops_config: Path, seeded: SqlStateStore) -> None:
    letter = seeded.dead_letters("beta")[0]
    code, out, _ = cosell(capsys, ops_config, "dlq", "drop", str(letter.id))
    assert code == 0 and f"dead letter {letter.id} dropped" in out
    assert [d.record_id for d in seeded.dead_letters(state="dropped")] == ["006Y"]
    code, out, _ = cosell(capsys, ops_config, "dlq", "list")
    assert "006Y" not in out
    code, out, _ = cosell(capsys, ops_config, "dlq", "list", "--dropped")
    assert any("006Y" in line and "dropped" in line for line in out.splitlines())


def test_dlq_unknown_id_exits_1_and_usage_errors_exit_2(
    capsys: Capsys, ops_config: Path, seeded: SqlStateStore
) -> None:
    for verb in ("retry", "drop"):
        code, _, err = cosell(capsys, ops_config, "dlq", verb, "4242")
        assert code == 1 and "no dead letter with id 4242" in err and "Traceback" not in err
    assert cosell(capsys, ops_config, "dlq", "retry")[0] == 2  # neither an id nor --all
    assert cosell(capsys, ops_config, "dlq", "retry", "1", "--all")[0] == 2  # both
    assert cosell(capsys, ops_config, "dlq", "drop")[0] == 2
    assert len(seeded.dead_letters()) == 3 and seeded.dead_letters(state="retry") == []


def test_dlq_and_conflicts_on_an_empty_store(capsys: Capsys, ops_config: Path) -> None:
    assert cosell(capsys, ops_config, "dlq", "list") == (0, "no dead letters\n", "")
    assert cosell(capsys, ops_config, "dlq", "retry", "--all") == (0, "0 dead letters queued for retry\n", "")
    assert cosell(capsys, ops_config, "audit") == (0, "no audit entries\n", "")


# --- audit ----------------------------------------------------------------------------------------


def test_audit_rows_and_filters(capsys: Capsys, ops_config: Path, seeded: SqlStateStore) -> None:
    code, out, err = cosell(capsys, ops_config, "audit")
    assert code == 0, err
    assert out.startswith("audit (6 entries, oldest first)")
    header, *rows = out.splitlines()[1:]
    for column in (
        "time",
        "run",
        "correlation",
        "crm id",
        "referral id",
        "field",
        "old -> new",
        "direction",
        "rule",
    ):
        assert column in header
    [value] = [r for r in rows if " value " in r and "set" in r]
    for part in ("2026-03-02T10:00:00+00:00", "run-new", "corr-1", "006A", "ref-A", "100 -> 150", "crm->pc",
                 "changed in CRM"):  # fmt: skip
        assert part in value
    assert "terminal-immutable" in out and "refused" in out
    assert rows[0].startswith("2026-03-02T10:00:00") and rows[-1].startswith("2026-03-02T11:00:00")

    code, out, _ = cosell(capsys, ops_config, "audit", "--connection", "beta")
    assert code == 0 and "run-beta" in out and "run-new" not in out
    code, out, _ = cosell(capsys, ops_config, "audit", "--opportunity", "006C")
    assert code == 0 and "(1 entries" in out and "terminal-immutable" in out
    code, out, _ = cosell(capsys, ops_config, "audit", "--referral", "ref-B")
    assert code == 0 and "(2 entries" in out and "notes" in out and "customer_contact" in out
    code, out, _ = cosell(capsys, ops_config, "audit", "--limit", "2")
    assert "(2 entries" in out and "run-beta" in out  # the newest two, oldest first
    data = as_json(capsys, ops_config, "audit", "--opportunity", "006A")
    assert [(e["field"], e["old"], e["new"]) for e in data["audit"]] == [
        ("value", "100", "150"),
        ("team", "1 member [redacted]", "2 members [redacted]"),
    ]
    assert data["audit"][0]["run_id"] == "run-new" and data["audit"][0]["correlation_id"] == "corr-1"


def test_audit_never_prints_contact_details(capsys: Capsys, ops_config: Path, seeded: SqlStateStore) -> None:
    code, out, err = cosell(capsys, ops_config, "audit")
    assert code == 0
    [team] = [line for line in out.splitlines() if " team " in line]
    assert "1 member [redacted] -> 2 members [redacted]" in team
    [notes] = [line for line in out.splitlines() if " notes " in line]
    assert '"" -> call the buyer at [redacted] / [redacted]' in notes  # free text keeps its words
    [contact] = [line for line in out.splitlines() if " customer_contact " in line]
    assert "(none) -> [redacted]" in contact
    raw = as_json(capsys, ops_config, "audit")
    assert_no_contact_details(out, err, json.dumps(raw))


def test_audit_usage_errors_exit_2(capsys: Capsys, ops_config: Path, seeded: SqlStateStore) -> None:
    assert cosell(capsys, ops_config, "audit", "--opportunity", "006A", "--referral", "ref-A")[0] == 2
    assert cosell(capsys, ops_config, "audit", "--limit", "0")[0] == 2


# --- configuration and reachability -----------------------------------------------------------------

COMMANDS = (
    ("status",),
    ("conflicts", "list"),
    ("conflicts", "resolve", "1", "--take", "crm"),
    ("dlq", "list"),
    ("dlq", "retry", "--all"),
    ("dlq", "drop", "1"),
    ("audit",),
)


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_unreachable_store_exits_3(
    capsys: Capsys, ops_config: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    # Port 1 refuses at once: a PostgreSQL store that is down, with a password that must not show.
    monkeypatch.setenv("COSELL_STATE__URL", "postgresql+psycopg://cosell:hunter2@127.0.0.1:1/cosell")
    code, out, err = cosell(capsys, ops_config, *args)
    assert code == 3, (out, err)
    assert "state store" in err and "unreachable" in err and "127.0.0.1:1" in err
    assert "hunter2" not in err and "Traceback" not in err


def test_unusable_sqlite_store_is_a_config_error(capsys: Capsys, ops_config: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = yaml.safe_load(ops_config.read_text())
    config["state"]["url"] = f"sqlite:///{blocker / 'state.db'}"
    ops_config.write_text(yaml.safe_dump(config))
    code, _, err = cosell(capsys, ops_config, "status")
    assert (
        code == 2
        and "state.url" in err
        and "cannot create the state directory" in err
        and "Traceback" not in err
    )
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite database, it is a text file " * 40)
    config["state"]["url"] = f"sqlite:///{junk}"
    ops_config.write_text(yaml.safe_dump(config))
    code, _, err = cosell(capsys, ops_config, "dlq", "list")
    assert code == 2 and "not a usable state database" in err and "Traceback" not in err


def test_bad_config_exits_2(capsys: Capsys, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("state:\n  url: sqlite:///x.db\n  colour: blue\n")
    for args in COMMANDS:
        code, _, err = cosell(capsys, config, *args)
        assert code == 2 and "state.colour" in err, args
