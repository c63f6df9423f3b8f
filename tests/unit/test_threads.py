"""connector.sync.threads.map_in_threads: order, threads, exceptions."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest

from connector.sync.threads import map_in_threads


def test_results_come_back_in_order_from_several_threads() -> None:
    seen: set[str] = set()

    def work(n: int) -> int:
        seen.add(threading.current_thread().name)
        time.sleep(0.001 * (n % 3))  # out-of-order completion
        return n * n

    assert map_in_threads(work, list(range(40)), 4, name="t") == [n * n for n in range(40)]
    assert len(seen) > 1
    assert all(name.startswith("t") for name in seen)


def test_one_worker_or_one_item_runs_inline() -> None:
    here = threading.current_thread().name
    assert map_in_threads(lambda _n: threading.current_thread().name, [1, 2], 1) == [here, here]
    assert map_in_threads(lambda _n: threading.current_thread().name, [1], 4) == [here]
    assert map_in_threads(lambda n: n, [], 4) == []


def test_an_exception_stops_the_other_threads_and_is_raised() -> None:
    done: list[int] = []

    def work(n: int) -> int:
        if n == 3:
            raise ValueError("record 3")
        time.sleep(0.01)
        done.append(n)
        return n

    with pytest.raises(ValueError, match="record 3"):
        map_in_threads(work, list(range(40)), 3)
    # what was in flight finished; nothing more was taken (e.g. a page's reads once one is fatal)
    assert 3 not in done and len(done) < 10


def test_threads_run_in_the_callers_context() -> None:
    connection: contextvars.ContextVar[str] = contextvars.ContextVar("connection", default="none")
    connection.set("acme")
    assert set(map_in_threads(lambda _n: connection.get(), list(range(8)), 4)) == {"acme"}
