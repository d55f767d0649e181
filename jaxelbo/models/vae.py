"""The variational auto-encoder of Burda et al. (2016), written with flax NNX.

One stochastic layer (:func:`build`), as in the single-layer experiments of the IWAE paper:

.. math::

   p(z) = \\mathcal N(0, I_{d_z}), \\qquad
   p_\\theta(x \\mid z) = \\prod_i \\mathrm{Bernoulli}(x_i; \\sigma(f_\\theta(z)_i)), \\qquad
   q_\\phi(z \\mid x) = \\mathcal N(\\mu_\\phi(x), \\mathrm{diag}\\,\\sigma_\\phi(x)^2),

with ``f_theta`` an MLP ``d_z - 200 - 200 - d_x`` and ``(mu_phi, log sigma_phi)`` an MLP
``d_x - 200 - 200 - (d_z, d_z)``, tanh hidden units (widths, depth and ``d_z`` are
arguments). The guide's sample is reparameterised, ``z = mu + sigma * eps`` with
``eps ~ N(0, I)``, so every pathwise estimator (reparam, stl, dreg) applies.

Two stochastic layers (:func:`build_two_layer`, or ``build(..., stochastic_layers=2)``),
Burda et al.'s section 5 architecture:

.. math::

   q_\\phi(z_1, z_2 \\mid x) = q_\\phi(z_1 \\mid x)\\, q_\\phi(z_2 \\mid z_1), \\qquad
   p_\\theta(x, z_1, z_2) = p(z_2)\\, p_\\theta(z_1 \\mid z_2)\\, p_\\theta(x \\mid z_1),

with ``p(z_2) = N(0, I)``, every conditional of ``z`` a diagonal Gaussian whose mean and
log standard deviation come from a tanh MLP (guide: ``784-100-100-(100)`` and
``100-50-50-(50)``; model mirrored: ``50-50-50-(100)`` and ``100-100-100-784``) and a
Bernoulli ``p(x | z_1)``. A latent is the tuple ``z = (z_1, z_2)``: jaxelbo's log-weights,
objectives and estimators treat ``z`` as a pytree, so every one of them applies. The guide
samples ancestrally, ``z_1 = mu_1(x) + sigma_1(x) eps_1``, ``z_2 = mu_2(z_1) + sigma_2(z_1)
eps_2``, so ``z_2`` depends on ``phi`` through ``z_1`` as well: the pathwise estimators
(reparam, stl, dreg) differentiate through both.

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

    def features(self, x: jax.Array) -> jax.Array:
        """The last hidden layer's activations."""
        for i in range(self.num_hidden):
            x = jnp.tanh(getattr(self, f"hidden{i}")(x))
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.features(x))


def dense_with_transposed_kernel(layer: nnx.Linear, h: jax.Array) -> jax.Array:
    """``layer(h)``, with the kernel read as ``(out, in)`` on CPU.

    XLA CPU runs the decoder's wide output product ``(K, hidden) x (hidden, D)`` and its
    gradients faster when the ``D x hidden`` operand is contiguous along ``hidden``
    (measured 0.94x the step's CPU time at K = 64 and 0.89x at K = 512 on the Burda VAE).
    The transpose (``hidden x D`` numbers, once per step) is kept by an optimisation
    barrier, which stops XLA from folding it back into the product. The parameters
    are the layer's own (same shapes: checkpoints are unchanged) and the values equal
    ``layer(h)`` up to float rounding; other backends call ``layer(h)``.
    """
    if jax.default_backend() != "cpu":
        return layer(h)
    assert layer.bias is not None  # the decoder's layers all have a bias
    return _dense_transposed(h, layer.kernel[...], layer.bias[...])


