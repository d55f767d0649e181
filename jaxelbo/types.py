"""Layer 1: the two abstractions every objective is built from.

A :class:`Model` and a :class:`Guide` are NamedTuples of pure *per-example* functions
(as optax's ``GradientTransformation`` is a NamedTuple of ``init``/``update``). jaxelbo
vmaps them over the ``num_samples`` importance samples and over the batch, so a model is
written for one ``x`` and one ``z`` only. Parameters are any pytrees and travel together
as ``params = {"model": theta, "guide": phi}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PyTree = Any
Params = dict  # {"model": theta, "guide": phi}
#: What every objective returns: ``(params, rng, x) -> (loss, aux)``; ``jax.grad`` of the
#: loss is the gradient estimator and ``aux`` a dict (``bound``, ``log_weights``, ``ess``).
LossFn = Callable[[Params, jax.Array, PyTree], tuple[jax.Array, Any]]


class Model(NamedTuple):
    """A generative model ``p_theta(x, z) = p_theta(z) p_theta(x | z)``.

    Attributes:
      log_prior: ``(theta, z) -> scalar``, ``log p_theta(z)`` for one latent.
      log_likelihood: ``(theta, x, z) -> scalar``, ``log p_theta(x | z)`` for one
        example and one latent.
      sample: optional ``(theta, rng) -> (z, x)``, one ancestral draw from
        ``p_theta(z, x)``. Needed only by what simulates from the model: sleep-phi in
        :func:`jaxelbo.rws` and bidirectional Monte Carlo. Models built with two fields
        leave it ``None``.
    """

    log_prior: Callable[[PyTree, PyTree], jax.Array]
    log_likelihood: Callable[[PyTree, PyTree, PyTree], jax.Array]
    sample: Callable[[PyTree, jax.Array], tuple[PyTree, PyTree]] | None = None


class Guide(NamedTuple):
    """A variational family ``q_phi(z | x)``.

    Attributes:
      sample: ``(phi, rng, x) -> z``, one draw for one example. For the pathwise
        estimators (``reparam``, ``stl``, ``dreg``) it must be reparameterised,
        ``z = t(eps, phi; x)`` with ``eps`` drawn from ``rng``; the score-function
        estimators (``score``, ``vimco``) never differentiate it, so ``z`` may be
        discrete.
      log_prob: ``(phi, x, z) -> scalar``, ``log q_phi(z | x)``.
    """

    sample: Callable[[PyTree, jax.Array, PyTree], PyTree]
    log_prob: Callable[[PyTree, PyTree, PyTree], jax.Array]


def log_joint(model: Model, theta: PyTree, x: PyTree, z: PyTree) -> jax.Array:
    """``log p_theta(x, z) = log p_theta(z) + log p_theta(x | z)`` for one example."""
    return model.log_prior(theta, z) + model.log_likelihood(theta, x, z)
