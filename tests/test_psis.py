"""PSIS k-hat against ArviZ's implementation (arviz-stats), on light- and heavy-tailed weights."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo import psis

pytestmark = pytest.mark.usefixtures("strict_numerics")


def arviz_khat(log_weights: np.ndarray) -> np.ndarray:
    """k-hat of each row from arviz-stats' PSIS (which takes minus the log-weights)."""
    array_stats = pytest.importorskip("arviz_stats.base").array_stats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(array_stats.psislw(-np.asarray(log_weights, np.float64))[1])


def log_weight_sets():
    """Rows of log-weights whose tails range from light (Gaussian) to very heavy (k ~ 1.25)."""
    rng = np.random.default_rng(0)
    return {
        "gaussian, S=64": rng.normal(size=(6, 64)),
        "wide gaussian, S=64": 4.0 * rng.normal(size=(6, 64)),
        "student-t, S=300": np.log(np.abs(rng.standard_t(1.5, size=(6, 300)))),
        "pareto k=1.25, S=1000": np.log1p(rng.pareto(0.8, size=(6, 1000))),
        "pareto k=0.4, S=5000": np.log1p(rng.pareto(2.5, size=(4, 5000))) - 300.0,
    }


@pytest.mark.parametrize("name", list(log_weight_sets()))
def test_khat_matches_arviz(name, maybe_jit):
    lw = log_weight_sets()[name]
    ours = np.asarray(maybe_jit(je.psis_khat)(jnp.asarray(lw, jnp.float32)))
    np.testing.assert_allclose(ours, arviz_khat(lw), atol=2e-4)


def test_khat_separates_light_from_heavy_tails():
    sets = log_weight_sets()
    assert np.all(np.asarray(je.psis_khat(jnp.asarray(sets["pareto k=1.25, S=1000"], jnp.float32))) > 0.7)
    assert np.all(np.asarray(je.psis_khat(jnp.asarray(sets["pareto k=0.4, S=5000"], jnp.float32))) < 0.7)


def test_khat_axis_vmap_and_shift_invariance():
    lw = jax.random.normal(jax.random.key(0), (3, 4, 100))
    k = je.psis_khat(lw)
    assert k.shape == (3, 4)
    np.testing.assert_allclose(je.psis_khat(jnp.moveaxis(lw, -1, 0), axis=0), k, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(je.psis_khat)(lw), k, rtol=1e-6)
    np.testing.assert_allclose(je.psis_khat(lw + 1000.0), k, atol=2e-3)  # log-weights are relative


def test_tail_size_rule():
    """M = floor(min(S/5, 3 sqrt(S))): S/5 up to S = 225, then 3 sqrt(S)."""
    assert [psis.psis_tail_size(s) for s in (25, 64, 225, 226, 5000)] == [5, 12, 45, 45, 212]


def test_khat_input_errors():
    with pytest.raises(ValueError, match="at least 25 samples"):
        je.psis_khat(jnp.zeros((2, 24)))
    with pytest.raises(TypeError, match="floating-point"):
        je.psis_khat(jnp.zeros((2, 64), jnp.int32))
    flat = je.psis_khat(jnp.zeros((1, 64)))        # equal weights: no tail to fit
    assert np.isnan(np.asarray(flat)).all()


def test_every_objective_reports_khat_in_aux():
    from jaxelbo.models import linear_gaussian as lg

    params = lg.optimal_params(jnp.zeros(3))
    params["guide"]["b"] = params["guide"]["b"] + 1.5      # a poor guide: heavy-tailed weights
    x = jnp.ones((2, 3))
    loss_fn = jax.jit(je.miwae(lg.model(), lg.guide(), num_outer=4, num_inner=16, estimator="dreg"))
    aux = loss_fn(params, jax.random.key(0), x)[1]
    np.testing.assert_allclose(aux["khat"], je.psis_khat(aux["log_weights"].reshape(2, -1)), rtol=1e-6)
    assert np.all(np.asarray(aux["khat"]) > 0.7)
    small = je.iwae(lg.model(), lg.guide(), num_samples=8)(params, jax.random.key(0), x)[1]
    assert "khat" not in small  # fewer than 25 samples: no tail to fit
