"""The variational auto-encoder of Burda et al. (2016), written with flax NNX.

One stochastic layer, as in the single-layer experiments of the IWAE paper:

.. math::

   p(z) = \\mathcal N(0, I_{d_z}), \\qquad
   p_\\theta(x \\mid z) = \\prod_i \\mathrm{Bernoulli}(x_i; \\sigma(f_\\theta(z)_i)), \\qquad
   q_\\phi(z \\mid x) = \\mathcal N(\\mu_\\phi(x), \\mathrm{diag}\\,\\sigma_\\phi(x)^2),

with ``f_theta`` an MLP ``d_z - 200 - 200 - d_x`` and ``(mu_phi, log sigma_phi)`` an MLP
``d_x - 200 - 200 - (d_z, d_z)``, tanh hidden units (widths, depth and ``d_z`` are
arguments). The guide's sample is reparameterised, ``z = mu + sigma * eps`` with
``eps ~ N(0, I)``, so every pathwise estimator (reparam, stl, dreg) applies.

The modules are split once with :func:`flax.nnx.split`; the parameters travel as plain
nested dicts (``nnx.to_pure_dict``) and every function below merges them with the
static graph inside, so they are pure and work under ``jax.jit``/``vmap``/``grad``.
The :class:`~jaxelbo.Model` and :class:`~jaxelbo.Guide` functions are per example (one
``x``, one ``z``): jaxelbo vmaps them over the samples with ``x`` unbatched, so the
encoder of one ``x`` is computed once, not once per sample.

References:
  Burda, Grosse & Salakhutdinov (2016), "Importance Weighted Autoencoders",
  arXiv:1509.00519.
  Kingma & Welling (2014), "Auto-Encoding Variational Bayes", arXiv:1312.6114.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxelbo.types import Guide, Model

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class MLP(nnx.Module):
    """Tanh MLP ``in -> hidden... -> out`` (no activation on the output layer)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, *, rngs: nnx.Rngs,
                 param_dtype: Any = jnp.float32):
        self.num_hidden = len(hidden)
        widths = [in_dim, *hidden]
        for i in range(self.num_hidden):
            setattr(self, f"hidden{i}", nnx.Linear(widths[i], widths[i + 1], rngs=rngs,
                                                  param_dtype=param_dtype))
        self.out = nnx.Linear(widths[-1], out_dim, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_hidden):
            x = jnp.tanh(getattr(self, f"hidden{i}")(x))
        return self.out(x)


