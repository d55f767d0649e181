"""The gradient-SNR experiment of Rainforth et al. (2018) with the estimators of Tucker et al. (2019).

On the linear-Gaussian toy, sweep ``K`` (IWAE with ``reparam``, ``stl`` and ``dreg``) and
``M`` (MIWAE at fixed ``K``), ``R`` replicates per setting with the engine
:mod:`jaxelbo.snr`, then fit log-log slopes, check the variance ordering and the paired bias
tests, and write ``snr.json``, ``snr.csv``, ``snr.md``, ``snr.png`` and ``snr_m.png``.
``jaxelbo snr`` and ``benchmarks/snr.py`` run it; notebooks 04 and 05 use its problem.

The result is a tree of typed records (:class:`Result` down to :class:`GroupSummary`);
:meth:`Result.to_json` and :meth:`Result.from_json` convert it to and from ``snr.json``.

References:
  Rainforth, Kosiorek, Le, Maddison, Igl, Wood, Teh (2018). Tighter Variational Bounds
  are Not Necessarily Better. ICML. arXiv:1802.04537.
  Tucker, Lawson, Gu, Maddison (2019). Doubly Reparameterized Gradient Estimators for
  Monte Carlo Objectives. ICLR. arXiv:1810.04152.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxelbo as je
from jaxelbo import snr
from jaxelbo.models import linear_gaussian as lg

# ----------------------------------------------------------------------------- constants

ESTIMATORS = ("reparam", "stl", "dreg")
#: further K-sweep estimators, each about its own objective's gradient: JVI-DReG (``je.jvi``,
#: K >= 2) and DReG(alpha) with Tucker et al.'s alpha = 0.9 (``je.rws(alpha=0.9)``). They have
#: no M x K form, so the M sweep runs only the IWAE estimators among those chosen.
FRONTIER_ESTIMATORS = ("jvi-dreg", "dreg-alpha")
SWEEP_ESTIMATORS = ESTIMATORS + FRONTIER_ESTIMATORS
DREG_ALPHA = 0.9
DEFAULT_K_GRID = (1, 2, 3, 6, 10, 18, 32, 56, 100, 178, 316, 562, 1000)
DEFAULT_M_GRID = (1, 2, 3, 6, 10, 18, 32, 56, 100)
DEFAULT_NUM_INNER = 10
DEFAULT_FIT_MIN = 100
DEFAULT_NUM_REPLICATES = 10_000
#: the sizes of ``jaxelbo snr --fast``
FAST = {"num_replicates": 1000, "max_num_samples": 316, "max_num_outer": 32}
CONFIDENCE = 0.95
AXES = {"num_samples": "K", "num_outer": "M"}
LABELS = {"reparam": "IWAE (reparam)", "stl": "STL", "dreg": "DReG", "jvi-dreg": "JVI-DReG",
          "dreg-alpha": f"DReG(alpha = {DREG_ALPHA})"}
COLORS = {"reparam": "tab:red", "stl": "tab:blue", "dreg": "tab:green", "jvi-dreg": "tab:purple",
          "dreg-alpha": "tab:orange"}
MARKERS = {"reparam": "o", "stl": "s", "dreg": "^", "jvi-dreg": "D", "dreg-alpha": "v"}
#: theory's slopes of log SNR, per (sweep axis, estimator, group); STL's phi slope in K is
#: not predicted (it is biased)
EXPECTED_SLOPES = {
    **{("num_samples", e, "theta"): 0.5 for e in ESTIMATORS},
    ("num_samples", "reparam", "phi"): -0.5,
    ("num_samples", "dreg", "phi"): 0.5,
    **{("num_outer", e, g): 0.5 for e in ESTIMATORS for g in ("theta", "phi")},
}
BIAS_CLAIMS = {"stl-dreg": "STL is biased for K > 1: the paired mean of STL - DReG differs from 0",
               "dreg-reparam": "DReG is unbiased: the paired mean of DReG - IWAE is 0 (rms t ~ 1)"}


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class GroupSummary:
    """An element-wise statistic aggregated over one parameter group (``theta``, ``phi``, a leaf)."""

    mean: float
    median: float
    min: float
    max: float


@dataclasses.dataclass(frozen=True)
class EstimatorRecord:
    """One estimator at one setting: its SNR (mean from ``mean_from``), its SNR with its own
    sample mean, and the total variance of each group."""

    snr: dict[str, GroupSummary]
    snr_own_mean: dict[str, GroupSummary]
    mean_from: str
    total_variance: dict[str, float]


@dataclasses.dataclass(frozen=True)
class PairStats:
    """Paired difference ``a - b`` of two estimators on the same keys, over one group."""

    rms_t: float
    max_abs_t: float
    mean_t: float
    frac_abs_t_gt_3: float
    relative_rms_difference: float
    identical: bool


@dataclasses.dataclass(frozen=True)
class PointRecord:
    """One setting of a sweep: ``num_samples`` (K sweep) or ``num_outer`` x ``num_inner`` (M sweep)."""

    seconds: float
    estimators: dict[str, EstimatorRecord]
    pairs: dict[str, dict[str, PairStats]]
    num_samples: int | None = None
    num_outer: int | None = None
    num_inner: int | None = None

    def setting(self, axis: str) -> int:
        return getattr(self, axis)


@dataclasses.dataclass(frozen=True)
class SlopeFit:
    """A log-log slope of the element-mean SNR with its ``confidence`` t-interval (None when
    the fit has two points), the settings it used, theory's value, and the whole-grid fit."""

    slope: float
    stderr: float | None
    ci_low: float | None
    ci_high: float | None
    intercept: float
    num_points: int
    confidence: float
    fit_range: list[int]
    expected: float | None = None
    whole_grid: SlopeFit | None = None


