"""SOQL built so that no id or value can change the shape of a query.

Every piece that reaches a query string goes through one of three gates:

- :func:`sf_id` — a Salesforce id: 15 case-sensitive characters, or 18 whose last three encode the
  case of the first fifteen (the checksum is verified, so a typo or a forged id is refused);
- :func:`field_name` / :func:`sobject_name` — API names against a strict pattern (letters, digits,
  single underscores, an optional namespace and ``__c``-style suffix), never a reserved word;
  :func:`field_path` — a child-to-parent relationship path (``Account.Name``), each part a name;
- :func:`literal` — values quoted and escaped with simple-salesforce's ``quote_soql_value``, which
  follows Salesforce's "Quoted String Escape Sequences"
  (https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_select_quotedstringescapes.htm).
  Datetimes must be timezone-aware and are rendered in UTC with ``Z`` (a naive datetime would be read
  in the org's zone by nobody and in the container's zone by somebody — prior-art.md §5 class 2).

Conditions are :class:`Cond` values that only this module can render; the one escape hatch is
:func:`trusted_filter` for the operator's opt-in filter from configuration, which is still checked
for balanced quotes/parentheses and refused if it tries to end the WHERE clause.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from urllib.parse import quote_plus

from simple_salesforce.format import quote_soql_value

__all__ = [
    "Cond",
    "Query",
    "all_of",
    "any_of",
    "chunk_in_values",
    "eq",
    "field_name",
    "field_path",
    "ge",
    "gt",
    "in_",
    "le",
    "literal",
    "lt",
    "ne",
    "sf_id",
    "sobject_name",
    "trusted_filter",
]

_ID15 = re.compile(r"^[a-zA-Z0-9]{15}$")
_ID18 = re.compile(r"^[a-zA-Z0-9]{15}[A-Z0-5]{3}$")
_CHECKSUM_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
# Optional namespace prefix (ns__), a name of letters/digits with single underscores, optional
# custom suffix (__c, __r, __s, ...). Double underscores elsewhere are not valid API names.
_API_NAME = re.compile(
    r"^(?:[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*__)?[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*(?:__[a-z]{1,3})?$"
)
_RESERVED = frozenset(
    """AND ASC DESC EXCLUDES FIRST FROM GROUP HAVING IN INCLUDES LAST LIKE LIMIT NOT NULL NULLS OR
    SELECT WHERE WITH OFFSET ORDER BY TRUE FALSE TYPEOF USING SCOPE FOR UPDATE VIEW REFERENCE""".split()
)
_MAX_NAME = 80


#: an id's characters as bits: upper-case letters 1, anything else 0
_UPPER_BITS = str.maketrans({**{chr(c): "1" for c in range(65, 91)}, **{chr(c): "0" for c in range(48, 58)},
                             **{chr(c): "0" for c in range(97, 123)}})  # fmt: skip


#: a 5-character chunk's case pattern (as _UPPER_BITS writes it, first character first) -> its
#: checksum character: bit i of the chunk's number is character i
_CHUNK_CHECKSUM = {format(n, "05b")[::-1]: _CHECKSUM_ALPHABET[n] for n in range(32)}


def id_checksum(id15: str) -> str:
    """The three-character suffix that makes a 15-character id case-insensitive-safe: for each
    5-character chunk, the bit i is set when character i is upper case."""
    bits = id15.translate(_UPPER_BITS)  # in C: a full read checks every id it lists
    return _CHUNK_CHECKSUM[bits[:5]] + _CHUNK_CHECKSUM[bits[5:10]] + _CHUNK_CHECKSUM[bits[10:15]]


def sf_id(value: object) -> str:
    """``value`` if it is a well-formed Salesforce id, else :class:`ValueError` (never quoted blindly)."""
    if not isinstance(value, str):
        raise ValueError("a Salesforce id must be a string")
    if _is_sf_id(value):
        return value
    raise ValueError("not a valid 15- or 18-character Salesforce id")


@functools.lru_cache(maxsize=1 << 16)
def _is_sf_id(value: str) -> bool:
    # cached: chunk_in_values renders a page's ids several times to size its IN queries, and the
    # checksum was most of a 10,000-opportunity read's CPU time (bench/bench_sync.py profile)
    return bool(_ID15.match(value)) or bool(_ID18.match(value) and id_checksum(value[:15]) == value[15:])


def field_name(name: object) -> str:
    """``name`` if it is a plausible field API name, else :class:`ValueError`."""
    if not isinstance(name, str) or len(name) > _MAX_NAME or not _API_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid Salesforce field API name")
    if name.upper() in _RESERVED:
        raise ValueError(f"{name!r} is a SOQL reserved word")
    return name


sobject_name = field_name

#: SOQL follows at most five child-to-parent relationships in one path
#: (https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_relationships_query_limits.htm).
_MAX_PARENT_HOPS = 5


def field_path(path: object) -> str:
    """``path`` if it is a field name or a relationship path to a parent's field (``Account.Name``,
    ``Owner.Email``), each part a valid API name; else :class:`ValueError`."""
    if not isinstance(path, str):
        raise ValueError(f"{path!r} is not a valid Salesforce field path")
    parts = path.split(".")
    if len(parts) > _MAX_PARENT_HOPS + 1:
        raise ValueError(f"{path!r} follows more than {_MAX_PARENT_HOPS} relationships")
    for part in parts:
        field_name(part)
    return path


def literal(value: object) -> str:
    """A SOQL literal for ``value``; refuses types whose rendering would be ambiguous."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return quote_soql_value(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("a SOQL number must be finite")
        return format(value, "f")
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError("a SOQL datetime must be timezone-aware")
        # Seconds only: SOQL's documented dateTime formats have no fractional part. Callers that
        # compare against sub-second stamps use >= / > on the floor, which reads a superset.
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return value.isoformat()
    raise ValueError(f"cannot put a {type(value).__name__} into SOQL")


