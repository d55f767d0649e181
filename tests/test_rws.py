"""Reweighted wake-sleep, complete: sleep-phi, insomnia, defensive wake-phi.

A small discrete model (z in 3 states, x in 4) where p(z, x) and p(z | x) are enumerated:
sleep-phi's expected gradient is a finite sum, and wake-phi's expected gradient at K is a
finite sum over all 3^K sample tuples (the guide reads its draw from a table keyed by the
PRNG key it is handed, so every tuple is visited once).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo import wake_sleep
from jaxelbo.models import linear_gaussian as lg
from tests import toy
from tests.stats import z_scores

C, V = 3, 4     # latent states, observation values

THETA = {"prior_logits": jnp.array([0.3, -0.2, 0.0]),
         "lik_logits": jnp.array([[1.0, 0.0, -1.0, 0.0], [-0.5, 1.2, 0.3, -1.0], [0.0, -1.0, 0.5, 1.5]])}
PHI = {"table": jnp.array([[0.4, 0.0, -0.3], [0.0, 0.6, -0.2], [-0.3, 0.1, 0.5], [0.2, -0.4, 0.0]])}
PARAMS = {"model": THETA, "guide": PHI}


def xi(x):
    return x[0].astype(jnp.int32)


def sample(theta, rng):
    k_z, k_x = jax.random.split(rng)
    z = jax.random.categorical(k_z, theta["prior_logits"])
    x = jax.random.categorical(k_x, theta["lik_logits"][z])
    return z, jnp.array([x], jnp.float32)


MODEL = je.Model(log_prior=lambda th, z: jax.nn.log_softmax(th["prior_logits"])[z],
                 log_likelihood=lambda th, x, z: jax.nn.log_softmax(th["lik_logits"][z])[xi(x)],
                 sample=sample)


def log_q(phi, x, z):
    return jax.nn.log_softmax(phi["table"][xi(x)])[z]


GUIDE = je.Guide(sample=lambda phi, rng, x: jax.random.categorical(rng, phi["table"][xi(x)]), log_prob=log_q)
X = jnp.array([[0.0], [2.0]])


def joint_table(theta):
    """``log p(z, x)``, shape (C, V)."""
    return jax.nn.log_softmax(theta["prior_logits"])[:, None] + jax.nn.log_softmax(theta["lik_logits"], axis=-1)


def exact_sleep_gradient(params):
    """``-grad_phi sum_{z, x} p(z, x) log q(z | x)``."""
    p = jnp.exp(joint_table(params["model"]))

    def objective(phi):
        return -jnp.sum(p.T * jax.nn.log_softmax(phi["table"], axis=-1))
    return jax.grad(objective)(params["guide"])


def kl_gradient(params, x_value):
    """``grad_phi KL(p(z | x) || q(z | x))`` for one observation value."""
    post = jax.nn.softmax(joint_table(params["model"])[:, x_value])

    def kl(phi):
        return jnp.sum(post * (jnp.log(post) - jax.nn.log_softmax(phi["table"][x_value])))
    return jax.grad(kl)(params["guide"])


# ------------------------------------------------------------------ sleep-phi and insomnia


@pytest.mark.slow
def test_sleep_phi_expectation_is_exact_and_the_test_can_fail():
    loss_fn = je.rws(MODEL, GUIDE, num_samples=2, estimator="score", insomnia=0.0, num_sleep_samples=4)
    grad = jax.jit(jax.vmap(lambda r: jax.grad(lambda p: loss_fn(p, r, X)[0])(PARAMS)["guide"]))
    reps = grad(jax.random.split(jax.random.key(0), 4000))
    z = z_scores(reps, exact_sleep_gradient(PARAMS))
    assert np.max(np.abs(z)) < 4.5, z
    # negative control: the same replicates against another model's sleep gradient
    other = {"model": {**THETA, "prior_logits": THETA["prior_logits"] + jnp.array([0.5, 0.0, -0.5])}, "guide": PHI}
    assert np.max(np.abs(z_scores(reps, exact_sleep_gradient(other)))) > 8.0


def test_insomnia_mixes_wake_and_sleep_linearly_and_leaves_the_value_and_theta_alone():
    mu = jnp.array([0.3, -0.5])
    params = lg.optimal_params(mu)
    params["guide"]["b"] = params["guide"]["b"] + 0.4
    x = jnp.ones((2, 2))
    out = {}
    for insomnia in (0.0, 0.3, 1.0):
        loss_fn = je.rws(lg.model(), lg.guide(), num_samples=4, insomnia=insomnia, num_sleep_samples=3)
        out[insomnia] = jax.jit(jax.value_and_grad(lambda p, f=loss_fn: f(p, jax.random.key(1), x)[0]))(params)
    for insomnia in (0.0, 0.3):
        np.testing.assert_allclose(out[insomnia][0], out[1.0][0], rtol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
                               out[insomnia][1]["model"], out[1.0][1]["model"])
    mix = jax.tree_util.tree_map(lambda w, s: 0.3 * w + 0.7 * s, out[1.0][1]["guide"], out[0.0][1]["guide"])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           out[0.3][1]["guide"], mix)
    # and sleep is not wake (so the identity above is not vacuous)
    assert not np.allclose(out[0.0][1]["guide"]["b"], out[1.0][1]["guide"]["b"], atol=1e-3)


def test_a_model_without_sample_is_refused_by_name():
    bare = je.Model(MODEL.log_prior, MODEL.log_likelihood)
    with pytest.raises(ValueError, match="Model has no sample"):
        je.rws(bare, GUIDE, num_samples=2, estimator="score", insomnia=0.0)
    with pytest.raises(ValueError, match="Model has no sample"):
        je.rws(bare, GUIDE, num_samples=2, estimator="score", defensive=0.2)
    with pytest.raises(ValueError, match="needs estimator 'score'"):
        je.rws(MODEL, GUIDE, num_samples=2, estimator="dreg", defensive=0.2)
    with pytest.raises(ValueError, match="insomnia must lie in"):
        je.rws(MODEL, GUIDE, num_samples=2, insomnia=1.5)
    with pytest.raises(ValueError, match="defensive must lie in"):
        je.rws(MODEL, GUIDE, num_samples=2, estimator="score", defensive=-0.1)


# ------------------------------------------------------------------ wake-phi by enumeration


def enumerated_expected_gradient(loss_fn_of, num_samples, x_value):
    """``E[grad_phi loss]`` over all C^K tuples drawn from the tabular guide, exactly."""
    rng = jax.random.key(0)
    key_data = jax.random.key_data(jax.random.split(rng, (1, num_samples))[0])     # what the loss will use

    def table_sample(phi, key, x):
        hit = jnp.all(x["keys"] == jax.random.key_data(key), axis=-1)
        return x["z"][jnp.argmax(hit)]

    enum_model = je.Model(log_prior=MODEL.log_prior,
                          log_likelihood=lambda th, x, z: MODEL.log_likelihood(th, x["x"], z))
    enum_guide = je.Guide(sample=table_sample, log_prob=lambda phi, x, z: log_q(phi, x["x"], z))
    loss_fn = loss_fn_of(enum_model, enum_guide)
    states = jnp.array(list(itertools.product(range(C), repeat=num_samples)), jnp.int32)

    def grad_of(zs):
        x = {"x": jnp.array([[float(x_value)]]), "z": zs[None], "keys": key_data[None]}
        return jax.grad(lambda p: loss_fn(p, rng, x)[0])(PARAMS)["guide"]

    grads = jax.jit(jax.vmap(grad_of))(states)
    log_q_row = jax.nn.log_softmax(PHI["table"][x_value])
    prob = jnp.exp(jnp.sum(log_q_row[states], axis=-1))
    assert abs(float(prob.sum()) - 1.0) < 1e-5
    return jax.tree_util.tree_map(lambda g: jnp.tensordot(prob, g, axes=1), grads)


def test_wake_phi_bias_shrinks_towards_the_inclusive_kl_gradient():
    x_value = 2
    target = kl_gradient(PARAMS, x_value)["table"]
    biases = []
    for k in (1, 2, 3, 5):
        g = enumerated_expected_gradient(
            lambda m, q, k=k: je.rws(m, q, num_samples=k, estimator="score"), k, x_value)["table"]
        biases.append(float(jnp.linalg.norm(g - target)))
    print("wake-phi bias by K = 1, 2, 3, 5:", biases)
    # K = 1: the weight is 1 and E_q[grad log q] = 0, so the bias is the whole gradient
    np.testing.assert_allclose(biases[0], float(jnp.linalg.norm(target)), rtol=1e-5)
    assert all(b < a for a, b in zip(biases, biases[1:], strict=False)), biases
    assert biases[-1] < 0.5 * biases[0], biases


# ------------------------------------------------------------------ defensive importance sampling


@pytest.mark.parametrize("delta", [0.0, 0.3, 1.0])
def test_defensive_weights(delta):
    keys = jax.random.split(jax.random.key(3), (2, 5))
    z, log_w, lq = wake_sleep.defensive_log_weights(MODEL, GUIDE, PARAMS, keys, X, delta)
    log_p = jax.vmap(jax.vmap(lambda x, zz: je.log_joint(MODEL, THETA, x, zz), (None, 0)))(X, z)
    log_prior = jax.vmap(jax.vmap(lambda zz: MODEL.log_prior(THETA, zz)))(z)
    log_guide = jax.vmap(jax.vmap(lambda x, zz: log_q(PHI, x, zz), (None, 0)))(X, z)
    np.testing.assert_allclose(lq, log_guide, rtol=1e-6)
    if delta == 0.0:
        expected = log_p - log_guide
    elif delta == 1.0:
        expected = log_p - log_prior          # = log p(x | z)
    else:
        expected = log_p - jnp.log((1 - delta) * jnp.exp(log_guide) + delta * jnp.exp(log_prior))
    np.testing.assert_allclose(log_w, expected, rtol=1e-5, atol=1e-6)


def test_defensive_draws_come_from_the_mixture():
    n = 20_000
    keys = jax.random.split(jax.random.key(4), (1, n))
    x = X[1:]
    q_probs = np.asarray(jax.nn.softmax(PHI["table"][2]))
    prior = np.asarray(jax.nn.softmax(THETA["prior_logits"]))
    for delta in (0.0, 0.5, 1.0):
        z = np.asarray(jax.jit(lambda k, d=delta: wake_sleep.defensive_log_weights(
            MODEL, GUIDE, PARAMS, k, x, d)[0])(keys))[0]
        freq = np.bincount(z, minlength=C) / n
        probs = (1 - delta) * q_probs + delta * prior
        assert np.all(np.abs(freq - probs) < 4.5 * np.sqrt(probs * (1 - probs) / n)), (delta, freq, probs)


@pytest.mark.slow
def test_defensive_wake_phi_is_consistent_for_the_inclusive_kl_gradient():
    x = X[1:]                                # observation value 2
    target = kl_gradient(PARAMS, 2)["table"]
    loss_fn = je.rws(MODEL, GUIDE, num_samples=8000, estimator="score", defensive=0.5)
    g = jax.jit(jax.grad(lambda p: loss_fn(p, jax.random.key(5), x)[0]))(PARAMS)["guide"]["table"]
    np.testing.assert_allclose(g, target, atol=0.03)
    # the value is still IWAE's estimate of log p(x): compare with the enumerated evidence
    log_px = jax.nn.logsumexp(joint_table(THETA)[:, 2])
    np.testing.assert_allclose(loss_fn(PARAMS, jax.random.key(5), x)[1]["bound"][0], log_px, atol=0.01)


@pytest.mark.parametrize("kwargs", [{"defensive": 0.3}, {"defensive": 0.3, "insomnia": 0.5}, {"insomnia": 0.0}])
def test_x_gradient_is_the_derivative_of_the_value(kwargs):
    """Defensive and sleep-phi variants: jax.grad in x equals a central finite difference of the
    loss on the same key (float64); the wake-phi score term reaches phi only. (Before, the
    defensive path held z fixed and its score term leaked dlog q/dx into x.)"""
    with jax.enable_x64(True):
        mu = jnp.array([0.3, -0.5])
        params = lg.optimal_params(mu)
        params = {"model": {"mu": params["model"]["mu"] - 0.2},
                  "guide": {**params["guide"], "b": params["guide"]["b"] + 0.3}}
        params, x = toy.to_float64(params), toy.to_float64(lg.sample_data(jax.random.key(7), mu, 3))
        f = je.rws(lg.model(), lg.guide(), num_samples=8, estimator="score", **kwargs)
        toy.assert_x_gradient_is_the_fd(jax.jit(lambda xx: f(params, jax.random.key(3), xx)[0]), x)
