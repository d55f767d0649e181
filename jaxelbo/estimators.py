"""Layer 3: gradient estimators, as surrogates built from log-weights.

An objective (layer 4) is a bound ``F(log w~)`` of the K log-weights of one example. An
*estimator* is a way of building a surrogate ``S`` with ``S == F`` in value whose
gradient is an unbiased (or knowingly biased) Monte Carlo estimate of ``grad E[F]``.
``theta`` enters only through ``log p_theta(x, z)`` and always receives the objective's
own weights ``c_k = dF / dlog w~_k``; the estimators differ in what ``phi`` receives:

``reparam``
  Plain autodiff through ``z_k = t(eps_k, phi)`` and ``log q_phi``: the total derivative
  ``sum_k c_k (dlog w~_k/dz_k dz_k/dphi - dlog q_phi(z_k)/dphi)``
  (Kingma & Welling 2014, arXiv:1312.6114; Burda et al. 2016, arXiv:1509.00519).
``stl``
  "Sticking the landing" (Roeder, Wu & Duvenaud 2017, arXiv:1703.09194): ``log q`` is
  evaluated at ``stop_gradient(phi)``, keeping the path derivative
  ``g_k = dlog w~_k/dz_k dz_k/dphi`` and dropping the score term. Unbiased for the ELBO;
  biased for IWAE with K > 1 (Tucker et al. 2019).
``dreg``
  Doubly-reparameterised (Tucker, Lawson, Gu & Maddison 2019, arXiv:1810.04152). The
  score term ``E[sum_k c_k dlog q(z_k)/dphi]`` is rewritten by the reparameterisation
  identity ``E_q[f(z) dlog q/dphi] = E[df(z(eps, phi))/dz dz/dphi]`` applied to
  ``f = c_k(log w~)``, which depends on ``z_k`` through ``log w~_k``. The result is
  ``sum_k d_k g_k`` with ``d_k = c_k - dc_k / dlog w~_k``: ``w_k^2`` for IWAE,
  ``w_k - w_k^2`` for the RWS wake-phi update, and so on (each objective supplies
  ``d / c``). It costs one forward and one backward pass: a ``custom_vjp`` saves the
  ratio ``r_k = d_k / c_k`` in the forward pass and multiplies the cotangent of ``z_k``
  by it in the backward pass, so ``theta`` keeps ``c_k`` while ``phi`` gets ``d_k``.
``score``
  REINFORCE / likelihood ratio (Williams 1992; Paisley et al. 2012, arXiv:1206.6430;
  Mnih & Gregor 2014, arXiv:1402.0030): ``z`` is held constant and
  ``sum_k (L_k - b_k) dlog q(z_k)/dphi`` is added to the direct term, with a baseline
  ``b_k`` that does not depend on ``z_k`` (leave-one-out), so the estimate stays unbiased.
``vimco``
  Mnih & Rezende 2016 (arXiv:1602.06725): ``score`` for IWAE with the per-sample
  baseline ``L_{-k} = log 1/K (sum_{j != k} w~_j + exp(mean_{j != k} log w~_j))``.
  Works for discrete latents.

The two engines below, :func:`pathwise_surrogate` and :func:`score_surrogate`, are all
the machinery; the objectives only supply ``F`` and the per-sample ratios or signals.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxelbo.log_weights import (
    batch_size_of,
    log_joint_latents,
    log_mean_exp,
    log_prob_latents,
    sample_and_log_weights,
    sample_keys,
    sample_latents,
)
from jaxelbo.types import Guide, Model, PyTree

ESTIMATORS = ("reparam", "stl", "dreg", "score", "vimco", "ovis", "ovis-mc")  # ovis: jaxelbo.ovis
PATHWISE = ("reparam", "stl", "dreg")
SCORE_FUNCTION = ("score", "vimco")

sg = jax.lax.stop_gradient

BoundFn = Callable[[jax.Array], jax.Array]     # (B, *S) log-weights -> (B,) bound
RatioFn = Callable[[jax.Array], jax.Array]     # (B, *S) log-weights -> (B, *S) d / c
SignalFn = Callable[[jax.Array], jax.Array]    # (B, *S) log-weights -> (B, *S) learning signal


# --------------------------------------------------------------------------------------
# Leave-one-out reductions (baselines that do not depend on z_k)
# --------------------------------------------------------------------------------------


def leave_one_out_logsumexp(log_weights: jax.Array) -> jax.Array:
    """``LSE_{-k} = log sum_{j != k} exp(log w~_j)`` for every k, along the last axis.

    O(K) and stable for any spread of log-weights: every k except the arg-max subtracts
    its own term from a sum that contains ``exp(0) = 1`` (the maximum), so there is no
    catastrophic cancellation; the arg-max's value is a masked sum around the runner-up.
    Requires K >= 2.
    """
    k = log_weights.shape[-1]
    if k < 2:
        raise ValueError("leave-one-out needs at least 2 samples")
    top = jnp.argmax(log_weights, axis=-1, keepdims=True)
    is_top = jnp.arange(k).reshape((1,) * (log_weights.ndim - 1) + (k,)) == top
    m1 = jnp.max(log_weights, axis=-1, keepdims=True)
    s1 = jnp.sum(jnp.exp(log_weights - m1), axis=-1, keepdims=True)
    # the arg-max's slot of `rest` is unused; keep it finite so that gradients stay finite
    rest = jnp.log(jnp.where(is_top, 1.0, s1 - jnp.exp(log_weights - m1))) + m1
    others = jnp.where(is_top, -jnp.inf, log_weights)
    lse_without_top = jax.nn.logsumexp(others, axis=-1, keepdims=True)
    return jnp.where(is_top, lse_without_top, rest)


def leave_one_out_mean(log_weights: jax.Array) -> jax.Array:
    """``mean_{j != k} log w~_j`` for every k, along the last axis (K >= 2)."""
    k = log_weights.shape[-1]
    return (jnp.sum(log_weights, axis=-1, keepdims=True) - log_weights) / (k - 1)


def iwae_score_signal(log_weights: jax.Array) -> jax.Array:
    """Learning signal ``L - b_k`` of ``z_k`` for the IWAE score estimator.

    ``L = log 1/K sum_j w~_j`` and the baseline ``b_k = log 1/(K-1) sum_{j != k} w~_j``
    (the IWAE_{K-1} bound of the other samples) does not depend on ``z_k``. K = 1: b = 0.
    """
    bound = log_mean_exp(log_weights)[..., None]
    k = log_weights.shape[-1]
    if k == 1:
        return jnp.broadcast_to(bound, log_weights.shape)
    return bound - (leave_one_out_logsumexp(log_weights) - math.log(k - 1))


def vimco_signal(log_weights: jax.Array) -> jax.Array:
    """VIMCO learning signal ``L - L_{-k}`` (Mnih & Rezende 2016, eq. 10).

    ``L_{-k} = log 1/K (sum_{j != k} w~_j + exp(mean_{j != k} log w~_j))``: the bound
    with ``w~_k`` replaced by the geometric mean of the others. K = 1 has no other
    samples; the baseline is then 0 (plain REINFORCE).
    """
    bound = log_mean_exp(log_weights)[..., None]
    k = log_weights.shape[-1]
    if k == 1:
        return jnp.broadcast_to(bound, log_weights.shape)
    loo = jnp.logaddexp(leave_one_out_logsumexp(log_weights), leave_one_out_mean(log_weights))
    return bound - (loo - math.log(k))


def elbo_score_signal(log_weights: jax.Array) -> jax.Array:
    """Signal ``(log w~_k - b_k) / K`` for the K-sample ELBO, ``b_k = mean_{j != k} log w~_j``."""
    k = log_weights.shape[-1]
    if k == 1:
        return log_weights
    return (log_weights - leave_one_out_mean(log_weights)) / k


# --------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------


def _scale_leaves(tree: PyTree, r: jax.Array) -> PyTree:
    """Multiply every leaf of shape ``(B, N, ...)`` by ``r`` of shape ``(B, N)``."""
    def scale(leaf):
        return leaf * r.reshape(r.shape + (1,) * (leaf.ndim - r.ndim)).astype(leaf.dtype)

    return jax.tree_util.tree_map(scale, tree)


def _routed_log_weights(model: Model, guide: Guide, ratio_fn: RatioFn, sample_shape: tuple[int, ...],
                        direct: bool) -> Callable:
    """Log-weights ``(B, N)`` whose backward pass gives ``phi`` the cotangents ``r * c``.

    ``theta`` receives the incoming cotangent ``c`` unchanged (through ``log p``). The
    cotangent of ``z`` (from ``log p`` and ``log q``) and, when ``direct``, of ``log q``'s
    own dependence on ``phi`` are multiplied per sample by ``r = ratio_fn(log w~)``,
    computed once in the forward pass. One forward and one backward pass over the
    samples; nothing is evaluated twice.
    """

    def forward(theta, phi, keys, x):
        z, vjp_sample = jax.vjp(lambda p: sample_latents(guide, p, keys, x), phi)
        log_p, vjp_log_p = jax.vjp(lambda t, z: log_joint_latents(model, t, x, z), theta, z)
        if direct:
            log_q, vjp_log_q = jax.vjp(lambda p, z: log_prob_latents(guide, p, x, z), phi, z)
        else:
            log_q, vjp_log_q = jax.vjp(lambda z: log_prob_latents(guide, sg(phi), x, z), z)
        log_w = log_p - log_q
        batch = log_w.shape[0]
        ratio = ratio_fn(log_w.reshape((batch, *sample_shape))).reshape(log_w.shape)
        return log_w, (vjp_sample, vjp_log_p, vjp_log_q, ratio)

    def backward(residuals, g):
        vjp_sample, vjp_log_p, vjp_log_q, ratio = residuals
        g_theta, g_z_p = vjp_log_p(g)
        g_q = -g * ratio
        if direct:
            g_phi_direct, g_z_q = vjp_log_q(g_q)
        else:
            (g_z_q,) = vjp_log_q(g_q)
        g_z = jax.tree_util.tree_map(jnp.add, _scale_leaves(g_z_p, ratio), g_z_q)
        (g_phi,) = vjp_sample(g_z)
        if direct:
            g_phi = jax.tree_util.tree_map(jnp.add, g_phi, g_phi_direct)
        return g_theta, g_phi, None, None

    @jax.custom_vjp
    def routed(theta, phi, keys, x):
        return forward(theta, phi, keys, x)[0]

    routed.defvjp(forward, backward)
    return routed


def check_continuous_latents(guide: Guide, phi: PyTree, keys: jax.Array, x: PyTree, estimator: str) -> None:
    """Trace-time error when ``guide.sample`` returns a non-float ``z`` for a pathwise estimator.

    ``reparam``, ``stl`` and ``dreg`` differentiate through ``z = t(eps, phi)``; an integer
    (or boolean) ``z`` has no such derivative. Costs no FLOPs (``jax.eval_shape``).
    """
    z = jax.eval_shape(lambda p: sample_latents(guide, p, keys, x), phi)
    for path, leaf in jax.tree_util.tree_flatten_with_path(z)[0]:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            where = f" at {jax.tree_util.keystr(path)}" if path else ""
            raise TypeError(f"estimator {estimator!r} differentiates through z, but guide.sample returns a "
                            f"discrete z{where} (dtype {leaf.dtype}); for discrete latents use a "
                            f"score-function estimator: {' or '.join(map(repr, SCORE_FUNCTION))}")
    for path in _latents_without_derivative(guide, phi, keys, x):
        where = f" {jax.tree_util.keystr(path)}" if path else ""
        raise TypeError(f"estimator {estimator!r} differentiates through z, but z{where} from guide.sample carries "
                        f"no derivative with respect to phi (a discrete sample cast to float, or a stop_gradient): "
                        f"the pathwise gradient would be silently zero or biased; for discrete latents use a "
                        f"score-function estimator: {' or '.join(map(repr, SCORE_FUNCTION))}")


def _latents_without_derivative(guide: Guide, phi: PyTree, keys: jax.Array, x: PyTree) -> list:
    """Paths of the leaves of ``z`` whose derivative with respect to ``phi`` is symbolically zero.

    Traces the VJP of ``guide.sample`` (no FLOPs) and follows the data dependence back
    from the cotangent of ``phi`` to the cotangent of each leaf of ``z``. Conservative: an
    operation counts as depending on every input, so only a derivative that is zero by
    construction (an integer sample cast to float, ``stop_gradient``) is reported. A
    ``phi`` without floating-point leaves, or a guide whose VJP cannot be traced (a
    custom rule that raises), reports nothing.
    """
    phi_leaves = jax.tree_util.tree_leaves(phi)
    if not any(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in phi_leaves):
        return []
    z_shape = jax.eval_shape(lambda p: sample_latents(guide, p, keys, x), phi)
    z_paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(z_shape)[0]]

    def phi_cotangent(p, cotangent):
        _, vjp = jax.vjp(lambda q: sample_latents(guide, q, keys, x), p)
        return vjp(cotangent)

    try:
        closed = jax.make_jaxpr(phi_cotangent)(phi, jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype), z_shape))
    except Exception:  # a guide that refuses to be differentiated says so itself
        return []
    jaxpr = closed.jaxpr
    needed = {v for v in jaxpr.outvars if not hasattr(v, "val")}
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars):
            needed.update(v for v in eqn.invars if not hasattr(v, "val"))
    cotangent_vars = jaxpr.invars[len(phi_leaves):]
    return [path for path, var in zip(z_paths, cotangent_vars, strict=True) if var not in needed]


def pathwise_surrogate(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                       sample_shape: tuple[int, ...], bound_fn: BoundFn, estimator: str,
                       dreg_ratio: RatioFn | None = None,
                       phi_ratio: RatioFn | None = None) -> tuple[jax.Array, jax.Array]:
    """Surrogate bound for ``reparam``, ``stl`` or ``dreg``; returns ``(surrogate (B,), log_w)``.

    Args:
      sample_shape: ``(K,)`` or ``(M, K)``; the guide is sampled ``prod(sample_shape)``
        times per example.
      bound_fn: the bound of ``(B, *sample_shape)`` log-weights, shape ``(B,)``.
      dreg_ratio: ``d_k / c_k`` of the objective's DReG weights (needed for ``dreg``).
      phi_ratio: where ``phi`` optimises a different bound than ``theta`` (PIWAE), the
        ratio of ``phi``'s weights to ``theta``'s for ``reparam``/``stl``.
    """
    theta, phi = params["model"], params["guide"]
    batch = batch_size_of(x)
    keys = sample_keys(rng, batch, math.prod(sample_shape))
    check_continuous_latents(guide, phi, keys, x, estimator)
    ratio: RatioFn | None
    if estimator == "dreg":
        if dreg_ratio is None:
            raise ValueError("this objective has no DReG weights")
        ratio, direct = dreg_ratio, False
    else:
        ratio, direct = phi_ratio, estimator == "reparam"
    if ratio is None:
        _, log_p, log_q = sample_and_log_weights(model, guide, params, keys, x,
                                                 log_q_params=phi if direct else sg(phi))
        log_w = log_p - log_q
    else:
        log_w = _routed_log_weights(model, guide, ratio, sample_shape, direct)(theta, phi, keys, x)
    log_w = log_w.reshape((batch, *sample_shape))
    return bound_fn(log_w), log_w


def score_surrogate(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                    sample_shape: tuple[int, ...], bound_fn: BoundFn, signal_fn: SignalFn,
                    direct: bool = True) -> tuple[jax.Array, jax.Array]:
    """Score-function surrogate ``F(log w~) + sum_k sg(s_k) (log q_k - sg(log q_k))``.

    ``z`` is never differentiated (it may be discrete). ``theta`` gets ``c_k`` through
    ``log p``; ``phi`` gets the signals ``s_k`` on ``dlog q(z_k)/dphi`` plus, when
    ``direct``, the direct term ``-c_k dlog q(z_k)/dphi`` of ``F``.
    """
    batch = batch_size_of(x)
    keys = sample_keys(rng, batch, math.prod(sample_shape))
    _, log_p, log_q = sample_and_log_weights(model, guide, params, keys, x, stop_z=True)
    shape = (batch, *sample_shape)
    log_w = (log_p - (log_q if direct else sg(log_q))).reshape(shape)
    signal = sg(signal_fn(log_w))
    score = (log_q - sg(log_q)).reshape(shape)
    extra = jnp.sum((signal * score).reshape(batch, -1), axis=-1)
    return bound_fn(log_w) + extra, log_w
