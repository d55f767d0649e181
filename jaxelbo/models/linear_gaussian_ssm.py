r"""A linear-Gaussian state-space model, with the Kalman filter and the exact smoothing proposal.

Model (``theta = {"A", "C", "log_q", "log_r", "m0", "log_p0"}``, diagonal noise):

.. math::

   z_0 \sim N(m_0, P_0),\quad z_t = A z_{t-1} + N(0, Q),\quad x_t = C z_t + N(0, R),

with ``Q = diag(exp(log_q))``, ``R = diag(exp(log_r))``, ``P_0 = diag(exp(log_p0))``.

- :func:`kalman_log_marginal`: exact ``log p_theta(x_{0:L-1})`` by the Kalman filter.
- :func:`smoothing_proposal`: the exact smoothing proposal ``p(z_t | z_{t-1}, x_{t:T-1})``
  from backward information messages ``p(x_{t+1:} | z_t) ∝ exp(-z'J_t z / 2 + h_t'z)``. With it
  every trajectory's weight equals ``p(x)``, so without resampling ``log Z_hat = log p(x)`` for
  every K. (With resampling the per-step weights ``p(x_{t:} | z_{t-1}) / p(x_{t+1:} | z_t)``
  still vary across particles: the estimate stays unbiased in ``Z_hat`` but is not constant.)
- :func:`bootstrap_proposal`: the transition ``p(z_t | z_{t-1})`` itself.

Its parameters ``phi`` have the same structure as ``theta`` (at ``phi = theta`` it is exact);
the messages are recomputed from ``x`` at each call, O(T) per call, fine for short tests.

Example:
  >>> import jax, jax.numpy as jnp
  >>> theta = default_params(dim_z=2, dim_x=1)["model"]
  >>> _, x = model().sample(theta, jax.random.key(0), 6)
  >>> kalman_log_marginal(theta, x[None]).shape
  (1,)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxelbo.smc import Proposal, StateSpaceModel

LOG_2PI = math.log(2.0 * math.pi)


def _diag_normal_logpdf(v: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
    return -0.5 * jnp.sum(LOG_2PI + log_var + (v - mean) ** 2 * jnp.exp(-log_var))


def _mvn_logpdf(v: jax.Array, mean: jax.Array, cov: jax.Array) -> jax.Array:
    chol = jnp.linalg.cholesky(cov)
    r = jax.scipy.linalg.solve_triangular(chol, v - mean, lower=True)
    return -0.5 * (v.shape[-1] * LOG_2PI + jnp.sum(r * r)) - jnp.sum(jnp.log(jnp.diagonal(chol)))


def default_params(dim_z: int = 2, dim_x: int = 1, *, a: float = 0.9, q: float = 0.5, r: float = 1.0) -> dict:
    """A stable model (``A = a I``, ``C`` = ones), and ``phi`` equal to ``theta``."""
    theta = {"A": a * jnp.eye(dim_z), "C": jnp.ones((dim_x, dim_z)) / math.sqrt(dim_z),
             "log_q": jnp.full((dim_z,), math.log(q)), "log_r": jnp.full((dim_x,), math.log(r)),
             "m0": jnp.zeros((dim_z,)), "log_p0": jnp.zeros((dim_z,))}
    return {"model": theta, "guide": jax.tree.map(jnp.array, theta)}


def model() -> StateSpaceModel:
    """The linear-Gaussian :class:`~jaxelbo.StateSpaceModel`, with an ancestral ``sample``."""
    def sample(theta, rng, num_steps):
        k0, kz, kx = jax.random.split(rng, 3)
        z0 = theta["m0"] + jnp.exp(0.5 * theta["log_p0"]) * jax.random.normal(k0, theta["m0"].shape)

        def step(z, eps):
            z = theta["A"] @ z + jnp.exp(0.5 * theta["log_q"]) * eps
            return z, z

        eps = jax.random.normal(kz, (num_steps - 1,) + theta["m0"].shape)
        _, zs = jax.lax.scan(step, z0, eps)
        z = jnp.concatenate([z0[None], zs])
        noise = jax.random.normal(kx, (num_steps, theta["C"].shape[0]))
        return z, z @ theta["C"].T + jnp.exp(0.5 * theta["log_r"])[None] * noise

    return StateSpaceModel(
        log_initial=lambda th, z0: _diag_normal_logpdf(z0, th["m0"], th["log_p0"]),
        log_transition=lambda th, t, zp, z: _diag_normal_logpdf(z, th["A"] @ zp, th["log_q"]),
        log_emission=lambda th, t, z, xt: _diag_normal_logpdf(xt, th["C"] @ z, th["log_r"]),
        sample=sample)


def kalman_log_marginal(theta: dict, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    r"""Exact ``log p_theta(x_{0:L-1})`` for a batch ``(B, T, dim_x)`` by the Kalman filter: ``(B,)``.

    ``log p = sum_t log N(x_t; C m_{t|t-1}, C P_{t|t-1} C' + R)``; steps ``t >= lengths[b]``
    are skipped. Differentiable in ``theta`` and ``x``.

    References:
      Kalman (1960); Durbin & Koopman (2012), Time Series Analysis by State Space Methods, ch. 4.
    """
    a, c = theta["A"], theta["C"]
    q, r = jnp.diag(jnp.exp(theta["log_q"])), jnp.diag(jnp.exp(theta["log_r"]))
    num_steps = x.shape[1]
    lens = jnp.full((x.shape[0],), num_steps) if lengths is None else jnp.asarray(lengths)

    def one(xs, length):
        def step(carry, inputs):
            m, p, total = carry
            t, xt = inputs
            m_pred = jnp.where(t == 0, theta["m0"], a @ m)
            p_pred = jnp.where(t == 0, jnp.diag(jnp.exp(theta["log_p0"])), a @ p @ a.T + q)
            s = c @ p_pred @ c.T + r
            gain = jnp.linalg.solve(s, c @ p_pred).T
            m_new = m_pred + gain @ (xt - c @ m_pred)
            p_new = p_pred - gain @ c @ p_pred
            p_new = 0.5 * (p_new + p_new.T)
            valid = t < length
            ll = jnp.where(valid, _mvn_logpdf(xt, c @ m_pred, s), 0.0)
            return (jnp.where(valid, m_new, m), jnp.where(valid, p_new, p), total + ll), None

        dz = theta["m0"].shape[0]
        init = (jnp.zeros((dz,)), jnp.eye(dz), jnp.zeros(()))
        (_, _, total), _ = jax.lax.scan(step, init, (jnp.arange(num_steps), xs))
        return total

    return jax.vmap(one)(x, lens)


def _backward_messages(phi: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``J_t`` ``(T, D, D)``, ``h_t`` ``(T, D)`` with ``p(x_{t+1:} | z_t) ∝ exp(-z'J_t z/2 + h_t'z)``."""
    a, c = phi["A"], phi["C"]
    q_inv = jnp.diag(jnp.exp(-phi["log_q"]))
    r_inv = jnp.diag(jnp.exp(-phi["log_r"]))
    dz = a.shape[0]

    def step(carry, xt):
        j, h = carry  # message into step t from the future: p(x_{t+1:} | z_t)
        j_tilde = c.T @ r_inv @ c + j
        h_tilde = c.T @ r_inv @ xt + h
        s = q_inv + j_tilde
        s_inv_q = jnp.linalg.solve(s, q_inv)
        j_prev = a.T @ (q_inv - q_inv @ s_inv_q) @ a
        h_prev = a.T @ s_inv_q.T @ h_tilde
        return (j_prev, h_prev), (j, h)

    init = (jnp.zeros((dz, dz)), jnp.zeros((dz,)))
    _, (js, hs) = jax.lax.scan(step, init, x, reverse=True)
    return js, hs


def _smoothing_moments(phi: dict, t: jax.Array, z_prev: jax.Array | None, x: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    js, hs = _backward_messages(phi, x)
    c = phi["C"]
    r_inv = jnp.diag(jnp.exp(-phi["log_r"]))
    if z_prev is None:
        prior_prec = jnp.diag(jnp.exp(-phi["log_p0"]))
        prior_mean = phi["m0"]
    else:
        prior_prec = jnp.diag(jnp.exp(-phi["log_q"]))
        prior_mean = phi["A"] @ z_prev
    prec = prior_prec + c.T @ r_inv @ c + js[t]
    eta = prior_prec @ prior_mean + c.T @ r_inv @ x[t] + hs[t]
    cov = jnp.linalg.inv(prec)
    cov = 0.5 * (cov + cov.T)
    return cov @ eta, cov


def smoothing_proposal() -> Proposal:
    """The exact smoothing proposal ``p_phi(z_t | z_{t-1}, x_{t:})`` (exact at ``phi = theta``)."""
    def sample(phi, rng, t, z_prev, x):
        mean, cov = _smoothing_moments(phi, t, z_prev, x)
        return mean + jnp.linalg.cholesky(cov) @ jax.random.normal(rng, mean.shape)

    def log_prob(phi, t, z_prev, x, z):
        mean, cov = _smoothing_moments(phi, t, z_prev, x)
        return _mvn_logpdf(z, mean, cov)

    return Proposal(sample=sample, log_prob=log_prob)


def bootstrap_proposal() -> Proposal:
    """The bootstrap proposal: ``p_phi(z_0)`` then ``p_phi(z_t | z_{t-1})``, ignoring ``x``."""
    def moments(phi, z_prev):
        if z_prev is None:
            return phi["m0"], phi["log_p0"]
        return phi["A"] @ z_prev, phi["log_q"]

    def sample(phi, rng, t, z_prev, x):
        mean, log_var = moments(phi, z_prev)
        return mean + jnp.exp(0.5 * log_var) * jax.random.normal(rng, mean.shape)

    def log_prob(phi, t, z_prev, x, z):
        mean, log_var = moments(phi, z_prev)
        return _diag_normal_logpdf(z, mean, log_var)

    return Proposal(sample=sample, log_prob=log_prob)
