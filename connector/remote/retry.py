"""The retry policy every remote seam shares, as data (apscheduler's RetrySettings idea) on tenacity.

Transient failures surface as :class:`~connector.errors.RetryLater` (429, 502/503/504, connection
errors); the policy backs off, honouring the server's ``Retry-After`` when it gave one, and gives up
after a bounded number of attempts and a bounded total wait so a run never hangs. Everything else
(conflicts, record errors, config errors) is never retried here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import tenacity

from connector.errors import RetryLater

__all__ = ["RetryPolicy", "parse_retry_after"]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form; HTTP-dates are treated as absent)."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before giving up. ``sleep`` is injectable so tests record waits, not time."""

    max_attempts: int = 5
    initial_wait: float = 0.5
    max_wait: float = 60.0
    max_total_wait: float = 300.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryLater) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_wait)
        backoff = tenacity.wait_random_exponential(multiplier=self.initial_wait, max=self.max_wait)
        return float(backoff(state))

    def retrying(self) -> tenacity.Retrying:
        """A tenacity controller: retries :class:`RetryLater` only, re-raises the last one when done."""
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RetryLater),
            wait=self._wait,
            stop=tenacity.stop_after_attempt(self.max_attempts)
            | tenacity.stop_after_delay(self.max_total_wait),
            sleep=self.sleep,
            reraise=True,
        )
