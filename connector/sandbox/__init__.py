"""The local sandbox and the one-command demo: twins of every remote system, a deterministic book of
business, a ready config (``cosell sandbox``), and a full two-way sync shown end to end
(``cosell demo``)."""

from __future__ import annotations

from connector.sandbox.book import Book, build_book
from connector.sandbox.sandbox import DEFAULT_SEED, DV_CONNECTION, SF_CONNECTION, Sandbox, SandboxFiles

__all__ = ["DEFAULT_SEED", "DV_CONNECTION", "SF_CONNECTION", "Book", "Sandbox", "SandboxFiles", "build_book"]
