"""je.make_objective: a bound written by the user gets every estimator, and every input
other than params["guide"] (the batch x, closed-over arrays) gets its plain derivative.

Exact checks against the built-ins (same key), the autodiff DReG weights against every
built-in's closed form, x- and closure-gradients of every objective x estimator against
plain autodiff of the loss value (and central finite differences in float64), forward
mode, and a paired bias test on a bound no built-in has, with STL as negative control.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo import estimators as est
from jaxelbo import objectives, registry
from jaxelbo.models import linear_gaussian as lg
from tests import toy
from tests.toy import GUIDE, MODEL, MU, RNG, D

B, BUDGET = 4, 6
X = toy.data(B)
PARAMS = toy.perturbed(lg.optimal_params(MU), a_noise=0.3, log_scale_shift=0.4)


def lme(lw):
    return jax.nn.logsumexp(lw, axis=-1) - jnp.log(lw.shape[-1])


def renyi_bound(alpha):
    return lambda lw: lme((1.0 - alpha) * lw) / (1.0 - alpha)


def grads(loss_fn, params=PARAMS, x=X):
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, RNG, x)[0]))(params)


# ------------------------------------------------------------------ equal to the built-ins


@pytest.mark.parametrize("estimator,builtin", [("reparam", "reparam"), ("stl", "stl"), ("dreg", "dreg"),
                                               ("score", "vimco")])
def test_hand_written_log_mean_exp_is_iwae(estimator, builtin):
    """The generic score baseline (F with log w_k replaced by the mean of the others) is VIMCO's."""
    mine = je.make_objective(MODEL, GUIDE, lme, num_samples=BUDGET, estimator=estimator)
    ref = je.iwae(MODEL, GUIDE, num_samples=BUDGET, estimator=builtin)
    (v1, g1), (v2, g2) = grads(mine), grads(ref)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    chex.assert_trees_all_close(g1, g2, rtol=2e-5, atol=1e-6)


def test_hand_written_renyi_dreg_is_renyi_dreg():
    mine = je.make_objective(MODEL, GUIDE, renyi_bound(0.5), num_samples=BUDGET, estimator="dreg")
    ref = je.renyi(MODEL, GUIDE, num_samples=BUDGET, alpha=0.5, estimator="dreg")
    (v1, g1), (v2, g2) = grads(mine), grads(ref)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    chex.assert_trees_all_close(g1, g2, rtol=2e-5, atol=1e-6)


