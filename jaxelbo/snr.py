"""Gradient signal-to-noise sweeps (Rainforth et al. 2018; Tucker et al. 2019).

For a stochastic gradient estimator :math:`\\Delta` of one parameter element, the
signal-to-noise ratio is

.. math::

   \\mathrm{SNR} = \\frac{|\\mathbb{E}[\\Delta]|}{\\sqrt{\\mathrm{Var}[\\Delta]}} ,

estimated from ``R`` independent replicates of the whole estimator (each replicate draws
its own ``K`` (or ``M x K``) latent samples). Rainforth et al. (2018) show that for the
IWAE bound the model gradient has ``SNR = O(sqrt(M K))`` while the inference-network
gradient has ``SNR = O(sqrt(M / K))``; Tucker et al. (2019) show that the
doubly-reparameterised (DReG) inference-network gradient recovers ``O(sqrt(M K))``.

This module measures such curves for *any* loss function ``(params, rng, x) -> (loss,
aux)`` whose ``jax.grad`` is the estimator (every jaxelbo objective is one):

* :func:`gradient_moments` computes the element-wise mean and variance of the gradient
  over ``R`` replicates with one jit-compiled, vmapped program per configuration. Several
  loss functions can be evaluated on *the same* random keys (paired replicates), so their
  differences can be tested for bias. Replicates are processed in chunks sized to a
  memory budget and merged on the host in float64 (Chan et al.'s parallel update), and
  each chunk's keys are sharded over the devices of a :class:`jax.sharding.Mesh`.
* :func:`sweep` runs :func:`gradient_moments` over a grid (of ``num_samples``,
  ``num_outer``, or any keyword of the user's loss factory).
* :func:`fit_loglog` fits ``log SNR = a + s log K`` with a Student-t interval on ``s``.
* :func:`linear_gaussian_problem` and :func:`rainforth_experiment` reproduce the
  linear-Gaussian experiment of both papers (used by ``jaxelbo snr``).

References:
  Rainforth, Kosiorek, Le, Maddison, Igl, Wood, Teh (2018). Tighter Variational Bounds
  are Not Necessarily Better. ICML. arXiv:1802.04537.
  Tucker, Lawson, Gu, Maddison (2019). Doubly Reparameterized Gradient Estimators for
  Monte Carlo Objectives. ICLR. arXiv:1810.04152.
  Chan, Golub, LeVeque (1979). Updating formulae and a pairwise algorithm for computing
  sample variances.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, PyTree], tuple[jax.Array, Any]]

DEFAULT_MEMORY_BUDGET_BYTES = 512 * 2**20
MAX_AUTO_CHUNK = 2048  # replicates per compiled call when memory allows; larger gains little
GROUP_NAMES = {"model": "theta", "guide": "phi"}

__all__ = [
    "GridPoint",
    "Moments",
    "ParamLayout",
    "Slope",
    "fit_loglog",
    "geometric_grid",
    "gradient_moments",
    "linear_gaussian_problem",
    "param_layout",
    "paired_t",
    "rainforth_experiment",
    "signal_to_noise",
    "summarize",
    "sweep",
]


# ----------------------------------------------------------------------------- moments


class Moments(NamedTuple):
    """Streaming element-wise moments of ``count`` vectors (float64 on the host).

    Attributes:
      count: number of replicates.
      mean: ``(P,)`` sample mean.
      m2: ``(P,)`` sum of squared deviations from the mean, ``sum_r (g_r - mean)^2``.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def variance(self) -> np.ndarray:
        """Unbiased sample variance ``m2 / (count - 1)``."""
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


