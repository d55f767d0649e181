"""The gradient-statistics engine, and SNR sweeps (Rainforth et al. 2018; Tucker et al. 2019).

For a stochastic gradient estimator :math:`\\Delta` of one parameter element, the
signal-to-noise ratio is

.. math::

   \\mathrm{SNR} = \\frac{|\\mathbb{E}[\\Delta]|}{\\sqrt{\\mathrm{Var}[\\Delta]}} ,

estimated from ``R`` independent replicates of the whole estimator (each replicate draws
its own ``K`` (or ``M x K``) latent samples). Rainforth et al. (2018) show that for the
IWAE bound the model gradient has ``SNR = O(sqrt(M K))`` while the inference-network
gradient has ``SNR = O(sqrt(M / K))``; Tucker et al. (2019) show that the
doubly-reparameterised (DReG) inference-network gradient recovers ``O(sqrt(M K))``.

This module is the one engine for gradient statistics of *any* loss function
``(params, rng, x) -> (loss, aux)`` whose ``jax.grad`` is the estimator (every jaxelbo
objective is one). Its pieces:

* the replicates: :func:`replicate_gradients` evaluates every loss's gradient on each of
  ``R`` keys ``jax.random.split(rng, R)`` in one vmapped program (so several estimators
  are paired on the same noise), with the keys sharded over :func:`replicate_mesh`;
* the moments: :class:`Moments` (count, mean, sum of squared deviations), in the graph
  (:func:`replicate_moments`) or merged across chunks on the host in float64;
* the statistics: :func:`signal_to_noise`, :func:`paired_t` and
  :func:`paired_t_statistics`, the same formulas for jax arrays (traceable) and NumPy
  arrays (float64 on the host).

``je.gradient_replicates``, ``je.gradient_snr`` and ``je.paired_bias_test`` are views over
it that return pytrees like ``params`` and can be jit-compiled;
:func:`gradient_moments` streams the same statistics over chunks for large ``R``;
:func:`sweep` runs it over a grid (of ``num_samples``, ``num_outer``, or any keyword of
the user's loss factory); :func:`fit_loglog` fits ``log SNR = a + s log K`` by least
squares, with the standard error of ``s`` (a Student-t interval is ``Slope.interval(t)``
with ``t`` the quantile of ``Slope.dof`` degrees of freedom).

The linear-Gaussian experiment of both papers (its problem, records, tables and figures,
and ``jaxelbo snr``) is :mod:`jaxelbo.app.rainforth`.

Variances are sample variances with ``ddof = 1`` everywhere unless a ``ddof`` is passed.

References:
  Rainforth, Kosiorek, Le, Maddison, Igl, Wood, Teh (2018). Tighter Variational Bounds
  are Not Necessarily Better. ICML. arXiv:1802.04537.
  Tucker, Lawson, Gu, Maddison (2019). Doubly Reparameterized Gradient Estimators for
  Monte Carlo Objectives. ICLR. arXiv:1810.04152.
  Chan, Golub, LeVeque (1979). Updating formulae and a pairwise algorithm for computing
  sample variances.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxelbo.types import LossFn, PyTree

DEFAULT_MEMORY_BUDGET_BYTES = 512 * 2**20
MAX_AUTO_CHUNK = 2048  # replicates per compiled call when memory allows; larger gains little
GROUP_NAMES = {"model": "theta", "guide": "phi"}

__all__ = [
    "REPLICATE_AXIS",
    "GridPoint",
    "Moments",
    "PairedBiasTest",
    "ParamLayout",
    "Slope",
    "device_mesh",
    "fit_loglog",
    "geometric_grid",
    "gradient_moments",
    "param_layout",
    "paired_t",
    "paired_t_statistics",
    "replicate_gradients",
    "replicate_mesh",
    "replicate_moments",
    "shard_replicates",
    "signal_to_noise",
    "summarize",
    "sweep",
]


# ----------------------------------------------------------------------------- the replicate mesh


REPLICATE_AXIS = "replicates"


def device_mesh(axis_name: str, num_devices: int | None = None) -> jax.sharding.Mesh:
    """A one-axis mesh named ``axis_name`` over the first ``num_devices`` devices (default: all).

    The core's one mesh builder (the app's data mesh is one too). The axis is
    ``AxisType.Auto``: XLA propagates shardings from the arrays constrained to it.

    Example:
      >>> device_mesh("replicates").axis_names
      ('replicates',)
    """
    devices = jax.devices() if num_devices is None else jax.devices()[: int(num_devices)]
    return jax.make_mesh((len(devices),), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def replicate_mesh(mesh: jax.sharding.Mesh | None | bool = None) -> jax.sharding.Mesh | None:
    """The mesh that gradient replicates are sharded over.

    ``None`` (or ``True``): a 1-D mesh ``("replicates",)`` over every device when there are
    several (else no mesh); ``False``: no mesh; a :class:`jax.sharding.Mesh` is returned as is.
    """
    if mesh is False:
        return None
    if mesh is None or mesh is True:
        return None if jax.device_count() == 1 else device_mesh(REPLICATE_AXIS)
    return mesh


def shard_replicates(keys: jax.Array, mesh: jax.sharding.Mesh | None | bool = None) -> jax.Array:
    """``keys`` constrained to be split over the axes of :func:`replicate_mesh` ``(mesh)``.

    Unchanged when there is no mesh or its size does not divide the number of keys. Works
    inside ``jax.jit`` (a sharding constraint) and outside it.
    """
    mesh = replicate_mesh(mesh)
    if mesh is None or keys.shape[0] % mesh.devices.size:
        return keys
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
    return jax.lax.with_sharding_constraint(keys, spec)


# ----------------------------------------------------------------------------- replicates


def replicate_gradients(loss_fns: Mapping[str, LossFn], params: PyTree, keys: jax.Array, x: PyTree, *,
                        chunk_size: int | None = None) -> dict[str, PyTree]:
    """``jax.grad`` of every loss on each key: replicates paired on the same noise.

    Replicate ``r`` evaluates ``jax.grad(lambda p: loss_fn(p, keys[r], x)[0])(params)`` for
    every loss function, so the estimators see the same latent noise. All replicates run
    as one vmapped program; with ``chunk_size`` they run ``chunk_size`` at a time
    (``jax.lax.map``), bounding memory at ``chunk_size`` times one replicate's, with the
    same results.

    Args:
      loss_fns: ``{name: loss_fn}``, each ``(params, rng, x) -> (loss, aux)``.
      params: the parameters at which gradients are taken (any pytree).
      keys: ``(R,)`` PRNG keys, one per replicate.
      x: the data passed to every loss function.
      chunk_size: replicates per step of a ``jax.lax.map`` (``None``: all at once).

    Returns:
      ``{name: gradients}``, each a pytree like ``params`` whose leaves have a leading
      axis ``R``.
    """
    def on_key(p: PyTree, key: jax.Array) -> dict[str, PyTree]:
        return {name: jax.grad(lambda q, fn=fn: fn(q, key, x)[0])(p) for name, fn in loss_fns.items()}

    if chunk_size is None or chunk_size >= keys.shape[0]:
        return jax.vmap(on_key, in_axes=(None, 0))(params, keys)
    return jax.lax.map(lambda key: on_key(params, key), keys, batch_size=chunk_size)


# ----------------------------------------------------------------------------- moments


class Moments(NamedTuple):
    """Element-wise moments of ``count`` replicates.

    On the host (from :func:`gradient_moments`) ``mean`` and ``m2`` are float64 NumPy
    arrays; in the graph (from :func:`replicate_moments`) they are jax arrays.

    Attributes:
      count: number of replicates.
      mean: sample mean (``(P,)`` from :func:`gradient_moments`, the replicates' element
        shape from :func:`replicate_moments`).
      m2: sum of squared deviations from the mean, ``sum_r (g_r - mean)^2``.
    """

    count: int  # type: ignore[assignment]  # a field, shadowing tuple.count
    mean: Any
    m2: Any

    @property
    def variance(self) -> Any:
        """Unbiased sample variance ``m2 / (count - 1)`` (``ddof = 1``, as :func:`jaxelbo.gradient_snr`)."""
        return self.m2 / max(self.count - 1, 1)

    def merge(self, other: Moments) -> Moments:
        """Combine two disjoint sets of replicates (Chan, Golub & LeVeque 1979).

        ``mean = mean_a + delta n_b / n``, ``m2 = m2_a + m2_b + delta^2 n_a n_b / n`` with
        ``delta = mean_b - mean_a``; stable because each chunk's ``m2`` is taken about its
        own mean.
        """
        if self.count == 0:
            return other
        if other.count == 0:
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)


def _empty_moments() -> Moments:
    return Moments(0, np.zeros(0), np.zeros(0))


def _mean_m2(replicates: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean and sum of squared deviations over the leading axis (of the rows ``mask`` keeps)."""
    g = jnp.asarray(replicates)
    if mask is None:
        mean = jnp.mean(g, axis=0, keepdims=True)
        m2 = jnp.sum((g - mean) ** 2, axis=0)
    else:
        w = mask.astype(g.dtype).reshape((-1,) + (1,) * (g.ndim - 1))
        mean = jnp.sum(w * g, axis=0, keepdims=True) / jnp.sum(w)
        m2 = jnp.sum(w * (g - mean) ** 2, axis=0)
    return mean[0], m2