@dataclasses.dataclass(frozen=True)
class VarianceRow:
    num_samples: int
    dreg: float
    stl: float
    reparam: float
    ordered: bool


@dataclasses.dataclass(frozen=True)
class VarianceOrdering:
    claim: str
    holds: bool
    per_k: list[VarianceRow]


@dataclasses.dataclass(frozen=True)
class BiasRow:
    num_samples: int
    rms_t: float
    max_abs_t: float
    mean_t: float
    frac_abs_t_gt_3: float
    relative_rms_difference: float
    identical: bool


@dataclasses.dataclass(frozen=True)
class BiasTest:
    claim: str
    per_k: list[BiasRow]


@dataclasses.dataclass(frozen=True)
class Checks:
    """The variance ordering DReG < STL < IWAE and the two paired bias tests (each None when
    the estimators it needs were not swept)."""

    phi_variance_ordering: VarianceOrdering | None = None
    stl_dreg: BiasTest | None = dataclasses.field(default=None, metadata={"json": "stl-dreg"})
    dreg_reparam: BiasTest | None = dataclasses.field(default=None, metadata={"json": "dreg-reparam"})

    def bias_test(self, pair: str) -> BiasTest | None:
        return {"stl-dreg": self.stl_dreg, "dreg-reparam": self.dreg_reparam}.get(pair)


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int
    num_replicates: int
    k_grid: list[int]
    m_grid: list[int]
    num_inner: int
    estimators: list[str]
    dim: int
    num_points: int
    batch_size: int
    guide_scale: float
    param_noise: float
    fit_min: int
    chunk_size: int | None
    memory_budget_bytes: int
    num_devices: int
    mean_reference: dict[str, str]
    aggregate: str
    params: dict[str, list[int]]