class Encoder(nnx.Module):
    """``x -> (mean, log_std)`` of the diagonal Gaussian ``q_phi(z | x)``."""

    def __init__(self, data_dim: int, hidden: Sequence[int], latent_dim: int, *, rngs: nnx.Rngs,
                 param_dtype: Any = jnp.float32):
        self.latent_dim = latent_dim
        self.net = MLP(data_dim, hidden, 2 * latent_dim, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.net(x)
        return h[..., : self.latent_dim], h[..., self.latent_dim:]


class Decoder(nnx.Module):
    """``z -> logits`` of the Bernoulli ``p_theta(x | z)``."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], data_dim: int, *, rngs: nnx.Rngs,
                 param_dtype: Any = jnp.float32):
        self.net = MLP(latent_dim, hidden, data_dim, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.net(z)


class VAE(NamedTuple):
    """Everything :func:`build` returns.

    Attributes:
      model: the :class:`~jaxelbo.Model` (prior and Bernoulli decoder), per example.
      guide: the :class:`~jaxelbo.Guide` (Gaussian encoder), per example.
      params: ``{"model": decoder params, "guide": encoder params}`` (nested dicts).
      encode: ``(phi, x) -> (mean, std)``; works on one ``x`` or any leading batch axes.
      decode: ``(theta, z) -> Bernoulli means sigmoid(logits)``; any leading axes.
      config: the keyword arguments that rebuild the same architecture.
    """

    model: Model
    guide: Guide
    params: dict
    encode: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
    decode: Callable[[Any, jax.Array], jax.Array]
    config: dict


def data_mean_logits(x_train: jax.Array, eps: float = 1e-3) -> jax.Array:
    """``logit(clip(mean_n x_n, eps, 1 - eps))``: Burda et al.'s decoder output bias."""
    m = jnp.clip(jnp.mean(jnp.asarray(x_train), axis=0), eps, 1.0 - eps)
    return jnp.log(m) - jnp.log1p(-m)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
    """``log N(z; 0, I)`` summed over the last axis."""
    return -0.5 * jnp.sum(z * z, axis=-1) - z.shape[-1] * _HALF_LOG_2PI


def diag_normal_log_prob(z: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """``log N(z; mean, diag exp(2 log_std))`` summed over the last axis."""
    u = (z - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * u * u - log_std, axis=-1) - z.shape[-1] * _HALF_LOG_2PI


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
    """``sum_i x_i log sigma(l_i) + (1 - x_i) log(1 - sigma(l_i)) = sum_i x_i l_i - softplus(l_i)``.

    Valid for ``x`` in [0, 1] (continuous Bernoulli without its normaliser for grey
    values; exact for binary ``x``). ``x . l`` is written as a contraction: as an
    element-wise product, XLA CPU materialises ``x`` broadcast over the K samples
    (``x`` is not batched on that axis); as a dot it does not (~4% of a Burda VAE step).
    """
    return jnp.einsum("...d,...d->...", x, logits) - jnp.sum(jax.nn.softplus(logits), axis=-1)


def build(rng: jax.Array, data_dim: int, *, hidden: Sequence[int] = (200, 200), latent_dim: int = 50,
          output_bias: jax.Array | None = None, param_dtype: Any = jnp.float32) -> VAE:
    """Builds the Burda et al. (2016) VAE; see :func:`make` for the arguments.

    Returns:
      A :class:`VAE` with the model, guide, params and batched ``encode``/``decode``.
    """
    if data_dim < 1 or latent_dim < 1 or any(int(h) < 1 for h in hidden):
        raise ValueError(f"data_dim, latent_dim and hidden widths must be positive, got "
                         f"data_dim={data_dim}, latent_dim={latent_dim}, hidden={tuple(hidden)}")
    hidden = tuple(int(h) for h in hidden)
    enc_rng, dec_rng = jax.random.split(rng)
    rngs_enc = nnx.Rngs(params=enc_rng)
    rngs_dec = nnx.Rngs(params=dec_rng)
    encoder = Encoder(data_dim, hidden, latent_dim, rngs=rngs_enc, param_dtype=param_dtype)
    decoder = Decoder(latent_dim, tuple(reversed(hidden)), data_dim, rngs=rngs_dec, param_dtype=param_dtype)
    if output_bias is not None:
        bias = jnp.asarray(output_bias, dtype=param_dtype)
        if bias.shape != (data_dim,):
            raise ValueError(f"output_bias must have shape ({data_dim},), got {bias.shape}")
        decoder.net.out.bias[...] = bias
    enc_graph, enc_state = nnx.split(encoder)
    dec_graph, dec_state = nnx.split(decoder)
    params = {"model": nnx.to_pure_dict(dec_state), "guide": nnx.to_pure_dict(enc_state)}

    def encode_raw(phi, x):
        return nnx.merge(enc_graph, phi)(x)

    def decode_logits(theta, z):
        return nnx.merge(dec_graph, theta)(z)

    def log_prior(theta, z):
        del theta
        return standard_normal_log_prob(z)

    def log_likelihood(theta, x, z):
        return bernoulli_log_prob(x, decode_logits(theta, z))

    def sample(phi, rng, x):
        mean, log_std = encode_raw(phi, x)
        eps = jax.random.normal(rng, mean.shape, dtype=mean.dtype)
        return mean + jnp.exp(log_std) * eps

    def log_prob(phi, x, z):
        mean, log_std = encode_raw(phi, x)
        return diag_normal_log_prob(z, mean, log_std)

    def encode(phi, x):
        mean, log_std = encode_raw(phi, x)
        return mean, jnp.exp(log_std)

    def decode(theta, z):
        return jax.nn.sigmoid(decode_logits(theta, z))

    config = {"data_dim": int(data_dim), "hidden": list(hidden), "latent_dim": int(latent_dim)}
    return VAE(Model(log_prior, log_likelihood), Guide(sample, log_prob), params, encode, decode, config)


def make(rng: jax.Array, data_dim: int, *, hidden: Sequence[int] = (200, 200), latent_dim: int = 50,
         output_bias: jax.Array | None = None, param_dtype: Any = jnp.float32) -> tuple[Model, Guide, dict]:
    """The Burda et al. (2016) VAE as ``(model, guide, params)``.

    Args:
      rng: PRNG key for the initial weights (flax's default Linear initialisers).
      data_dim: number of pixels ``d_x`` (inputs are flat vectors in [0, 1]).
      hidden: encoder widths; the decoder mirrors them (default ``(200, 200)``).
      latent_dim: ``d_z`` (default 50).
      output_bias: optional ``(d_x,)`` initial decoder output bias; Burda et al. use the
        logit of the training-data mean, see :func:`data_mean_logits`.
      param_dtype: dtype of the weights (``jnp.float64`` under ``jax_enable_x64``).

    Returns:
      ``(model, guide, params)`` with ``params = {"model": theta, "guide": phi}``.

    Example:
      >>> import jax, jaxelbo as je
      >>> from jaxelbo.models import vae
      >>> model, guide, params = vae.make(jax.random.key(0), 64, hidden=(32,), latent_dim=4)
      >>> loss, aux = je.iwae(model, guide, num_samples=8)(params, jax.random.key(1), jax.numpy.ones((3, 64)))
      >>> aux["bound"].shape
      (3,)

    References:
      Burda, Grosse & Salakhutdinov (2016), arXiv:1509.00519.
    """
    return build(rng, data_dim, hidden=hidden, latent_dim=latent_dim, output_bias=output_bias,
                 param_dtype=param_dtype)[:3]


def rebuild(config: dict, param_dtype: Any = jnp.float32) -> VAE:
    """The :class:`VAE` of a saved ``config`` (weights from a fixed key: restore params after)."""
    return build(jax.random.key(0), config["data_dim"], hidden=tuple(config["hidden"]),
                 latent_dim=config["latent_dim"], param_dtype=param_dtype)
