"""What a benchmark process reads about itself (Linux /proc), shared by bench_sync.py and the twins'
process it starts. Standard library only: importing it adds nothing to a measured phase's memory.

Run alone (as ``make bench`` does), it prints this process's own figures.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def memory_mb() -> dict[str, float]:
    """This process's resident and peak resident memory (VmRSS, VmHWM), in MB."""
    out = {"rss_mb": 0.0, "peak_mb": 0.0}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["peak_mb"] = int(line.split()[1]) / 1024
    return out


if __name__ == "__main__":
    figures = memory_mb()
    print(f"this process: rss {figures['rss_mb']:.1f} MB, peak {figures['peak_mb']:.1f} MB")
