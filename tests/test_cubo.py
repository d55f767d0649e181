"""CUBO on the linear-Gaussian toy: the closed-form Renyi divergence, n = 1, the exact
posterior, DReG against reparam, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo.models import linear_gaussian as lg

D, B = 3, 2
MU = jnp.array([0.3, -0.5, 1.0])
X = lg.sample_data(jax.random.key(7), MU, B)
MODEL, GUIDE = lg.model(), lg.guide()


def near_posterior():
    params = lg.optimal_params(MU)
    g = dict(params["guide"])
    g["b"] = g["b"] + jnp.array([0.2, -0.1, 0.15])
    g["log_scale"] = g["log_scale"] + 0.1      # a wider guide: every moment of w~ exists
    return {"model": params["model"], "guide": g}


PARAMS = near_posterior()


@pytest.fixture(scope="module")
def estimate():
    """The CUBO_2 estimate at K = 2^16 and the mean of 4000 replicates at K = 2."""
    big = je.cubo(MODEL, GUIDE, num_samples=2 ** 16, n=2.0)
    small = je.cubo(MODEL, GUIDE, num_samples=2, n=2.0)
    at_big = jax.jit(lambda r: big(PARAMS, r, X)[1]["bound"])(jax.random.key(0))
    at_small = jax.jit(jax.vmap(lambda r: small(PARAMS, r, X)[1]["bound"]))(jax.random.split(jax.random.key(1), 4000))
    return np.asarray(at_big), np.asarray(at_small)


def test_closed_form_is_log_px_plus_a_renyi_divergence():
    log_px = np.asarray(lg.log_marginal(PARAMS["model"], X))
    np.testing.assert_allclose(lg.exact_cubo(PARAMS, X, 1.0), log_px, rtol=1e-6)
    values = [np.asarray(lg.exact_cubo(PARAMS, X, n)) for n in (1.0, 1.5, 2.0, 3.0)]
    for a, b in zip(values, values[1:], strict=False):
        assert np.all(b > a)                   # D_n and (n-1)/n both grow with n
    # at the exact posterior D_n = 0 for every n
    opt = lg.optimal_params(MU)
    np.testing.assert_allclose(lg.exact_cubo(opt, X, 2.0), lg.log_marginal(opt["model"], X), rtol=1e-6)


def test_estimate_converges_to_the_closed_form_and_is_biased_low(estimate):
    at_big, at_small = estimate
    exact = np.asarray(lg.exact_cubo(PARAMS, X, 2.0))
    log_px = np.asarray(lg.log_marginal(PARAMS["model"], X))
    assert np.all(exact - log_px > 0.02)       # the bracket is not trivially tight
    np.testing.assert_allclose(at_big, exact, atol=5e-3)
    # Jensen: E[CUBO^_2] at K = 2 lies below CUBO_2, by many standard errors
    mean, se = at_small.mean(0), at_small.std(0) / np.sqrt(at_small.shape[0])
    assert np.all(exact - mean > 5 * se), (exact, mean, se)


def test_n_equal_one_is_the_iwae_estimate_of_log_px():
    rng = jax.random.key(3)
    cubo1 = je.cubo(MODEL, GUIDE, num_samples=8, n=1.0)(PARAMS, rng, X)[1]["bound"]
    iwae = je.iwae(MODEL, GUIDE, num_samples=8)(PARAMS, rng, X)[1]["bound"]
    np.testing.assert_allclose(cubo1, iwae, rtol=1e-6)


def test_zero_variance_at_the_exact_posterior():
    opt = lg.optimal_params(MU)
    log_px = lg.log_marginal(opt["model"], X)
    grads = {}
    for estimator in ("reparam", "dreg"):
        loss_fn = je.cubo(MODEL, GUIDE, num_samples=4, n=2.0, estimator=estimator)
        (loss, aux), g = jax.value_and_grad(lambda p, f=loss_fn: f(p, jax.random.key(5), X), has_aux=True)(opt)
        np.testing.assert_allclose(aux["bound"], log_px, rtol=1e-6)   # every weight is p(x)
        np.testing.assert_allclose(loss, jnp.mean(log_px), rtol=1e-6)  # +mean bound: minimised
        grads[estimator] = g["guide"]
    for leaf in jax.tree_util.tree_leaves(grads["dreg"]):
        np.testing.assert_allclose(leaf, 0.0, atol=1e-5)
    # negative control: reparam keeps the zero-mean score term, so it is not zero here
    assert max(float(jnp.max(jnp.abs(v))) for v in jax.tree_util.tree_leaves(grads["reparam"])) > 1e-2


@pytest.mark.slow
def test_dreg_has_the_expectation_of_reparam_and_the_test_can_fail():
    reparam = je.cubo(MODEL, GUIDE, num_samples=4, n=2.0, estimator="reparam")
    dreg = je.cubo(MODEL, GUIDE, num_samples=4, n=2.0, estimator="dreg")
    same = je.paired_bias_test(reparam, dreg, PARAMS, jax.random.key(2), X, num_replicates=3000)
    assert same.max_abs_t < 4.5, same.max_abs_t
    # negative control: CUBO_3's gradient is a different one
    other = je.cubo(MODEL, GUIDE, num_samples=4, n=3.0, estimator="dreg")
    differ = je.paired_bias_test(reparam, other, PARAMS, jax.random.key(2), X, num_replicates=3000)
    assert differ.max_abs_t > 8.0, differ.max_abs_t


def test_gradient_is_consistent_for_the_closed_form():
    """At K = 2^15, the phi-gradient of the estimate is that of the closed-form CUBO_2."""
    loss_fn = je.cubo(MODEL, GUIDE, num_samples=2 ** 15, n=2.0, estimator="dreg")
    g = jax.jit(jax.grad(lambda p: loss_fn(p, jax.random.key(4), X)[0]))(PARAMS)["guide"]
    exact = jax.grad(lambda p: jnp.mean(lg.exact_cubo(p, X, 2.0)))(PARAMS)["guide"]
    for name in ("b", "log_scale"):
        np.testing.assert_allclose(g[name], exact[name], atol=0.03 * float(jnp.max(jnp.abs(exact[name]))) + 1e-3)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="n must be >= 1"):
        je.cubo(MODEL, GUIDE, num_samples=4, n=0.5)
    with pytest.raises(ValueError, match="valid choices for cubo: reparam, dreg"):
        je.cubo(MODEL, GUIDE, num_samples=4, estimator="score")
    with pytest.raises(TypeError, match="num_samples"):
        je.cubo(MODEL, GUIDE, num_samples=2.0)
