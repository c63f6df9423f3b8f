"""Three-way merge of one deal: the CRM's version, Partner Center's version, and the last-synced
snapshot (the merge base). Pure: it returns a plan, it writes nothing.

Per field: changed on one side only -> flows to the other; changed on both to the same value ->
nothing to do; changed on both to different values -> a conflict, decided by the connection's
per-field policy (``crm-wins``, ``partner-center-wins``, ``newest-wins``) or queued (``manual``),
overwriting nothing. Team members and solutions are sets: additions and removals from both sides
are merged, so a Microsoft seller added on Partner Center survives a CRM push (prior-art §6 #12).
Stage and status are not merged here: they go through the stage mapping and the co-sell rules
(:mod:`connector.domain.stages`), because "different" there means "forward or backward".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from connector.domain.model import Contact, Deal

__all__ = [
    "PEOPLE_SETS",
    "SCALAR_FIELDS",
    "SET_FIELDS",
    "Direction",
    "FieldChange",
    "FieldConflict",
    "MergePlan",
    "Policy",
    "as_base",
    "base_value",
    "member_digest",
    "merge",
    "snapshot_of",
    "values_hash",
]

#: Fields merged as single values, with how to read them off a deal.
SCALAR_FIELDS = ("name", "value", "currency", "close_date", "notes", "campaign_id")
#: Fields merged as sets of elements.
SET_FIELDS = ("team", "solutions")
#: Set fields whose elements are people: the merge base keeps a digest of each, never their details.
PEOPLE_SETS = frozenset({"team"})


class Direction(StrEnum):
    TO_PARTNER_CENTER = "crm->pc"
    TO_CRM = "pc->crm"


class Policy(StrEnum):
    CRM_WINS = "crm-wins"
    PARTNER_CENTER_WINS = "partner-center-wins"
    NEWEST_WINS = "newest-wins"
    MANUAL = "manual"


def _member(c: Contact) -> dict[str, str]:
    return {"first_name": c.first_name, "last_name": c.last_name, "email": c.email.lower(), "phone": c.phone}


def snapshot_of(deal: Deal) -> dict[str, Any]:
    """The synced fields of a deal as JSON-ready values: what the merge compares (the state store
    keeps them through :func:`as_base`, team members digested)."""
    return {
        "name": deal.name,
        "value": None if deal.value is None else format(deal.value.amount.normalize(), "f"),
        "currency": None if deal.value is None else deal.value.currency,
        "close_date": None if deal.close_date is None else deal.close_date.isoformat(),
        "notes": deal.notes or "",
        "campaign_id": deal.campaign_id or None,
        "team": sorted((_member(m) for m in deal.team), key=lambda m: (m["email"], m["last_name"])),
        "solutions": sorted({s.id for s in deal.solutions}),
    }


def member_digest(member: Mapping[str, Any] | str) -> str:
    """A team member as the merge base keeps them: a digest of their name, email and phone. A set
    merge only asks whether a member was there before, so the state store holds no one's contact
    details in clear — a pseudonym, not an anonymisation: someone holding both the store and a
    candidate person's exact details can still test them against it. Bases written before this
    hold whole members; they are digested when read, and a digest is returned as it is."""
    if isinstance(member, str):
        return member
    return hashlib.sha256(_key(member).encode()).hexdigest()


def base_value(name: str, value: Any) -> Any:
    """A snapshot's value of field ``name`` (or of ``crm:name``) as the merge base keeps it."""
    if value is not None and name.removeprefix("crm:") in PEOPLE_SETS:
        return sorted({member_digest(m) for m in value})
    return value


