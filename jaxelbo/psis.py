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
observations). Everything is computed from ``log w~`` shifted by its maximum, so any
scale of log-weights is safe.

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


def _gpd_shape(x: jax.Array) -> jax.Array:
    """Zhang & Stephens' posterior-mean GPD shape of the sorted exceedances ``x`` (last axis),
    with the weakly informative prior; ``nan`` when the tail is flat (all ``x`` zero)."""
    n = x.shape[-1]
    m = 30 + math.isqrt(n)
    j = jnp.arange(1, m + 1, dtype=x.dtype).reshape((1,) * (x.ndim - 1) + (m,))
    quartile = x[..., math.floor(n / 4 + 0.5) - 1]
    top = x[..., -1]
    b = 1.0 / top[..., None] + (1.0 - jnp.sqrt(m / (j - 0.5))) / (_GRID_SCALE * quartile[..., None])
    k_grid = jnp.mean(jnp.log1p(-b[..., :, None] * x[..., None, :]), axis=-1)          # (..., m)
    profile = n * (jnp.log(-b / k_grid) - k_grid - 1.0)
    b_post = jnp.sum(jax.nn.softmax(profile, axis=-1) * b, axis=-1)
    k = jnp.mean(jnp.log1p(-b_post[..., None] * x), axis=-1)
    k = (n * k + _PRIOR_STRENGTH * _PRIOR_MEAN) / (n + _PRIOR_STRENGTH)
    return jnp.where(top > 0, k, jnp.nan)


def psis_khat(log_weights: jax.Array, axis: int = -1) -> jax.Array:
    r"""Pareto-smoothed importance-sampling shape estimate k-hat along ``axis``.

    Fits a generalized Pareto distribution to the ``M = floor(min(S/5, 3 sqrt(S)))``
    largest of the S importance weights ``exp(log_weights)`` (Zhang & Stephens 2009,
    with the weakly informative prior of Vehtari et al. 2024) and returns its shape.
    ``k-hat <= 0.7`` (:data:`KHAT_THRESHOLD`): the self-normalised importance sampler
    (and so the IWAE bound) is reliable; above it the estimates are dominated by a few
    weights. jit- and vmap-compatible; ``nan`` where the M largest weights are all
    equal to the one below them (a flat tail).

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
    top = tail[..., -1:]
    x = jnp.exp(tail - top) - jnp.exp(cutoff[..., None] - top)
    return _gpd_shape(x)
