"""OData v4 helpers for the Dataverse Web API: safe query building, GUIDs, $batch, error bodies.

Everything that turns a value into URL or wire text lives here, so there is one place to get the
escaping right:

- :func:`literal` renders a Python value as an OData literal. Strings are single-quoted with embedded
  quotes doubled (OData ABNF ``SQUOTE-in-string``), so a hostile value stays one literal and can never
  add a clause to a ``$filter``. Property names are checked against an identifier pattern.
- :func:`encode_query` percent-encodes the system query options itself (``%20`` for spaces, ``%2B``
  for ``+``): httpx's ``params=`` writes spaces as ``+``, which OData servers may not decode as a space.
- :func:`encode_batch` / :func:`decode_batch_response` (and the server-side pair used by the twin)
  speak ``multipart/mixed`` with change sets, ``Content-ID`` and ``application/http`` parts:
  https://learn.microsoft.com/power-apps/developer/data-platform/webapi/execute-batch-operations-using-web-api
- :func:`parse_error` reads ``{"error": {"code", "message"}}`` tolerantly (codes are often empty).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

__all__ = [
    "MAX_BATCH_REQUESTS",
    "ChangeSet",
    "ChangeSetResponse",
    "Filter",
    "ODataError",
    "Part",
    "PartResponse",
    "Query",
    "all_of",
    "any_of",
    "decode_batch_request",
    "decode_batch_response",
    "encode_batch",
    "encode_batch_response",
    "encode_query",
    "entity_id_from_url",
    "eq",
    "ge",
    "gt",
    "guid",
    "in_",
    "is_guid",
    "le",
    "literal",
    "lt",
    "ne",
    "parse_error",
    "prop",
]

#: "Batch requests can contain up to 1,000 individual requests" (execute-batch-operations-using-web-api).
MAX_BATCH_REQUESTS = 1000

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_ENTITY_ID = re.compile(r"/?([A-Za-z_][A-Za-z0-9_]*)\(([0-9a-fA-F-]{36})\)\s*$")


# --- identifiers and literals ------------------------------------------------------------------


def is_guid(value: object) -> bool:
    return isinstance(value, str) and bool(_GUID.match(value))


def guid(value: object) -> str:
    """A validated GUID in lower case; anything else raises ``ValueError`` (never reaches a URL)."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if not is_guid(value):
        raise ValueError(f"not a GUID: {str(value)[:40]!r}")
    return str(value).lower()


def prop(name: str) -> str:
    """A property (column) name, checked: names come from configuration, never from record data."""
    if not _IDENT.match(name):
        raise ValueError(f"not a valid OData property name: {name[:60]!r}")
    return name


@dataclass(frozen=True, slots=True)
class Guid:
    """Marks a string as a GUID literal (rendered bare, as Dataverse expects for uniqueidentifier)."""

    value: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", guid(self.value))


