"""Loading mapping files: shipped defaults are valid; broken files name the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.domain.model import StandardStage
from connector.errors import MappingError, RecordError
from connector.mappings import builtin_files, load_mapping_files

GOOD = """\
crm: salesforce
stages:
  crm:
    - {label: Open, probability: 10}
    - {label: Late, probability: 70}
    - {label: Closed Won, closed: true, won: true}
    - {label: Closed Lost, closed: true}
  bands:
    - {from: 0, to: 49, maps_to: Qualified}
    - {from: 50, to: 100, maps_to: 60}
values:
  countries: {United States: US}
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(exc: pytest.ExceptionInfo[MappingError]) -> list[str]:
    return [str(p) for p in exc.value.problems]


def test_shipped_defaults_exist_and_load() -> None:
    names = {p.name for p in builtin_files()}
    assert {"salesforce-default.yaml", "dynamics-default.yaml"} <= names
    for name in names:
        mset = load_mapping_files([f"builtin:{name}"])
        assert mset.stages.stages


def test_a_good_file_loads_with_values(tmp_path: Path) -> None:
    mset = load_mapping_files([write(tmp_path, GOOD)])
    assert mset.stages.resolve("Late").target.stage is StandardStage.PROPOSED
    assert mset.values["countries"].to_partner_center("united states") == "US"
    assert mset.values["countries"].to_crm("US") == "United States"
    with pytest.raises(RecordError, match="countries value map"):
        mset.values["countries"].to_partner_center("Atlantis")


def test_values_merge_later_files_override(tmp_path: Path) -> None:
    extra = write(
        tmp_path,
        "values:\n  countries: {United States: US, Deutschland: DE}\n  currencies: {Dollar: USD}\n",
        "x.yaml",
    )
    mset = load_mapping_files([write(tmp_path, GOOD), extra])
    assert mset.values["countries"].to_partner_center("Deutschland") == "DE"
    assert mset.values["currencies"].to_partner_center("dollar") == "USD"


@pytest.mark.parametrize(
    ("broken", "key", "words"),
    [
        (
            GOOD.replace("maps_to: 60", "maps_to: Sixty"),
            "stages.bands.1.maps_to",
            "unknown Partner Center stage 'Sixty'",
        ),
        (
            GOOD.replace("probability: 70", "probabilty: 70"),
            "stages.crm.1.probabilty",
            "unknown key (valid: label, probability",
        ),
        (GOOD.replace("from: 50", "from: 60"), "stages.bands[1]", "gap: probabilities 50..59%"),
        (GOOD.replace("to: 49", "to: 55"), "stages.bands[1]", "overlap: 50..55%"),
        (
            GOOD.replace("United States: US", "United States: USA"),
            "values.countries.United States",
            "not an ISO 3166",
        ),
        (GOOD.replace("crm: salesforce", "crm: sap"), "crm", "salesforce"),
        (GOOD + "  help_types: {Demo: Demo}\n", "values.help_types.Demo", "ProofOfConceptOrDemo"),
        (
            GOOD + "  colours: {Red: Rot}\n",
            "values.colours",
            "unknown value map (valid: countries, currencies",
        ),
        (
            GOOD.replace("  bands:", "  rules:\n    - {stage: Opne, maps_to: Qualified}\n  bands:"),
            "stages.rules[0]",
            "unknown CRM stage 'Opne' (valid: Open, Late",
        ),
    ],
)
def test_broken_files_name_file_key_and_fix(tmp_path: Path, broken: str, key: str, words: str) -> None:
    path = write(tmp_path, broken)
    with pytest.raises(MappingError) as info:
        load_mapping_files([path])
    text = "\n".join(problems(info))
    assert str(path) in text
    assert f"{key}:" in text
    assert words in text


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    path = write(tmp_path, "stages:\n  crm: [\n")
    with pytest.raises(MappingError) as info:
        load_mapping_files([path])
    assert "line " in problems(info)[0] and "not valid YAML" in problems(info)[0]


def test_missing_file_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(MappingError) as info:
        load_mapping_files(["builtin:nope.yaml"])
    assert "mapping file not found" in problems(info)[0]
    assert "builtin:salesforce-default.yaml" in problems(info)[0]


def test_exactly_one_file_defines_stages(tmp_path: Path) -> None:
    a, b = write(tmp_path, GOOD, "a.yaml"), write(tmp_path, GOOD, "b.yaml")
    with pytest.raises(MappingError, match="stages are already defined"):
        load_mapping_files([a, b])
    values_only = write(tmp_path, "values:\n  countries: {X: US}\n", "v.yaml")
    with pytest.raises(MappingError, match="no mapping file defines stages"):
        load_mapping_files([values_only])


def test_relative_paths_resolve_against_base(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    assert load_mapping_files(["m.yaml"], base=tmp_path).files == (tmp_path / "m.yaml",)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    broken = GOOD.replace("from: 50", "from: 60").replace("United States: US", "United States: XX")
    with pytest.raises(MappingError) as info:
        load_mapping_files([write(tmp_path, broken)])
    assert len(info.value.problems) >= 2
