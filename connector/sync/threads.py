"""A page's independent requests on a few threads, results in order.

``ThreadPoolExecutor.map`` makes a Future (a lock, a condition, a hand-over) per item: for an initial
sync, one per created referral, about 5% of the connector's CPU in bench/bench_sync.py's profile.
Here each thread takes the next item from one shared iterator until none is left: a page costs one
Future per thread.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["map_in_threads"]

T = TypeVar("T")
R = TypeVar("R")


def map_in_threads(fn: Callable[[T], R], items: Sequence[T], workers: int, *, name: str = "") -> list[R]:
    """``[fn(item) for item in items]``, computed on ``workers`` threads, each in a copy of the
    caller's context variables. An exception raised by ``fn`` stops every thread from taking more
    items and is raised here once they have all stopped."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    results: list[R | None] = [None] * len(items)
    pending = iter(enumerate(items))
    lock = threading.Lock()
    failed = threading.Event()

    def drain() -> None:
        while not failed.is_set():
            with lock:
                taken = next(pending, None)
            if taken is None:
                return
            index, item = taken
            try:
                results[index] = fn(item)
            except BaseException:
                failed.set()  # the others stop taking items: the caller gets the error, not the rest
                raise

    threads = min(workers, len(items))
    with ThreadPoolExecutor(threads, thread_name_prefix=name or "cosell") as pool:
        # each thread in a copy of the caller's context: log lines keep the run's bound connection
        futures = [pool.submit(contextvars.copy_context().run, drain) for _ in range(threads)]
    for future in futures:
        future.result()
    return results  # type: ignore[return-value] # every index was filled, or a result() raised