def replicate_moments(replicates: jax.Array) -> Moments:
    """The :class:`Moments` of an array of replicates along its leading axis, in the graph.

    Example:
      >>> import jax.numpy as jnp
      >>> m = replicate_moments(jnp.array([[1.0, 2.0], [3.0, 2.0]]))
      >>> m.count, m.mean.tolist(), m.m2.tolist(), m.variance.tolist()
      (2, [2.0, 2.0], [2.0, 0.0], [2.0, 0.0])
    """
    mean, m2 = _mean_m2(replicates)
    return Moments(int(jnp.shape(replicates)[0]), mean, m2)


# ----------------------------------------------------------------------------- statistics


def _is_host(*arrays: Any) -> bool:
    """NumPy (host, float64) arithmetic unless an argument is a jax array or tracer."""
    return not any(isinstance(a, jax.Array | jax.core.Tracer) for a in arrays)


def signal_to_noise(mean: Any, variance: Any) -> Any:
    """Element-wise ``|mean| / sqrt(variance)``; ``0`` where both are zero, ``inf`` where only
    the variance is.

    NumPy inputs give a float64 NumPy array; jax arrays give a jax array (traceable).

    Example:
      >>> signal_to_noise(np.array([2.0, 0.0, 1.0]), np.array([4.0, 0.0, 0.0])).tolist()
      [1.0, 0.0, inf]
    """
    if _is_host(mean, variance):
        signal = np.abs(np.asarray(mean, np.float64))
        noise = np.sqrt(np.asarray(variance, np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            out = signal / noise
        return np.where((noise == 0) & (signal == 0), 0.0, out)
    signal_j, noise_j = jnp.abs(mean), jnp.sqrt(variance)
    return jnp.where((noise_j == 0) & (signal_j == 0), 0.0, signal_j / noise_j)


def paired_t(diff: Moments) -> Any:
    """Element-wise paired t-statistic ``mean(d) / (std(d) / sqrt(R))`` of differences
    ``d = g_a - g_b`` computed on the same random keys (``0`` where ``d`` is identically 0,
    ``+-inf`` where it is a nonzero constant).

    Example:
      >>> paired_t(Moments(4, np.array([1.0, -0.5, 0.0]), np.array([3.0, 0.75, 0.0]))).tolist()
      [2.0, -2.0, 0.0]
    """
    sign = np.sign(diff.mean) if _is_host(diff.mean) else jnp.sign(diff.mean)
    return signal_to_noise(diff.mean, diff.variance) * sign * math.sqrt(diff.count)


class PairedBiasTest(NamedTuple):
    """Paired t-test of ``E[g_a - g_b] = 0``, element by element (see :func:`jaxelbo.paired_bias_test`).

    Attributes:
      t: per-element t-statistics, a pytree like ``params``.
      mean_difference: per-element ``mean_r (g_a - g_b)``, like ``params``.
      rms_t: root mean square of ``t`` over all elements (about 1 without bias).
      max_abs_t: the largest ``|t|``.
      num_large: how many elements have ``|t| > threshold`` (4 by default).
    """

    t: PyTree
    mean_difference: PyTree
    rms_t: jax.Array
    max_abs_t: jax.Array
    num_large: jax.Array


def paired_t_statistics(replicates_a: PyTree, replicates_b: PyTree, *, rtol: float = 1e-4,
                        threshold: float = 4.0) -> PairedBiasTest:
    """The :class:`PairedBiasTest` of two replicate pytrees computed on the same keys.

    ``t = mean(d) / (std(d) / sqrt(R))`` with ``d = g_a - g_b`` and the unbiased ``std``
    (:func:`paired_t` of :func:`replicate_moments`). Elements where ``a`` and ``b`` agree
    to ``rtol`` in every replicate (``max_r |d| <= rtol (mean_r |g_a| + mean_r |g_b|)``;
    e.g. ``theta``'s gradient, shared by every estimator) count as equal: their difference
    is rounding, so ``t = 0``. Any pytree works, tuples and NamedTuples included.

    Example:
      >>> import jax.numpy as jnp
      >>> a = {"u": (jnp.array([1.0, 2.0, 3.0]),)}
      >>> b = {"u": (jnp.array([0.0, 1.5, 1.5]),)}
      >>> round(float(paired_t_statistics(a, b).t["u"][0]), 4)  # d = (1, 0.5, 1.5)
      3.4641
    """
    leaves_a, treedef = jax.tree_util.tree_flatten(replicates_a)
    # b's leaves in a's order (tree_map raises when the structures differ)
    leaves_b = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda _, b: b, replicates_a, replicates_b))
    ts, means = [], []
    for a, b in zip(leaves_a, leaves_b, strict=True):
        a, b = jnp.asarray(a), jnp.asarray(b)
        if a.shape[0] < 2:
            raise ValueError(f"a paired t-test needs at least 2 replicates, got {a.shape[0]}")
        d = a - b
        diff = replicate_moments(d)
        rounding = jnp.max(jnp.abs(d), axis=0) <= rtol * (jnp.mean(jnp.abs(a), axis=0) + jnp.mean(jnp.abs(b), axis=0))
        ts.append(jnp.where(rounding, 0.0, paired_t(diff)))
        means.append(diff.mean)
    if not ts:
        raise ValueError("a paired t-test needs at least one array leaf in the replicates")
    flat = jnp.concatenate([jnp.ravel(t) for t in ts])
    unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)
    return PairedBiasTest(t=unflatten(ts), mean_difference=unflatten(means),
                          rms_t=jnp.sqrt(jnp.mean(flat**2)), max_abs_t=jnp.max(jnp.abs(flat)),
                          num_large=jnp.sum(jnp.abs(flat) > threshold))


