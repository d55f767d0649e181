r"""The thermodynamic variational objective, TVO (Masrani, Le & Wood 2019).

The geometric path ``pi_beta(z) ∝ q(z|x)^(1 - beta) p(x, z)^beta`` runs from the guide
(``beta = 0``) to the posterior (``beta = 1``), and the thermodynamic identity

.. math:: \log p(x) = \int_0^1 \mathbb{E}_{\pi_\beta}[\log \tilde w] \, d\beta,
   \qquad \frac{d}{d\beta} \mathbb{E}_{\pi_\beta}[\log \tilde w]
   = \mathrm{Var}_{\pi_\beta}[\log \tilde w] \ge 0,

makes the integrand non-decreasing, so over a partition ``0 = beta_0 < ... < beta_S = 1``
the left Riemann sum is a lower bound and the right sum an upper bound:

.. math:: \mathrm{TVO}_L = \sum_{j=0}^{S-1} (\beta_{j+1} - \beta_j)\,
   \mathbb{E}_{\pi_{\beta_j}}[\log \tilde w] \;\le\; \log p(x) \;\le\;
   \mathrm{TVO}_U = \sum_{j=0}^{S-1} (\beta_{j+1} - \beta_j)\,
   \mathbb{E}_{\pi_{\beta_{j+1}}}[\log \tilde w] .

With one interval, ``TVO_L`` is the ELBO and ``TVO_U`` the EUBO ``E_{p(z|x)}[log w~]``.
Every expectation is self-normalised importance sampling from the same K draws of the
guide: ``E_{pi_beta}[log w~] ≈ sum_k softmax(beta log w~)_k log w~_k``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxelbo import estimators as est
from jaxelbo import per_site, registry
from jaxelbo._validation import check_count, check_inputs, check_model_guide, check_real
from jaxelbo.psis import psis_khat, psis_tail_size
from jaxelbo.types import Guide, LossFn, Model, PyTree
from jaxelbo.weights import effective_sample_size

__all__ = ["PARTITION_SCHEDULES", "TVO_ESTIMATORS", "log_uniform_partition", "moment_partition", "tvo", "tvo_bound",
           "tvo_moments"]

#: The estimators of :func:`tvo`: the paper's covariance gradient (``score``) and ``reparam``.
TVO_ESTIMATORS = ("score", "reparam")
_INTEGRATIONS = ("left", "right")
#: The adaptive schedules ``partition`` may name (besides an explicit array, or None: log-uniform).
PARTITION_SCHEDULES = ("moments",)


def log_uniform_partition(num_partitions: int, log_beta_min: float) -> np.ndarray:
    """``[0, 10^a_1, ..., 10^a_S = 1]`` with ``a`` evenly spaced from ``log_beta_min`` to 0.

    ``num_partitions`` S intervals (S + 1 points, both ends included); S = 1 is ``[0, 1]``.

    Example:
      >>> log_uniform_partition(3, -2.0).tolist()
      [0.0, 0.01, 0.1, 1.0]
    """
    s = check_count("num_partitions", num_partitions)
    log_beta_min = check_real("log_beta_min", log_beta_min)
    if log_beta_min >= 0:
        raise ValueError(f"log_beta_min must be < 0 (beta_1 = 10^log_beta_min < 1), got {log_beta_min}")
    if s == 1:
        return np.array([0.0, 1.0])
    return np.concatenate([[0.0], 10.0 ** np.linspace(log_beta_min, 0.0, s)])


def _check_partition(partition) -> np.ndarray:
    p = np.asarray(partition, dtype=np.float64)
    if p.ndim != 1 or p.size < 2:
        raise ValueError(f"partition must be a 1-D array 0 = beta_0 < ... < beta_S = 1 of at least 2 points, "
                         f"got shape {p.shape}")
    if p[0] != 0.0 or p[-1] != 1.0 or not np.all(np.diff(p) > 0):
        raise ValueError(f"partition must increase strictly from 0 to 1, both ends included, got {p.tolist()}")
    return p


def _along_last(v: jax.Array, ndim: int) -> jax.Array:
    """A vector ``(S,)`` shaped ``(1, ..., 1, S)`` to broadcast against an array of rank ``ndim``."""
    return jnp.reshape(v, (1,) * (ndim - 1) + (-1,))


def tvo_moments(log_weights: jax.Array, betas) -> jax.Array:
    r"""``E_{pi_beta}[log w~]`` at each ``beta``, self-normalised from the same K draws.

    .. math:: \hat\eta(\beta) = \sum_k \mathrm{softmax}(\beta \log \tilde w)_k \log \tilde w_k ,

    non-decreasing in ``beta`` (its derivative is the self-normalised variance of ``log w~``).

    Args:
      log_weights: ``(..., K)`` log-weights.
      betas: ``(S,)`` temperatures in ``[0, 1]``.

    Returns:
      ``(..., S)``.

    Example:
      >>> import jax.numpy as jnp
      >>> lw = jnp.array([[-1.0, -3.0]])
      >>> [round(float(v), 4) for v in tvo_moments(lw, jnp.array([0.0, 1.0]))[0]]
      [-2.0, -1.2384]
    """
    b = jnp.asarray(betas, log_weights.dtype)
    lw = log_weights[..., None, :]                                             # (..., 1, K)
    scaled = jnp.reshape(b, (1,) * (log_weights.ndim - 1) + (-1, 1)) * lw      # (..., S, K)
    return jnp.sum(jax.nn.softmax(scaled, axis=-1) * lw, axis=-1)


def _riemann(log_weights: jax.Array, partition: jax.Array, integration: str) -> tuple[jax.Array, jax.Array]:
    """``(widths, betas)`` of the partition's intervals, ends chosen by ``integration``."""
    betas = partition[:-1] if integration == "left" else partition[1:]
    return jnp.diff(partition).astype(log_weights.dtype), betas