@dataclass(frozen=True)
class Cond:
    """A rendered, trusted WHERE fragment. Build it with the functions below, never by hand."""

    text: str

    def __str__(self) -> str:
        return self.text


def _cmp(name: str, op: str, value: object) -> Cond:
    return Cond(f"{field_name(name)} {op} {literal(value)}")


def eq(name: str, value: object) -> Cond:
    return _cmp(name, "=", value)


def ne(name: str, value: object) -> Cond:
    return _cmp(name, "!=", value)


def gt(name: str, value: object) -> Cond:
    return _cmp(name, ">", value)


def ge(name: str, value: object) -> Cond:
    return _cmp(name, ">=", value)


def lt(name: str, value: object) -> Cond:
    return _cmp(name, "<", value)


def le(name: str, value: object) -> Cond:
    return _cmp(name, "<=", value)


def in_(name: str, values: Iterable[object], *, ids: bool = False) -> Cond:
    """``name IN (...)``; with ``ids=True`` every value must be a valid Salesforce id."""
    vals = [sf_id(v) if ids else v for v in values]
    if not vals:
        raise ValueError("IN () needs at least one value")
    return Cond(f"{field_name(name)} IN ({','.join(literal(v) for v in vals)})")


def _join(op: str, conds: Sequence[Cond | None]) -> Cond:
    parts = [c for c in conds if c is not None]
    if not parts:
        raise ValueError("nothing to join")
    if len(parts) == 1:
        return parts[0]
    # Always parenthesised: SOQL refuses AND and OR mixed at one level without parentheses.
    return Cond("(" + f" {op} ".join(p.text for p in parts) + ")")


def all_of(*conds: Cond | None) -> Cond:
    return _join("AND", conds)


def any_of(*conds: Cond | None) -> Cond:
    return _join("OR", conds)


_FILTER_STOP = re.compile(
    r"\b(ORDER\s+BY|LIMIT|OFFSET|GROUP\s+BY|HAVING|FOR\s+(UPDATE|VIEW|REFERENCE)|SELECT)\b", re.I
)


def trusted_filter(text: str) -> Cond:
    """The operator's opt-in filter (configuration, not data). It may only add a condition:
    quotes and parentheses must balance and it may not end the WHERE clause or nest a query."""
    depth = 0
    in_str = False
    escaped = False
    outside: list[str] = []
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == "'":
                in_str = False
            continue
        if ch == "'":
            in_str = True
            outside.append(" ")
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError("the SOQL filter closes a parenthesis it never opened")
        elif ch == ";":
            raise ValueError("the SOQL filter may not contain ';'")
        outside.append(ch)
    if in_str or depth != 0:
        raise ValueError("the SOQL filter has an unbalanced quote or parenthesis")
    if _FILTER_STOP.search("".join(outside)):
        raise ValueError("the SOQL filter may only add conditions (no ORDER BY, LIMIT, sub-queries, ...)")
    if not text.strip():
        raise ValueError("the SOQL filter is empty")
    return Cond(f"({text.strip()})")