# ----------------------------------------------------------------------------- layout


class ParamLayout(NamedTuple):
    """Where each parameter leaf sits in the flattened gradient vector.

    Attributes:
      leaves: ``{"model/mu": slice, ...}`` one entry per leaf, in ``ravel_pytree`` order.
      groups: ``{"theta": index array, "phi": index array, "model/mu": ..., ...}``: the
        top-level groups (``params["model"]`` is ``theta``, ``params["guide"]`` is ``phi``,
        other top-level keys keep their name) and every leaf.
      size: total number of elements ``P``.
    """

    leaves: dict[str, slice]
    groups: dict[str, np.ndarray]
    size: int


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def param_layout(params: PyTree) -> ParamLayout:
    """The :class:`ParamLayout` of ``params`` (same leaf order as ``ravel_pytree``)."""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves: dict[str, slice] = {}
    top: dict[str, list[np.ndarray]] = {}
    start = 0
    for path, leaf in leaves_with_path:
        size = int(np.size(leaf))
        name = "/".join(_key_name(p) for p in path) or "params"
        leaves[name] = slice(start, start + size)
        head = _key_name(path[0]) if path else "params"
        top.setdefault(GROUP_NAMES.get(head, head), []).append(np.arange(start, start + size))
        start += size
    groups = {name: np.concatenate(idx) for name, idx in top.items()}
    for name, sl in leaves.items():
        groups.setdefault(name, np.arange(sl.start, sl.stop))
    return ParamLayout(leaves, groups, start)


