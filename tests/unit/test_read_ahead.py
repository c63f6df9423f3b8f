"""read_ahead: pages in order, one ahead, errors where they belong, the source closed when done."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from connector.sync.read_ahead import read_ahead


def test_pages_come_in_order_and_the_next_is_read_while_the_caller_works() -> None:
    asked = threading.Event()
    events: list[str] = []

    def pages() -> Iterator[int]:
        for n in range(3):
            events.append(f"read {n}")
            if n == 1:
                asked.set()
            yield n

    got = []
    for page in read_ahead(pages()):
        if page == 0:  # page 1 is read while the caller still holds page 0
            assert asked.wait(5)
        got.append(page)
        events.append(f"used {page}")
    assert got == [0, 1, 2]
    assert events.index("read 1") < events.index("used 0")


def test_an_error_while_reading_surfaces_after_the_pages_before_it() -> None:
    def pages() -> Iterator[int]:
        yield 0
        raise RuntimeError("page 1 could not be read")

    source = read_ahead(pages())
    assert next(source) == 0
    with pytest.raises(RuntimeError, match="page 1"):
        next(source)


def test_a_caller_stopping_early_closes_the_listing() -> None:
    closed = threading.Event()

    def pages() -> Iterator[int]:
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    for page in read_ahead(pages()):
        if page == 2:
            break
    assert closed.is_set()


def test_the_worker_sees_the_callers_context() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("run-1")

    def pages() -> Iterator[str]:
        yield var.get()

    assert list(read_ahead(pages())) == ["run-1"]


def test_a_started_listing_is_read_at_once_and_closed_unread_when_the_run_stops_first() -> None:
    from connector.sync.read_ahead import ReadAhead

    asked, closed = threading.Event(), threading.Event()

    def pages() -> Iterator[int]:
        try:
            asked.set()
            yield 0
            yield 1
        finally:
            closed.set()

    with ReadAhead(pages()) as ahead:
        assert asked.wait(5)  # asked for before anyone iterates (while the other phase runs)
    assert closed.is_set()
    assert list(ahead) == []  # closed: nothing more comes


def test_a_started_listing_gives_its_pages_then_its_error() -> None:
    from connector.sync.read_ahead import ReadAhead

    def pages() -> Iterator[int]:
        yield 0
        raise RuntimeError("the listing broke")

    ahead = ReadAhead(pages())
    assert next(ahead) == 0
    with pytest.raises(RuntimeError, match="broke"):
        next(ahead)
    assert list(ahead) == []