def tvo_bound(log_weights: jax.Array, partition, integration: str = "left") -> jax.Array:
    r"""The Riemann sum of ``E_{pi_beta}[log w~]`` over ``partition``, along the last axis.

    .. math:: \sum_{j} \Delta_j \sum_k \mathrm{softmax}(\beta_j \log \tilde w)_k \log \tilde w_k,

    with ``beta_j`` the left (``integration="left"``) or right end of interval j.

    Args:
      log_weights: ``(..., K)`` log-weights.
      partition: ``0 = beta_0 < ... < beta_S = 1`` (checked when it is concrete; a traced
        one, e.g. :func:`moment_partition`'s, is taken as given).
      integration: ``"left"`` (a lower bound) or ``"right"`` (an upper bound).

    Returns:
      ``(...)``: one sum per row of ``log_weights``.

    Example:
      >>> import jax.numpy as jnp
      >>> lw = jnp.array([[-1.0, -2.0, -4.0]])
      >>> float(tvo_bound(lw, [0.0, 1.0])[0]) == float(jnp.mean(lw))   # one interval: the ELBO
      True
    """
    if integration not in _INTEGRATIONS:
        raise ValueError(f"integration must be one of {', '.join(_INTEGRATIONS)}, got {integration!r}")
    if isinstance(partition, jax.core.Tracer):
        part = jnp.asarray(partition, log_weights.dtype)
    else:
        part = jnp.asarray(_check_partition(partition), log_weights.dtype)
    widths, betas = _riemann(log_weights, part, integration)
    return jnp.sum(_along_last(widths, log_weights.ndim) * tvo_moments(log_weights, betas), axis=-1)