# ----------------------------------------------------------------------------- streaming


def _chunk_program(loss_fns: Mapping[str, LossFn], pairs: Sequence[tuple[str, str]]) -> Callable:
    """A function ``(params, keys, mask, x) -> {series: (mean, m2)}`` over one chunk of keys.

    Each replicate evaluates every loss function's gradient on the same key
    (:func:`replicate_gradients`); the series are the flattened gradients of each loss and
    the differences of each pair. ``mask`` marks the real replicates of a padded chunk.
    """
    def program(params, keys, mask, x):
        grads = {name: jax.vmap(lambda g: ravel_pytree(g)[0])(tree)
                 for name, tree in replicate_gradients(loss_fns, params, keys, x).items()}
        series = dict(grads)
        for a, b in pairs:
            series[f"{a}-{b}"] = grads[a] - grads[b]
        return {name: _mean_m2(g, mask) for name, g in series.items()}

    return program


def _balanced_chunk(limit: int, num_replicates: int, multiple: int) -> int:
    """The chunk size, a multiple of ``multiple`` and at most about ``limit``, that splits
    ``num_replicates`` into the fewest, most even chunks (so padding stays small)."""
    limit = max(multiple, min(limit, num_replicates))
    num_chunks = -(-num_replicates // limit)
    chunk = -(-num_replicates // num_chunks)
    return -(-chunk // multiple) * multiple


def _temp_bytes(compiled: Any) -> int | None:
    """Temporary plus output bytes from XLA's memory analysis (``None`` if unavailable)."""
    try:
        stats = compiled.memory_analysis()
        return int(stats.temp_size_in_bytes) + int(stats.output_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def gradient_moments(
    loss_fns: LossFn | Mapping[str, LossFn],
    params: PyTree,
    rng: jax.Array,
    x: PyTree,
    *,
    num_replicates: int,
    pairs: Iterable[tuple[str, str]] = (),
    chunk_size: int | None = None,
    mesh: jax.sharding.Mesh | None | bool = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> dict[str, Moments]:
    """Element-wise mean and variance of gradient estimators over ``R`` replicates.

    Replicate ``r`` draws ``key_r = split(rng, R)[r]`` and evaluates
    ``jax.grad(lambda p: loss_fn(p, key_r, x)[0])(params)`` for every loss function on that
    same key, so the estimators are paired on the same noise. All replicates of a chunk run
    in one jit-compiled ``vmap``; chunks are merged on the host in float64. The keys do not
    depend on the chunk size or the number of devices, so neither changes the result (up
    to floating-point summation order).

    Args:
      loss_fns: one loss function ``(params, rng, x) -> (loss, aux)`` or a mapping
        ``{name: loss_fn}`` evaluated on shared keys.
      params: the parameter pytree at which gradients are taken.
      rng: a PRNG key.
      x: the data batch passed to every loss function.
      num_replicates: ``R``, the number of independent gradient draws.
      pairs: ``(a, b)`` names whose paired difference ``g_a - g_b`` is also summarised
        (returned under the key ``"a-b"``), for bias tests with :func:`paired_t`.
      chunk_size: most replicates per compiled call; ``None`` picks up to 2048, fewer when
        XLA's memory analysis says they would not fit ``memory_budget_bytes``. Chunks are
        evened out and rounded up to a multiple of the number of devices; the last one is
        padded with masked replicates.
      mesh: a :class:`jax.sharding.Mesh` whose axes all shard the replicate axis;
        ``None`` uses every device when there are several, ``False`` disables sharding.
      memory_budget_bytes: memory budget for one chunk's temporaries.

    Returns:
      ``{name: Moments}`` for every loss and every pair; ``mean`` and ``m2`` are ``(P,)``
      float64 arrays in the order of ``jax.flatten_util.ravel_pytree(params)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p, rng, x: (jnp.sum((p - jax.random.normal(rng, p.shape)) ** 2), None)
      >>> m = gradient_moments(loss, jnp.ones(3), jax.random.key(0), None, num_replicates=1000)
      >>> bool(abs(m["loss"].mean - 2.0).max() < 0.2), bool(abs(m["loss"].variance - 4.0).max() < 0.6)
      (True, True)
    """
    if callable(loss_fns):
        loss_fns = {"loss": loss_fns}
    if not loss_fns:
        raise ValueError("loss_fns is empty: pass a loss function or a mapping {name: loss_fn}")
    pairs = tuple((a, b) for a, b in pairs)
    for a, b in pairs:
        for name in (a, b):
            if name not in loss_fns:
                raise ValueError(f"pair ({a!r}, {b!r}) names {name!r}, not one of {sorted(loss_fns)}")
    num_replicates = int(num_replicates)
    if num_replicates < 2:
        raise ValueError(f"num_replicates must be >= 2 to estimate a variance, got {num_replicates}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")

    mesh = replicate_mesh(mesh)
    multiple = 1 if mesh is None else int(np.prod(list(mesh.shape.values())))
    program = _chunk_program(loss_fns, pairs)
    keys = jax.random.split(rng, num_replicates)

    if mesh is not None:
        sharded = jax.sharding.NamedSharding(mesh, jax.P(tuple(mesh.axis_names)))
        replicated = jax.sharding.NamedSharding(mesh, jax.P())
        params = jax.device_put(params, replicated)
        x = jax.device_put(x, replicated)
        jitted = jax.jit(program, in_shardings=(replicated, sharded, sharded, replicated),
                         out_shardings=replicated)
    else:
        sharded = None
        jitted = jax.jit(program)

    def compile_for(chunk):
        key_spec = jax.ShapeDtypeStruct((chunk,), keys.dtype, sharding=sharded)
        mask_spec = jax.ShapeDtypeStruct((chunk,), jnp.bool_, sharding=sharded)
        return jitted.lower(params, key_spec, mask_spec, x).compile()

    if chunk_size is None:
        # compile once at a generous size; shrink (and recompile) only if it would not fit
        chunk_size = _balanced_chunk(MAX_AUTO_CHUNK, num_replicates, multiple)
        compiled = compile_for(chunk_size)
        used = _temp_bytes(compiled)
        if used is not None and used > memory_budget_bytes:
            limit = int(memory_budget_bytes // (used / chunk_size))
            chunk_size = _balanced_chunk(limit - limit % multiple, num_replicates, multiple)
            compiled = compile_for(chunk_size)
    else:
        chunk_size = _balanced_chunk(int(chunk_size), num_replicates, multiple)
        compiled = compile_for(chunk_size)

    num_chunks = -(-num_replicates // chunk_size)
    padded = num_chunks * chunk_size
    mask = jnp.arange(padded) < num_replicates
    if padded > num_replicates:  # pad with (masked) copies of the first keys
        keys = jnp.concatenate([keys] * -(-padded // num_replicates))[:padded]

    totals: dict[str, Moments] = {}
    for c in range(num_chunks):
        sl = slice(c * chunk_size, (c + 1) * chunk_size)
        k, m = keys[sl], mask[sl]
        if sharded is not None:
            k, m = jax.device_put(k, sharded), jax.device_put(m, sharded)
        stats = jax.device_get(compiled(params, k, m, x))
        n = int(min(num_replicates, (c + 1) * chunk_size) - c * chunk_size)
        for name, (mean, m2) in stats.items():
            chunk = Moments(n, np.asarray(mean, np.float64), np.asarray(m2, np.float64))
            totals[name] = totals.get(name, _empty_moments()).merge(chunk)
    return totals


# ----------------------------------------------------------------------------- sweeps


class GridPoint(NamedTuple):
    """One configuration of a :func:`sweep`.

    Attributes:
      setting: the grid entry (an int, or a dict of keyword arguments).
      moments: ``{name: Moments}`` for every loss and pair (see :func:`gradient_moments`).
      snr: ``{name: (P,) array}``; for names in ``mean_reference`` the mean is taken from
        the reference estimator.
      snr_self: ``{name: (P,) array}`` every loss's SNR with its own sample mean.
      seconds: wall time of this configuration (compilation included).
    """

    setting: Any
    moments: dict[str, Moments]
    snr: dict[str, np.ndarray]
    snr_self: dict[str, np.ndarray]
    seconds: float


def sweep(
    make_loss: Callable[..., LossFn | Mapping[str, LossFn]],
    params: PyTree,
    rng: jax.Array,
    x: PyTree,
    *,
    grid: Sequence[int | Mapping[str, Any]],
    num_replicates: int = 10_000,
    pairs: Iterable[tuple[str, str]] = (),
    mean_reference: Mapping[str, str] | None = None,
    chunk_size: int | None = None,
    mesh: jax.sharding.Mesh | None | bool = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    progress: Callable[[Any], None] | None = None,
) -> list[GridPoint]:
    """Gradient SNR of a family of loss functions over a grid of settings.

    For each grid entry ``s``, ``make_loss(s)`` (or ``make_loss(**s)`` when ``s`` is a
    mapping) returns one loss function or ``{name: loss_fn}``; all of them are evaluated on
    ``R`` shared random keys (:func:`gradient_moments`), with the keys of grid entry ``i``
    drawn from ``jax.random.fold_in(rng, i)`` so the grid points are independent.

    When an estimator's own sample mean is swamped by its noise (Rainforth et al.'s IWAE
    inference-network gradient at large ``K``: the true mean is ``O(1/K)`` while the
    standard error of the sample mean is ``O(1/sqrt(K R))``), ``mean_reference={"reparam":
    "dreg"}`` takes ``E[Delta]`` from another estimator that is unbiased for the same
    gradient but has lower variance, as Tucker et al. (2019) do; the variance is always the
    estimator's own.

    Args:
      make_loss: ``setting -> loss_fn`` or ``setting -> {name: loss_fn}``.
      params: parameters at which the gradients are taken.
      rng: a PRNG key.
      x: the data batch.
      grid: settings, e.g. ``[1, 10, 100]`` or ``[{"num_samples": 1}, ...]``.
      num_replicates: ``R`` replicates per setting.
      pairs: paired differences to summarise (see :func:`gradient_moments`).
      mean_reference: ``{name: reference_name}`` (see above).
      chunk_size, mesh, memory_budget_bytes: as in :func:`gradient_moments`.
      progress: called with each finished :class:`GridPoint` (e.g. to advance a tqdm bar).

    Returns:
      one :class:`GridPoint` per grid entry.

    Example:
      >>> import jax, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> params = lg.optimal_params(jax.numpy.zeros(2))
      >>> x = jax.numpy.ones((1, 2))
      >>> make = lambda k: je.iwae(lg.model(), lg.guide(), num_samples=k, estimator="dreg")
      >>> points = sweep(make, params, jax.random.key(0), x, grid=[1, 10], num_replicates=100)
      >>> [p.setting for p in points]
      [1, 10]
    """
    mean_reference = dict(mean_reference or {})
    points = []
    for i, setting in enumerate(grid):
        start = time.perf_counter()
        fns = make_loss(**setting) if isinstance(setting, Mapping) else make_loss(setting)
        if callable(fns):
            fns = {"loss": fns}
        for name, ref in mean_reference.items():
            if name not in fns or ref not in fns:
                raise ValueError(f"mean_reference {name!r} -> {ref!r}: both must be among {sorted(fns)}")
        moments = gradient_moments(fns, params, jax.random.fold_in(rng, i), x,
                                   num_replicates=num_replicates, pairs=pairs, chunk_size=chunk_size,
                                   mesh=mesh, memory_budget_bytes=memory_budget_bytes)
        snr_self = {name: signal_to_noise(m.mean, m.variance) for name, m in moments.items()
                    if name in fns}
        snr = {name: signal_to_noise(moments[mean_reference.get(name, name)].mean, moments[name].variance)
               for name in fns}
        point = GridPoint(setting, moments, snr, snr_self, time.perf_counter() - start)
        points.append(point)
        if progress is not None:
            progress(point)
    return points


def summarize(values: np.ndarray, layout: ParamLayout) -> dict[str, dict[str, float]]:
    """Per-group aggregates of an element-wise statistic: mean, median, min, max."""
    out = {}
    for group, idx in layout.groups.items():
        v = np.asarray(values)[idx]
        out[group] = {"mean": float(np.mean(v)), "median": float(np.median(v)),
                      "min": float(np.min(v)), "max": float(np.max(v))}
    return out


# ----------------------------------------------------------------------------- slopes


class Slope(NamedTuple):
    """Least-squares line ``log y = intercept + slope * log x``.

    ``stderr`` is the standard error of ``slope`` from the scatter of the points about the
    line (``None`` with two points, which a line fits exactly); a two-sided interval at
    confidence ``c`` is ``interval(t)`` with ``t`` the ``(1 + c) / 2`` quantile of Student's
    t with :attr:`dof` degrees of freedom (``scipy.stats.t.ppf``; the app's
    :func:`jaxelbo.app.rainforth.confidence_interval` does this).
    """

    slope: float
    stderr: float | None
    intercept: float
    num_points: int

    @property
    def dof(self) -> int:
        """Degrees of freedom of the residuals, ``num_points - 2``."""
        return self.num_points - 2

    def interval(self, quantile: float) -> tuple[float, float] | None:
        """``(slope - quantile * stderr, slope + quantile * stderr)``; None without a stderr."""
        if self.stderr is None:
            return None
        return self.slope - quantile * self.stderr, self.slope + quantile * self.stderr


def fit_loglog(x: Sequence[float], y: Sequence[float]) -> Slope:
    """Fit ``log y = a + s log x`` by ordinary least squares.

    Points with a non-positive ``x`` or ``y`` (no logarithm) are left out; ``num_points``
    counts those used. The standard error reflects the scatter of the points about the line
    (``n - 2`` degrees of freedom), which includes both Monte Carlo noise in each SNR
    estimate and any curvature (the SNR laws of Rainforth et al. 2018 are asymptotic in ``K``).

    Raises:
      ValueError: fewer than two usable points.

    Example:
      >>> s = fit_loglog([1, 10, 100], [1.0, 3.2, 9.9])
      >>> round(s.slope, 2), s.num_points, s.dof
      (0.5, 3, 1)
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        lx = np.log(np.asarray(x, np.float64))
        ly = np.log(np.asarray(y, np.float64))
    keep = np.isfinite(lx) & np.isfinite(ly)
    lx, ly = lx[keep], ly[keep]
    n = lx.size
    if n < 2:
        raise ValueError(f"fit_loglog needs at least 2 positive points, got {n}")
    xc = lx - lx.mean()
    sxx = float(np.sum(xc**2))
    if sxx == 0.0:
        raise ValueError("fit_loglog needs at least 2 distinct x values")
    slope = float(np.sum(xc * (ly - ly.mean())) / sxx)
    intercept = float(ly.mean() - slope * lx.mean())
    stderr = None
    if n > 2:
        resid = ly - intercept - slope * lx
        stderr = float(np.sqrt(np.sum(resid**2) / (n - 2) / sxx))
    return Slope(slope, stderr, intercept, n)


def geometric_grid(maximum: int, num: int | None = None, minimum: int = 1) -> list[int]:
    """Distinct integers spaced geometrically from ``minimum`` to ``maximum`` (both
    included); by default about four per decade."""
    if minimum < 1 or maximum < minimum:
        raise ValueError(f"need 1 <= minimum <= maximum, got minimum={minimum}, maximum={maximum}")
    if num is None:
        num = max(2, int(round(4 * math.log10(maximum / minimum))) + 1)
    grid = np.unique(np.round(np.geomspace(minimum, maximum, num)).astype(int))
    return [int(v) for v in grid]
