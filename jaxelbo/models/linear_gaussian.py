"""The linear-Gaussian toy of Rainforth et al. (2018, arXiv:1802.04537), with closed forms.

Model: ``p(z) = N(mu, I)``, ``p(x | z) = N(z, I)`` in D dimensions, ``theta = {"mu"}``.
Guide: ``q(z | x) = N(A x + b, s^2 I)``, ``phi = {"A", "b", "log_scale"}`` (or
``{"A", "b"}`` with ``s`` fixed).

Closed forms: ``p(x) = N(mu, 2 I)``; ``p(z | x) = N((x + mu) / 2, I / 2)``, so the
optimal guide is ``A = I / 2``, ``b = mu / 2``, ``s^2 = 1 / 2``, where the ELBO equals
``log p(x)`` and every sample has the same weight. The ELBO of the Gaussian guide is

.. math::

   \\mathcal{L}(x) = -D \\log 2\\pi - \\tfrac12 \\|m - \\mu\\|^2 - \\tfrac12 \\|x - m\\|^2
     - D s^2 + \\tfrac D2 \\log(2\\pi e s^2), \\qquad m = A x + b,

and ``jax.grad`` of :func:`exact_elbo` is its exact gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxelbo.types import Guide, Model

LOG_2PI = math.log(2.0 * math.pi)


def _normal_logpdf(v: jax.Array, mean: jax.Array, var) -> jax.Array:
    """``sum_d log N(v_d; mean_d, var)`` for isotropic variance ``var``."""
    return -0.5 * jnp.sum(LOG_2PI + jnp.log(var) + (v - mean) ** 2 / var)


def model() -> Model:
    """``p(z) = N(mu, I)``, ``p(x | z) = N(z, I)``; ``theta = {"mu": (D,)}``, with ancestral ``sample``."""
    def sample(theta, rng):
        rng_z, rng_x = jax.random.split(rng)
        z = theta["mu"] + jax.random.normal(rng_z, jnp.shape(theta["mu"]))
        return z, z + jax.random.normal(rng_x, jnp.shape(z))

    return Model(log_prior=lambda theta, z: _normal_logpdf(z, theta["mu"], 1.0),
                 log_likelihood=lambda theta, x, z: _normal_logpdf(x, z, 1.0), sample=sample)


def guide_mean_scale(phi: dict, x: jax.Array, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean ``A x + b`` and standard deviation of ``q(z | x)``."""
    s = jnp.exp(phi["log_scale"]) if scale is None else jnp.asarray(scale, x.dtype)
    return phi["A"] @ x + phi["b"], s


def guide(scale: float | None = None) -> Guide:
    """``q(z | x) = N(A x + b, s^2 I)``, reparameterised as ``z = A x + b + s eps``.

    Args:
      scale: ``None`` learns ``s`` through ``phi["log_scale"]``; a float fixes it
        (Rainforth et al. use ``s^2 = 2/3`` in the SNR experiments).
    """
    def sample(phi, rng, x):
        mean, s = guide_mean_scale(phi, x, scale)
        return mean + s * jax.random.normal(rng, mean.shape, mean.dtype)

    def log_prob(phi, x, z):
        mean, s = guide_mean_scale(phi, x, scale)
        return _normal_logpdf(z, mean, s * s)

    return Guide(sample=sample, log_prob=log_prob)


def optimal_params(mu: jax.Array, scale: float | None = None) -> dict:
    """Model at ``mu`` and the exact-posterior guide ``A = I/2, b = mu/2, s^2 = 1/2``."""
    mu = jnp.asarray(mu)
    d = mu.shape[-1]
    phi = {"A": 0.5 * jnp.eye(d, dtype=mu.dtype), "b": 0.5 * mu}
    if scale is None:
        phi["log_scale"] = jnp.asarray(0.5 * math.log(0.5), mu.dtype)
    return {"model": {"mu": mu}, "guide": phi}


def sample_data(rng: jax.Array, mu: jax.Array, num_points: int) -> jax.Array:
    """``x_n = z_n + eps_n`` with ``z_n ~ N(mu, I)``: ``num_points`` draws of shape ``(N, D)``."""
    k_z, k_x = jax.random.split(rng)
    shape = (num_points, mu.shape[-1])
    z = jnp.broadcast_to(mu, shape) + jax.random.normal(k_z, shape, mu.dtype)
    return z + jax.random.normal(k_x, shape, mu.dtype)


def log_marginal(theta: dict, x: jax.Array) -> jax.Array:
    """Exact ``log p(x) = log N(x; mu, 2 I)`` for a batch ``(B, D)``: shape ``(B,)``."""
    return jax.vmap(lambda xi: _normal_logpdf(xi, theta["mu"], 2.0))(x)


def posterior(theta: dict, x: jax.Array) -> tuple[jax.Array, float]:
    """Exact posterior ``p(z | x) = N((x + mu)/2, I/2)``: mean (shaped like ``x``) and variance."""
    return 0.5 * (x + jnp.broadcast_to(theta["mu"], jnp.shape(x))), 0.5


def _expected_log_likelihood_and_kl(params: dict, x: jax.Array, scale: float | None):
    """Per example: ``E_q[log p(x|z)] = -D/2 log 2pi - (||x - m||^2 + D s^2)/2`` and
    ``KL(q(z|x) || p(z)) = (D s^2 + ||m - mu||^2 - D - D log s^2)/2``."""
    theta, phi = params["model"], params["guide"]

    def one(xi):
        m, s = guide_mean_scale(phi, xi, scale)
        d = xi.shape[-1]
        var = s * s
        ell = -0.5 * d * LOG_2PI - 0.5 * (jnp.sum((xi - m) ** 2) + d * var)
        kl = 0.5 * (d * var + jnp.sum((m - theta["mu"]) ** 2) - d - d * jnp.log(var))
        return ell, kl

    return jax.vmap(one)(x)


def exact_elbo(params: dict, x: jax.Array, scale: float | None = None) -> jax.Array:
    """Analytic ELBO ``E_q[log p(x|z)] - KL(q(z|x) || p(z))`` of the Gaussian guide for a
    batch ``(B, D)``: shape ``(B,)``."""
    ell, kl = _expected_log_likelihood_and_kl(params, x, scale)
    return ell - kl


def exact_kl(params: dict, x: jax.Array, scale: float | None = None) -> jax.Array:
    """``KL(q(z|x) || p(z))`` for a batch, analytic: shape ``(B,)``."""
    return _expected_log_likelihood_and_kl(params, x, scale)[1]