@dataclass(frozen=True)
class Query:
    """``SELECT fields [, (subquery) ...] FROM sobject [WHERE ...] [ORDER BY ...] [LIMIT n]`` with
    validated names.

    ``fields`` may be relationship paths to parent fields (``Account.Name``). ``children`` are
    parent-to-child subqueries: each a :class:`Query` whose ``sobject`` is the child relationship's
    name (``OpportunityContactRoles``), rendered in the SELECT list as ``(SELECT ... FROM name)``
    (https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_relationships_understanding.htm).
    Subqueries do not nest here."""

    sobject: str
    fields: tuple[str, ...]
    where: Cond | None = None
    order_by: tuple[str, ...] = ()
    limit: int | None = None
    count: bool = False
    children: tuple[Query, ...] = ()

    def render(self) -> str:
        obj = sobject_name(self.sobject)
        if self.count:
            if self.children:
                raise ValueError("COUNT() takes no subqueries")
            select = "COUNT()"
        else:
            if not self.fields:
                raise ValueError("a query needs at least one field")
            items = [field_path(f) for f in dict.fromkeys(self.fields)]
            for child in self.children:
                if child.children or child.count:
                    raise ValueError("a subquery cannot nest subqueries or count")
                items.append(f"({child.render()})")
            select = ", ".join(items)
        # every piece below passed field_path/sobject_name/literal: nothing arrives unchecked
        soql = f"SELECT {select} FROM {obj}"  # noqa: S608
        if self.where is not None:
            soql += f" WHERE {self.where.text}"
        if self.order_by:
            soql += " ORDER BY " + ", ".join(field_name(f) for f in self.order_by)
        if self.limit is not None:
            if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1:
                raise ValueError("LIMIT must be a positive integer")
            soql += f" LIMIT {self.limit}"
        return soql

    def __str__(self) -> str:
        return self.render()


#: Salesforce refuses request URIs above 16,384 bytes with 414 (documented since API 49.0, see
#: https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/intro_rest_resources.htm
#: and salesforce.stackexchange.com/q/195449); we keep well below it for the path and headers.
MAX_ENCODED_QUERY = 12_000
_QUOTES = len(quote_plus("''"))  # the two quotes around a string literal, encoded: %27%27


def chunk_in_values(
    values: Sequence[str], build: Callable[[Sequence[str]], str], *, limit: int = MAX_ENCODED_QUERY
) -> Iterator[str]:
    """Split ``values`` into as few IN-queries as keep each URL-encoded query under ``limit`` bytes.

    ``build(chunk)`` renders the query for one chunk. Related data is read per page with these
    (never one query per opportunity), and a long IN list would otherwise earn a 414.

    A chunk's size is estimated from its values' encoded literals (each adds ``,'value'``, encoded)
    on top of the one-value query, then rendered once and checked; rendering the whole query again
    for every candidate size was most of a 100,000-deal read's CPU time.
    """
    start = 0
    n = len(values)
    separator = len(quote_plus(","))
    while start < n:
        best = build(values[start : start + 1])
        total = len(quote_plus(best))
        if total > limit:
            raise ValueError("a single value makes the query too long")
        size = 1
        while start + size < n:
            value = values[start + size]
            # Ids and most keys are plain letters and digits: their encoded literal is the value
            # between two encoded quotes (%27), so quote_plus (most of this loop's time) is skipped.
            if value.isalnum() and value.isascii():
                cost = separator + len(value) + _QUOTES
            else:
                cost = separator + len(quote_plus(literal(value)))
            if total + cost > limit:
                break
            total, size = total + cost, size + 1
        chunk = build(values[start : start + size]) if size > 1 else best
        # the estimate assumes each value appears once, as a literal: shrink when build() differs
        while size > 1 and len(quote_plus(chunk)) > limit:
            size = max(1, size * 9 // 10)
            chunk = build(values[start : start + size])
        yield chunk
        start += size
