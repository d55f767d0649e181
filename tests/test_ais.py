"""Exact tests of AIS, reverse AIS, BDMC and the amortisation gap on toys with known log p(x).

Linear-Gaussian toy (D = 2): ``p(x) = N(mu, 2I)``; a deliberately poor guide (mean shifted
by 0.7, scale 1 instead of sqrt(1/2)) so that importance sampling from it is visibly loose.
Each compiled function is built once per module.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo.models import hierarchical_gaussian as hg
from jaxelbo.models import linear_gaussian as lg

pytest.importorskip("blackjax")

MU = jnp.array([0.5, -0.5])
NUM_POINTS = 4


def _poor_params():
    params = lg.optimal_params(MU)
    params["guide"]["b"] = params["guide"]["b"] + 0.7
    params["guide"]["log_scale"] = jnp.asarray(0.0)
    return params


def random_walk(rng, position, logdensity_fn, step_size):
    """A wrong transition: a random walk with no Metropolis correction, which does not leave
    ``gamma_beta`` invariant (the negative control)."""
    del logdensity_fn, step_size
    return position + jax.random.normal(rng, position.shape, position.dtype), jnp.ones(())


@pytest.fixture(scope="module")
def toy():
    params = _poor_params()
    x = lg.sample_data(jax.random.key(1), MU, NUM_POINTS)
    return params, x, lg.log_marginal(params["model"], x)


def _ais(params, x, num_steps, num_chains, **kw):
    return jax.jit(lambda r: je.ais_log_likelihood(lg.model(), lg.guide(), params, r, x, num_steps=num_steps,
                                                   num_chains=num_chains, **kw))


def test_one_step_is_importance_sampling(toy):
    """T = 1: each chain's log Z_hat is log p(x, z) - log q(z | x) at its documented start z."""
    params, x, _ = toy
    rng = jax.random.key(3)
    out = _ais(params, x, 1, 8)(rng)
    m, g = lg.model(), lg.guide()
    rng_init = jax.random.fold_in(rng, 0)
    for b in range(NUM_POINTS):
        k = jax.random.fold_in(rng_init, b)
        zs = [g.sample(params["guide"], jax.random.fold_in(k, c), x[b]) for c in range(8)]
        lw = [je.log_joint(m, params["model"], x[b], z) - g.log_prob(params["guide"], x[b], z) for z in zs]
        np.testing.assert_allclose(out.log_weights[b], np.array(lw), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out.log_likelihood, jax.scipy.special.logsumexp(out.log_weights, -1) - math.log(8),
                               rtol=1e-6)


@pytest.fixture(scope="module")
def unbiased_runs(toy):
    """``Z_hat / p(x)`` of 4 vmapped runs x 128 chains at T = 8: HMC and the wrong kernel."""
    params, x, lp = toy
    keys = jax.random.split(jax.random.key(4), 4)
    out = {}
    for name, transition in (("hmc", None), ("wrong", random_walk)):
        fn = _ais(params, x, 8, 128, transition=transition)
        res = jax.vmap(fn)(keys)  # vmap over independent runs
        out[name] = (res, np.exp(np.asarray(res.log_weights) - np.asarray(lp)[None, :, None]))
    return out


def _z_scores(ratios):
    """Per point: (mean ratio - 1) / its standard error over all runs and chains."""
    r = ratios.transpose(1, 0, 2).reshape(NUM_POINTS, -1)
    return (r.mean(-1) - 1.0) / (r.std(-1, ddof=1) / math.sqrt(r.shape[-1]))


def _pooled_z_score(ratios):
    r = ratios.reshape(-1)
    return (r.mean() - 1.0) / (r.std(ddof=1) / math.sqrt(r.size))


def test_ais_is_unbiased_in_z(unbiased_runs):
    res, ratios = unbiased_runs["hmc"]
    z = _z_scores(ratios)
    assert np.all(np.abs(z) < 4.0), z
    assert abs(_pooled_z_score(ratios)) < 4.0
    assert res.acceptance.shape == (4, NUM_POINTS, 7)
    assert np.all(np.asarray(res.acceptance) > 0.3)


def test_wrong_transition_is_detected(unbiased_runs):
    """Negative control: a kernel that does not leave gamma_beta invariant fails the same test."""
    _, ratios = unbiased_runs["wrong"]
    assert _pooled_z_score(ratios) < -8.0, _pooled_z_score(ratios)


@pytest.fixture(scope="module")
def sandwich(toy):
    params, _, _ = toy
    out = {}
    for t, transition in ((4, None), (64, None), (8, random_walk)):
        fn = jax.jit(lambda r, t=t, tr=transition: je.bdmc(lg.model(), lg.guide(), params, r, num_points=32,
                                                           num_steps=t, num_chains=4, transition=tr))
        res = fn(jax.random.key(6))
        truth = lg.log_marginal(params["model"], res.x)
        out[(t, transition is None)] = (res, np.asarray(truth))
    return out


@pytest.mark.slow
def test_ais_converges_as_steps_grow(sandwich):
    """log p(x) - AIS shrinks with T (forward runs of the sandwich, 4 chains each)."""
    gaps = {t: float(np.mean(truth - np.asarray(res.forward))) for (t, ok), (res, truth) in sandwich.items() if ok}
    assert gaps[4] > 0.1 and gaps[64] < 0.5 * gaps[4] and abs(gaps[64]) < 0.1, gaps


