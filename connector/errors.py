"""Every error the connector raises, grouped by what the caller must do about it.

The families follow singer-sdk's idea (errors by required action), drawn once here as httpx does::

    CosellError                      root; never raised directly
    ├── ConfigError                  a human fixes configuration; the CLI exits 2
    │   ├── MappingError             a mapping file is invalid (file + key + what would be valid)
    │   └── SignInRequired           no usable sign-in (never done, refresh token revoked/expired)
    ├── RetryLater                   transient: back off and try again later (run-level)
    │   └── RateLimited              the remote said slow down; carries retry_after seconds
    ├── RecordError                  skip this record: isolate it, report it, let the rest proceed
    │   └── RuleViolation            a co-sell business rule refuses the change (quotes the rule)
    ├── ConflictError                the remote changed since we read it (eTag / 412): re-read and merge
    └── FatalError                   stop the run: something is wrong that retrying cannot fix

Each carries enough context (file, key, record id, rule id) for a message a sales-ops person can act
on; ``str(error)`` is that message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "ConflictError",
    "CosellError",
    "FatalError",
    "MappingError",
    "RateLimited",
    "RecordError",
    "RetryLater",
    "RuleViolation",
    "SignInRequired",
]


class CosellError(Exception):
    """Root of the connector's errors."""


# --- fix configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in one configuration source: where, what is wrong, and what would be valid."""

    source: str
    key: str
    problem: str
    valid: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: {self.key}" if self.key else self.source
        hint = f" (valid: {self.valid})" if self.valid else ""
        return f"{where}: {self.problem}{hint}"


class ConfigError(CosellError):
    """Configuration a human must fix. Holds one :class:`ConfigProblem` per problem found."""

    def __init__(self, problems: Sequence[ConfigProblem] | str) -> None:
        if isinstance(problems, str):
            problems = [ConfigProblem(source="configuration", key="", problem=problems)]
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class MappingError(ConfigError):
    """A mapping file (stages or values) is invalid."""


class SignInRequired(ConfigError):
    """No usable sign-in for a remote system; an operator must sign in (e.g. `cosell auth login`)."""


# --- retry later -------------------------------------------------------------------------------


class RetryLater(CosellError):
    """A transient failure of a remote system; the run can be retried later."""

    def __init__(self, message: str, *, system: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.system = system
        self.retry_after = retry_after


class RateLimited(RetryLater):
    """The remote system throttled us (429, Salesforce REQUEST_LIMIT_EXCEEDED, ...)."""


# --- skip this record --------------------------------------------------------------------------


class RecordError(CosellError):
    """One record cannot be processed now; isolate it with its cause and let the rest proceed."""

    def __init__(self, message: str, *, record_id: str = "", cause: str = "") -> None:
        super().__init__(message)
        self.record_id = record_id
        self.cause = cause


class RuleViolation(RecordError):
    """A co-sell business rule refuses a change.

    ``rule`` is a stable identifier (e.g. ``terminal-immutable``) used in audit rows and metrics;
    the message quotes the rule in words a sales-ops person understands.
    """

    def __init__(self, rule: str, message: str, *, record_id: str = "", field: str = "") -> None:
        super().__init__(message, record_id=record_id, cause=rule)
        self.rule = rule
        self.field = field


# --- resolve a conflict ------------------------------------------------------------------------


class ConflictError(CosellError):
    """The remote record changed since the version our change was based on."""

    def __init__(self, message: str, *, record_id: str = "", expected_version: str | None = None) -> None:
        super().__init__(message)
        self.record_id = record_id
        self.expected_version = expected_version


# --- stop --------------------------------------------------------------------------------------


class FatalError(CosellError):
    """Stop the run: retrying cannot help (a bug, a permission that is missing, corrupted state)."""
