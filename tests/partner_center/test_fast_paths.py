"""The conversion's fast paths give what the general paths give.

- :func:`create_body` walks precomputed per-class field plans; :func:`reference_known` below is the
  plain walk it replaced (the contract: set, declared, writable fields only, at every depth, in
  declared order, Decimals as JSON numbers), compared on documented referrals with random fields
  dropped and unknown and read-only keys added.
- :func:`parse_stage` looks the usual values up in one dict before its general reading.
- The caches (timestamps, contacts, solutions) give what the uncached functions give, and never keep
  a failure.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
from datetime import date
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from connector.domain.model import (
    Contact,
    Deal,
    HelpType,
    Money,
    Solution,
    SolutionKind,
    StandardStage,
    Status,
    Substatus,
)
from connector.domain.rules import derive_deal_type
from connector.errors import RecordError
from connector.partner_center import convert, models
from connector.partner_center.convert import STAGE_WORDS, StageFormat, parse_stage, referral_to_deal
from connector.partner_center.models import (
    CREATE_FIELDS,
    Details,
    IdRef,
    Member,
    Referral,
    Requirements,
    SolutionTag,
    create_body,
    json_number,
    parse_utc,
)

from .conftest import fixture_json
from .test_models import REFERRALS


def reference_known(value: Any) -> Any:
    """The general walk (as create_body was first written): the specification of the fast one."""
    if isinstance(value, models._Wire):
        out: dict[str, Any] = {}
        for name, info in type(value).model_fields.items():
            if name not in value.model_fields_set or name in type(value).read_only:
                continue
            out[info.serialization_alias or info.alias or name] = reference_known(getattr(value, name))
        return out
    if isinstance(value, list):
        return [reference_known(v) for v in value]
    if isinstance(value, Decimal):
        return json_number(value)
    return value


def reference_create_body(referral: Referral) -> dict[str, Any]:
    body = reference_known(referral)
    allowed = {
        Referral.model_fields[name].alias or name
        for name in CREATE_FIELDS
        if name in referral.model_fields_set
    }
    return {k: v for k, v in body.items() if k in allowed}


def same_json(a: Any, b: Any) -> bool:
    """Equal, key order included (the bytes on the wire)."""
    return json.dumps(a, default=repr) == json.dumps(b, default=repr)


_EXTRA_VALUES: list[Any] = [None, 0, 1.5, "x", True, [], {}, [1, {"k": None}], {"nested": [2.5, "y"]}]


def _mutate(node: Any, rng: random.Random) -> Any:
    """Drop some keys, add unknown ones (and a read-only one), at every depth; turn amounts to text."""
    if isinstance(node, list):
        return [_mutate(v, rng) for v in node if rng.random() > 0.2]
    if not isinstance(node, dict):
        return node
    out = {k: _mutate(v, rng) for k, v in node.items() if rng.random() > 0.25}
    if rng.random() < 0.5:
        out[f"fy27{rng.randrange(100)}"] = copy.deepcopy(rng.choice(_EXTRA_VALUES))
    if "address" in out and rng.random() < 0.5:
        out["isMatchingComplete"] = rng.random() < 0.5  # read-only in customerProfile
    if isinstance(out.get("dealValue"), int | float) and rng.random() < 0.5:
        out["dealValue"] = rng.choice([str(out["dealValue"]), out["dealValue"] + 0.25, 1e20 + 0.5])
    return out


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(REFERRALS), st.randoms(use_true_random=False))
def test_create_body_is_the_general_walk(name: str, rng: random.Random) -> None:
    try:
        referral = Referral.model_validate(_mutate(fixture_json(name), rng))
    except ValidationError:
        return  # a shape the model refuses: nothing to write
    assert same_json(create_body(referral), reference_create_body(referral))
    assert same_json(models._known(referral), reference_known(referral))


@pytest.mark.parametrize("name", REFERRALS)
def test_create_body_is_the_general_walk_on_every_documented_referral(name: str) -> None:
    referral = Referral.model_validate(fixture_json(name))
    assert same_json(create_body(referral), reference_create_body(referral))
    assert same_json(
        create_body(convert.deal_to_referral(referral_to_deal(referral))),
        reference_create_body(convert.deal_to_referral(referral_to_deal(referral))),
    )


def test_known_walks_values_that_only_construction_puts_there() -> None:
    # Any-typed lists may hold models, Decimals and dicts when a referral is built in code.
    offers: list[Any] = [Decimal("2"), Decimal("2.5"), IdRef(id="x", fy=1), {"a": Decimal(1)}, [Decimal(3)]]
    referral = Referral(
        name="n",
        details=Details(
            requirements=Requirements(offers=offers, solutions=[SolutionTag(id="S", price=Decimal(4))])
        ),
        team=[Member(first_name="A", pronouns="they")],
        partner_role=Decimal("1.0"),
    )
    assert same_json(create_body(referral), reference_create_body(referral))
    assert models._known(referral) == reference_known(referral)
    assert models._known(referral)["details"]["requirements"]["offers"][:3] == [2, 2.5, {"id": "x"}]


class _Text(str):
    """A str the fast path does not take (it checks the exact type): read by the general path."""


class _Number(int):
    pass


_STAGE_INPUTS: list[str | int] = [
    *(str(int(s)) for s in StandardStage),
    *(int(s) for s in StandardStage),
    *STAGE_WORDS.values(),
    "20 ",
    "020",
    "qualify",
    "CLOSE",
    "Developed",
    "created",
    "37",
    "",
    "  ",
    37,
    0,
    "Ponder",
]


@pytest.mark.parametrize("raw", _STAGE_INPUTS)
def test_parse_stage_lookup_is_the_general_reading(raw: str | int) -> None:
    general = _Text(raw) if isinstance(raw, str) else _Number(raw)
    assert parse_stage(raw) is parse_stage(general)


@given(st.one_of(st.text(max_size=12), st.integers(-5, 150)))
def test_parse_stage_lookup_is_the_general_reading_for_any_value(raw: str | int) -> None:
    general = _Text(raw) if isinstance(raw, str) else _Number(raw)
    assert parse_stage(raw) is parse_stage(general)


_TIMESTAMPS = st.builds(
    lambda d, t, frac, zone: f"{d}T{t}{frac}{zone}",
    st.dates(date(1971, 1, 1), date(9998, 12, 31)).map(lambda d: d.isoformat()),
    st.times().map(lambda t: t.strftime("%H:%M:%S")),
    st.one_of(st.just(""), st.integers(0, 10**7 - 1).map(lambda n: "." + str(n)[: 1 + n % 7])),
    st.sampled_from(["Z", "+00:00", "-02:00", "+05:30", "+13:45"]),
)


@given(_TIMESTAMPS)
def test_cached_parse_utc_is_the_parse(text: str) -> None:
    assert parse_utc(text) == parse_utc.__wrapped__(text) == parse_utc(text)


def test_bad_timestamps_are_refused_every_time() -> None:
    for _ in range(2):  # a failure is never cached
        with pytest.raises(ValueError):
            parse_utc("2022-03-07 09:18")
        with pytest.raises(ValidationError):
            Referral.model_validate({"updatedDateTime": "2022-03-07 09:18"})
    text = "2022-03-07T09:18:01.6076542Z"
    assert Referral.model_validate({"createdDateTime": text}).created_date_time == text
    assert Referral.model_validate({"createdDateTime": text}).created_date_time == text


_NAMES = st.one_of(st.none(), st.sampled_from(["", "Sam", "Jane Doe", "[REDACTED]"]))
_EMAILS = st.one_of(st.none(), st.sampled_from(["", "sam@contoso.com", "[REDACTED]", "a@b", "x y@z.com"]))


@given(_NAMES, _NAMES, _EMAILS, _NAMES, _NAMES)
def test_contacts_are_read_with_a_malformed_email_dropped(
    first: str | None, last: str | None, email: str | None, phone: str | None, title: str | None
) -> None:
    member = Member(first_name=first, last_name=last, email=email, phone_number=phone, title=title)
    contact = convert._contact(member)
    assert (contact.first_name, contact.last_name, contact.phone) == (first or "", last or "", phone or "")
    assert contact.email in ("", email)
    assert not hasattr(convert._person, "cache_info")  # customer contacts are never held in a cache


@given(
    st.one_of(st.none(), st.sampled_from(["", " ", "SOL-34104-EBB", "sol-1", "Microsoft365", "x"])),
    _NAMES,
    st.one_of(st.none(), st.sampled_from(["Category", "Name", "None"])),
    st.one_of(st.none(), st.sampled_from(["3P", "3p", "1P", ""])),
)
def test_cached_solutions_are_the_solutions(
    tag_id: str | None, name: str | None, tag_type: str | None, solution_type: str | None
) -> None:
    tag = SolutionTag(id=tag_id, name=name, type=tag_type, solution_type=solution_type)
    fresh = convert._solution_of.__wrapped__(tag_id or "", name or "", tag_type, solution_type or "")
    assert convert._solution(tag) == fresh
    assert convert._solution(tag) == fresh


def test_deal_type_is_derived_once_on_the_new_deal() -> None:
    for name in REFERRALS:
        deal = referral_to_deal(Referral.model_validate(fixture_json(name)))
        assert deal.deal_type is derive_deal_type(deal)


def test_plans_list_only_declared_writable_fields() -> None:
    for cls in (Referral, Details, Member, SolutionTag, models.CustomerProfile):
        plan = models._writable(cls)
        assert [n for n, _ in plan] == [n for n in cls.model_fields if n not in cls.read_only]
    assert "is_matching_complete" not in dict(models._writable(models.CustomerProfile))


_ANSWERS = [
    "create-referral-response.json",
    "get-referral-response.json",
    "referral-real-closed-won-ppe.json",
    "referral-real-inbound-active-accepted.json",
    *[f"create-{kind}.json" for kind in ("referral-request", "private-referral-request")],
]


@pytest.mark.parametrize("name", _ANSWERS)
@pytest.mark.parametrize("deal_value", [None, 12345.5, "12345.50", 10**20 + 0.5, "1e3"])
def test_an_answer_read_in_json_mode_is_the_answer_read_from_python(name: str, deal_value: Any) -> None:
    """The client validates answers straight from their bytes (JSON mode); it must read exactly
    what json.loads + model_validate read, quirks included."""
    from pathlib import Path

    from connector.partner_center.convert import referral_to_deal
    from connector.partner_center.models import wire_dump

    doc = json.loads((Path(__file__).parents[1] / "fixtures" / "partner_center" / name).read_text())
    if deal_value is not None:
        doc.setdefault("details", {})["dealValue"] = deal_value
    raw = json.dumps(doc).encode()
    from_json, from_python = Referral.model_validate_json(raw), Referral.model_validate(json.loads(raw))
    assert wire_dump(from_json) == wire_dump(from_python)
    try:
        expected = referral_to_deal(from_python)
    except Exception as exc:  # noqa: BLE001 - the same refusal either way
        with pytest.raises(type(exc)):
            referral_to_deal(from_json)
    else:
        assert referral_to_deal(from_json) == expected


# --- create_request_body: the POST body straight from the deal -----------------------------------

_SOME_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)


@st.composite
def _deals(draw: st.DrawFn) -> Deal:
    """A documented referral read as a deal, with the fields a create sends varied."""
    deal = referral_to_deal(Referral.model_validate(fixture_json(draw(st.sampled_from(REFERRALS)))))
    status, substatus = draw(
        st.sampled_from([(Status.NONE, Substatus.NONE), (Status.NEW, Substatus.PENDING),
                         (Status.ACTIVE, Substatus.ACCEPTED), (deal.status, deal.substatus)])
    )  # fmt: skip
    contacts = st.builds(Contact, _SOME_TEXT, _SOME_TEXT, st.sampled_from(["", "a@b.example"]), _SOME_TEXT,
                         _SOME_TEXT)  # fmt: skip
    solutions = st.builds(
        Solution, st.sampled_from(list(SolutionKind)), st.text("abcdef0123456789-", min_size=1, max_size=36),
        _SOME_TEXT,
    )  # fmt: skip
    return dataclasses.replace(
        deal,
        name=draw(_SOME_TEXT),
        status=status,
        substatus=substatus,
        engagement_id=draw(st.none() | _SOME_TEXT),
        external_reference_id=draw(st.none() | _SOME_TEXT),
        crm_id=draw(st.none() | _SOME_TEXT),
        campaign_id=draw(st.none() | _SOME_TEXT),
        status_reason=draw(st.none() | _SOME_TEXT),
        notes=draw(_SOME_TEXT),
        sales_stage=draw(st.none() | st.sampled_from(list(StandardStage))),
        value=draw(
            st.none() | st.builds(Money, st.decimals(0, 10**12, places=2), st.sampled_from(["USD", "EUR"]))
        ),
        close_date=draw(st.none() | st.dates(date(2020, 1, 1), date(2035, 12, 31))),
        help_requested=draw(st.none() | st.sampled_from(list(HelpType))),
        share_with_microsoft=draw(st.booleans()),
        contact_consent=draw(st.booleans()),
        team=tuple(draw(st.lists(contacts, max_size=3))),
        solutions=tuple(draw(st.lists(solutions, max_size=3))),
        customer_contact=draw(st.none() | contacts),
        customer=draw(st.none() | st.just(deal.customer)),
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_deals(), st.sampled_from(["percent_string", "percent_number", "stage_word"]))
def test_create_request_body_is_the_body_of_the_validated_referral(deal: Deal, fmt: StageFormat) -> None:
    try:
        general = create_body(convert.deal_to_referral(deal, fmt))
    except RecordError as exc:  # e.g. a stage the configured format has no word for
        with pytest.raises(RecordError, match=re.escape(str(exc))):
            convert.create_request_body(deal, fmt)
        return
    direct = convert.create_request_body(deal, fmt)
    assert direct == general
    # and the same on the wire, but for the order of keys
    assert json.loads(json.dumps(direct)) == json.loads(json.dumps(general))
