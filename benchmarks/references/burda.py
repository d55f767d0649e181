"""The Burda VAE written three ways in plain JAX, for the throughput benchmark.

One stochastic layer, as in Burda, Grosse & Salakhutdinov (2016), "Importance Weighted
Autoencoders", arXiv:1509.00519: encoder ``784-200-200-(50+50)`` with tanh hidden units
and a diagonal Gaussian ``q(z|x) = N(mu(x), exp(log_sigma(x))^2)``, prior ``N(0, I)``,
decoder ``50-200-200-784`` with tanh hidden units and Bernoulli logits ``l``,
``log p(x|z) = sum_d x_d l_d - softplus(l_d)``.

1. :func:`model_and_guide`: per-example ``je.Model`` / ``je.Guide`` functions (one ``x``,
   one ``z``) that jaxelbo vmaps over samples and batch.
2. :func:`hand_iwae_loss` / :func:`hand_dreg_loss`: the same bound written by hand on a
   ``(B, K)`` batch, the way one would without a library.
3. :func:`gemm_floor`: only the matrix products of one gradient step (forward and
   backward of encoder and decoder), the floor any implementation pays.

Noise is shared: the sample ``z[b, k]`` uses ``eps[b, k] = normal(keys[b, k], (50,))``
with ``keys = jax.random.split(rng, (B, K))``, as ``jaxelbo.weights.sample_keys``
does, so every implementation can be checked against the others on identical noise.
Parameters have the layout of ``jaxelbo.models.vae`` (flax NNX's pure dicts:
``{"net": {"hidden0", "hidden1", "out": {"kernel" (in, out), "bias"}}}``), so the
project's VAE parameters can be fed to every implementation here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

X_DIM, HIDDEN, Z_DIM = 784, 200, 50
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _dense_init(rng: jax.Array, n_in: int, n_out: int, dtype) -> dict:
    """Glorot-uniform kernel, zero bias."""
    limit = math.sqrt(6.0 / (n_in + n_out))
    kernel = jax.random.uniform(rng, (n_in, n_out), dtype, -limit, limit)
    return {"kernel": kernel, "bias": jnp.zeros((n_out,), dtype)}


def _mlp_init(rng: jax.Array, widths: tuple[int, ...], dtype) -> dict:
    ks = jax.random.split(rng, len(widths) - 1)
    names = [f"hidden{i}" for i in range(len(widths) - 2)] + ["out"]
    return {"net": {name: _dense_init(k, a, b, dtype)
                    for name, k, a, b in zip(names, ks, widths[:-1], widths[1:], strict=True)}}


def init_params(rng: jax.Array, dtype=jnp.float32) -> dict:
    """``{"model": theta, "guide": phi}``, Glorot-uniform, in the layout of ``jaxelbo.models.vae``.

    Each is ``{"net": {"hidden0", "hidden1", "out": {"kernel" (in, out), "bias"}}}``; the
    encoder's ``out`` layer has ``2 * 50`` units, ``(mu, log_sigma)``.
    """
    k_enc, k_dec = jax.random.split(rng)
    return {"model": _mlp_init(k_dec, (Z_DIM, HIDDEN, HIDDEN, X_DIM), dtype),
            "guide": _mlp_init(k_enc, (X_DIM, HIDDEN, HIDDEN, 2 * Z_DIM), dtype)}


def random_binary_data(rng: jax.Array, num_points: int, dtype=jnp.float32) -> jax.Array:
    """``(num_points, 784)`` i.i.d. Bernoulli(1/2) pixels (timing only needs the shape)."""
    return jax.random.bernoulli(rng, 0.5, (num_points, X_DIM)).astype(dtype)


def _dense(p: dict, h: jax.Array) -> jax.Array:
    return h @ p["kernel"] + p["bias"]


def _mlp(p: dict, h: jax.Array) -> jax.Array:
    net = p["net"]
    h = jnp.tanh(_dense(net["hidden0"], h))
    h = jnp.tanh(_dense(net["hidden1"], h))
    return _dense(net["out"], h)


def encode(phi: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(mu, log_sigma)`` of ``q(z|x)``; works for one ``x`` or any leading axes."""
    h = _mlp(phi, x)
    return h[..., :Z_DIM], h[..., Z_DIM:]


def decode(theta: dict, z: jax.Array) -> jax.Array:
    """Bernoulli logits ``l(z)``; works for one ``z`` or any leading axes."""
    return _mlp(theta, z)


