"""One engine for gradient statistics: replicates, moments, SNR, paired t, the replicate mesh.

``je.gradient_replicates``, ``je.gradient_snr`` and ``je.paired_bias_test`` are views over
:mod:`jaxelbo.snr`'s engine, as is the streaming :func:`jaxelbo.snr.gradient_moments`. The
values pinned here were recorded from the two separate implementations before they became
one (same key, same problem), so a refactor that changes a result fails.
"""

from typing import NamedTuple

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


@pytest.mark.slow  # four programs, ~15 s under load
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


class Pair(NamedTuple):
    w: jax.Array
    v: jax.Array


def test_paired_t_statistics_reads_tuples_as_structure_not_leaves():
    """A stax-style list of tuples and a NamedTuple give the dict layout's t, leaf by leaf."""
    rng = np.random.default_rng(0)
    b = [rng.normal(size=(30, 2)), rng.normal(size=(30, 3)), rng.normal(size=(30,))]
    a = [b[0] + rng.normal(0.4, 1.0, size=(30, 2)), b[1] + rng.normal(size=(30, 3)), b[2].copy()]
    as_dict = snr.paired_t_statistics(*({"p": jnp.asarray(u), "q": jnp.asarray(v), "r": jnp.asarray(w)}
                                        for u, v, w in (a, b)))
    as_tuples = snr.paired_t_statistics(*([(jnp.asarray(u), jnp.asarray(v)), (),
                                           (Pair(jnp.asarray(w), jnp.asarray(w)),)] for u, v, w in (a, b)))
    assert jax.tree.structure(as_tuples.t) == jax.tree.structure([(0, 0), (), (Pair(0, 0),)])
    np.testing.assert_allclose(as_tuples.t[0][0], as_dict.t["p"], rtol=1e-6)
    np.testing.assert_allclose(as_tuples.t[0][1], as_dict.t["q"], rtol=1e-6)
    np.testing.assert_array_equal(as_tuples.t[2][0].w, 0.0)  # identical replicates: t = 0
    d = a[0] - b[0]
    np.testing.assert_allclose(as_dict.t["p"], d.mean(0) / (d.std(0, ddof=1) / np.sqrt(30)), rtol=1e-4)
    np.testing.assert_allclose(as_tuples.mean_difference[0][0], d.mean(0), rtol=1e-5)
    assert float(as_tuples.max_abs_t) == pytest.approx(float(as_dict.max_abs_t), rel=1e-6)


def test_statistics_are_one_formula_on_host_and_in_the_graph():
    mean = np.array([2.0, 0.0, 1.0, -1.0, 0.5])
    var = np.array([4.0, 0.0, 0.0, 0.0, 1.0])
    host = snr.signal_to_noise(mean, var)
    assert host.dtype == np.float64 and host.tolist() == [1.0, 0.0, np.inf, np.inf, 0.5]
    traced = jax.jit(snr.signal_to_noise)(jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32))
    np.testing.assert_array_equal(np.asarray(traced), host)
    m = snr.Moments(9, mean, var * 8)
    t_host = snr.paired_t(m)
    assert t_host.tolist() == [3.0, 0.0, np.inf, -np.inf, 1.5]  # a constant nonzero difference keeps its sign
    t_graph = jax.jit(lambda mu, m2: snr.paired_t(snr.Moments(9, mu, m2)))(jnp.asarray(mean), jnp.asarray(var * 8))
    np.testing.assert_array_equal(np.asarray(t_graph), t_host)
    # in-graph moments equal numpy's, and merging two halves on the host equals the whole
    g = np.random.default_rng(1).normal(size=(12, 3))
    whole = snr.replicate_moments(jnp.asarray(g))
    np.testing.assert_allclose(whole.variance, g.var(0, ddof=1), rtol=1e-5)
    halves = snr.Moments(6, g[:6].mean(0), ((g[:6] - g[:6].mean(0)) ** 2).sum(0)).merge(
        snr.Moments(6, g[6:].mean(0), ((g[6:] - g[6:].mean(0)) ** 2).sum(0)))
    np.testing.assert_allclose(halves.m2, np.asarray(whole.m2), rtol=1e-5)


def test_gradient_snr_of_an_unused_parameter_is_zero():
    """An element whose gradient is identically zero has no signal: 0, as snr.signal_to_noise (not nan)."""
    def loss(p, rng, x):
        return jnp.sum(p["used"] * jax.random.normal(rng, (2,))) + 0.0 * jnp.sum(p["unused"]), {}

    params = {"used": jnp.ones(2), "unused": jnp.ones(3)}
    got = je.gradient_snr(loss, params, jax.random.key(0), None, num_replicates=20)
    np.testing.assert_array_equal(got["unused"], 0.0)
    assert np.all(np.asarray(got["used"]) > 0)


def test_one_mesh_builder():
    """The replicate mesh and the app's data mesh come from the same builder."""
    from jaxelbo.app import sharding

    assert snr.replicate_mesh(None) is None and snr.replicate_mesh(False) is None  # one CPU device here
    mesh = snr.device_mesh(snr.REPLICATE_AXIS)
    assert mesh.axis_names == ("replicates",) and mesh.devices.size == jax.device_count()
    assert snr.replicate_mesh(mesh) is mesh
    data = sharding.data_mesh()
    assert data.axis_names == ("data",) and data.axis_types == mesh.axis_types
    keys = jax.random.split(jax.random.key(0), 4)
    assert snr.shard_replicates(keys, mesh).shape == (4,)
