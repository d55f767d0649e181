"""The pathwise estimators on a hierarchical guide q(z1|x) q(z2|z1), against closed forms.

The two-layer linear-Gaussian toy (jaxelbo.models.hierarchical_gaussian) has an exact
log p(x), an exact ELBO and its exact gradient, and its exact posterior lies in the guide
family. These pin down what reparam, STL and DReG must estimate when ``z = (z1, z2)`` is a
tuple and ``z2`` depends on ``phi`` through ``z1`` as well as directly.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from tests.stats import z_scores

hg = je.models.hierarchical_gaussian
Z_MAX = 5.0  # |z| above this under the null: p < 1e-5 per element
D, B, R = 3, 4, 1000
MU = jnp.array([0.5, -1.0, 2.0])


@pytest.fixture(scope="module")
def problem():
    """Data from the model, and parameters away from the optimum (model and guide)."""
    x = hg.sample_data(jax.random.key(0), MU, B)
    opt = hg.optimal_params(MU)
    keys = jax.random.split(jax.random.key(3), len(opt["guide"]))
    phi = {name: value + 0.3 * jax.random.normal(k, jnp.shape(value))
           for (name, value), k in zip(opt["guide"].items(), keys, strict=True)}
    return x, {"model": {"mu": MU + 0.2}, "guide": phi}


def replicates(objective, estimator, num_samples, params, x, guide=None, num_replicates=R):
    loss_fn = getattr(je, objective)(hg.model(), guide or hg.guide(), num_samples=num_samples,
                                     estimator=estimator)
    run = jax.jit(lambda p, xb, rng: je.gradient_replicates(loss_fn, p, rng, xb, num_replicates=num_replicates))
    return run(params, x, jax.random.key(7))  # the same key for every estimator: paired on the same noise


def exact_gradient(params, x):
    return jax.grad(lambda p: -jnp.mean(hg.exact_elbo(p, x)))(params)


def test_exact_posterior_gives_every_sample_the_weight_log_p_x():
    x = hg.sample_data(jax.random.key(1), MU, B)
    params = hg.optimal_params(MU)
    lw = je.log_weights(hg.model(), hg.guide(), params, jax.random.key(2), x, num_samples=16)
    chex.assert_shape(lw, (B, 16))
    exact = hg.log_marginal(params["model"], x)
    np.testing.assert_allclose(lw, jnp.broadcast_to(exact[:, None], lw.shape), atol=2e-5)
    np.testing.assert_allclose(hg.exact_elbo(params, x), exact, atol=2e-5)


@pytest.mark.slow
def test_exact_elbo_matches_the_monte_carlo_mean_and_lies_below_log_p_x(problem):
    x, params = problem
    n = 100_000
    lw = je.log_weights(hg.model(), hg.guide(), params, jax.random.key(4), x, num_samples=n)
    se = lw.std(axis=1) / np.sqrt(n)
    exact = hg.exact_elbo(params, x)
    assert np.all(np.abs(lw.mean(axis=1) - exact) < Z_MAX * se)
    assert np.all(exact < hg.log_marginal(params["model"], x) - 0.1)  # away from the optimum


def test_samples_are_ancestral_and_reparameterised(problem):
    x, params = problem
    phi = params["guide"]
    z1, z2 = jax.vmap(hg.guide().sample, in_axes=(None, 0, None))(phi, jax.random.split(jax.random.key(5), 4000),
                                                                    x[0])
    # the second layer is standardised by the first layer's own draw
    u = (z2 - z1 @ phi["A2"].T - phi["b2"]) / jnp.exp(phi["log_scale2"])
    assert abs(float(u.mean())) < Z_MAX / np.sqrt(u.size) and abs(float(u.std()) - 1.0) < 0.05
    g = jax.grad(lambda p: hg.guide().sample(p, jax.random.key(6), x[0])[1].sum())(phi)
    assert float(jnp.abs(g["A1"]).sum()) > 0  # z2 depends on A1 through z1


@pytest.mark.slow
@pytest.mark.parametrize("objective,estimator,num_samples",
                         [("elbo", "reparam", 2), ("elbo", "stl", 2), ("iwae", "dreg", 1)])
def test_unbiased_estimators_average_to_the_exact_elbo_gradient(problem, objective, estimator, num_samples):
    """ELBO_K with reparam or STL, and IWAE_1 (= the ELBO) with DReG: mean over R draws."""
    x, params = problem
    reps = replicates(objective, estimator, num_samples, params, x)
    chex.assert_trees_all_equal_structs(jax.tree.map(lambda a: a[0], reps), params)
    assert np.max(np.abs(z_scores(reps, exact_gradient(params, x)))) < Z_MAX


@pytest.mark.slow
def test_a_guide_that_cuts_the_path_through_z1_fails_the_same_test(problem):
    """Negative control: ``z2 = A2 stop_gradient(z1) + ...`` drops a path; the test sees it."""
    x, params = problem
    good = hg.guide()

    def sample(phi, rng, xi):
        z1, _ = good.sample(phi, rng, xi)
        k2 = jax.random.split(rng)[1]
        m2 = phi["A2"] @ jax.lax.stop_gradient(z1) + phi["b2"]
        return z1, m2 + jnp.exp(phi["log_scale2"]) * jax.random.normal(k2, m2.shape, m2.dtype)

    reps = replicates("elbo", "reparam", 2, params, x, guide=je.Guide(sample, good.log_prob))
    assert np.max(np.abs(z_scores(reps, exact_gradient(params, x)))) > 10 * Z_MAX


def paired(estimator_a, estimator_b, params, x, num_samples=8):
    """``je.paired_bias_test`` of two IWAE estimators on the same noise, compiled."""
    a, b = (je.iwae(hg.model(), hg.guide(), num_samples=num_samples, estimator=e) for e in (estimator_a, estimator_b))
    run = jax.jit(lambda p, xb, rng: je.paired_bias_test(a, b, p, rng, xb, num_replicates=R))
    return run(params, x, jax.random.key(11))


@pytest.mark.slow
def test_dreg_and_reparam_agree_paired_on_the_same_noise(problem):
    x, params = problem
    test = paired("dreg", "reparam", params, x)
    assert float(test.max_abs_t) < Z_MAX
    assert 0.5 < float(test.rms_t) < 1.5  # t-statistics of the guide's elements look standard normal


@pytest.mark.slow
def test_stl_is_biased_for_iwae_with_k_above_one(problem):
    x, params = problem
    test = paired("stl", "dreg", params, x)
    assert float(test.max_abs_t) > 10 * Z_MAX
    # theta's gradient is the same for every pathwise estimator (t = 0: equal up to rounding)
    assert all(float(jnp.abs(t).max()) == 0.0 for t in jax.tree.leaves(test.t["model"]))


@pytest.mark.slow
def test_stl_equals_dreg_at_k_one(problem):
    x, params = problem
    grads = {e: jax.grad(lambda p, e=e: je.iwae(hg.model(), hg.guide(), num_samples=1, estimator=e)(
        p, jax.random.key(8), x)[0])(params) for e in ("stl", "dreg")}
    chex.assert_trees_all_close(grads["stl"], grads["dreg"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_path_estimators_vanish_at_the_exact_posterior():
    """At q = p(z|x) every log-weight is log p(x), so STL's and DReG's phi-gradient is 0 in every draw."""
    params = hg.optimal_params(MU)
    x = hg.sample_data(jax.random.key(9), MU, B)
    for estimator in ("stl", "dreg"):
        reps = replicates("iwae", estimator, 8, params, x, num_replicates=16)
        np.testing.assert_allclose(np.concatenate([np.ravel(a) for a in jax.tree.leaves(reps["guide"])]), 0.0,
                                   atol=1e-4, err_msg=estimator)
    reparam = replicates("iwae", "reparam", 8, params, x, num_replicates=16)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(reparam["guide"])) > 0.1
