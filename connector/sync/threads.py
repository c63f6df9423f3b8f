"""A page's independent requests on a few threads, results in order.

``ThreadPoolExecutor.map`` makes a Future (a lock, a condition, a hand-over) per item: for an initial
sync, one per created referral, about 5% of the connector's CPU in bench/bench_sync.py's profile.
Here each thread takes the next item from one shared iterator until none is left: a page costs one
Future per thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["map_in_threads"]

T = TypeVar("T")
R = TypeVar("R")


def map_in_threads(fn: Callable[[T], R], items: Sequence[T], workers: int, *, name: str = "") -> list[R]:
    """``[fn(item) for item in items]``, computed on ``workers`` threads. An exception raised by
    ``fn`` stops its thread's work and is raised here once every thread has stopped (the others
    finish what is left)."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    results: list[R | None] = [None] * len(items)
    pending = iter(enumerate(items))
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                taken = next(pending, None)
            if taken is None:
                return
            index, item = taken
            results[index] = fn(item)

    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix=name or "cosell") as pool:
        futures = [pool.submit(drain) for _ in range(min(workers, len(items)))]
    for future in futures:
        future.result()
    return results  # type: ignore[return-value] # every index was filled, or a result() raised