def test_nested_num_samples_and_aux():
    mine = je.make_objective(MODEL, GUIDE, lambda lw: jnp.mean(lme(lw)), num_samples=(2, 3), estimator="dreg")
    ref = je.miwae(MODEL, GUIDE, num_outer=2, num_inner=3, estimator="dreg")
    (_, a1), (_, a2) = mine(PARAMS, RNG, X), ref(PARAMS, RNG, X)
    assert sorted(a1) == sorted(a2) and a1["log_weights"].shape == (B, 2, 3)
    chex.assert_trees_all_close(grads(mine), grads(ref), rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------ autodiff d == closed forms


def _closed_form_d(objective, lw, **kw):
    """(c, d) of a built-in: c by autodiff of its bound, d = its closed-form ratio * c."""
    k = lw.shape[-1]
    w = jax.nn.softmax(lw, -1)
    closed = {
        "iwae": lambda: w,
        "miwae": lambda: w,
        "ciwae": lambda: (kw["beta"] / k + (1 - kw["beta"]) * w * w) / (kw["beta"] / k + (1 - kw["beta"]) * w),
        "renyi": lambda: kw["alpha"] + (1 - kw["alpha"]) * jax.nn.softmax((1 - kw["alpha"]) * lw, -1),
    }
    return closed[objective]()


BOUNDS = {
    "iwae": (lme, {}),
    "miwae": (lambda lw: jnp.mean(lme(lw)), {}),
    "ciwae": (lambda lw: 0.3 * jnp.mean(lw) + 0.7 * lme(lw), {"beta": 0.3}),
    "renyi": (renyi_bound(0.4), {"alpha": 0.4}),
}


@pytest.mark.slow  # 28 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_autodiff_dreg_weights_equal_every_closed_form(capsys):
    """d = c - dc/dlog w (forward-over-reverse) against each built-in's closed form, at a
    spread of 30 nats; the max |difference| per built-in is printed (run with -s)."""
    lw = 10.0 * jax.random.normal(jax.random.key(3), (BUDGET,))
    lw2 = lw.reshape(2, 3)
    report = {}
    for name, (f, kw) in BOUNDS.items():
        x = lw2 if name == "miwae" else lw
        c, d = est.dreg_weights(f, x)
        want = _closed_form_d(name, x, **kw) * c
        report[name] = float(jnp.max(jnp.abs(d - want)))
    # PIWAE: phi's DReG weights are those of MIWAE (its bound for phi); the closed form is a ratio to
    # theta's c (IWAE over all M K samples)
    piwae = objectives.piwae(MODEL, GUIDE, num_outer=2, num_inner=3, estimator="dreg")
    del piwae
    c_all = jax.grad(lambda v: lme(v.reshape(-1)))(lw2)
    log_share = jax.nn.logsumexp(lw2) - jax.nn.logsumexp(lw2, -1, keepdims=True) - np.log(2)
    ratio = jnp.exp(log_share + lw2 - jax.nn.logsumexp(lw2, -1, keepdims=True))
    _, d_miwae = est.dreg_weights(lambda v: jnp.mean(lme(v)), lw2)
    report["piwae"] = float(jnp.max(jnp.abs(ratio * c_all - d_miwae)))
    # JVI: closed-form jvi_weights against autodiff of jvi_bound
    c, d = est.dreg_weights(objectives.jvi_bound, lw)
    cj, dj = objectives.jvi_weights(lw)
    report["jvi"] = float(max(jnp.max(jnp.abs(c - cj)), jnp.max(jnp.abs(d - dj))))
    # RWS / DReG(alpha): phi's weights alpha (dc/dlog w) + (1 - alpha)(c - dc/dlog w) of IWAE
    c, d = est.dreg_weights(lme, lw)
    for alpha in (1.0, 0.9):
        want = (alpha + (1 - 2 * alpha) * jax.nn.softmax(lw)) * c
        report[f"rws(alpha={alpha})"] = float(jnp.max(jnp.abs(alpha * (c - d) + (1 - alpha) * d - want)))
    # ELBO: c is constant, so d = c (DReG is STL)
    c, d = est.dreg_weights(jnp.mean, lw)
    report["elbo"] = float(jnp.max(jnp.abs(d - 1.0 / BUDGET)))
    with capsys.disabled():
        print("\nautodiff d vs closed form, max |diff|:", {k: f"{v:.1e}" for k, v in report.items()})
    assert max(report.values()) < 1e-6, report


def test_generic_score_signal_matches_closed_forms():
    lw = 3.0 * jax.random.normal(jax.random.key(4), (BUDGET,))
    np.testing.assert_allclose(est.leave_one_out_signal(lme, lw), est.vimco_signal(lw), atol=1e-6)
    np.testing.assert_allclose(est.leave_one_out_signal(jnp.mean, lw), est.elbo_score_signal(lw), atol=1e-6)


# ------------------------------------------------------------------ a bound no built-in has


def penalised_iwae(lw):
    """IWAE minus a tenth of the log-weights' variance: smooth, not a built-in."""
    return lme(lw) - 0.1 * jnp.var(lw)


@pytest.mark.slow
def test_new_bound_dreg_and_score_are_unbiased_and_stl_is_not():
    """DReG (autodiff d) and score (generic baseline) against reparam, paired on the same
    noise; STL, biased for a bound whose c is not constant, is the negative control."""
    x = X[:1]
    params = PARAMS
    losses = {e: je.make_objective(MODEL, GUIDE, penalised_iwae, num_samples=4, estimator=e)
              for e in ("reparam", "dreg", "score", "stl")}
    res = {e: je.paired_bias_test(losses["reparam"], losses[e], params, jax.random.key(11), x,
                                  num_replicates=3000).max_abs_t for e in ("dreg", "score", "stl")}
    assert res["dreg"] < 4.5 and res["score"] < 4.5, res
    assert res["stl"] > 8.0, res


# ------------------------------------------------------------------ every input's gradient


# every pair built on je.make_objective (ovis-mc is its own loss, jaxelbo.ovis)
CASES = [(o, e) for o, ests in je.OBJECTIVES.items() for e in ests if e != "ovis-mc" and o in
         ("elbo", "iwae", "miwae", "ciwae", "piwae", "renyi", "rws", "jvi")]
VALUE = {"elbo": lambda lw, kw: jnp.mean(lw, -1), "iwae": lambda lw, kw: lme(lw),
         "miwae": lambda lw, kw: jnp.mean(lme(lw), -1),
         "ciwae": lambda lw, kw: kw["beta"] * jnp.mean(lw, -1) + (1 - kw["beta"]) * lme(lw),
         "piwae": lambda lw, kw: lme(lw.reshape(lw.shape[0], -1)),
         "renyi": lambda lw, kw: lme((1 - kw["alpha"]) * lw) / (1 - kw["alpha"]),
         "rws": lambda lw, kw: lme(lw), "jvi": lambda lw, kw: objectives.jvi_bound(lw)}


def closing_model(w):
    """The toy whose likelihood closes over an array ``w`` (a scale on x)."""
    return je.Model(log_prior=MODEL.log_prior,
                    log_likelihood=lambda th, x, z: MODEL.log_likelihood(th, w * x, z))


def closing_guide(v):
    """The toy's guide shifted by a closed-over array ``v`` in sample and log_prob."""
    return je.Guide(sample=lambda phi, rng, x: GUIDE.sample(phi, rng, x) + v,
                    log_prob=lambda phi, x, z: GUIDE.log_prob(phi, x, z - v))


def _plain_value(objective, params, x, w, v):
    kw = registry.objective_kwargs(objective, num_samples=BUDGET)
    shape = (kw["num_outer"], kw["num_inner"]) if "num_outer" in kw else (BUDGET,)
    lw = je.log_weights(closing_model(w), closing_guide(v), params, RNG, x, num_samples=int(np.prod(shape)))
    return -jnp.mean(VALUE[objective](lw.reshape((x.shape[0], *shape)), kw))


def _loss_value(objective, estimator, params, x, w, v):
    f = registry.make(objective, closing_model(w), closing_guide(v), estimator=estimator, num_samples=BUDGET)
    return f(params, RNG, x)[0]


@pytest.fixture(scope="module")
def x64_inputs():
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
        yield to64(PARAMS), to64(X), jnp.asarray(1.3, jnp.float64), jnp.full((D,), 0.2, jnp.float64)


@pytest.mark.slow
@pytest.mark.parametrize("objective,estimator", CASES)
def test_x_and_closure_gradients_are_plain_autodiff(objective, estimator, x64_inputs):
    """jax.grad with respect to x and to arrays closed over by the model (w) and the guide (v)
    equals plain autodiff of the loss value on the same key, in float64; for the pathwise
    estimators also a central finite difference along a random direction of x."""
    with jax.enable_x64(True):
        params, x, w, v = x64_inputs
        got = jax.jit(jax.grad(lambda *a: _loss_value(objective, estimator, params, *a), argnums=(0, 1, 2)))(x, w, v)
        want = jax.jit(jax.grad(lambda *a: _plain_value(objective, params, *a), argnums=(0, 1, 2)))(x, w, v)
        chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-12)
        assert float(jnp.max(jnp.abs(got[0]))) > 1e-2  # not a vacuous zero
        if estimator in est.PATHWISE:
            direction = jax.random.normal(jax.random.key(5), x.shape, x.dtype)
            h = 1e-5
            f = jax.jit(lambda xx: _loss_value(objective, estimator, params, xx, w, v))
            fd = (f(x + h * direction) - f(x - h * direction)) / (2 * h)
            np.testing.assert_allclose(jnp.vdot(got[0], direction), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.slow  # 12 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_params_gradients_unchanged_when_x_is_differentiated_too():
    """Differentiating x as well (the extra plain path) leaves the estimator's params gradient as is."""
    for objective in ("iwae", "piwae", "jvi"):
        f = registry.make(objective, MODEL, GUIDE, estimator="dreg", num_samples=BUDGET)
        alone = jax.grad(lambda p, f=f: f(p, RNG, X)[0])(PARAMS)
        both = jax.grad(lambda p, x, f=f: f(p, RNG, x)[0], argnums=(0, 1))(PARAMS, X)[0]
        chex.assert_trees_all_close(alone, both, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # 13 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_forward_mode_equals_reverse_mode():
    """jax.jvp along params and jax.jacfwd in x give the same (rerouted) derivative as jax.grad."""
    f = je.iwae(MODEL, GUIDE, num_samples=BUDGET, estimator="dreg")
    loss = lambda p, x: f(p, RNG, x)[0]
    g_p, g_x = jax.grad(loss, argnums=(0, 1))(PARAMS, X)
    tangent = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 0.1, PARAMS)
    _, jvp = jax.jvp(lambda p: loss(p, X), (PARAMS,), (tangent,))
    want = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g_p), jax.tree_util.tree_leaves(tangent),
                                               strict=True))
    np.testing.assert_allclose(jvp, want, rtol=1e-5)
    np.testing.assert_allclose(jax.jacfwd(lambda x: loss(PARAMS, x))(X), g_x, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call,match", [
    (lambda: je.make_objective(MODEL, GUIDE, lambda lw: lw, num_samples=4), "to a scalar"),
    (lambda: je.make_objective(MODEL, GUIDE, lme, num_samples=4, estimator="vimco"), "closed-form learning signal"),
    (lambda: je.make_objective(MODEL, GUIDE, lme, num_samples=4, estimator="nope"), "valid choices"),
    (lambda: je.make_objective(MODEL, GUIDE, lme, num_samples=0), "num_samples must be >= 1"),
    (lambda: je.make_objective(MODEL, GUIDE, lme, num_samples=()), "non-empty tuple"),
    (lambda: je.make_objective(MODEL, GUIDE, 3.0, num_samples=4), "bound_fn must be a function"),
])
def test_bad_configuration(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ------------------------------------------------------------------ the docs page


@pytest.mark.slow
def test_write_your_own_bound_page_runs():
    """docs/write-your-own-bound.md: its code blocks run, and its paired bias test passes."""
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "write-your-own-bound.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 2
    exec(compile("\n".join(blocks), str(page), "exec"), {})  # the page's own example


def test_gradient_snr_with_one_replicate_is_refused():
    """Issue 23, fault 14: one replicate has no standard deviation (it gave NaN/inf silently)."""
    f = je.iwae(MODEL, GUIDE, num_samples=2)
    with pytest.raises(ValueError, match="num_replicates > ddof"):
        je.gradient_snr(f, PARAMS, RNG, X, num_replicates=1)
