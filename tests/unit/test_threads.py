"""connector.sync.threads.map_in_threads: order, threads, exceptions."""

from __future__ import annotations

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


def test_an_exception_is_raised_after_the_other_threads_finish() -> None:
    done: list[int] = []

    def work(n: int) -> int:
        if n == 3:
            raise ValueError("record 3")
        time.sleep(0.001)
        done.append(n)
        return n

    with pytest.raises(ValueError, match="record 3"):
        map_in_threads(work, list(range(20)), 3)
    # the failing thread stopped; the others drained what was left
    assert sorted(done) == [n for n in range(20) if n != 3]
