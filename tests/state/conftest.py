"""One behavioural suite, every backend: each test runs against SQLite and the real PostgreSQL server
(as apscheduler runs one data-store suite against every store). The PostgreSQL tests create and drop
their own database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.state import SqlStateStore, open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStateStore]:
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()
