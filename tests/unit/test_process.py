"""The process-wide collector settings (connector/process.py)."""

from __future__ import annotations

import gc
import subprocess
import sys


def test_settle_collector_freezes_once_and_raises_the_gen0_threshold() -> None:
    # in a fresh interpreter: freezing is process-wide and must not leak into the test process
    code = """
import gc
from connector import process
before = gc.get_threshold()
process.settle_collector()
frozen = gc.get_freeze_count()
assert frozen > 0, frozen
assert gc.get_threshold() == (process.GEN0_THRESHOLD, before[1], before[2]), gc.get_threshold()
junk = [[i] for i in range(1000)]
process.settle_collector()  # a second call freezes nothing more
assert gc.get_freeze_count() == frozen
assert gc.isenabled()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_cosell_settles_the_collector_at_start() -> None:
    code = """
import gc
from connector.cli import main
from connector.process import GEN0_THRESHOLD
assert gc.get_freeze_count() == 0
main(["--version"])
assert gc.get_freeze_count() > 0
assert gc.get_threshold()[0] == GEN0_THRESHOLD
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "cosell" in done.stdout
    assert gc.isenabled()