def signal_to_noise(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Element-wise ``|mean| / sqrt(variance)``; ``0`` where both are zero, ``inf`` where only
    the variance is."""
    mean = np.abs(np.asarray(mean, np.float64))
    std = np.sqrt(np.asarray(variance, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = mean / std
    return np.where((std == 0) & (mean == 0), 0.0, out)


def paired_t(diff: Moments) -> np.ndarray:
    """Element-wise paired t-statistic ``mean(d) / (std(d) / sqrt(R))`` of differences
    ``d = g_a - g_b`` computed on the same random keys (``0`` where ``d`` is identically 0)."""
    return signal_to_noise(diff.mean, diff.variance) * np.sign(diff.mean) * math.sqrt(diff.count)


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


# ----------------------------------------------------------------------------- the program


def _replicate_mesh(mesh: jax.sharding.Mesh | None | bool) -> jax.sharding.Mesh | None:
    """``None`` -> a 1-D mesh over every device when there are several; ``False`` -> none."""
    if mesh is False:
        return None
    if mesh is None:
        devices = jax.devices()
        if len(devices) == 1:
            return None
        return jax.make_mesh((len(devices),), ("replicates",),
                             axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    return mesh


def _chunk_program(loss_fns: Mapping[str, LossFn], pairs: Sequence[tuple[str, str]]) -> Callable:
    """A function ``(params, keys, mask, x) -> {series: (mean, m2)}`` over one chunk of keys.

    Each replicate evaluates every loss function's gradient on the same key; the series are
    the flattened gradients of each loss and the differences of each pair. ``mask`` marks the
    real replicates of a padded chunk.
    """
    names = tuple(loss_fns)

    def gradients(params, key, x):
        out = {}
        for name in names:
            grad = jax.grad(lambda p, fn=loss_fns[name]: fn(p, key, x)[0])(params)
            out[name] = ravel_pytree(grad)[0]
        return out

    def program(params, keys, mask, x):
        grads = jax.vmap(gradients, in_axes=(None, 0, None))(params, keys, x)
        series = dict(grads)
        for a, b in pairs:
            series[f"{a}-{b}"] = grads[a] - grads[b]
        stats = {}
        for name, g in series.items():
            w = mask.astype(g.dtype)[:, None]
            n = jnp.sum(w)
            mean = jnp.sum(w * g, axis=0) / n
            m2 = jnp.sum(w * (g - mean) ** 2, axis=0)
            stats[name] = (mean, m2)
        return stats

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
    pairs = tuple(tuple(p) for p in pairs)
    for a, b in pairs:
        for name in (a, b):
            if name not in loss_fns:
                raise ValueError(f"pair ({a!r}, {b!r}) names {name!r}, not one of {sorted(loss_fns)}")
    num_replicates = int(num_replicates)
    if num_replicates < 2:
        raise ValueError(f"num_replicates must be >= 2 to estimate a variance, got {num_replicates}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")

    mesh = _replicate_mesh(mesh)
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
    """Least-squares line ``log y = intercept + slope * log x`` with a two-sided interval."""

    slope: float
    stderr: float
    ci_low: float
    ci_high: float
    intercept: float
    num_points: int
    confidence: float


def _student_t_quantile(p: float, dof: int) -> float:
    """Quantile of Student's t with ``dof`` degrees of freedom, by bisection on its CDF
    ``F(t) = 1 - I_{dof / (dof + t^2)}(dof / 2, 1 / 2) / 2`` for ``t > 0``."""
    if p <= 0.5:
        return -_student_t_quantile(1 - p, dof) if p < 0.5 else 0.0

    def cdf(t):
        xb = dof / (dof + t * t)
        return 1.0 - 0.5 * float(jax.scipy.special.betainc(dof / 2.0, 0.5, xb))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return 0.5 * (lo + hi)


def fit_loglog(x: Sequence[float], y: Sequence[float], *, confidence: float = 0.95) -> Slope:
    """Fit ``log y = a + s log x`` by ordinary least squares; ``s`` with a Student-t interval.

    The interval reflects the scatter of the points about the line (``n - 2`` degrees of
    freedom), which includes both Monte Carlo noise in each SNR estimate and any curvature
    (the SNR laws of Rainforth et al. 2018 are asymptotic in ``K``).

    Example:
      >>> s = fit_loglog([1, 10, 100], [1.0, 3.2, 9.9])
      >>> round(s.slope, 2)
      0.5
    """
    lx = np.log(np.asarray(x, np.float64))
    ly = np.log(np.asarray(y, np.float64))
    keep = np.isfinite(lx) & np.isfinite(ly)
    lx, ly = lx[keep], ly[keep]
    n = lx.size
    if n < 2:
        raise ValueError(f"fit_loglog needs at least 2 positive points, got {n}")
    xc = lx - lx.mean()
    sxx = float(np.sum(xc**2))
    slope = float(np.sum(xc * (ly - ly.mean())) / sxx)
    intercept = float(ly.mean() - slope * lx.mean())
    if n > 2:
        resid = ly - intercept - slope * lx
        stderr = float(np.sqrt(np.sum(resid**2) / (n - 2) / sxx))
        half = _student_t_quantile(0.5 + confidence / 2, n - 2) * stderr
    else:
        stderr, half = float("nan"), float("nan")
    return Slope(slope, stderr, slope - half, slope + half, intercept, n, confidence)


def geometric_grid(maximum: int, num: int | None = None, minimum: int = 1) -> list[int]:
    """Distinct integers spaced geometrically from ``minimum`` to ``maximum`` (both
    included); by default about four per decade."""
    if minimum < 1 or maximum < minimum:
        raise ValueError(f"need 1 <= minimum <= maximum, got minimum={minimum}, maximum={maximum}")
    if num is None:
        num = max(2, int(round(4 * math.log10(maximum / minimum))) + 1)
    grid = np.unique(np.round(np.geomspace(minimum, maximum, num)).astype(int))
    return [int(v) for v in grid]


# ----------------------------------------------------------------------------- the experiment


class LinearGaussianProblem(NamedTuple):
    """The linear-Gaussian SNR problem of Rainforth et al. (2018)."""

    model: Any
    guide: Any
    params: PyTree
    x: jax.Array  # the batch the gradient is taken on
    data: jax.Array  # all N points
    mu_true: jax.Array
    scale: float


def linear_gaussian_problem(rng: jax.Array, *, dim: int = 20, num_points: int = 1024,
                            batch_size: int = 1, scale: float = math.sqrt(2.0 / 3.0),
                            noise: float = 0.01) -> LinearGaussianProblem:
    """Rainforth et al.'s setting: ``mu ~ N(0, I_D)``; ``N`` points from ``p(x) = N(mu, 2I)``;
    the guide ``N(Ax + b, scale^2 I)`` with ``scale`` fixed at ``sqrt(2/3)``; parameters at
    the optimum (``mu`` = data mean, ``A = I/2``, ``b = mu/2``) plus ``N(0, noise^2)``
    noise on every element. The gradient is taken on the first ``batch_size`` points.
    """
    from jaxelbo.models import linear_gaussian as lg

    if batch_size < 1 or batch_size > num_points:
        raise ValueError(f"batch_size must be in [1, num_points={num_points}], got {batch_size}")

    @jax.jit  # one compiled program instead of one per eager random call
    def draw(rng):
        k_mu, k_data, k_noise = jax.random.split(rng, 3)
        mu_true = jax.random.normal(k_mu, (dim,))
        data = lg.sample_data(k_data, mu_true, num_points)
        params = lg.optimal_params(jnp.mean(data, axis=0), scale=scale)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        noise_keys = jax.random.split(k_noise, len(leaves))
        leaves = [leaf + noise * jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf))
                  for leaf, k in zip(leaves, noise_keys, strict=True)]
        return mu_true, data, jax.tree_util.tree_unflatten(treedef, leaves)

    mu_true, data, params = draw(rng)
    return LinearGaussianProblem(lg.model(), lg.guide(scale=scale), params, data[:batch_size], data,
                                 mu_true, scale)


ESTIMATOR_LABELS = {"reparam": "IWAE (reparam)", "stl": "STL", "dreg": "DReG"}
EXPECTED_SLOPES = {
    ("num_samples", "reparam", "theta"): 0.5,
    ("num_samples", "reparam", "phi"): -0.5,
    ("num_samples", "dreg", "phi"): 0.5,
    **{("num_outer", e, g): 0.5 for e in ("reparam", "stl", "dreg") for g in ("theta", "phi")},
}


def _point_record(point: GridPoint, layout: ParamLayout, axis: str, extra: Mapping[str, Any],
                  mean_reference: Mapping[str, str]) -> dict[str, Any]:
    rec: dict[str, Any] = {axis: point.setting, **extra, "seconds": point.seconds,
                           "estimators": {}, "pairs": {}}
    for name, snr in point.snr.items():
        m = point.moments[name]
        rec["estimators"][name] = {
            "snr": summarize(snr, layout),
            "snr_own_mean": summarize(point.snr_self[name], layout),
            "mean_from": mean_reference.get(name, name),
            "total_variance": {g: float(np.sum(m.variance[idx])) for g, idx in layout.groups.items()},
        }
    for name, m in point.moments.items():
        if name in point.snr:
            continue
        t = paired_t(m)
        ref = point.moments[name.split("-", 1)[1]]
        ms_diff = m.m2 / m.count + m.mean**2  # E[d^2] per element
        ms_ref = ref.m2 / ref.count + ref.mean**2
        rec["pairs"][name] = {
            g: {"rms_t": float(np.sqrt(np.mean(t[idx] ** 2))), "max_abs_t": float(np.max(np.abs(t[idx]))),
                "mean_t": float(np.mean(t[idx])), "frac_abs_t_gt_3": float(np.mean(np.abs(t[idx]) > 3)),
                "relative_rms_difference": float(np.sqrt(np.sum(ms_diff[idx]) / np.sum(ms_ref[idx]))),
                "identical": bool(np.all(m.mean[idx] == 0) and np.all(m.m2[idx] == 0))}
            for g, idx in layout.groups.items()
        }
    return rec


def rainforth_experiment(
    *,
    seed: int = 0,
    num_replicates: int = 10_000,
    k_grid: Sequence[int] = (1, 2, 3, 6, 10, 18, 32, 56, 100, 178, 316, 562, 1000),
    m_grid: Sequence[int] = (1, 2, 3, 6, 10, 18, 32, 56, 100),
    num_inner: int = 10,
    estimators: Sequence[str] = ("reparam", "stl", "dreg"),
    dim: int = 20,
    num_points: int = 1024,
    batch_size: int = 1,
    noise: float = 0.01,
    fit_min: int = 100,
    chunk_size: int | None = None,
    mesh: jax.sharding.Mesh | None | bool = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    progress: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    """Reproduce the SNR-versus-K and SNR-versus-M experiments of Rainforth et al. (2018)
    with the estimators of Tucker et al. (2019) on the linear-Gaussian toy.

    ``K`` sweep: ``je.iwae(num_samples=K, estimator=e)``; ``M`` sweep:
    ``je.miwae(num_outer=M, num_inner=num_inner, estimator=e)``. All estimators of one
    configuration share their random keys. ``reparam``'s mean is taken from ``dreg`` (both
    are unbiased for the gradient of the same bound) when both are swept. Slopes of the
    element-mean SNR are fitted on ``K >= fit_min`` (the SNR laws are asymptotic in ``K``;
    DReG's local slope is still rising towards 0.5 below ``K ~ 100``), and on the whole ``M``
    grid (in ``M`` the law is exact: MIWAE averages ``M`` independent IWAE gradients).

    Returns:
      a JSON-serialisable dict: ``settings``, ``k_sweep`` and ``m_sweep`` (one record per
      setting, every SNR summary, total variances and paired t-statistics), ``slopes``
      (``{"num_samples"|"num_outer": {estimator: {group: Slope fields + expected}}}``),
      ``checks`` (variance ordering and bias tests) and ``seconds``.
    """
    import jaxelbo as je

    for e in estimators:
        if e not in ("reparam", "stl", "dreg"):
            raise ValueError(f"estimator {e!r} not supported by the SNR sweep; valid: reparam, stl, dreg")
    problem = linear_gaussian_problem(jax.random.key(seed), dim=dim, num_points=num_points,
                                      batch_size=batch_size, noise=noise)
    layout = param_layout(problem.params)
    estimators = tuple(estimators)
    pairs = [p for p in (("stl", "dreg"), ("dreg", "reparam")) if p[0] in estimators and p[1] in estimators]
    mean_reference = {"reparam": "dreg"} if {"reparam", "dreg"} <= set(estimators) else {}
    start = time.perf_counter()

    def make_iwae(num_samples):
        return {e: je.iwae(problem.model, problem.guide, num_samples=num_samples, estimator=e)
                for e in estimators}

    def make_miwae(num_outer):
        return {e: je.miwae(problem.model, problem.guide, num_outer=num_outer, num_inner=num_inner,
                            estimator=e) for e in estimators}

    common = dict(num_replicates=num_replicates, pairs=pairs, mean_reference=mean_reference,
                  chunk_size=chunk_size, mesh=mesh, memory_budget_bytes=memory_budget_bytes)
    rng = jax.random.key(seed + 1)
    k_points = sweep(make_iwae, problem.params, jax.random.fold_in(rng, 0), problem.x, grid=list(k_grid),
                     progress=None if progress is None else (lambda p: progress("num_samples", p.setting)),
                     **common)
    m_points = sweep(make_miwae, problem.params, jax.random.fold_in(rng, 1), problem.x, grid=list(m_grid),
                     progress=None if progress is None else (lambda p: progress("num_outer", p.setting)),
                     **common)

    k_records = [_point_record(p, layout, "num_samples", {}, mean_reference) for p in k_points]
    m_records = [_point_record(p, layout, "num_outer", {"num_inner": num_inner}, mean_reference)
                 for p in m_points]

    slopes = {"num_samples": _slopes(k_records, "num_samples", estimators, fit_min),
              "num_outer": _slopes(m_records, "num_outer", estimators, 1)}

    checks = _checks(k_records, estimators)
    return {
        "settings": {
            "seed": seed, "num_replicates": num_replicates, "k_grid": list(k_grid), "m_grid": list(m_grid),
            "num_inner": num_inner, "estimators": list(estimators), "dim": dim, "num_points": num_points,
            "batch_size": batch_size, "guide_scale": problem.scale, "param_noise": noise, "fit_min": fit_min,
            "chunk_size": chunk_size, "memory_budget_bytes": memory_budget_bytes,
            "num_devices": 1 if _replicate_mesh(mesh) is None else int(np.prod(list(_replicate_mesh(mesh)
                                                                                     .shape.values()))),
            "mean_reference": mean_reference,
            "aggregate": "SNR per element |E[g]| / std[g]; 'mean' is the mean over the group's elements",
            "params": {name: [sl.start, sl.stop] for name, sl in layout.leaves.items()},
        },
        "k_sweep": k_records,
        "m_sweep": m_records,
        "slopes": slopes,
        "checks": checks,
        "seconds": time.perf_counter() - start,
    }


def _slopes(records: list[dict[str, Any]], axis: str, estimators: Sequence[str],
            fit_min: int) -> dict[str, Any]:
    """Log-log slopes of the element-mean SNR per estimator and group: on ``setting >= fit_min``
    (the headline number) and, under ``"whole_grid"``, on every setting."""
    out: dict[str, Any] = {}
    for e in estimators:
        out[e] = {}
        for g in ("theta", "phi"):
            fits = {}
            for label, lo in (("fit", fit_min), ("whole_grid", 1)):
                xs = [r[axis] for r in records if r[axis] >= lo]
                ys = [r["estimators"][e]["snr"][g]["mean"] for r in records if r[axis] >= lo]
                if len(xs) >= 2:
                    fits[label] = {**fit_loglog(xs, ys)._asdict(), "fit_range": [min(xs), max(xs)]}
            if "fit" in fits:
                out[e][g] = {**fits["fit"], "expected": EXPECTED_SLOPES.get((axis, e, g)),
                             "whole_grid": fits.get("whole_grid")}
    return out


def _checks(k_records: list[dict[str, Any]], estimators: Sequence[str]) -> dict[str, Any]:
    """Variance ordering DReG < STL < IWAE for phi at every K > 1, and the paired bias tests."""
    out: dict[str, Any] = {}
    if {"reparam", "stl", "dreg"} <= set(estimators):
        rows = []
        for r in k_records:
            v = {e: r["estimators"][e]["total_variance"]["phi"] for e in ("dreg", "stl", "reparam")}
            rows.append({"num_samples": r["num_samples"], **v,
                         "ordered": bool(v["dreg"] < v["stl"] < v["reparam"])})
        out["phi_variance_ordering"] = {
            "claim": "total phi variance dreg < stl < reparam for every K > 1",
            "holds": all(row["ordered"] for row in rows if row["num_samples"] > 1),
            "per_k": rows,
        }
    claims = {"stl-dreg": "STL is biased for K > 1: the paired mean of STL - DReG differs from 0",
              "dreg-reparam": "DReG is unbiased: the paired mean of DReG - IWAE is 0 (rms t ~ 1)"}
    for name, claim in claims.items():
        if all(name in r["pairs"] for r in k_records):
            per_k = [{"num_samples": r["num_samples"], **r["pairs"][name]["phi"]} for r in k_records]
            out[name] = {"claim": claim, "per_k": per_k}
    return out
