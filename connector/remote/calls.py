"""Counts every remote call by system, operation and status: for metrics, benchmarks and quota.

For our users API calls are money and quota, so every seam reports each call here.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["CallCounter", "CallKey"]


@dataclass(frozen=True, order=True)
class CallKey:
    system: str
    operation: str
    status: str  # HTTP status as text, or "error" for a transport failure


@dataclass
class CallCounter:
    """Thread-safe tally of calls; one per process, shared by all clients."""

    _counts: Counter[CallKey] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, system: str, operation: str, status: int | str) -> None:
        with self._lock:
            self._counts[CallKey(system, operation, str(status))] += 1

    def total(self, system: str | None = None, operation: str | None = None) -> int:
        return sum(
            n
            for k, n in self.snapshot().items()
            if (system is None or k.system == system) and (operation is None or k.operation == operation)
        )

    def snapshot(self) -> dict[CallKey, int]:
        with self._lock:
            return dict(self._counts)

    def window(self) -> CallCounter:
        """A counter that sees only the calls recorded here from now on: one run's calls on clients
        that a long-lived process keeps across runs."""
        return _Window(self, self.snapshot())


class _Window(CallCounter):
    def __init__(self, parent: CallCounter, baseline: dict[CallKey, int]) -> None:
        super().__init__()
        self._parent = parent
        self._baseline = baseline

    def record(self, system: str, operation: str, status: int | str) -> None:
        self._parent.record(system, operation, status)

    def snapshot(self) -> dict[CallKey, int]:
        now = self._parent.snapshot()
        return {k: n - self._baseline.get(k, 0) for k, n in now.items() if n - self._baseline.get(k, 0)}
