"""Process-wide settings of a ``cosell`` process, applied once by its entry point (``cosell`` itself;
the sync benchmark applies them too, so that it measures what production runs).

Garbage collection: a sync run decodes pages of JSON, hundreds of thousands of short-lived
containers per page. At CPython's default generation-0 threshold (700 allocations) the collector
ran about 4,000 times in a 20,000-deal initial sync, and each full collection walked every object
the imports had created (SQLAlchemy, pydantic, the clients): 15% of the initial sync's CPU and 30% of
a full reconciliation's (bench/bench_sync.py, counted with ``gc.callbacks``). What start-up
imported lives as long as the process, so it is frozen out of the collector's sight
(``gc.freeze``, https://docs.python.org/3/library/gc.html#gc.freeze), and generation 0 is
collected every :data:`GEN0_THRESHOLD` allocations instead: reference counting still frees every
page as soon as it is done; the collector is only needed for the rare reference cycle. Measured at
20,000 deals, the collector's time went from 5.3 to 2.7 s in the initial sync, from 3.7 to 1.0 s in
the echo run and from 1.6 to 0.4 s in the full reconciliation, for 10 MB more peak memory (10,000
as the threshold saved about half as much).
"""

from __future__ import annotations

import gc

__all__ = ["GEN0_THRESHOLD", "settle_collector"]

#: allocations between generation-0 collections (CPython's default is 700)
GEN0_THRESHOLD = 50_000

_settled = False


def settle_collector() -> None:
    """Freeze what is alive now (call it after the imports) and raise the generation-0 threshold.
    Once per process: a second call would freeze a run's leftovers too, and a reference cycle among
    frozen objects is never collected."""
    global _settled
    if _settled:
        return
    _settled = True
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
