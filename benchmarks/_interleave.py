"""The interleaved timing loop shared by the benchmarks.

Every round runs each contender once, in an order shuffled by the round's seed, so that
drift of a shared machine hits all of them alike; ratios are then taken per round.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

import numpy as np


def interleaved(fns: Mapping[str, Callable[[], object]], repetitions: int) -> dict[str, np.ndarray]:
    """Wall seconds of ``repetitions`` calls of each ``fns[name]()``, one call per round in a
    shuffled order (``random.Random(round)``); returns ``{name: (repetitions,) seconds}``."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(repetitions):
        random.Random(r).shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: np.asarray(v) for name, v in times.items()}
