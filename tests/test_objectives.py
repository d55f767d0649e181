"""Conformance of every objective x estimator: values, identities, shapes, jit, dtypes,
extreme weights, bad input, and the single-pass DReG against a two-pass reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo import registry
from jaxelbo.models import linear_gaussian as lg
from tests import toy
from tests.toy import GUIDE, MODEL, MU, RNG, D

pytestmark = pytest.mark.usefixtures("strict_numerics")

B = 4
X = toy.data(B)
PARAMS = toy.perturbed(lg.optimal_params(MU))

BUDGET = 6  # samples per example: K = 6, or M x K = 2 x 3 for miwae/piwae (jaxelbo.registry.split_budget)
CASES = [(o, e) for o, ests in je.OBJECTIVES.items() for e in ests]


def kwargs_of(objective, **overrides):
    """The constructor's keywords at the test budget (the registry's split and defaults)."""
    return {**registry.objective_kwargs(objective, num_samples=BUDGET), **overrides}


def log_weights_shape(objective):
    nested = registry.get(objective).nested
    return (B, *registry.split_budget(BUDGET)) if nested else (B, BUDGET)


def make(objective, estimator, model=MODEL, guide=GUIDE, **overrides):
    return registry.get(objective).constructor(model, guide, estimator=estimator, **kwargs_of(objective, **overrides))


def bound(objective, **overrides):
    """The bound's value (estimator-independent)."""
    est = je.OBJECTIVES[objective][0]
    return make(objective, est, **overrides)(PARAMS, RNG, X)[1]["bound"]


# ------------------------------------------------------------------ conformance


@pytest.fixture(scope="module")
def steps():
    """``steps(objective, estimator)``: ``jit(value_and_grad)`` of the pair's loss on
    ``(params, rng, x)``, compiled once per module and shared by every test that uses it."""
    cache = {}

    def get(objective, estimator):
        if (objective, estimator) not in cache:
            cache[objective, estimator] = jax.jit(jax.value_and_grad(_traced_once(make(objective, estimator)),
                                                                     has_aux=True))
        return cache[objective, estimator]

    return get


def _traced_once(loss_fn):
    """``loss_fn`` that raises when it is traced a second time (a retrace under ``jit``).

    One counter per wrapped loss: ``chex.assert_max_traces`` keys its counter on the source
    text and call stack, which every pair built here shares.
    """
    traces = [0]

    def traced(p, r, x):
        traces[0] += 1
        if traces[0] > 1:
            raise AssertionError(f"{loss_fn.__name__} traced {traces[0]} times under jit; expected once")
        return loss_fn(p, r, x)

    return traced


@pytest.mark.parametrize("objective,estimator", CASES)
def test_conformance(objective, estimator, steps):
    (loss, aux), grads = steps(objective, estimator)(PARAMS, RNG, X)
    chex.assert_shape(loss, ())
    chex.assert_shape([aux["bound"], aux["ess"]], (B,))
    lw_shape = log_weights_shape(objective)
    chex.assert_shape(aux["log_weights"], lw_shape)
    chex.assert_trees_all_equal_structs(grads, PARAMS)
    chex.assert_tree_all_finite((loss, aux, grads))
    # a lower bound is maximised (loss = -mean bound), an upper bound (cubo) minimised (+mean bound)
    sign = registry.loss_sign(objective)
    assert sign == (1.0 if objective == "cubo" else -1.0)
    np.testing.assert_allclose(loss, sign * jnp.mean(aux["bound"]), rtol=1e-6)
    assert np.all((aux["ess"] >= 1 - 1e-5) & (aux["ess"] <= lw_shape[-1] + 1e-4))
    # every estimator of an objective has the same value on the same noise
    (ref_loss, _), _ = steps(objective, je.OBJECTIVES[objective][0])(PARAMS, RNG, X)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


