"""Sequential bounds (jaxelbo.smc) against the Kalman filter and exact enumeration.

Claims: E[Z_hat] = p(x) for each resampling scheme; the exact smoothing proposal without
resampling gives log Z_hat = log p(x) for every K; the resampling score terms make the
gradient unbiased (by exact enumeration of the ancestors); reparam's bias shrinks with K;
resampling beats IWAE over trajectories for long T.
Each statistical claim has a negative control that the same statistic rejects.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo import smc
from jaxelbo.models import linear_gaussian_ssm as ssm
from tests.stats import flat

pytestmark = pytest.mark.usefixtures("strict_numerics")

SCHEMES = ("multinomial", "systematic", "stratified")
MODEL = ssm.model()
BOOT, SMOOTH = ssm.bootstrap_proposal(), ssm.smoothing_proposal()


@pytest.fixture(scope="module")
def problem():
    params = ssm.default_params(dim_z=2, dim_x=1)
    _, x = MODEL.sample(params["model"], jax.random.key(3), 6)
    x = x[None]
    return params, x, float(ssm.kalman_log_marginal(params["model"], x)[0])


def shifted_guide(params):
    """A bootstrap proposal that is not the model's transition: shifted mean and wider noise."""
    phi = params["guide"]
    return dict(phi, m0=phi["m0"] + 0.5, log_q=phi["log_q"] + 0.3, log_p0=phi["log_p0"] + 0.3)


def replicate_bounds(loss_fn, params, x, num_replicates, seed=0):
    keys = jax.random.split(jax.random.key(seed), num_replicates)
    return np.asarray(jax.jit(jax.vmap(lambda k: loss_fn(params, k, x)[1]["bound"][0]))(keys), np.float64)


def z_of_mean_z(bounds, log_p):
    ratio = np.exp(bounds - log_p)
    return (ratio.mean() - 1.0) / (ratio.std(ddof=1) / np.sqrt(ratio.size))


# ------------------------------------------------------------------ resampling primitives


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resampling_log_prob_is_the_law_of_the_draws(scheme):
    """Over all 27 ancestor vectors of K = 3, P(a) sums to 1 and matches draw frequencies."""
    log_w = jnp.log(jnp.array([0.2, 0.5, 0.3]))
    vectors = jnp.array(list(itertools.product(range(3), repeat=3)), jnp.int32)
    probs = np.exp(np.asarray(jax.vmap(lambda a: smc.resampling_log_prob(log_w, a, scheme))(vectors), np.float64))
    probs = np.where(probs < 1e-20, 0.0, probs)
    assert abs(probs.sum() - 1.0) < 1e-5
    draws = jax.vmap(lambda k: smc.resample(k, log_w, scheme))(jax.random.split(jax.random.key(0), 20000))
    codes = np.asarray(draws[:, 0] * 9 + draws[:, 1] * 3 + draws[:, 2])
    freq = np.bincount(codes, minlength=27) / codes.size
    se = np.sqrt(np.maximum(probs * (1 - probs), 1e-12) / codes.size)
    assert np.max(np.abs(freq - probs) / se) < 5.0
    assert np.all(freq[probs == 0.0] == 0.0)


# ------------------------------------------------------------------ values against Kalman


@pytest.mark.parametrize("num_particles", [1, 5])
def test_exact_proposal_without_resampling_has_zero_variance(problem, num_particles):
    params, x, log_p = problem
    loss_fn = je.smc_bound(MODEL, SMOOTH, num_particles=num_particles, resample_when="never")
    bounds = replicate_bounds(loss_fn, params, x, 32)
    assert np.max(np.abs(bounds - log_p)) < 2e-4, (bounds - log_p)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_z_hat_is_unbiased_for_each_scheme(problem, scheme):
    params, x, log_p = problem
    loss_fn = je.smc_bound(MODEL, BOOT, num_particles=8, resampling=scheme, resample_when="always")
    bounds = replicate_bounds(loss_fn, params, x, 3000)
    assert abs(z_of_mean_z(bounds, log_p)) < 4.0
    # negative control: the same statistic rejects the Kalman value of a slightly different model
    wrong = dict(params["model"], log_r=params["model"]["log_r"] + 0.5)
    log_p_wrong = float(ssm.kalman_log_marginal(wrong, x)[0])
    assert abs(z_of_mean_z(bounds, log_p_wrong)) > 6.0


def test_adaptive_resampling_is_unbiased_and_resamples_less(problem):
    params, x, log_p = problem
    loss_fn = je.smc_bound(MODEL, BOOT, num_particles=8, resampling="systematic", resample_when=0.5)
    keys = jax.random.split(jax.random.key(1), 3000)
    aux = jax.jit(jax.vmap(lambda k: loss_fn(params, k, x)[1]))(keys)
    assert abs(z_of_mean_z(np.asarray(aux["bound"][:, 0], np.float64), log_p)) < 4.0
    n = np.asarray(aux["num_resampled"])
    assert 0 < n.mean() < x.shape[1] - 1
    assert aux["ess"].shape == (3000, 1, x.shape[1])


