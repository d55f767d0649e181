"""TensorFlow Probability (JAX substrate) reference: ``tfp.vi`` with DOUBLY_REPARAMETERIZED.

``tfp.vi.monte_carlo_variational_loss(..., importance_sample_size=K,
gradient_estimator=DOUBLY_REPARAMETERIZED)`` builds the surrogate
``sum_k stop(w_k)^2 log w~_k`` with ``log q`` at a stopped surrogate posterior. Its
gradient for the guide is Tucker et al.'s IWAE-DReG, but the *model* parameters, which
reach ``log w~_k`` directly, receive ``sum_k w_k^2 grad_theta log p`` instead of the IWAE
gradient ``sum_k w_k grad_theta log p``: a different (biased) theta gradient. The
benchmark checks its guide gradient against jaxelbo on the same noise and reports the
theta mismatch.

Optional: needs ``tfp-nightly`` (pure Python, no TensorFlow); :func:`available` says
whether it imports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from references import burda


def available() -> str | None:
    """``None`` when tfp's JAX substrate imports, else the reason it does not."""
    try:
        import tensorflow_probability.substrates.jax  # noqa: F401
    except Exception as e:  # any import failure means "skip"
        return f"{type(e).__name__}: {e}"
    return None


def version() -> str:
    import tensorflow_probability.substrates.jax as tfp

    return tfp.__version__


def _posterior(phi: dict, x: jax.Array):
    from tensorflow_probability.substrates.jax import distributions as tfd

    mu, log_sigma = burda.encode(phi, x)
    return tfd.Independent(tfd.Normal(mu, jnp.exp(log_sigma)), reinterpreted_batch_ndims=1)


def dreg_loss(params: dict, seed: jax.Array, x: jax.Array, *, num_samples: int) -> jax.Array:
    """``-mean_b IWAE_K`` in value; TFP's doubly-reparameterised gradient."""
    import tensorflow_probability.substrates.jax as tfp

    theta = params["model"]

    def target_log_prob(z):  # z: (K, B, 50) -> (K, B)
        return (burda.standard_normal_log_prob(z)
                + burda.bernoulli_log_prob(x, burda.decode(theta, z)))

    loss = tfp.vi.monte_carlo_variational_loss(
        target_log_prob, _posterior(params["guide"], x),
        importance_sample_size=num_samples, sample_size=1,
        discrepancy_fn=tfp.vi.kl_reverse,
        gradient_estimator=tfp.vi.GradientEstimators.DOUBLY_REPARAMETERIZED,
        stopped_surrogate_posterior=_posterior(jax.lax.stop_gradient(params["guide"]), x),
        seed=seed)
    return jnp.mean(loss)


def noise(params: dict, seed: jax.Array, x: jax.Array, *, num_samples: int) -> jax.Array:
    """The ``eps`` (B, K, 50) that :func:`dreg_loss` draws for ``seed`` (for gradient checks)."""
    from tensorflow_probability.substrates.jax.internal import samplers

    sample_seed, _ = samplers.split_seed(seed, 2)
    mu, log_sigma = burda.encode(params["guide"], x)
    z = _posterior(params["guide"], x).sample(num_samples, seed=sample_seed)  # (K, B, 50)
    return jnp.swapaxes((z - mu) * jnp.exp(-log_sigma), 0, 1)
