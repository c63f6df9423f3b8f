"""A strict local HTTPS twin of the Dataverse Web API endpoints the Dynamics adapter uses.

What it serves (under ``/api/data/v9.2/``), each as strict as the documentation, or stricter:

- collections of opportunities and related tables with the ``$select`` / ``$filter`` / ``$orderby``
  subset the adapter uses; any other syntax (functions, ``$expand``, ``$skip``, ``$apply``...) is a 400
  like Dataverse's, and a property that does not exist is Dataverse's "Could not find a property" 400;
- paging with ``Prefer: odata.maxpagesize`` (default and maximum 5,000) and absolute ``@odata.nextLink``
  values that must be followed unchanged (a changed next link is refused);
- change tracking (``Prefer: odata.track-changes``): delta links whose tokens expire on the twin
  clock with the documented "Version stamp associated with the client has expired" error, changed rows
  first and ``$deletedEntity`` entries last; ``$filter``/``$orderby``/``$expand``/``$top`` refused there
  (https://learn.microsoft.com/power-apps/developer/data-platform/use-change-tracking-synchronize-data-external-systems);
- ``PATCH`` with ``If-Match`` (412 with the documented body), ``POST`` answering ``OData-EntityId``,
  ``@odata.bind`` lookups, length validation with the documented ``0x80044331`` message;
- ``$batch`` with change sets (atomic, ``Content-ID`` references, no GET inside, at most 1,000
  requests) and ``Prefer: odata.continue-on-error``;
- ``WinOpportunity`` / ``LoseOpportunity``, and refusing a ``statecode`` update to Won or Lost;
- option-set metadata (``salesstage``, ``statuscode``, ``statecode``), business process stages;
  the opportunity's attribute list and its option sets by attribute type cast (``OptionSet`` for a
  local option set, ``GlobalOptionSet`` for a global one), in the documented shape
  (https://learn.microsoft.com/power-apps/developer/data-platform/webapi/query-metadata-web-api);
- service protection: 429 + ``Retry-After`` injection with the documented codes, and a real 52
  concurrent-request limit (https://learn.microsoft.com/power-apps/developer/data-platform/api-limits);
- bearer-token checking through a hook (the identity-provider twin's validator, or a fixed token).

Rows are plain JSON-ready dicts; lookups are stored as ``_<nav>_value`` like the Web API returns them.
:meth:`DataverseTwin.seed` builds a deterministic org of any size.
"""

from __future__ import annotations

import random
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from connector.dynamics import odata
from connector.remote.twin import Clock, Fault, Twin, TwinCA, TwinRequest, TwinResponse

__all__ = ["API_PATH", "DataverseTwin", "FilterSyntaxError", "SeedSummary", "parse_filter"]

API_PATH = "/api/data/v9.2"
MAX_PAGE_SIZE = 5000
EXPIRED_TEXT = "Version stamp associated with the client has expired. Please perform a full sync."
PRECONDITION_TEXT = "The version of the existing record doesn't match the RowVersion property provided."

#: 429 codes and messages from https://learn.microsoft.com/power-apps/developer/data-platform/api-limits
THROTTLE_REQUESTS = (
    "0x80072322",
    "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
)
THROTTLE_TIME = (
    "0x80072321",
    "Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds over time "
    "window of 300 seconds. Decrease number of concurrent requests or reduce the duration of requests "
    "and try again later.",
)
THROTTLE_CONCURRENCY = ("0x80072326", "Number of concurrent requests exceeded the limit of 52.")


# --- schema --------------------------------------------------------------------------------------

# column type names
GUID, STR, INT, DEC, BOOL, DT, DATE = "guid", "string", "int", "decimal", "bool", "datetime", "date"
_EDM = {
    GUID: "Edm.Guid",
    STR: "Edm.String",
    INT: "Edm.Int32",
    DEC: "Edm.Decimal",
    BOOL: "Edm.Boolean",
    DT: "Edm.DateTimeOffset",
    DATE: "Edm.Date",
}


@dataclass(frozen=True)
class Table:
    entity_set: str
    logical: str
    key: str
    columns: Mapping[str, str]  # name -> type; lookups as _<nav>_value (GUID)
    lookups: Mapping[str, str] = field(default_factory=dict)  # navigation property -> target entity set
    max_length: Mapping[str, int] = field(default_factory=dict)
    tracking: bool = False

    @property
    def edm(self) -> str:
        return f"Microsoft.Dynamics.CRM.{self.logical}"


_SYSTEM = {"createdon": DT, "modifiedon": DT, "versionnumber": INT}


def _table(entity_set: str, logical: str, key: str, columns: Mapping[str, str], **kw: Any) -> Table:
    return Table(entity_set, logical, key, {key: GUID, **columns, **_SYSTEM}, **kw)


def default_tables() -> dict[str, Table]:
    tables = [
        _table(
            "opportunities",
            "opportunity",
            "opportunityid",
            {
                "name": STR,
                "estimatedvalue": DEC,
                "actualvalue": DEC,
                "estimatedclosedate": DATE,
                "actualclosedate": DATE,
                "closeprobability": INT,
                "salesstage": INT,
                "stepname": STR,
                "statecode": INT,
                "statuscode": INT,
                "description": STR,
                "_customerid_value": GUID,
                "_parentaccountid_value": GUID,
                "_parentcontactid_value": GUID,
                "_transactioncurrencyid_value": GUID,
                "_ownerid_value": GUID,
                "_new_cosellownerid_value": GUID,
                "new_syncwithpartnercenter": BOOL,
                "new_referrallink": STR,
                "new_syncstatus": STR,
                "new_syncaudit": STR,
                "new_lastsyncedon": DT,
                "new_referralid": STR,
                "new_solutionids": STR,
            },
            lookups={
                "parentaccountid": "accounts",
                "parentcontactid": "contacts",
                "customerid_account": "accounts",
                "transactioncurrencyid": "transactioncurrencies",
                "ownerid": "systemusers",
                "new_cosellownerid": "systemusers",
            },
            max_length={
                "name": 300,
                "description": 2000,
                "stepname": 200,
                "new_referralid": 100,
                "new_solutionids": 2000,
            },
            tracking=True,
        ),
        _table(
            "accounts",
            "account",
            "accountid",
            {
                "name": STR,
                "address1_line1": STR,
                "address1_line2": STR,
                "address1_city": STR,
                "address1_stateorprovince": STR,
                "address1_postalcode": STR,
                "address1_country": STR,
            },
            max_length={"name": 160},
        ),
        _table(
            "contacts",
            "contact",
            "contactid",
            {
                "firstname": STR,
                "lastname": STR,
                "fullname": STR,
                "emailaddress1": STR,
                "telephone1": STR,
                "jobtitle": STR,
                "_parentcustomerid_value": GUID,
            },
        ),
        _table(
            "systemusers",
            "systemuser",
            "systemuserid",
            {
                "firstname": STR,
                "lastname": STR,
                "fullname": STR,
                "internalemailaddress": STR,
                "address1_telephone1": STR,
                "mobilephone": STR,
                "title": STR,
            },
        ),
        _table(
            "transactioncurrencies",
            "transactioncurrency",
            "transactioncurrencyid",
            {"isocurrencycode": STR, "currencyname": STR},
        ),
        _table("products", "product", "productid", {"name": STR, "productnumber": STR}),
        _table(
            "opportunityproducts",
            "opportunityproduct",
            "opportunityproductid",
            {
                "_opportunityid_value": GUID,
                "_productid_value": GUID,
                "productdescription": STR,
                "quantity": DEC,
                "priceperunit": DEC,
            },
            lookups={"opportunityid": "opportunities", "productid": "products"},
        ),
        _table(
            "connections",
            "connection",
            "connectionid",
            {
                "_record1id_value": GUID,
                "_record2id_value": GUID,
                "record1objecttypecode": INT,
                "record2objecttypecode": INT,
                "_record2roleid_value": GUID,
            },
        ),
        _table(
            "processstages",
            "processstage",
            "processstageid",
            {"stagename": STR, "stagecategory": INT, "_processid_value": GUID},
        ),
        _table(
            "opportunitysalesprocesses",
            "opportunitysalesprocess",
            "businessprocessflowinstanceid",
            {
                "_opportunityid_value": GUID,
                "_activestageid_value": GUID,
                "_processid_value": GUID,
                "traversedpath": STR,
            },
        ),
        _table(
            "opportunitycloses",
            "opportunityclose",
            "activityid",
            {
                "subject": STR,
                "_opportunityid_value": GUID,
                "actualrevenue": DEC,
                "actualend": DATE,
                "description": STR,
            },
            max_length={"subject": 200},
        ),
    ]
    return {t.entity_set: t for t in tables}


