"""The SOQL subset the Salesforce twin understands, parsed as strictly as Salesforce would.

Grammar (case-insensitive keywords)::

    query   := SELECT (COUNT() | item {, item}) FROM object [WHERE cond]
               [ORDER BY field [ASC|DESC] [NULLS FIRST|LAST] {, ...}] [LIMIT int]
    item    := path | '(' SELECT path {, path} FROM childRelationship ')'
    path    := {parentRelationship '.'} field          -- e.g. Name, Account.Name, Owner.Email
    cond    := and {OR and}          -- AND and OR may not be mixed at one level without parentheses
    and     := unary {AND unary}
    unary   := NOT unary | '(' cond ')' | field op value | field [NOT] IN '(' value {, value} ')'
    op      := = | != | <> | < | <= | > | >=
    value   := 'string' | number | true | false | null | 2024-05-01 | 2024-05-01T12:00:00Z / +hh:mm

Relationship queries
(https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_relationships_understanding.htm)
follow the :class:`Relationship` table given to :func:`parse`: a dotted ``path`` walks child-to-parent
lookups (``Account.Name`` on Opportunity; up to five hops), a subquery names a parent-to-child
relationship of the FROM object (``OpportunityContactRoles``) and selects paths of the child
object. As Salesforce words it, an unknown lookup in a path is ``INVALID_FIELD`` ("Didn't understand
relationship 'X' in field path"), an unknown child relationship ``INVALID_TYPE`` ("Didn't understand
relationship 'X' in FROM part of query call"), an unknown field of a parent or child ``INVALID_FIELD``.
Beyond the twin's subset (``MALFORMED_QUERY``, though Salesforce takes them): WHERE, ORDER BY or
LIMIT inside a subquery, subqueries inside subqueries, relationship paths in WHERE and ORDER BY.

Anything else — unknown escapes, stray characters, ``;``, comments, semi-joins, functions — is a
``MALFORMED_QUERY``; unknown objects are ``INVALID_TYPE`` and unknown fields ``INVALID_FIELD``, and a
literal of the wrong type for its field is refused as Salesforce does ("value of filter criterion
for field ... must be of type dateTime and should not be enclosed in quotes").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, cast

__all__ = [
    "Bound",
    "Children",
    "FieldDef",
    "Parent",
    "ParsedQuery",
    "Relationship",
    "Select",
    "SoqlError",
    "parse",
]

Row = Mapping[str, Any]
Pred = Callable[[Row], bool]


class SoqlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FieldDef:
    name: str
    type: str  # id string textarea picklist multipicklist boolean datetime date double currency percent int reference email phone url
    picklist: tuple[str, ...] = ()  # active values, in order
    restricted: bool = False
    inactive: tuple[str, ...] = ()  # deactivated picklist values: in describe with active false
    labels: tuple[tuple[str, str], ...] = ()  # (value, label) where the label differs from the value
    required: bool = False  # on create
    createable: bool = True
    updateable: bool = True
    length: int = 255


_NUMERIC = frozenset({"double", "currency", "percent", "int"})
_TEXTUAL = frozenset(
    {"id", "string", "textarea", "picklist", "multipicklist", "reference", "email", "phone", "url"}
)
_KEYWORDS = frozenset(
    "SELECT FROM WHERE AND OR NOT IN ORDER BY ASC DESC NULLS FIRST LAST LIMIT TRUE FALSE NULL".split()
)

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,3})?(?:Z|[+-]\d{2}:\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2}(?![\dT:]))
  | (?P<number>-?\d+(?:\.\d+)?(?![\w.]))
  | (?P<ident>[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),])
  | (?P<quote>')
    """,
    re.VERBOSE,
)
# A string literal without escapes, matched in one step (IN lists carry hundreds of ids); anything
# else — escapes, an unterminated quote — goes through the character loop and its errors.
_PLAIN_STRING = re.compile(r"'([^'\\]*)'")
_MAX_HOPS = 5  # child-to-parent relationships one path may follow
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", '"': '"', "'": "'", "\\": "\\"}


