"""Stage-mapping cost: resolving the stages of 100,000 opportunities (forward and back).

Prints figures; asserts nothing. Run: .venv/bin/python bench/bench_mappings.py
"""

from __future__ import annotations

import random
import time
import tracemalloc

from connector.domain.stages import ReverseKey
from connector.mappings import load_mapping_files

N = 100_000


def main() -> None:
    mapping = load_mapping_files(["builtin:salesforce-default.yaml"]).stages
    rng = random.Random(7)
    labels = [s.label for s in mapping.stages]
    work = [(rng.choice(labels), rng.choice([None, rng.randint(0, 100)])) for _ in range(N)]
    start = time.perf_counter()
    targets = [mapping.resolve(label, probability) for label, probability in work]
    forward = time.perf_counter() - start
    start = time.perf_counter()
    for res in targets:
        mapping.to_crm(ReverseKey.for_target(res.target))
    reverse = time.perf_counter() - start
    # Memory measured in a separate pass: tracemalloc slows every allocation and would skew the times.
    tracemalloc.start()
    kept = [mapping.resolve(label, probability) for label, probability in work]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    print(f"opportunities:         {N:,}")
    print(f"forward resolve:       {forward:.3f} s  ({N / forward:,.0f}/s)")
    print(f"reverse (PC -> CRM):   {reverse:.3f} s  ({N / reverse:,.0f}/s)")
    print(f"peak traced memory:    {peak / 1e6:.1f} MB")
    print("remote calls:          0 (pure domain)")


if __name__ == "__main__":
    main()
