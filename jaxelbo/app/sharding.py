"""Data parallelism: the batch is sharded over every device, the parameters replicated.

A one-axis mesh ``("data",)`` spans all devices (of all processes after
:func:`initialize_distributed`). Batches are placed with ``NamedSharding(mesh,
P("data"))`` and parameters with ``NamedSharding(mesh, P())``; the jit-compiled train
step then runs the per-example work where each shard lives and XLA inserts the
all-reduce of the batch mean (loss and gradients), so sharded and single-device runs
agree up to float summation order.

The training set is placed once with its rows split over ``"data"``
(:func:`shard_rows`); every process holds the same data and hands each local device its
rows through ``jax.make_array_from_callback``. Inside the compiled loop every device
draws the same global batch indices from ``(seed, step)``; XLA gathers the rows and
constrains the batch to ``P("data")``, so multi-host runs need no host-side exchange.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

DATA_AXIS = "data"


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None,
                           *, cpu_collectives: str | None = "gloo", timeout: int | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when a coordinator is given.

    Args:
      coordinator: ``host:port`` of process 0 (None: single process, nothing done).
      num_processes, process_id: this job's size and this process's rank.
      cpu_collectives: CPU collectives implementation for cross-process reductions on
        CPU (``"gloo"``); None leaves the JAX default.
      timeout: seconds to wait for every process to join (None: JAX's default, 300).

    Returns:
      Whether the distributed runtime was initialised.
    """
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num-processes/--process-id need --coordinator host:port")
        return False
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs: dict[str, Any] = {} if timeout is None else {"initialization_timeout": int(timeout)}
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, **kwargs)
    except Exception as e:  # XLA raises RuntimeError/XlaRuntimeError with pages of C++ context
        first = " ".join(str(e).split())[:200]
        raise ValueError(f"process {process_id} of {num_processes} could not join {coordinator} "
                         f"({type(e).__name__}: {first})") from None
    return True


def check_same_settings(settings: dict) -> None:
    """Raises ValueError (one line naming the first differing setting) unless every process has ``settings``.

    Each setting's value is hashed (its JSON text) on each process and the hashes are
    gathered, so a mismatch is found at start-up rather than as wrong numbers later.
    """
    import hashlib
    import json

    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    names = sorted(settings)
    mine = np.array([int.from_bytes(hashlib.sha256(json.dumps(settings[k], sort_keys=True).encode()).digest()[:4],
                                    "little", signed=True) for k in names], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # (processes, settings)
    for j, name in enumerate(names):
        differ = [i for i in range(every.shape[0]) if every[i, j] != every[0, j]]
        if differ:
            raise ValueError(f"--{name.replace('_', '-')} differs between processes (process {differ[0]} was "
                             f"given another value than process 0, this one was given {settings[name]!r}); "
                             "every process must be given the same flags")


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A one-axis mesh ``("data",)`` over the first ``num_devices`` devices (default: all).

    The axis is ``AxisType.Auto`` (XLA propagates shardings): the per-example keys that
    jaxelbo splits inside the loss are then sharded like the batch without any change
    to the core.
    """
    from jaxelbo.snr import device_mesh  # the core's one mesh builder

    return device_mesh(DATA_AXIS, num_devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"``."""
    return NamedSharding(mesh, jax.P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full array on every device."""
    return NamedSharding(mesh, jax.P())


def _global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(mesh: Mesh, x: np.ndarray) -> jax.Array:
    """The global batch ``x`` (identical on every process) split over ``"data"``."""
    n = mesh.shape[DATA_AXIS]
    if np.shape(x)[0] % n:
        raise ValueError(f"batch size {np.shape(x)[0]} must be divisible by the number of devices ({n})")
    return _global_array(x, batch_sharding(mesh))


def shard_rows(mesh: Mesh, x: np.ndarray) -> jax.Array:
    """A data set (identical on every process) with its rows split over ``"data"``.

    The rows are zero-padded to a multiple of the number of devices, so any number of
    rows can be sharded; the caller keeps the true row count (the training loop never
    draws a padding row). Placed once, it stays on the devices for the whole run.
    """
    x = np.asarray(x)
    pad = -len(x) % mesh.shape[DATA_AXIS]
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    return _global_array(x, batch_sharding(mesh))


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Every array leaf of ``tree`` replicated over the mesh (works across processes)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda a: _global_array(np.asarray(a), sharding), tree)


def gather(tree: Any) -> Any:
    """Host numpy copies of (replicated or sharded) global arrays, on every process."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)