@dataclass(frozen=True)
class Tok:
    kind: str
    value: Any
    pos: int


def _tokens(text: str) -> list[Tok]:
    out: list[Tok] = []
    i = 0
    n = len(text)
    while i < n:
        if text[i] == "'":
            plain = _PLAIN_STRING.match(text, i)
            if plain is not None:
                out.append(Tok("string", plain.group(1), i))
                i = plain.end()
                continue
            buf: list[str] = []
            j = i + 1
            while True:
                if j >= n:
                    raise SoqlError("MALFORMED_QUERY", f"unterminated string literal at position {i}")
                ch = text[j]
                if ch == "\\":
                    if j + 1 >= n:
                        raise SoqlError("MALFORMED_QUERY", "dangling backslash")
                    nxt = text[j + 1]
                    if nxt in _ESCAPES:
                        buf.append(_ESCAPES[nxt])
                        j += 2
                        continue
                    if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[j + 2 : j + 6]):
                        buf.append(chr(int(text[j + 2 : j + 6], 16)))
                        j += 6
                        continue
                    raise SoqlError("MALFORMED_QUERY", f"invalid escape sequence \\{nxt} at position {j}")
                if ch == "'":
                    break
                buf.append(ch)
                j += 1
            out.append(Tok("string", "".join(buf), i))
            i = j + 1
            continue
        m = _TOKEN.match(text, i)
        if m is None or m.lastgroup == "quote":
            raise SoqlError("MALFORMED_QUERY", f"unexpected token at position {i}: {text[i : i + 10]!r}")
        kind = m.lastgroup
        assert kind is not None
        value = m.group()
        if kind == "datetime":
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            out.append(Tok("datetime", parsed.astimezone(UTC), i))
        elif kind == "date":
            out.append(Tok("date", date.fromisoformat(value), i))
        elif kind == "number":
            out.append(Tok("number", Decimal(value), i))
        elif kind == "ident":
            up = value.upper()
            out.append(Tok("kw" if up in _KEYWORDS else "ident", up if up in _KEYWORDS else value, i))
        elif kind != "ws":
            out.append(Tok(kind, value, i))
        i = m.end()
    return out


@dataclass(frozen=True)
class Bound:
    """A condition every row matching the WHERE satisfies, simple enough for an index to answer:
    ``field = v`` / ``field IN (...)`` (``op`` "in", ``keys`` the values' comparison keys) or
    ``field < <= > >= v`` (``op`` the operator, ``keys`` one key).

    Only top-level AND conjuncts (seen through parentheses) become bounds: a condition under OR,
    NOT or NOT IN does not restrict the result on its own. Bounds narrow the rows to look at; the
    twin still evaluates the whole WHERE on them, so results never depend on which index it used."""

    field: str
    op: str
    keys: Any


@dataclass(frozen=True)
class _Cond:
    test: Pred
    bounds: tuple[Bound, ...] = ()


@dataclass(frozen=True)
class Relationship:
    """A relationship SOQL may follow from an object. ``kind`` "parent": a lookup named ``name``
    (``Account``) through the object's reference ``field`` (``AccountId``) to ``target``; ``kind``
    "child": a child relationship named ``name`` (``OpportunityContactRoles``) to the ``target`` rows
    whose reference ``field`` (``OpportunityId``) holds the object's Id."""

    name: str
    kind: str  # "parent" | "child"
    field: str
    target: str


@dataclass(frozen=True)
class Parent:
    """A parent lookup in a SELECT list and what is selected of it."""

    relationship: Relationship
    select: Select


@dataclass(frozen=True)
class Children:
    """A parent-to-child subquery in a SELECT list and what it selects of each child."""

    relationship: Relationship
    select: Select


