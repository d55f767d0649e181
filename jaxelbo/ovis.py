r"""OVIS: optimal control variates for the score-function gradient of IWAE
(Liévin, Dittadi, Christensen & Winther 2020, arXiv:2008.01998).

For ``L = log 1/K sum_j w~_j`` and ``v = softmax(log w~)``, the score-function gradient
with ``z`` held constant is

.. math:: \nabla_\phi \mathbb{E}[L] = \mathbb{E}\Big[\sum_k (d_k - c_k)\,
   \nabla_\phi \log q_\phi(z_k|x)\Big], \qquad d_k = L - v_k,

for any control variate ``c_k`` that does not depend on ``z_k`` (then
``E[c_k grad log q(z_k)] = 0``). The variance is smallest for
``c_k^* = E_{z_k}[d_k | z_{-k}]`` (the paper's eq. 12, up to a term the paper neglects).

- ``ovis-mc`` estimates ``c_k^*`` with S auxiliary draws ``z'_s ~ q`` used only for
  the control variate (the paper's "exclusive" variant): ``c_k = 1/S sum_s
  d_k(z'_s, z_{-k})``, where ``d_k(z'_s, z_{-k})`` is ``d_k`` with ``w~_k`` replaced by
  ``w~'_s``. It depends on ``z_{-k}`` and the auxiliary draws only, so the estimator is
  **unbiased**.
- ``ovis`` (the paper's OVIS~, eq. 17) uses the asymptotic form
  ``c_k = log Z_{-k} - gamma v_k + (1 - gamma) log(1 - 1/K)`` with
  ``Z_{-k} = 1/(K-1) sum_{j != k} w~_j``; ``gamma = 1`` (the paper's default, the
  large-ESS limit) and ``gamma = 0`` (the ESS ~ 1 limit). Because of the ``gamma v_k``
  term, **this control variate depends on z_k**, and the estimator is biased for
  ``gamma != 0``: it adds ``gamma E[sum_k v_k grad log q(z_k)]``, a wake-phi-like
  direction that does not vanish as K grows while the IWAE gradient does. Exact
  enumeration on a 3-state model (``tests/test_ovis.py``) measures a bias of 0.32, 0.64
  and 0.99 times the exact gradient at K = 2, 3, 4. With ``gamma = 0`` it is unbiased.
  Its learning signal is

  .. math:: d_k - c_k = \gamma\log(1 - 1/K) - \log(1 - v_k) - (1 - \gamma) v_k ,

  computed with ``log(1 - v_k) = LSE_{-k} - LSE`` (stable as ``v_k -> 1``).

Here, in :func:`jaxelbo.estimators.score_surrogate`'s convention, the *signal* is
``L - c_k``; the ``-v_k`` of ``d_k`` comes from differentiating ``L`` itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxelbo._validation import check_inputs
from jaxelbo.estimators import leave_one_out_logsumexp, score_surrogate
from jaxelbo.psis import psis_khat, psis_tail_size
from jaxelbo.types import Guide, LossFn, Model, PyTree
from jaxelbo.weights import batch_size_of, effective_sample_size, log_mean_exp, sample_and_log_weights, sample_keys

__all__ = ["DEFAULT_GAMMA", "ovis_asymptotic_signal", "ovis_mc_loss", "ovis_mc_signal"]

#: The paper's default ``gamma`` of OVIS~ (``ovis-gamma1`` in the authors' experiments).
DEFAULT_GAMMA = 1.0

sg = jax.lax.stop_gradient


def ovis_asymptotic_signal(log_weights: jax.Array, gamma: float = DEFAULT_GAMMA) -> jax.Array:
    """OVIS~'s signal ``L - c_k = gamma log(1 - 1/K) - log(1 - v_k) + gamma v_k`` (K >= 2).

    Example:
      >>> import jax.numpy as jnp
      >>> s = ovis_asymptotic_signal(jnp.zeros((1, 4)))   # uniform weights: v_k = 1/K
      >>> bool(jnp.allclose(s, 0.25))
      True
    """
    k = log_weights.shape[-1]
    if k < 2:
        raise ValueError("ovis needs num_samples >= 2 (its control variate leaves one sample out)")
    lse = jax.nn.logsumexp(log_weights, axis=-1, keepdims=True)
    log_one_minus_v = leave_one_out_logsumexp(log_weights) - lse
    v = jnp.exp(log_weights - lse)
    return gamma * math.log(1.0 - 1.0 / k) - log_one_minus_v + gamma * v


def ovis_mc_signal(log_weights: jax.Array, aux_log_weights: jax.Array) -> jax.Array:
    r"""OVIS-MC's signal ``L - c_k`` with ``c_k = 1/S sum_s d_k(z'_s, z_{-k})``.

    .. math:: d_k(z'_s, z_{-k}) = \log\frac1K\big(\textstyle\sum_{j\ne k}\tilde w_j + \tilde w'_s\big)
       - \frac{\tilde w'_s}{\sum_{j \ne k}\tilde w_j + \tilde w'_s}

    Args:
      log_weights: ``(B, K)``, K >= 2.
      aux_log_weights: ``(B, S)`` log-weights of the auxiliary draws.
    """
    k = log_weights.shape[-1]
    if k < 2:
        raise ValueError("ovis-mc needs num_samples >= 2 (its control variate leaves one sample out)")
    loo = leave_one_out_logsumexp(log_weights)[..., :, None]                # (B, K, 1)
    a = aux_log_weights[..., None, :]                                        # (B, 1, S)
    lse_replaced = jnp.logaddexp(loo, a)                                     # (B, K, S)
    d = lse_replaced - math.log(k) - jnp.exp(a - lse_replaced)
    return log_mean_exp(log_weights)[..., None] - jnp.mean(d, axis=-1)


def ovis_mc_loss(model: Model, guide: Guide, *, num_samples: int, num_auxiliary: int) -> LossFn:
    """IWAE_K with the OVIS-MC score-function gradient (S = ``num_auxiliary`` extra draws).

    The value and ``theta``'s gradient use the K draws only (drawn from ``rng`` as every
    other estimator's); the S auxiliary draws, from ``fold_in(rng, 1)``, enter the control
    variate alone. See :func:`jaxelbo.iwae` (``estimator="ovis-mc"``).
    """
    k, s = num_samples, num_auxiliary

    def loss_fn(params: dict, rng: jax.Array, x: PyTree) -> tuple[jax.Array, dict]:
        check_inputs(model, guide, params, rng, x)
        batch = batch_size_of(x)
        aux_keys = sample_keys(jax.random.fold_in(rng, 1), batch, s)
        _, aux_p, aux_q = sample_and_log_weights(model, guide, sg(params), aux_keys, x, stop_z=True)
        aux_log_w = sg(aux_p - aux_q)
        # the score-function routing of every other estimator: phi gets the signals on dlog q/dphi
        # (and the direct term), theta c_k, x and closed-over arrays the plain derivative of the value
        surrogate, log_w = score_surrogate(model, guide, params, rng, x, sample_shape=(k,), bound_fn=log_mean_exp,
                                           signal_fn=lambda lw: ovis_mc_signal(lw, aux_log_w), direct=True)
        lw = sg(log_w)
        aux = {"bound": sg(surrogate), "log_weights": lw, "ess": effective_sample_size(lw, axis=-1)}
        if psis_tail_size(k) >= 5:
            aux["khat"] = psis_khat(lw)
        return -jnp.mean(surrogate), aux

    loss_fn.__name__ = "iwae_ovis-mc_loss"
    loss_fn.__doc__ = f"-mean iwae bound; gradient: OVIS-MC with {s} auxiliary draws. Returns (loss, aux)."
    return loss_fn
