"""Suite-wide fixtures. Every test starts without COSELL_* variables from the developer's shell."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def clean_cosell_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("COSELL_"):
            monkeypatch.delenv(name)
    yield