def as_base(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot (or a merge's new base) in the form the state store keeps (:func:`base_value`)."""
    return {name: base_value(name, value) for name, value in snapshot.items()}


def values_hash(values: Mapping[str, Any]) -> str:
    """Stable hash of written values: reading the same values back is our own echo, not a change."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def rewritten_fields(
    written: Sequence[str], written_hash: str, current: Mapping[str, Any], base: Mapping[str, Any]
) -> tuple[str, ...]:
    """The first read-back of fields we wrote: () when they came back as written (our own echo);
    else the fields someone else rewrote since — typically a CRM workflow or trigger reacting to
    our write. The engine counts and audits those once; the merge then treats the new values as
    the CRM's edit (one flow to Partner Center), so the two automations never ping-pong."""
    if values_hash({f: current.get(f) for f in written}) == written_hash:
        return ()
    return tuple(f for f in written if current.get(f) != base.get(f))


@dataclass(frozen=True, slots=True)
class FieldChange:
    field: str
    direction: Direction
    old: Any
    new: Any
    rule: str  # why: "changed in CRM", "policy:crm-wins", ...


@dataclass(frozen=True, slots=True)
class FieldConflict:
    field: str
    base: Any
    crm_value: Any
    pc_value: Any


@dataclass(frozen=True)
class MergePlan:
    changes: tuple[FieldChange, ...] = ()
    conflicts: tuple[FieldConflict, ...] = ()
    #: the new merge base once the changes are written (conflicting fields keep their old base)
    base: dict[str, Any] = field(default_factory=dict)

    def toward(self, direction: Direction) -> dict[str, Any]:
        return {c.field: c.new for c in self.changes if c.direction is direction}

    @property
    def is_noop(self) -> bool:
        return not self.changes and not self.conflicts


def _key(element: Any) -> str:
    return json.dumps(element, sort_keys=True)


def _merge_set(name: str, base: list[Any], crm: list[Any], pc: list[Any]) -> list[Any]:
    key = member_digest if name in PEOPLE_SETS else _key
    b, c, p = ({key(e): e for e in xs} for xs in (base, crm, pc))
    removed = (b.keys() - c.keys()) | (b.keys() - p.keys())
    merged = {**c, **p}
    return sorted((merged[k] for k in merged.keys() - removed), key=_key)


def merge(
    base: Mapping[str, Any] | None,
    crm: Mapping[str, Any],
    pc: Mapping[str, Any],
    *,
    policies: Mapping[str, Policy] | None = None,
    default_policy: Policy = Policy.NEWEST_WINS,
    crm_modified: datetime | None = None,
    pc_modified: datetime | None = None,
) -> MergePlan:
    """Plan the field changes that bring ``crm`` and ``pc`` into agreement, relative to ``base``.

    ``base`` None means the pair was never synced: every difference is a conflict for the policy.
    """
    policies = policies or {}
    known = dict(base or {})
    changes: list[FieldChange] = []
    conflicts: list[FieldConflict] = []
    new_base = as_base(known)

    for name in SCALAR_FIELDS:
        c, p = crm.get(name), pc.get(name)
        b = known.get(name, _MISSING) if base is not None else _MISSING
        if c == p:
            new_base[name] = c
            continue
        if b is not _MISSING and c == b:
            changes.append(FieldChange(name, Direction.TO_CRM, c, p, "changed in Partner Center"))
            new_base[name] = p
            continue
        if b is not _MISSING and p == b:
            changes.append(FieldChange(name, Direction.TO_PARTNER_CENTER, p, c, "changed in CRM"))
            new_base[name] = c
            continue
        if b is _MISSING and (_empty(c) or _empty(p)):
            # Never synced: an empty value on one side is "not filled in yet", not "cleared" — it must
            # not wipe the other side's (a first pairing once erased Partner Center's notes this way).
            if _empty(c):
                changes.append(
                    FieldChange(name, Direction.TO_CRM, c, p, "first pairing: only Partner Center has it")
                )
                new_base[name] = p
            else:
                changes.append(
                    FieldChange(name, Direction.TO_PARTNER_CENTER, p, c, "first pairing: only the CRM has it")
                )
                new_base[name] = c
            continue
        decided = _decide(name, c, p, policies.get(name, default_policy), crm_modified, pc_modified)
        if decided is None:
            conflicts.append(FieldConflict(name, None if b is _MISSING else b, c, p))
            continue
        changes.append(decided)
        new_base[name] = decided.new

    for name in SET_FIELDS:
        c_list, p_list = list(crm.get(name) or []), list(pc.get(name) or [])
        b_list = list(known.get(name) or []) if base is not None else []
        merged = _merge_set(name, b_list, c_list, p_list)
        key = {_key(e) for e in merged}
        if key != {_key(e) for e in c_list}:
            changes.append(FieldChange(name, Direction.TO_CRM, c_list, merged, "set merge"))
        if key != {_key(e) for e in p_list}:
            changes.append(FieldChange(name, Direction.TO_PARTNER_CENTER, p_list, merged, "set merge"))
        new_base[name] = base_value(name, merged)

    return MergePlan(tuple(changes), tuple(conflicts), new_base)


_MISSING: Any = object()


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == []


def _decide(
    name: str, c: Any, p: Any, policy: Policy, crm_modified: datetime | None, pc_modified: datetime | None
) -> FieldChange | None:
    if policy is Policy.CRM_WINS:
        return FieldChange(name, Direction.TO_PARTNER_CENTER, p, c, "policy:crm-wins")
    if policy is Policy.PARTNER_CENTER_WINS:
        return FieldChange(name, Direction.TO_CRM, c, p, "policy:partner-center-wins")
    if policy is Policy.NEWEST_WINS and crm_modified is not None and pc_modified is not None:
        if crm_modified >= pc_modified:
            return FieldChange(name, Direction.TO_PARTNER_CENTER, p, c, "policy:newest-wins (CRM newer)")
        return FieldChange(name, Direction.TO_CRM, c, p, "policy:newest-wins (Partner Center newer)")
    return None  # manual, or newest-wins without both timestamps: nothing is overwritten
