"""Chunk sizes for streamed estimates, chosen from the machine.

A streamed estimate such as :func:`jaxelbo.log_likelihood` evaluates ``g`` points times
``c`` samples per step: a block of ``rows = g * c`` (example, sample) pairs whose
intermediates (a decoder's activations and logits) live in memory at once. On a CPU
the step runs at the speed of its matrix products only while those intermediates stay
in cache: past it every element-wise pass (bias, activation, log-density) streams them
from main memory. On an accelerator bigger blocks are better up to a memory budget.

:func:`choose_rows` takes the bytes per row from XLA's memory analysis of one compiled
step (``jax.jit(step).lower(...).compile().memory_analysis()``) and divides a budget
by it: on CPU the per-core L2 cache times the number of cores (read from
``/sys/devices/system/cpu``, 1 MiB per core when unknown), elsewhere a fixed 1 GiB.

On CPU a step also has a fixed cost, whatever its rows: a few dozen kernels dispatched
to the thread pool, the rolled loops of ``threefry`` and matrix products that pack their
weight panels. On the Burda VAE it is about 0.45 ms a step against
about 6.5 us a row (2 AMD EPYC cores, ``benchmarks/evaluation.py``): at the 264 rows that
512 KiB of L2 per core allow, steps ran 15-25% slower than at 1000-2500 rows, which spill
to L3 but not to memory. So CPU steps get at least ``_CPU_MIN_ROWS`` rows, as long as
that stays within ``_CPU_MAX_STEP_BYTES`` of temporaries.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

__all__ = ["bytes_per_row", "cache_bytes", "choose_rows", "split_rows"]

_CPU_CACHE_FRACTION = 1.0  # budget = this x (L2 per core x cores), see choose_rows
_ACCELERATOR_BUDGET = 1 << 30
_PROBE_ROWS = 256
_MIN_ROWS, _MAX_ROWS = 64, 1 << 20
_CPU_MIN_ROWS = 1024  # a CPU step's fixed cost amortised (see the module docstring)
_CPU_MAX_STEP_BYTES = 64 << 20  # ... unless 1024 rows need more temporaries than this


@functools.lru_cache(maxsize=1)
def cache_bytes() -> int:
    """The CPU's unified L2 bytes per core times the cores this process may use.

    Read from ``/sys/devices/system/cpu/cpu0/cache/index*/``; ``1 MiB`` per core when
    the files are missing (not Linux).
    """
    per_core = 1 << 20
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                text = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
                per_core = int(text.rstrip("KMG")) * scale
                break
    except (OSError, ValueError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return per_core * max(cores, 1)


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


_BYTES_PER_ROW: dict[Any, float] = {}


def bytes_per_row(make_step: Callable[[int], Callable], args: tuple, *, cache_key: Any) -> float:
    """XLA's temporary bytes per row of ``make_step(256)(*args)``, compiled once per
    ``cache_key``, backend and argument shapes."""
    leaves, treedef = jax.tree_util.tree_flatten(_abstract(args))
    key = (cache_key, jax.default_backend(), treedef, tuple((tuple(leaf.shape), leaf.dtype) for leaf in leaves))
    if key not in _BYTES_PER_ROW:
        if len(_BYTES_PER_ROW) > 256:
            _BYTES_PER_ROW.clear()
        stats = jax.jit(make_step(_PROBE_ROWS)).lower(*_abstract(args)).compile().memory_analysis()
        temp = getattr(stats, "temp_size_in_bytes", None) if stats is not None else None
        _BYTES_PER_ROW[key] = max(float(temp or 0), 1.0) / _PROBE_ROWS
    return _BYTES_PER_ROW[key]


def choose_rows(make_step: Callable[[int], Callable], *args: Any, cache_key: Any) -> int:
    """Rows per step that keep one step's temporaries within the machine's budget.

    Args:
      make_step: ``rows -> step``; ``step(*args)`` evaluates one block of ``rows``
        rows (compiled once, at 256 rows, for XLA's memory analysis).
      args: the step's arguments (arrays or tracers; only shapes and dtypes are read).
      cache_key: a hashable naming the step (e.g. ``(model, guide)``): the analysis is
        cached per key, backend and argument shapes.

    Returns:
      ``budget / (temp bytes / rows)`` clamped to ``[64, 2**20]``, with the budget
      :func:`cache_bytes` on CPU and 1 GiB on other backends; on CPU at least
      ``min(1024, 64 MiB / (temp bytes / rows))`` rows.
    """
    per_row = bytes_per_row(make_step, args, cache_key=cache_key)
    budget, floor = float(_ACCELERATOR_BUDGET), float(_MIN_ROWS)
    if jax.default_backend() == "cpu":
        budget = _CPU_CACHE_FRACTION * cache_bytes()
        floor = max(min(_CPU_MIN_ROWS, _CPU_MAX_STEP_BYTES / per_row), _MIN_ROWS)
    return int(min(max(budget / per_row, floor), _MAX_ROWS))


def split_rows(rows: int, num_points: int, num_samples: int) -> tuple[int, int]:
    """``(points, samples)`` per step with ``points * samples`` about ``rows``.

    Samples first (a point's encoder runs once per step: the more samples per step, the
    less it is repeated), balanced so that the last chunk of samples and the last group
    of points are nearly full.
    """
    samples = min(num_samples, max(rows, 1))
    samples = -(-num_samples // -(-num_samples // samples))
    points = min(num_points, max(rows // samples, 1))
    points = -(-num_points // -(-num_points // points))
    return points, samples