@pytest.mark.parametrize("objective,estimator", CASES)
def test_jit_equals_eager_and_no_retracing(objective, estimator, steps):
    loss_fn = make(objective, estimator)
    eager = jax.grad(lambda p, r, x: loss_fn(p, r, x)[0])(PARAMS, RNG, X)
    jitted = steps(objective, estimator)  # traced at most once (_traced_once), whatever the inputs
    for seed in range(3):
        jitted(PARAMS, jax.random.key(seed), X + seed)
    _, out = jitted(PARAMS, RNG, X)
    assert jitted._cache_size() == 1
    chex.assert_trees_all_close(out, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective,estimator", CASES)
def test_extreme_log_weights_stay_finite(objective, estimator):
    """A likelihood scaled by 1e3 spreads log-weights over thousands of nats."""
    sharp = je.Model(log_prior=MODEL.log_prior,
                     log_likelihood=lambda th, x, z: 1e3 * MODEL.log_likelihood(th, x, z))
    loss_fn = make(objective, estimator, model=sharp)
    params = {"model": PARAMS["model"], "guide": {**PARAMS["guide"], "log_scale": jnp.asarray(1.0)}}
    (loss, aux), grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, RNG, X), has_aux=True))(params)
    spread = np.ptp(np.asarray(aux["log_weights"]).reshape(B, -1), axis=-1)
    assert spread.max() > 100.0
    chex.assert_tree_all_finite((loss, grads))


@pytest.mark.parametrize("objective,estimator", [
    ("elbo", "score"), ("iwae", "dreg"), ("iwae", "vimco"), ("piwae", "reparam"), ("rws", "dreg")])
def test_float64(objective, estimator, maybe_jit):
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), PARAMS)
        x = jnp.asarray(X, jnp.float64)
        loss_fn = make(objective, estimator)
        (loss, aux), grads = maybe_jit(jax.value_and_grad(lambda p: loss_fn(p, RNG, x), has_aux=True))(params)
        assert loss.dtype == aux["log_weights"].dtype == jnp.float64
        chex.assert_trees_all_equal_dtypes(grads, params)


# ------------------------------------------------------------------ value identities


def test_upper_bounds_are_minimised():
    """TVO's right sum is an upper bound: its loss is +mean bound; the left sum's is -mean bound."""
    for integration, sign in (("left", -1.0), ("right", 1.0)):
        assert registry.loss_sign("tvo", {"integration": integration}) == sign
        loss, aux = make("tvo", "score", integration=integration)(PARAMS, RNG, X)
        np.testing.assert_allclose(loss, sign * jnp.mean(aux["bound"]), rtol=1e-6)
    left = make("tvo", "score")(PARAMS, RNG, X)[1]["bound"]
    right = make("tvo", "score", integration="right")(PARAMS, RNG, X)[1]["bound"]
    assert np.all(np.asarray(right) >= np.asarray(left))  # the integrand is non-decreasing in beta
    with pytest.raises(ValueError, match="direction must be one of lower, upper"):
        registry.register("sideways", je.iwae, estimators=("reparam",), direction="sideways")


def test_iwae_with_one_sample_is_the_elbo():
    np.testing.assert_allclose(bound("iwae", num_samples=1), bound("elbo", num_samples=1), rtol=1e-6)


def test_miwae_with_one_outer_sample_is_iwae():
    np.testing.assert_allclose(bound("miwae", num_outer=1, num_inner=BUDGET), bound("iwae"), rtol=1e-6)


@pytest.mark.parametrize("beta,other", [(1.0, "elbo"), (0.0, "iwae")])
def test_ciwae_endpoints(beta, other):
    np.testing.assert_allclose(bound("ciwae", beta=beta), bound(other), rtol=1e-6)


@pytest.mark.parametrize("alpha,other", [(0.0, "iwae"), (1.0, "elbo")])
def test_renyi_endpoints(alpha, other):
    np.testing.assert_allclose(bound("renyi", alpha=alpha), bound(other), rtol=1e-6)
    # near alpha = 1 the bound approaches the ELBO continuously
    np.testing.assert_allclose(bound("renyi", alpha=1.0 - 1e-3), bound("elbo"), rtol=0, atol=5e-3)


def test_renyi_is_monotone_in_alpha():
    values = [float(jnp.mean(bound("renyi", alpha=a))) for a in [-1.0, 0.0, 0.5, 1.0, 2.0]]
    assert values == sorted(values, reverse=True), values


def test_piwae_bound_is_iwae_over_all_samples():
    lw = make("piwae", "reparam")(PARAMS, RNG, X)[1]["log_weights"]
    np.testing.assert_allclose(bound("piwae"), jax.nn.logsumexp(lw.reshape(B, -1), -1) - np.log(BUDGET), rtol=1e-6)


