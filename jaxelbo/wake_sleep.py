r"""The phi updates of reweighted wake-sleep beyond wake-phi: sleep-phi and defensive
importance sampling (Le, Kosiorek, Siddharth, Teh & Wood 2019, arXiv:1805.10469).

:func:`jaxelbo.rws` combines them; this module holds the pieces.

- **sleep-phi** ascends ``E_{p_theta(z, x)}[log q_phi(z | x)]`` (minimises
  ``KL(p(z|x) || q)`` averaged over the model's own data), estimated from ancestral draws
  ``(z_s, x_s) ~ p_theta`` of :attr:`jaxelbo.Model.sample`.
- **defensive wake-phi** proposes from ``r(z) = (1 - delta) q_phi(z | x) + delta p_theta(z)``
  and weighs by ``log w~ = log p(x, z) - log r(z)``, so that no region the prior covers is
  missed by a guide that is still poor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxelbo.psis import psis_khat, psis_tail_size
from jaxelbo.types import Guide, Model, PyTree, log_joint
from jaxelbo.weights import batch_size_of, effective_sample_size, log_mean_exp, sample_keys

__all__ = ["defensive_log_weights", "defensive_wake_loss", "require_sample", "sleep_phi_surrogate"]

sg = jax.lax.stop_gradient


def require_sample(model: Model, what: str) -> None:
    """``ValueError`` naming the missing :attr:`Model.sample` when ``what`` needs it."""
    if getattr(model, "sample", None) is None:
        raise ValueError(f"{what} draws (z, x) from the model, but this Model has no sample: build it as "
                         "je.Model(log_prior, log_likelihood, sample=lambda theta, rng: (z, x)) with an ancestral "
                         "draw from p_theta(z, x)")


def _sampler(model: Model) -> Callable[[PyTree, jax.Array], tuple[PyTree, PyTree]]:
    require_sample(model, "this update")
    assert model.sample is not None
    return model.sample


def sleep_phi_surrogate(model: Model, guide: Guide, params: dict, rng: jax.Array, *,
                        num_sleep_samples: int) -> jax.Array:
    r"""Zero in value; its gradient for ``phi`` is ``-mean_s grad log q_phi(z_s | x_s)``.

    .. math:: (z_s, x_s) \sim p_\theta(z, x), \qquad
       S = -\frac1S \sum_s \big(\log q_\phi(z_s|x_s) - \mathrm{sg}[\log q_\phi(z_s|x_s)]\big),

    so minimising it ascends ``E_{p_theta}[log q_phi(z | x)]``. ``theta`` gets nothing (the
    draws are made at ``stop_gradient(theta)``), nor does the batch.
    """
    theta, phi = sg(params["model"]), params["guide"]
    keys = jax.random.split(rng, num_sleep_samples)
    draw = _sampler(model)
    z, x = jax.vmap(lambda key: draw(theta, key))(keys)
    z, x = sg(z), sg(x)
    log_q = jax.vmap(lambda xi, zi: guide.log_prob(phi, xi, zi))(x, z)
    return -jnp.mean(log_q - sg(log_q))


def _mixture_draw(model: Model, guide: Guide, theta: PyTree, phi: PyTree, key: jax.Array, x: PyTree,
                  defensive: float) -> PyTree:
    """One draw from ``(1 - delta) q(. | x) + delta p(.)``; callers pass stopped ``theta`` and
    ``phi``, so ``z`` moves only with ``x`` (through the guide's draw), never with the parameters."""
    k_coin, k_q, k_p = jax.random.split(key, 3)
    from_prior = jax.random.bernoulli(k_coin, defensive)
    z_q = guide.sample(phi, k_q, x)
    z_p, _ = _sampler(model)(theta, k_p)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(from_prior, b, a), z_q, z_p)


def defensive_log_weights(model: Model, guide: Guide, params: dict, keys: jax.Array, x: PyTree,
                          defensive: float) -> tuple[PyTree, jax.Array, jax.Array]:
    r"""Draws from the defensive mixture and their weights, for a batch.

    .. math:: z_k \sim r = (1 - \delta)\, q_\phi(\cdot|x) + \delta\, p_\theta(\cdot), \qquad
       \log \tilde w_k = \log p_\theta(x, z_k) - \log r(z_k) .

    ``log r`` is evaluated at ``stop_gradient`` of both parameters (the proposal is fixed),
    so ``theta`` receives gradients only through ``log p_theta(x, z_k)``; the batch ``x``
    keeps its full autodiff derivative (through ``z_k``'s draw from the guide too), and the
    returned ``log q`` carries only ``phi``'s.

    Args:
      keys: ``(B, K)`` keys (:func:`jaxelbo.weights.sample_keys`).
      defensive: ``delta`` in ``[0, 1]``; 0 is the guide, 1 the prior.

    Returns:
      ``(z, log_w, log_q)``: latents ``(B, K, ...)``, ``log w~`` ``(B, K)`` and
      ``log q_phi(z_k | x)`` ``(B, K)`` with its gradient for ``phi``.
    """
    theta, phi = params["model"], params["guide"]
    log_keep = math.log1p(-defensive) if defensive < 1.0 else -math.inf
    log_def = math.log(defensive) if defensive > 0.0 else -math.inf

    def one(key, xi):
        z = _mixture_draw(model, guide, sg(theta), sg(phi), key, xi, defensive)
        log_p = log_joint(model, theta, xi, z)
        log_q_fixed = guide.log_prob(sg(phi), xi, z)
        terms = []
        if log_keep > -math.inf:
            terms.append(log_keep + log_q_fixed)
        if log_def > -math.inf:
            terms.append(log_def + model.log_prior(sg(theta), z))
        log_r = terms[0] if len(terms) == 1 else jnp.logaddexp(terms[0], terms[1])
        # phi's wake term reads log q at fixed z and x: x's derivative is the value's alone
        return z, log_p - log_r, guide.log_prob(phi, sg(xi), sg(z))

    return jax.vmap(jax.vmap(one, in_axes=(0, None)), in_axes=(0, 0))(keys, x)


def defensive_wake_loss(model: Model, guide: Guide, *, num_samples: int, defensive: float,
                        insomnia: float = 1.0):
    """Wake-theta and defensive wake-phi in one loss ``(params, rng, x) -> (loss, aux)``.

    ``loss = -mean_b log mean_k w~_k`` in value (the weights of
    :func:`defensive_log_weights`; ``p(x)``'s importance estimate is still unbiased, so this
    is still a stochastic lower bound). ``theta`` gets ``sum_k w_k grad log p(x, z_k)``;
    ``phi`` the wake-phi ascent ``insomnia * sum_k w_k grad log q(z_k | x)`` with the
    defensive weights ``w = softmax(log w~)``.
    """

    def loss_fn(params: dict, rng: jax.Array, x: PyTree) -> tuple[jax.Array, dict]:
        keys = sample_keys(rng, batch_size_of(x), num_samples)
        _, log_w, log_q = defensive_log_weights(model, guide, params, keys, x, defensive)
        bound = log_mean_exp(log_w)
        w = sg(jax.nn.softmax(log_w, axis=-1))
        surrogate = bound + insomnia * jnp.sum(w * (log_q - sg(log_q)), axis=-1)
        lw = sg(log_w)
        aux = {"bound": sg(bound), "log_weights": lw, "ess": effective_sample_size(lw, axis=-1)}
        if psis_tail_size(num_samples) >= 5:
            aux["khat"] = psis_khat(lw)
        return -jnp.mean(surrogate), aux

    return loss_fn