def _sandwich_z(res, truth):
    """z-scores of mean(forward - truth) and mean(reverse - truth) over the simulated points."""
    def z(d):
        return d.mean() / (d.std(ddof=1) / math.sqrt(d.size) + 1e-12)
    return z(np.asarray(res.forward) - truth), z(np.asarray(res.reverse) - truth)


@pytest.mark.slow
def test_bdmc_sandwich_contains_truth_and_shrinks(sandwich):
    short, truth_s = sandwich[(4, True)]
    long, truth_l = sandwich[(64, True)]
    for res, truth in ((short, truth_s), (long, truth_l)):
        z_fwd, z_rev = _sandwich_z(res, truth)
        assert z_fwd < 3.0 and z_rev > -3.0, (z_fwd, z_rev)
        assert float(res.gap) == pytest.approx(float(np.mean(np.asarray(res.reverse) - np.asarray(res.forward))))
    assert float(short.gap) > 0.05
    assert float(long.gap) < 0.5 * float(short.gap), (float(short.gap), float(long.gap))


@pytest.mark.slow
def test_bdmc_detects_wrong_transition(sandwich):
    """Negative control: with the random walk the 'upper bound' falls below the truth and the
    sandwich inverts (reverse < forward), where the valid runs above pass."""
    res, truth = sandwich[(8, False)]
    _, z_rev = _sandwich_z(res, truth)
    assert z_rev < -4.0 and float(res.gap) < -0.2, (z_rev, float(res.gap))


@pytest.mark.slow
def test_bdmc_pytree_latents_hierarchical():
    """Two-layer toy, latent z = (z_1, z_2) (raveled for HMC): the sandwich holds log N(x; mu, 3I)."""
    params = hg.optimal_params(MU)
    params["guide"]["b1"] = params["guide"]["b1"] + 0.5
    res = jax.jit(lambda r: je.bdmc(hg.model(), hg.guide(), params, r, num_points=16, num_steps=16,
                                    num_chains=4, adaptation="online"))(jax.random.key(7))
    truth = np.asarray(hg.log_marginal(params["model"], res.x))
    z_fwd, z_rev = _sandwich_z(res, truth)
    assert z_fwd < 3.0 and z_rev > -3.0, (z_fwd, z_rev)
    assert 0.0 <= float(res.gap) < 0.3


def test_schedules():
    for name in je.ais.SCHEDULES:
        b = np.asarray(je.ais_schedule(10, name))
        assert b.shape == (11,) and b[0] == 0.0 and b[-1] == 1.0 and np.all(np.diff(b) > 0), name
    np.testing.assert_allclose(je.ais_schedule(3, "geometric", beta_min=0.01), [0.0, 0.01, 0.1, 1.0], rtol=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        je.ais_schedule(3, "cosine")


def test_bad_input_errors(toy):
    params, x, _ = toy
    with pytest.raises(ValueError, match="num_steps"):
        je.ais_log_likelihood(lg.model(), lg.guide(), params, jax.random.key(0), x, num_steps=0)
    with pytest.raises(ValueError, match="adaptation"):
        je.ais_log_likelihood(lg.model(), lg.guide(), params, jax.random.key(0), x, adaptation="always")
    with pytest.raises(ValueError, match="sample"):
        je.bdmc(je.Model(lg.model().log_prior, lg.model().log_likelihood), lg.guide(), params, jax.random.key(0),
                num_points=2)


def test_amortisation_gap_exact(toy):
    """The local Gaussian optimum is the exact posterior: approximation gap ~ 0 and
    amortisation gap = log p(x) - ELBO[q_phi], analytic."""
    params, x, lp = toy
    gaps = je.amortisation_gap(lg.model(), lg.guide(), params, jax.random.key(8), x, log_likelihood=lp,
                               num_steps=400, num_samples=32, learning_rate=0.02,
                               num_eval_samples=8000)
    exact = np.asarray(lp - lg.exact_elbo(params, x))
    # ELBO[q_phi] is a Monte Carlo mean of 8000 log-weights (std about 1.6 here): se about 0.02
    np.testing.assert_allclose(gaps.amortisation_gap, exact, atol=0.06)
    np.testing.assert_allclose(gaps.elbo, lg.exact_elbo(params, x), atol=0.06)
    assert np.all(np.abs(np.asarray(gaps.approximation_gap)) < 0.01), gaps.approximation_gap
    post_mean, post_var = lg.posterior(params["model"], x)
    np.testing.assert_allclose(gaps.local_mean, post_mean, atol=0.06)
    np.testing.assert_allclose(gaps.local_scale, math.sqrt(post_var), atol=0.03)


@pytest.mark.slow  # a report, not a claim: it builds the slow tests' sandwich fixture
def test_report_margins(unbiased_runs, sandwich):  # prints the margins for the report (pytest -s)
    for name in ("hmc", "wrong"):
        _, ratios = unbiased_runs[name]
        print(name, "per-point z", np.round(_z_scores(ratios), 2), "pooled z", round(float(_pooled_z_score(ratios)), 2))
    for key, (res, truth) in sandwich.items():
        print(key, "fwd gap", float(np.mean(truth - np.asarray(res.forward))), "bdmc gap", float(res.gap),
              "sandwich z", _sandwich_z(res, truth))