@dataclasses.dataclass(frozen=True)
class Result:
    """Everything the experiment measured; ``notes`` say what could not be fitted and why."""

    settings: Settings
    k_sweep: list[PointRecord]
    m_sweep: list[PointRecord]
    slopes: dict[str, dict[str, dict[str, SlopeFit]]]
    checks: Checks
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    wall_seconds: float | None = None
    environment: dict[str, Any] | None = None
    partial: bool = False  # an interrupted sweep: only the settings that finished

    def sweep(self, axis: str) -> list[PointRecord]:
        return self.k_sweep if axis == "num_samples" else self.m_sweep

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the layout of ``snr.json``)."""
        return _to_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Result:
        """The record tree back from :meth:`to_json` (or from an ``snr.json`` file's contents)."""
        return _from_json(cls, data)


def _to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.metadata.get("json", f.name): _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_json(tp: Any, data: Any) -> Any:
    if data is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_json(inner, data)
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        return {k: _from_json(value_tp, v) for k, v in data.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        return [_from_json(item_tp, v) for v in data]
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            key = f.metadata.get("json", f.name)
            if key in data:
                kwargs[f.name] = _from_json(hints[f.name], data[key])
        return typing.cast(type, tp)(**kwargs)
    return data


# ----------------------------------------------------------------------------- the problem


class LinearGaussianProblem(NamedTuple):
    """The linear-Gaussian SNR problem of Rainforth et al. (2018)."""

    model: je.Model
    guide: je.Guide
    params: dict
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

    Example:
      >>> import jax
      >>> problem = linear_gaussian_problem(jax.random.key(0), dim=3, num_points=8)
      >>> problem.x.shape, sorted(problem.params["guide"])
      ((1, 3), ['A', 'b'])
    """
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


# ----------------------------------------------------------------------------- the experiment


def _summary(values: np.ndarray, layout: snr.ParamLayout) -> dict[str, GroupSummary]:
    return {g: GroupSummary(**s) for g, s in snr.summarize(values, layout).items()}


def _point_record(point: snr.GridPoint, layout: snr.ParamLayout, axis: str, num_inner: int | None,
                  mean_reference: Mapping[str, str]) -> PointRecord:
    estimators = {}
    for name, values in point.snr.items():
        m = point.moments[name]
        estimators[name] = EstimatorRecord(
            snr=_summary(values, layout), snr_own_mean=_summary(point.snr_self[name], layout),
            mean_from=mean_reference.get(name, name),
            total_variance={g: float(np.sum(m.variance[idx])) for g, idx in layout.groups.items()})
    pairs = {}
    for name, m in point.moments.items():
        if name in point.snr:
            continue
        t = snr.paired_t(m)
        ref = point.moments[name.split("-", 1)[1]]
        ms_diff = m.m2 / m.count + m.mean**2  # E[d^2] per element
        ms_ref = ref.m2 / ref.count + ref.mean**2
        pairs[name] = {
            g: PairStats(rms_t=float(np.sqrt(np.mean(t[idx] ** 2))), max_abs_t=float(np.max(np.abs(t[idx]))),
                         mean_t=float(np.mean(t[idx])), frac_abs_t_gt_3=float(np.mean(np.abs(t[idx]) > 3)),
                         relative_rms_difference=float(np.sqrt(np.sum(ms_diff[idx]) / np.sum(ms_ref[idx]))),
                         identical=bool(np.all(m.mean[idx] == 0) and np.all(m.m2[idx] == 0)))
            for g, idx in layout.groups.items()}
    return PointRecord(seconds=point.seconds, estimators=estimators, pairs=pairs,
                       **{axis: point.setting}, num_inner=num_inner)


def rainforth_experiment(
    *,
    seed: int = 0,
    num_replicates: int = DEFAULT_NUM_REPLICATES,
    k_grid: Sequence[int] = DEFAULT_K_GRID,
    m_grid: Sequence[int] = DEFAULT_M_GRID,
    num_inner: int = DEFAULT_NUM_INNER,
    estimators: Sequence[str] = ESTIMATORS,
    dim: int = 20,
    num_points: int = 1024,
    batch_size: int = 1,
    noise: float = 0.01,
    fit_min: int = DEFAULT_FIT_MIN,
    chunk_size: int | None = None,
    mesh: jax.sharding.Mesh | None | bool = None,
    memory_budget_bytes: int = snr.DEFAULT_MEMORY_BUDGET_BYTES,
    progress: Callable[[str, int], None] | None = None,
    on_partial: Callable[[Result], None] | None = None,
) -> Result:
    """Reproduce the SNR-versus-K and SNR-versus-M experiments of Rainforth et al. (2018)
    with the estimators of Tucker et al. (2019) on the linear-Gaussian toy.

    ``K`` sweep: ``je.iwae(num_samples=K, estimator=e)``; ``M`` sweep:
    ``je.miwae(num_outer=M, num_inner=num_inner, estimator=e)``. All estimators of one
    configuration share their random keys. ``reparam``'s mean is taken from ``dreg`` (both
    are unbiased for the gradient of the same bound) when both are swept. Slopes of the
    element-mean SNR are fitted on ``K >= fit_min`` (the SNR laws are asymptotic in ``K``;
    DReG's local slope is still rising towards 0.5 below ``K ~ 100``) and on the whole ``M``
    grid (in ``M`` the law is exact: MIWAE averages ``M`` independent IWAE gradients); see
    :func:`fit_slopes` for grids too small for that.

    Args:
      progress: called as ``progress(axis, setting)`` after each setting.
      on_partial: called after each setting but the last with the :class:`Result` of the
        settings finished so far (``partial=True``, a note says how many), e.g. to save it
        so that an interrupted sweep keeps its finished settings.
      mesh, chunk_size, memory_budget_bytes: as in :func:`jaxelbo.snr.gradient_moments`.

    Returns:
      a :class:`Result`.
    """
    estimators = tuple(dict.fromkeys(estimators))
    for e in estimators:
        if e not in SWEEP_ESTIMATORS:
            raise ValueError(f"estimator {e!r} not supported by the SNR sweep; valid choices: "
                             f"{', '.join(SWEEP_ESTIMATORS)}")
    m_estimators = tuple(e for e in estimators if e in ESTIMATORS)
    dropped = [k for k in k_grid if k < 2] if "jvi-dreg" in estimators else []
    if dropped:
        k_grid = [k for k in k_grid if k >= 2]
        if not k_grid:
            raise ValueError("jvi-dreg needs K >= 2 (the jackknife leaves one sample out); the K grid has none")
    problem = linear_gaussian_problem(jax.random.key(seed), dim=dim, num_points=num_points,
                                      batch_size=batch_size, noise=noise)
    layout = snr.param_layout(problem.params)
    pairs = [p for p in (("stl", "dreg"), ("dreg", "reparam")) if p[0] in estimators and p[1] in estimators]
    mean_reference = {"reparam": "dreg"} if {"reparam", "dreg"} <= set(estimators) else {}
    start = time.perf_counter()

    def make_one(e, num_samples):
        if e == "jvi-dreg":
            return je.jvi(problem.model, problem.guide, num_samples=num_samples, estimator="dreg")
        if e == "dreg-alpha":
            return je.rws(problem.model, problem.guide, num_samples=num_samples, estimator="dreg", alpha=DREG_ALPHA)
        return je.iwae(problem.model, problem.guide, num_samples=num_samples, estimator=e)

    def make_iwae(num_samples):
        return {e: make_one(e, num_samples) for e in estimators}

    def make_miwae(num_outer):
        return {e: je.miwae(problem.model, problem.guide, num_outer=num_outer, num_inner=num_inner,
                            estimator=e) for e in m_estimators}

    common: dict[str, Any] = dict(num_replicates=num_replicates, pairs=pairs, mean_reference=mean_reference,
                                  chunk_size=chunk_size, mesh=mesh, memory_budget_bytes=memory_budget_bytes)
    rng = jax.random.key(seed + 1)
    sweeps: dict[str, list[PointRecord]] = {"num_samples": [], "num_outer": []}
    total = len(k_grid) + (len(m_grid) if m_estimators else 0)

    def finished(point, axis):
        sweeps[axis].append(_point_record(point, layout, axis, num_inner if axis == "num_outer" else None,
                                          mean_reference))
        if progress is not None:
            progress(axis, point.setting)
        done = len(sweeps["num_samples"]) + len(sweeps["num_outer"])
        if on_partial is not None and done < total:
            on_partial(assemble(f"partial: {done} of {total} settings finished (the sweep was stopped)"))

    def assemble(partial_note=None):
        notes: list[str] = [partial_note] if partial_note else []
        if dropped:
            notes.append(f"K sweep: K = {', '.join(map(str, dropped))} left out (jvi-dreg needs K >= 2)")
        slopes = {"num_samples": fit_slopes(sweeps["num_samples"], "num_samples", estimators, fit_min, notes),
                  "num_outer": fit_slopes(sweeps["num_outer"], "num_outer", m_estimators, 1, notes)}
        return Result(settings=settings, k_sweep=list(sweeps["num_samples"]), m_sweep=list(sweeps["num_outer"]),
                      slopes=slopes, checks=checks(sweeps["num_samples"], estimators),
                      seconds=time.perf_counter() - start, notes=notes, partial=partial_note is not None)

    resolved_mesh = snr.replicate_mesh(mesh)
    settings = Settings(
        seed=seed, num_replicates=num_replicates, k_grid=list(k_grid), m_grid=list(m_grid), num_inner=num_inner,
        estimators=list(estimators), dim=dim, num_points=num_points, batch_size=batch_size,
        guide_scale=problem.scale, param_noise=noise, fit_min=fit_min, chunk_size=chunk_size,
        memory_budget_bytes=memory_budget_bytes,
        num_devices=1 if resolved_mesh is None else int(resolved_mesh.devices.size),
        mean_reference=mean_reference,
        aggregate="SNR per element |E[g]| / std[g]; 'mean' is the mean over the group's elements",
        params={name: [sl.start, sl.stop] for name, sl in layout.leaves.items()})
    for i, (axis, make, grid) in enumerate((("num_samples", make_iwae, k_grid), ("num_outer", make_miwae, m_grid))):
        if axis == "num_outer" and not m_estimators:
            continue
        snr.sweep(make, problem.params, jax.random.fold_in(rng, i), problem.x, grid=list(grid),
                  progress=functools.partial(finished, axis=axis), **common)
    return assemble()


def confidence_interval(fit: snr.Slope, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The two-sided Student-t interval of a :class:`jaxelbo.snr.Slope` (None with two points)."""
    from scipy import stats

    if fit.stderr is None:
        return None
    return fit.interval(float(stats.t.ppf(0.5 + confidence / 2, fit.dof)))


def _slope_fit(xs: list[int], ys: list[float], expected: float | None = None,
               whole_grid: SlopeFit | None = None) -> SlopeFit:
    fit = snr.fit_loglog(xs, ys)
    ci = confidence_interval(fit)
    used = [x for x, y in zip(xs, ys, strict=True) if y > 0]
    return SlopeFit(slope=fit.slope, stderr=fit.stderr, ci_low=None if ci is None else ci[0],
                    ci_high=None if ci is None else ci[1], intercept=fit.intercept, num_points=fit.num_points,
                    confidence=CONFIDENCE, fit_range=[min(used), max(used)], expected=expected,
                    whole_grid=whole_grid)


def fit_slopes(records: list[PointRecord], axis: str, estimators: Sequence[str], fit_min: int,
               notes: list[str] | None = None) -> dict[str, dict[str, SlopeFit]]:
    """Log-log slopes of the element-mean SNR per estimator and group, on ``setting >= fit_min``
    (the headline number) with the whole-grid fit alongside.

    What the grid allows is fitted, and ``notes`` says what was not and why: fewer than two
    settings at or above ``fit_min`` fall back to the whole grid; two settings give a slope
    without an interval; fewer than two give no slope; settings where an SNR is 0 are left
    out of that fit.
    """
    notes = [] if notes is None else notes
    letter = AXES[axis]
    grid = [r.setting(axis) for r in records]
    if len(grid) < 2:
        if grid:
            notes.append(f"{letter} sweep: one setting ({letter} = {grid[0]}); no {letter} slope (a slope "
                         "needs 2 settings)")
        return {}
    lo = fit_min
    if sum(x >= fit_min for x in grid) < 2:
        lo = min(grid)
        notes.append(f"{letter} sweep: {letter} >= {fit_min} (--fit-min) leaves "
                     f"{sum(x >= fit_min for x in grid)} setting(s); the {letter} slopes are fitted on the "
                     f"whole grid ({letter} = {min(grid)}..{max(grid)}) instead")
    if sum(x >= lo for x in grid) == 2:
        notes.append(f"{letter} sweep: 2 settings in the fit; slopes without a confidence interval (an "
                     "interval needs 3 settings)")
    out: dict[str, dict[str, SlopeFit]] = {}
    for e in estimators:
        out[e] = {}
        for g in ("theta", "phi"):
            series = [(r.setting(axis), r.estimators[e].snr[g].mean) for r in records]
            dropped = [x for x, y in series if x >= lo and not y > 0]
            if dropped:
                notes.append(f"{letter} sweep, {LABELS.get(e, e)} {g}: SNR 0 at {letter} = "
                             f"{', '.join(map(str, dropped))}, left out of the fit")
            fits = {}
            for label, start in (("fit", lo), ("whole_grid", min(grid))):
                xs = [x for x, y in series if x >= start and y > 0]
                ys = [y for x, y in series if x >= start and y > 0]
                if len(set(xs)) >= 2:
                    fits[label] = (xs, ys)
            if "fit" not in fits:
                notes.append(f"{letter} sweep, {LABELS.get(e, e)} {g}: fewer than 2 settings with a positive "
                             "SNR; no slope")
                continue
            whole = _slope_fit(*fits["whole_grid"]) if "whole_grid" in fits else None
            out[e][g] = _slope_fit(*fits["fit"], expected=EXPECTED_SLOPES.get((axis, e, g)), whole_grid=whole)
    return out


def checks(k_records: list[PointRecord], estimators: Sequence[str]) -> Checks:
    """Variance ordering DReG < STL < IWAE for phi at every K > 1, and the paired bias tests."""
    ordering = None
    if set(ESTIMATORS) <= set(estimators):
        rows = []
        for r in k_records:
            v = {e: r.estimators[e].total_variance["phi"] for e in ("dreg", "stl", "reparam")}
            rows.append(VarianceRow(num_samples=r.setting("num_samples"), **v,
                                    ordered=bool(v["dreg"] < v["stl"] < v["reparam"])))
        ordering = VarianceOrdering(claim="total phi variance dreg < stl < reparam for every K > 1",
                                    holds=all(row.ordered for row in rows if row.num_samples > 1), per_k=rows)
    bias = {}
    for name, claim in BIAS_CLAIMS.items():
        if k_records and all(name in r.pairs for r in k_records):
            bias[name] = BiasTest(claim=claim, per_k=[
                BiasRow(num_samples=r.setting("num_samples"), **dataclasses.asdict(r.pairs[name]["phi"]))
                for r in k_records])
    return Checks(phi_variance_ordering=ordering, stl_dreg=bias.get("stl-dreg"),
                  dreg_reparam=bias.get("dreg-reparam"))


# ----------------------------------------------------------------------------- tables


def write_csv(result: Result, path: str | os.PathLike) -> None:
    """One row per sweep x setting x estimator x group."""
    fields = ["sweep", "num_samples", "num_outer", "num_inner", "estimator", "group", "snr_mean",
              "snr_median", "snr_min", "snr_max", "snr_own_mean_mean", "mean_from", "total_variance",
              "seconds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for sweep_name, records in (("K", result.k_sweep), ("M", result.m_sweep)):
            for r in records:
                for e, est in r.estimators.items():
                    for g, s in est.snr.items():
                        writer.writerow({
                            "sweep": sweep_name,
                            "num_samples": r.num_samples if r.num_samples is not None else r.num_inner,
                            "num_outer": r.num_outer or 1, "num_inner": r.num_inner or "",
                            "estimator": e, "group": g, "snr_mean": s.mean, "snr_median": s.median,
                            "snr_min": s.min, "snr_max": s.max, "snr_own_mean_mean": est.snr_own_mean[g].mean,
                            "mean_from": est.mean_from, "total_variance": est.total_variance[g],
                            "seconds": r.seconds})


def format_slope(fit: SlopeFit | None) -> str:
    """``+0.499 [+0.495, +0.503]``, or the slope alone when it has no interval."""
    if fit is None:
        return "n/a"
    if fit.ci_low is None or fit.ci_high is None:
        return f"{fit.slope:+.3f} [no interval: {fit.num_points} points]"
    return f"{fit.slope:+.3f} [{fit.ci_low:+.3f}, {fit.ci_high:+.3f}]"


def _t_cell(row: BiasRow | None) -> str:
    if row is None:
        return "n/a | n/a"
    if row.identical or row.relative_rms_difference < 1e-5:
        return f"equal up to rounding (relative rms difference {row.relative_rms_difference:.0e}) | -"
    return f"{row.rms_t:.2f} | {row.max_abs_t:.2f}"


def markdown(result: Result) -> str:
    """The slope table, the variance ordering, the paired bias tests and the notes as markdown."""
    s = result.settings
    lines = [
        f"Gradient SNR on the linear-Gaussian toy (D = {s.dim}, N = {s.num_points}, "
        f"gradient on {s.batch_size} fixed data point(s)), R = {s.num_replicates} replicates per "
        f"setting; SNR = mean over a group's elements of |E[g]| / std[g]"
        + ("; IWAE (reparam) mean taken from DReG." if s.mean_reference else "."),
        "",
        f"Log-log slopes with {round(100 * CONFIDENCE)}% t-intervals (K sweep fitted on K >= {s.fit_min}; "
        f"M sweep with K = {s.num_inner}, all M):",
        "",
        f"| sweep | estimator | group | slope [{round(100 * CONFIDENCE)}% CI] | expected | slope, whole grid |",
        "|---|---|---|---|---|---|",
    ]
    for axis, letter in AXES.items():
        for e, groups in result.slopes.get(axis, {}).items():
            for g, fit in groups.items():
                expected = "" if fit.expected is None else f"{fit.expected:+.1f}"
                lines.append(f"| {letter} | {LABELS.get(e, e)} | {g} | {format_slope(fit)} | {expected} | "
                             f"{format_slope(fit.whole_grid)} |")
    ordering = result.checks.phi_variance_ordering
    if ordering is not None:
        lines += ["", f"Total phi variance (sum over elements); DReG < STL < IWAE for every K > 1: "
                      f"**{ordering.holds}**", "", "| K | DReG | STL | IWAE (reparam) |", "|---|---|---|---|"]
        lines += [f"| {row.num_samples} | {row.dreg:.3g} | {row.stl:.3g} | {row.reparam:.3g} |"
                  for row in ordering.per_k]
    a = {r.num_samples: r for r in (result.checks.stl_dreg.per_k if result.checks.stl_dreg else [])}
    b = {r.num_samples: r for r in (result.checks.dreg_reparam.per_k if result.checks.dreg_reparam else [])}
    if a or b:
        lines += ["", "Paired t-statistics on the phi gradient (same random keys), per element "
                      "t = mean(d) / (std(d) / sqrt(R)); rms over elements is about 1 without bias:", "",
                  "| K | STL - DReG: rms t | max abs t | DReG - IWAE: rms t | max abs t |",
                  "|---|---|---|---|---|"]
        for k in sorted(set(a) | set(b)):
            lines.append(f"| {k} | {_t_cell(a.get(k))} | {_t_cell(b.get(k))} |")
    if result.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result.notes]
    env = result.environment or {}
    if env and result.wall_seconds is not None:
        lines += ["", f"Wall time {result.wall_seconds:.0f} s on {env['device']['device_kind']} "
                      f"({env['device']['num_devices']} device(s), {env['device']['cpu_count']} CPU cores), "
                      f"jax {env['versions']['jax']}; command: `{env.get('command', '')}`."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def plot(result: Result, path: str | os.PathLike, axis: str = "num_samples") -> None:
    """Two log-log panels (theta, phi): element-mean SNR against K (or M), the fitted slopes
    with their intervals in the legend, dotted reference lines of the slopes theory predicts,
    and the K range used for the fit shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result.sweep(axis)
    s = result.settings
    letter = AXES[axis]
    xs = [r.setting(axis) for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.0), constrained_layout=True)
    panels = (("theta", r"model parameters $\theta$ ($\mu$)"), ("phi", r"guide parameters $\phi$ ($A$, $b$)"))
    for ax, (group, title) in zip(axes, panels, strict=True):
        curves = {e: [r.estimators[e].snr[group].mean for r in records] for e in s.estimators
                  if records and all(e in r.estimators for r in records)}
        # the theta gradient is the same estimator for reparam, stl and dreg (paired keys): one line
        if group == "theta" and len(curves) > 1:
            first = next(iter(curves.values()))
            if all(np.allclose(c, first, rtol=1e-5) for c in curves.values()):
                curves = {next(iter(curves)): first}
        for e, ys in curves.items():
            fit = result.slopes.get(axis, {}).get(e, {}).get(group)
            if group == "theta" and len(curves) == 1 and len(s.estimators) > 1:
                label = " = ".join(LABELS.get(n, n) for n in s.estimators) + " (same gradient)"
            else:
                label = LABELS.get(e, e)
                if e == "reparam" and s.mean_reference and group == "phi":
                    label += ", mean from DReG"
            if fit:
                label += f": slope {fit.slope:+.3f}"
                if fit.ci_high is not None:
                    label += f" ± {fit.ci_high - fit.slope:.3f}"
            color = "0.2" if len(curves) == 1 else COLORS.get(e)
            ax.plot(xs, ys, "-", marker=MARKERS.get(e, "o"), color=color, label=label, ms=5, lw=1.6)
            if group == "phi" and e in s.mean_reference:
                own = [r.estimators[e].snr_own_mean[group].mean for r in records]
                floor = math.sqrt(2 / (math.pi * s.num_replicates))
                ax.plot(xs, own, "--", color=color, alpha=0.45, lw=1.2,
                        label=f"{LABELS.get(e, e)}, its own sample mean (noise floor ≈ {floor:.3f})")
        positive = [y for ys in curves.values() for y in ys if y > 0]
        expected = sorted({v for (a, e, g), v in EXPECTED_SLOPES.items()
                           if a == axis and g == group and e in s.estimators})
        if positive and len(xs) > 1:
            x0, x1 = min(xs), max(xs)
            # through the middle of the data, shifted down so it does not hide a curve of that slope
            mid = 0.5 * math.exp(0.5 * (math.log(min(positive)) + math.log(max(positive))))
            xm = math.sqrt(x0 * x1)
            for slope in expected:
                line = [mid * (x / xm) ** slope for x in (x0, x1)]
                ax.plot([x0, x1], line, ":" if slope > 0 else "-.", color="0.45", lw=1.3,
                        label=f"reference $\\propto {letter}^{{{'+' if slope > 0 else '-'}1/2}}$")
        fits = [f for f in (result.slopes.get(axis, {}).get(e, {}).get(group) for e in s.estimators) if f]
        fit_lo = fits[0].fit_range[0] if fits else min(xs, default=1)
        if xs and fit_lo > min(xs):
            ax.axvspan(fit_lo, max(xs), color="0.85", alpha=0.35, lw=0,
                       label=f"slope fitted on {letter} ≥ {fit_lo}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("K, importance samples per IWAE bound" if axis == "num_samples"
                      else f"M, independent IWAE bounds averaged (MIWAE, K = {s.num_inner})")
        ax.set_ylabel(r"gradient SNR  $|E[\Delta]|\,/\,\mathrm{std}[\Delta]$, mean over elements")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    sweep = "IWAE: SNR against K" if axis == "num_samples" else "MIWAE: SNR against M"
    fig.suptitle(f"{sweep} on the linear-Gaussian toy (D = {s.dim}, R = {s.num_replicates:,} "
                 "replicates per point), after Rainforth et al. 2018 and Tucker et al. 2019", fontsize=11)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------- files

OUTPUT_NAMES = ("snr.json", "snr.csv", "snr.md", "snr.png", "snr_m.png")


def write_outputs(result: Result, out: str | os.PathLike) -> dict[str, str]:
    """Write snr.json, snr.csv, snr.md, snr.png and (with an M sweep) snr_m.png under ``out``."""
    from jaxelbo.app import rundir

    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in OUTPUT_NAMES}
    rundir.write_json_atomic(paths["snr.json"], result.to_json())  # a kill never leaves it half written
    write_csv(result, paths["snr.csv"])
    with open(paths["snr.md"], "w") as f:
        f.write(markdown(result))
    for name, axis, records in (("snr.png", "num_samples", result.k_sweep), ("snr_m.png", "num_outer",
                                                                             result.m_sweep)):
        if records:
            plot(result, paths[name], axis)
        else:  # a figure of an earlier run's sweep would sit beside these results
            if os.path.exists(paths[name]):
                os.remove(paths[name])
            del paths[name]
    return paths


def load_result(out: str | os.PathLike) -> Result:
    """The :class:`Result` saved in ``out/snr.json``."""
    path = os.path.join(out, "snr.json")
    with open(path) as f:
        try:
            return Result.from_json(json.load(f))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a jaxelbo snr result ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:120]})") from None
