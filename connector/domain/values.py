"""Value mappings for everything else that differs between a CRM and Partner Center: currencies,
countries, solution ids, help types, close/decline reasons, team roles.

Forward (CRM -> Partner Center) is a lookup; when several CRM values map to one Partner Center
value, coming back takes the first one listed. An unmapped value is a record error naming the map.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from connector.domain.codes import ISO_3166_ALPHA2, ISO_4217
from connector.domain.model import HelpType
from connector.errors import RecordError

__all__ = ["DECLINE_LOST_REASONS", "MAP_NAMES", "ValueMap", "ValueMaps", "check_target"]

#: Declined / Lost reasons, as Partner Center words them (partner-center-api.md §6.4; the API takes text).
DECLINE_LOST_REASONS = (
    "Project budget isn't adequate",
    "Customer didn't respond",
    "Customer chose another vendor",
    "Customer requirement not met",
    "Not a customer",
    "Proposed time line was too short",
    "Report as abuse, spam, or phishing",
    "Others",
)

MAP_NAMES = ("countries", "currencies", "solutions", "help_types", "reasons", "team_roles")


def check_target(map_name: str, value: str) -> str | None:
    """Why ``value`` is not a valid Partner Center value for ``map_name`` (None when it is)."""
    if map_name == "countries" and value not in ISO_3166_ALPHA2:
        return f"{value!r} is not an ISO 3166 two-letter country code (e.g. US, DE, GB)"
    if map_name == "currencies" and value not in ISO_4217:
        return f"{value!r} is not an ISO 4217 currency code (e.g. USD, EUR)"
    if map_name == "help_types" and value not in {h.value for h in HelpType}:
        return f"{value!r} is not a Partner Center help type; valid: {', '.join(h.value for h in HelpType)}"
    if map_name == "reasons" and value not in DECLINE_LOST_REASONS:
        return f"{value!r} is not a Partner Center reason; valid: {'; '.join(DECLINE_LOST_REASONS)}"
    if not value.strip():
        return "empty value"
    return None


def _key(value: str) -> str:
    return " ".join(value.split()).casefold()


@dataclass(frozen=True)
class ValueMap:
    """One named map. Matching is case- and whitespace-insensitive on the CRM side."""

    name: str
    pairs: tuple[tuple[str, str], ...] = ()
    _forward: dict[str, str] = field(init=False, repr=False, compare=False)
    _reverse: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        forward: dict[str, str] = {}
        reverse: dict[str, str] = {}
        for crm, pc in self.pairs:
            forward[_key(crm)] = pc
            reverse.setdefault(pc, crm)
        object.__setattr__(self, "_forward", forward)
        object.__setattr__(self, "_reverse", reverse)

    def to_partner_center(self, crm_value: str, *, passthrough: bool = False) -> str:
        """The Partner Center value; ``passthrough`` accepts values already in Partner Center form."""
        found = self._forward.get(_key(crm_value))
        if found is not None:
            return found
        if passthrough and check_target(self.name, crm_value) is None:
            return crm_value
        raise RecordError(
            f"{crm_value!r} has no entry in the {self.name} value map", cause=f"unmapped-{self.name}"
        )

    def to_crm(self, pc_value: str) -> str:
        found = self._reverse.get(pc_value)
        if found is None:
            raise RecordError(
                f"Partner Center value {pc_value!r} has no entry in the {self.name} value map",
                cause=f"unmapped-{self.name}",
            )
        return found


@dataclass(frozen=True)
class ValueMaps:
    maps: Mapping[str, ValueMap] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ValueMap:
        return self.maps.get(name) or ValueMap(name)