@pytest.mark.slow  # 13 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_iwae_increases_with_k_and_stays_below_log_px():
    """E[IWAE_K] is non-decreasing in K and below log p(x) (Burda et al. 2016, Thm 1)."""
    log_px = float(jnp.mean(lg.log_marginal(PARAMS["model"], X)))
    means = []
    for k in [1, 4, 16, 64, 256]:
        loss_fn = make("iwae", "reparam", num_samples=k)
        vals = jax.jit(jax.vmap(lambda r, f=loss_fn: f(PARAMS, r, X)[0]))(jax.random.split(RNG, 400))
        means.append((-float(vals.mean()), float(vals.std() / np.sqrt(400))))
    for (a, sa), (b, sb) in zip(means, means[1:], strict=False):
        assert b > a - 3 * np.hypot(sa, sb), means
    assert means[-1][0] - means[0][0] > 0.1, means
    assert all(m < log_px + 3 * s for m, s in means), (means, log_px)
    assert log_px - means[-1][0] < 0.05


def test_elbo_value_is_unbiased_for_the_exact_elbo():
    loss_fn = make("elbo", "reparam", num_samples=8)
    vals = jax.jit(jax.vmap(lambda r: loss_fn(PARAMS, r, X)[1]["bound"]))(jax.random.split(RNG, 2000))
    exact = lg.exact_elbo(PARAMS, X)
    z = (vals.mean(0) - exact) / (vals.std(0) / np.sqrt(2000))
    assert np.max(np.abs(z)) < 5, z


# ------------------------------------------------------------------ single-pass DReG


def two_pass_dreg(objective, params, rng, x, **kwargs):
    """Reference DReG with two surrogates (the model is evaluated twice): theta on
    stopped-z log-weights with the bound's weights, phi on ``sum d_k log w~_k``."""
    sg = jax.lax.stop_gradient
    shape = (kwargs["num_outer"], kwargs["num_inner"]) if "num_outer" in kwargs else (kwargs["num_samples"],)
    n = int(np.prod(shape))
    keys = jax.random.split(rng, (B, n))
    theta, phi = params["model"], params["guide"]
    per = lambda f: jax.vmap(jax.vmap(f, (0, None)), (0, 0))

    def lw_fn(theta, phi_sample, phi_q):
        z = per(lambda k, xx: GUIDE.sample(phi_sample, k, xx))(keys, x)
        lp = jax.vmap(jax.vmap(lambda zz, xx: je.log_joint(MODEL, theta, xx, zz), (0, None)), (0, 0))(z, x)
        lq = jax.vmap(jax.vmap(lambda zz, xx: GUIDE.log_prob(phi_q, xx, zz), (0, None)), (0, 0))(z, x)
        return (lp - lq).reshape((B, *shape))

    lw_theta = lw_fn(theta, sg(phi), sg(phi))
    lw_phi = lw_fn(sg(theta), phi, sg(phi))
    lw = sg(lw_theta)
    if objective == "iwae":
        bound_theta = jax.nn.logsumexp(lw_theta, -1)
        d = jax.nn.softmax(lw, -1) ** 2
    elif objective == "miwae":
        bound_theta = jnp.mean(jax.nn.logsumexp(lw_theta, -1), -1)
        d = jax.nn.softmax(lw, -1) ** 2 / shape[0]
    elif objective == "piwae":
        bound_theta = jax.nn.logsumexp(lw_theta.reshape(B, -1), -1)
        d = jax.nn.softmax(lw, -1) ** 2 / shape[0]
    elif objective == "ciwae":
        beta = kwargs["beta"]
        bound_theta = beta * jnp.mean(lw_theta, -1) + (1 - beta) * jax.nn.logsumexp(lw_theta, -1)
        d = beta / n + (1 - beta) * jax.nn.softmax(lw, -1) ** 2
    elif objective == "renyi":
        a = kwargs["alpha"]
        bound_theta = jax.nn.logsumexp((1 - a) * lw_theta, -1) / (1 - a)
        v = jax.nn.softmax((1 - a) * lw, -1)
        d = a * v + (1 - a) * v**2
    elif objective == "rws":
        bound_theta = jax.nn.logsumexp(lw_theta, -1)
        w = jax.nn.softmax(lw, -1)
        d = w - w**2
    surrogate = bound_theta + jnp.sum((d * lw_phi).reshape(B, -1), -1)
    return -jnp.mean(surrogate)


@pytest.mark.parametrize("objective", ["iwae", "miwae", "piwae", "ciwae", "renyi", "rws"])
def test_single_pass_dreg_matches_two_pass_reference(objective, maybe_jit):
    loss_fn = make(objective, "dreg")
    got = maybe_jit(jax.grad(lambda p: loss_fn(p, RNG, X)[0]))(PARAMS)
    want = maybe_jit(jax.grad(lambda p: two_pass_dreg(objective, p, RNG, X, **kwargs_of(objective))))(PARAMS)
    chex.assert_trees_all_close(got, want, rtol=2e-4, atol=2e-5)