def gaussian_log_prob(z: jax.Array, mu: jax.Array, log_sigma: jax.Array) -> jax.Array:
    """``sum_d log N(z_d; mu_d, exp(log_sigma_d)^2)`` over the last axis."""
    u = (z - mu) * jnp.exp(-log_sigma)
    return jnp.sum(-0.5 * u * u - log_sigma - _HALF_LOG_2PI, axis=-1)


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
    """``sum_d x_d l_d - softplus(l_d)`` over the last axis."""
    return jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
    return jnp.sum(-0.5 * z * z - _HALF_LOG_2PI, axis=-1)


# --- 1. per-example functions for jaxelbo -------------------------------------------

def model_and_guide():
    """``(je.Model, je.Guide)`` of the Burda VAE, written for one ``x`` and one ``z``."""
    import jaxelbo as je

    def log_prior(theta, z):
        return standard_normal_log_prob(z)

    def log_likelihood(theta, x, z):
        return bernoulli_log_prob(x, decode(theta, z))

    def sample(phi, rng, x):
        mu, log_sigma = encode(phi, x)
        eps = jax.random.normal(rng, mu.shape, mu.dtype)
        return mu + jnp.exp(log_sigma) * eps

    def log_prob(phi, x, z):
        mu, log_sigma = encode(phi, x)
        return gaussian_log_prob(z, mu, log_sigma)

    return (je.Model(log_prior=log_prior, log_likelihood=log_likelihood),
            je.Guide(sample=sample, log_prob=log_prob))


# --- 2. hand-batched -------------------------------------------------------------------

def noise(rng: jax.Array, batch_size: int, num_samples: int, dtype=jnp.float32) -> jax.Array:
    """``eps`` of shape ``(B, K, 50)``, ``eps[b, k] = normal(split(rng, (B, K))[b, k])``."""
    keys = jax.random.split(rng, (batch_size, num_samples))
    return jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (Z_DIM,), dtype)))(keys)


def _batched_terms(params: dict, eps: jax.Array, x: jax.Array, *, stop_guide: bool):
    """``(z, log p(x, z), log q(z|x))`` of shape ``(B, K, 50)``, ``(B, K)``, ``(B, K)``."""
    phi, theta = params["guide"], params["model"]
    mu, log_sigma = encode(phi, x)                                       # (B, 50)
    z = mu[:, None, :] + jnp.exp(log_sigma)[:, None, :] * eps            # (B, K, 50)
    if stop_guide:
        mu, log_sigma = jax.lax.stop_gradient((mu, log_sigma))
    log_q = gaussian_log_prob(z, mu[:, None, :], log_sigma[:, None, :])
    log_p = standard_normal_log_prob(z) + bernoulli_log_prob(x[:, None, :], decode(theta, z))
    return z, log_p, log_q


def hand_iwae_loss_eps(params: dict, eps: jax.Array, x: jax.Array) -> jax.Array:
    """``-mean_b [logsumexp_k log w_bk - log K]``, plain autodiff (IWAE, reparam)."""
    _, log_p, log_q = _batched_terms(params, eps, x, stop_guide=False)
    log_w = log_p - log_q
    return -jnp.mean(jax.nn.logsumexp(log_w, axis=-1) - math.log(eps.shape[1]))


def _log_weights_at_stopped_guide(theta: dict, z: jax.Array, stopped: tuple) -> jax.Array:
    """``log p_theta(x, z) - log q(z | x)`` with the guide's ``(mu, log_sigma)`` held fixed."""
    x, mu, log_sigma = stopped
    return (standard_normal_log_prob(z) + bernoulli_log_prob(x[:, None, :], decode(theta, z))
            - gaussian_log_prob(z, mu[:, None, :], log_sigma[:, None, :]))


@jax.custom_vjp
def _dreg_log_weights(theta: dict, z: jax.Array, stopped: tuple) -> jax.Array:
    """Log-weights whose backward pass scales the cotangent of ``z`` by ``w = softmax(log w~)``.

    The JAX analogue of a PyTorch gradient hook on ``z``: one forward, one backward.
    """
    return _log_weights_at_stopped_guide(theta, z, stopped)


def _dreg_fwd(theta, z, stopped):
    log_w, vjp = jax.vjp(lambda t, s: _log_weights_at_stopped_guide(t, s, stopped), theta, z)
    return log_w, (vjp, jax.nn.softmax(log_w, axis=-1), stopped)


def _dreg_bwd(res, cotangent):
    vjp, w, stopped = res
    d_theta, d_z = vjp(cotangent)
    return d_theta, d_z * w[..., None], jax.tree.map(jnp.zeros_like, stopped)


_dreg_log_weights.defvjp(_dreg_fwd, _dreg_bwd)


