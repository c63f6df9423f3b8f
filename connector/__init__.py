"""cosell: keeps CRM opportunities and Microsoft Partner Center co-sell referrals true to each other."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cosell")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
