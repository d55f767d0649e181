"""Score-function estimators on a discrete latent: exact answers by enumeration.

z in {0, .., C-1}; the expected IWAE bound E_q[log 1/K sum_k w~_k] is a finite sum over
the C^K joint states, so its exact gradient is known and VIMCO / score must average to it.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from tests.stats import z_scores

pytestmark = pytest.mark.usefixtures("strict_numerics")

C, K, B, R = 3, 3, 2, 20_000


def log_normal(x, mean):
    return -0.5 * (jnp.log(2 * jnp.pi) + (x - mean) ** 2)


MODEL = je.Model(
    log_prior=lambda th, z: jax.nn.log_softmax(th["prior_logits"])[z],
    log_likelihood=lambda th, x, z: jnp.sum(log_normal(x, th["means"][z])),
)


def guide_logits(phi, x):
    return phi["bias"] + phi["slope"] * x[0]


GUIDE = je.Guide(
    sample=lambda phi, rng, x: jax.random.categorical(rng, guide_logits(phi, x)),
    log_prob=lambda phi, x, z: jax.nn.log_softmax(guide_logits(phi, x))[z],
)

PARAMS = {"model": {"prior_logits": jnp.array([0.2, -0.3, 0.1]), "means": jnp.array([-1.5, 0.0, 2.0])},
          "guide": {"bias": jnp.array([0.5, 0.0, -0.5]), "slope": jnp.array([-0.8, 0.1, 0.6])}}
X = jnp.array([[-1.0], [1.2]])


def exact_expected_iwae(params, num_samples=K):
    """-mean_b sum over all C^K joint states of prod_k q(z_k) (logsumexp lw - log K)."""
    states = jnp.array(list(itertools.product(range(C), repeat=num_samples)))  # (C^K, K)

    def one(x):
        log_q = jax.nn.log_softmax(guide_logits(params["guide"], x))
        log_p = jax.nn.log_softmax(params["model"]["prior_logits"]) + jnp.sum(
            log_normal(x[None, :], params["model"]["means"][:, None]), axis=-1)
        lw = (log_p - log_q)[states]
        prob = jnp.exp(jnp.sum(log_q[states], axis=-1))
        return jnp.sum(prob * (jax.nn.logsumexp(lw, axis=-1) - np.log(num_samples)))

    return -jnp.mean(jax.vmap(one)(X))


@pytest.mark.parametrize("estimator", ["vimco", "score"])
def test_score_estimators_match_enumerated_gradient(estimator):
    loss_fn = je.iwae(MODEL, GUIDE, num_samples=K, estimator=estimator)
    reps = jax.jit(lambda p: je.gradient_replicates(loss_fn, p, jax.random.key(0), X, num_replicates=R))(PARAMS)
    exact = jax.grad(exact_expected_iwae)(PARAMS)
    z = z_scores(reps, exact)
    assert np.max(np.abs(z)) < 5.0, z
    # the same test rejects the gradient of a different bound (K = 2 instead of 3)
    wrong = jax.grad(lambda p: exact_expected_iwae(p, num_samples=2))(PARAMS)
    assert np.max(np.abs(z_scores(reps, wrong))) > 5.0


def test_loss_value_is_unbiased_for_the_expected_bound():
    loss_fn = je.iwae(MODEL, GUIDE, num_samples=K, estimator="vimco")
    vals = jax.jit(jax.vmap(lambda r: loss_fn(PARAMS, r, X)[0]))(jax.random.split(jax.random.key(1), R))
    z = (vals.mean() - exact_expected_iwae(PARAMS)) / (vals.std() / np.sqrt(R))
    assert abs(float(z)) < 5.0