def hand_dreg_loss_eps(params: dict, eps: jax.Array, x: jax.Array) -> jax.Array:
    """IWAE-DReG (Tucker et al. 2019, arXiv:1810.04152) by hand, one forward one backward.

    Surrogate ``-mean_b sum_k w_bk log w~_bk`` (``w`` held constant, ``log q`` at stopped
    guide parameters) gives theta ``sum_k w_k grad log p``; the cotangent of ``z`` is
    scaled once more by ``w`` in the backward pass, so phi gets
    ``sum_k w_k^2 dlog w~_k/dz dz/dphi``. The value is minus the IWAE bound.
    """
    phi, theta = params["guide"], params["model"]
    mu, log_sigma = encode(phi, x)
    z = mu[:, None, :] + jnp.exp(log_sigma)[:, None, :] * eps
    stopped = jax.lax.stop_gradient((x, mu, log_sigma))
    log_w = _dreg_log_weights(theta, z, stopped)
    w = jax.lax.stop_gradient(jax.nn.softmax(log_w, axis=-1))
    bound = jax.nn.logsumexp(log_w, axis=-1) - math.log(eps.shape[1])
    surrogate = jnp.sum(w * log_w, axis=-1)
    return -jnp.mean(jax.lax.stop_gradient(bound) + surrogate - jax.lax.stop_gradient(surrogate))


def hand_iwae_loss(params: dict, rng: jax.Array, x: jax.Array, *, num_samples: int) -> jax.Array:
    return hand_iwae_loss_eps(params, noise(rng, x.shape[0], num_samples, x.dtype), x)


def hand_dreg_loss(params: dict, rng: jax.Array, x: jax.Array, *, num_samples: int) -> jax.Array:
    return hand_dreg_loss_eps(params, noise(rng, x.shape[0], num_samples, x.dtype), x)


# --- 3. the GEMM floor -----------------------------------------------------------------

def gemm_floor_inputs(rng: jax.Array, batch_size: int, num_samples: int, dtype=jnp.float32) -> dict:
    """Random operands with the shapes of every matrix product in one gradient step."""
    n = batch_size * num_samples
    shapes = {"x": (batch_size, X_DIM), "z": (n, Z_DIM),
              "g_out": (n, X_DIM), "g_dec2": (n, HIDDEN), "g_dec1": (n, HIDDEN),
              "g_head": (batch_size, 2 * Z_DIM), "g_enc2": (batch_size, HIDDEN),
              "g_enc1": (batch_size, HIDDEN),
              "w_enc1": (X_DIM, HIDDEN), "w_enc2": (HIDDEN, HIDDEN), "w_head": (HIDDEN, 2 * Z_DIM),
              "w_dec1": (Z_DIM, HIDDEN), "w_dec2": (HIDDEN, HIDDEN), "w_out": (HIDDEN, X_DIM)}
    keys = jax.random.split(rng, len(shapes))
    return {name: 0.1 * jax.random.normal(k, s, dtype)
            for k, (name, s) in zip(keys, shapes.items(), strict=True)}


def gemm_floor(a: dict) -> tuple:
    """Only the matrix products of one gradient step: a lower bound on its time.

    Encoder (rows B): 3 forward products, 3 weight gradients, 2 input gradients (the data
    needs none). Decoder (rows B*K): 3 forward products, 3 weight gradients, 3 input
    gradients (the last one is dL/dz, which the guide's path derivative needs). The
    backward cotangents are random operands, so no element-wise work is timed.
    """
    h1 = a["x"] @ a["w_enc1"]
    h2 = h1 @ a["w_enc2"]
    head = h2 @ a["w_head"]
    d1 = a["z"] @ a["w_dec1"]
    d2 = d1 @ a["w_dec2"]
    logits = d2 @ a["w_out"]
    grads = (
        a["x"].T @ a["g_enc1"], h1.T @ a["g_enc2"], h2.T @ a["g_head"],
        a["g_head"] @ a["w_head"].T, a["g_enc2"] @ a["w_enc2"].T,
        a["z"].T @ a["g_dec1"], d1.T @ a["g_dec2"], d2.T @ a["g_out"],
        a["g_out"] @ a["w_out"].T, a["g_dec2"] @ a["w_dec2"].T, a["g_dec1"] @ a["w_dec1"].T,
    )
    return (head, logits) + grads


def gemm_flops(batch_size: int, num_samples: int) -> float:
    """Floating-point operations of :func:`gemm_floor` (2 per multiply-add)."""
    n = batch_size * num_samples
    enc = X_DIM * HIDDEN + HIDDEN * HIDDEN + HIDDEN * 2 * Z_DIM
    dec = Z_DIM * HIDDEN + HIDDEN * HIDDEN + HIDDEN * X_DIM
    enc_bwd = 2 * enc - X_DIM * HIDDEN  # no input gradient for the data
    return 2.0 * (batch_size * (enc + enc_bwd) + n * 3 * dec)