def moment_partition(log_weights: jax.Array, num_partitions: int, *, num_iterations: int = 40) -> jax.Array:
    r"""The moment-spacing schedule (Brekelmans et al. 2020): betas whose moments are evenly spaced.

    With ``eta(beta) = E_{pi_beta}[log w~]`` (non-decreasing, :func:`tvo_moments`) averaged
    over the batch, the points ``beta_j`` solve

    .. math:: \bar\eta(\beta_j) = \bar\eta(0) + \tfrac{j}{S}\,\big(\bar\eta(1) - \bar\eta(0)\big),
       \qquad j = 1, \dots, S - 1,

    by bisection on ``[0, 1]`` (``num_iterations`` halvings, all j at once), with
    ``beta_0 = 0`` and ``beta_S = 1``. The schedule puts its points where the integrand
    climbs, so each interval carries the same share of ``eta(1) - eta(0)`` (the gap
    ``TVO_U - TVO_L`` then splits evenly in height). It is non-decreasing; points may
    coincide where ``eta`` is flat (e.g. at the exact posterior, where all log-weights are
    equal), and such zero-width intervals add nothing to the sums. No gradient flows
    through it.

    Args:
      log_weights: ``(B, K)`` (or ``(K,)``) log-weights; the schedule is one for the batch.
      num_partitions: S >= 1 intervals (S + 1 points).
      num_iterations: bisection steps (default 40: below float32 resolution).

    Returns:
      ``(S + 1,)`` partition, ``0 = beta_0 <= ... <= beta_S = 1``.

    Example:
      >>> import jax.numpy as jnp
      >>> lw = jnp.array([[0.0, -1.0, -2.0, -6.0]])
      >>> part = moment_partition(lw, 4)
      >>> float(part[0]), float(part[-1]), bool(jnp.all(jnp.diff(part) >= 0))
      (0.0, 1.0, True)

    References:
      Brekelmans, Masrani, Wood, Ver Steeg & Galstyan (2020). All in the exponential family:
      Bregman duality in thermodynamic variational inference. ICML. arXiv:2007.00642.
    """
    s = check_count("num_partitions", num_partitions)
    n_iter = check_count("num_iterations", num_iterations)
    lw = jax.lax.stop_gradient(jnp.asarray(log_weights))
    lw2 = lw.reshape(-1, lw.shape[-1])

    def eta(betas: jax.Array) -> jax.Array:  # (S - 1,) -> (S - 1,), batch-mean moments
        return jnp.mean(tvo_moments(lw2, betas), axis=0)

    ends = eta(jnp.array([0.0, 1.0], lw.dtype))
    if s == 1:
        return jnp.array([0.0, 1.0], lw.dtype)
    frac = jnp.arange(1, s, dtype=lw.dtype) / s
    targets = ends[0] + frac * (ends[1] - ends[0])

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = eta(mid) < targets
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, n_iter, halve, (jnp.zeros(s - 1, lw.dtype), jnp.ones(s - 1, lw.dtype)))
    inner = jax.lax.cummax(0.5 * (lo + hi), axis=0)  # monotone already; guards float ties
    return jnp.concatenate([jnp.zeros(1, lw.dtype), inner, jnp.ones(1, lw.dtype)])


def _covariance_signal(log_weights: jax.Array, partition: jax.Array, integration: str) -> jax.Array:
    """``s_k = sum_j Delta_j pi_jk (log w~_k - E_j)``, shape ``(B, K)``: the per-sample signal
    multiplying ``dlog q(z_k)/dphi`` in the covariance gradient (stopped)."""
    lw = jax.lax.stop_gradient(log_weights)
    widths, betas = _riemann(lw, partition, integration)
    b = jnp.reshape(betas.astype(lw.dtype), (1,) * (lw.ndim - 1) + (-1, 1))
    pi = jax.nn.softmax(b * lw[..., None, :], axis=-1)                        # (B, S, K)
    centred = lw[..., None, :] - jnp.sum(pi * lw[..., None, :], axis=-1, keepdims=True)
    w = jnp.reshape(widths, (1,) * (lw.ndim - 1) + (-1, 1))
    return jnp.sum(w * pi * centred, axis=-2)                                 # (B, K)


