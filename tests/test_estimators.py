"""Every estimator against exact answers (linear-Gaussian toy) and against each other.

Unbiased estimators must average to the exact gradient (ELBO) or to each other (IWAE,
RWS) within a few standard errors; replicates use the same noise, so the paired tests
are sharp enough that a wrong weight (w instead of w^2, a missing score term) fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo.models import linear_gaussian as lg
from tests.stats import flat, paired_z_scores, z_scores

pytestmark = pytest.mark.usefixtures("strict_numerics")

D, B, R = 3, 2, 20_000
Z_MAX = 5.0  # |z| above this under the null: p < 1e-5 per element
MU = jnp.array([0.3, -0.5, 1.0])
X = lg.sample_data(jax.random.key(7), MU, B)


def perturbed_params(scale=None):
    p = lg.optimal_params(MU, scale=scale)
    noise = jax.random.normal(jax.random.key(3), (D, D))
    p["guide"]["A"] = p["guide"]["A"] + 0.2 * noise
    p["guide"]["b"] = p["guide"]["b"] + 0.3
    p["model"]["mu"] = p["model"]["mu"] - 0.4
    if scale is None:
        p["guide"]["log_scale"] = jnp.asarray(np.log(0.9), jnp.float32)
    return p


PARAMS = perturbed_params()
MODEL, GUIDE = lg.model(), lg.guide()


def replicates(loss_fn, params=PARAMS, x=X, num_replicates=R, seed=0):
    return jax.jit(lambda p: je.gradient_replicates(loss_fn, p, jax.random.key(seed), x,
                                                    num_replicates=num_replicates))(params)


def exact_grad(params=PARAMS, x=X):
    return jax.grad(lambda p: -jnp.mean(lg.exact_elbo(p, x)))(params)


@pytest.mark.parametrize("num_samples", [1, 4])
@pytest.mark.parametrize("estimator", ["reparam", "stl", "score"])
def test_elbo_estimators_average_to_exact_gradient(estimator, num_samples):
    reps = replicates(je.elbo(MODEL, GUIDE, num_samples=num_samples, estimator=estimator))
    z = z_scores(reps, exact_grad())
    assert np.all(np.isfinite(z)) and np.max(np.abs(z)) < Z_MAX, z


def test_elbo_z_test_detects_a_wrong_gradient():
    """The same test fails for a biased estimator: a wrong model gives a wrong mean."""
    reps = replicates(je.elbo(MODEL, GUIDE, num_samples=4, estimator="reparam"))
    wrong = jax.tree_util.tree_map(lambda g: 1.05 * g, exact_grad())
    assert np.max(np.abs(z_scores(reps, wrong))) > Z_MAX


K = 8


@pytest.fixture(scope="module")
def iwae_reps():
    return {e: replicates(je.iwae(MODEL, GUIDE, num_samples=K, estimator=e))
            for e in ["reparam", "stl", "dreg", "score", "vimco"]}


@pytest.mark.parametrize("estimator", ["reparam", "score", "vimco"])
def test_iwae_unbiased_estimators_agree_with_dreg(iwae_reps, estimator):
    z = paired_z_scores(iwae_reps[estimator], iwae_reps["dreg"])
    assert np.max(np.abs(z)) < Z_MAX, z


def test_iwae_theta_gradient_is_the_same_for_every_pathwise_estimator(iwae_reps):
    """theta gets sum_k w_k grad log p whatever phi's estimator (never w^2)."""
    for e in ["stl", "dreg", "score", "vimco"]:
        np.testing.assert_allclose(iwae_reps[e]["model"]["mu"], iwae_reps["reparam"]["model"]["mu"],
                                   rtol=1e-4, atol=1e-5)


def test_iwae_stl_is_biased(iwae_reps):
    """Tucker et al. (2019): STL is biased for IWAE with K > 1."""
    z = paired_z_scores(iwae_reps["stl"]["guide"], iwae_reps["dreg"]["guide"])
    assert np.max(np.abs(z)) > 10.0, z


def test_iwae_dreg_has_lower_phi_variance_than_reparam(iwae_reps):
    var = {e: flat(iwae_reps[e]["guide"]).var(axis=0).sum() for e in ["reparam", "stl", "dreg", "score"]}
    assert var["dreg"] < var["stl"] < var["reparam"], var


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_zero_variance_at_the_exact_posterior(estimator):
    params = lg.optimal_params(MU)
    for num_samples in [1, K]:
        reps = replicates(je.iwae(MODEL, GUIDE, num_samples=num_samples, estimator=estimator), params=params,
                          num_replicates=64)
        np.testing.assert_allclose(flat(reps["guide"]), 0.0, atol=2e-5)
    reps = replicates(je.iwae(MODEL, GUIDE, num_samples=K, estimator="reparam"), params=params,
                      num_replicates=64)
    assert np.min(np.abs(flat(reps["guide"])).max(axis=1)) > 1e-2


def test_rws_score_and_dreg_agree():
    reps = {e: replicates(je.rws(MODEL, GUIDE, num_samples=K, estimator=e)) for e in ["score", "dreg"]}
    z = paired_z_scores(reps["score"], reps["dreg"])
    assert np.max(np.abs(z)) < Z_MAX, z
    # and the wake-phi direction is not IWAE's: it must differ from IWAE-DReG
    iwae = replicates(je.iwae(MODEL, GUIDE, num_samples=K, estimator="dreg"))
    assert np.max(np.abs(paired_z_scores(reps["dreg"]["guide"], iwae["guide"]))) > 10.0


@pytest.mark.parametrize("objective,kwargs,estimators", [
    ("miwae", dict(num_outer=3, num_inner=4), ["reparam", "dreg"]),
    ("ciwae", dict(num_samples=6, beta=0.3), ["reparam", "dreg"]),
    ("renyi", dict(num_samples=6, alpha=0.5), ["reparam", "dreg"]),
    ("renyi", dict(num_samples=6, alpha=-0.5), ["reparam", "dreg"]),
    ("piwae", dict(num_outer=3, num_inner=4), ["reparam", "dreg"]),
])
def test_dreg_is_unbiased_for_every_objective(objective, kwargs, estimators):
    make = getattr(je, objective)
    reps = [replicates(make(MODEL, GUIDE, estimator=e, **kwargs)) for e in estimators]
    z = paired_z_scores(reps[0], reps[1])
    assert np.max(np.abs(z)) < Z_MAX, z
