"""TVO on the linear-Gaussian toy, where every pi_beta is Gaussian and E_{pi_beta}[log w~]
has a closed form (linear_gaussian.exact_tvo_integrand)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo.models import linear_gaussian as lg
from jaxelbo.thermodynamic import log_uniform_partition, tvo_bound
from tests import toy

D, B = 2, 2
MU = jnp.array([0.3, -0.5])
X = lg.sample_data(jax.random.key(7), MU, B)
MODEL, GUIDE = lg.model(), lg.guide()


def perturbed():
    params = lg.optimal_params(MU)
    g = dict(params["guide"])
    g["b"] = g["b"] + jnp.array([0.4, -0.3])
    g["A"] = g["A"] + jnp.array([[0.1, 0.0], [0.05, -0.1]])
    g["log_scale"] = g["log_scale"] + 0.1
    return {"model": {"mu": params["model"]["mu"] - 0.2}, "guide": g}


PARAMS = perturbed()
PARTITION = log_uniform_partition(4, -1.0)


@jax.jit
def _integrand(params, betas):
    return lg.exact_tvo_integrand(params, X, betas)


def exact_tvo(params, partition, integration="left"):
    """The closed-form Riemann sum per example, (B,)."""
    p = jnp.asarray(partition)
    f = _integrand(params, p)
    ends = f[:, :-1] if integration == "left" else f[:, 1:]
    return jnp.sum(jnp.diff(p) * ends, axis=-1)


def test_one_interval_left_is_the_elbo_and_right_the_eubo():
    rng = jax.random.key(1)
    for estimator in ("score", "reparam"):
        left = je.tvo(MODEL, GUIDE, num_samples=6, partition=[0.0, 1.0], estimator=estimator)(PARAMS, rng, X)[1]
        np.testing.assert_allclose(left["bound"], je.elbo(MODEL, GUIDE, num_samples=6)(PARAMS, rng, X)[1]["bound"],
                                   rtol=1e-6)
        right = je.tvo(MODEL, GUIDE, num_samples=6, partition=[0.0, 1.0], integration="right",
                       estimator=estimator)(PARAMS, rng, X)[1]
        lw = right["log_weights"]
        np.testing.assert_allclose(right["bound"], jnp.sum(jax.nn.softmax(lw, -1) * lw, -1), rtol=1e-6)
    # closed forms: beta = 0 is the ELBO; beta = 1 the EUBO = log p(x) + KL(p(z|x) || q)
    f = lg.exact_tvo_integrand(PARAMS, X, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(f[:, 0], lg.exact_elbo(PARAMS, X), rtol=1e-6)
    assert np.all(f[:, 1] > lg.log_marginal(PARAMS["model"], X))


def test_closed_form_bracket_tightens_as_the_partition_refines():
    log_px = np.asarray(lg.log_marginal(PARAMS["model"], X))
    lows, highs = [], []
    for s in (1, 2, 4, 8, 32, 128):
        grid = np.linspace(0.0, 1.0, s + 1)    # nested partitions
        lows.append(np.asarray(exact_tvo(PARAMS, grid, "left")))
        highs.append(np.asarray(exact_tvo(PARAMS, grid, "right")))
    for lo, hi in zip(lows, highs, strict=True):
        assert np.all(lo < log_px) and np.all(log_px < hi)
    gaps = [hi - lo for lo, hi in zip(lows, highs, strict=True)]
    assert all(np.all(b < a) for a, b in zip(gaps, gaps[1:], strict=False))
    assert np.all(gaps[-1] < 0.02 * gaps[0])
    # and the trapezoid of the integrand on a fine grid is log p(x) (the thermodynamic identity)
    fine = jnp.linspace(0.0, 1.0, 2001)
    np.testing.assert_allclose(jnp.trapezoid(lg.exact_tvo_integrand(PARAMS, X, fine), fine, axis=-1), log_px,
                               atol=1e-4)


@pytest.fixture(scope="module")
def estimates():
    """200 replicates of TVO_L and TVO_U at K = 4, 32, 256: (R, B) each."""
    out = {}
    keys = jax.random.split(jax.random.key(2), 200)
    for integration in ("left", "right"):
        for k in (4, 32, 256):
            loss_fn = je.tvo(MODEL, GUIDE, num_samples=k, partition=PARTITION, integration=integration)
            vals = np.asarray(jax.jit(jax.vmap(lambda r, f=loss_fn: f(PARAMS, r, X)[1]["bound"]))(keys))
            out[integration, k] = vals
    return out


@pytest.mark.parametrize("integration", ["left", "right"])
def test_estimates_converge_to_the_closed_form(estimates, integration):
    exact = np.asarray(exact_tvo(PARAMS, PARTITION, integration))
    mse = [np.mean((estimates[integration, k] - exact) ** 2, axis=0) for k in (4, 32, 256)]
    assert np.all(mse[1] < mse[0]) and np.all(mse[2] < mse[1]), mse
    vals = estimates[integration, 256]
    mean, se = vals.mean(0), vals.std(0) / np.sqrt(vals.shape[0])
    assert np.all(np.abs(mean - exact) < 0.01 + 4 * se), (mean, exact, se)
    # the self-normalised estimate is not the closed form at small K (a check that can fail)
    assert np.all(mse[0] > 10 * mse[2])


def test_log_uniform_partition():
    np.testing.assert_allclose(log_uniform_partition(3, -2.0), [0.0, 0.01, 0.1, 1.0])
    aux = je.tvo(MODEL, GUIDE, num_samples=4, num_partitions=5, log_beta_min=-1.5)(PARAMS, jax.random.key(0), X)[1]
    np.testing.assert_allclose(aux["partition"], log_uniform_partition(5, -1.5), rtol=1e-6)


def mean_guide_gradient(loss_fn, num_replicates=400):
    def grad(r):
        return jax.grad(lambda p: loss_fn(p, r, X)[0])(PARAMS)["guide"]
    reps = jax.jit(jax.vmap(grad))(jax.random.split(jax.random.key(3), num_replicates))
    return {n: (np.asarray(v.mean(0)), np.asarray(v.std(0)) / np.sqrt(num_replicates)) for n, v in reps.items()}


def no_covariance_loss(num_samples):
    """Negative control: autodiff of the estimate at fixed z, without the sampling covariance."""
    frozen = je.Guide(sample=lambda phi, rng, x: jax.lax.stop_gradient(GUIDE.sample(phi, rng, x)),
                      log_prob=GUIDE.log_prob)

    def loss_fn(params, rng, x):
        return -jnp.mean(tvo_bound(je.log_weights(MODEL, frozen, params, rng, x, num_samples=num_samples),
                                   PARTITION)), {}
    return loss_fn


@pytest.mark.slow
def test_covariance_gradient_matches_the_closed_form_within_the_shrinking_bias():
    exact = jax.grad(lambda p: -jnp.mean(exact_tvo(p, PARTITION)))(PARAMS)["guide"]
    errs = {}
    for estimator, k in (("score", 4), ("score", 64), ("reparam", 64)):
        g = mean_guide_gradient(je.tvo(MODEL, GUIDE, num_samples=k, partition=PARTITION, estimator=estimator))
        errs[estimator, k] = max(float(np.max(np.abs(g[n][0] - exact[n]))) for n in exact)
        if k == 64:
            for n in exact:   # within the O(1/K) self-normalised bias plus 4 standard errors
                assert np.all(np.abs(g[n][0] - exact[n]) < 0.03 + 4 * g[n][1]), (estimator, n, g[n], exact[n])
    assert errs["score", 64] < errs["score", 4], errs
    print("tvo gradient max error", errs)
    # negative control: without the covariance term the gradient is wrong, by far more than that
    g = mean_guide_gradient(no_covariance_loss(64))
    worst = max(float(np.max(np.abs(g[n][0] - exact[n]) - 4 * g[n][1])) for n in exact)
    print("tvo no-covariance control: excess error", worst)
    assert worst > 0.2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="increase strictly from 0 to 1"):
        je.tvo(MODEL, GUIDE, num_samples=4, partition=[0.0, 0.5, 0.9])
    with pytest.raises(ValueError, match="increase strictly"):
        je.tvo(MODEL, GUIDE, num_samples=4, partition=[0.0, 0.6, 0.5, 1.0])
    with pytest.raises(ValueError, match="log_beta_min must be < 0"):
        je.tvo(MODEL, GUIDE, num_samples=4, log_beta_min=0.5)
    with pytest.raises(ValueError, match="integration"):
        je.tvo(MODEL, GUIDE, num_samples=4, integration="middle")
    with pytest.raises(ValueError, match="valid choices for tvo: score, reparam"):
        je.tvo(MODEL, GUIDE, num_samples=4, estimator="dreg")


# ------------------------------------------------------------------ moment-spacing schedule


@pytest.fixture(scope="module")
def toy_log_weights():
    return je.log_weights(MODEL, GUIDE, PARAMS, jax.random.key(11), X, num_samples=2000)


def test_moment_partition_spaces_the_moments_evenly(toy_log_weights):
    from jaxelbo.thermodynamic import moment_partition, tvo_moments

    lw = toy_log_weights
    s = 6
    part = np.asarray(jax.jit(moment_partition, static_argnums=1)(lw, s))
    assert part.shape == (s + 1,) and part[0] == 0.0 and part[-1] == 1.0
    assert np.all(np.diff(part) > 0)
    # on its own (self-normalised, batch-mean) curve the moments are evenly spaced
    eta = np.asarray(jnp.mean(tvo_moments(lw, part), axis=0))
    span = eta[-1] - eta[0]
    np.testing.assert_allclose(np.diff(eta), span / s, rtol=0, atol=1e-4 * abs(span))
    # negative control: the log-uniform schedule's moments are far from evenly spaced
    eta_lu = np.asarray(jnp.mean(tvo_moments(lw, log_uniform_partition(s, -1.0)), axis=0))
    assert np.max(np.abs(np.diff(eta_lu) - span / s)) > 0.05 * abs(span)  # 0.13 here
    # against the closed form E_{pi_beta}[log w~] (K = 2000): evenly spaced to a few percent
    exact = np.asarray(jnp.mean(_integrand(PARAMS, jnp.asarray(part)), axis=0))
    np.testing.assert_allclose(np.diff(exact), (exact[-1] - exact[0]) / s, rtol=0,
                               atol=0.05 * abs(exact[-1] - exact[0]))
    # and the closed-form sums over it still bracket log p(x)
    log_px = lg.log_marginal(PARAMS["model"], X)
    assert np.all(exact_tvo(PARAMS, part) <= log_px) and np.all(log_px <= exact_tvo(PARAMS, part, "right"))


def test_moment_partition_edge_cases():
    from jaxelbo.thermodynamic import moment_partition

    np.testing.assert_array_equal(moment_partition(jnp.zeros((2, 5)) - 1.0, 1), [0.0, 1.0])
    flat = moment_partition(jnp.full((2, 5), -3.0), 4)  # equal weights: eta is flat, points collapse
    assert flat[0] == 0.0 and flat[-1] == 1.0 and np.all(np.diff(flat) >= 0)
    with pytest.raises(ValueError, match="partition must be an array, None"):
        je.tvo(MODEL, GUIDE, num_samples=4, partition="linear")


@pytest.mark.parametrize("estimator", ["score", "reparam"])
def test_tvo_with_the_moments_schedule(estimator):
    """The loss recomputes the schedule from its own log-weights; its value and gradient are those of
    the same partition given explicitly (no gradient flows through the schedule)."""
    from jaxelbo.thermodynamic import moment_partition

    rng = jax.random.key(5)
    adaptive = je.tvo(MODEL, GUIDE, num_samples=16, partition="moments", num_partitions=5, estimator=estimator)
    (loss, aux), grad = jax.jit(jax.value_and_grad(adaptive, has_aux=True))(PARAMS, rng, X)
    part = aux["partition"]
    # float32 bisection, jitted inside the loss and eager here: equal to a few ulps
    np.testing.assert_allclose(part, moment_partition(aux["log_weights"], 5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["bound"], tvo_bound(aux["log_weights"], np.asarray(part)), rtol=1e-5)
    fixed = je.tvo(MODEL, GUIDE, num_samples=16, partition=np.asarray(part, np.float64), estimator=estimator)
    (loss_f, _), grad_f = jax.jit(jax.value_and_grad(fixed, has_aux=True))(PARAMS, rng, X)
    np.testing.assert_allclose(loss, loss_f, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad, grad_f)


@pytest.mark.parametrize("estimator,integration", [("score", "left"), ("score", "right"), ("reparam", "left")])
def test_x_gradient_is_the_derivative_of_the_value(estimator, integration):
    """jax.grad in x equals a central finite difference of the loss on the same key (float64):
    the covariance gradient's score term reaches phi only, never x. (Before the score term
    went through the shared routing, tvo/score's x-gradient was 0.64 off, relatively.)"""
    with jax.enable_x64(True):
        params, x = toy.to_float64(PARAMS), toy.to_float64(X)
        f = je.tvo(MODEL, GUIDE, num_samples=8, partition=PARTITION, integration=integration, estimator=estimator)
        toy.assert_x_gradient_is_the_fd(jax.jit(lambda xx: f(params, jax.random.key(3), xx)[0]), x)