#: A SELECT list as it renders: output key (field, lookup or child relationship name, canonical case)
#: -> what goes there, in the order the query first names it.
Select = Mapping[str, FieldDef | Parent | Children]


@dataclass
class ParsedQuery:
    sobject: str
    fields: list[str] | None  # None = COUNT(); else the selected column paths (Name, Account.Name)
    where: Pred | None
    order: list[tuple[str, bool, bool]] = field(default_factory=list)  # (field, ascending, nulls_first)
    limit: int | None = None
    bounds: tuple[Bound, ...] = ()  # index hints from the WHERE (see Bound)
    select: Select = field(default_factory=dict)  # the SELECT list as a tree (see Select)

    @property
    def has_subqueries(self) -> bool:
        return any(isinstance(item, Children) for item in self.select.values())

    @property
    def plain(self) -> bool:
        """Only the object's own fields are selected (no relationship)."""
        return all(isinstance(item, FieldDef) for item in self.select.values())


@dataclass
class _RawSub:
    """A subquery as written, resolved once the outer FROM is known."""

    fields: list[Tok]
    relationship: Tok


class _Parser:
    def __init__(
        self,
        text: str,
        schema: Mapping[str, Mapping[str, FieldDef]],
        relationships: Mapping[str, Mapping[str, Relationship]],
    ) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.schema = schema
        self.relationships = {
            obj: {name.lower(): rel for name, rel in rels.items()} for obj, rels in relationships.items()
        }
        self.fields: Mapping[str, FieldDef] = {}
        self.sobject = ""

    # --- token helpers ---------------------------------------------------------------------------
    def peek(self) -> Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> Tok:
        tok = self.peek()
        if tok is None:
            raise SoqlError("MALFORMED_QUERY", "unexpected end of query")
        self.i += 1
        return tok

    def is_kw(self, *words: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.kind == "kw" and tok.value in words

    def expect_kw(self, word: str) -> None:
        tok = self.take()
        if tok.kind != "kw" or tok.value != word:
            raise SoqlError("MALFORMED_QUERY", f"expected {word} at position {tok.pos}")

    def expect_punct(self, p: str) -> None:
        tok = self.take()
        if tok.kind != "punct" or tok.value != p:
            raise SoqlError("MALFORMED_QUERY", f"expected '{p}' at position {tok.pos}")

    def field(self, tok: Tok) -> FieldDef:
        if tok.kind != "ident":
            raise SoqlError("MALFORMED_QUERY", f"expected a field name at position {tok.pos}")
        if "." in tok.value:
            raise SoqlError(
                "MALFORMED_QUERY",
                f"relationship path '{tok.value}' outside the SELECT list: beyond the twin's SOQL subset",
            )
        fd = self.fields.get(tok.value.lower())
        if fd is None:
            raise SoqlError("INVALID_FIELD", f"No such column '{tok.value}' on entity '{self.sobject}'.")
        return fd

    # --- grammar ---------------------------------------------------------------------------------
    def parse(self) -> ParsedQuery:
        self.expect_kw("SELECT")
        raw_fields: list[Tok | _RawSub] = []
        count = False
        first = self.peek()
        if first is not None and first.kind == "ident" and first.value.upper() == "COUNT":
            self.take()
            self.expect_punct("(")
            self.expect_punct(")")
            count = True
        else:
            raw_fields.append(self.item())
            while self.is_punct(","):
                self.take()
                raw_fields.append(self.item())
        self.expect_kw("FROM")
        obj = self.take()
        if obj.kind != "ident" or "." in obj.value:
            raise SoqlError("MALFORMED_QUERY", f"expected an object name at position {obj.pos}")
        match = {k.lower(): k for k in self.schema}.get(obj.value.lower())
        if match is None:
            raise SoqlError("INVALID_TYPE", f"sObject type '{obj.value}' is not supported.")
        self.sobject = match
        self.fields = {k.lower(): v for k, v in self.schema[match].items()}
        select: dict[str, FieldDef | Parent | Children] = {}
        fields: list[str] | None = None
        if not count:
            fields = []
            for raw in raw_fields:
                if isinstance(raw, _RawSub):
                    self.subquery(select, raw)
                else:
                    fields.append(self.path(select, match, raw))
            fields = list(dict.fromkeys(fields))
        where: _Cond | None = None
        if self.is_kw("WHERE"):
            self.take()
            where = self.cond()
        order: list[tuple[str, bool, bool]] = []
        if self.is_kw("ORDER"):
            if count:
                raise SoqlError("MALFORMED_QUERY", "ORDER BY is not allowed with COUNT()")
            self.take()
            self.expect_kw("BY")
            while True:
                fd = self.field(self.take())
                asc = True
                if self.is_kw("ASC", "DESC"):
                    asc = self.take().value == "ASC"
                nulls_first = asc
                if self.is_kw("NULLS"):
                    self.take()
                    tok = self.take()
                    if tok.kind != "kw" or tok.value not in ("FIRST", "LAST"):
                        raise SoqlError("MALFORMED_QUERY", "expected FIRST or LAST after NULLS")
                    nulls_first = tok.value == "FIRST"
                order.append((fd.name, asc, nulls_first))
                nxt = self.peek()
                if nxt is not None and nxt.kind == "punct" and nxt.value == ",":
                    self.take()
                    continue
                break
        limit = None
        if self.is_kw("LIMIT"):
            self.take()
            tok = self.take()
            if tok.kind != "number" or tok.value != tok.value.to_integral_value() or tok.value < 0:
                raise SoqlError("MALFORMED_QUERY", "LIMIT needs a non-negative integer")
            limit = int(tok.value)
        rest = self.peek()
        if rest is not None:
            raise SoqlError("MALFORMED_QUERY", f"unexpected token at position {rest.pos}: {rest.value!r}")
        if where is None:
            return ParsedQuery(match, fields, None, order, limit, select=select)
        return ParsedQuery(match, fields, where.test, order, limit, where.bounds, select)

    # --- the SELECT list ---------------------------------------------------------------------------
    def is_punct(self, p: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.kind == "punct" and tok.value == p

    def item(self) -> Tok | _RawSub:
        """One SELECT item as written: a field path, or a subquery (resolved after FROM)."""
        if not self.is_punct("("):
            return self.take()
        self.take()
        self.expect_kw("SELECT")
        if self.is_punct("("):
            raise SoqlError(
                "MALFORMED_QUERY", "a subquery inside a subquery is beyond the twin's SOQL subset"
            )
        fields = [self.take()]
        while self.is_punct(","):
            self.take()
            if self.is_punct("("):
                raise SoqlError(
                    "MALFORMED_QUERY", "a subquery inside a subquery is beyond the twin's SOQL subset"
                )
            fields.append(self.take())
        self.expect_kw("FROM")
        relationship = self.take()
        if relationship.kind != "ident" or "." in relationship.value:
            raise SoqlError(
                "MALFORMED_QUERY", f"expected a child relationship name at position {relationship.pos}"
            )
        if not self.is_punct(")"):
            tok = self.peek()
            raise SoqlError(
                "MALFORMED_QUERY",
                "WHERE, ORDER BY and LIMIT inside a subquery are beyond the twin's SOQL subset"
                if tok is not None and tok.kind == "kw"
                else "expected ')' to close the subquery",
            )
        self.take()
        return _RawSub(fields, relationship)

    def relationship(self, sobject: str, name: str, kind: str) -> Relationship:
        rel = self.relationships.get(sobject, {}).get(name.lower())
        if rel is None or rel.kind != kind:
            where = "field path" if kind == "parent" else "FROM part of query call"
            raise SoqlError(
                "INVALID_FIELD" if kind == "parent" else "INVALID_TYPE",
                f"Didn't understand relationship '{name}' in {where}. If you are attempting to use a "
                "custom relationship, be sure to append the '__r' after the custom relationship name. "
                "Please reference your WSDL or the describe call for the appropriate names.",
            )
        return rel

    def path(self, select: dict[str, FieldDef | Parent | Children], sobject: str, tok: Tok) -> str:
        """Add ``tok`` (``Name`` or ``Account.Owner.Name``) to ``select``; its canonical path."""
        if tok.kind != "ident":
            raise SoqlError("MALFORMED_QUERY", f"expected a field name at position {tok.pos}")
        *hops, name = tok.value.split(".")
        if len(hops) > _MAX_HOPS:
            raise SoqlError("MALFORMED_QUERY", f"'{tok.value}' follows more than {_MAX_HOPS} relationships")
        node, obj, canonical = select, sobject, []
        for hop in hops:
            rel = self.relationship(obj, hop, "parent")
            found = node.get(rel.name)
            if not isinstance(found, Parent):
                found = node[rel.name] = Parent(rel, {})
            node, obj = cast("dict[str, FieldDef | Parent | Children]", found.select), rel.target
            canonical.append(rel.name)
        fd = {k.lower(): v for k, v in self.schema[obj].items()}.get(name.lower())
        if fd is None:
            raise SoqlError("INVALID_FIELD", f"No such column '{name}' on entity '{obj}'.")
        node.setdefault(fd.name, fd)
        return ".".join([*canonical, fd.name])

    def subquery(self, select: dict[str, FieldDef | Parent | Children], raw: _RawSub) -> None:
        rel = self.relationship(self.sobject, raw.relationship.value, "child")
        if rel.name in select:
            raise SoqlError("MALFORMED_QUERY", f"the subquery on '{rel.name}' appears twice")
        inner: dict[str, FieldDef | Parent | Children] = {}
        for tok in raw.fields:
            self.path(inner, rel.target, tok)
        select[rel.name] = Children(rel, inner)

    # Each rule returns its predicate with the bounds it implies (see Bound): an AND keeps all of its
    # parts' bounds, parentheses pass them through, OR and NOT drop them.
    def cond(self) -> _Cond:
        first = self.conj()
        if not self.is_kw("OR"):
            return first
        parts = [first.test]
        while self.is_kw("OR"):
            self.take()
            parts.append(self.conj().test)
        if self.is_kw("AND"):
            raise SoqlError("MALFORMED_QUERY", "AND and OR need parentheses when mixed")
        return _Cond(lambda row: any(p(row) for p in parts))

    def conj(self) -> _Cond:
        first = self.unary()
        if not self.is_kw("AND"):
            return first
        conds = [first]
        while self.is_kw("AND"):
            self.take()
            conds.append(self.unary())
        if self.is_kw("OR"):
            raise SoqlError("MALFORMED_QUERY", "AND and OR need parentheses when mixed")
        parts = [c.test for c in conds]
        return _Cond(lambda row: all(p(row) for p in parts), tuple(b for c in conds for b in c.bounds))

    def unary(self) -> _Cond:
        if self.is_kw("NOT"):
            self.take()
            inner = self.unary().test
            return _Cond(lambda row: not inner(row))
        tok = self.peek()
        if tok is not None and tok.kind == "punct" and tok.value == "(":
            self.take()
            group = self.cond()
            self.expect_punct(")")
            return group
        fd = self.field(self.take())
        negate = False
        if self.is_kw("NOT"):
            self.take()
            negate = True
            if not self.is_kw("IN"):
                raise SoqlError("MALFORMED_QUERY", "expected IN after NOT")
        if self.is_kw("IN"):
            self.take()
            self.expect_punct("(")
            values = [self.value(fd)]
            while True:
                tok = self.take()
                if tok.kind == "punct" and tok.value == ")":
                    break
                if tok.kind != "punct" or tok.value != ",":
                    raise SoqlError("MALFORMED_QUERY", f"expected ',' or ')' at position {tok.pos}")
                values.append(self.value(fd))
            keys = frozenset(_key(fd, v) for v in values)
            name = fd.name
            if negate:
                return _Cond(lambda row: _key(fd, row.get(name)) not in keys)
            return _Cond(lambda row: _key(fd, row.get(name)) in keys, (Bound(name, "in", keys),))
        op = self.take()
        if op.kind != "op":
            raise SoqlError("MALFORMED_QUERY", f"expected an operator at position {op.pos}")
        value = self.value(fd)
        test = _compare(fd, op.value, value)
        if op.value in ("!=", "<>"):
            return _Cond(test)
        if op.value == "=":
            return _Cond(test, (Bound(fd.name, "in", frozenset([_key(fd, value)])),))
        return _Cond(test, (Bound(fd.name, op.value, _key(fd, value)),))

    def value(self, fd: FieldDef) -> Any:
        tok = self.take()
        if tok.kind == "kw" and tok.value == "NULL":
            return None
        expected = _literal_kind(fd)
        actual = {"string": "string", "number": "number", "date": "date", "datetime": "datetime"}.get(
            tok.kind
        )
        if tok.kind == "kw" and tok.value in ("TRUE", "FALSE"):
            actual = "boolean"
        if actual is None:
            raise SoqlError("MALFORMED_QUERY", f"expected a value at position {tok.pos}")
        if actual != expected:
            raise SoqlError(
                "MALFORMED_QUERY",
                f"value of filter criterion for field '{fd.name}' must be of type {expected}"
                + (" and should not be enclosed in quotes" if actual == "string" else ""),
            )
        if actual == "boolean":
            return tok.value == "TRUE"
        return tok.value


def _literal_kind(fd: FieldDef) -> str:
    if fd.type == "boolean":
        return "boolean"
    if fd.type == "datetime":
        return "datetime"
    if fd.type == "date":
        return "date"
    if fd.type in _NUMERIC:
        return "number"
    return "string"


def _key(fd: FieldDef, value: Any) -> Any:
    """Comparison key: text compares case-insensitively in SOQL, ids exactly (18-char ids are unique
    case-insensitively anyway), numbers as Decimal."""
    if value is None:
        return None
    if fd.type == "id" or fd.type == "reference":
        return value
    if fd.type in _TEXTUAL and isinstance(value, str):
        return value.casefold()
    if fd.type in _NUMERIC:
        return Decimal(str(value))
    return value


def _compare(fd: FieldDef, op: str, value: Any) -> Pred:
    name = fd.name
    target = _key(fd, value)
    if op in ("=",):
        return lambda row: _key(fd, row.get(name)) == target
    if op in ("!=", "<>"):
        return lambda row: _key(fd, row.get(name)) != target
    if target is None:
        raise SoqlError("MALFORMED_QUERY", f"null can only be compared with = or != ('{name}')")
    if fd.type == "boolean":
        raise SoqlError("MALFORMED_QUERY", f"boolean field '{name}' cannot be compared with {op}")

    def check(row: Row) -> bool:
        have = _key(fd, row.get(name))
        if have is None:
            return False
        if op == "<":
            return bool(have < target)
        if op == "<=":
            return bool(have <= target)
        if op == ">":
            return bool(have > target)
        return bool(have >= target)

    return check


def parse(
    text: str,
    schema: Mapping[str, Mapping[str, FieldDef]],
    relationships: Mapping[str, Mapping[str, Relationship]] | None = None,
) -> ParsedQuery:
    """Parse ``text`` against ``schema`` (object -> field name -> definition) and ``relationships``
    (object -> relationship name -> :class:`Relationship`; none = no relationship queries)."""
    return _Parser(text, schema, relationships or {}).parse()


def sort_key(fd: FieldDef, value: Any) -> Any:
    return _key(fd, value)