@dataclass(frozen=True)
class OptionSets:
    """Option-set metadata for opportunity: value -> label (and statuscode -> statecode)."""

    salesstage: Mapping[int, str] = field(
        default_factory=lambda: {0: "Qualify", 1: "Develop", 2: "Propose", 3: "Close"}
    )
    statecode: Mapping[int, tuple[str, int]] = field(  # value -> (label, default status)
        default_factory=lambda: {0: ("Open", 1), 1: ("Won", 3), 2: ("Lost", 4)}
    )
    statuscode: Mapping[int, tuple[str, int]] = field(  # value -> (label, state)
        default_factory=lambda: {
            1: ("In Progress", 0),
            2: ("On Hold", 0),
            3: ("Won", 1),
            4: ("Canceled", 2),
            5: ("Out-Sold", 2),
        }
    )
    #: custom choice columns on opportunity (logical name -> value -> label); the twin adds the columns
    choices: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    #: those of ``choices`` that use a global option set (served in ``GlobalOptionSet``, not ``OptionSet``)
    global_choices: frozenset[str] = frozenset()


# --- $filter parsing -------------------------------------------------------------------------------


class FilterSyntaxError(ValueError):
    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,7})?)?(?:Z|[+-]\d{2}:\d{2}))
  | (?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})(?![\w-])
  | (?P<date>\d{4}-\d{2}-\d{2})(?![\w:])
  | (?P<number>-?\d+(?:\.\d+)?)(?![\w.])
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<paren>[()])
    """,
    re.VERBOSE,
)
_OPS = {"eq", "ne", "gt", "ge", "lt", "le"}


@dataclass(frozen=True)
class Cmp:
    prop: str
    op: str
    value: Any  # str | int | Decimal | bool | None | uuid.UUID | datetime | date
    kind: str  # literal kind: string, number, guid, datetime, date, bool, null


@dataclass(frozen=True)
class And:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Not:
    item: Any


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise FilterSyntaxError(f"Syntax error at position {pos} in '{text}'.", pos)
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append((kind, m.group(), pos))
        pos = m.end()
    return out


def parse_filter(text: str) -> Any:
    """The twin's ``$filter`` grammar: comparisons of a property with a literal, ``and``/``or``/``not``,
    parentheses. Functions, arithmetic, lambda operators and navigation paths are refused."""
    toks = _tokens(text)
    i = 0

    def peek() -> tuple[str, str, int] | None:
        return toks[i] if i < len(toks) else None

    def fail(at: tuple[str, str, int] | None) -> FilterSyntaxError:
        pos = at[2] if at else len(text)
        return FilterSyntaxError(f"Syntax error at position {pos} in '{text}'.", pos)

    def word(t: tuple[str, str, int] | None, w: str) -> bool:
        return t is not None and t[0] == "ident" and t[1].lower() == w

    def or_expr() -> Any:
        nonlocal i
        items = [and_expr()]
        while word(peek(), "or"):
            i += 1
            items.append(and_expr())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_expr() -> Any:
        nonlocal i
        items = [unary()]
        while word(peek(), "and"):
            i += 1
            items.append(unary())
        return items[0] if len(items) == 1 else And(tuple(items))

    def unary() -> Any:
        nonlocal i
        t = peek()
        if word(t, "not"):
            i += 1
            return Not(unary())
        if t is not None and t[1] == "(":
            i += 1
            inner = or_expr()
            if peek() is None or peek()[1] != ")":  # type: ignore[index]
                raise fail(peek())
            i += 1
            return inner
        return comparison()

    def comparison() -> Cmp:
        nonlocal i
        t = peek()
        if (
            t is None
            or t[0] != "ident"
            or t[1].lower() in _OPS | {"and", "or", "not", "true", "false", "null"}
        ):
            raise fail(t)
        i += 1
        nxt = peek()
        if nxt is not None and nxt[1] == "(":  # a function call: not in the subset
            raise fail(nxt)
        op = peek()
        if op is None or op[0] != "ident" or op[1] not in _OPS:
            raise fail(op)
        i += 1
        lit = peek()
        if lit is None:
            raise fail(lit)
        i += 1
        return Cmp(t[1], op[1], *_literal_value(lit, fail))

    tree = or_expr()
    if i != len(toks):
        raise fail(peek())
    return tree


def _literal_value(tok: tuple[str, str, int], fail: Callable[[Any], Exception]) -> tuple[Any, str]:
    kind, text, _ = tok
    if kind == "string":
        return text[1:-1].replace("''", "'"), "string"
    if kind == "guid":
        return uuid.UUID(text), "guid"
    if kind == "datetime":
        return datetime.fromisoformat(text.replace("Z", "+00:00")), "datetime"
    if kind == "date":
        return date.fromisoformat(text), "date"
    if kind == "number":
        return (Decimal(text) if "." in text else int(text)), "number"
    if kind == "ident" and text in ("true", "false"):
        return text == "true", "bool"
    if kind == "ident" and text == "null":
        return None, "null"
    raise fail(tok)


def _guid_order(value: str) -> tuple[bytes, ...]:
    """SQL Server orders uniqueidentifier by byte groups, last group first; Dataverse sorts and compares
    GUIDs that way, so the twin does too (a client that sorts GUIDs as strings gets caught)."""
    b = uuid.UUID(value).bytes
    return (b[10:16], b[8:10], b[6:8], b[4:6], b[0:4])


_COMPATIBLE = {
    GUID: {"guid", "null"},
    STR: {"string", "null"},
    INT: {"number", "null"},
    DEC: {"number", "null"},
    BOOL: {"bool", "null"},
    DT: {"datetime", "null"},
    DATE: {"date", "null"},
}
_KIND_EDM = {
    "string": "Edm.String",
    "number": "Edm.Int32",
    "guid": "Edm.Guid",
    "datetime": "Edm.DateTimeOffset",
    "date": "Edm.Date",
    "bool": "Edm.Boolean",
}


#: AttributeType (AttributeTypeCode) of the opportunity columns whose column type alone does not say it
_OPPORTUNITY_ATTRIBUTE_TYPES = {
    "salesstage": "Picklist", "statecode": "State", "statuscode": "Status", "estimatedvalue": "Money",
    "actualvalue": "Money", "description": "Memo", "versionnumber": "BigInt", "ownerid": "Owner",
    "customerid": "Customer",
}  # fmt: skip
_ATTRIBUTE_TYPES = {
    GUID: "Uniqueidentifier", STR: "String", INT: "Integer", DEC: "Decimal", BOOL: "Boolean",
    DT: "DateTime", DATE: "DateTime",
}  # fmt: skip
#: AttributeType -> the attribute metadata entity type that describes it
_METADATA_TYPES = {
    "Picklist": "PicklistAttributeMetadata", "MultiSelectPicklist": "MultiSelectPicklistAttributeMetadata",
    "State": "StateAttributeMetadata", "Status": "StatusAttributeMetadata",
    "String": "StringAttributeMetadata", "Memo": "MemoAttributeMetadata",
    "Integer": "IntegerAttributeMetadata", "BigInt": "BigIntAttributeMetadata",
    "Money": "MoneyAttributeMetadata", "Decimal": "DecimalAttributeMetadata",
    "Boolean": "BooleanAttributeMetadata", "DateTime": "DateTimeAttributeMetadata",
    "Lookup": "LookupAttributeMetadata", "Owner": "LookupAttributeMetadata",
    "Customer": "LookupAttributeMetadata", "Uniqueidentifier": "UniqueIdentifierAttributeMetadata",
}  # fmt: skip
#: the cast types with OptionSet / GlobalOptionSet (EnumAttributeMetadata's, which cannot be cast to)
_ENUM_TYPES = frozenset(
    {
        "PicklistAttributeMetadata",
        "MultiSelectPicklistAttributeMetadata",
        "StateAttributeMetadata",
        "StatusAttributeMetadata",
    }
)
_ATTRIBUTE_PROPERTIES = frozenset(
    {"LogicalName", "SchemaName", "AttributeType", "AttributeTypeName", "IsCustomAttribute", "MetadataId"}
)


def _split_top_level(text: str) -> list[str]:
    """``a,b($select=x,y),c`` -> ``a``, ``b($select=x,y)``, ``c``: commas inside parentheses stay."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        items.append(current.strip())
    return items


