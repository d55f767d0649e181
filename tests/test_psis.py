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


@pytest.mark.slow  # 13 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_khat_axis_vmap_and_shift_invariance():
    khat = jax.jit(je.psis_khat, static_argnames="axis")   # eager: test_khat_matches_arviz
    lw = jax.random.normal(jax.random.key(0), (3, 4, 100))
    k = khat(lw)
    assert k.shape == (3, 4)
    np.testing.assert_allclose(khat(jnp.moveaxis(lw, -1, 0), axis=0), k, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.vmap(je.psis_khat))(lw), k, rtol=1e-6)
    np.testing.assert_allclose(khat(lw + 1000.0), k, atol=2e-3)  # log-weights are relative


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


@pytest.mark.slow  # 12 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_every_objective_reports_khat_in_aux():
    from jaxelbo.models import linear_gaussian as lg

    params = lg.optimal_params(jnp.zeros(3))
    params["guide"]["b"] = params["guide"]["b"] + 1.5      # a poor guide: heavy-tailed weights
    x = jnp.ones((2, 3))
    loss_fn = jax.jit(je.miwae(lg.model(), lg.guide(), num_outer=4, num_inner=16, estimator="dreg"))
    aux = loss_fn(params, jax.random.key(0), x)[1]
    np.testing.assert_allclose(aux["khat"], jax.jit(je.psis_khat)(aux["log_weights"].reshape(2, -1)), rtol=1e-6)
    assert np.all(np.asarray(aux["khat"]) > 0.7)
    small = jax.jit(je.iwae(lg.model(), lg.guide(), num_samples=8))(params, jax.random.key(0), x)[1]
    assert "khat" not in small  # fewer than 25 samples: no tail to fit


def mp_khat(row: np.ndarray) -> float:
    """The direct Zhang-Stephens fit (ArviZ's formula) in 40-digit mpmath, whose exponent range
    holds weights e^{10^4} apart: the reference where float64 underflows."""
    import math

    mp = pytest.importorskip("mpmath")
    with mp.workdps(40):
        s, n = len(row), psis.psis_tail_size(len(row))
        m = 30 + math.isqrt(n)
        w = sorted(mp.exp(mp.mpf(float(v))) for v in row)
        x = [wi - w[s - n - 1] for wi in w[s - n:]]
        b = [1 / x[-1] + (1 - mp.sqrt(mp.mpf(m) / (j - mp.mpf(0.5)))) / (3 * x[math.floor(n / 4 + 0.5) - 1])
             for j in range(1, m + 1)]
        k = [mp.fsum(mp.log1p(-bj * xi) for xi in x) / n for bj in b]
        profile = [n * (mp.log(-bj / kj) - kj - 1) for bj, kj in zip(b, k, strict=True)]
        p = [mp.exp(lj - max(profile)) for lj in profile]
        b_post = mp.fsum(pj * bj for pj, bj in zip(p, b, strict=True)) / mp.fsum(p)
        khat = mp.fsum(mp.log1p(-b_post * xi) for xi in x) / n
        return float((n * khat + 5) / (n + 10))


@pytest.mark.parametrize("sigma", [1.0, 30.0, 100.0, 1000.0, 1e4])
def test_khat_stable_when_top_weights_underflow(sigma):
    """Gaussian log-weights of scale sigma at S = 64 (issue 23 row 9): the old exp-then-subtract fit
    returned nan once exp(tail - max) underflowed (86% of rows at sigma 100, all at 1000), and
    nan counted as "not above 0.7". The log-space fit is finite and matches the 40-digit fit."""
    lw = (sigma * np.random.default_rng(3).normal(size=(4, 64))).astype(np.float32)
    ours = np.asarray(jax.jit(je.psis_khat)(jnp.asarray(lw)))
    np.testing.assert_allclose(ours, [mp_khat(row) for row in lw], rtol=1e-5)
    if sigma >= 30:
        assert np.all(ours > psis.KHAT_THRESHOLD)


def test_khat_flags_heavy_tails_at_every_scale():
    """The flagged fraction of 200 rows of 64 Gaussian log-weights stays 100% as sigma grows
    (it fell 100% -> 14% -> 0% at sigma 30, 100, 1000); weights 1e4 apart are flagged, not nan."""
    z = jax.random.normal(jax.random.key(0), (200, 64))
    k = np.asarray(jax.jit(je.psis_khat)(jnp.array([30.0, 100.0, 1000.0])[:, None, None] * z[None]))
    assert np.isfinite(k).all()
    np.testing.assert_array_equal(np.mean(k > psis.KHAT_THRESHOLD, axis=1), [1.0, 1.0, 1.0])
    outlier = jax.random.normal(jax.random.key(1), (64,)).at[7].add(1e4)      # one weight e^{1e4} above
    apart = jnp.stack([jnp.arange(64.0) * 1e4, outlier, -jnp.arange(64.0) * 1e4])
    k = np.asarray(jax.jit(je.psis_khat)(apart))
    assert np.isfinite(k).all() and np.all(k > psis.KHAT_THRESHOLD), k


def test_khat_degenerate_tails():
    """Flat tail: nan (nothing to fit). Zero exceedances below the tail's quartile with larger ones
    above (ties at the threshold, or all but a few weights zero): +inf, the fit's limit as they
    shrink to 0, so such rows are flagged. Zero weights below the threshold change nothing."""
    khat = jax.jit(je.psis_khat)   # eager is covered by test_khat_matches_arviz
    ties = jnp.zeros(64).at[-3:].set(jnp.array([1.0, 2.0, 3.0]))
    few = jnp.full(64, -jnp.inf).at[:4].set(jnp.array([0.0, 1.0, 2.0, 3.0]))
    k = np.asarray(khat(jnp.stack([ties, few])))
    assert np.isposinf(k).all(), k
    lw = jax.random.normal(jax.random.key(1), (64,))
    zeroed = lw.at[jnp.argsort(lw)[:20]].set(-jnp.inf)   # the 20 smallest weights set to zero
    np.testing.assert_allclose(khat(zeroed), khat(lw), rtol=1e-6)