def test_dreg_with_one_sample_equals_stl():
    g = {e: jax.grad(lambda p, e=e: make("iwae", e, num_samples=1)(p, RNG, X)[0])(PARAMS)
         for e in ["stl", "dreg"]}
    chex.assert_trees_all_close(g["dreg"], g["stl"], rtol=1e-5, atol=1e-6)


def test_theta_gradient_is_w_weighted():
    """theta's gradient is sum_k w_k grad log p(x, z_k): check against the formula."""
    loss_fn = make("iwae", "dreg")
    got = jax.grad(lambda p: loss_fn(p, RNG, X)[0])(PARAMS)["model"]["mu"]
    keys = jax.random.split(RNG, (B, BUDGET))
    z = jax.vmap(jax.vmap(lambda k, xx: GUIDE.sample(PARAMS["guide"], k, xx), (0, None)))(keys, X)
    lw = make("iwae", "reparam")(PARAMS, RNG, X)[1]["log_weights"]
    w = jax.nn.softmax(lw, -1)
    grad_log_prior = z - PARAMS["model"]["mu"][None, None]  # d/dmu log N(z; mu, I)
    want = -jnp.mean(jnp.sum(w[..., None] * grad_log_prior, axis=1), axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call,match", [
    (lambda: je.iwae(MODEL, GUIDE, num_samples=0, estimator="dreg"), "num_samples must be >= 1"),
    (lambda: je.iwae(MODEL, GUIDE, num_samples=2.5, estimator="dreg"), "num_samples must be an integer"),
    (lambda: je.miwae(MODEL, GUIDE, num_outer=0, num_inner=3), "num_outer must be >= 1"),
    (lambda: je.piwae(MODEL, GUIDE, num_outer=2, num_inner=0), "num_inner must be >= 1"),
    (lambda: je.iwae(MODEL, GUIDE, num_samples=3, estimator="nope"), "valid choices: reparam, stl"),
    (lambda: je.elbo(MODEL, GUIDE, num_samples=3, estimator="vimco"), 
     "objective 'elbo' does not support estimator 'vimco'"),
    (lambda: je.piwae(MODEL, GUIDE, num_outer=2, num_inner=3, estimator="stl"),
     "valid choices for piwae: reparam, dreg"),
    (lambda: je.ciwae(MODEL, GUIDE, num_samples=3, beta=1.5), r"beta must lie in \[0, 1\]"),
    (lambda: je.ciwae(MODEL, GUIDE, num_samples=3, beta=-0.1), r"beta must lie in \[0, 1\]"),
    (lambda: je.renyi(MODEL, GUIDE, num_samples=3, alpha=float("nan")), "alpha must be finite"),
    (lambda: je.iwae(GUIDE, MODEL, num_samples=3), "model must be a jaxelbo.Model"),
])
def test_bad_configuration_raises_at_construction(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_batch_without_leading_axis():
    loss_fn = je.iwae(MODEL, GUIDE, num_samples=3)
    with pytest.raises(ValueError, match="leading axis"):
        loss_fn(PARAMS, RNG, X[0, 0])
    with pytest.raises(ValueError, match="leading axis"):  # one example passed as a batch of scalars
        jax.jit(loss_fn)(PARAMS, RNG, X[0])


def test_guide_whose_sample_and_log_prob_disagree():
    bad = je.Guide(sample=GUIDE.sample, log_prob=lambda phi, x, z: -0.5 * (z - phi["b"]) ** 2)  # not summed
    with pytest.raises(ValueError, match="sample and log_prob agree"):
        jax.jit(je.iwae(MODEL, bad, num_samples=3))(PARAMS, RNG, X)
    bad = je.Guide(sample=lambda phi, rng, x: jax.random.normal(rng, (D + 1,)), log_prob=GUIDE.log_prob)
    with pytest.raises(ValueError, match="sample and log_prob agree"):
        je.iwae(MODEL, bad, num_samples=3)(PARAMS, RNG, X)


def test_params_must_hold_model_and_guide():
    with pytest.raises(TypeError, match='"model": theta, "guide": phi'):
        je.iwae(MODEL, GUIDE, num_samples=3)(PARAMS["guide"], RNG, X)