class ODataFault(Exception):
    """Raised inside the twin to answer with a Dataverse-shaped error."""

    def __init__(self, status: int, message: str, code: str = "", headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> TwinResponse:
        return TwinResponse(self.status, {"error": {"code": self.code, "message": str(self)}}, self.headers)


def _sort_value(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == GUID:
        return _guid_order(str(value))
    if kind == DT:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")) if isinstance(value, str) else value
    if kind == DATE:
        return date.fromisoformat(value) if isinstance(value, str) else value
    if kind == STR:
        return str(value).casefold()  # Dataverse's default collation is case-insensitive
    if kind == DEC:
        return Decimal(str(value))
    if isinstance(value, uuid.UUID):
        return value
    return value


def _null_first_key(column: str, kind: str) -> Callable[[Mapping[str, Any]], tuple[bool, Any]]:
    def key(row: Mapping[str, Any]) -> tuple[bool, Any]:
        value = row.get(column)
        return (value is not None, _sort_value(kind, value) if value is not None else 0)

    return key


def _compile(table: Table, tree: Any) -> Callable[[Mapping[str, Any]], bool]:
    if isinstance(tree, And):
        fs = [_compile(table, t) for t in tree.items]
        return lambda row: all(f(row) for f in fs)
    if isinstance(tree, Or):
        same = {c.prop for c in tree.items if isinstance(c, Cmp) and c.op == "eq"}
        if len(same) == 1 and all(isinstance(c, Cmp) and c.op == "eq" for c in tree.items):
            column = next(iter(same))
            kind = _check(table, tree.items[0])
            for c in tree.items:
                _check(table, c)
            wanted = {_sort_value(kind, str(c.value) if c.kind == "guid" else c.value) for c in tree.items}
            return lambda row: _sort_value(kind, row.get(column)) in wanted
        fs = [_compile(table, t) for t in tree.items]
        return lambda row: any(f(row) for f in fs)
    if isinstance(tree, Not):
        f = _compile(table, tree.item)
        return lambda row: not f(row)
    assert isinstance(tree, Cmp)
    kind = _check(table, tree)
    rhs = (
        None
        if tree.value is None
        else _sort_value(kind, str(tree.value) if tree.kind == "guid" else tree.value)
    )
    op = tree.op

    def test(row: Mapping[str, Any]) -> bool:
        lhs = _sort_value(kind, row.get(tree.prop))
        if op == "eq":
            return bool(lhs == rhs)
        if op == "ne":
            return bool(lhs != rhs)
        if lhs is None or rhs is None:
            return False  # SQL semantics: comparisons with null are not true
        return bool({"gt": lhs > rhs, "ge": lhs >= rhs, "lt": lhs < rhs, "le": lhs <= rhs}[op])

    return test


def _check(table: Table, cmp: Cmp) -> str:
    kind = table.columns.get(cmp.prop)
    if kind is None:
        raise ODataFault(
            400, f"Could not find a property named '{cmp.prop}' on type '{table.edm}'.", "0x80060888"
        )
    if cmp.kind not in _COMPATIBLE[kind]:
        raise ODataFault(
            400,
            f"A binary operator with incompatible types was detected. Found operand types '{_EDM[kind]}' "
            f"and '{_KIND_EDM.get(cmp.kind, cmp.kind)}' for operator kind '{cmp.op}'.",
            "0x80060888",
        )
    return kind


# --- the twin ------------------------------------------------------------------------------------


@dataclass
class _Snapshot:
    """A paged result held server-side; the next link carries its id in a paging cookie."""

    entity_set: str
    rows: list[dict[str, Any]]
    offset: int
    next_query: dict[str, list[str]]
    delta_link: str | None
    delta: bool


@dataclass(frozen=True)
class SeedSummary:
    opportunities: list[str]
    accounts: list[str]
    contacts: list[str]
    users: list[str]
    products: list[str]
    currencies: dict[str, str]  # ISO code -> id


@dataclass(frozen=True)
class PartLog:
    """One request inside a $batch, for call counting."""

    method: str
    path: str
    query: dict[str, list[str]]


class DataverseTwin(Twin):
    """See the module docstring. Thread-safe; one data lock serialises changes like a database would."""

    name = "dataverse"

    def __init__(
        self,
        ca: TwinCA,
        *,
        clock: Clock | None = None,
        port: int = 0,
        auth_check: Callable[[str], bool] | None = None,
        expire_days: float = 7,
        tracking: bool = True,
        options: OptionSets | None = None,
        max_concurrency: int = 52,
    ) -> None:
        super().__init__(ca, clock=clock, port=port)
        self.tables = default_tables()
        if not tracking:
            self.tables["opportunities"] = _replace_tracking(self.tables["opportunities"], False)
        self.options = options or OptionSets()
        if self.options.choices:
            opp = self.tables["opportunities"]
            extra = {name: INT for name in self.options.choices if name not in opp.columns}
            self.tables["opportunities"] = replace(opp, columns={**opp.columns, **extra})
        self.rows: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in self.tables}
        #: receives the Authorization header value; e.g. ``lambda h: idp.validate(h, ...) is not None``
        self.auth_check = auth_check
        #: ``Organization.ExpireChangeTrackingInDays`` (docs: default 7, crm-apis.md §B.2)
        self.expire_days = expire_days
        self.max_concurrency = max_concurrency
        self.batch_parts: list[PartLog] = []
        self.peak_concurrency = 0
        self._in_flight = 0
        self._flight_lock = threading.Lock()
        self._data = threading.RLock()
        self._version = 1_000_000
        self._tombstones: dict[str, list[tuple[int, str]]] = {name: [] for name in self.tables}
        self._snapshots: dict[str, _Snapshot] = {}
        self._index: dict[tuple[str, str], tuple[int, dict[Any, list[str]]]] = {}
        self._generation: dict[str, int] = dict.fromkeys(self.tables, 0)
        self._undo: list[tuple[str, str, dict[str, Any] | None]] | None = None
        self._rng = random.Random(0)  # noqa: S311 - deterministic test data, not secrets
        self.base_currency = self.insert(
            "transactioncurrencies", {"isocurrencycode": "USD", "currencyname": "US Dollar"}
        )

    # --- direct data access (tests) ---------------------------------------------------------------

    def _now_text(self) -> str:
        # Dataverse returns datetimes to the second, in UTC with a Z.
        return self.clock.now().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _new_id(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _bump(self) -> int:
        self._version += 1
        return self._version

    def _touch(self, entity_set: str, row_id: str) -> None:
        if self._undo is not None and all(u[0:2] != (entity_set, row_id) for u in self._undo):
            old = self.rows[entity_set].get(row_id)
            self._undo.append((entity_set, row_id, dict(old) if old is not None else None))
        self._generation[entity_set] += 1

    def insert(self, entity_set: str, values: Mapping[str, Any], row_id: str | None = None) -> str:
        """Create a row directly (no validation): the seeding and test path."""
        with self._data:
            table = self.tables[entity_set]
            rid = (row_id or self._new_id()).lower()
            now = self._now_text()
            row = dict.fromkeys(table.columns)
            row.update(values)
            if entity_set == "opportunities":
                state = row.get("statecode")
                if not isinstance(state, int):
                    state = row["statecode"] = 0
                if row.get("statuscode") is None:
                    row["statuscode"] = self.options.statecode[state][1]
                if row.get("_transactioncurrencyid_value") is None and "transactioncurrencies" in self.rows:
                    row["_transactioncurrencyid_value"] = getattr(self, "base_currency", None)
            row.update({table.key: rid, "createdon": now, "modifiedon": now, "versionnumber": self._bump()})
            self._touch(entity_set, rid)
            self.rows[entity_set][rid] = row
            return rid

    def update(self, entity_set: str, row_id: str, **values: Any) -> None:
        with self._data:
            row = self.rows[entity_set][row_id]
            self._touch(entity_set, row_id)
            row.update(values)
            row["modifiedon"] = self._now_text()
            row["versionnumber"] = self._bump()

    def delete(self, entity_set: str, row_id: str) -> None:
        with self._data:
            self._touch(entity_set, row_id)
            del self.rows[entity_set][row_id]
            self._tombstones[entity_set].append((self._bump(), row_id))
            if entity_set == "opportunities":  # cascade, as the relationship's delete behaviour does
                for child, column in (
                    ("opportunityproducts", "_opportunityid_value"),
                    ("connections", "_record1id_value"),
                    ("opportunitysalesprocesses", "_opportunityid_value"),
                ):
                    for cid in [k for k, r in self.rows[child].items() if r.get(column) == row_id]:
                        self.delete(child, cid)

    def row(self, entity_set: str, row_id: str) -> dict[str, Any]:
        with self._data:
            return dict(self.rows[entity_set][row_id.lower()])

    def etag(self, entity_set: str, row_id: str) -> str:
        return f'W/"{self.row(entity_set, row_id)["versionnumber"]}"'

    def throttle(
        self,
        *,
        times: int = 1,
        retry_after: int = 3,
        code: tuple[str, str] = THROTTLE_REQUESTS,
        match: Callable[[TwinRequest], bool] = lambda _r: True,
    ) -> Fault:
        """Answer the next ``times`` matching requests with a service-protection 429."""
        fault = Fault(
            TwinResponse(
                429, {"error": {"code": code[0], "message": code[1]}}, {"Retry-After": str(retry_after)}
            ),
            times=times,
            match=match,
        )
        self.inject(fault)
        return fault

    def part_calls(self, entity_set: str, method: str = "GET") -> list[PartLog]:
        with self._lock:
            return [
                p for p in self.batch_parts if p.method == method and p.path == f"{API_PATH}/{entity_set}"
            ]

    # --- seeding ----------------------------------------------------------------------------------

    def seed(
        self,
        opportunities: int,
        *,
        seed: int = 1,
        accounts: int | None = None,
        products: int = 20,
        products_per_opportunity: int = 2,
        opted_in: float = 1.0,
        currencies: Iterable[str] = ("USD", "EUR", "GBP"),
    ) -> SeedSummary:
        """A deterministic org: accounts (with countries), contacts, users, products, currencies,
        opportunities with line items and a co-sell owner. Same ``seed`` -> same data and ids."""
        rng = random.Random(seed)  # noqa: S311 - deterministic test data, not secrets
        self._rng = random.Random(seed * 7919)  # noqa: S311 - deterministic test data, not secrets
        n_accounts = accounts if accounts is not None else max(1, opportunities // 5)
        countries = ["US", "GB", "DE", "FR", "NL", "Japan", "United States", "Canada"]
        with self._data:
            cur = {"USD": self.base_currency}
            for code in currencies:
                if code not in cur:
                    cur[code] = self.insert(
                        "transactioncurrencies", {"isocurrencycode": code, "currencyname": code}
                    )
            acc = [
                self.insert(
                    "accounts",
                    {
                        "name": f"Customer {i:05d} Ltd",
                        "address1_line1": f"{i} Main Street",
                        "address1_city": "Springfield",
                        "address1_postalcode": f"{10000 + i}",
                        "address1_country": countries[i % len(countries)],
                    },
                )
                for i in range(n_accounts)
            ]
            con = [
                self.insert(
                    "contacts",
                    {
                        "firstname": f"Buyer{i}",
                        "lastname": "Example",
                        "fullname": f"Buyer{i} Example",
                        "emailaddress1": f"buyer{i}@customer.example",
                        "telephone1": f"+1 555 {i:04d}",
                        "jobtitle": "CTO",
                        "_parentcustomerid_value": acc[i],
                    },
                )
                for i in range(n_accounts)
            ]
            users = [
                self.insert(
                    "systemusers",
                    {
                        "firstname": f"Seller{i}",
                        "lastname": "Partner",
                        "fullname": f"Seller{i} Partner",
                        "internalemailaddress": f"seller{i}@partner.example",
                        "address1_telephone1": f"+1 555 9{i:03d}",
                    },
                )
                for i in range(10)
            ]
            prod = [
                self.insert("products", {"name": f"Solution {i}", "productnumber": f"SOL-{10000 + i}-ABC"})
                for i in range(products)
            ]
            opps = []
            codes = list(cur)
            for i in range(opportunities):
                a = rng.randrange(n_accounts)
                oid = self.insert(
                    "opportunities",
                    {
                        "name": f"Deal {i:05d}",
                        "estimatedvalue": float(Decimal(rng.randrange(1000, 500000)) / 100 * 100),
                        "estimatedclosedate": (
                            date(2027, 1, 1) + timedelta(days=rng.randrange(365))
                        ).isoformat(),
                        "closeprobability": rng.choice([10, 20, 40, 60, 80]),
                        "salesstage": rng.randrange(4),
                        "description": f"Notes for deal {i}",
                        "_parentaccountid_value": acc[a],
                        "_customerid_value": acc[a],
                        "_parentcontactid_value": con[a],
                        "_transactioncurrencyid_value": cur[codes[i % len(codes)]],
                        "_ownerid_value": users[i % len(users)],
                        "_new_cosellownerid_value": users[(i + 3) % len(users)],
                        "new_syncwithpartnercenter": rng.random() < opted_in,
                    },
                )
                opps.append(oid)
                for p in rng.sample(prod, min(products_per_opportunity, len(prod))):
                    self.insert(
                        "opportunityproducts",
                        {
                            "_opportunityid_value": oid,
                            "_productid_value": p,
                            "quantity": 1,
                            "priceperunit": 100,
                        },
                    )
            return SeedSummary(opps, acc, con, users, prod, cur)

    # --- HTTP --------------------------------------------------------------------------------------

    def handle(self, request: TwinRequest) -> TwinResponse:
        with self._flight_lock:
            self._in_flight += 1
            self.peak_concurrency = max(self.peak_concurrency, self._in_flight)
            over = self._in_flight > self.max_concurrency
        try:
            if over:
                return TwinResponse(
                    429,
                    {"error": {"code": THROTTLE_CONCURRENCY[0], "message": THROTTLE_CONCURRENCY[1]}},
                    {"Retry-After": "1"},
                )
            return self._handle(request)
        finally:
            with self._flight_lock:
                self._in_flight -= 1

    def _handle(self, request: TwinRequest) -> TwinResponse:
        if self.auth_check is not None:
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer ") or not self.auth_check(auth):
                return TwinResponse(401, b"", {"WWW-Authenticate": "Bearer"})
        for name in ("odata-version", "odata-maxversion"):
            if request.headers.get(name, "4.0") != "4.0":
                return ODataFault(400, f"Unsupported {name} header value.").response()
        try:
            if request.path == f"{API_PATH}/$batch" and request.method == "POST":
                return self._batch(request)
            with self._data:
                return self._route(request)
        except ODataFault as fault:
            return fault.response()

    def _route(self, request: TwinRequest, content_ids: Mapping[str, str] | None = None) -> TwinResponse:
        path = unquote(request.path)
        if not path.startswith(API_PATH + "/"):
            raise ODataFault(404, f"Resource not found for the segment '{path}'.")
        rest = path[len(API_PATH) + 1 :]
        meta = re.fullmatch(
            r"EntityDefinitions\(LogicalName='(\w+)'\)/Attributes\(LogicalName='(\w+)'\)/Microsoft\.Dynamics\.CRM\.(\w+)",
            rest,
        )
        if meta and request.method == "GET":
            return self._metadata(request, meta.group(1), meta.group(2), meta.group(3))
        attributes = re.fullmatch(
            r"EntityDefinitions\(LogicalName='(\w+)'\)/Attributes(?:/Microsoft\.Dynamics\.CRM\.(\w+))?", rest
        )
        if attributes and request.method == "GET":
            return self._attributes(request, attributes.group(1), attributes.group(2))
        if rest in ("WinOpportunity", "LoseOpportunity") and request.method == "POST":
            return self._close(request, won=rest == "WinOpportunity", content_ids=content_ids)
        single = re.fullmatch(r"(\w+)\(([0-9a-fA-F-]{36})\)", rest)
        if single and single.group(1) in self.tables:
            return self._single(request, self.tables[single.group(1)], single.group(2).lower(), content_ids)
        if rest in self.tables:
            if request.method == "GET":
                return self._collection(request, self.tables[rest])
            if request.method == "POST":
                return self._create(request, self.tables[rest], content_ids)
            raise ODataFault(405, f"The HTTP method '{request.method}' is not allowed on '{rest}'.")
        raise ODataFault(404, f"Resource not found for the segment '{rest.split('(')[0]}'.")

    # --- reads -------------------------------------------------------------------------------------

    @staticmethod
    def _prefer(request: TwinRequest) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in request.headers.get("prefer", "").split(","):
            if item.strip():
                k, _, v = item.strip().partition("=")
                out[k.strip().lower()] = v.strip().strip('"')
        return out

    def _page_size(self, request: TwinRequest) -> int:
        raw = self._prefer(request).get("odata.maxpagesize")
        if raw is None:
            return MAX_PAGE_SIZE
        if not raw.isdigit() or int(raw) < 1:
            raise ODataFault(400, "The value of odata.maxpagesize must be a positive integer.")
        return min(int(raw), MAX_PAGE_SIZE)

    def _select(self, table: Table, request: TwinRequest) -> list[str] | None:
        raw = request.arg("$select")
        if raw is None:
            return None
        cols = [c.strip() for c in raw.split(",")]
        for c in cols:
            if c not in table.columns:
                raise ODataFault(
                    400, f"Could not find a property named '{c}' on type '{table.edm}'.", "0x80060888"
                )
        return cols

    def _project(self, table: Table, row: Mapping[str, Any], select: list[str] | None) -> dict[str, Any]:
        cols = select if select is not None else list(table.columns)
        out: dict[str, Any] = {"@odata.etag": f'W/"{row["versionnumber"]}"'}
        for c in cols:
            out[c] = row.get(c)
        out[table.key] = row[table.key]
        return out

    _ALLOWED_OPTIONS = frozenset({"$select", "$filter", "$orderby", "$top", "$skiptoken", "$deltatoken"})

    def _collection(self, request: TwinRequest, table: Table) -> TwinResponse:
        for opt in request.query:
            if opt.startswith("$") and opt not in self._ALLOWED_OPTIONS:
                # $skip is documented as unsupported; $expand/$apply/$count are outside the twin's subset.
                raise ODataFault(400, f"The query parameter {opt} is not supported", "0x80060888")
        skiptoken = request.arg("$skiptoken")
        if skiptoken is not None:
            return self._next_page(request, table, skiptoken)
        select = self._select(table, request)
        prefer = self._prefer(request)
        deltatoken = request.arg("$deltatoken")
        tracking = table.tracking and ("odata.track-changes" in prefer or deltatoken is not None)
        if tracking:
            for opt in ("$filter", "$orderby", "$expand", "$top"):
                if opt in request.query:
                    raise ODataFault(
                        400, f"The query option '{opt}' is not supported when change tracking is requested."
                    )
            return self._tracking(request, table, select, deltatoken)
        if deltatoken is not None:
            raise ODataFault(400, f"Change tracking is not enabled for the entity '{table.logical}'.")
        rows = list(self.rows[table.entity_set].values())
        flt = request.arg("$filter")
        if flt is not None:
            try:
                tree = parse_filter(flt)
            except FilterSyntaxError as exc:
                raise ODataFault(400, str(exc), "0x80060888") from None
            rows = self._filtered(table, tree)
        rows = self._ordered(table, rows, request.arg("$orderby"))
        top = request.arg("$top")
        if top is not None and "odata.maxpagesize" not in prefer:
            if not top.isdigit():
                raise ODataFault(400, "Invalid $top value.", "0x80060888")
            rows = rows[: int(top)]
        projected = [self._project(table, r, select) for r in rows]
        return self._page(request, table, projected, select, delta_link=None, delta=False)

    def _filtered(self, table: Table, tree: Any) -> list[dict[str, Any]]:
        test = _compile(table, tree)
        candidates: Iterable[dict[str, Any]] = self.rows[table.entity_set].values()
        if isinstance(tree, Or | Cmp):
            items = tree.items if isinstance(tree, Or) else (tree,)
            cols = {c.prop for c in items if isinstance(c, Cmp) and c.op == "eq" and c.kind == "guid"}
            if len(cols) == 1 and all(
                isinstance(c, Cmp) and c.op == "eq" and c.kind == "guid" for c in items
            ):
                index = self._index_of(table, next(iter(cols)))
                seen: dict[str, dict[str, Any]] = {}
                for c in items:
                    for rid in index.get(str(c.value).lower(), []):
                        seen[rid] = self.rows[table.entity_set][rid]
                candidates = seen.values()
        return [r for r in candidates if test(r)]

    def _index_of(self, table: Table, column: str) -> dict[Any, list[str]]:
        gen = self._generation[table.entity_set]
        cached = self._index.get((table.entity_set, column))
        if cached is not None and cached[0] == gen:
            return cached[1]
        index: dict[Any, list[str]] = {}
        for rid, row in self.rows[table.entity_set].items():
            value = row.get(column)
            if value is not None:
                index.setdefault(str(value).lower(), []).append(rid)
        self._index[(table.entity_set, column)] = (gen, index)
        return index

    def _ordered(self, table: Table, rows: list[dict[str, Any]], orderby: str | None) -> list[dict[str, Any]]:
        keys: list[tuple[str, bool]] = []
        for item in (orderby or "").split(","):
            if not item.strip():
                continue
            bits = item.split()
            if len(bits) > 2 or (len(bits) == 2 and bits[1] not in ("asc", "desc")):
                raise ODataFault(400, f"Syntax error in $orderby '{orderby}'.", "0x80060888")
            if bits[0] not in table.columns:
                raise ODataFault(
                    400, f"Could not find a property named '{bits[0]}' on type '{table.edm}'.", "0x80060888"
                )
            keys.append((bits[0], len(bits) == 2 and bits[1] == "desc"))
        if not any(k == table.key for k, _ in keys):
            keys.append((table.key, False))  # the primary key breaks ties, so pages are stable
        for column, desc in reversed(keys):
            kind = table.columns[column]
            # nulls first ascending, as SQL Server sorts them
            rows.sort(key=_null_first_key(column, kind), reverse=desc)
        return rows

    def _page(
        self,
        request: TwinRequest,
        table: Table,
        rows: list[dict[str, Any]],
        select: list[str] | None,
        *,
        delta_link: str | None,
        delta: bool,
        offset: int = 0,
        snapshot_id: str | None = None,
    ) -> TwinResponse:
        size = self._page_size(request)
        page = rows[offset : offset + size]
        context = f"{self.base_url}{API_PATH}/$metadata#{table.entity_set}"
        if select:
            context += f"({','.join(select)})"
        body: dict[str, Any] = {"@odata.context": context + ("/$delta" if delta else ""), "value": page}
        headers: dict[str, str] = {"OData-Version": "4.0"}
        if delta_link is not None or delta:
            headers["Preference-Applied"] = "odata.track-changes"
        if offset + size < len(rows):
            sid = snapshot_id or uuid.uuid4().hex
            query = {k: v for k, v in request.query.items() if k != "$skiptoken"}
            cookie = (
                f'<cookie pagenumber="{offset // size + 2}" pagingcookie="{sid}" '
                f'istracking="{"True" if delta_link else "False"}" />'
            )
            link_query = dict(query)
            link_query["$skiptoken"] = [cookie]
            self._snapshots[sid] = _Snapshot(
                table.entity_set, rows, offset + size, link_query, delta_link, delta
            )
            encoded = "&".join(
                f"{quote(k, safe='$')}={quote(v[-1], safe='$,()*:')}" for k, v in link_query.items()
            )
            body["@odata.nextLink"] = f"{self.base_url}{API_PATH}/{table.entity_set}?{encoded}"
        else:
            if snapshot_id:
                self._snapshots.pop(snapshot_id, None)
            if delta_link is not None:
                body["@odata.deltaLink"] = delta_link
        return TwinResponse(200, body, headers)

    def _next_page(self, request: TwinRequest, table: Table, skiptoken: str) -> TwinResponse:
        m = re.search(r'pagingcookie="([0-9a-f]+)"', skiptoken)
        snap = self._snapshots.get(m.group(1)) if m else None
        if snap is None or snap.entity_set != table.entity_set:
            raise ODataFault(400, "The $skiptoken is not valid or has expired.", "0x80060888")
        if request.query != snap.next_query:
            # Dataverse expects the next link back unchanged (page-results docs): no added options.
            raise ODataFault(
                400, "The next link was modified; follow @odata.nextLink unchanged.", "0x80060888"
            )
        select = self._select(table, request)
        return self._page(
            request,
            table,
            snap.rows,
            select,
            delta_link=snap.delta_link,
            delta=snap.delta,
            offset=snap.offset,
            snapshot_id=m.group(1) if m else None,
        )

    def _token(self) -> str:
        issued = self.clock.now().astimezone(UTC).strftime("%m/%d/%Y %H:%M:%S")
        return f"{self._version}!{issued}"

    def _delta_link(self, table: Table, select: list[str] | None) -> str:
        query = {}
        if select:
            query["$select"] = ",".join(select)
        query["$deltatoken"] = self._token()
        encoded = "&".join(f"{quote(k, safe='$')}={quote(v, safe=',')}" for k, v in query.items())
        return f"{self.base_url}{API_PATH}/{table.entity_set}?{encoded}"

    def _tracking(
        self, request: TwinRequest, table: Table, select: list[str] | None, deltatoken: str | None
    ) -> TwinResponse:
        link = self._delta_link(table, select)
        if deltatoken is None:
            rows = self._ordered(table, list(self.rows[table.entity_set].values()), None)
            projected = [self._project(table, r, select) for r in rows]
            return self._page(request, table, projected, select, delta_link=link, delta=False)
        m = re.fullmatch(r"(\d+)!(\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2})", deltatoken)
        if not m:
            raise ODataFault(400, "The delta token is not valid.", "0x80060888")
        since = int(m.group(1))
        issued = datetime.strptime(m.group(2), "%m/%d/%Y %H:%M:%S").replace(tzinfo=UTC)
        if self.clock.now() - issued > timedelta(days=self.expire_days):
            raise ODataFault(400, EXPIRED_TEXT)
        changed = sorted(
            (r for r in self.rows[table.entity_set].values() if r["versionnumber"] > since),
            key=lambda r: r["versionnumber"],
        )
        out = [self._project(table, r, select) for r in changed]
        gone = dict.fromkeys(
            rid
            for v, rid in self._tombstones[table.entity_set]
            if v > since and rid not in self.rows[table.entity_set]
        )
        context = f"{self.base_url}{API_PATH}/$metadata#{table.entity_set}/$deletedEntity"
        out += [{"@odata.context": context, "id": rid, "reason": "deleted"} for rid in gone]
        return self._page(request, table, out, select, delta_link=link, delta=True)

    # --- attribute metadata (query-metadata-web-api) -----------------------------------------------

    def _attribute_type(self, column: str) -> str:
        """The ``AttributeType`` of an opportunity column, by its logical name."""
        if column in self.options.choices:
            return "Picklist"
        special = _OPPORTUNITY_ATTRIBUTE_TYPES.get(column)
        if special is not None:
            return special
        table = self.tables["opportunities"]
        if column == table.key:
            return "Uniqueidentifier"
        kind = table.columns.get(column) or table.columns.get(f"_{column}_value")
        return "Lookup" if f"_{column}_value" in table.columns else _ATTRIBUTE_TYPES[kind or STR]

    def _attribute_names(self) -> list[str]:
        """Logical names of the opportunity columns: a lookup ``_x_value`` is the attribute ``x``."""
        out = []
        for column in self.tables["opportunities"].columns:
            m = re.fullmatch(r"_(\w+)_value", column)
            out.append(m.group(1) if m else column)
        return out

    def _options(self, attribute: str) -> tuple[list[dict[str, Any]], bool] | None:
        """The options of a choice column as Dataverse describes them, and whether the option set is
        global; None for a column without options."""

        def label(text: str) -> dict[str, Any]:
            loc = {"Label": text, "LanguageCode": 1033, "IsManaged": True}
            return {"LocalizedLabels": [loc], "UserLocalizedLabel": loc}

        if attribute == "salesstage":
            return [
                {"Value": v, "Label": label(t)} for v, t in sorted(self.options.salesstage.items())
            ], False
        if attribute == "statuscode":
            return [
                {"Value": v, "State": s, "Label": label(t)}
                for v, (t, s) in sorted(self.options.statuscode.items())
            ], False
        if attribute == "statecode":
            return [
                {"Value": v, "DefaultStatus": d, "InvariantName": t, "Label": label(t)}
                for v, (t, d) in sorted(self.options.statecode.items())
            ], False
        if attribute in self.options.choices:
            options = [
                {"Value": v, "Label": label(t)} for v, t in sorted(self.options.choices[attribute].items())
            ]
            return options, attribute in self.options.global_choices
        return None

    def _metadata(self, request: TwinRequest, entity: str, attribute: str, cast: str) -> TwinResponse:
        if entity != "opportunity":
            raise ODataFault(404, f"Could not find an entity with LogicalName = '{entity}'.")
        kinds = {
            "salesstage": "PicklistAttributeMetadata",
            "statuscode": "StatusAttributeMetadata",
            "statecode": "StateAttributeMetadata",
        }
        if kinds.get(attribute) != cast:
            raise ODataFault(404, f"Attribute '{attribute}' is not a {cast}.")
        options, _ = self._options(attribute) or ([], False)
        body: dict[str, Any] = {
            "@odata.context": f"{self.base_url}{API_PATH}/$metadata#EntityDefinitions('{entity}')/Attributes/"
            f"Microsoft.Dynamics.CRM.{cast}",
            "LogicalName": attribute,
        }
        if "OptionSet" in (request.arg("$expand") or ""):
            body["OptionSet"] = {"Options": options}
        return TwinResponse(200, body, {"OData-Version": "4.0"})

    def _attributes(self, request: TwinRequest, entity: str, cast: str | None) -> TwinResponse:
        """``EntityDefinitions(LogicalName=...)/Attributes``, optionally cast to one attribute metadata
        type. As documented: all matching attributes in one response (no paging); ``MetadataId`` always
        returned; ``OptionSet`` / ``GlobalOptionSet`` only on a cast to a type that has them, and
        EnumAttributeMetadata itself cannot be cast to."""
        if entity != "opportunity":
            raise ODataFault(404, f"Could not find an entity with LogicalName = '{entity}'.")
        for opt in request.query:
            if opt.startswith("$") and opt not in ("$select", "$expand"):
                raise ODataFault(400, f"The query parameter {opt} is not supported", "0x80060888")
        if cast is not None and cast not in set(_METADATA_TYPES.values()):
            raise ODataFault(400, f"The type 'Microsoft.Dynamics.CRM.{cast}' cannot be used for a cast here.")
        type_name = f"Microsoft.Dynamics.CRM.{cast or 'AttributeMetadata'}"
        select = [c.strip() for c in (request.arg("$select") or "").split(",") if c.strip()]
        for prop in select:
            if prop not in _ATTRIBUTE_PROPERTIES:
                raise ODataFault(
                    400, f"Could not find a property named '{prop}' on type '{type_name}'.", "0x80060888"
                )
        expand: dict[str, list[str] | None] = {}
        for part in _split_top_level(request.arg("$expand") or ""):
            m = re.fullmatch(r"(\w+)(?:\((.*)\))?", part)
            if not m or m.group(1) not in ("OptionSet", "GlobalOptionSet") or cast not in _ENUM_TYPES:
                raise ODataFault(
                    400,
                    f"Could not find a property named '{m.group(1) if m else part}' on type '{type_name}'.",
                    "0x80060888",
                )
            inner = m.group(2)
            if inner is not None and not re.fullmatch(r"\$select=[\w,]+", inner):
                raise ODataFault(
                    400, f"Only $select is supported inside $expand, not '{inner}'.", "0x80060888"
                )
            expand[m.group(1)] = inner.removeprefix("$select=").split(",") if inner else None
        values = []
        for name in self._attribute_names():
            kind = self._attribute_type(name)
            meta_type = _METADATA_TYPES[kind]
            if cast is not None and meta_type != cast:
                continue
            item: dict[str, Any] = {} if cast else {"@odata.type": f"#Microsoft.Dynamics.CRM.{meta_type}"}
            props = {
                "LogicalName": name,
                "SchemaName": name,
                "AttributeType": kind,
                "AttributeTypeName": {"Value": f"{kind}Type"},
                "IsCustomAttribute": name.startswith("new_"),
            }
            item.update({k: v for k, v in props.items() if not select or k in select})
            item["MetadataId"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"opportunity/{name}"))
            options, is_global = self._options(name) or ([], False)
            for nav, wanted in expand.items():
                option_set: dict[str, Any] = {
                    "Options": options,
                    "Name": name if not is_global else f"new_{name}",
                    "IsGlobal": is_global,
                    "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"optionset/{name}")),
                }
                if wanted is not None:
                    option_set = {k: v for k, v in option_set.items() if k in wanted or k == "MetadataId"}
                # a local option set is in OptionSet and GlobalOptionSet is null; a global one the reverse
                item[nav] = option_set if (nav == "GlobalOptionSet") == is_global else None
            values.append(item)
        context = f"{self.base_url}{API_PATH}/$metadata#EntityDefinitions('{entity}')/Attributes"
        if cast:
            context += f"/Microsoft.Dynamics.CRM.{cast}"
        if select:
            context += f"({','.join(select)})"
        return TwinResponse(200, {"@odata.context": context, "value": values}, {"OData-Version": "4.0"})

    # --- writes ------------------------------------------------------------------------------------

    def _resolve_bind(self, table: Table, nav: str, target: Any, content_ids: Mapping[str, str]) -> str:
        target_set = table.lookups.get(nav)
        if target_set is None:
            raise ODataFault(
                400,
                f"An undeclared property '{nav}' which only has property annotations in the payload "
                "but no property value was found in the payload.",
            )
        text = str(target)
        if text.startswith("$") and text in content_ids:
            text = content_ids[text]
        ref = odata.entity_id_from_url(text)
        if ref is None or ref[0] != target_set:
            raise ODataFault(400, f"Invalid entity reference '{text[:80]}' for '{nav}'.")
        if ref[1] not in self.rows[target_set]:
            raise ODataFault(404, f"{self.tables[target_set].logical} With Id = {ref[1]} Does Not Exist")
        return ref[1]

    def _validated(
        self, table: Table, payload: Any, content_ids: Mapping[str, str], *, create: bool
    ) -> dict[str, Any]:
        if not isinstance(payload, dict):
            raise ODataFault(400, "The request body must be a JSON object.")
        out: dict[str, Any] = {}
        for key, value in payload.items():
            if key.endswith("@odata.bind"):
                nav = key[: -len("@odata.bind")]
                column = "_customerid_value" if nav == "customerid_account" else f"_{nav}_value"
                out[column] = self._resolve_bind(table, nav, value, content_ids)
                continue
            kind = table.columns.get(key)
            if kind is None or key.startswith("_") or key in _SYSTEM or key == table.key:
                raise ODataFault(
                    400, f"Invalid property '{key}' was found in entity '{table.edm}'.", "0x80060888"
                )
            out[key] = self._coerce(table, key, kind, value)
        return out

    def _coerce(self, table: Table, key: str, kind: str, value: Any) -> Any:
        if value is None:
            return None
        bad = ODataFault(
            400,
            f"Cannot convert the literal '{str(value)[:50]}' to the expected type '{_EDM[kind]}'.",
            "0x80060888",
        )
        if kind == STR:
            if not isinstance(value, str):
                raise bad
            limit = table.max_length.get(key)
            if limit is not None and len(value) > limit:
                # Wording (double space included) as in the documented batch-part error.
                raise ODataFault(
                    400,
                    f"A validation error occurred.  The length of the '{key}' attribute of the '{table.logical}' "
                    f"entity exceeded the maximum allowed length of '{limit}'.",
                    "0x80044331",
                )
            return value
        if kind == INT:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
            return value
        if kind == DEC:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise bad
            try:
                return float(Decimal(str(value)))
            except InvalidOperation:
                raise bad from None
        if kind == BOOL:
            if not isinstance(value, bool):
                raise bad
            return value
        if kind == DATE:
            try:
                return date.fromisoformat(str(value)).isoformat()
            except ValueError:
                raise bad from None
        if kind == DT:
            try:
                parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            except ValueError:
                raise bad from None
            if parsed.utcoffset() is None:
                raise bad
            return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return value

    def _check_state(self, changes: Mapping[str, Any], current: Mapping[str, Any] | None) -> None:
        if "statecode" in changes:
            if current is None:
                raise ODataFault(400, "statecode cannot be set when a record is created.", "0x80040203")
            if changes["statecode"] in (1, 2):
                # Dataverse refuses closing an opportunity by update: Win/LoseOpportunity own that
                # (crm-apis.md §B.3). The wording here is the twin's.
                raise ODataFault(
                    400,
                    "An opportunity cannot be set to Won or Lost by updating statecode; use the "
                    "WinOpportunity or LoseOpportunity action.",
                    "0x80040203",
                )
            if changes["statecode"] not in self.options.statecode:
                raise ODataFault(400, f"{changes['statecode']} is not a valid state code.", "0x80040203")
        if "statuscode" in changes and changes["statuscode"] is not None:
            state = changes.get("statecode", current.get("statecode") if current else 0)
            status = self.options.statuscode.get(changes["statuscode"])
            if status is None or status[1] != state:
                raise ODataFault(
                    400,
                    f"{changes['statuscode']} is not a valid status code for state code {state}.",
                    "0x80040203",
                )

    def _write_response(self, request: TwinRequest, table: Table, rid: str, created: bool) -> TwinResponse:
        entity_url = f"{self.base_url}{API_PATH}/{table.entity_set}({rid})"
        headers = {"OData-EntityId": entity_url, "OData-Version": "4.0"}
        if self._prefer(request).get("return") == "representation":
            select = self._select(table, request)
            row = self.rows[table.entity_set][rid]
            return TwinResponse(201 if created else 200, self._project(table, row, select), headers)
        return TwinResponse(204, None, headers)

    def _create(
        self, request: TwinRequest, table: Table, content_ids: Mapping[str, str] | None = None
    ) -> TwinResponse:
        values = self._validated(table, request.json(), content_ids or {}, create=True)
        if table.entity_set == "opportunities":
            self._check_state(values, None)
        rid = self.insert(table.entity_set, values)
        return self._write_response(request, table, rid, created=True)

    def _single(
        self, request: TwinRequest, table: Table, rid: str, content_ids: Mapping[str, str] | None = None
    ) -> TwinResponse:
        rows = self.rows[table.entity_set]
        current = rows.get(rid)
        if request.method == "GET":
            if current is None:
                raise ODataFault(404, f"{table.logical} With Id = {rid} Does Not Exist")
            return TwinResponse(
                200, self._project(table, current, self._select(table, request)), {"OData-Version": "4.0"}
            )
        if request.method == "DELETE":
            if current is None:
                raise ODataFault(404, f"{table.logical} With Id = {rid} Does Not Exist")
            self.delete(table.entity_set, rid)
            return TwinResponse(204)
        if request.method != "PATCH":
            raise ODataFault(405, f"The HTTP method '{request.method}' is not allowed on a single record.")
        if_match = request.headers.get("if-match")
        if_none = request.headers.get("if-none-match")
        if if_match is not None:
            if current is None:
                raise ODataFault(404, f"{table.logical} With Id = {rid} Does Not Exist")
            if if_match != "*" and if_match != f'W/"{current["versionnumber"]}"':
                raise ODataFault(412, PRECONDITION_TEXT)
        if if_none == "*" and current is not None:
            raise ODataFault(412, "A record with matching key values already exists.", "0x80040237")
        values = self._validated(table, request.json(), content_ids or {}, create=current is None)
        if table.entity_set == "opportunities":
            self._check_state(values, current)
        if current is None:  # PATCH without If-Match is an upsert
            self.insert(table.entity_set, values, row_id=rid)
            return self._write_response(request, table, rid, created=True)
        self.update(table.entity_set, rid, **values)
        return self._write_response(request, table, rid, created=False)

    def _close(
        self, request: TwinRequest, *, won: bool, content_ids: Mapping[str, str] | None = None
    ) -> TwinResponse:
        body = request.json()
        if not isinstance(body, dict) or set(body) - {"Status", "OpportunityClose"}:
            raise ODataFault(400, "The action parameters are not valid.", "0x80060888")
        status = body.get("Status")
        close = body.get("OpportunityClose")
        if not isinstance(status, int) or not isinstance(close, dict):
            raise ODataFault(400, "Status and OpportunityClose are required.", "0x80060888")
        want_state = 1 if won else 2
        known = self.options.statuscode.get(status)
        if known is None or known[1] != want_state:
            raise ODataFault(
                400, f"{status} is not a valid status code for state code {want_state}.", "0x80040203"
            )
        bind = close.get("opportunityid@odata.bind")
        if bind is None:
            raise ODataFault(400, "OpportunityClose needs opportunityid@odata.bind.", "0x80040203")
        table = self.tables["opportunitycloses"]
        oid = self._resolve_bind(
            Table("x", "x", "x", {}, lookups={"opportunityid": "opportunities"}),
            "opportunityid",
            bind,
            content_ids or {},
        )
        extra = {k: v for k, v in close.items() if k != "opportunityid@odata.bind"}
        values = self._validated(table, extra, {}, create=True)
        opp = self.rows["opportunities"][oid]
        if opp["statecode"] != 0:
            raise ODataFault(400, "The opportunity is already closed.", "0x80040203")
        self.insert("opportunitycloses", {**values, "_opportunityid_value": oid})
        self.update(
            "opportunities",
            oid,
            statecode=want_state,
            statuscode=status,
            actualvalue=values.get("actualrevenue", opp.get("estimatedvalue") if won else None),
            actualclosedate=values.get("actualend") or self.clock.now().date().isoformat(),
        )
        return TwinResponse(204)

    # --- $batch --------------------------------------------------------------------------------------

    def _batch(self, request: TwinRequest) -> TwinResponse:
        ctype = request.headers.get("content-type", "")
        try:
            items = odata.decode_batch_request(request.body, ctype)
        except ValueError as exc:
            raise ODataFault(400, f"The batch request is not valid: {exc}", "0x80060888") from None
        if odata.count_requests(items) > odata.MAX_BATCH_REQUESTS:
            raise ODataFault(
                400,
                f"The number of requests in the batch exceeds the limit of {odata.MAX_BATCH_REQUESTS}.",
                "0x80060888",
            )
        go_on = "odata.continue-on-error" in self._prefer(request)
        results: list[odata.BatchResult] = []
        with self._data:
            for item in items:
                if isinstance(item, odata.ChangeSet):
                    result = self._changeset(item)
                    results.append(result)
                    failed = isinstance(result, odata.PartResponse)
                else:
                    r = self._part(item, {})
                    results.append(r)
                    failed = not r.ok
                if failed and not go_on:
                    break  # without continue-on-error Dataverse stops at the first failure
        body, content_type = odata.encode_batch_response(results)
        headers = {"Content-Type": content_type, "OData-Version": "4.0"}
        if go_on:
            headers["Preference-Applied"] = "odata.continue-on-error"
        return TwinResponse(200, body, headers)

    def _changeset(self, cs: odata.ChangeSet) -> odata.BatchResult:
        self._undo = []
        tomb = {k: len(v) for k, v in self._tombstones.items()}
        content_ids: dict[str, str] = {}
        responses: list[odata.PartResponse] = []
        try:
            for part in cs.parts:
                r = self._part(part, content_ids)
                if not r.ok:
                    self._rollback(tomb)
                    return r  # a failed change set answers with the failing request's response only
                responses.append(r)
                entity = r.header("OData-EntityId")
                if part.content_id and entity:
                    content_ids[f"${part.content_id}"] = entity
            return odata.ChangeSetResponse(tuple(responses))
        finally:
            self._undo = None

    def _rollback(self, tomb: Mapping[str, int]) -> None:
        assert self._undo is not None
        for entity_set, rid, old in reversed(self._undo):
            if old is None:
                self.rows[entity_set].pop(rid, None)
            else:
                self.rows[entity_set][rid] = old
            self._generation[entity_set] += 1
        for k, n in tomb.items():
            del self._tombstones[k][n:]

    def _part(self, part: odata.Part, content_ids: Mapping[str, str]) -> odata.PartResponse:
        url = part.url
        for ref, entity in content_ids.items():
            if url == ref or url.startswith(ref + "/") or url.startswith(ref + "?"):
                url = entity + url[len(ref) :]
        split = urlsplit(url)
        path = (
            split.path
            if split.scheme
            else (
                API_PATH + "/" + split.path.lstrip("/") if not split.path.startswith(API_PATH) else split.path
            )
        )
        query = parse_qs(split.query, keep_blank_values=True)
        with self._lock:
            self.batch_parts.append(PartLog(part.method, unquote(path), query))
        headers = {k.lower(): v for k, v in part.headers}
        sub = TwinRequest(part.method, path, query, headers, part.body or b"")
        try:
            response = self._route(sub, content_ids)
        except ODataFault as fault:
            response = fault.response()
        payload, content_type = response.encode()
        hdrs = dict(response.headers)
        if content_type:
            hdrs.setdefault("Content-Type", content_type)
        return odata.PartResponse(response.status, tuple(hdrs.items()), payload, part.content_id)


def _replace_tracking(table: Table, tracking: bool) -> Table:
    return replace(table, tracking=tracking)
