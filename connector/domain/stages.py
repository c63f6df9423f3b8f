"""Stage mapping: a company's own sales stages <-> Partner Center's standard stages, both ways.

Forward (CRM -> Partner Center), first rule that fires wins, and :meth:`StageMapping.resolve` says
which one and why:

1. closed flags: a stage the CRM marks won maps to Won, closed-not-won to Lost (invariant flags, never
   a label guess: stage names are per-org configuration, crm-apis.md §A.2);
2. an explicit label rule for this record type, then one for every record type;
3. a probability band (the record's probability when given, else the stage's default).

Reverse (Partner Center -> CRM): an explicit reverse entry, else the CRM stage with the lowest sort
order that maps forward to the same standard stage (so CRM -> standard -> CRM lands on a stage of the
same standard stage).

:func:`validate` checks a mapping is total and unambiguous over the known CRM stages; the loader in
:mod:`connector.mappings` builds a :class:`StageMapping` and reports problems with file and key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import StrEnum

from connector.domain.model import Deal, StandardStage, Status, Substatus
from connector.domain.rules import Refusal, check_close, check_stage_change
from connector.errors import RecordError

__all__ = [
    "Band",
    "CrmStage",
    "CrmStageDecision",
    "LabelRule",
    "Outcome",
    "Resolution",
    "ReverseKey",
    "StageDecision",
    "StageMapping",
    "StageTarget",
    "decide_crm_stage",
    "decide_referral_stage",
]


class Outcome(StrEnum):
    OPEN = "open"
    WON = "won"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class StageTarget:
    """Where a CRM stage lands in Partner Center: an open standard stage, Won, or Lost."""

    outcome: Outcome
    stage: StandardStage | None = None

    @classmethod
    def open(cls, stage: StandardStage) -> StageTarget:
        if stage is StandardStage.WON:
            return cls.won()
        return cls(Outcome.OPEN, stage)

    @classmethod
    def won(cls) -> StageTarget:
        return cls(Outcome.WON, StandardStage.WON)

    @classmethod
    def lost(cls) -> StageTarget:
        return cls(Outcome.LOST, None)

    @classmethod
    def parse(cls, text: str | int) -> StageTarget:
        """``Lost``, ``Won``, ``100`` or any open standard stage name or percentage."""
        if isinstance(text, str) and text.strip().lower() == "lost":
            return cls.lost()
        return cls.open(StandardStage.parse(text))

    def __str__(self) -> str:
        if self.outcome is Outcome.LOST:
            return "Lost"
        assert self.stage is not None
        return f"{self.stage.label} ({int(self.stage)}%)"


@dataclass(frozen=True, slots=True)
class CrmStage:
    """One stage as the CRM defines it (Salesforce OpportunityStage, Dataverse option set value)."""

    label: str
    probability: int | None = None
    is_closed: bool = False
    is_won: bool = False
    sort_order: int = 0
    active: bool = True
    #: record types / sales processes that allow this stage; empty = all
    record_types: frozenset[str] = frozenset()

    def allowed_for(self, record_type: str | None) -> bool:
        return record_type is None or not self.record_types or record_type in self.record_types


@dataclass(frozen=True, slots=True)
class LabelRule:
    label: str
    target: StageTarget
    record_type: str | None = None
    source: str = ""  # where the rule was written, e.g. "mappings/x.yaml: stages.rules[3]"


@dataclass(frozen=True, slots=True)
class Band:
    """Probabilities ``low..high`` (inclusive) of open stages land on ``target``."""

    low: int
    high: int
    target: StageTarget
    source: str = ""

    def __contains__(self, probability: int) -> bool:
        return self.low <= probability <= self.high


class ReverseKey(StrEnum):
    """Partner Center states that choose a CRM stage."""

    RECEIVED = "received"
    ACCEPTED = "accepted"
    QUALIFIED = "qualified"
    DEVELOPED = "developed"
    PROPOSED = "proposed"
    NEGOTIATED = "negotiated"
    WON = "won"
    LOST = "lost"
    DECLINED = "declined"
    EXPIRED = "expired"

    @classmethod
    def for_target(cls, target: StageTarget) -> ReverseKey:
        if target.outcome is Outcome.LOST:
            return cls.LOST
        assert target.stage is not None
        return cls(target.stage.name.lower())

    @property
    def target(self) -> StageTarget:
        """The forward target a CRM stage chosen for this key must have."""
        if self in (ReverseKey.LOST, ReverseKey.DECLINED, ReverseKey.EXPIRED):
            return StageTarget.lost()
        if self is ReverseKey.RECEIVED:
            return StageTarget.open(StandardStage.ACCEPTED)
        return StageTarget.open(StandardStage[self.name])


@dataclass(frozen=True, slots=True)
class Resolution:
    """The answer to "which standard stage (or CRM stage), by which rule, and why"."""

    target: StageTarget
    rule: str
    reason: str
    crm_label: str = ""
    also_matched: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageMapping:
    """A validated, immutable mapping for one CRM org (see the module docstring for precedence)."""

    stages: tuple[CrmStage, ...]
    rules: tuple[LabelRule, ...] = ()
    bands: tuple[Band, ...] = ()
    reverse: tuple[tuple[ReverseKey, str | None, str], ...] = ()  # (key, record_type, CRM label)
    allow_backward: bool = False
    source: str = ""
    _by_label: dict[str, CrmStage] = field(init=False, repr=False, compare=False)
    _rule_index: dict[tuple[str, str | None], list[LabelRule]] = field(init=False, repr=False, compare=False)
    _reverse_cache: dict[tuple[ReverseKey, str | None], Resolution] = field(
        init=False, repr=False, compare=False
    )
    _forward_cache: dict[tuple[str, int | None, str | None], Resolution] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # Indexes built once: resolve() runs for every opportunity of every run.
        object.__setattr__(self, "_by_label", {_norm(s.label): s for s in self.stages})
        index: dict[tuple[str, str | None], list[LabelRule]] = {}
        for rule in self.rules:
            index.setdefault((_norm(rule.label), rule.record_type), []).append(rule)
        object.__setattr__(self, "_rule_index", index)
        object.__setattr__(self, "_reverse_cache", {})
        object.__setattr__(self, "_forward_cache", {})

    # --- forward ----------------------------------------------------------------------------------

    def stage(self, label: str) -> CrmStage | None:
        return self._by_label.get(_norm(label))

    def record_types(self) -> list[str | None]:
        kinds: set[str] = set()
        for s in self.stages:
            kinds |= s.record_types
        kinds |= {r.record_type for r in self.rules if r.record_type}
        return [None, *sorted(kinds)]

    def resolve(
        self, label: str, probability: int | None = None, record_type: str | None = None
    ) -> Resolution:
        """Which standard stage a CRM stage (with the record's probability) lands on, and why.

        Raises :class:`RecordError` (cause ``stage-unmapped``) when nothing maps it.
        """
        # an org has a few dozen (stage, probability, record type) combinations; a book, 100,000 deals
        key = (label, probability, record_type)
        cached = self._forward_cache.get(key)
        if cached is None:
            cached = self._resolve(label, probability, record_type)
            if len(self._forward_cache) < 10_000:  # bounded: probabilities are free numbers
                self._forward_cache[key] = cached
        return cached

    def _resolve(self, label: str, probability: int | None, record_type: str | None) -> Resolution:
        known = self.stage(label)
        matches = self._forward_matches(label, probability, record_type, known)
        if not matches:
            where = f" for record type {record_type}" if record_type else ""
            what = "is not a stage this mapping knows" if known is None else "has no rule"
            raise RecordError(
                f"CRM stage {label!r}{where} {what}: add a rule or a probability band to {self.source or 'the mapping'}",
                cause="stage-unmapped",
            )
        first, *rest = matches
        return Resolution(
            first.target,
            first.rule,
            first.reason,
            crm_label=known.label if known else label,
            also_matched=tuple(f"{m.rule} -> {m.target}" for m in rest),
        )

    def _forward_matches(
        self, label: str, probability: int | None, record_type: str | None, known: CrmStage | None
    ) -> list[Resolution]:
        out: list[Resolution] = []
        if known is not None and known.is_closed:
            target = StageTarget.won() if known.is_won else StageTarget.lost()
            out.append(
                Resolution(
                    target,
                    f"closed-flag:{target.outcome.value}",
                    f"the CRM marks {known.label!r} closed{' and won' if known.is_won else ', not won'}",
                )
            )
        for rule in self.rules:
            if (
                _norm(rule.label) == _norm(label)
                and rule.record_type == record_type
                and record_type is not None
            ):
                out.append(
                    Resolution(
                        rule.target, f"label:{rule.label}@{record_type}", f"explicit rule ({rule.source})"
                    )
                )
        for rule in self.rules:
            if _norm(rule.label) == _norm(label) and rule.record_type is None:
                out.append(Resolution(rule.target, f"label:{rule.label}", f"explicit rule ({rule.source})"))
        p = probability if probability is not None else (known.probability if known else None)
        if p is not None and not (known is not None and known.is_closed):
            for band in self.bands:
                if p in band:
                    basis = (
                        "the record's probability"
                        if probability is not None
                        else "the stage's default probability"
                    )
                    out.append(
                        Resolution(
                            band.target,
                            f"band:{band.low}-{band.high}",
                            f"{basis} {p}% is in {band.low}..{band.high}% ({band.source})",
                        )
                    )
        return out

    # --- reverse ----------------------------------------------------------------------------------

    def to_crm(self, key: ReverseKey, record_type: str | None = None) -> Resolution:
        """The CRM stage to set when Partner Center reaches ``key`` (a stage, an outcome or a status)."""
        cached = self._reverse_cache.get((key, record_type))
        if cached is None:
            cached = self._reverse_cache[(key, record_type)] = self._to_crm(key, record_type)
        return cached

    def _to_crm(self, key: ReverseKey, record_type: str | None) -> Resolution:
        for k, rt, label in self.reverse:
            if k is key and rt == record_type and rt is not None:
                return Resolution(
                    key.target, f"reverse:{key.value}@{rt}", "explicit reverse entry", crm_label=label
                )
        for k, rt, label in self.reverse:
            if k is key and rt is None:
                return Resolution(
                    key.target, f"reverse:{key.value}", "explicit reverse entry", crm_label=label
                )
        candidates = sorted(
            (s for s in self.stages if s.active and s.allowed_for(record_type)),
            key=lambda s: s.sort_order,
        )
        open_stages = [s for s in candidates if not s.is_closed]
        if key is ReverseKey.RECEIVED and open_stages:
            # An inbound referral nobody answered yet: park it on the earliest open stage (the official
            # connector's "on-hold stage"), unless the mapping names one.
            first = open_stages[0]
            return Resolution(
                self._target_or_none(first, record_type) or StageTarget.open(StandardStage.ACCEPTED),
                "reverse-default:received",
                "earliest open CRM stage (by sort order)",
                crm_label=first.label,
            )
        wanted = key.target
        for s in candidates:
            if self._target_or_none(s, record_type) == wanted:
                return Resolution(
                    wanted,
                    f"reverse-default:{key.value}",
                    f"first CRM stage (by sort order) that maps to {wanted}",
                    crm_label=s.label,
                )
        if wanted.outcome is Outcome.OPEN and wanted.stage is not None:
            # No CRM stage at this standard stage (e.g. the company has no negotiation stage): take the
            # highest CRM stage below it, so the CRM never jumps ahead of what Partner Center says; for
            # the lowest stages, the earliest open stage above.
            mapped = [
                (t, s) for s in open_stages for t in [self._target_or_none(s, record_type)] if t and t.stage
            ]
            below = [(t, s) for t, s in mapped if t.stage is not None and t.stage < wanted.stage]
            above = [(t, s) for t, s in mapped if t.stage is not None and t.stage > wanted.stage]
            if below:
                t, s = max(below, key=lambda ts: (ts[0].stage or 0, -ts[1].sort_order))
                why = f"no CRM stage maps to {wanted}; nearest below is {t}"
                return Resolution(t, f"reverse-nearest:{key.value}", why, crm_label=s.label)
            if above:
                t, s = min(above, key=lambda ts: (ts[0].stage or 0, ts[1].sort_order))
                why = f"no CRM stage maps to {wanted} or below; nearest above is {t}"
                return Resolution(t, f"reverse-nearest:{key.value}", why, crm_label=s.label)
        raise RecordError(
            f"no CRM stage to set for Partner Center {key.value}"
            + (f" (record type {record_type})" if record_type else "")
            + f": add a reverse entry to {self.source or 'the mapping'}",
            cause="stage-unmapped",
        )

    def _target_or_none(self, stage: CrmStage, record_type: str | None) -> StageTarget | None:
        try:
            return self.resolve(stage.label, None, record_type).target
        except RecordError:
            return None

    def table(self, record_type: str | None = None) -> list[tuple[CrmStage, Resolution | None]]:
        """The effective stage table for display: every known stage and where it lands."""
        rows: list[tuple[CrmStage, Resolution | None]] = []
        for s in sorted(self.stages, key=lambda s: s.sort_order):
            if s.allowed_for(record_type):
                try:
                    rows.append((s, self.resolve(s.label, None, record_type)))
                except RecordError:
                    rows.append((s, None))
        return rows


@functools.lru_cache(maxsize=4096)
def _norm(label: str) -> str:
    # cached: a page's records share a handful of stage labels, normalised on every resolution
    return " ".join(label.split()).casefold()


# --- validation --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MappingProblem:
    key: str
    problem: str
    valid: str = ""


def validate(mapping: StageMapping) -> list[MappingProblem]:
    """Every way the mapping is not total, not unambiguous, or refers to names that do not exist."""
    problems: list[MappingProblem] = []
    labels = ", ".join(s.label for s in mapping.stages)
    seen: dict[str, int] = {}
    for i, s in enumerate(mapping.stages):
        if _norm(s.label) in seen:
            problems.append(MappingProblem(f"stages.crm[{i}]", f"stage {s.label!r} is listed twice"))
        seen[_norm(s.label)] = i
        if s.is_won and not s.is_closed:
            problems.append(MappingProblem(f"stages.crm[{i}]", f"stage {s.label!r} is won but not closed"))
        if s.probability is not None and not 0 <= s.probability <= 100:
            problems.append(MappingProblem(f"stages.crm[{i}].probability", "must be between 0 and 100"))
    # bands: sorted, no overlaps, no gaps, cover 0..100
    bands = sorted(enumerate(mapping.bands), key=lambda ib: ib[1].low)
    expect = 0
    for i, band in bands:
        key = f"stages.bands[{i}]"
        if band.low > band.high:
            problems.append(MappingProblem(key, f"band {band.low}..{band.high} is empty (from > to)"))
            continue
        if band.low > expect:
            problems.append(
                MappingProblem(key, f"gap: probabilities {expect}..{band.low - 1}% map to nothing")
            )
        elif band.low < expect:
            problems.append(
                MappingProblem(key, f"overlap: {band.low}..{min(band.high, expect - 1)}% is in two bands")
            )
        if band.target.outcome is not Outcome.OPEN:
            problems.append(
                MappingProblem(key, "bands map open stages; won and lost come from the closed flags")
            )
        expect = max(expect, band.high + 1)
    if bands and expect <= 100:
        problems.append(MappingProblem("stages.bands", f"gap: probabilities {expect}..100% map to nothing"))
    # rules refer to known stages; one rule per (label, record type); consistent with closed flags
    seen_rules: dict[tuple[str, str | None], int] = {}
    for i, rule in enumerate(mapping.rules):
        key = f"stages.rules[{i}]"
        known = mapping.stage(rule.label)
        if known is None:
            problems.append(MappingProblem(key, f"unknown CRM stage {rule.label!r}", labels))
            continue
        ident = (_norm(rule.label), rule.record_type)
        if ident in seen_rules:
            problems.append(
                MappingProblem(
                    key, f"stage {rule.label!r} is mapped twice (also stages.rules[{seen_rules[ident]}])"
                )
            )
        seen_rules[ident] = i
        if known.is_closed:
            flag = StageTarget.won() if known.is_won else StageTarget.lost()
            if rule.target != flag:
                problems.append(
                    MappingProblem(
                        key,
                        f"{rule.label!r} is closed{' and won' if known.is_won else ''} in the CRM but mapped to {rule.target}",
                    )
                )
        elif rule.target.outcome is not Outcome.OPEN:
            problems.append(
                MappingProblem(key, f"{rule.label!r} is an open stage but mapped to {rule.target}")
            )
        if rule.record_type and known.record_types and rule.record_type not in known.record_types:
            problems.append(
                MappingProblem(
                    key,
                    f"record type {rule.record_type!r} does not allow stage {rule.label!r}",
                    ", ".join(sorted(known.record_types)),
                )
            )
    # totality: every active stage of every record type maps
    for rt in mapping.record_types():
        for s in mapping.stages:
            if s.allowed_for(rt) and s.active and mapping._target_or_none(s, rt) is None:
                where = f" (record type {rt})" if rt else ""
                problems.append(
                    MappingProblem(
                        "stages.rules", f"CRM stage {s.label!r}{where} is not mapped: add a rule or a band"
                    )
                )
    # reverse entries: known labels, and consistent with the forward mapping (round trip)
    for i, (k, rt, label) in enumerate(mapping.reverse):
        key = f"stages.reverse[{i}]"
        known = mapping.stage(label)
        if known is None:
            problems.append(MappingProblem(key, f"unknown CRM stage {label!r}", labels))
            continue
        forward = mapping._target_or_none(known, rt)
        if k is ReverseKey.RECEIVED:
            if known.is_closed:
                problems.append(
                    MappingProblem(key, f"received -> {label!r}: an unanswered referral needs an open stage")
                )
        elif forward is not None and forward != k.target:
            problems.append(
                MappingProblem(
                    key,
                    f"{k.value} -> {label!r} does not round-trip: {label!r} maps forward to {forward}, not {k.target}",
                )
            )
    for rt in mapping.record_types():
        for k in (ReverseKey.WON, ReverseKey.LOST, ReverseKey.RECEIVED):
            try:
                mapping.to_crm(k, rt)
            except RecordError as exc:
                problems.append(MappingProblem("stages.reverse", str(exc)))
    return problems


# --- deciding what to send ---------------------------------------------------------------------


class StageAction(StrEnum):
    NONE = "none"
    SET_STAGE = "set-stage"
    WIN = "win"
    LOSE = "lose"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class StageDecision:
    action: StageAction
    resolution: Resolution | None = None
    refusals: tuple[Refusal, ...] = ()

    @property
    def stage(self) -> StandardStage | None:
        return (
            self.resolution.target.stage if self.resolution and self.action is StageAction.SET_STAGE else None
        )


def decide_referral_stage(
    mapping: StageMapping,
    referral: Deal,
    crm_label: str,
    probability: int | None = None,
    record_type: str | None = None,
    lost_reason: str | None = None,
) -> StageDecision:
    """What a CRM stage means for the referral: set a stage, win, lose, nothing, or refused (and why).

    Guards: a terminal referral is never touched; a stage never moves backwards unless the mapping
    allows it; Won/Lost follow the closing rules (Lost needs a reason).
    """
    resolution = mapping.resolve(crm_label, probability, record_type)
    target = resolution.target
    refusals: list[Refusal]
    if target.outcome is Outcome.WON:
        if referral.substatus is Substatus.WON:
            return StageDecision(StageAction.NONE, resolution)
        refusals = check_close(referral, Substatus.WON)
        action = StageAction.WIN
    elif target.outcome is Outcome.LOST:
        if referral.substatus is Substatus.LOST:
            return StageDecision(StageAction.NONE, resolution)
        refusals = check_close(referral, Substatus.LOST, lost_reason or "Closed in CRM")
        action = StageAction.LOSE
    else:
        assert target.stage is not None
        if referral.sales_stage == target.stage and not referral.is_terminal:
            return StageDecision(StageAction.NONE, resolution)
        if referral.status is Status.NEW and not referral.is_terminal:
            # Not accepted yet: the stage waits (the outbox keeps it) until the referral is accepted.
            refusals = [
                Refusal(
                    "stage-needs-accepted",
                    f"{referral.label} is not accepted yet: its sales stage can be set once it is accepted.",
                    "sales_stage",
                )
            ]
        else:
            refusals = check_stage_change(referral, target.stage, allow_backward=mapping.allow_backward)
            if not refusals and referral.sales_stage == target.stage:
                return StageDecision(StageAction.NONE, resolution)
        action = StageAction.SET_STAGE
    if refusals:
        return StageDecision(StageAction.REFUSED, resolution, tuple(refusals))
    return StageDecision(action, resolution)


@dataclass(frozen=True, slots=True)
class CrmStageDecision:
    """What a Partner Center change means for the CRM opportunity's stage."""

    label: str | None  # the CRM stage to set; None = leave it
    resolution: Resolution | None = None
    refusal: Refusal | None = None


def decide_crm_stage(
    mapping: StageMapping, current_label: str | None, key: ReverseKey, record_type: str | None = None
) -> CrmStageDecision:
    """The CRM stage to set when Partner Center reaches ``key``, guarded like the forward direction:
    a closed CRM opportunity is not reopened and an open one does not move backwards unless the
    mapping allows it."""
    resolution = mapping.to_crm(key, record_type)
    if current_label is None:
        return CrmStageDecision(resolution.crm_label, resolution)
    current = mapping.stage(current_label)
    if current is not None and _norm(current.label) == _norm(resolution.crm_label):
        return CrmStageDecision(None, resolution)
    if current is not None and current.is_closed:
        return CrmStageDecision(
            None,
            resolution,
            Refusal(
                "crm-closed",
                f"The opportunity is already closed at {current.label!r}; Partner Center's {key.value} "
                "does not reopen it.",
                "sales_stage",
            ),
        )
    target_now = mapping._target_or_none(current, record_type) if current is not None else None
    new = resolution.target
    if (
        not mapping.allow_backward
        and target_now is not None
        and target_now.outcome is Outcome.OPEN
        and new.outcome is Outcome.OPEN
        and target_now.stage is not None
        and new.stage is not None
        and new.stage < target_now.stage
    ):
        return CrmStageDecision(
            None,
            resolution,
            Refusal(
                "stage-backward",
                f"Partner Center is at {new}, behind the opportunity's {current_label!r} ({target_now}); "
                "the CRM stage is kept (allow_backward in the mapping changes that).",
                "sales_stage",
            ),
        )
    return CrmStageDecision(resolution.crm_label, resolution)
