"""Layer 2: importance log-weights over K samples and a batch.

For one example ``x`` and ``K`` draws ``z_k = t(eps_k, phi; x)`` from the guide,

.. math::

   \\log \\tilde w_k = \\log p_\\theta(x, z_k) - \\log q_\\phi(z_k \\mid x),
   \\qquad w_k = \\mathrm{softmax}(\\log \\tilde w)_k,
   \\qquad \\mathrm{ESS} = 1 / \\textstyle\\sum_k w_k^2 .

Everything here is vmapped twice: over the samples (``x`` and the parameters are not
batched on that axis, so work that depends only on ``x``, such as an encoder, is done
once per example) and over the batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxelbo._validation import batch_size_of, check_inputs
from jaxelbo.types import Guide, Model, PyTree, log_joint

__all__ = ["batch_size_of", "effective_sample_size", "leave_one_out_logsumexp", "leave_one_out_mean",
           "log_joint_latents", "log_mean_exp", "log_prob_latents", "log_weights", "normalized_weights",
           "sample_and_log_weights", "sample_keys", "sample_latents"]


def sample_keys(rng: jax.Array, batch_size: int, num_samples: int) -> jax.Array:
    """One key per (example, sample): shape ``(batch_size, num_samples)`` of keys."""
    return jax.random.split(rng, (batch_size, num_samples))


def _per_example(fn: Callable, *in_axes) -> Callable:
    """vmap ``fn`` over samples (inner) and examples (outer).

    ``in_axes`` gives, per argument, ``"sample"`` (batched on both axes), ``"example"``
    (batched over examples only) or ``None`` (shared).
    """
    inner = tuple(0 if a == "sample" else None for a in in_axes)
    outer = tuple(0 if a in ("sample", "example") else None for a in in_axes)
    return jax.vmap(jax.vmap(fn, in_axes=inner), in_axes=outer)


def sample_latents(guide: Guide, phi: PyTree, keys: jax.Array, x: PyTree) -> PyTree:
    """``z[b, k] = guide.sample(phi, keys[b, k], x[b])``, leaves shaped ``(B, K, ...)``."""
    return _per_example(guide.sample, None, "sample", "example")(phi, keys, x)


def log_prob_latents(guide: Guide, phi: PyTree, x: PyTree, z: PyTree) -> jax.Array:
    """``log q_phi(z[b, k] | x[b])``, shape ``(B, K)``."""
    return _per_example(guide.log_prob, None, "example", "sample")(phi, x, z)


def log_joint_latents(model: Model, theta: PyTree, x: PyTree, z: PyTree) -> jax.Array:
    """``log p_theta(x[b], z[b, k])``, shape ``(B, K)``."""
    return _per_example(functools.partial(log_joint, model), None, "example", "sample")(theta, x, z)


def sample_and_log_weights(model: Model, guide: Guide, params: dict, keys: jax.Array, x: PyTree, *,
                           log_q_params: PyTree | None = None,
                           stop_z: bool = False) -> tuple[PyTree, jax.Array, jax.Array]:
    """Draw ``z[b, n] ~ q(. | x[b])`` with one key per draw and weigh the draws.

    The one sample-then-weigh step behind :func:`log_weights`, the estimators' surrogates
    and :func:`jaxelbo.importance_resample`.

    Args:
      model, guide, params: as for the objectives (``params = {"model", "guide"}``).
      keys: ``(B, N)`` keys (:func:`sample_keys`).
      x: a batch with a leading axis B.
      log_q_params: where ``log q`` is evaluated (default ``params["guide"]``); the
        path-derivative estimators pass ``stop_gradient(phi)``.
      stop_z: no gradient through ``z`` (score-function estimators; ``z`` may be discrete).

    Returns:
      ``(z, log_p, log_q)``: latents with leaves ``(B, N, ...)``, ``log p_theta(x, z)`` and
      ``log q(z | x)`` of shape ``(B, N)``; the log-weights are ``log_p - log_q``.
    """
    phi = params["guide"]
    z = sample_latents(guide, phi, keys, x)
    if stop_z:
        z = jax.lax.stop_gradient(z)
    log_p = log_joint_latents(model, params["model"], x, z)
    log_q = log_prob_latents(guide, phi if log_q_params is None else log_q_params, x, z)
    return z, log_p, log_q


def log_weights(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                num_samples: int) -> jax.Array:
    """Plain log-weights ``log p(x, z_k) - log q(z_k | x)`` of shape ``(B, num_samples)``.

    Differentiating this is the total (``reparam``) derivative.

    Example:
      >>> import jax, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> params = lg.optimal_params(jax.numpy.zeros(3))
      >>> x = jax.numpy.ones((2, 3))
      >>> je.log_weights(lg.model(), lg.guide(), params, jax.random.key(0), x, num_samples=5).shape
      (2, 5)
    """
    check_inputs(model, guide, params, rng, x)
    keys = sample_keys(rng, batch_size_of(x), num_samples)
    _, log_p, log_q = sample_and_log_weights(model, guide, params, keys, x)
    return log_p - log_q


def normalized_weights(log_weights: jax.Array, axis: int = -1) -> jax.Array:
    """Self-normalised importance weights ``w = softmax(log w~)`` along ``axis``."""
    return jax.nn.softmax(log_weights, axis=axis)


def effective_sample_size(log_weights: jax.Array, axis: int = -1) -> jax.Array:
    """Kish's effective sample size ``1 / sum_k w_k^2``, computed in log space.

    ``log ESS = -logsumexp(2 log w)`` with ``log w = log_softmax(log w~)``; it lies in
    ``[1, K]``.
    """
    log_w = jax.nn.log_softmax(log_weights, axis=axis)
    return jnp.exp(-jax.nn.logsumexp(2.0 * log_w, axis=axis))


def log_mean_exp(log_weights: jax.Array, axis: int = -1) -> jax.Array:
    """``log (1/K sum_k exp(log w~_k))``: the IWAE bound of one set of K log-weights."""
    k = log_weights.shape[axis]
    return jax.nn.logsumexp(log_weights, axis=axis) - math.log(k)


# --------------------------------------------------------------------------------------
# Leave-one-out reductions (baselines that do not depend on z_k)
# --------------------------------------------------------------------------------------


def leave_one_out_logsumexp(log_weights: jax.Array) -> jax.Array:
    """``LSE_{-k} = log sum_{j != k} exp(log w~_j)`` for every k, along the last axis.

    O(K) and stable for any spread of log-weights: every k except the arg-max subtracts
    its own term from a sum that contains ``exp(0) = 1`` (the maximum), so there is no
    catastrophic cancellation; the arg-max's value is a masked sum around the runner-up.
    Requires K >= 2.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxelbo.weights import leave_one_out_logsumexp
      >>> lse = leave_one_out_logsumexp(jnp.log(jnp.array([1.0, 2.0, 3.0])))
      >>> bool(jnp.allclose(lse, jnp.log(jnp.array([5.0, 4.0, 3.0]))))
      True
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
    """``mean_{j != k} log w~_j`` for every k, along the last axis (K >= 2).

    A zero weight (``log w~_j = -inf``, a zero-probability state) makes the mean of every
    set that holds it ``-inf`` and leaves the others finite, with finite gradients:
    ``-inf`` is summed as 0 and counted apart, never subtracted from itself.
    """
    k = log_weights.shape[-1]
    zero = jnp.isneginf(log_weights)
    finite = jnp.where(zero, jnp.zeros_like(log_weights), log_weights)
    mean = (jnp.sum(finite, axis=-1, keepdims=True) - finite) / (k - 1)
    zeros_elsewhere = jnp.sum(zero, axis=-1, keepdims=True, dtype=jnp.int32) - zero.astype(jnp.int32) > 0
    return jnp.where(zeros_elsewhere, -jnp.inf, mean)
