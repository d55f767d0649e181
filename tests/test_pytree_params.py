"""Every public function that takes ``params`` accepts any JAX pytree of parameters.

The linear-Gaussian toy with its parameters re-laid as the pytrees real users hand in: a
tuple, a list of tuples (stax's layout, and numpyro.module's), a NamedTuple and nested
dicts. Each function runs and returns the same numbers as with the dict layout.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je

lg = je.models.linear_gaussian
D = 2
MU = jnp.array([0.3, -0.5])
X = jnp.array([[1.0, 0.5], [-0.4, 2.0], [0.2, 0.1]])


class GuideParams(NamedTuple):
    A: Any
    b: Any
    log_scale: Any


LAYOUTS = {  # dict layout -> another pytree, and back
    "tuple": (lambda g: (g["A"], g["b"], g["log_scale"]), lambda t: dict(zip(("A", "b", "log_scale"), t, strict=True))),
    "stax-list": (lambda g: [(g["A"], g["b"]), (), (g["log_scale"],)],
                  lambda t: {"A": t[0][0], "b": t[0][1], "log_scale": t[2][0]}),
    "namedtuple": (lambda g: GuideParams(**g), lambda t: t._asdict()),
    "nested": (lambda g: {"net": {"A": g["A"], "b": g["b"]}, "s": [g["log_scale"]]},
               lambda t: {"A": t["net"]["A"], "b": t["net"]["b"], "log_scale": t["s"][0]}),
}


def relaid(layout):
    to, back = LAYOUTS[layout]
    base = lg.guide()
    guide = je.Guide(sample=lambda phi, rng, x: base.sample(back(phi), rng, x),
                     log_prob=lambda phi, x, z: base.log_prob(back(phi), x, z))
    opt = lg.optimal_params(MU)
    dict_params = {"model": {"mu": MU + 0.2}, "guide": {**opt["guide"], "b": opt["guide"]["b"] + 0.4}}
    return guide, {"model": (dict_params["model"]["mu"],), "guide": to(dict_params["guide"])}, dict_params


def model_of_tuple():
    base = lg.model()
    return je.Model(log_prior=lambda t, z: base.log_prior({"mu": t[0]}, z),
                    log_likelihood=lambda t, x, z: base.log_likelihood({"mu": t[0]}, x, z))


pytestmark = pytest.mark.slow  # each layout compiles its own losses (tens of seconds under load)


@pytest.fixture(scope="module", params=["stax-list", "namedtuple"])
def problem(request):
    guide, params, dict_params = relaid(request.param)
    return request.param, model_of_tuple(), guide, params, dict_params


def test_losses_and_gradient_diagnostics_take_any_pytree(problem):
    _, model, guide, params, dict_params = problem
    loss_fn = je.iwae(model, guide, num_samples=4, estimator="dreg")
    ref_fn = je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="dreg")
    rng = jax.random.key(0)
    np.testing.assert_allclose(loss_fn(params, rng, X)[0], ref_fn(dict_params, rng, X)[0], rtol=1e-6)
    reps = je.gradient_replicates(loss_fn, params, rng, X, num_replicates=3)
    assert jax.tree.structure(reps) == jax.tree.structure(params)
    snr = je.gradient_snr(loss_fn, params, rng, X, num_replicates=3)
    assert jax.tree.structure(snr) == jax.tree.structure(params)


def test_paired_bias_test_takes_any_pytree(problem):
    """Tuples inside params are structure, not leaves: the same t as the dict layout, leaf by leaf."""
    _, model, guide, params, dict_params = problem
    a = je.iwae(model, guide, num_samples=4, estimator="reparam")
    b = je.iwae(model, guide, num_samples=4, estimator="dreg")
    test = je.paired_bias_test(a, b, params, jax.random.key(1), X, num_replicates=8)
    assert jax.tree.structure(test.t) == jax.tree.structure(params)
    assert jax.tree.structure(test.mean_difference) == jax.tree.structure(params)
    ref = je.paired_bias_test(je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="reparam"),
                              je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="dreg"),
                              dict_params, jax.random.key(1), X, num_replicates=8)
    np.testing.assert_allclose(test.rms_t, ref.rms_t, rtol=1e-4)
    np.testing.assert_allclose(test.max_abs_t, ref.max_abs_t, rtol=1e-4)
    assert np.isfinite(test.max_abs_t) and float(test.max_abs_t) > 0


def test_evaluation_diagnostics_take_any_pytree(problem):
    _, model, guide, params, dict_params = problem
    rng = jax.random.key(2)
    ll = je.log_likelihood(model, guide, params, rng, X, num_samples=64, chunk_size=16)
    ref = je.log_likelihood(lg.model(), lg.guide(), dict_params, rng, X, num_samples=64, chunk_size=16)
    np.testing.assert_allclose(ll, ref, rtol=1e-6)
    draws = je.importance_resample(model, guide, params, rng, X[0], num_samples=8, num_draws=5)
    assert draws.shape == (5, D)
    surgery = je.elbo_surgery(model, guide, params, rng, X)
    assert np.isfinite(surgery.elbo)