def tvo(model: Model, guide: Guide, *, num_samples: int, partition=None, num_partitions: int = 10,
        log_beta_min: float = -1.09, integration: str = "left",
        estimator: str | Mapping[str, str] = "score") -> LossFn:
    r"""The thermodynamic variational objective (Masrani, Le & Wood 2019, arXiv:1907.00031).

    ``TVO_L`` (``integration="left"``, a lower bound, maximised) or ``TVO_U``
    (``"right"``, an upper bound) of :mod:`jaxelbo.thermodynamic`, each ``E_{pi_beta}`` estimated by
    self-normalised importance sampling from the same K draws (:func:`tvo_bound`). The
    partition is ``partition`` if given, else :func:`log_uniform_partition` of
    ``num_partitions`` and ``log_beta_min``.

    Estimators:

    - ``score`` (default): the paper's covariance gradient, for discrete or
      non-reparameterised guides. With ``z`` held constant and
      ``log pi~_beta = (1 - beta) log q + beta log p``, every interval contributes

      .. math:: \nabla \mathbb{E}_{\pi_\beta}[\log\tilde w]
         = \mathbb{E}_{\pi_\beta}[\nabla \log\tilde w]
         + \mathrm{Cov}_{\pi_\beta}\big[\log\tilde w, \nabla \log \tilde\pi_\beta\big],

      both estimated with the weights ``softmax(beta log w~)``. In the surrogate this is
      autodiff of the estimate at fixed ``z`` (which already holds the ``beta log p`` and
      ``-beta log q`` parts of the covariance) plus ``Cov[log w~, grad log q]``, the
      part due to sampling from ``q``. Consistent (self-normalised bias, O(1/K)).
    - ``reparam``: autodiff of the estimate through ``z = t(eps, phi)``.
    - per site, ``{"continuous": "reparam", "discrete": "score"}``, for a guide with
      reparameterised sites ``c`` and discrete sites ``d`` (:mod:`jaxelbo.per_site`):
      autodiff of the estimate through ``c = t(eps, phi; d)`` at fixed ``d`` plus the
      covariance term of the discrete sites alone, ``Cov_{pi_beta}[log w~, grad log q_D(d)]``
      (the ``sum_k s_k grad log q_D(d_k)`` of the same signal ``s``). Writing
      ``E_{pi_beta}[log w~]`` as a ratio of expectations under ``q = q_D q_C``, the
      derivative through ``d``'s distribution is exactly that covariance, and the one
      through ``c``'s is the reparameterised derivative, so the estimator is consistent as
      ``score`` is. With one interval (the ELBO) its expectation is the ELBO's gradient with
      the discrete part scaled by ``1 - 1/K``, the self-normalised covariance's bias.

    Args:
      model: a :class:`~jaxelbo.Model`.
      guide: a :class:`~jaxelbo.Guide`; reparameterised for ``reparam``.
      num_samples: K >= 1 draws per example, shared by every beta.
      partition: an explicit partition ``0 = beta_0 < ... < beta_S = 1``, both ends included
        (overrides ``num_partitions`` and ``log_beta_min``); ``"moments"``: the
        moment-spacing schedule of Brekelmans et al. (2020), :func:`moment_partition` of
        ``num_partitions`` intervals, recomputed at every call from the batch's log-weights
        (no gradient flows through it); None (default): the log-uniform schedule.
      num_partitions: S, the number of intervals of the log-uniform or moments schedule (default 10).
      log_beta_min: ``log10 beta_1`` of the log-uniform schedule (default -1.09).
      integration: ``"left"`` (default, ``TVO_L``) or ``"right"`` (``TVO_U``).
      estimator: ``score`` (default, the covariance gradient) or ``reparam``; or per site,
        ``{"continuous": "reparam", "discrete": "score"}``.

    Returns:
      ``loss_fn(params, rng, x) -> (loss, aux)``, pure and ``jit``-able. ``loss`` is
      ``-mean_b TVO_L(x_b)`` (a lower bound, maximised) or ``+mean_b TVO_U(x_b)`` (an upper
      bound, minimised); ``aux`` holds ``bound`` ``(B,)`` (the Riemann sum per example),
      ``log_weights`` ``(B, K)``, ``ess`` ``(B,)``, ``partition`` ``(S + 1,)`` and, with
      >= 25 samples, ``khat`` ``(B,)``, all without gradients.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> loss_fn = je.tvo(lg.model(), lg.guide(), num_samples=8, num_partitions=4)
      >>> loss, aux = loss_fn(params, jax.random.key(0), jnp.ones((3, 2)))
      >>> aux["partition"].shape, aux["bound"].shape
      ((5,), (3,))

    References:
      Masrani, Le & Wood (2019). The thermodynamic variational objective. NeurIPS.
      arXiv:1907.00031.
      Brekelmans, Masrani, Wood, Ver Steeg & Galstyan (2020). All in the exponential family:
      Bregman duality in thermodynamic variational inference. ICML. arXiv:2007.00642.
    """
    check_model_guide(model, guide)
    k = check_count("num_samples", num_samples)
    adaptive = isinstance(partition, str)
    if adaptive and partition not in PARTITION_SCHEDULES:
        raise ValueError(f"tvo: partition must be an array, None (log-uniform) or one of "
                         f"{', '.join(PARTITION_SCHEDULES)}, got {partition!r}")
    if adaptive:
        num_adaptive = check_count("num_partitions", num_partitions)
        fixed = None
    elif partition is None:
        fixed = log_uniform_partition(num_partitions, log_beta_min)
    else:
        fixed = _check_partition(partition)
    if integration not in _INTEGRATIONS:
        raise ValueError(f"tvo: integration must be one of {', '.join(_INTEGRATIONS)}, got {integration!r}")
    sites: per_site.PerSite | None = None
    if isinstance(estimator, Mapping):
        sites = per_site.parse(estimator, ("reparam",), ("score",), objective="tvo")
    elif not isinstance(estimator, str) or estimator not in TVO_ESTIMATORS:
        raise ValueError(f"objective 'tvo' does not support estimator {estimator!r}; "
                         f"valid choices for tvo: {', '.join(TVO_ESTIMATORS)}")
    sign = -1.0 if integration == "left" else 1.0

    def partition_of(lw: jax.Array) -> jax.Array:
        if fixed is None:  # the moment-spacing schedule of this batch's (stopped) log-weights
            return moment_partition(lw, num_adaptive)
        return jnp.asarray(fixed, lw.dtype)

    def bound_fn(lw: jax.Array) -> jax.Array:
        part = partition_of(lw)
        widths, betas = _riemann(lw, part, integration)
        return jnp.sum(_along_last(widths, lw.ndim) * tvo_moments(lw, betas), axis=-1)

    def loss_fn(params: dict, rng: jax.Array, x: PyTree) -> tuple[jax.Array, dict]:
        check_inputs(model, guide, params, rng, x)
        if sites is not None:
            surrogate, log_w = per_site.per_site_surrogate(
                model, guide, params, rng, x, sample_shape=(k,), bound_fn=bound_fn, estimator=sites,
                signal_fn=lambda lw: _covariance_signal(lw, partition_of(lw), integration))
            part = partition_of(jax.lax.stop_gradient(log_w))
            value = surrogate  # the score part is zero in value
        elif estimator == "reparam":
            value, log_w = est.pathwise_surrogate(model, guide, params, rng, x, sample_shape=(k,),
                                                  bound_fn=bound_fn, estimator="reparam")
            surrogate = value
            part = partition_of(jax.lax.stop_gradient(log_w))
        else:
            # The covariance gradient through the shared score routing: phi gets the
            # signal on dlog q/dphi at fixed z (and F's direct term), theta and x the
            # plain derivative of the value (x through a continuous z too).
            surrogate, log_w = est.score_surrogate(
                model, guide, params, rng, x, sample_shape=(k,), bound_fn=bound_fn,
                signal_fn=lambda lw: _covariance_signal(lw, partition_of(lw), integration))
            part = partition_of(jax.lax.stop_gradient(log_w))
            value = surrogate  # the score part is zero in value
        log_w = jax.lax.stop_gradient(log_w)
        aux = {"bound": jax.lax.stop_gradient(value), "log_weights": log_w,
               "ess": effective_sample_size(log_w, axis=-1), "partition": part}
        if psis_tail_size(k) >= 5:
            aux["khat"] = psis_khat(log_w)
        return sign * jnp.mean(surrogate), aux

    spelled = sites.name if sites is not None else estimator
    loss_fn.__name__ = f"tvo_{integration}_{spelled}_loss"
    loss_fn.__doc__ = f"{'-' if sign < 0 else '+'}mean TVO ({integration}); gradient: {spelled}. Returns (loss, aux)."
    return loss_fn


def _direction(keywords) -> str:
    """TVO_L (``integration="left"``) is a lower bound, TVO_U (``"right"``) an upper one."""
    return "lower" if keywords.get("integration", "left") == "left" else "upper"


registry.register("tvo", tvo, estimators=TVO_ESTIMATORS,
                  keywords={"num_partitions": 10, "log_beta_min": -1.09, "integration": "left", "partition": None},
                  direction=_direction)
