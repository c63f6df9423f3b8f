"""Stage mapping: precedence, reverse choice, validation, and the properties the issue asks for."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.domain.model import Deal, StandardStage, Status, Substatus
from connector.domain.stages import (
    Band,
    CrmStage,
    LabelRule,
    Outcome,
    ReverseKey,
    StageAction,
    StageMapping,
    StageTarget,
    decide_crm_stage,
    decide_referral_stage,
    validate,
)
from connector.errors import RecordError
from connector.mappings import load_mapping_files
from tests.unit.factories import deal, inbound

OPEN_STAGES = [s for s in StandardStage if s is not StandardStage.WON]


def simple_mapping(**changes: object) -> StageMapping:
    base = StageMapping(
        stages=(
            CrmStage("Prospect", 10, sort_order=1),
            CrmStage("Discover", 30, sort_order=2),
            CrmStage("Propose", 60, sort_order=3),
            CrmStage("Won", 100, is_closed=True, is_won=True, sort_order=4),
            CrmStage("Lost", 0, is_closed=True, sort_order=5),
            CrmStage("Enterprise Review", 70, sort_order=6, record_types=frozenset({"Enterprise"})),
        ),
        rules=(
            LabelRule("Discover", StageTarget.open(StandardStage.DEVELOPED), source="t: rules[0]"),
            LabelRule(
                "Discover", StageTarget.open(StandardStage.QUALIFIED), "Enterprise", source="t: rules[1]"
            ),
        ),
        bands=(
            Band(0, 19, StageTarget.open(StandardStage.ACCEPTED)),
            Band(20, 49, StageTarget.open(StandardStage.QUALIFIED)),
            Band(50, 100, StageTarget.open(StandardStage.PROPOSED)),
        ),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# --- forward precedence ------------------------------------------------------------------------


def test_closed_flags_beat_everything() -> None:
    m = simple_mapping(rules=(LabelRule("Won", StageTarget.won()),))
    res = m.resolve("Won")
    assert res.target.outcome is Outcome.WON and res.rule == "closed-flag:won"
    assert m.resolve("lost").target == StageTarget.lost()


def test_record_type_rule_beats_generic_rule_beats_band() -> None:
    m = simple_mapping()
    assert m.resolve("Discover").target.stage is StandardStage.DEVELOPED
    enterprise = m.resolve("Discover", record_type="Enterprise")
    assert (
        enterprise.target.stage is StandardStage.QUALIFIED and enterprise.rule == "label:Discover@Enterprise"
    )
    assert any("band" in other for other in enterprise.also_matched)


def test_band_uses_record_probability_then_stage_default() -> None:
    m = simple_mapping()
    assert m.resolve("Propose").target.stage is StandardStage.PROPOSED
    assert m.resolve("Propose", probability=5).target.stage is StandardStage.ACCEPTED
    assert "record's probability" in m.resolve("Propose", probability=5).reason


def test_labels_match_case_and_space_insensitively() -> None:
    assert simple_mapping().resolve("  discover ").crm_label == "Discover"


def test_unmapped_stage_is_a_record_error_naming_the_mapping() -> None:
    m = simple_mapping(bands=(), source="acme.yaml")
    with pytest.raises(RecordError, match=r"acme\.yaml") as info:
        m.resolve("Prospect")
    assert info.value.cause == "stage-unmapped"
    with pytest.raises(RecordError, match="not a stage this mapping knows"):
        m.resolve("Nonexistent")


# --- reverse -----------------------------------------------------------------------------------


def test_reverse_defaults_to_first_stage_at_that_standard_stage() -> None:
    m = simple_mapping()
    assert m.to_crm(ReverseKey.PROPOSED).crm_label == "Propose"
    assert m.to_crm(ReverseKey.WON).crm_label == "Won"
    assert m.to_crm(ReverseKey.DECLINED).crm_label == "Lost"
    assert m.to_crm(ReverseKey.RECEIVED).crm_label == "Prospect"


def test_reverse_takes_nearest_stage_below_when_none_matches() -> None:
    res = simple_mapping().to_crm(ReverseKey.NEGOTIATED)
    assert res.crm_label == "Propose" and res.rule == "reverse-nearest:negotiated"


def test_explicit_reverse_entries_win_and_may_be_per_record_type() -> None:
    m = simple_mapping(
        reverse=(
            (ReverseKey.RECEIVED, None, "Discover"),
            (ReverseKey.PROPOSED, "Enterprise", "Enterprise Review"),
        )
    )
    assert m.to_crm(ReverseKey.RECEIVED).crm_label == "Discover"
    assert m.to_crm(ReverseKey.PROPOSED, "Enterprise").crm_label == "Enterprise Review"
    assert m.to_crm(ReverseKey.PROPOSED).crm_label == "Propose"


# --- validation --------------------------------------------------------------------------------


def problems_of(m: StageMapping) -> list[str]:
    return [f"{p.key}: {p.problem}" for p in validate(m)]


def test_the_sample_mapping_is_valid() -> None:
    assert problems_of(simple_mapping()) == []


def test_band_gaps_and_overlaps_are_flagged() -> None:
    gap = simple_mapping(
        bands=(
            Band(0, 19, StageTarget.open(StandardStage.ACCEPTED)),
            Band(25, 100, StageTarget.open(StandardStage.PROPOSED)),
        )
    )
    assert any("gap: probabilities 20..24%" in p for p in problems_of(gap))
    overlap = simple_mapping(
        bands=(
            Band(0, 30, StageTarget.open(StandardStage.ACCEPTED)),
            Band(25, 100, StageTarget.open(StandardStage.PROPOSED)),
        )
    )
    assert any("overlap: 25..30%" in p for p in problems_of(overlap))
    short = simple_mapping(bands=(Band(0, 90, StageTarget.open(StandardStage.ACCEPTED)),))
    assert any("gap: probabilities 91..100%" in p for p in problems_of(short))


def test_rule_problems_are_flagged() -> None:
    m = simple_mapping(
        rules=(
            LabelRule("Nope", StageTarget.open(StandardStage.QUALIFIED)),
            LabelRule("Propose", StageTarget.open(StandardStage.QUALIFIED)),
            LabelRule("Propose", StageTarget.open(StandardStage.DEVELOPED)),
            LabelRule("Won", StageTarget.open(StandardStage.PROPOSED)),
            LabelRule("Prospect", StageTarget.lost()),
        )
    )
    text = "\n".join(problems_of(m))
    assert "unknown CRM stage 'Nope'" in text
    assert "mapped twice" in text
    assert "closed and won in the CRM but mapped to Proposed" in text
    assert "open stage but mapped to Lost" in text


def test_every_stage_must_map() -> None:
    m = simple_mapping(bands=())
    text = "\n".join(problems_of(m))
    assert "'Prospect' is not mapped" in text and "'Propose' is not mapped" in text


def test_reverse_entries_must_round_trip() -> None:
    m = simple_mapping(reverse=((ReverseKey.WON, None, "Propose"), (ReverseKey.RECEIVED, None, "Lost")))
    text = "\n".join(problems_of(m))
    assert "won -> 'Propose' does not round-trip" in text
    assert "unanswered referral needs an open stage" in text


def test_a_mapping_without_won_or_lost_stage_is_flagged() -> None:
    m = simple_mapping(stages=tuple(s for s in simple_mapping().stages if not s.is_closed))
    text = "\n".join(problems_of(m))
    assert "won" in text and "lost" in text


# --- deciding what to send ---------------------------------------------------------------------


def test_forward_stage_is_set_backward_refused() -> None:
    m = simple_mapping()
    d = deal(sales_stage=StandardStage.QUALIFIED)
    assert decide_referral_stage(m, d, "Propose").action is StageAction.SET_STAGE
    back = decide_referral_stage(m, deal(sales_stage=StandardStage.PROPOSED), "Prospect")
    assert back.action is StageAction.REFUSED and back.refusals[0].rule == "stage-backward"
    allowed = decide_referral_stage(
        replace(m, allow_backward=True), deal(sales_stage=StandardStage.PROPOSED), "Prospect"
    )
    assert allowed.action is StageAction.SET_STAGE and allowed.stage is StandardStage.ACCEPTED


def test_closing_and_terminal_guards() -> None:
    m = simple_mapping()
    assert decide_referral_stage(m, deal(), "Won").action is StageAction.WIN
    assert decide_referral_stage(m, deal(), "Lost").action is StageAction.LOSE
    won = deal(status=Status.CLOSED, substatus=Substatus.WON)
    assert decide_referral_stage(m, won, "Won").action is StageAction.NONE
    reopen = decide_referral_stage(m, won, "Prospect")
    assert reopen.action is StageAction.REFUSED and reopen.refusals[0].rule == "terminal-immutable"


def test_stage_on_unaccepted_inbound_waits() -> None:
    decision = decide_referral_stage(simple_mapping(), inbound(), "Propose")
    assert decision.action is StageAction.REFUSED and decision.refusals[0].rule == "stage-needs-accepted"


def test_crm_side_guards() -> None:
    m = simple_mapping()
    assert decide_crm_stage(m, "Prospect", ReverseKey.PROPOSED).label == "Propose"
    assert decide_crm_stage(m, "Propose", ReverseKey.PROPOSED).label is None
    back = decide_crm_stage(m, "Propose", ReverseKey.QUALIFIED)
    assert back.label is None and back.refusal is not None and back.refusal.rule == "stage-backward"
    closed = decide_crm_stage(m, "Won", ReverseKey.LOST)
    assert closed.label is None and closed.refusal is not None and closed.refusal.rule == "crm-closed"
    assert decide_crm_stage(m, None, ReverseKey.RECEIVED).label == "Prospect"


# --- properties --------------------------------------------------------------------------------

SHIPPED = [
    load_mapping_files([f"builtin:{name}"]).stages
    for name in ("salesforce-default.yaml", "dynamics-default.yaml")
]


@st.composite
def valid_mappings(draw: st.DrawFn) -> StageMapping:
    n_open = draw(st.integers(1, 8))
    stages = [CrmStage(f"S{i}", draw(st.integers(0, 100)), sort_order=i) for i in range(n_open)]
    stages.append(CrmStage("Won", 100, is_closed=True, is_won=True, sort_order=n_open))
    stages.append(CrmStage("Lost", 0, is_closed=True, sort_order=n_open + 1))
    cuts = sorted(draw(st.sets(st.integers(1, 100), max_size=5)))
    edges = [0, *cuts, 101]
    bands = tuple(
        Band(lo, hi - 1, StageTarget.open(draw(st.sampled_from(OPEN_STAGES))))
        for lo, hi in itertools.pairwise(edges)
    )
    ruled = draw(st.sets(st.integers(0, n_open - 1)))
    rules = tuple(
        LabelRule(f"S{i}", StageTarget.open(draw(st.sampled_from(OPEN_STAGES)))) for i in sorted(ruled)
    )
    return StageMapping(tuple(stages), rules, bands, allow_backward=False)


@settings(max_examples=200, deadline=None)
@given(valid_mappings())
def test_generated_mappings_validate_and_round_trip(m: StageMapping) -> None:
    assert validate(m) == []
    for stage in m.stages:
        target = m.resolve(stage.label).target
        back = m.to_crm(ReverseKey.for_target(target))
        assert m.resolve(back.crm_label).target == target, (stage.label, back)


@pytest.mark.parametrize("m", SHIPPED, ids=["salesforce", "dynamics"])
def test_shipped_mappings_round_trip(m: StageMapping) -> None:
    assert validate(m) == []
    for stage in m.stages:
        target = m.resolve(stage.label).target
        assert m.resolve(m.to_crm(ReverseKey.for_target(target)).crm_label).target == target


def apply(d: Deal, m: StageMapping, label: str) -> Deal:
    decision = decide_referral_stage(m, d, label, lost_reason="Customer chose another vendor")
    if decision.action is StageAction.SET_STAGE:
        return replace(d, sales_stage=decision.stage)
    if decision.action is StageAction.WIN:
        return replace(d, status=Status.CLOSED, substatus=Substatus.WON)
    if decision.action is StageAction.LOSE:
        return replace(d, status=Status.CLOSED, substatus=Substatus.LOST)
    return d


@settings(max_examples=300, deadline=None)
@given(st.data(), st.one_of(valid_mappings(), st.sampled_from(SHIPPED)))
def test_no_stage_sequence_moves_a_referral_backwards_or_out_of_a_terminal_state(
    data: st.DataObject, m: StageMapping
) -> None:
    labels = [s.label for s in m.stages]
    sequence = data.draw(st.lists(st.sampled_from(labels), max_size=25))
    d = deal(sales_stage=StandardStage.ACCEPTED)
    for label in sequence:
        after = apply(d, m, label)
        if d.is_terminal:
            assert after == d, "a terminal referral changed"
        if not after.is_terminal and d.sales_stage is not None and after.sales_stage is not None:
            assert after.sales_stage >= d.sales_stage, "the stage moved backwards"
        d = after
