"""One engine for gradient statistics: replicates, moments, SNR, paired t, the replicate mesh.

``je.gradient_replicates``, ``je.gradient_snr`` and ``je.paired_bias_test`` are views over
:mod:`jaxelbo.snr`'s engine, as is the streaming :func:`jaxelbo.snr.gradient_moments`. The
values pinned here were recorded from the two separate implementations before they became
one (same key, same problem), so a refactor that changes a result fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxelbo as je
from jaxelbo import snr

lg = je.models.linear_gaussian
PARAMS = lg.optimal_params(jnp.array([0.3, -0.2]))
PARAMS["guide"]["b"] = PARAMS["guide"]["b"] + 0.4
PARAMS["model"]["mu"] = PARAMS["model"]["mu"] - 0.3
X = jnp.array([[1.0, 0.5], [-0.4, 2.0]])
RNG = jax.random.key(11)

# ravel_pytree order: guide/A (4), guide/b (2), guide/log_scale (1), model/mu (2)
PINNED_REPLICATES = np.array([
    [-0.43698812, 0.52384436, 0.07243505, 0.9400743, 0.035409093, 0.6476167, -0.9492026, -0.16770455, -1.1988083],
    [-0.6855248, 1.9241713, 0.5050527, -0.3562498, 0.7570694, 0.117649615, -0.7466069, -0.5285347, -0.9338249],
    [-0.20361692, 3.041232, 0.3278968, 1.7112718, 1.7965, 1.3125571, 0.013733417, -1.04825, -1.5312786]])
PINNED_SNR = np.array([0.43071836, 0.6980812, 0.13005412, 0.7329354, 0.46678063, 0.6506334, 0.07299082, 0.7975845,
                       3.110108])
PINNED_SNR_DDOF0 = np.array([0.4604573, 0.7462802, 0.13903369, 0.78354096, 0.49900952, 0.69555634, 0.07803046,
                             0.8526537, 3.3248453])
PINNED_T = np.array([-2.8207476, -0.9322619, -1.8409873, -1.421096, -2.1104772, -2.5323534, 1.7108593, 0.0, 0.0])
PINNED_MEAN_DIFFERENCE = np.array([-5.8087432e-01, -4.4099683e-01, -4.1240239e-01, -5.5922234e-01, -6.7668504e-01,
                                   -6.3705224e-01, 6.5922129e-01, 0.0, 0.0])


@pytest.fixture(scope="module")
def losses():
    return (je.iwae(lg.model(), lg.guide(), num_samples=3, estimator="reparam"),
            je.iwae(lg.model(), lg.guide(), num_samples=3, estimator="stl"))


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def test_views_give_the_pinned_results(losses):
    a, b = losses
    reps = je.gradient_replicates(a, PARAMS, RNG, X, num_replicates=3)
    got = np.concatenate([np.asarray(leaf).reshape(3, -1) for leaf in jax.tree.leaves(reps)], axis=1)
    np.testing.assert_allclose(got, PINNED_REPLICATES, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(flat(je.gradient_snr(a, PARAMS, RNG, X, num_replicates=8)), PINNED_SNR, rtol=1e-5)
    np.testing.assert_allclose(flat(je.gradient_snr(a, PARAMS, RNG, X, num_replicates=8, ddof=0)), PINNED_SNR_DDOF0,
                               rtol=1e-5)
    test = je.paired_bias_test(a, b, PARAMS, RNG, X, num_replicates=8)
    np.testing.assert_allclose(flat(test.t), PINNED_T, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(flat(test.mean_difference), PINNED_MEAN_DIFFERENCE, rtol=1e-5, atol=1e-6)
    assert float(test.rms_t) == pytest.approx(1.7647298574447632, rel=1e-5)
    assert float(test.max_abs_t) == pytest.approx(2.8207476139068604, rel=1e-5)
    assert int(test.num_large) == 0


def test_streaming_moments_give_the_pinned_results(losses):
    a, b = losses
    m = snr.gradient_moments({"a": a, "b": b}, PARAMS, RNG, X, num_replicates=8, pairs=[("a", "b")])
    np.testing.assert_allclose(snr.signal_to_noise(m["a"].mean, m["a"].variance), PINNED_SNR, rtol=1e-5)
    np.testing.assert_allclose(snr.paired_t(m["a-b"]), PINNED_T, rtol=1e-5, atol=1e-5)
