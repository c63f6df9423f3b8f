"""Suite-wide fixtures: a clean COSELL_* environment for every test, and throwaway PostgreSQL databases\non the real server (the tests create and drop their own)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
import structlog


@pytest.fixture(autouse=True)
def clean_cosell_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("COSELL_"):
            monkeypatch.delenv(name)
    yield
    # commands run through main() configure logging for the process (level, format): undo it, so
    # every test starts from structlog's defaults whatever ran before it
    structlog.reset_defaults()


PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def pg_server() -> str:
    engine = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:  # CI starts PostgreSQL (.ci/run); fail loudly, never skip
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432: {exc}")
    finally:
        engine.dispose()
    return PG_ADMIN


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    name = f"cosell_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
