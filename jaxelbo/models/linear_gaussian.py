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


def _posterior_and_guide_moments(params: dict, x: jax.Array, scale: float | None):
    """Per example ``(x (D,))``: posterior mean, guide mean and guide variance."""
    theta, phi = params["model"], params["guide"]
    m, s = guide_mean_scale(phi, x, scale)
    return 0.5 * (x + theta["mu"]), m, s * s


def exact_cubo(params: dict, x: jax.Array, n: float = 2.0, scale: float | None = None) -> jax.Array:
    """Closed-form ``CUBO_n = 1/n log E_q[w~^n]`` of the Gaussian guide for a batch ``(B, D)``: ``(B,)``.

    With ``w~ = p(x) p(z|x) / q(z|x)``, ``E_q[w~^n] = p(x)^n int p(z|x)^n q(z|x)^(1-n) dz``,
    and per dimension, for ``p(z|x) = N(a, u)``, ``q = N(m, v)`` and ``s_n = n v + (1 - n) u > 0``,

    .. math:: \\log \\int p^n q^{1-n} = -\\frac{n (1-n) (a - m)^2}{2 s_n}
       - \\frac12 \\log s_n + \\frac{n}{2} \\log v + \\frac{1-n}{2} \\log u,

    so ``CUBO_n = log p(x) + (n - 1)/n D_n(p(z|x) || q)`` with ``D_n`` the Renyi divergence
    of order n. ``n = 1`` gives ``log p(x)``; it is ``+inf`` where ``s_n <= 0`` (the
    guide is too narrow for the n-th moment to exist).
    """
    def one(xi):
        a, m, v = _posterior_and_guide_moments(params, xi, scale)
        u = 0.5
        s_n = n * v + (1.0 - n) * u
        log_int = (-n * (1.0 - n) * (a - m) ** 2 / (2.0 * s_n) - 0.5 * jnp.log(s_n)
                   + 0.5 * n * jnp.log(v) + 0.5 * (1.0 - n) * math.log(u))
        return jnp.where(s_n > 0, jnp.sum(log_int) / n, jnp.inf)

    return log_marginal(params["model"], x) + jax.vmap(one)(x)


def exact_tvo_integrand(params: dict, x: jax.Array, beta: jax.Array, scale: float | None = None) -> jax.Array:
    """Closed-form ``E_{pi_beta}[log w~]`` for a batch ``(B, D)`` and ``beta`` of shape ``(S,)``: ``(B, S)``.

    ``pi_beta ∝ q(z|x)^(1-beta) p(x, z)^beta`` is Gaussian per dimension, with precision
    ``(1 - beta)/v + beta/u`` (``q = N(m, v)``, ``p(z|x) = N(a, u)``, ``u = 1/2``) and
    mean ``((1 - beta) m/v + beta a/u) / precision``; ``log w~ = log p(x) + log N(z; a, u)
    - log N(z; m, v)`` is quadratic in z, so its expectation is exact. ``beta = 0`` gives
    the ELBO and ``beta = 1`` the EUBO ``E_{p(z|x)}[log w~]``; the integral over
    ``[0, 1]`` is ``log p(x)`` (the thermodynamic identity).
    """
    beta = jnp.asarray(beta)

    def one(xi):
        a, m, v = _posterior_and_guide_moments(params, xi, scale)
        u = 0.5
        b = beta[:, None]
        prec = (1.0 - b) / v + b / u
        mean = ((1.0 - b) * m / v + b * a / u) / prec
        var = 1.0 / prec
        e_p = -0.5 * (LOG_2PI + math.log(u) + (var + (mean - a) ** 2) / u)
        e_q = -0.5 * (LOG_2PI + jnp.log(v) + (var + (mean - m) ** 2) / v)
        return jnp.sum(e_p - e_q, axis=-1)

    return log_marginal(params["model"], x)[:, None] + jax.vmap(one)(x)
