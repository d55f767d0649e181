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

import jax
import jax.numpy as jnp
import numpy as np

from jaxelbo import estimators as est
from jaxelbo._validation import check_count, check_inputs, check_model_guide, check_real
from jaxelbo.log_weights import batch_size_of, effective_sample_size, sample_and_log_weights, sample_keys
from jaxelbo.psis import psis_khat, psis_tail_size
from jaxelbo.types import Guide, LossFn, Model, PyTree

__all__ = ["TVO_ESTIMATORS", "log_uniform_partition", "tvo", "tvo_bound"]

#: The estimators of :func:`tvo`: the paper's covariance gradient (``score``) and ``reparam``.
TVO_ESTIMATORS = ("score", "reparam")
_INTEGRATIONS = ("left", "right")


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


def tvo_bound(log_weights: jax.Array, partition, integration: str = "left") -> jax.Array:
    r"""The Riemann sum of ``E_{pi_beta}[log w~]`` over ``partition``, along the last axis.

    .. math:: \sum_{j} \Delta_j \sum_k \mathrm{softmax}(\beta_j \log \tilde w)_k \log \tilde w_k,

    with ``beta_j`` the left (``integration="left"``) or right end of interval j.

    Example:
      >>> import jax.numpy as jnp
      >>> lw = jnp.array([[-1.0, -2.0, -4.0]])
      >>> float(tvo_bound(lw, [0.0, 1.0])[0]) == float(jnp.mean(lw))   # one interval: the ELBO
      True
    """
    p = _check_partition(partition)
    if integration not in _INTEGRATIONS:
        raise ValueError(f"integration must be one of {', '.join(_INTEGRATIONS)}, got {integration!r}")
    betas = p[:-1] if integration == "left" else p[1:]
    widths = jnp.asarray(np.diff(p), log_weights.dtype)
    b = jnp.asarray(betas, log_weights.dtype)
    pi = jax.nn.softmax(b[:, None] * log_weights[..., None, :], axis=-1)     # (..., S, K)
    means = jnp.sum(pi * log_weights[..., None, :], axis=-1)                 # (..., S)
    return jnp.sum(widths * means, axis=-1)


def _covariance_term(log_weights: jax.Array, log_q: jax.Array, partition: np.ndarray,
                     integration: str) -> jax.Array:
    """``sum_j Delta_j sum_k sg(pi_jk (log w~_k - E_j)) log q_k``: the sampling part of the
    covariance gradient, zero in value."""
    sg = jax.lax.stop_gradient
    lw = sg(log_weights)
    betas = partition[:-1] if integration == "left" else partition[1:]
    widths = jnp.asarray(np.diff(partition), lw.dtype)
    b = jnp.asarray(betas, lw.dtype)
    pi = jax.nn.softmax(b[:, None] * lw[..., None, :], axis=-1)               # (B, S, K)
    centred = lw[..., None, :] - jnp.sum(pi * lw[..., None, :], axis=-1, keepdims=True)
    coef = jnp.sum(widths[:, None] * pi * centred, axis=-2)                   # (B, K)
    return jnp.sum(coef * (log_q - sg(log_q)), axis=-1)


def tvo(model: Model, guide: Guide, *, num_samples: int, partition=None, num_partitions: int = 10,
        log_beta_min: float = -1.09, integration: str = "left", estimator: str = "score") -> LossFn:
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

    Args:
      model: a :class:`~jaxelbo.Model`.
      guide: a :class:`~jaxelbo.Guide`; reparameterised for ``reparam``.
      num_samples: K >= 1 draws per example, shared by every beta.
      partition: an explicit partition ``0 = beta_0 < ... < beta_S = 1``, both ends included
        (overrides ``num_partitions`` and ``log_beta_min``).
      num_partitions: S, the number of intervals of the log-uniform schedule (default 10).
      log_beta_min: ``log10 beta_1`` of the log-uniform schedule (default -1.09).
      integration: ``"left"`` (default, ``TVO_L``) or ``"right"`` (``TVO_U``).
      estimator: ``score`` (default, the covariance gradient) or ``reparam``.

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
    """
    check_model_guide(model, guide)
    k = check_count("num_samples", num_samples)
    if partition is None:
        part = log_uniform_partition(num_partitions, log_beta_min)
    else:
        part = _check_partition(partition)
    if integration not in _INTEGRATIONS:
        raise ValueError(f"tvo: integration must be one of {', '.join(_INTEGRATIONS)}, got {integration!r}")
    if not isinstance(estimator, str) or estimator not in TVO_ESTIMATORS:
        raise ValueError(f"objective 'tvo' does not support estimator {estimator!r}; "
                         f"valid choices for tvo: {', '.join(TVO_ESTIMATORS)}")
    sign = -1.0 if integration == "left" else 1.0

    def bound_fn(lw: jax.Array) -> jax.Array:
        return tvo_bound(lw, part, integration)

    def loss_fn(params: dict, rng: jax.Array, x: PyTree) -> tuple[jax.Array, dict]:
        check_inputs(model, guide, params, rng, x)
        if estimator == "reparam":
            value, log_w = est.pathwise_surrogate(model, guide, params, rng, x, sample_shape=(k,),
                                                  bound_fn=bound_fn, estimator="reparam")
            surrogate = value
        else:
            keys = sample_keys(rng, batch_size_of(x), k)
            _, log_p, log_q = sample_and_log_weights(model, guide, params, keys, x, stop_z=True)
            log_w = log_p - log_q
            value = bound_fn(log_w)
            surrogate = value + _covariance_term(log_w, log_q, part, integration)
        log_w = jax.lax.stop_gradient(log_w)
        aux = {"bound": jax.lax.stop_gradient(value), "log_weights": log_w,
               "ess": effective_sample_size(log_w, axis=-1), "partition": jnp.asarray(part, log_w.dtype)}
        if psis_tail_size(k) >= 5:
            aux["khat"] = psis_khat(log_w)
        return sign * jnp.mean(surrogate), aux

    loss_fn.__name__ = f"tvo_{integration}_{estimator}_loss"
    loss_fn.__doc__ = f"{'-' if sign < 0 else '+'}mean TVO ({integration}); gradient: {estimator}. Returns (loss, aux)."
    return loss_fn
