r"""The inference gap split into approximation and amortisation (Cremer, Li & Duvenaud 2018).

For a guide ``q_phi(z | x)`` shared by all data points (amortised) and the best member
``q*(z | x)`` of a local family fitted to one ``x`` alone,

.. math::

   \log p(x) - \mathcal L[q_\phi]
     = \underbrace{\log p(x) - \mathcal L[q^*]}_{\text{approximation gap}}
     + \underbrace{\mathcal L[q^*] - \mathcal L[q_\phi]}_{\text{amortisation gap}} .

Here ``q*`` is a diagonal Gaussian on the flattened latent, initialised at the moments of
``q_phi(z | x)`` and fitted by optax's Adam on the reparameterised ELBO for a fixed number of
steps; ``log p(x)`` comes from the caller (e.g. :func:`jaxelbo.ais_log_likelihood`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxelbo._validation import batch_size_of, check_count, check_inputs, check_model_guide
from jaxelbo.types import Guide, Model, PyTree, log_joint

LOG_2PI = math.log(2.0 * math.pi)


class InferenceGaps(NamedTuple):
    """What :func:`amortisation_gap` returns; every field has shape ``(B,)`` except the last two.

    Attributes:
      elbo: ``ELBO[q_phi]``, the amortised guide's ELBO (Monte Carlo).
      local_elbo: ``ELBO[q*]``, the ELBO of the locally optimised Gaussian.
      approximation_gap: ``log p(x) - ELBO[q*]``.
      amortisation_gap: ``ELBO[q*] - ELBO[q_phi]``.
      local_mean, local_scale: ``(B, D)``, ``q*`` on the flattened latent.
    """

    elbo: jax.Array
    local_elbo: jax.Array
    approximation_gap: jax.Array
    amortisation_gap: jax.Array
    local_mean: jax.Array
    local_scale: jax.Array


def amortisation_gap(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                     log_likelihood: jax.Array, num_steps: int = 500, num_samples: int = 16,
                     learning_rate: float = 1e-2, num_eval_samples: int = 1000, num_init_samples: int = 64,
                     batch_chunk_size: int = 32) -> InferenceGaps:
    r"""Approximation and amortisation gaps per example (Cremer et al. 2018).

    .. math::

       q^*(z \mid x) = \arg\max_{m, s}\ \mathbb E_{\epsilon}\big[\log p(x, m + s\epsilon)
         - \log \mathcal N(m + s\epsilon; m, s^2)\big],

    on the flattened latent ``z``, starting from the mean and standard deviation of
    ``num_init_samples`` draws of ``q_phi(z | x)`` (so the start is close to ``q_phi`` for a
    diagonal-Gaussian guide), ``num_steps`` Adam steps on ``num_samples``-sample
    reparameterised ELBO estimates. Both ELBOs are then estimated with
    ``num_eval_samples`` fresh draws. ``params`` are constants (``stop_gradient``).

    A local diagonal Gaussian is the family of a mean-field encoder; for a richer guide
    (e.g. a two-layer ``q(z_1 | x) q(z_2 | z_1)``) the amortisation gap can be negative,
    meaning the local family is the poorer one.

    Args:
      model, guide, params: as for the objectives.
      rng: PRNG key.
      x: a batch, leading axis B.
      log_likelihood: ``(B,)`` estimates of ``log p(x)`` (AIS or IWAE-5000).
      num_steps: Adam steps of the local fit.
      num_samples: samples per ELBO estimate during the fit.
      learning_rate: Adam's step size.
      num_eval_samples: samples of the final ELBO estimates.
      num_init_samples: guide draws that initialise ``q*``.
      batch_chunk_size: examples optimised together (``lax.map`` over chunks).

    Returns:
      :class:`InferenceGaps`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> from jaxelbo.models import linear_gaussian as lg
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> params["guide"]["b"] = params["guide"]["b"] + 1.0   # a biased amortised guide
      >>> x = jnp.ones((2, 2))
      >>> gaps = je.amortisation_gap(lg.model(), lg.guide(), params, jax.random.key(0), x,
      ...                            log_likelihood=lg.log_marginal(params["model"], x), num_steps=200,
      ...                            learning_rate=0.05)
      >>> exact = lg.log_marginal(params["model"], x) - lg.exact_elbo(params, x)   # 1.0 = ||b offset||^2 / 2
      >>> bool(jnp.allclose(gaps.amortisation_gap, exact, atol=0.05)), bool(jnp.all(gaps.approximation_gap < 0.05))
      (True, True)

    References:
      Cremer, Li & Duvenaud (2018), "Inference suboptimality in variational autoencoders",
      arXiv:1801.03558.
    """
    import optax

    check_model_guide(model, guide)
    check_inputs(model, guide, params, rng, x)
    batch = batch_size_of(x)
    num_steps = check_count("num_steps", num_steps)
    num_samples = check_count("num_samples", num_samples)
    num_eval_samples = check_count("num_eval_samples", num_eval_samples)
    num_init_samples = check_count("num_init_samples", max(num_init_samples, 2))
    log_likelihood = jnp.asarray(log_likelihood)
    if log_likelihood.shape != (batch,):
        raise ValueError(f"log_likelihood must have shape ({batch},) (one per example), got {log_likelihood.shape}")
    params = jax.lax.stop_gradient(params)
    theta, phi = params["model"], params["guide"]
    opt = optax.adam(learning_rate)

    def one(b, xb):
        key = jax.random.fold_in(rng, b)
        k_init, k_fit, k_eval, k_amort = jax.random.split(key, 4)
        _, unravel = ravel_pytree(guide.sample(phi, k_init, xb))

        def guide_draw(k):
            return ravel_pytree(guide.sample(phi, k, xb))[0]

        draws = jax.vmap(guide_draw)(jax.random.split(k_init, num_init_samples))
        local = {"mean": jnp.mean(draws, 0), "log_scale": jnp.log(jnp.std(draws, 0) + 1e-6)}

        def local_elbo(lp, k, n):
            eps = jax.random.normal(k, (n, lp["mean"].shape[0]), lp["mean"].dtype)
            z = lp["mean"] + jnp.exp(lp["log_scale"]) * eps
            log_q = jnp.sum(-0.5 * (LOG_2PI + eps ** 2) - lp["log_scale"], axis=-1)
            log_p = jax.vmap(lambda zf: log_joint(model, theta, xb, unravel(zf)))(z)
            return jnp.mean(log_p - log_q)

        def step(carry, i):
            lp, state = carry
            grad = jax.grad(lambda q: -local_elbo(q, jax.random.fold_in(k_fit, i), num_samples))(lp)
            updates, state = opt.update(grad, state, lp)
            return (optax.apply_updates(lp, updates), state), None

        (local, _), _ = jax.lax.scan(step, (local, opt.init(local)), jnp.arange(num_steps))
        fitted = local_elbo(local, k_eval, num_eval_samples)

        def amortised_log_w(k):
            z = guide.sample(phi, k, xb)
            return log_joint(model, theta, xb, z) - guide.log_prob(phi, xb, z)

        amortised = jnp.mean(jax.vmap(amortised_log_w)(jax.random.split(k_amort, num_eval_samples)))
        return amortised, fitted, local["mean"], jnp.exp(local["log_scale"])

    from jaxelbo.ais import _map_batch

    elbo, fitted, mean, scale = _map_batch(one, (jnp.arange(batch), x), batch,
                                           check_count("batch_chunk_size", batch_chunk_size))
    return InferenceGaps(elbo=elbo, local_elbo=fitted, approximation_gap=log_likelihood - fitted,
                         amortisation_gap=fitted - elbo, local_mean=mean, local_scale=scale)
