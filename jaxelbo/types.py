"""Layer 1: the two abstractions every objective is built from.

A :class:`Model` and a :class:`Guide` are NamedTuples of pure *per-example* functions
(as optax's ``GradientTransformation`` is a NamedTuple of ``init``/``update``). jaxelbo
vmaps them over the ``num_samples`` importance samples and over the batch, so a model is
written for one ``x`` and one ``z`` only. Parameters are any pytrees and travel together
as ``params = {"model": theta, "guide": phi}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol, TypedDict

import jax

PyTree = Any
Params = dict  # {"model": theta, "guide": phi}

Estimator = Literal["reparam", "stl", "dreg", "score", "vimco", "ovis", "ovis-mc"]
"""The name of a gradient estimator (see :mod:`jaxelbo.estimators` and :data:`jaxelbo.ESTIMATORS`)."""


class _AuxRequired(TypedDict):
    bound: jax.Array
    log_weights: jax.Array
    ess: jax.Array


class Aux(_AuxRequired, total=False):
    """What every loss returns beside its value; a plain ``dict`` at run time, without gradients.

    Attributes:
      bound: ``(B,)``, the bound of each example (its value whatever the estimator).
      log_weights: ``(B, *num_samples)``: ``(B, K)``, or ``(B, M, K)`` for nested budgets
        (``miwae``, ``piwae``, a ``make_objective`` with ``num_samples=(M, K)``).
      ess: ``(B,)``, Kish's effective sample size of each example's weights (the mean over
        the M groups of a nested budget).
      khat: ``(B,)``, the PSIS k-hat of each example's weights (:func:`jaxelbo.psis_khat`);
        present only with at least 25 samples per example.
    """

    khat: jax.Array


class LossFn(Protocol):
    """What every objective returns: ``(params, rng, x) -> (loss, aux)``.

    ``loss`` is the scalar ``-mean_b bound_b`` and ``jax.grad`` of it the chosen
    estimator; ``aux`` is a dict with (at least) the keys of :class:`Aux`. (Typed ``Any``
    here so that losses annotated with a plain ``dict`` conform too.)
    """

    def __call__(self, params: Params, rng: jax.Array, x: PyTree, /) -> tuple[jax.Array, Any]: ...


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
      reparameterized: optional declaration of which latents are reparameterised: a
        pytree prefix of ``z`` with bool leaves (``{"mu": True, "k": False}`` for a dict
        ``z``). ``None`` (the default): all of ``z`` for the pathwise estimators, none for
        the score-function ones. A pathwise estimator refuses a guide that declares a
        site ``False``; a per-site estimator (``estimator={"continuous": "dreg",
        "discrete": "vimco"}``, :mod:`jaxelbo.per_site`) gives the ``True`` sites their
        pathwise gradient and the others a score-function one.
      discrete_log_prob: optional ``(phi, x, z) -> scalar``, the log-density of the sites
        declared ``False`` alone (each given its parents in the guide); needed by the
        per-site estimators. Those sites must not depend on the values of the
        reparameterised ones (sample them first, or independently).
    """

    sample: Callable[[PyTree, jax.Array, PyTree], PyTree]
    log_prob: Callable[[PyTree, PyTree, PyTree], jax.Array]
    reparameterized: PyTree | None = None
    discrete_log_prob: Callable[[PyTree, PyTree, PyTree], jax.Array] | None = None


def log_joint(model: Model, theta: PyTree, x: PyTree, z: PyTree) -> jax.Array:
    """``log p_theta(x, z) = log p_theta(z) + log p_theta(x | z)`` for one example."""
    return model.log_prior(theta, z) + model.log_likelihood(theta, x, z)
