"""Per-example k-hat from je.log_likelihood: equal to psis_khat on the same draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo.weights import sample_and_log_weights

LG = je.models.linear_gaussian
S, CHUNK = 1000, 300          # 4 chunks of samples, the last one masked
X = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
RNG = jax.random.key(5)


def params_with_scale(scale):
    params = LG.optimal_params(jnp.zeros(4))
    params["guide"]["log_scale"] = jnp.log(jnp.asarray(scale))
    params["guide"]["b"] = params["guide"]["b"] + 0.3
    return params


@pytest.fixture(scope="module")
def results():
    ll_fn = jax.jit(lambda p, khat: je.log_likelihood(LG.model(), LG.guide(), p, RNG, X, num_samples=S,
                                                      chunk_size=CHUNK, return_khat=khat), static_argnums=1)
    # the same draws, all at once: sample k of point b uses fold_in(split(rng, B)[b], k)
    keys = jax.vmap(lambda key: jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(S)))(
        jax.random.split(RNG, X.shape[0]))

    @jax.jit
    def reference(p):
        _, log_p, log_q = sample_and_log_weights(LG.model(), LG.guide(), p, keys, X)
        lw = log_p - log_q
        return je.psis_khat(lw), jax.nn.logsumexp(lw, axis=-1) - np.log(S)

    out = {}
    for scale in (0.1, 1.5):            # too narrow: heavy tails; wide: light tails
        params = params_with_scale(scale)
        ll, khat = ll_fn(params, True)
        out[scale] = (ll, khat, ll_fn(params, False), *reference(params))
    return out


@pytest.mark.parametrize("scale", [0.1, 1.5])
def test_streamed_khat_equals_psis_khat_of_the_same_draws(results, scale):
    ll, khat, plain, reference, lme = results[scale]
    np.testing.assert_array_equal(ll, plain)                  # the estimate does not change
    np.testing.assert_allclose(ll, lme, rtol=1e-5)
    np.testing.assert_allclose(khat, reference, rtol=1e-5, atol=1e-6)


def test_khat_separates_heavy_from_light_tails(results):
    assert bool(jnp.all(results[0.1][1] > 0.7)), results[0.1][1]
    assert bool(jnp.all(results[1.5][1] < 0.7)), results[1.5][1]


def test_return_khat_needs_25_samples():
    with pytest.raises(ValueError, match="num_samples >= 25"):
        je.log_likelihood(LG.model(), LG.guide(), params_with_scale(1.0), RNG, X, num_samples=20, return_khat=True)


def test_evaluate_warns_in_one_line_when_many_points_have_large_khat():
    from jaxelbo.app.evaluation import KHAT_WARNING_FRACTION, khat_warning

    line = khat_warning({"log_likelihood_khat_above_0.7": 0.34, "log_likelihood_num_samples": 5000})
    assert line is not None and "\n" not in line and "34%" in line and "AIS" in line and "K=5000" in line
    assert khat_warning({"log_likelihood_khat_above_0.7": KHAT_WARNING_FRACTION}) is None
    assert "IWAE bound" in khat_warning({"khat_above_0.7": 0.5})          # no log p(x) estimate: the 64 weights
    assert khat_warning({"khat_above_0.7": 0.5, "log_likelihood_khat_above_0.7": 0.0}) is None


def test_evaluate_streams_the_same_khat(results):
    from jaxelbo.app.evaluation import log_likelihood_and_cubo

    params = params_with_scale(0.1)
    ll, _, khat = jax.jit(lambda p: log_likelihood_and_cubo(LG.model(), LG.guide(), p, RNG, X, num_samples=S,
                                                            chunk_size=CHUNK, return_khat=True))(params)
    np.testing.assert_allclose(ll, results[0.1][0], rtol=1e-6)
    np.testing.assert_allclose(khat, results[0.1][1], rtol=1e-6)
