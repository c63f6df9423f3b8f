"""Three-way merge: one-sided changes flow, two-sided conflicts follow the policy, sets merge."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.domain.merge import (
    Direction,
    Policy,
    as_base,
    member_digest,
    merge,
    snapshot_of,
    values_hash,
)
from tests.unit.factories import deal

BASE: dict[str, Any] = {
    "name": "Deal",
    "value": "100",
    "currency": "USD",
    "close_date": "2027-01-01",
    "notes": "",
    "campaign_id": None,
    "team": [{"email": "a@p.example"}],
    "solutions": ["SOL-1"],
}
EARLY, LATE = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)


def with_(**changes: Any) -> dict[str, Any]:
    return {**BASE, **changes}


def test_no_change_is_a_noop() -> None:
    plan = merge(BASE, BASE, BASE)
    assert plan.is_noop and plan.base == as_base(BASE)


def test_one_sided_changes_flow_to_the_other_side() -> None:
    plan = merge(BASE, with_(value="150"), with_(notes="called"))
    assert plan.toward(Direction.TO_PARTNER_CENTER) == {"value": "150"}
    assert plan.toward(Direction.TO_CRM) == {"notes": "called"}
    assert plan.base["value"] == "150" and plan.base["notes"] == "called"
    assert {c.rule for c in plan.changes} == {"changed in CRM", "changed in Partner Center"}


def test_same_change_on_both_sides_is_not_a_conflict() -> None:
    plan = merge(BASE, with_(value="150"), with_(value="150"))
    assert plan.is_noop and plan.base["value"] == "150"


@pytest.mark.parametrize(
    ("policy", "direction", "winner"),
    [
        (Policy.CRM_WINS, Direction.TO_PARTNER_CENTER, "150"),
        (Policy.PARTNER_CENTER_WINS, Direction.TO_CRM, "120"),
        (Policy.NEWEST_WINS, Direction.TO_CRM, "120"),  # Partner Center changed later
    ],
)
def test_conflicts_follow_the_field_policy(policy: Policy, direction: Direction, winner: str) -> None:
    plan = merge(
        BASE,
        with_(value="150"),
        with_(value="120"),
        policies={"value": policy},
        crm_modified=EARLY,
        pc_modified=LATE,
    )
    [change] = plan.changes
    assert (change.direction, change.new, change.rule.split(" ")[0]) == (
        direction,
        winner,
        f"policy:{policy.value}",
    )
    assert plan.base["value"] == winner and not plan.conflicts


def test_manual_policy_queues_and_overwrites_nothing() -> None:
    plan = merge(BASE, with_(value="150"), with_(value="120"), policies={"value": Policy.MANUAL})
    assert plan.changes == ()
    [conflict] = plan.conflicts
    assert (conflict.base, conflict.crm_value, conflict.pc_value) == ("100", "150", "120")
    assert plan.base["value"] == "100"  # the base stays until a human decides


def test_newest_wins_without_timestamps_is_manual() -> None:
    plan = merge(BASE, with_(value="150"), with_(value="120"))
    assert plan.conflicts and not plan.changes


def test_never_synced_pairs_treat_differences_as_conflicts() -> None:
    plan = merge(None, with_(value="150"), with_(value="120"), default_policy=Policy.CRM_WINS)
    assert plan.toward(Direction.TO_PARTNER_CENTER) == {"value": "150"}


def test_team_additions_from_both_sides_survive_and_removals_apply() -> None:
    ms_seller = {"email": "ms@microsoft.example"}
    new_rep = {"email": "b@p.example"}
    base = with_(team=[{"email": "a@p.example"}, {"email": "gone@p.example"}])
    crm = with_(team=[{"email": "a@p.example"}, new_rep])  # CRM removed "gone", added b
    pc = with_(
        team=[{"email": "a@p.example"}, {"email": "gone@p.example"}, ms_seller]
    )  # Microsoft added a seller
    plan = merge(base, crm, pc)
    merged = [{"email": "a@p.example"}, new_rep, ms_seller]
    key = sorted(m["email"] for m in merged)
    assert sorted(m["email"] for m in plan.toward(Direction.TO_PARTNER_CENTER)["team"]) == key
    assert sorted(m["email"] for m in plan.toward(Direction.TO_CRM)["team"]) == key


def test_the_base_keeps_team_members_as_digests_only() -> None:
    crm = with_(team=[{"email": "a@p.example", "phone": "+1 555 0100"}, {"email": "b@p.example"}])
    plan = merge(BASE, crm, BASE)
    kept = plan.base["team"]
    assert all(isinstance(m, str) and len(m) == 64 for m in kept)
    assert "p.example" not in repr(plan.base) and "555" not in repr(plan.base)
    assert kept == sorted(member_digest(m) for m in crm["team"])
    # the Partner Center side gets the whole member (the base is only a memory of who was there)
    assert {"email": "b@p.example"} in plan.toward(Direction.TO_PARTNER_CENTER)["team"]


@pytest.mark.parametrize("stored", ["whole members (bases before digests)", "digests"])
def test_a_base_of_either_form_merges_alike(stored: str) -> None:
    base = with_(team=[{"email": "a@p.example"}, {"email": "gone@p.example"}])
    if stored == "digests":
        base = as_base(base)
    crm = with_(team=[{"email": "a@p.example"}])  # CRM removed "gone"
    pc = with_(
        team=[{"email": "a@p.example"}, {"email": "gone@p.example"}, {"email": "ms@microsoft.example"}]
    )
    plan = merge(base, crm, pc)
    assert [m["email"] for m in plan.toward(Direction.TO_PARTNER_CENTER)["team"]] == [
        "a@p.example",
        "ms@microsoft.example",
    ]
    again = merge(
        plan.base, crm | plan.toward(Direction.TO_CRM), pc | plan.toward(Direction.TO_PARTNER_CENTER)
    )
    assert again.is_noop


def test_snapshot_and_hash_are_stable() -> None:
    d = deal()
    snap = snapshot_of(d)
    assert snap["value"] == "50000" and snap["currency"] == "USD"
    assert snap["team"][0]["email"] == "ada@partner.example"
    assert values_hash(snap) == values_hash(dict(reversed(list(snap.items()))))


ELEMENTS = st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), unique=True)


@given(ELEMENTS, ELEMENTS, ELEMENTS)
def test_set_merge_properties(base: list[str], crm: list[str], pc: list[str]) -> None:
    plan = merge(with_(solutions=base), with_(solutions=crm), with_(solutions=pc))
    merged = set(plan.base["solutions"])
    assert (set(crm) - set(base)) <= merged  # CRM additions survive
    assert (set(pc) - set(base)) <= merged  # Partner Center additions survive
    assert not (merged & ((set(base) - set(crm)) | (set(base) - set(pc))))  # removals apply
    # applying the plan converges both sides
    again = merge(plan.base, with_(solutions=sorted(merged)), with_(solutions=sorted(merged)))
    assert again.is_noop


@given(st.sampled_from(["100", "150", "120"]), st.sampled_from(["100", "150", "120"]))
def test_scalar_merge_converges_unless_manual(crm_value: str, pc_value: str) -> None:
    plan = merge(BASE, with_(value=crm_value), with_(value=pc_value), default_policy=Policy.CRM_WINS)
    crm_after = plan.toward(Direction.TO_CRM).get("value", crm_value)
    pc_after = plan.toward(Direction.TO_PARTNER_CENTER).get("value", pc_value)
    assert crm_after == pc_after == plan.base["value"]


def test_first_pairing_never_lets_an_empty_value_wipe_the_other_side() -> None:
    plan = merge(
        None, with_(notes=""), with_(notes="Microsoft seller engaged"), crm_modified=LATE, pc_modified=EARLY
    )
    assert plan.toward(Direction.TO_CRM) == {"notes": "Microsoft seller engaged"}
    assert plan.toward(Direction.TO_PARTNER_CENTER) == {}


def test_a_read_back_tells_our_echo_from_a_peer_rewrite() -> None:
    from connector.domain.merge import rewritten_fields, values_hash

    base = {"notes": "from PC", "value": "100", "name": "Deal"}
    written = ("notes", "value")
    digest = values_hash({"notes": "from PC", "value": "100"})
    assert rewritten_fields(written, digest, {**base, "name": "Renamed by a human"}, base) == ()
    rewritten = {**base, "notes": "normalised by a CRM flow"}
    assert rewritten_fields(written, digest, rewritten, base) == ("notes",)
