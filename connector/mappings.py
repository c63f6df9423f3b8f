"""Load mapping files (commented YAML) into domain objects, and say precisely what is wrong when a
file is invalid: the file, the key path, the problem, and what would be valid.

A connection lists one or more files. Exactly one of them defines ``stages``; ``values`` maps are
merged in order (a later file overrides a key of an earlier one). ``builtin:NAME`` refers to a file
shipped with the connector (``mappings/`` in the source tree).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from connector.domain.stages import (
    Band,
    CrmStage,
    LabelRule,
    ReverseKey,
    StageMapping,
    StageTarget,
    validate,
)
from connector.domain.values import MAP_NAMES, ValueMap, ValueMaps, check_target
from connector.errors import ConfigProblem, MappingError
from connector.settings import read_yaml_file

__all__ = ["BUILTIN_PREFIX", "MappingSet", "builtin_dir", "builtin_files", "load_mapping_files"]

BUILTIN_PREFIX = "builtin:"
_TARGETS = (
    "Created/Accepted (10), Qualified (20), Developed (40), Proposed (60), Negotiated (80), Won (100), Lost"
)


def builtin_dir() -> Path:
    """The shipped default mapping files: packaged copy in a wheel, ``mappings/`` in a source tree."""
    packaged = resources.files("connector") / "_shipped" / "mappings"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "mappings"


def builtin_files() -> list[Path]:
    return sorted(builtin_dir().glob("*.yaml"))


# --- file schema -------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _target(value: Any) -> StageTarget:
    try:
        return StageTarget.parse(value)
    except (KeyError, ValueError):
        raise ValueError(f"unknown Partner Center stage {value!r}; valid: {_TARGETS}") from None


class StageDef(_Strict):
    label: str = Field(min_length=1)
    probability: int | None = Field(default=None, ge=0, le=100)
    closed: bool = False
    won: bool = False
    sort_order: int | None = None
    active: bool = True
    record_types: tuple[str, ...] = ()


class RuleDef(_Strict):
    stage: str = Field(min_length=1)
    maps_to: str | int
    record_type: str | None = None

    @field_validator("maps_to")
    @classmethod
    def _valid_target(cls, v: str | int) -> str | int:
        _target(v)
        return v


class BandDef(_Strict):
    low: int = Field(alias="from", ge=0, le=100)
    high: int = Field(alias="to", ge=0, le=100)
    maps_to: str | int

    @field_validator("maps_to")
    @classmethod
    def _valid_target(cls, v: str | int) -> str | int:
        _target(v)
        return v


class ReverseDef(_Strict):
    when: ReverseKey
    stage: str = Field(min_length=1)
    record_type: str | None = None


class StagesDef(_Strict):
    crm: tuple[StageDef, ...] = Field(min_length=1)
    rules: tuple[RuleDef, ...] = ()
    bands: tuple[BandDef, ...] = ()
    reverse: dict[ReverseKey, str] | tuple[ReverseDef, ...] = ()
    allow_backward: bool = False


class MappingFileDef(_Strict):
    crm: Literal["salesforce", "dynamics", "any"] = "any"
    description: str = ""
    stages: StagesDef | None = None
    values: dict[Annotated[str, Field(pattern="^(" + "|".join(MAP_NAMES) + ")$")], dict[str, str]] = Field(
        default_factory=dict
    )


# --- loading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MappingSet:
    """The effective mapping of one connection."""

    stages: StageMapping
    values: ValueMaps
    files: tuple[Path, ...]


def resolve_mapping_path(name: str, base: Path | None) -> Path:
    if name.startswith(BUILTIN_PREFIX):
        return builtin_dir() / name.removeprefix(BUILTIN_PREFIX)
    p = Path(name).expanduser()
    return p if p.is_absolute() or base is None else base / p


def _read(path: Path) -> MappingFileDef:
    available = ", ".join(BUILTIN_PREFIX + p.name for p in builtin_files())
    raw = read_yaml_file(path, "mapping file", MappingError, available)
    if not isinstance(raw, dict):
        raise MappingError(
            [ConfigProblem(str(path), "", "a mapping file is a YAML mapping with stages and/or values")]
        )
    try:
        return MappingFileDef.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            key = ".".join(str(p) for p in err["loc"] if p != "[key]")
            msg = err["msg"].removeprefix("Value error, ")
            valid = ""
            if err["type"] == "string_pattern_mismatch" and err["loc"][0] == "values":
                msg, valid = "unknown value map", ", ".join(MAP_NAMES)
            elif err["type"] == "extra_forbidden":
                msg, valid = "unknown key", _valid_keys(err["loc"])
            elif err["type"] == "missing":
                msg = "required key is missing"
            elif "expected" in (err.get("ctx") or {}):
                valid = str(err["ctx"]["expected"])
            problems.append(ConfigProblem(str(path), key, msg, valid))
        raise MappingError(problems) from None


def _valid_keys(loc: tuple[int | str, ...]) -> str:
    named = [p for p in loc[:-1] if isinstance(p, str)]
    model: type[BaseModel] = MappingFileDef
    chain: dict[str, type[BaseModel]] = {
        "stages": StagesDef,
        "crm": StageDef,
        "rules": RuleDef,
        "bands": BandDef,
        "reverse": ReverseDef,
    }
    for part in named:
        model = chain.get(part, model)
    return ", ".join(f.alias or name for name, f in model.model_fields.items())


def _build_stages(path: Path, spec: StagesDef) -> StageMapping:
    src = str(path)
    stages = tuple(
        CrmStage(
            label=s.label,
            probability=s.probability,
            is_closed=s.closed,
            is_won=s.won,
            sort_order=s.sort_order if s.sort_order is not None else i,
            active=s.active,
            record_types=frozenset(s.record_types),
        )
        for i, s in enumerate(spec.crm)
    )
    rules = tuple(
        LabelRule(r.stage, _target(r.maps_to), r.record_type, f"{src}: stages.rules[{i}]")
        for i, r in enumerate(spec.rules)
    )
    bands = tuple(
        Band(b.low, b.high, _target(b.maps_to), f"{src}: stages.bands[{i}]") for i, b in enumerate(spec.bands)
    )
    reverse: tuple[tuple[ReverseKey, str | None, str], ...]
    if isinstance(spec.reverse, dict):
        reverse = tuple((k, None, label) for k, label in spec.reverse.items())
    else:
        reverse = tuple((r.when, r.record_type, r.stage) for r in spec.reverse)
    return StageMapping(stages, rules, bands, reverse, spec.allow_backward, source=src)


def load_mapping_files(names: Sequence[str | Path], base: Path | None = None) -> MappingSet:
    """Load, merge and validate a connection's mapping files. Raises :class:`MappingError` listing
    every problem (file, key, what is wrong, what would be valid)."""
    problems: list[ConfigProblem] = []
    stage_mapping: StageMapping | None = None
    stage_file: Path | None = None
    merged: dict[str, dict[str, str]] = {}
    paths = [resolve_mapping_path(str(n), base) for n in names]
    for path in paths:
        try:
            spec = _read(path)
        except MappingError as exc:
            problems += exc.problems
            continue
        if spec.stages is not None:
            if stage_file is not None:
                problems.append(
                    ConfigProblem(
                        str(path), "stages", f"stages are already defined in {stage_file}; keep one"
                    )
                )
                continue
            stage_file = path
            stage_mapping = _build_stages(path, spec.stages)
            problems += [ConfigProblem(str(path), p.key, p.problem, p.valid) for p in validate(stage_mapping)]
        for map_name, entries in spec.values.items():
            for crm_value, pc_value in entries.items():
                why = check_target(map_name, pc_value)
                if why:
                    problems.append(ConfigProblem(str(path), f"values.{map_name}.{crm_value}", why))
            merged.setdefault(map_name, {}).update(entries)
    if stage_mapping is None and not problems:
        problems.append(
            ConfigProblem(
                ", ".join(str(p) for p in paths) or "mappings",
                "stages",
                "no mapping file defines stages",
                ", ".join(BUILTIN_PREFIX + p.name for p in builtin_files()),
            )
        )
    if problems:
        raise MappingError(problems)
    assert stage_mapping is not None
    values = ValueMaps({name: ValueMap(name, tuple(entries.items())) for name, entries in merged.items()})
    return MappingSet(stage_mapping, values, tuple(paths))
