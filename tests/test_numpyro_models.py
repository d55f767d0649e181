"""NumPyro's own models through the bridge, written as NumPyro's repository writes them (issue 22, item 7).

- the VAE of NumPyro's ``examples/vae.py``: stax networks through ``numpyro.module``, a ``"batch"`` plate,
  ``hidden_dim`` and ``z_dim`` as static arguments;
- a Gaussian mixture with Bayesian globals (as ``test/contrib/test_funsor.py``): Dirichlet weights and Normal
  means outside the data plate, Categorical assignments inside it, through ``global_local_iwae``.

Eight schools, centred and non-centred, is in ``tests/test_numpyro.py``; the comparisons against NumPyro's SVI
(bound, step time) are in ``benchmarks/numpyro_models.py`` and notebook 06.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

numpyro = pytest.importorskip("numpyro")

import numpyro.distributions as dist  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402

import jaxelbo as je  # noqa: E402
from jaxelbo.numpyro import constrained_params, from_numpyro, global_local_iwae  # noqa: E402

# --------------------------------------------------------------------------------------
# The VAE of examples/vae.py: the benchmark's own model and guide (benchmarks/numpyro_models.py)
# --------------------------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from numpyro_models import vae_guide, vae_model  # noqa: E402

IMAGES = (jax.random.uniform(jax.random.key(3), (5, 2, 3)) > 0.5).astype(jnp.float32)   # 5 "images" of 2x3
HIDDEN, LATENT = 4, 2


@pytest.mark.slow  # ~5 s idle: two stax networks traced per data point, one jitted DReG gradient
def test_numpyros_vae_example_runs_through_its_batch_plate():
    args = (IMAGES, HIDDEN, LATENT)          # hidden_dim and z_dim are static: they stay Python ints
    m, g, params = from_numpyro(vae_model, vae_guide, jax.random.key(0), *args, data_plate="batch")
    assert sorted(params["model"]) == ["decoder$params"] and sorted(params["guide"]) == ["encoder$params"]
    assert isinstance(params["model"]["decoder$params"], list)     # stax's pytree: a list of tuples
    z = jax.vmap(lambda x, key: g.sample(params["guide"], key, x))(IMAGES, jax.random.split(jax.random.key(1), 5))
    assert z["z"].shape == (5, LATENT)
    # one log-weight per image, and their sum is NumPyro's own log-joint of the batch minus the guide's
    per_image = jax.vmap(lambda x, z: m.log_prior(params["model"], z) + m.log_likelihood(params["model"], x, z)
                         - g.log_prob(params["guide"], x, z))(IMAGES, z)
    values = {**constrained_params(params, vae_model, vae_guide, *args), **z}
    log_p, _ = log_density(vae_model, args, {}, values)
    log_q, _ = log_density(vae_guide, args, {}, values)
    np.testing.assert_allclose(jnp.sum(per_image), log_p - log_q, rtol=1e-5)
    # and it trains with IWAE-DReG: a finite gradient for every stax leaf, jitted
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: je.iwae(m, g, num_samples=3, estimator="dreg")(p, jax.random.key(2), IMAGES)[0]))(params)
    assert np.isfinite(loss) and jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["guide"]["encoder$params"][0][0]).max()) > 0   # the encoder's first layer learns


# --------------------------------------------------------------------------------------
# A Gaussian mixture with Bayesian globals
# --------------------------------------------------------------------------------------

DATA = jnp.array([-3.1, -2.5, 0.2, 2.4, 3.0, -0.4, 2.2])


def gmm(data):
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(3)))
    with numpyro.plate("components", 3):
        locs = numpyro.sample("locs", dist.Normal(0.0, 5.0))
    with numpyro.plate("data", data.shape[0]):
        assignment = numpyro.sample("assignment", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[assignment], 1.0), obs=data)


W_MEAN, LOCS_MEAN = jnp.array([0.3, 0.2, 0.5]), jnp.array([-2.8, 0.0, 2.5])


def global_guide(data, concentration=1e7, scale=1e-5):
    """A global guide all but a point mass at (W_MEAN, LOCS_MEAN) by default."""
    c = numpyro.param("concentration", concentration * W_MEAN, constraint=dist.constraints.positive)
    weights = numpyro.sample("weights", dist.Dirichlet(c))
    loc = numpyro.param("locs_loc", LOCS_MEAN)
    s = numpyro.param("locs_scale", jnp.full(3, scale), constraint=dist.constraints.positive)
    with numpyro.plate("components", 3):
        locs = numpyro.sample("locs", dist.Normal(loc, s))
    return weights, locs


def exact_local_guide(data):  # q(c_n | x_n, beta) = p(c_n | x_n, beta): each local IWAE is log p(x_n | beta)
    weights, locs = global_guide(data)
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("assignment", dist.Categorical(logits=jnp.log(weights) + dist.Normal(locs, 1.0).log_prob(
            data[:, None])))


def amortised_guide(data):  # an amortised classifier that ignores beta (uniform at its initial values)
    global_guide(data)
    a, b = numpyro.param("a", jnp.zeros(3)), numpyro.param("b", jnp.zeros(3))
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("assignment", dist.Categorical(logits=data[:, None] * a + b))


def marginal_log_lik(data):
    return jax.nn.logsumexp(jnp.log(W_MEAN) + dist.Normal(LOCS_MEAN, 1.0).log_prob(data[:, None]), axis=-1)


@pytest.mark.slow  # a few seconds idle: two global_local_iwae bounds compiled
def test_bayesian_mixture_local_bound_is_the_marginal_given_the_globals():
    lw = {}
    for name, guide in (("exact", exact_local_guide), ("amortised", amortised_guide)):
        loss_fn, params = global_local_iwae(gmm, guide, jax.random.key(0), DATA, data_plate="data", num_samples=4,
                                            num_global_samples=2, estimator="vimco")
        loss, aux = jax.jit(loss_fn)(params, jax.random.key(1), DATA)
        assert aux["log_weights"].shape == (len(DATA), 2, 4) and np.isfinite(loss)
        lw[name] = aux["log_weights"]
    # the exact conditional guide: every sample of c_n has the weight p(x_n | beta) p(beta)^(1/N), so the
    # weights are constant in k, and, beta being all but fixed, their differences across points are exact
    np.testing.assert_allclose(lw["exact"], jnp.broadcast_to(lw["exact"][..., :1], lw["exact"].shape), atol=1e-4)
    exact = marginal_log_lik(DATA)
    np.testing.assert_allclose(lw["exact"][:, :, 0] - lw["exact"][:1, :, 0],
                               jnp.broadcast_to((exact - exact[0])[:, None], (len(DATA), 2)), atol=3e-3)
    # control: a guide that is not the conditional gives weights that vary in k and miss the marginal
    assert float(jnp.max(jnp.std(lw["amortised"], axis=-1))) > 0.5
    assert float(jnp.max(jnp.abs(lw["amortised"][:, :, 0] - lw["amortised"][:1, :, 0]
                                 - (exact - exact[0])[:, None]))) > 0.5


@pytest.mark.slow  # a few seconds idle: 250 jitted VIMCO steps
def test_bayesian_mixture_trains_with_vimco_locals_to_the_clusters():
    import optax

    noise = 0.5 * jax.random.normal(jax.random.key(4), (100,))
    points = jnp.concatenate([jnp.full(60, -3.0), jnp.full(40, 2.5)]) + noise

    def start(data):
        global_guide(data, concentration=10.0, scale=0.3)

    def guide(data):
        start(data)
        a, b = numpyro.param("a", jnp.zeros(3)), numpyro.param("b", jnp.zeros(3))
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("assignment", dist.Categorical(logits=data[:, None] * a + b))

    loss_fn, params = global_local_iwae(gmm, guide, jax.random.key(0), points, data_plate="data", num_samples=8,
                                        estimator="vimco")
    optimizer = optax.adam(0.05)

    @jax.jit
    def step(state, i):
        p, opt_state = state
        grads = jax.grad(lambda p: loss_fn(p, jax.random.key(i), points)[0])(p)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(p, updates), opt_state

    bound = jax.jit(lambda p: jnp.mean(jnp.array([len(points) * loss_fn(p, jax.random.key(100 + s), points)[1][
        "bound"].mean() for s in range(8)])))
    before = float(bound(params))
    state = (params, optimizer.init(params))
    for i in range(250):
        state = step(state, i)
    values = constrained_params(state[0], gmm, guide, points)
    locs = np.sort(np.asarray(values["locs_loc"]))
    # the two clusters are found (the third component may sit anywhere with little weight)
    assert np.min(np.abs(locs - -3.0)) < 0.3 and np.min(np.abs(locs - 2.5)) < 0.3, locs
    assert float(bound(state[0])) > before + 20.0
