"""Diagnostics: gradient replicates and SNR, log-likelihood, q_IW resampling, ELBO surgery."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo.models import linear_gaussian as lg
from jaxelbo.weights import sample_and_log_weights

pytestmark = pytest.mark.usefixtures("strict_numerics")

D = 3
MU = jnp.array([0.3, -0.5, 1.0])
MODEL, GUIDE = lg.model(), lg.guide()
X = lg.sample_data(jax.random.key(7), MU, 5)


def bad_guide_params():
    p = lg.optimal_params(MU)
    p["guide"]["b"] = p["guide"]["b"] + 0.8
    p["guide"]["log_scale"] = jnp.asarray(np.log(1.0), jnp.float32)
    return p


def test_gradient_replicates_chunked_equals_vmapped():
    loss_fn = je.iwae(MODEL, GUIDE, num_samples=4, estimator="dreg")
    params = bad_guide_params()
    full = jax.jit(lambda p: je.gradient_replicates(loss_fn, p, jax.random.key(0), X, num_replicates=12))(params)
    chunked = jax.jit(lambda p: je.gradient_replicates(loss_fn, p, jax.random.key(0), X, num_replicates=12,
                                                          chunk_size=5))(params)
    chex.assert_trees_all_close(full, chunked, rtol=1e-5, atol=1e-6)
    chex.assert_tree_shape_prefix(full, (12,))
    # replicates differ from each other (independent noise)
    assert float(jnp.std(full["guide"]["b"], axis=0).min()) > 0


def test_gradient_snr_is_abs_mean_over_std():
    loss_fn = je.iwae(MODEL, GUIDE, num_samples=4, estimator="reparam")
    params = bad_guide_params()
    reps = jax.jit(lambda p: je.gradient_replicates(loss_fn, p, jax.random.key(0), X, num_replicates=50))(params)
    snr = jax.jit(lambda p: je.gradient_snr(loss_fn, p, jax.random.key(0), X, num_replicates=50))(params)
    want = jax.tree_util.tree_map(lambda g: jnp.abs(g.mean(0)) / g.std(0, ddof=1), reps)
    chex.assert_trees_all_close(snr, want, rtol=1e-5)
    chex.assert_trees_all_equal_shapes(snr, params)


def test_log_likelihood_is_within_a_tenth_of_a_nat(maybe_jit):
    params = bad_guide_params()
    exact = lg.log_marginal(params["model"], X)
    ll = maybe_jit(lambda p: je.log_likelihood(MODEL, GUIDE, p, jax.random.key(1), X, num_samples=5000,
                                               chunk_size=500))(params)
    chex.assert_shape(ll, (5,))
    assert np.max(np.abs(ll - exact)) < 0.1, ll - exact
    # a chunk size that does not divide K (last chunk masked) is just as good
    ll2 = je.log_likelihood(MODEL, GUIDE, params, jax.random.key(2), X, num_samples=5000, chunk_size=700)
    assert np.max(np.abs(ll2 - exact)) < 0.1
    # and it is a bound: the ELBO is well below
    elbo = lg.exact_elbo(params, X)
    assert np.all(elbo < ll - 0.1)


def test_log_likelihood_equals_iwae_in_one_chunk():
    params = bad_guide_params()
    ll = je.log_likelihood(MODEL, GUIDE, params, jax.random.key(3), X, num_samples=64, chunk_size=None)
    # sample k of point b is drawn with fold_in(split(rng, B)[b], k)
    point_keys = jax.random.split(jax.random.key(3), len(X))
    keys = jax.vmap(lambda key: jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(64)))(point_keys)
    _, log_p, log_q = sample_and_log_weights(MODEL, GUIDE, params, keys, X)
    np.testing.assert_allclose(ll, jax.nn.logsumexp(log_p - log_q, -1) - np.log(64), rtol=1e-6)


def test_importance_resampling_approaches_the_posterior():
    params = bad_guide_params()
    x = X[0]
    post_mean, post_var = lg.posterior(params["model"], x)
    guide_mean = params["guide"]["A"] @ x + params["guide"]["b"]
    for k, tol_mean, target in [(1, 0.06, guide_mean), (200, 0.06, post_mean)]:
        z = jax.jit(lambda p, k=k: je.importance_resample(MODEL, GUIDE, p, jax.random.key(k), x, num_samples=k,
                                                          num_draws=4000))(params)
        chex.assert_shape(z, (4000, D))
        assert np.max(np.abs(z.mean(0) - target)) < tol_mean, (k, z.mean(0), target)
    # K = 200 also recovers the posterior variance 1/2 (the guide's is 1)
    np.testing.assert_allclose(z.var(0), post_var, atol=0.07)


def test_elbo_surgery_terms_and_identities():
    params = bad_guide_params()
    x = lg.sample_data(jax.random.key(11), MU, 300)
    s = jax.jit(lambda p: je.elbo_surgery(MODEL, GUIDE, p, jax.random.key(5), x, num_samples=8,
                                          chunk_size=64))(params)
    np.testing.assert_allclose(s.elbo, s.reconstruction - s.index_code_mi - s.marginal_kl, rtol=1e-5)
    np.testing.assert_allclose(s.avg_kl, s.index_code_mi + s.marginal_kl, rtol=1e-5)
    assert 0.0 <= float(s.index_code_mi) <= np.log(300)
    assert float(s.marginal_kl) >= 0.0
    # Monte Carlo values agree with the closed forms of the toy
    np.testing.assert_allclose(s.avg_kl, jnp.mean(lg.exact_kl(params, x)), atol=0.08)
    np.testing.assert_allclose(s.elbo, jnp.mean(lg.exact_elbo(params, x)), atol=0.15)


def test_elbo_surgery_mutual_information_extremes():
    params = bad_guide_params()
    same = jnp.tile(X[:1], (50, 1))  # one input: the code carries no information about n
    s = je.elbo_surgery(MODEL, GUIDE, params, jax.random.key(0), same, chunk_size=16)
    assert abs(float(s.index_code_mi)) < 1e-5
    apart = {**params, "guide": {**params["guide"], "A": 10.0 * jnp.eye(D),
                                 "log_scale": jnp.asarray(np.log(0.01), jnp.float32)}}
    spread = jnp.arange(50.0)[:, None] * jnp.ones((1, D))  # guides 10 units apart, scale 0.01
    s = je.elbo_surgery(MODEL, GUIDE, apart, jax.random.key(0), spread, chunk_size=16)
    np.testing.assert_allclose(s.index_code_mi, np.log(50), atol=1e-3)


def test_replicates_compile_once_per_loss_and_equal_the_engine():
    """gradient_replicates runs as one compiled program that JAX caches on the loss function: a
    second call with the same loss does not trace it again (a new loss does), and the result is
    the engine's (jaxelbo.snr.replicate_gradients) on the same keys. An unhashable callable
    loss is compiled for its call and gives the same numbers."""
    params = lg.optimal_params(jnp.zeros(2))
    params["guide"]["b"] = params["guide"]["b"] + 0.3
    x = jnp.ones((3, 2))
    inner = je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="dreg")
    traces = []

    def loss_fn(p, rng, xx):
        traces.append(1)
        return inner(p, rng, xx)

    first = je.gradient_replicates(loss_fn, params, jax.random.key(0), x, num_replicates=6)
    n = len(traces)
    again = je.gradient_replicates(loss_fn, params, jax.random.key(1), x, num_replicates=6)
    assert len(traces) == n > 0                      # cached: not traced again
    je.gradient_replicates(lambda p, r, xx: loss_fn(p, r, xx), params, jax.random.key(1), x, num_replicates=6)
    assert len(traces) > n                           # the control: another loss is traced
    keys = jax.random.split(jax.random.key(0), 6)
    engine = jax.jit(lambda p, k: je.snr.replicate_gradients({"loss": inner}, p, k, x))(params, keys)["loss"]
    chex.assert_trees_all_close(first, engine, rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(again["guide"]["b"]), np.asarray(first["guide"]["b"]))

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, p, rng, xx):
            return inner(p, rng, xx)

    chex.assert_trees_all_close(je.gradient_replicates(Unhashable(), params, jax.random.key(0), x, num_replicates=6),
                                engine, rtol=1e-6, atol=1e-7)
