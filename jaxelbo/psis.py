r"""The Pareto-smoothed importance-sampling diagnostic k-hat.

Importance weights ``w~ = p(x, z) / q(z | x)`` with ``z ~ q`` have a right tail that is
asymptotically generalized Pareto with shape ``k``. Their variance is finite only when
``k < 1/2`` and their mean only when ``k < 1``; Vehtari et al. show that estimates built
from S weights are reliable when ``k < 1 - 1/log10(S)`` and in practice when
``k <= 0.7``. k-hat estimates ``k`` from the ``M`` largest weights:

.. math::

   M = \lfloor \min(S / 5,\; 3 \sqrt{S}) \rfloor, \qquad
   x_i = \tilde w_{(S - M + i)} - \tilde w_{(S - M)} \;(i = 1..M),

fitted by the empirical-Bayes estimator of Zhang & Stephens (2009): with
``m = 30 + floor(sqrt(M))`` grid points
``b_j = 1/x_{(M)} + (1 - sqrt(m / (j - 1/2))) / (3 x_{(floor(M/4 + 1/2))})``,
profile shapes ``k(b) = mean_i log(1 - b x_i)``, profile log-likelihoods
``l(b) = M (log(-b / k(b)) - k(b) - 1)``, the posterior mean ``b^ = sum_j softmax(l)_j b_j``
and ``k^ = mean_i log(1 - b^ x_i)``. The reported shape adds Vehtari et al.'s weakly
informative prior, ``(M k^ + 10 * 0.5) / (M + 10)`` (a Gaussian centred at 0.5 worth 10
observations). Everything is computed in log space from ratios of exceedances
(``log x_i`` straight from the log-weights, never ``exp`` of them), so weights ``e^{10^4}``
apart, whose ``exp`` underflows even in float64, give the same k-hat as a 40-digit
computation of the formula above.

References:
  Vehtari, Simpson, Gelman, Yao & Gabry (2024). Pareto smoothed importance sampling.
  JMLR 25(72). arXiv:1507.02646.
  Zhang & Stephens (2009). A new and efficient estimation method for the generalized
  Pareto distribution. Technometrics 51(3), 316-325.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["KHAT_THRESHOLD", "psis_khat", "psis_tail_size"]

#: Above this k-hat, importance-sampling estimates are unreliable (Vehtari et al. 2024).
KHAT_THRESHOLD = 0.7

_PRIOR_STRENGTH = 10.0   # pseudo-observations of the weakly informative prior on k
_PRIOR_MEAN = 0.5
_GRID_SCALE = 3.0        # Zhang & Stephens' quartile-based spread of the b grid


def psis_tail_size(num_samples: int) -> int:
    """Tail size ``M = floor(min(S / 5, 3 sqrt(S)))`` for S importance weights (r_eff = 1)."""
    if num_samples > 225:
        return math.floor(3.0 * math.sqrt(num_samples))
    return num_samples // 5


def _log1mexp(a: jax.Array) -> jax.Array:
    """``log(1 - exp(a))`` for ``a <= 0``, accurate at both ends (Maechler 2012)."""
    return jnp.where(a > -math.log(2.0), jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def _gpd_shape(log_x: jax.Array) -> jax.Array:
    r"""Zhang & Stephens' posterior-mean GPD shape, with the weakly informative prior, of
    the sorted exceedances ``x`` given as ``log_x`` (last axis).

    Every term is a ratio of exceedances, so nothing depends on their scale: with
    ``A_i = 1 - x_i / x_(M)`` and ``a_j = (sqrt(m / (j - 1/2)) - 1) / 3 > 0``,
    ``1 - b_j x_i = A_i + a_j x_i / x_q`` (a sum of two non-negative terms, taken by
    ``logaddexp``) and ``log|b_j| = log|x_q / x_(M) - a_j| - log x_q`` (the last term is the
    same for every ``j`` and drops out of the softmax); the posterior mean gives
    ``1 - b^ x_i = A_i + (sum_j p_j a_j) x_i / x_q``. Exceedances ``e^{10^4}`` apart are
    then as safe as ones of order one. ``nan`` when the tail is flat (all ``x`` zero);
    ``+inf``, the estimator's limit, when ``x_q = 0 < x_(M)`` (ties at the threshold).
    """
    n = log_x.shape[-1]
    m = 30 + math.isqrt(n)
    j = jnp.arange(1, m + 1, dtype=log_x.dtype).reshape((1,) * (log_x.ndim - 1) + (m,))
    a = (jnp.sqrt(m / (j - 0.5)) - 1.0) / _GRID_SCALE                                   # (..., m)
    log_q = log_x[..., math.floor(n / 4 + 0.5) - 1]
    log_top = log_x[..., -1]
    flat, tied = jnp.isneginf(log_top), jnp.isneginf(log_q)
    safe = jnp.where((flat | tied)[..., None], jnp.zeros_like(log_x), log_x)         # any finite stand-in
    log_q = jnp.where(flat | tied, jnp.zeros_like(log_q), log_q)
    log_top = jnp.where(flat | tied, jnp.zeros_like(log_top), log_top)
    log_a_i = _log1mexp(safe - log_top[..., None])                                    # log A_i, (..., n)
    log_r = safe - log_q[..., None]                                                   # log(x_i / x_q)
    log_terms = jnp.logaddexp(log_a_i[..., None, :], jnp.log(a)[..., None] + log_r[..., None, :])
    k_grid = jnp.mean(log_terms, axis=-1)                                             # (..., m)
    log_abs_b = jnp.log(jnp.abs(jnp.exp(log_q - log_top)[..., None] - a))            # + log x_q dropped
    profile = n * (log_abs_b - jnp.log(jnp.abs(k_grid)) - k_grid - 1.0)
    spread = jnp.sum(jax.nn.softmax(profile, axis=-1) * a, axis=-1)                   # sum_j p_j a_j
    k = jnp.mean(jnp.logaddexp(log_a_i, jnp.log(spread)[..., None] + log_r), axis=-1)
    k = (n * k + _PRIOR_STRENGTH * _PRIOR_MEAN) / (n + _PRIOR_STRENGTH)
    return jnp.where(flat, jnp.nan, jnp.where(tied, jnp.inf, k))


def psis_khat(log_weights: jax.Array, axis: int = -1) -> jax.Array:
    r"""Pareto-smoothed importance-sampling shape estimate k-hat along ``axis``.

    Fits a generalized Pareto distribution to the ``M = floor(min(S/5, 3 sqrt(S)))``
    largest of the S importance weights ``exp(log_weights)`` (Zhang & Stephens 2009,
    with the weakly informative prior of Vehtari et al. 2024) and returns its shape.
    ``k-hat <= 0.7`` (:data:`KHAT_THRESHOLD`): the self-normalised importance sampler
    (and so the IWAE bound) is reliable; above it the estimates are dominated by a few
    weights. jit- and vmap-compatible and stable at any scale of log-weights; ``nan`` where
    the M largest weights are all equal to the one below them (a flat tail: nothing to
    fit), ``+inf`` (flagged) where the lower quarter of the tail ties with the threshold
    but larger weights lie above it, the estimator's limit.

    Args:
      log_weights: unnormalised log importance weights ``log w~``, e.g. ``aux["log_weights"]``
        of any objective; S along ``axis`` must be at least 25 (a tail of 5 or more).
      axis: the axis of the S samples.

    Returns:
      k-hat, with ``axis`` removed.

    Example:
      >>> import jax, jaxelbo as je
      >>> lw = jax.random.normal(jax.random.key(0), (3, 1000))     # light tail: lognormal weights
      >>> bool((je.psis_khat(lw) < 0.7).all())
      True
      >>> heavy = jax.numpy.log(jax.random.pareto(jax.random.key(1), 0.8, (3, 1000)))  # k = 1.25
      >>> bool((je.psis_khat(heavy) > 0.7).all())
      True

    References:
      Vehtari, Simpson, Gelman, Yao & Gabry (2024), JMLR 25(72), arXiv:1507.02646.
      Zhang & Stephens (2009), Technometrics 51(3).
    """
    log_weights = jnp.asarray(log_weights)
    if not jnp.issubdtype(log_weights.dtype, jnp.floating):
        raise TypeError(f"log_weights must be a floating-point array, got dtype {log_weights.dtype}")
    if log_weights.ndim == 0:
        raise ValueError("log_weights must have a sample axis, got a scalar")
    lw = jnp.moveaxis(log_weights, axis, -1)
    s = lw.shape[-1]
    m = psis_tail_size(s)
    if m < 5:
        raise ValueError(f"psis_khat needs at least 25 samples along axis {axis} (a tail of 5 or more), "
                         f"got {s}")
    ordered = jnp.sort(lw, axis=-1)
    tail, cutoff = ordered[..., s - m:], ordered[..., s - m - 1]
    cutoff = cutoff[..., None]
    above = tail > cutoff
    gap = jnp.where(above, cutoff - tail, -jnp.ones_like(tail))                      # < 0; -inf - -inf is safe
    log_x = jnp.where(above, tail - tail[..., -1:] + _log1mexp(gap), -jnp.inf)        # log((w_i - w_cut) / w_max)
    return _gpd_shape(log_x)
