"""global_local_iwae with DISCRETE local latents whose guide depends on the globals.

mu ~ N(0, S0^2) global, z_n ~ Bernoulli(1/2) local, x_n | z_n, mu ~ N(mu + C z_n, 1); the
guide is q(mu) = N(m, s^2) and q(z_n | x_n, mu) = Bernoulli(logits = a mu + b x_n), so the
local guide depends on mu. With K = 3 local samples the expected bound is exact: the
locals are enumerated (8 draws per point) and mu is integrated by Gauss-Hermite quadrature.
The gradient of the global parameters (m, s) through mu needs the score term
``sum_k s_k dlog q(z_k | x, mu)/dmu`` of the local sites; without it the estimate is biased.
"""

import itertools
import math

import pytest

pytest.importorskip("numpyro")

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import jaxelbo as je
from jaxelbo.numpyro import global_local_iwae

S0, C, K = 2.0, 2.0, 3
X = jnp.array([0.5, 2.5, -0.5])
INIT = {"m": 0.3, "s": 0.5, "a": 1.5, "b": 0.5}


def model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, S0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(probs=0.5))
        numpyro.sample("x", dist.Normal(mu + C * z, 1.0), obs=x)


def guide(x, a_depends=True):
    m = numpyro.param("m", INIT["m"])
    s = numpyro.param("s", INIT["s"], constraint=dist.constraints.positive)
    mu = numpyro.sample("mu", dist.Normal(m, s))
    a = numpyro.param("a", INIT["a"])
    b = numpyro.param("b", INIT["b"])
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Bernoulli(logits=(a * mu if a_depends else a) + b * x))


def expected_loss(u: dict, x: jax.Array) -> jax.Array:
    """``-E[bound] / N``, the expected loss of the full batch, exact (enumeration and quadrature)."""
    m, s, a, b = u["m"], jnp.exp(u["s"]), u["a"], u["b"]
    t, w = np.polynomial.hermite_e.hermegauss(60)
    mu = m + s * jnp.asarray(t)                                   # (Q,)
    w = jnp.asarray(w) / math.sqrt(2 * math.pi)
    global_term = dist.Normal(0.0, S0).log_prob(mu) - dist.Normal(m, s).log_prob(mu)
    logits = a * mu[:, None] + b * x[None, :]                    # (Q, N)
    draws = jnp.array(list(itertools.product([0.0, 1.0], repeat=K)))   # (2^K, K): every local draw

    def local(z):  # z: (K,) values for every point -> (Q, N) probability and log mean weight
        log_q = z * jax.nn.log_sigmoid(logits)[..., None] + (1 - z) * jax.nn.log_sigmoid(-logits)[..., None]
        log_w = math.log(0.5) + dist.Normal(mu[:, None, None] + C * z, 1.0).log_prob(x[None, :, None]) - log_q
        return jnp.exp(jnp.sum(log_q, axis=-1)), jax.nn.logsumexp(log_w, axis=-1) - math.log(K)

    probs, bounds = jax.vmap(local)(draws)                       # (2^K, Q, N)
    local_term = jnp.sum(probs * bounds, axis=0).sum(axis=-1)    # (Q,)
    return -jnp.sum(w * (global_term + local_term)) / x.shape[0]


def replicates(estimator: str, num_replicates: int = 4000) -> tuple[dict, dict]:
    loss_fn, params = global_local_iwae(model, guide, jax.random.key(0), X, data_plate="data", num_samples=K,
                                        estimator=estimator)
    reps = jax.jit(lambda p: je.gradient_replicates(loss_fn, p, jax.random.key(3), X,
                                                    num_replicates=num_replicates))(params)["guide"]
    return reps, dict(params["guide"])


def z_scores(reps: dict, at: dict) -> dict:
    """``(mean - exact) / standard error`` per guide parameter, against the exact gradient at ``at``."""
    exact = jax.grad(expected_loss)(at, X)
    r = next(iter(reps.values())).shape[0]
    return {k: float((reps[k].mean() - exact[k]) / (reps[k].std() / math.sqrt(r))) for k in exact}


@pytest.mark.slow  # ~10 s cold: 4000 losses compiled
def test_expected_loss_is_the_bounds_mean():  # the exact reference is the loss's own expectation
    loss_fn, params = global_local_iwae(model, guide, jax.random.key(0), X, data_plate="data", num_samples=K,
                                        estimator="score")
    losses = jax.jit(jax.vmap(lambda key: loss_fn(params, key, X)[0]))(jax.random.split(jax.random.key(1), 4000))
    exact = expected_loss(dict(params["guide"]), X)
    assert abs(float(losses.mean() - exact)) < 5 * float(losses.std()) / math.sqrt(4000), (losses.mean(), exact)


@pytest.mark.slow  # ~5 s cold on a loaded 2-core CPU: 4000 replicates of a compiled gradient per estimator
@pytest.mark.parametrize("estimator", ["score", "vimco"])
def test_discrete_locals_depending_on_the_globals_get_an_unbiased_global_gradient(estimator):
    reps, point = replicates(estimator)
    z = z_scores(reps, point)
    assert max(abs(v) for v in z.values()) < 5.0, z            # m, s (through mu) and a, b
    # control: the same replicates against the exact gradient at a shifted point are rejected
    off = z_scores(reps, {**point, "m": point["m"] + 0.1})
    assert max(abs(v) for v in off.values()) > 5.0, off


@pytest.mark.slow  # a few seconds: two compiled gradients
def test_a_per_site_estimator_gives_the_globals_the_same_score_term():
    grads = []
    for estimator in ("vimco", {"continuous": "dreg", "discrete": "vimco"}):
        loss_fn, params = global_local_iwae(model, guide, jax.random.key(0), X, data_plate="data", num_samples=K,
                                            estimator=estimator)
        grads.append(jax.jit(jax.grad(lambda p, f=loss_fn: f(p, jax.random.key(5), X)[0]))(params)["guide"])
    for name in INIT:
        np.testing.assert_allclose(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["ovis", "ovis-mc"])
def test_discrete_locals_refuse_an_estimator_without_the_globals_score_term(estimator):
    with pytest.raises(ValueError, match=r"discrete local sites \['z'\] supports the local estimators 'score' and "
                                         rf"'vimco'.*not '{estimator}'"):
        global_local_iwae(model, guide, jax.random.key(0), X, data_plate="data", num_samples=K, estimator=estimator)