def literal(value: object) -> str:
    """``value`` as an OData URL literal. Strings are quoted with ``'`` doubled; datetimes must be aware."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, Guid):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("a non-finite decimal has no OData literal")
        return format(value, "f")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("a non-finite float has no OData literal")
        return repr(value)
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError("datetime literals must be timezone-aware (Dataverse stores UTC)")
        utc = value.astimezone(UTC)
        text = utc.strftime("%Y-%m-%dT%H:%M:%S")
        if utc.microsecond:
            text += f".{utc.microsecond:06d}".rstrip("0")
        return text + "Z"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"no OData literal for {type(value).__name__}")


# --- filters and queries -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    """A rendered ``$filter`` expression. Build with :func:`eq` & co.; ``&``/``|``/``~`` combine safely."""

    text: str

    @classmethod
    def trusted(cls, text: str) -> Filter:
        """An expression written by an operator in configuration (e.g. the opt-in filter). Never data."""
        if not text.strip():
            raise ValueError("an empty filter expression")
        return cls(text.strip())

    def __and__(self, other: Filter) -> Filter:
        return Filter(f"({self.text}) and ({other.text})")

    def __or__(self, other: Filter) -> Filter:
        return Filter(f"({self.text}) or ({other.text})")

    def __invert__(self) -> Filter:
        return Filter(f"not ({self.text})")


def _cmp(op: str, name: str, value: object) -> Filter:
    return Filter(f"{prop(name)} {op} {literal(value)}")


def eq(name: str, value: object) -> Filter:
    return _cmp("eq", name, value)


def ne(name: str, value: object) -> Filter:
    return _cmp("ne", name, value)


def gt(name: str, value: object) -> Filter:
    return _cmp("gt", name, value)


def ge(name: str, value: object) -> Filter:
    return _cmp("ge", name, value)


def lt(name: str, value: object) -> Filter:
    return _cmp("lt", name, value)


def le(name: str, value: object) -> Filter:
    return _cmp("le", name, value)


def all_of(*filters: Filter | None) -> Filter | None:
    parts = [f for f in filters if f is not None]
    if not parts:
        return None
    return Filter(" and ".join(f"({f.text})" for f in parts)) if len(parts) > 1 else parts[0]


def any_of(*filters: Filter) -> Filter:
    if not filters:
        raise ValueError("any_of needs at least one filter")
    return Filter(" or ".join(f"({f.text})" for f in filters)) if len(filters) > 1 else filters[0]


def in_(name: str, values: Iterable[object]) -> Filter:
    """``name`` equal to one of ``values``, as an ``or`` chain of ``eq``.

    Dataverse has its own ``Microsoft.Dynamics.CRM.In`` function rather than OData 4.01 ``in``; a flat
    ``or`` of ``eq`` is portable and what the twin accepts. Callers chunk the values (URL length).
    """
    items = list(values)
    if not items:
        raise ValueError("in_ needs at least one value")
    key = prop(name)
    return Filter(" or ".join(f"{key} eq {literal(v)}" for v in items))


_QUERY_SAFE = "$,()'*:@/-._~!;"


def encode_query(params: Mapping[str, str]) -> str:
    """``k=v&...`` with every reserved character percent-encoded (space as ``%20``, never ``+``)."""
    return "&".join(f"{quote(k, safe='$')}={quote(v, safe=_QUERY_SAFE)}" for k, v in params.items())


@dataclass(frozen=True, slots=True)
class Query:
    """A collection query: ``$select``, ``$filter``, ``$orderby`` (the subset the adapter uses)."""

    entity_set: str
    select: tuple[str, ...] = ()
    filter: Filter | None = None
    orderby: tuple[tuple[str, bool], ...] = ()  # (column, descending)

    def params(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.select:
            out["$select"] = ",".join(prop(s) for s in self.select)
        if self.filter is not None:
            out["$filter"] = self.filter.text
        if self.orderby:
            out["$orderby"] = ",".join(f"{prop(c)} {'desc' if d else 'asc'}" for c, d in self.orderby)
        return out

    def url(self, root: str) -> str:
        """Absolute URL under the service root (``https://org/api/data/v9.2/``)."""
        base = root.rstrip("/") + "/" + prop(self.entity_set)
        query = encode_query(self.params())
        return f"{base}?{query}" if query else base


def entity_id_from_url(url: str) -> tuple[str, str] | None:
    """``(entity_set, guid)`` from an ``OData-EntityId`` such as ``https://org/api/data/v9.2/opportunities(<guid>)``."""
    m = _ENTITY_ID.search(url.split("?", 1)[0])
    if not m:
        return None
    return m.group(1), m.group(2).lower()


# --- errors ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ODataError:
    """A Dataverse error: HTTP status, ``error.code`` (often ``""`` or ``0x…``) and ``error.message``."""

    status: int
    code: str = ""
    message: str = ""

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        return f"HTTP {self.status}{code}: {self.message}".rstrip(": ")


def parse_error(status: int, body: bytes | str | Mapping[str, Any] | None) -> ODataError:
    """Parse ``{"error": {"code", "message"}}``; a body that is not that shape keeps a short text."""
    data: Any = body
    if isinstance(body, bytes | str):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        try:
            data = json.loads(text) if text.strip() else None
        except ValueError:
            return ODataError(status, "", text.strip()[:300])
    if isinstance(data, Mapping):
        err = data.get("error")
        if isinstance(err, Mapping):
            return ODataError(status, str(err.get("code") or ""), str(err.get("message") or ""))
    return ODataError(status)


# --- $batch --------------------------------------------------------------------------------------

CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class Part:
    """One request inside a batch. ``url`` is absolute or ``$<content-id>``-relative."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    content_id: str | None = None

    @classmethod
    def json(
        cls,
        method: str,
        url: str,
        payload: object,
        *,
        headers: Mapping[str, str] | None = None,
        content_id: str | None = None,
    ) -> Part:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return cls(method, url, tuple(hdrs.items()), json.dumps(payload).encode("utf-8"), content_id)

    def header(self, name: str) -> str | None:
        return _get(self.headers, name)

    def payload(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """Requests applied atomically: all succeed or none do. No GET inside, no nesting."""

    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("an empty change set")
        for p in self.parts:
            if p.method.upper() == "GET":
                raise ValueError("a change set cannot contain a GET")


BatchItem = Part | ChangeSet


@dataclass(frozen=True, slots=True)
class PartResponse:
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    content_id: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def header(self, name: str) -> str | None:
        return _get(self.headers, name)

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body.strip() else None

    def error(self) -> ODataError:
        return parse_error(self.status, self.body)


@dataclass(frozen=True, slots=True)
class ChangeSetResponse:
    """A change set that succeeded: one response per request, in order."""

    responses: tuple[PartResponse, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.responses)


BatchResult = PartResponse | ChangeSetResponse


def _get(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    low = name.lower()
    for k, v in headers:
        if k.lower() == low:
            return v
    return None


def count_requests(items: Iterable[BatchItem]) -> int:
    return sum(len(i.parts) if isinstance(i, ChangeSet) else 1 for i in items)


def _boundary(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4()}"


def _encode_request(part: Part) -> bytes:
    lines = [f"{part.method.upper()} {part.url} HTTP/1.1".encode()]
    lines += [f"{k}: {v}".encode() for k, v in part.headers]
    return CRLF.join([*lines, b"", part.body or b""])


def _part_envelope(payload: bytes, content_id: str | None) -> bytes:
    head = [b"Content-Type: application/http", b"Content-Transfer-Encoding: binary"]
    if content_id is not None:
        head.append(f"Content-ID: {content_id}".encode())
    return CRLF.join([*head, b"", payload])


def _multipart(boundary: str, bodies: Sequence[bytes]) -> bytes:
    out = b""
    for body in bodies:
        out += f"--{boundary}".encode() + CRLF + body + CRLF
    return out + f"--{boundary}--".encode() + CRLF


def encode_batch(items: Sequence[BatchItem], *, boundary: str | None = None) -> tuple[bytes, str]:
    """The body and ``Content-Type`` of a ``POST $batch``. Raises when over the 1,000-request limit."""
    n = count_requests(items)
    if n > MAX_BATCH_REQUESTS:
        raise ValueError(f"a batch holds at most {MAX_BATCH_REQUESTS} requests (got {n})")
    batch = boundary or _boundary("batch")
    bodies: list[bytes] = []
    for item in items:
        if isinstance(item, ChangeSet):
            cs = _boundary("changeset")
            inner = _multipart(cs, [_part_envelope(_encode_request(p), p.content_id) for p in item.parts])
            bodies.append(f"Content-Type: multipart/mixed; boundary={cs}".encode() + CRLF + CRLF + inner)
        else:
            bodies.append(_part_envelope(_encode_request(item), item.content_id))
    return _multipart(batch, bodies), f"multipart/mixed; boundary={batch}"


def boundary_of(content_type: str) -> str:
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if not m:
        raise ValueError("multipart content without a boundary")
    return m.group(1).strip()


def _split_head(block: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Headers and body of a MIME part (CRLF or bare LF line ends)."""
    if block.startswith((b"\r\n", b"\n")):  # no headers at all
        return [], block.split(b"\n", 1)[1]
    m = re.search(rb"\r?\n\r?\n", block)
    head, body = (block[: m.start()], block[m.end() :]) if m else (block, b"")
    headers: list[tuple[str, str]] = []
    for line in re.split(rb"\r?\n", head):
        if b":" in line:
            k, v = line.split(b":", 1)
            headers.append((k.decode("latin-1").strip(), v.decode("latin-1").strip()))
    return headers, body


def split_multipart(body: bytes, boundary: str) -> list[tuple[list[tuple[str, str]], bytes]]:
    """The parts of a multipart body as (headers, content); preamble and epilogue are dropped."""
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = re.split(rb"(?:\r?\n)?" + re.escape(delimiter), body)
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = re.sub(rb"^[ \t]*\r?\n", b"", chunk, count=1)
        parts.append(_split_head(chunk))
    return parts


def _parse_http(payload: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """Start line, headers and body of an ``application/http`` part."""
    first, _, rest = payload.lstrip(b"\r\n").partition(b"\n")
    headers, body = _split_head(rest)
    return first.decode("latin-1").strip(), headers, body


def decode_batch_response(content: bytes, content_type: str) -> list[BatchResult]:
    """One result per top-level batch item, in order: a change set that failed is one error response."""
    out: list[BatchResult] = []
    for headers, body in split_multipart(content, boundary_of(content_type)):
        ctype = _get(headers, "Content-Type") or ""
        if ctype.lower().startswith("multipart/mixed"):
            responses = tuple(_response_of(h, b) for h, b in split_multipart(body, boundary_of(ctype)))
            out.append(ChangeSetResponse(responses))
        else:
            out.append(_response_of(headers, body))
    return out


def _response_of(envelope: list[tuple[str, str]], payload: bytes) -> PartResponse:
    start, headers, body = _parse_http(payload)
    bits = start.split(" ", 2)
    try:
        status = int(bits[1])
    except (IndexError, ValueError):
        status = 0
    return PartResponse(status, tuple(headers), body.rstrip(b"\r\n"), _get(envelope, "Content-ID"))


# --- server side (the twin): decode requests, encode responses ---------------------------------


def decode_batch_request(content: bytes, content_type: str) -> list[BatchItem]:
    """The requests of a ``$batch`` body. Raises ``ValueError`` on malformed or nested content."""
    items: list[BatchItem] = []
    for headers, body in split_multipart(content, boundary_of(content_type)):
        ctype = _get(headers, "Content-Type") or ""
        if ctype.lower().startswith("multipart/mixed"):
            parts = []
            for h, b in split_multipart(body, boundary_of(ctype)):
                inner = _get(h, "Content-Type") or ""
                if inner.lower().startswith("multipart/"):
                    raise ValueError("change sets cannot be nested")
                parts.append(_request_of(h, b))
            items.append(ChangeSet(tuple(parts)))
        elif ctype.lower().startswith("application/http"):
            items.append(_request_of(headers, body))
        else:
            raise ValueError(f"unexpected batch part content type {ctype!r}")
    return items


def _request_of(envelope: list[tuple[str, str]], payload: bytes) -> Part:
    start, headers, body = _parse_http(payload)
    bits = start.split(" ")
    if len(bits) < 2:
        raise ValueError("a batch part without a request line")
    body = body.rstrip(b"\r\n")
    return Part(bits[0].upper(), bits[1], tuple(headers), body or None, _get(envelope, "Content-ID"))


_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    412: "Precondition Failed",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


def _encode_response(r: PartResponse) -> bytes:
    lines = [f"HTTP/1.1 {r.status} {_REASONS.get(r.status, '')}".rstrip().encode()]
    lines += [f"{k}: {v}".encode() for k, v in r.headers]
    return CRLF.join([*lines, b"", r.body])


def encode_batch_response(results: Sequence[BatchResult]) -> tuple[bytes, str]:
    batch = _boundary("batchresponse")
    bodies: list[bytes] = []
    for item in results:
        if isinstance(item, ChangeSetResponse):
            cs = _boundary("changesetresponse")
            inner = _multipart(
                cs, [_part_envelope(_encode_response(r), r.content_id) for r in item.responses]
            )
            bodies.append(f"Content-Type: multipart/mixed; boundary={cs}".encode() + CRLF + CRLF + inner)
        else:
            bodies.append(_part_envelope(_encode_response(item), item.content_id))
    return _multipart(batch, bodies), f"multipart/mixed; boundary={batch}"
