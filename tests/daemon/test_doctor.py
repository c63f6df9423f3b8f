"""``cosell doctor`` against the twins, in-process through the CLI entry point."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.cli import main
from connector.dynamics.twin import DataverseTwin, OptionSets
from connector.mappings import builtin_dir
from connector.partner_center.twin import PartnerCenterTwin
from connector.remote.idp_twin import IdpTwin
from connector.remote.twin import Fault, TwinCA, TwinResponse
from connector.salesforce.twin import SalesforceTwin
from connector.salesforce.twin_soql import FieldDef
from connector.settings import load_settings
from connector.state import open_store
from tests.daemon.conftest import CANARIES, PC_USER, Setup

MakeSetup = Callable[..., Setup]
DV_CLIENT, DV_SECRET = "cosell-dataverse-app", "dv-secret-canary-3317"


def doctor(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), "doctor", *args])
    out, err = capsys.readouterr()
    for canary in (*CANARIES, DV_SECRET):
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
        "acme: CRM fields",
        "acme: CRM picklists vs mapping",
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


# --- the CRM's fields and picklists ------------------------------------------------------------------


def edit_config(config: Path, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Change connection ``name``'s block of the YAML config in place."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    change(data["connections"][name])
    config.write_text(yaml.safe_dump(data), encoding="utf-8")


def mapping_file(config: Path, file_name: str, builtin: str, change: Callable[[dict[str, Any]], None]) -> str:
    """A copy of a shipped mapping file, changed, next to the config; its name as the config lists it."""
    data = yaml.safe_load((builtin_dir() / builtin).read_text(encoding="utf-8"))
    change(data)
    (config.parent / file_name).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return file_name


def test_a_misnamed_custom_field_fails_with_the_fix_and_an_optional_one_warns(
    capsys: pytest.CaptureFixture[str], migrated: Setup
) -> None:
    def misname(conn: dict[str, Any]) -> None:
        conn["crm"]["fields"] = {"sync_status": "Partner_Center_Sync_Statuss__c"}

    edit_config(migrated.config, "acme", misname)
    code, out, _ = doctor(capsys, migrated.config)
    assert code == 1
    assert (
        "FAIL  acme: CRM fields: Opportunity.Partner_Center_Sync_Statuss__c (crm.fields.sync_status) "
        "does not exist" in out
    )
    assert (
        "fix: create custom field Partner_Center_Sync_Statuss__c (type Text(255)) on Opportunity "
        "or set connections.acme.crm.fields.sync_status" in out
    )
    assert "1 failed" in out.splitlines()[-1]

    # a field the connector only reads when present: a warning saying what is lost, and exit 0
    def optional(conn: dict[str, Any]) -> None:
        conn["crm"]["fields"] = {"help_type": "PC_Help__c"}

    edit_config(migrated.config, "acme", optional)
    code, out, _ = doctor(capsys, migrated.config)
    assert code == 0, out
    warning = next(line for line in lines(out, "WARN") if "CRM fields" in line)
    assert (
        "Opportunity.PC_Help__c (crm.fields.help_type) does not exist: help requests are not read" in warning
    )
    assert "fix: create custom field PC_Help__c (type Picklist) on Opportunity or set " in out
    assert "connections.acme.crm.fields.help_type ('' to do without it)" in out


def test_a_mapped_value_missing_from_a_restricted_picklist_fails_naming_value_field_and_file(
    capsys: pytest.CaptureFixture[str], migrated: Setup, sf: SalesforceTwin
) -> None:
    opportunity = sf.schema["Opportunity"]
    opportunity["Partner_Center_Solutions__c"] = FieldDef(
        "Partner_Center_Solutions__c", "multipicklist", picklist=("Azure Data",), restricted=True
    )
    opportunity["Loss_Reason__c"] = FieldDef("Loss_Reason__c", "picklist", picklist=("Price", "Budget cut"))

    def solutions(data: dict[str, Any]) -> None:
        data["values"]["solutions"] = {"Azure Data": "SOL-AZDATA", "Dynamics Sales": "SOL-DYNSALES"}

    name = mapping_file(migrated.config, "solutions.yaml", "salesforce-default.yaml", solutions)

    def configure(conn: dict[str, Any]) -> None:
        conn["mappings"] = [name]
        conn["crm"]["fields"] = {"solutions": "Partner_Center_Solutions__c", "lost_reason": "Loss_Reason__c"}

    edit_config(migrated.config, "acme", configure)
    code, out, _ = doctor(capsys, migrated.config)
    assert code == 1
    failure = next(line for line in lines(out, "FAIL") if "picklists" in line)
    assert (
        "Opportunity.Partner_Center_Solutions__c (multipicklist, restricted) has no value 'Dynamics Sales'"
        in failure
    )
    assert f"values.solutions.Dynamics Sales in {migrated.config.parent / name} writes" in failure
    assert "Azure Data'" not in failure
    assert "fix: add the value to the picklist or change the mapping" in out
    # a lost reason the reasons map does not know reaches Partner Center as "Others": worth a warning
    warning = next(line for line in lines(out, "WARN") if "picklists" in line)
    assert "Opportunity.Loss_Reason__c value(s) with no entry in values.reasons: Budget cut" in warning
    assert "Price" not in warning
    assert "writes back" not in out  # an unrestricted picklist takes any value written back

    # restricted, it refuses the reasons the map writes back for a close made in Partner Center
    opportunity["Loss_Reason__c"] = FieldDef(
        "Loss_Reason__c", "picklist", picklist=("Price", "Budget cut"), restricted=True
    )
    code, out, _ = doctor(capsys, migrated.config)
    assert code == 1
    refused = next(line for line in lines(out, "FAIL") if "writes back" in line)
    assert "Opportunity.Loss_Reason__c (picklist, restricted) has no value" in refused
    assert "Lost to Competitor" in refused and "Other" in refused and "'Price" not in refused


# --- Dynamics 365 ------------------------------------------------------------------------------------

AddDynamics = Callable[..., DataverseTwin]


@pytest.fixture
def add_dynamics(
    migrated: Setup, ca: TwinCA, idp: IdpTwin, pc: PartnerCenterTwin, monkeypatch: pytest.MonkeyPatch
) -> Iterator[AddDynamics]:
    """Adds connection ``dyn`` (Dynamics 365 on a Dataverse twin, the same Partner Center) to the config,
    its secret in the environment and its Partner Center sign-in done."""
    started: list[DataverseTwin] = []

    def add(*, options: OptionSets | None = None, fields: dict[str, str] | None = None) -> DataverseTwin:
        idp.add_client(DV_CLIENT, secret=DV_SECRET)
        twin = DataverseTwin(ca, options=options)
        twin.auth_check = lambda header: idp.validate(header, scope_prefix=twin.base_url) is not None
        twin.start()
        started.append(twin)
        data = yaml.safe_load(migrated.config.read_text(encoding="utf-8"))
        default_fields = {
            "referral_id": "new_referralid",
            "referral_link": "new_referrallink",
            "sync_status": "new_syncstatus",
            "audit_line": "new_syncaudit",
            "synced_at": "new_lastsyncedon",
        }
        data["connections"]["dyn"] = {
            "crm": {
                "kind": "dynamics",
                "base_url": twin.base_url,
                "auth": {"tenant_id": idp.tenant_id, "client_id": DV_CLIENT, "authority": idp.authority},
                "fields": default_fields if fields is None else fields,
            },
            "partner_center": data["connections"]["acme"]["partner_center"],
            "mappings": ["builtin:dynamics-default.yaml"],
        }
        migrated.config.write_text(yaml.safe_dump(data), encoding="utf-8")
        monkeypatch.setenv("COSELL_CONNECTIONS__DYN__CRM__AUTH__CLIENT_SECRET", DV_SECRET)
        idp.sign_in(load_settings(migrated.config), "dyn", PC_USER)
        return twin

    yield add
    for twin in started:
        twin.stop()


def test_dynamics_passes_every_check_on_a_clean_configuration(
    capsys: pytest.CaptureFixture[str], migrated: Setup, add_dynamics: AddDynamics
) -> None:
    add_dynamics()
    code, out, _ = doctor(capsys, migrated.config)  # both connections: Salesforce and Dynamics
    assert code == 0, out
    assert not lines(out, "FAIL") and not lines(out, "WARN")
    passed = "\n".join(lines(out, "PASS"))
    for what in (
        "dyn: CRM (dynamics) sign-in and stages",
        "dyn: CRM stages vs mapping",
        "dyn: CRM fields",
        "dyn: CRM picklists vs mapping",
        "acme: CRM fields",
    ):
        assert f"PASS  {what}: " in passed
    assert "PASS  dyn: CRM fields: all 7 opportunity fields" in passed  # opt-in, owner, 5 bookkeeping


def test_dynamics_misnamed_column_fails_with_the_fix_and_an_unknown_role_warns(
    capsys: pytest.CaptureFixture[str], migrated: Setup, add_dynamics: AddDynamics
) -> None:
    add_dynamics(fields={"sync_status": "new_syncstatuss", "referral_id": "new_referralid", "help_type": "x"})
    code, out, _ = doctor(capsys, migrated.config, "--connection", "dyn")
    assert code == 1
    assert "FAIL  dyn: CRM fields: opportunity.new_syncstatuss (crm.fields.sync_status) does not exist" in out
    assert (
        "fix: create custom column new_syncstatuss (type Single line of text) on the Opportunity table "
        "or set connections.dyn.crm.fields.sync_status" in out
    )
    assert "new_referralid" not in "\n".join(lines(out, "FAIL"))
    assert "WARN  dyn: CRM fields: crm.fields.help_type: not a Dynamics field role, ignored" in out


def test_dynamics_mapping_stage_missing_from_the_status_reasons_fails_naming_value_field_and_file(
    capsys: pytest.CaptureFixture[str], migrated: Setup, add_dynamics: AddDynamics
) -> None:
    statuses = {**OptionSets().statuscode, 100000001: ("Budget cut", 2)}
    add_dynamics(options=OptionSets(statuscode=statuses))

    def lost_to_competitor(data: dict[str, Any]) -> None:
        data["stages"]["crm"] += [
            {"label": "Lost to Competitor", "closed": True},
            {"label": "Budget cut", "closed": True},
        ]
        data["stages"]["reverse"]["lost"] = "Lost to Competitor"

    name = mapping_file(migrated.config, "dyn-mapping.yaml", "dynamics-default.yaml", lost_to_competitor)
    edit_config(migrated.config, "dyn", lambda conn: conn.update(mappings=[name]))
    code, out, _ = doctor(capsys, migrated.config, "--connection", "dyn")
    assert code == 1
    failure = next(line for line in lines(out, "FAIL") if "CRM stages vs mapping" in line)
    assert (
        "does not have as active: Lost to Competitor "
        "(stages.reverse.lost -> opportunity.statuscode (Won/Lost status reasons))" in failure
    )
    assert f"fix: point stages.reverse in {migrated.config.parent / name} at active CRM stages" in out
    # the Lost status reason the mapping knows as a stage but not as a reason: reported as "Others"
    warning = next(line for line in lines(out, "WARN") if "picklists" in line)
    assert (
        "opportunity.statuscode (Lost status reasons) value(s) with no entry in values.reasons: Budget cut"
        in warning
    )
