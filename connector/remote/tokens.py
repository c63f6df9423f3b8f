"""The one interface every sign-in implementation offers the HTTP plumbing."""

from __future__ import annotations

from typing import Protocol

__all__ = ["StaticToken", "TokenProvider"]


class TokenProvider(Protocol):
    """Hands out a bearer token; ``force_refresh`` after a 401 gets a new one (once per request)."""

    def token(self, *, force_refresh: bool = False) -> str: ...


class StaticToken:
    """A fixed token (tests, one-off tools). It cannot refresh."""

    def __init__(self, value: str) -> None:
        self._value = value

    def token(self, *, force_refresh: bool = False) -> str:
        return self._value
