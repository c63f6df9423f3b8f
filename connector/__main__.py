"""``python -m connector``: the ``cosell`` command without the console script (tests, containers)."""

from __future__ import annotations

from connector.cli import run

if __name__ == "__main__":
    run()