def _dense_transposed(h: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``h kernel + bias`` as :func:`dense_with_transposed_kernel` computes it."""
    if jax.default_backend() != "cpu":
        return jnp.einsum("...h,hd->...d", h, kernel) + bias
    kernel_t = jax.lax.optimization_barrier(jnp.swapaxes(kernel, 0, 1))
    return jnp.einsum("...h,dh->...d", h, kernel_t) + bias


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
        return dense_with_transposed_kernel(self.net.out, self.net.features(z))


class TwoLayerEncoder(nnx.Module):
    """``q_phi(z_1 | x) q_phi(z_2 | z_1)``: two diagonal-Gaussian layers, ``x -> z_1 -> z_2``."""

    def __init__(self, data_dim: int, hidden: Sequence[Sequence[int]], latent_dims: Sequence[int], *,
                 rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
        self.z1 = Encoder(data_dim, hidden[0], latent_dims[0], rngs=rngs, param_dtype=param_dtype)
        self.z2 = Encoder(latent_dims[0], hidden[1], latent_dims[1], rngs=rngs, param_dtype=param_dtype)


class TwoLayerDecoder(nnx.Module):
    """``p_theta(z_1 | z_2) p_theta(x | z_1)``: the mirror image of :class:`TwoLayerEncoder`."""

    def __init__(self, data_dim: int, hidden: Sequence[Sequence[int]], latent_dims: Sequence[int], *,
                 rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
        self.z1 = Encoder(latent_dims[1], tuple(reversed(hidden[1])), latent_dims[0], rngs=rngs,
                          param_dtype=param_dtype)
        self.x = Decoder(latent_dims[0], tuple(reversed(hidden[0])), data_dim, rngs=rngs,
                         param_dtype=param_dtype)


class VAE(NamedTuple):
    """Everything :func:`build` and :func:`build_two_layer` return.

    Attributes:
      model: the :class:`~jaxelbo.Model` (prior and Bernoulli decoder), per example.
      guide: the :class:`~jaxelbo.Guide` (Gaussian encoder), per example.
      params: ``{"model": decoder params, "guide": encoder params}`` (nested dicts).
      encode: ``(phi, x) -> (mean, std)`` of ``q(z | x)`` (two layers: of ``q(z_1 | x)``);
        works on one ``x`` or any leading batch axes.
      decode: ``(theta, z) -> Bernoulli means sigmoid(logits)`` (two layers: from ``z_1``);
        any leading axes.
      config: the keyword arguments that rebuild the same architecture.
      generate: ``(theta, rng, n) -> (n, d_x)`` Bernoulli means of ancestral draws from
        the model (``z ~ p(z)``, or ``z_2 ~ p(z_2)``, ``z_1 ~ p(z_1 | z_2)``).
      posterior_means: ``(phi, rng, x) -> tuple`` of ``E_q[z_l | x]``, one ``(N, d_l)``
        array per stochastic layer, for ``x`` of shape ``(N, d_x)``: exact for the first
        layer, ``mean_s mu_2(z_1^s)`` over 100 draws ``z_1^s ~ q(z_1 | x)`` for the second
        (its Monte Carlo error vanishes for an inactive unit, whose ``mu_2`` is constant).
    """

    model: Model
    guide: Guide
    params: dict
    encode: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
    decode: Callable[[Any, jax.Array], jax.Array]
    config: dict
    generate: Callable[[Any, jax.Array, int], jax.Array] | None = None
    posterior_means: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, ...]] | None = None


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


@jax.custom_jvp
def softplus(logits: jax.Array) -> jax.Array:
    """``log(1 + e^l) = max(l, 0) + log1p(e^{min(l, -l)})``, equal to :func:`jax.nn.softplus`
    to float rounding (and at ``+-inf`` and ``nan``).

    ``jax.nn.softplus`` is ``logaddexp(l, 0)``, whose special-value ``select`` XLA CPU
    does not fuse away: this form costs half as much per element (1.3 vs 2.7 ns on this
    project's CPU), which speeds up ``je.log_likelihood`` of the Burda VAE. Its derivative
    is ``sigmoid(l)`` (``jax.nn.sigmoid``), computed from ``l`` and not from the output:
    then the training step need not materialise ``softplus(l)`` over the ``(B, K, 784)``
    logits for the backward pass, and the forward sum runs as one reduction (13% of the
    step's CPU time at K = 64 was that materialising loop; about 0.9x the step's CPU time
    with ``sigmoid``, ``benchmarks/profile_step.py``). Differentiating the ``max``/``min``
    form itself made the training step slower (1.10-1.25x at K = 64).
    """
    return jnp.maximum(logits, 0) + jnp.log1p(jnp.exp(jnp.minimum(logits, -logits)))


@softplus.defjvp
def _softplus_jvp(primals, tangents):
    (logits,), (tangent,) = primals, tangents
    return softplus(logits), tangent * jax.nn.sigmoid(logits)


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
    """``sum_i x_i log sigma(l_i) + (1 - x_i) log(1 - sigma(l_i)) = sum_i x_i l_i - softplus(l_i)``.

    Valid for ``x`` in [0, 1] (continuous Bernoulli without its normaliser for grey
    values; exact for binary ``x``). ``x . l`` is written as a contraction: as an
    element-wise product, XLA CPU materialises ``x`` broadcast over the K samples
    (``x`` is not batched on that axis); as a dot it does not (~4% of a Burda VAE step).
    """
    return jnp.einsum("...d,...d->...", x, logits) - jnp.sum(softplus(logits), axis=-1)


def _bernoulli_dense_reference(x: jax.Array, h: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``bernoulli_log_prob(x, h kernel + bias)`` with the product of
    :func:`dense_with_transposed_kernel`: the form whose derivative the training step uses."""
    return bernoulli_log_prob(x, _dense_transposed(h, kernel, bias))


def bernoulli_dense_log_prob(x: jax.Array, h: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``bernoulli_log_prob(x, h @ kernel + bias)``: the decoder's output layer and its
    Bernoulli log-likelihood in one, for forward-only use such as ``je.log_likelihood``.

    Undifferentiated, the logits are never materialised: with ``y = h @ kernel`` (the
    kernel read as stored, no transpose per call),
    ``sum_d x_d l_d - softplus(l_d) = x . y + x . bias - sum_d softplus(y_d + bias_d)``,
    so XLA adds the bias inside the one ``softplus`` reduction, the contraction reads
    ``y`` directly and ``x . bias`` is computed once per example instead of once per
    sample. Under differentiation (``jax.jvp``/``jax.grad``) it is exactly the
    derivative of :func:`_bernoulli_dense_reference` (today's training step, with the
    transposed-kernel read). Values agree with it to float rounding.

    Any argument may be a NumPy array, also one that ``jax.jit`` closed over and ``vmap``
    carries: each is rebound in the current trace (``+ 0``, which XLA folds away) before
    the ``custom_jvp``, which refuses such "non-canonical constants".
    """
    x, h, kernel, bias = (jnp.asarray(a) + jnp.zeros((), jnp.result_type(a)) for a in (x, h, kernel, bias))
    return _bernoulli_dense_log_prob(x, h, kernel, bias)


@jax.custom_jvp
def _bernoulli_dense_log_prob(x: jax.Array, h: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """The ``custom_jvp`` behind :func:`bernoulli_dense_log_prob` (its arguments JAX arrays)."""
    y = jnp.einsum("...h,hd->...d", h, kernel)
    return (jnp.einsum("...d,...d->...", x, y) + jnp.einsum("...d,d->...", x, bias)
            - jnp.sum(softplus(y + bias), axis=-1))


@_bernoulli_dense_log_prob.defjvp
def _bernoulli_dense_log_prob_jvp(primals, tangents):
    return jax.jvp(_bernoulli_dense_reference, primals, tangents)


def decoder_log_prob(decoder: Decoder, x: jax.Array, z: jax.Array) -> jax.Array:
    """``log p(x | z) = bernoulli_log_prob(x, decoder(z))`` through :func:`bernoulli_dense_log_prob`."""
    out = decoder.net.out
    assert out.bias is not None  # the decoder's layers all have a bias
    return bernoulli_dense_log_prob(x, decoder.net.features(z), out.kernel[...], out.bias[...])


def build(rng: jax.Array, data_dim: int, *, hidden: Sequence[int] = (200, 200), latent_dim: int = 50,
          output_bias: jax.Array | None = None, param_dtype: Any = jnp.float32,
          stochastic_layers: int = 1) -> VAE:
    """Builds the Burda et al. (2016) VAE; see :func:`make` for the arguments.

    ``stochastic_layers=2`` builds Burda et al.'s two-layer VAE with its section-5 sizes
    (:func:`build_two_layer`); ``hidden`` and ``latent_dim`` must then keep their
    defaults (use :func:`build_two_layer` for other sizes).

    Returns:
      A :class:`VAE` with the model, guide, params and batched ``encode``/``decode``.
    """
    if stochastic_layers not in (1, 2):
        raise ValueError(f"stochastic_layers must be 1 or 2, got {stochastic_layers}")
    if stochastic_layers == 2:
        if tuple(hidden) != (200, 200) or latent_dim != 50:
            raise ValueError("stochastic_layers=2 builds Burda et al.'s two-layer sizes; hidden and "
                             "latent_dim set the one-layer VAE (use build_two_layer for other sizes)")
        return build_two_layer(rng, data_dim, output_bias=output_bias, param_dtype=param_dtype)
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
        out = decoder.net.out
        assert out.bias is not None  # nnx.Linear(use_bias=True)
        out.bias[...] = bias
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
        return decoder_log_prob(nnx.merge(dec_graph, theta), x, z)

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

    def generate(theta, rng, n):
        return decode(theta, jax.random.normal(rng, (n, latent_dim), param_dtype))

    def posterior_means(phi, rng, x):
        del rng
        return (encode_raw(phi, x)[0],)

    def model_sample(theta, rng):
        k_z, k_x = jax.random.split(rng)
        z = jax.random.normal(k_z, (latent_dim,), param_dtype)
        x = jax.random.bernoulli(k_x, jax.nn.sigmoid(decode_logits(theta, z))).astype(param_dtype)
        return z, x

    config = {"data_dim": int(data_dim), "hidden": list(hidden), "latent_dim": int(latent_dim)}
    return VAE(Model(log_prior, log_likelihood, model_sample), Guide(sample, log_prob), params, encode, decode,
               config, generate, posterior_means)


def _gaussian_sample(layer: Encoder, rng: jax.Array, h: jax.Array) -> jax.Array:
    """``mean + exp(log_std) * eps`` of the Gaussian layer at input ``h``."""
    mean, log_std = layer(h)
    return mean + jnp.exp(log_std) * jax.random.normal(rng, mean.shape, mean.dtype)


def _gaussian_log_prob(layer: Encoder, z: jax.Array, h: jax.Array) -> jax.Array:
    """``log N(z; mean(h), diag exp(2 log_std(h)))`` of the Gaussian layer."""
    mean, log_std = layer(h)
    return diag_normal_log_prob(z, mean, log_std)


def build_two_layer(rng: jax.Array, data_dim: int, *,
                    hidden: Sequence[Sequence[int]] = ((100, 100), (50, 50)),
                    latent_dims: Sequence[int] = (100, 50), output_bias: jax.Array | None = None,
                    param_dtype: Any = jnp.float32, posterior_mean_samples: int = 100) -> VAE:
    r"""Burda et al.'s (2016, section 5) VAE with two stochastic layers, ``z = (z_1, z_2)``.

    .. math::

       \log 	ilde w = \log p(z_2) + \log p_	heta(z_1 \mid z_2) + \log p_	heta(x \mid z_1)
                     - \log q_\phi(z_1 \mid x) - \log q_\phi(z_2 \mid z_1).

    ``Model.log_prior`` is ``log p(z_2) + log p(z_1 | z_2)``, ``Model.log_likelihood``
    is ``log p(x | z_1)``; ``Guide.log_prob`` is ``log q(z_1 | x) + log q(z_2 | z_1)``.

    Args:
      rng: PRNG key for the initial weights.
      data_dim: number of pixels ``d_x``.
      hidden: hidden widths of ``q(z_1 | x)`` and of ``q(z_2 | z_1)``; the model's
        ``p(z_1 | z_2)`` and ``p(x | z_1)`` mirror them (default ``((100, 100), (50, 50))``).
      latent_dims: ``(d_{z_1}, d_{z_2})`` (default ``(100, 50)``).
      output_bias: optional ``(d_x,)`` initial bias of ``p(x | z_1)``'s logits.
      param_dtype: dtype of the weights.
      posterior_mean_samples: draws of ``z_1`` behind ``posterior_means``' second layer.

    Returns:
      A :class:`VAE`; its ``encode``/``decode`` act on the first layer (``x <-> z_1``).

    Example:
      >>> import jax, jaxelbo as je
      >>> from jaxelbo.models import vae
      >>> net = vae.build_two_layer(jax.random.key(0), 16, hidden=((8,), (4,)), latent_dims=(3, 2))
      >>> z1, z2 = net.guide.sample(net.params["guide"], jax.random.key(1), jax.numpy.ones(16))
      >>> z1.shape, z2.shape
      ((3,), (2,))

    References:
      Burda, Grosse & Salakhutdinov (2016), arXiv:1509.00519, section 5.
    """
    hidden = tuple(tuple(int(w) for w in h) for h in hidden)
    latent_dims = tuple(int(d) for d in latent_dims)
    if len(hidden) != 2 or len(latent_dims) != 2:
        raise ValueError(f"hidden and latent_dims need one entry per stochastic layer (2), got "
                         f"hidden={hidden}, latent_dims={latent_dims}")
    if data_dim < 1 or min(latent_dims) < 1 or any(w < 1 for h in hidden for w in h):
        raise ValueError(f"data_dim, latent_dims and hidden widths must be positive, got "
                         f"data_dim={data_dim}, latent_dims={latent_dims}, hidden={hidden}")
    d1, d2 = latent_dims
    enc_rng, dec_rng = jax.random.split(rng)
    encoder = TwoLayerEncoder(data_dim, hidden, latent_dims, rngs=nnx.Rngs(params=enc_rng),
                              param_dtype=param_dtype)
    decoder = TwoLayerDecoder(data_dim, hidden, latent_dims, rngs=nnx.Rngs(params=dec_rng),
                              param_dtype=param_dtype)
    if output_bias is not None:
        bias = jnp.asarray(output_bias, dtype=param_dtype)
        if bias.shape != (data_dim,):
            raise ValueError(f"output_bias must have shape ({data_dim},), got {bias.shape}")
        out = decoder.x.net.out
        assert out.bias is not None  # nnx.Linear(use_bias=True)
        out.bias[...] = bias
    enc_graph, enc_state = nnx.split(encoder)
    dec_graph, dec_state = nnx.split(decoder)
    params = {"model": nnx.to_pure_dict(dec_state), "guide": nnx.to_pure_dict(enc_state)}

    def log_prior(theta, z):
        z1, z2 = z
        return standard_normal_log_prob(z2) + _gaussian_log_prob(nnx.merge(dec_graph, theta).z1, z1, z2)

    def log_likelihood(theta, x, z):
        return decoder_log_prob(nnx.merge(dec_graph, theta).x, x, z[0])

    def sample(phi, rng, x):
        enc = nnx.merge(enc_graph, phi)
        k1, k2 = jax.random.split(rng)
        z1 = _gaussian_sample(enc.z1, k1, x)
        return z1, _gaussian_sample(enc.z2, k2, z1)

    def log_prob(phi, x, z):
        enc = nnx.merge(enc_graph, phi)
        z1, z2 = z
        return _gaussian_log_prob(enc.z1, z1, x) + _gaussian_log_prob(enc.z2, z2, z1)

    def encode(phi, x):
        mean, log_std = nnx.merge(enc_graph, phi).z1(x)
        return mean, jnp.exp(log_std)

    def decode(theta, z1):
        return jax.nn.sigmoid(nnx.merge(dec_graph, theta).x(z1))

    def generate(theta, rng, n):
        dec = nnx.merge(dec_graph, theta)
        k2, k1 = jax.random.split(rng)
        z2 = jax.random.normal(k2, (n, d2), param_dtype)
        return jax.nn.sigmoid(dec.x(_gaussian_sample(dec.z1, k1, z2)))

    def posterior_means(phi, rng, x):
        enc = nnx.merge(enc_graph, phi)
        mean1, log_std1 = enc.z1(x)
        eps = jax.random.normal(rng, (posterior_mean_samples, *mean1.shape), mean1.dtype)
        mean2 = jnp.mean(enc.z2(mean1 + jnp.exp(log_std1) * eps)[0], axis=0)
        return mean1, mean2

    def model_sample(theta, rng):
        dec = nnx.merge(dec_graph, theta)
        k2, k1, k_x = jax.random.split(rng, 3)
        z2 = jax.random.normal(k2, (d2,), param_dtype)
        z1 = _gaussian_sample(dec.z1, k1, z2)
        x = jax.random.bernoulli(k_x, jax.nn.sigmoid(dec.x(z1))).astype(param_dtype)
        return (z1, z2), x

    config = {"data_dim": int(data_dim), "hidden": [list(h) for h in hidden], "latent_dim": list(latent_dims),
              "stochastic_layers": 2}
    return VAE(Model(log_prior, log_likelihood, model_sample), Guide(sample, log_prob), params, encode, decode,
               config, generate, posterior_means)


def make(rng: jax.Array, data_dim: int, *, hidden: Sequence[int] = (200, 200), latent_dim: int = 50,
         output_bias: jax.Array | None = None, param_dtype: Any = jnp.float32,
         stochastic_layers: int = 1) -> tuple[Model, Guide, dict]:
    """The Burda et al. (2016) VAE as ``(model, guide, params)``.

    Args:
      rng: PRNG key for the initial weights (flax's default Linear initialisers).
      data_dim: number of pixels ``d_x`` (inputs are flat vectors in [0, 1]).
      hidden: encoder widths; the decoder mirrors them (default ``(200, 200)``).
      latent_dim: ``d_z`` (default 50).
      output_bias: optional ``(d_x,)`` initial decoder output bias; Burda et al. use the
        logit of the training-data mean, see :func:`data_mean_logits`.
      param_dtype: dtype of the weights (``jnp.float64`` under ``jax_enable_x64``).
      stochastic_layers: 1, or 2 for Burda et al.'s two-layer VAE (:func:`build_two_layer`;
        its latent is the tuple ``(z_1, z_2)``).

    Returns:
      ``(model, guide, params)`` with ``params = {"model": theta, "guide": phi}``.

    Example:
      >>> import jax, jaxelbo as je
      >>> from jaxelbo.models import vae
      >>> model, guide, params = vae.make(jax.random.key(0), 64, hidden=(32,), latent_dim=4)
      >>> loss, aux = jax.jit(je.iwae(model, guide, num_samples=8))(params, jax.random.key(1), jax.numpy.ones((3, 64)))
      >>> aux["bound"].shape
      (3,)

    References:
      Burda, Grosse & Salakhutdinov (2016), arXiv:1509.00519.
    """
    return build(rng, data_dim, hidden=hidden, latent_dim=latent_dim, output_bias=output_bias,
                 param_dtype=param_dtype, stochastic_layers=stochastic_layers)[:3]


def rebuild(config: dict, param_dtype: Any = jnp.float32) -> VAE:
    """The :class:`VAE` of a saved ``config`` (weights from a fixed key: restore params after)."""
    if config.get("stochastic_layers", 1) == 2:
        return build_two_layer(jax.random.key(0), config["data_dim"], hidden=config["hidden"],
                               latent_dims=config["latent_dim"], param_dtype=param_dtype)
    return build(jax.random.key(0), config["data_dim"], hidden=tuple(config["hidden"]),
                 latent_dim=config["latent_dim"], param_dtype=param_dtype)