def test_resampling_beats_iwae_over_trajectories_for_long_sequences():
    params = ssm.default_params(dim_z=1, dim_x=1)
    _, x = MODEL.sample(params["model"], jax.random.key(5), 40)
    means = {}
    for when in ("always", "never"):
        b = replicate_bounds(je.smc_bound(MODEL, BOOT, num_particles=8, resample_when=when), params, x[None], 200)
        means[when] = (b.mean(), b.std(ddof=1) / np.sqrt(b.size))
    gap = means["always"][0] - means["never"][0]
    assert gap > 5 * np.hypot(means["always"][1], means["never"][1]), means


def test_one_particle_is_the_same_elbo_sample_for_every_scheme(problem):
    params, x, _ = problem
    configs = [("multinomial", "never"), ("systematic", "always"), ("stratified", 0.5)]
    values = [jax.jit(je.smc_bound(MODEL, BOOT, num_particles=1, resampling=s, resample_when=w))(
        params, jax.random.key(2), x)[0] for s, w in configs]
    np.testing.assert_allclose(np.array(values), float(values[0]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ variable lengths


@pytest.mark.slow  # over 5 s (three SMC programs and their x-gradient): the slow gate
def test_lengths_mask_matches_truncated_sequences(problem):
    params, x, _ = problem
    theta = params["model"]
    _, x2 = MODEL.sample(theta, jax.random.key(9), 6)
    batch = jnp.concatenate([x, x2[None]])
    lengths = jnp.array([6, 4], jnp.int32)
    loss_fn = jax.jit(je.smc_bound(MODEL, BOOT, num_particles=4, resampling="systematic"))
    _, aux = loss_fn(params, jax.random.key(0), batch, lengths)
    # truncation: same per-sequence key (batch index 1 of a batch of 2), first 4 steps only
    _, aux_short = loss_fn(params, jax.random.key(0), batch[:, :4], jnp.array([4, 4], jnp.int32))
    np.testing.assert_allclose(aux["bound"][1], aux_short["bound"][1], rtol=0, atol=1e-5)
    assert int(aux["num_resampled"][1]) == 3 and int(aux["num_resampled"][0]) == 5
    kal = ssm.kalman_log_marginal(theta, batch, lengths)
    np.testing.assert_allclose(kal[1], ssm.kalman_log_marginal(theta, batch[1:, :4])[0], rtol=1e-5)
    # padding never reaches a gradient
    gx = jax.grad(lambda xx: loss_fn(params, jax.random.key(0), xx, lengths)[0])(batch)
    assert np.all(np.asarray(gx[1, 4:]) == 0.0) and np.any(np.asarray(gx[1, :4]) != 0.0)


# ------------------------------------------------------------------ gradients


@pytest.fixture(scope="module")
def enumeration_case():
    params = ssm.default_params(dim_z=1, dim_x=1, q=1.0)
    _, x = MODEL.sample(params["model"], jax.random.key(11), 3)
    return {"model": params["model"], "guide": shifted_guide(params)}, x


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_score_resampling_is_unbiased_by_enumerating_ancestors(enumeration_case, scheme):
    """T = 3, K = 2: E over the 16 ancestor configurations is exact given the particle noise,
    so the mean of score-resampling's gradient must match the enumerated gradient (paired on
    the same noise); reparam's must not."""
    params, x = enumeration_case
    k, num_steps = 2, 3
    config = dict(num_particles=k, resampling=scheme, resample_when="always")
    vectors = jnp.array(list(itertools.product(range(k), repeat=k)), jnp.int32)
    configs = jnp.array(list(itertools.product(range(len(vectors)), repeat=num_steps - 1)), jnp.int32)
    ancestors = jnp.concatenate([jnp.zeros((len(configs), 1, k), jnp.int32), vectors[configs]], axis=1)
    done = jnp.broadcast_to(jnp.arange(num_steps) > 0, (len(configs), num_steps))
    length = jnp.array(num_steps, jnp.int32)

    def expected_log_z(p, key):
        def one(d, a):
            tr = smc.smc_trace(MODEL, BOOT, p["model"], p["guide"], key, x, length, replay=(d, a), **config)
            return tr.log_z, jnp.sum(tr.log_prob_ancestors)

        log_z, log_pa = jax.vmap(one)(done, ancestors)
        prob = jnp.exp(log_pa)
        return jnp.sum(jnp.where(prob > 1e-12, prob, 0.0) * log_z)

    losses = {e: je.smc_bound(MODEL, BOOT, estimator=e, **config) for e in ("reparam", "score-resampling")}

    def grads(key):
        # the loss splits its key over the batch of one; the enumeration uses that same sequence key
        seq_key = jax.random.split(key, 1)[0]
        exact = jax.grad(expected_log_z)(params, seq_key)
        est = {e: jax.grad(lambda p, f=f: -f(p, key, x[None])[0])(params) for e, f in losses.items()}
        return exact, est["score-resampling"], est["reparam"]

    exact, score, reparam = jax.jit(jax.vmap(grads))(jax.random.split(jax.random.key(6), 3000))

    def paired_z(a, b):
        d = flat(a) - flat(b)
        return d.mean(0) / (d.std(0, ddof=1) / np.sqrt(d.shape[0]) + 1e-12)

    assert np.max(np.abs(paired_z(score, exact))) < 4.5
    assert np.max(np.abs(paired_z(reparam, exact))) > 6.0


def test_score_resampling_leaves_the_x_gradient_plain(problem):
    params, x, _ = problem
    values, grads = zip(*[jax.jit(jax.value_and_grad(lambda xx, e=e: je.smc_bound(
        MODEL, BOOT, num_particles=4, estimator=e)(params, jax.random.key(1), xx)[0]))(x)
        for e in smc.SMC_ESTIMATORS], strict=True)
    for g in grads[1:]:
        np.testing.assert_allclose(grads[0], g, rtol=1e-5, atol=1e-6)
    assert all(float(v) == float(values[0]) for v in values)


@pytest.mark.slow  # over 5 s (vmapped gradients of two estimators): the slow gate
def test_stl_phi_gradient_vanishes_at_the_exact_proposal(problem):
    """Smoothing proposal at phi = theta, no resampling: every trajectory weighs p(x) whatever the
    particles, so STL's phi-gradient is zero on every key, while reparam's on the same keys is a
    zero-mean score term that is not (the negative control). theta gets the same gradient from both."""
    params, x, _ = problem
    fns = {e: je.smc_bound(MODEL, SMOOTH, num_particles=3, resample_when="never", estimator=e)
           for e in ("reparam", "stl")}

    def grads(key):
        return {e: jax.value_and_grad(lambda p, f=f: f(p, key, x)[0])(params) for e, f in fns.items()}

    out = jax.jit(jax.vmap(grads))(jax.random.split(jax.random.key(7), 64))
    (v_r, g_r), (v_s, g_s) = out["reparam"], out["stl"]
    np.testing.assert_allclose(v_r, v_s, rtol=0, atol=1e-6)
    phi_r, phi_s = flat(g_r["guide"]), flat(g_s["guide"])
    assert np.max(np.abs(phi_s)) < 1e-3 * np.max(np.abs(phi_r)), (np.max(np.abs(phi_s)), np.max(np.abs(phi_r)))
    assert np.max(np.abs(phi_r)) > 0.1
    t = phi_r.mean(0) / (phi_r.std(0, ddof=1) / np.sqrt(phi_r.shape[0]) + 1e-12)
    assert np.max(np.abs(t)) < 4.5, t  # reparam's phi-gradient is zero-mean here: both are unbiased
    np.testing.assert_allclose(flat(g_r["model"]), flat(g_s["model"]), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_reparam_bias_shrinks_with_the_number_of_particles(problem):
    """|E[reparam theta-gradient] - Kalman gradient| falls as K grows (K = 2, 8, 32)."""
    params, x, _ = problem
    target = flat(jax.tree.map(lambda t: t[None], jax.grad(lambda th: ssm.kalman_log_marginal(th, x)[0])(
        params["model"])))[0]
    bias = []
    for k in (2, 8, 32):
        loss_fn = je.smc_bound(MODEL, BOOT, num_particles=k)
        g = jax.jit(jax.vmap(lambda key, f=loss_fn: jax.grad(lambda p: -f(p, key, x)[0])(params)["model"]))(
            jax.random.split(jax.random.key(k), 600))
        reps = flat(g)
        bias.append(np.linalg.norm(reps.mean(0) - target))
    assert bias[0] > bias[1] > bias[2], bias


# ------------------------------------------------------------------ configuration errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_particles=0), "num_particles"),
    (dict(num_particles=4, resampling="residual"), "resampling"),
    (dict(num_particles=4, resample_when="sometimes"), "resample_when"),
    (dict(num_particles=4, resample_when=1.5), "ESS fraction"),
    (dict(num_particles=4, estimator="dreg"), "estimators"),
])
def test_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        je.smc_bound(MODEL, BOOT, **kwargs)


def test_bad_batch_is_refused(problem):
    params, x, _ = problem
    loss_fn = je.smc_bound(MODEL, BOOT, num_particles=2)
    with pytest.raises(ValueError, match=r"\(B, T"):
        loss_fn(params, jax.random.key(0), x[0, :, 0])
    with pytest.raises(ValueError, match="lengths"):
        loss_fn(params, jax.random.key(0), x, jnp.array([1.0, 2.0]))
