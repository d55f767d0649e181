"""Layer 4: the bounds. Each factory returns a pure ``(params, rng, x) -> (loss, aux)``.

``loss`` equals ``-mean_b bound_b`` in value whatever the estimator; ``jax.grad(loss)``
is the chosen estimator of its gradient (see :mod:`jaxelbo.estimators`). ``aux`` holds
``bound`` ``(B,)``, ``log_weights`` ``(B, K)`` (``(B, M, K)`` for ``miwae``/``piwae``)
and ``ess`` ``(B,)``. Every factory validates its configuration when it is called, and
the shapes of the model, guide and batch when the loss is first traced.

Example:
  >>> import jax, jax.numpy as jnp, jaxelbo as je
  >>> lg = je.models.linear_gaussian
  >>> loss_fn = je.iwae(lg.model(), lg.guide(), num_samples=8, estimator="dreg")
  >>> params = lg.optimal_params(jnp.zeros(2))
  >>> x = jnp.ones((4, 2))
  >>> loss, aux = loss_fn(params, jax.random.key(0), x)
  >>> aux["log_weights"].shape
  (4, 8)
  >>> grads = jax.grad(lambda p: loss_fn(p, jax.random.key(0), x)[0])(params)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxelbo import estimators as est
from jaxelbo import log_weights as lw_lib
from jaxelbo.types import Guide, Model, PyTree

LossFn = Callable[[dict, jax.Array, PyTree], tuple[jax.Array, dict]]

#: Every objective and the estimators it supports (the design's table).
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "elbo": ("reparam", "stl", "score"),
    "iwae": ("reparam", "stl", "dreg", "score", "vimco"),
    "miwae": ("reparam", "stl", "dreg"),
    "ciwae": ("reparam", "stl", "dreg"),
    "piwae": ("reparam", "dreg"),
    "renyi": ("reparam", "stl", "dreg"),
    "rws": ("score", "dreg"),
}

_MAX_LOG_RATIO = 80.0  # exp(80) is finite in float32; see `piwae`.


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_model_guide(model: Model, guide: Guide) -> None:
    if not isinstance(model, Model):
        raise TypeError("model must be a jaxelbo.Model(log_prior, log_likelihood), "
                        f"got {type(model).__name__}")
    if not isinstance(guide, Guide):
        raise TypeError(f"guide must be a jaxelbo.Guide(sample, log_prob), got {type(guide).__name__}")


def check_inputs(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree) -> None:
    """Trace-time checks of ``params``, the batch and the per-example functions' shapes.

    Runs the model and guide abstractly (``jax.eval_shape``) on ``x[0]``: costs no FLOPs
    and, under ``jit``, happens once per compilation.
    """
    if not isinstance(params, dict) or set(params) != {"model", "guide"}:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise TypeError(f'params must be a dict {{"model": theta, "guide": phi}}, got {got}')
    lw_lib.batch_size_of(x)
    theta, phi = params["model"], params["guide"]
    x0 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), x)
    key = jax.eval_shape(lambda r: lw_lib.sample_keys(r, 1, 1)[0, 0], rng)
    shapes = jax.tree_util.tree_map(lambda s: s.shape, x0)
    try:
        z = jax.eval_shape(guide.sample, phi, key, x0)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"guide.sample(phi, rng, x[0]) failed on one example of shape {shapes}; "
                         f"is x a batch with a leading axis B? ({type(e).__name__}: {e})") from e
    z_shapes = jax.tree_util.tree_map(lambda s: s.shape, z)
    for name, fn, args in [("guide.log_prob(phi, x, z)", guide.log_prob, (phi, x0, z)),
                           ("model.log_prior(theta, z)", model.log_prior, (theta, z)),
                           ("model.log_likelihood(theta, x, z)", model.log_likelihood, (theta, x0, z))]:
        try:
            out = jax.eval_shape(fn, *args)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"{name} failed on the z of shape {z_shapes} that guide.sample returns "
                             f"(x[0] of shape {shapes}); do sample and log_prob agree? "
                             f"({type(e).__name__}: {e})") from e
        if not (hasattr(out, "shape") and out.shape == ()):
            got = jax.tree_util.tree_map(lambda s: s.shape, out)
            raise ValueError(f"{name} must return a scalar for one example, got shape {got} "
                             f"(z from guide.sample has shape {z_shapes}); sum over the latent and "
                             "data dimensions, and check that sample and log_prob agree")


# --------------------------------------------------------------------------------------
# The shared factory
# --------------------------------------------------------------------------------------


def _objective(name: str, model: Model, guide: Guide, *, estimator: str, sample_shape: tuple[int, ...],
               bound_fn: est.BoundFn, dreg_ratio: est.RatioFn | None = None,
               phi_ratio: est.RatioFn | None = None, signal_fn: dict | None = None,
               direct_score: bool = True) -> LossFn:
    _check_model_guide(model, guide)
    est.check_estimator(estimator, OBJECTIVES[name], name)

    def loss_fn(params: dict, rng: jax.Array, x: PyTree) -> tuple[jax.Array, dict]:
        check_inputs(model, guide, params, rng, x)
        if estimator in est.PATHWISE:
            surrogate, log_w = est.pathwise_surrogate(
                model, guide, params, rng, x, sample_shape=sample_shape, bound_fn=bound_fn,
                estimator=estimator, dreg_ratio=dreg_ratio, phi_ratio=phi_ratio)
        else:
            surrogate, log_w = est.score_surrogate(
                model, guide, params, rng, x, sample_shape=sample_shape, bound_fn=bound_fn,
                signal_fn=signal_fn[estimator], direct=direct_score)
        log_w = jax.lax.stop_gradient(log_w)
        ess = lw_lib.effective_sample_size(log_w, axis=-1)
        aux = {"bound": jax.lax.stop_gradient(surrogate), "log_weights": log_w,
               "ess": ess.reshape(ess.shape[0], -1).mean(axis=-1)}
        return -jnp.mean(surrogate), aux

    loss_fn.__name__ = f"{name}_{estimator}_loss"
    loss_fn.__doc__ = f"-mean {name} bound; gradient: {estimator} estimator. Returns (loss, aux)."
    return loss_fn


def _softmax(log_w: jax.Array) -> jax.Array:
    return jax.nn.softmax(log_w, axis=-1)


# --------------------------------------------------------------------------------------
# The bounds
# --------------------------------------------------------------------------------------


def elbo(model: Model, guide: Guide, *, num_samples: int = 1, estimator: str = "reparam") -> LossFn:
    """The K-sample ELBO, ``mean_k log w~_k`` (Kingma & Welling 2014, arXiv:1312.6114).

    .. math:: \\mathcal{L}_K = \\frac{1}{K} \\sum_k \\log \\frac{p_\\theta(x, z_k)}{q_\\phi(z_k|x)}

    Estimators: ``reparam``, ``stl`` (Roeder et al. 2017), ``score`` (leave-one-out
    baseline ``mean_{j != k} log w~_j`` when K > 1).
    """
    k = _check_count("num_samples", num_samples)
    return _objective("elbo", model, guide, estimator=estimator, sample_shape=(k,),
                      bound_fn=lambda lw: jnp.mean(lw, axis=-1),
                      signal_fn={"score": est.elbo_score_signal})


def iwae(model: Model, guide: Guide, *, num_samples: int, estimator: str = "reparam") -> LossFn:
    """The importance-weighted bound (Burda, Grosse & Salakhutdinov 2016, arXiv:1509.00519).

    .. math:: \\mathcal{L}_K = \\log \\frac{1}{K} \\sum_k \\tilde w_k
       \\;\\le\\; \\mathcal{L}_{K+1} \\;\\le\\; \\log p_\\theta(x)

    ``theta`` receives ``sum_k w_k grad log p(x, z_k)``. Estimators: ``reparam``, ``stl``
    (biased for K > 1), ``dreg`` (``phi`` gets ``sum_k w_k^2 g_k``; Tucker et al. 2019,
    arXiv:1810.04152), ``score`` (leave-one-out IWAE_{K-1} baseline), ``vimco`` (Mnih &
    Rezende 2016, arXiv:1602.06725).
    """
    k = _check_count("num_samples", num_samples)
    return _objective("iwae", model, guide, estimator=estimator, sample_shape=(k,),
                      bound_fn=lw_lib.log_mean_exp, dreg_ratio=_softmax,
                      signal_fn={"score": est.iwae_score_signal, "vimco": est.vimco_signal})


def miwae(model: Model, guide: Guide, *, num_outer: int, num_inner: int,
          estimator: str = "reparam") -> LossFn:
    """Mean of M independent IWAE_K bounds (Rainforth et al. 2018, arXiv:1802.04537).

    .. math:: \\mathcal{L}_{M,K} = \\frac{1}{M} \\sum_m \\log \\frac{1}{K} \\sum_k \\tilde w_{m,k}

    ``dreg`` gives ``phi`` the mean of the M IWAE-DReG terms.
    """
    m = _check_count("num_outer", num_outer)
    k = _check_count("num_inner", num_inner)
    return _objective("miwae", model, guide, estimator=estimator, sample_shape=(m, k),
                      bound_fn=lambda lw: jnp.mean(lw_lib.log_mean_exp(lw), axis=-1),
                      dreg_ratio=_softmax)


def ciwae(model: Model, guide: Guide, *, num_samples: int, beta: float,
          estimator: str = "reparam") -> LossFn:
    """Convex combination ``beta * ELBO_K + (1 - beta) * IWAE_K`` (Rainforth et al. 2018).

    The weights of sample k are ``c_k = beta/K + (1 - beta) w_k``; ``dreg`` applies only to
    the IWAE part: ``phi`` gets ``sum_k (beta/K + (1 - beta) w_k^2) g_k``.
    """
    k = _check_count("num_samples", num_samples)
    beta = _check_real("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")

    def bound_fn(lw):
        return beta * jnp.mean(lw, axis=-1) + (1.0 - beta) * lw_lib.log_mean_exp(lw)

    def dreg_ratio(lw):
        w = _softmax(lw)
        if beta == 0.0:
            return w
        return (beta / k + (1.0 - beta) * w * w) / (beta / k + (1.0 - beta) * w)

    return _objective("ciwae", model, guide, estimator=estimator, sample_shape=(k,),
                      bound_fn=bound_fn, dreg_ratio=dreg_ratio)


def piwae(model: Model, guide: Guide, *, num_outer: int, num_inner: int,
          estimator: str = "reparam") -> LossFn:
    """Partially importance-weighted auto-encoder (Rainforth et al. 2018, arXiv:1802.04537).

    ``theta`` is trained on IWAE_{MK} over all ``M*K`` samples (weights
    ``W_mk = softmax_all(log w~)``), ``phi`` on MIWAE_{M,K} (weights
    ``w_mk / M``, ``w`` normalised within group m), from the same samples in one pass.
    The reported bound (and the loss value) is IWAE_{MK}. ``dreg`` gives ``phi``
    ``1/M sum_mk w_mk^2 g_mk``.

    Numerics: ``phi``'s cotangents are ``theta``'s scaled by ``(w_mk / M) / W_mk``; a
    group whose share of the total weight underflows (below ``exp(-80)`` in float32)
    contributes nothing to ``phi``'s gradient.
    """
    m = _check_count("num_outer", num_outer)
    k = _check_count("num_inner", num_inner)

    def log_group_share(lw):  # log of (1/M) / (sum_k W_mk) = LSE_all - LSE_m - log M
        lse_m = jax.nn.logsumexp(lw, axis=-1, keepdims=True)
        lse_all = jax.nn.logsumexp(lw, axis=(-2, -1), keepdims=True)
        return lse_all - lse_m - math.log(m), lse_m

    def phi_ratio(lw):
        log_r, _ = log_group_share(lw)
        return jnp.broadcast_to(jnp.exp(jnp.minimum(log_r, _MAX_LOG_RATIO)), lw.shape)

    def dreg_ratio(lw):
        log_r, lse_m = log_group_share(lw)
        return jnp.exp(jnp.minimum(log_r + lw - lse_m, _MAX_LOG_RATIO))

    return _objective("piwae", model, guide, estimator=estimator, sample_shape=(m, k),
                      bound_fn=lambda lw: lw_lib.log_mean_exp(lw.reshape(lw.shape[0], -1)),
                      phi_ratio=phi_ratio, dreg_ratio=dreg_ratio)


def renyi(model: Model, guide: Guide, *, num_samples: int, alpha: float,
          estimator: str = "reparam") -> LossFn:
    """The variational Renyi bound (Li & Turner 2016, arXiv:1602.02311).

    .. math:: \\mathcal{L}_\\alpha = \\frac{1}{1-\\alpha}
       \\log \\frac{1}{K} \\sum_k \\tilde w_k^{1-\\alpha}

    ``alpha = 0`` is IWAE; ``alpha = 1`` is its limit, the ELBO (computed as such, not
    by dividing by zero). Both parameters get weights ``v = softmax((1 - alpha) log w~)``;
    ``dreg`` gives ``phi`` ``sum_k (alpha v_k + (1 - alpha) v_k^2) g_k``, from the same
    reparameterisation identity as IWAE-DReG (``alpha = 1`` reduces it to STL).
    """
    k = _check_count("num_samples", num_samples)
    alpha = _check_real("alpha", alpha)

    def bound_fn(lw):
        if alpha == 1.0:
            return jnp.mean(lw, axis=-1)
        return lw_lib.log_mean_exp((1.0 - alpha) * lw) / (1.0 - alpha)

    def dreg_ratio(lw):
        return alpha + (1.0 - alpha) * _softmax((1.0 - alpha) * lw)

    return _objective("renyi", model, guide, estimator=estimator, sample_shape=(k,),
                      bound_fn=bound_fn, dreg_ratio=dreg_ratio)


def rws(model: Model, guide: Guide, *, num_samples: int, estimator: str = "dreg") -> LossFn:
    """Reweighted wake-sleep (Bornschein & Bengio 2015, arXiv:1406.2751).

    ``theta`` ascends IWAE_K (``sum_k w_k grad log p(x, z_k)``); ``phi`` follows the
    wake-phi update, which minimises ``KL(p(z|x) || q_phi(z|x))``: ascent direction
    ``sum_k w_k grad log q(z_k)`` with ``z`` held constant (``score``), or its
    doubly-reparameterised form ``sum_k (w_k - w_k^2) g_k`` (``dreg``; Tucker et al.
    2019). The loss value is ``-IWAE_K``.
    """
    k = _check_count("num_samples", num_samples)
    return _objective("rws", model, guide, estimator=estimator, sample_shape=(k,),
                      bound_fn=lw_lib.log_mean_exp, dreg_ratio=lambda lw: 1.0 - _softmax(lw),
                      signal_fn={"score": _softmax}, direct_score=False)
