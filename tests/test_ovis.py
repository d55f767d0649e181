"""OVIS (Liévin et al. 2020) as estimators of je.iwae: unbiasedness by exact enumeration.

A categorical guide over C = 3 states: the expected gradient of an estimator is the sum over
all C^N tuples of the N draws a loss makes (K importance samples, plus S auxiliary ones for
ovis-mc), each weighted by its probability under the guide. The guide reads its draw from a
table keyed by the PRNG key it is handed, so every tuple is visited exactly once.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je

C = 3
THETA = {"prior_logits": jnp.array([0.3, -0.2, 0.0]), "means": jnp.array([-1.0, 0.5, 2.0])}
PHI = {"logits": jnp.array([0.8, -0.4, -0.6])}
PARAMS = {"model": THETA, "guide": PHI}
X_OBS = 1.3

MODEL = je.Model(log_prior=lambda th, z: jax.nn.log_softmax(th["prior_logits"])[z],
                 log_likelihood=lambda th, x, z: -0.5 * (x["x"][0] - th["means"][z]) ** 2 - 0.5 * math.log(2 * math.pi))


def table_sample(phi, key, x):
    hit = jnp.all(x["keys"] == jax.random.key_data(key), axis=-1)
    return x["z"][jnp.argmax(hit)]


GUIDE = je.Guide(sample=table_sample, log_prob=lambda phi, x, z: jax.nn.log_softmax(phi["logits"])[z])
RNG = jax.random.key(0)


def expected_gradient(loss_fn, num_samples, num_auxiliary=0):
    """Exact ``E[grad_phi loss]`` over all C^N tuples of the N draws the loss makes (K from
    ``RNG``, and for ovis-mc S auxiliary ones from ``fold_in(RNG, 1)``)."""
    keys = [jax.random.split(RNG, (1, num_samples))[0]]
    if num_auxiliary:
        keys.append(jax.random.split(jax.random.fold_in(RNG, 1), (1, num_auxiliary))[0])
    key_data = jax.random.key_data(jnp.concatenate(keys))
    num_draws = num_samples + num_auxiliary
    states = jnp.array(list(itertools.product(range(C), repeat=num_draws)), jnp.int32)

    def grad_of(zs):
        x = {"x": jnp.array([[X_OBS]]), "z": zs[None], "keys": key_data[None]}
        return jax.grad(lambda p: loss_fn(p, RNG, x)[0])(PARAMS)["guide"]["logits"]

    grads = jax.jit(jax.vmap(grad_of))(states)
    prob = jnp.exp(jnp.sum(jax.nn.log_softmax(PHI["logits"])[states], axis=-1))
    return np.asarray(jnp.tensordot(prob, grads, axes=1))


def exact_gradient(num_samples):
    """``-grad_phi E_q[log 1/K sum_k w~_k]`` by enumeration of the bound itself."""
    states = jnp.array(list(itertools.product(range(C), repeat=num_samples)), jnp.int32)
    x = {"x": jnp.array([X_OBS])}

    def expected_bound(phi):
        log_q = jax.nn.log_softmax(phi["logits"])
        lw = jax.vmap(lambda zs: jax.vmap(lambda z: je.log_joint(MODEL, THETA, x, z) - log_q[z])(zs))(states)
        prob = jnp.exp(jnp.sum(log_q[states], axis=-1))
        return -jnp.sum(prob * (jax.nn.logsumexp(lw, -1) - math.log(num_samples)))

    return np.asarray(jax.grad(expected_bound)(PHI)["logits"])


@pytest.mark.parametrize("k,s", [(2, 1), pytest.param(3, 2, marks=pytest.mark.slow)])
def test_ovis_mc_is_unbiased_by_enumeration(k, s):
    loss_fn = je.iwae(MODEL, GUIDE, num_samples=k, estimator="ovis-mc", num_auxiliary=s)
    got, want = expected_gradient(loss_fn, k, s), exact_gradient(k)
    print(f"ovis-mc K={k} S={s}: max |E[g] - grad| = {np.max(np.abs(got - want)):.2e}, "
          f"|grad| = {np.max(np.abs(want)):.3f}")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("estimator", ["vimco", "score"])
def test_the_enumeration_harness_finds_the_known_unbiased_estimators_unbiased(estimator):
    got = expected_gradient(je.iwae(MODEL, GUIDE, num_samples=3, estimator=estimator), 3)
    np.testing.assert_allclose(got, exact_gradient(3), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ovis_asymptotic_unbiased_at_gamma_zero_and_biased_at_the_default_gamma():
    """gamma = 0 leaves the control variate free of z_k; the default gamma = 1 does not (its
    ``-gamma v_k`` depends on z_k), so the harness finds a bias there: a negative control too.
    Measured (relative to the exact gradient, which shrinks with K): 0.32, 0.64, 0.99 at K = 2, 3, 4."""
    biases = []
    for k in (2, 3, 4):
        want = exact_gradient(k)
        at_zero = expected_gradient(je.iwae(MODEL, GUIDE, num_samples=k, estimator="ovis", gamma=0.0), k)
        np.testing.assert_allclose(at_zero, want, rtol=1e-4, atol=1e-6)
        at_default = expected_gradient(je.iwae(MODEL, GUIDE, num_samples=k, estimator="ovis"), k)
        biases.append(float(np.max(np.abs(at_default - want))) / float(np.max(np.abs(want))))
    print("ovis (gamma = 1) relative bias at K = 2, 3, 4:", biases)
    assert min(biases) > 0.1


def test_estimator_settings_are_validated():
    lg = je.models.linear_gaussian
    with pytest.raises(ValueError, match="gamma is a setting of estimator 'ovis' only"):
        je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="vimco", gamma=1.0)
    with pytest.raises(ValueError, match="num_auxiliary is a setting of estimator 'ovis-mc' only"):
        je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="ovis", num_auxiliary=2)
    with pytest.raises(ValueError, match="needs num_samples >= 2"):
        je.iwae(lg.model(), lg.guide(), num_samples=1, estimator="ovis-mc")
    with pytest.raises(TypeError, match="num_auxiliary"):
        je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="ovis-mc", num_auxiliary=1.5)


@pytest.mark.slow  # two losses compiled (~20 s under load)
def test_ovis_mc_gradient_in_x_is_the_derivative_of_the_value():
    """x gets the plain derivative of the Monte Carlo value (through a continuous z too), as every
    estimator gives it: here, the reparameterised IWAE's on the same key (the same value). It used
    to differentiate the value with z held fixed plus a score term (0.7 relative error)."""
    lg = je.models.linear_gaussian
    params = lg.optimal_params(jnp.array([0.3, -0.5]))
    params["guide"]["b"] = params["guide"]["b"] + 0.4
    x = jnp.array([[1.0, 0.5], [-0.4, 2.0]])
    losses = {e: je.iwae(lg.model(), lg.guide(), num_samples=4, estimator=e) for e in ("ovis-mc", "reparam")}
    grad_x = {e: jax.grad(lambda x_, f=f: f(params, RNG, x_)[0])(x) for e, f in losses.items()}
    np.testing.assert_allclose(grad_x["ovis-mc"], grad_x["reparam"], rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(grad_x["reparam"]))) > 0.1
