"""The slice of RFC 6902 JSON Patch the Referrals API takes: ``replace`` and ``add`` on the paths the
Swagger lists (https://learn.microsoft.com/partner-center/developer/patch-a-referral; partner-center-api.md
§2, §5.3). Used by the converter (to apply a change to a referral locally) and by the twin (to be as
strict as the service).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["PATCHABLE_PATHS", "JsonPatchError", "apply_patch", "is_patchable"]

#: Paths the Swagger accepts (`replace` or `add`), plus deal registrations (§8).
PATCHABLE_PATHS = frozenset(
    {
        "/campaignId",
        "/consent/consentToShareReferralWithMicrosoftSellers",
        "/customerProfile/team",
        "/customerProfile/team/-",
        "/details/closingDateTime",
        "/details/currency",
        "/details/dealValue",
        "/details/notes",
        "/details/requirements/solutions",
        "/details/requirements/solutions/-",
        "/externalReferenceId",
        "/referralProgram",
        "/salesStage",
        "/status",
        "/substatus",
        "/statusReason",
        "/team",
        "/team/-",
        "/registrations/-",
    }
)
_REGISTRATION_PATH = re.compile(r"^/registrations/0/(contract|solutionDetails/0)(/[A-Za-z]+)+$")
OPS = frozenset({"replace", "add"})


class JsonPatchError(ValueError):
    """The patch document is not one the API accepts (the service answers 400)."""


def is_patchable(path: str) -> bool:
    return path in PATCHABLE_PATHS or bool(_REGISTRATION_PATH.match(path))


def _tokens(path: str) -> list[str]:
    if not path.startswith("/"):
        raise JsonPatchError(f"path {path!r} is not a JSON pointer")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def apply_patch(
    document: Mapping[str, Any], operations: Iterable[Mapping[str, Any]], *, strict: bool = True
) -> dict[str, Any]:
    """A patched deep copy of ``document``.

    ``strict`` (the twin): only ``replace``/``add``, only patchable paths, ``replace`` needs the target
    to exist (RFC 6902 §4.3). Lenient (local conversion): missing parents and members are created.
    """
    doc: dict[str, Any] = copy.deepcopy(dict(document))
    for op in operations:
        kind, path = op.get("op"), op.get("path")
        if kind not in OPS:
            raise JsonPatchError(f"op {kind!r} is not supported (replace and add only)")
        if not isinstance(path, str):
            raise JsonPatchError("every operation needs a path")
        if "value" not in op:
            raise JsonPatchError(f"{kind} {path} needs a value")
        if strict and not is_patchable(path):
            raise JsonPatchError(f"path {path} cannot be patched")
        *parents, last = _tokens(path)
        target: Any = doc
        for token in parents:
            if isinstance(target, list):
                try:
                    target = target[int(token)]
                except (ValueError, IndexError):
                    raise JsonPatchError(f"path {path}: no element {token}") from None
            elif isinstance(target, dict):
                if target.get(token) is None:
                    if strict:
                        raise JsonPatchError(f"path {path}: {token} does not exist")
                    target[token] = [] if last == "-" and token == parents[-1] else {}
                target = target[token]
            else:
                raise JsonPatchError(f"path {path}: {token} is not an object or array")
        value = copy.deepcopy(op["value"])
        if isinstance(target, list):
            if last == "-" and kind == "add":
                target.append(value)
                continue
            try:
                index = int(last)
            except ValueError:
                raise JsonPatchError(f"path {path}: {last!r} is not an array index") from None
            if not 0 <= index <= len(target) - (1 if kind == "replace" else 0):
                raise JsonPatchError(f"path {path}: index {index} out of range")
            if kind == "replace":
                target[index] = value
            else:
                target.insert(index, value)
        elif isinstance(target, dict):
            if last == "-":
                raise JsonPatchError(f"path {path}: '-' needs an array")
            if kind == "replace" and strict and last not in target:
                raise JsonPatchError(f"path {path}: replace needs an existing member")
            target[last] = value
        else:
            raise JsonPatchError(f"path {path}: parent is not an object or array")
    return doc
