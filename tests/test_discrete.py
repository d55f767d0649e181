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



def model_with_a_zero_state(log_zero):
    """MODEL with state 2 given prior probability exp(log_zero): -inf makes it impossible."""
    return je.Model(
        log_prior=lambda th, z: jax.nn.log_softmax(th["prior_logits"])[z] + jnp.where(z == 2, log_zero, 0.0),
        log_likelihood=MODEL.log_likelihood)


def vimco_signal_by_definition(lw):
    """L - log 1/K (sum_{j != k} w~_j + exp(mean_{j != k} log w~_j)), one k at a time in numpy."""
    lw = np.asarray(lw, np.float64)
    k = lw.shape[-1]
    bound = np.logaddexp.reduce(lw) - np.log(k)
    out = []
    for i in range(k):
        others = np.delete(lw, i)
        with np.errstate(invalid="ignore"):
            out.append(bound - (np.logaddexp(np.logaddexp.reduce(others), np.mean(others)) - np.log(k)))
    return np.array(out)


def test_vimco_signal_with_zero_weights():
    """Issue 23 row 10: the leave-one-out mean subtracted -inf from -inf (nan) at a zero weight."""
    from jaxelbo.estimators import leave_one_out_signal, vimco_signal
    from jaxelbo.weights import leave_one_out_mean, log_mean_exp

    rows = jnp.array([[0.3, -1.0, -jnp.inf, 2.0, 0.5], [-jnp.inf, -1.0, -jnp.inf, 2.0, 0.5],
                      [0.3, -1.0, 1.2, 2.0, 0.5]])
    for row in rows:
        expected = vimco_signal_by_definition(row)
        np.testing.assert_allclose(vimco_signal(row), expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(leave_one_out_signal(log_mean_exp, row), expected, rtol=1e-6, atol=1e-6)
    jac = jax.jacrev(leave_one_out_mean)(rows[0])       # the double where: finite, no nan from -inf
    np.testing.assert_allclose(jac[2], [0.25, 0.25, 0.0, 0.25, 0.25])
    np.testing.assert_array_equal(np.delete(np.asarray(jac), 2, axis=0), 0.0)   # the others' means are -inf


def test_vimco_with_a_zero_probability_state():
    """One sample per example in an impossible state (log w~ = -inf; issue 23 row 10): VIMCO's
    loss, bound and gradient are finite (they were nan), the bound is log 1/K of the K - 1 possible
    weights, and the gradient is the limit as the state's log prior goes to -inf: the same state at
    log prior -100, where e^-100 is 0 to float32 beside the other weights."""
    num_samples = 4
    loss_fns = {zero: je.iwae(model_with_a_zero_state(zero), GUIDE, num_samples=num_samples, estimator="vimco")
                for zero in (-jnp.inf, -100.0)}
    out = {zero: jax.jit(jax.value_and_grad(f, has_aux=True))(PARAMS, jax.random.key(0), X)
           for zero, f in loss_fns.items()}
    (loss, aux), grad = out[-jnp.inf]
    lw = np.asarray(aux["log_weights"], np.float64)
    assert (np.isneginf(lw).sum(axis=-1) == 1).all()     # the seed puts one sample of each example there
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grad))
    kept = np.where(np.isneginf(lw), -np.inf, lw)
    np.testing.assert_allclose(aux["bound"], np.logaddexp.reduce(kept, axis=-1) - np.log(num_samples), rtol=1e-6)
    (soft_loss, _), soft_grad = out[-100.0]
    np.testing.assert_allclose(loss, soft_loss, rtol=1e-6)
    for g, s in zip(jax.tree.leaves(grad), jax.tree.leaves(soft_grad), strict=True):
        np.testing.assert_allclose(g, s, rtol=1e-5, atol=1e-6)
