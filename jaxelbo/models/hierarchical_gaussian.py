r"""A two-layer linear-Gaussian toy with closed forms: a test bed for hierarchical guides.

Model (``theta = {"mu"}``), in D dimensions per layer:

.. math::

   p(z_2) = \mathcal N(\mu, I), \qquad p(z_1 \mid z_2) = \mathcal N(z_2, I), \qquad
   p(x \mid z_1) = \mathcal N(z_1, I), \qquad\text{so}\qquad p(x) = \mathcal N(\mu, 3I).

Guide (``phi = {"A1", "b1", "log_scale1", "A2", "b2", "log_scale2"}``), shaped like
the two-stochastic-layer VAE of Burda et al. (2016), ``q(z_1 | x) q(z_2 | z_1)``:

.. math::

   q(z_1 \mid x) = \mathcal N(A_1 x + b_1, s_1^2 I), \qquad
   q(z_2 \mid z_1) = \mathcal N(A_2 z_1 + b_2, s_2^2 I),

sampled ancestrally (``z_2`` depends on ``phi`` through ``z_1`` too). A latent is the
tuple ``(z_1, z_2)``. The exact posterior lies in the family:
``p(z_1 | x) = N((2x + mu)/3, 2I/3)`` and, since ``x`` is independent of ``z_2`` given
``z_1``, ``p(z_2 | z_1, x) = N((z_1 + mu)/2, I/2)``. With ``m_1 = A_1 x + b_1`` the ELBO
is analytic,

.. math::

   \mathcal L(x) = -\tfrac{3D}{2}\log 2\pi
     - \tfrac12\big(\|A_2 m_1 + b_2 - \mu\|^2 + s_1^2\|A_2\|_F^2 + D s_2^2\big)
     - \tfrac12\big(\|(I - A_2) m_1 - b_2\|^2 + s_1^2\|I - A_2\|_F^2 + D s_2^2\big)
     - \tfrac12\big(\|x - m_1\|^2 + D s_1^2\big)
     + \tfrac D2 \log(2\pi e s_1^2) + \tfrac D2 \log(2\pi e s_2^2),

and ``jax.grad`` of :func:`exact_elbo` is its exact gradient.

References:
  Burda, Grosse & Salakhutdinov (2016), arXiv:1509.00519 (two stochastic layers).
  Rainforth et al. (2018), arXiv:1802.04537 (the one-layer toy, :mod:`.linear_gaussian`).
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
    """``p(z_2) = N(mu, I)``, ``p(z_1 | z_2) = N(z_2, I)``, ``p(x | z_1) = N(z_1, I)``; ``z = (z_1, z_2)``,
    with ancestral ``sample``."""
    def log_prior(theta, z):
        z1, z2 = z
        return _normal_logpdf(z2, theta["mu"], 1.0) + _normal_logpdf(z1, z2, 1.0)

    def sample(theta, rng):
        k2, k1, kx = jax.random.split(rng, 3)
        mu = theta["mu"]
        z2 = mu + jax.random.normal(k2, jnp.shape(mu))
        z1 = z2 + jax.random.normal(k1, jnp.shape(z2))
        return (z1, z2), z1 + jax.random.normal(kx, jnp.shape(z1))

    return Model(log_prior=log_prior, log_likelihood=lambda theta, x, z: _normal_logpdf(x, z[0], 1.0),
                 sample=sample)


def guide() -> Guide:
    """``q(z_1 | x) q(z_2 | z_1)`` with linear means and learnt isotropic scales, reparameterised."""
    def sample(phi, rng, x):
        k1, k2 = jax.random.split(rng)
        z1 = phi["A1"] @ x + phi["b1"] + jnp.exp(phi["log_scale1"]) * jax.random.normal(k1, x.shape, x.dtype)
        m2 = phi["A2"] @ z1 + phi["b2"]
        return z1, m2 + jnp.exp(phi["log_scale2"]) * jax.random.normal(k2, m2.shape, m2.dtype)

    def log_prob(phi, x, z):
        z1, z2 = z
        return (_normal_logpdf(z1, phi["A1"] @ x + phi["b1"], jnp.exp(2.0 * phi["log_scale1"]))
                + _normal_logpdf(z2, phi["A2"] @ z1 + phi["b2"], jnp.exp(2.0 * phi["log_scale2"])))

    return Guide(sample=sample, log_prob=log_prob)


def optimal_params(mu: jax.Array) -> dict:
    """Model at ``mu`` and the exact-posterior guide: ``A_1 = 2I/3, b_1 = mu/3, s_1^2 = 2/3``,
    ``A_2 = I/2, b_2 = mu/2, s_2^2 = 1/2``."""
    mu = jnp.asarray(mu)
    eye = jnp.eye(mu.shape[-1], dtype=mu.dtype)
    phi = {"A1": 2.0 / 3.0 * eye, "b1": mu / 3.0, "log_scale1": jnp.asarray(0.5 * math.log(2.0 / 3.0), mu.dtype),
           "A2": 0.5 * eye, "b2": 0.5 * mu, "log_scale2": jnp.asarray(0.5 * math.log(0.5), mu.dtype)}
    return {"model": {"mu": mu}, "guide": phi}


def sample_data(rng: jax.Array, mu: jax.Array, num_points: int) -> jax.Array:
    """``num_points`` draws ``x ~ p(x) = N(mu, 3I)`` (ancestrally), shape ``(N, D)``."""
    shape = (num_points, mu.shape[-1])
    return jnp.broadcast_to(mu, shape) + jnp.sum(jax.random.normal(rng, (3, *shape), mu.dtype), axis=0)


def log_marginal(theta: dict, x: jax.Array) -> jax.Array:
    """Exact ``log p(x) = log N(x; mu, 3I)`` for a batch ``(B, D)``: shape ``(B,)``."""
    return jax.vmap(lambda xi: _normal_logpdf(xi, theta["mu"], 3.0))(x)


def exact_elbo(params: dict, x: jax.Array) -> jax.Array:
    """Analytic ELBO ``E_q[log p(x, z_1, z_2) - log q(z_1, z_2 | x)]`` for a batch ``(B, D)``: ``(B,)``."""
    mu, phi = params["model"]["mu"], params["guide"]
    a2 = phi["A2"]
    eye = jnp.eye(a2.shape[0], dtype=a2.dtype)
    var1, var2 = jnp.exp(2.0 * phi["log_scale1"]), jnp.exp(2.0 * phi["log_scale2"])

    def one(xi):
        d = xi.shape[-1]
        m1 = phi["A1"] @ xi + phi["b1"]
        log_p_z2 = -0.5 * (d * LOG_2PI + jnp.sum((a2 @ m1 + phi["b2"] - mu) ** 2)
                           + var1 * jnp.sum(a2 ** 2) + d * var2)
        log_p_z1 = -0.5 * (d * LOG_2PI + jnp.sum(((eye - a2) @ m1 - phi["b2"]) ** 2)
                           + var1 * jnp.sum((eye - a2) ** 2) + d * var2)
        log_p_x = -0.5 * (d * LOG_2PI + jnp.sum((xi - m1) ** 2) + d * var1)
        entropy = 0.5 * d * (2.0 * (1.0 + LOG_2PI) + jnp.log(var1) + jnp.log(var2))
        return log_p_z2 + log_p_z1 + log_p_x + entropy

    return jax.vmap(one)(x)
