"""Per-site estimators on a mixed guide: exact answers by enumeration and quadrature.

Model: d in {0, 1, 2} with p(d) = softmax(logits), c | d ~ N(mu_d, 1), x | c ~ N(c, 1).
Guide (d first): q(d | x) = softmax(a + b x), c | d, x ~ N(m_d + n_d x, s_d^2).

The expected IWAE_K bound is a sum over the 3^K joint discrete states of a K-dimensional
Gaussian integral over eps, done by Gauss-Hermite quadrature (smooth integrand; float64).
An estimator's expectation is the same sum of its gradient at each (d, eps) node: the
guide below reads its noise from a table (the sample key picks the row), so the loss is
evaluated at exactly that node. Unbiased estimators must match the gradient of the
expected bound to quadrature precision; ``stl`` (biased for K > 1) is the negative control.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je

C, K, NODES = 3, 2, 16
RNG = jax.random.key(0)
X = np.array([0.7])


def log_normal(x, mean, log_scale):
    return -0.5 * jnp.log(2 * jnp.pi) - log_scale - 0.5 * ((x - mean) / jnp.exp(log_scale)) ** 2


MODEL = je.Model(
    log_prior=lambda th, z: jax.nn.log_softmax(th["logits"])[z["d"]] + log_normal(z["c"], th["mu"][z["d"]], 0.0),
    log_likelihood=lambda th, x, z: log_normal(x[0], z["c"], 0.0),
)


def q_logits(phi, x):
    return phi["a"] + phi["b"] * x[0]


def q_mean(phi, x):
    return phi["m"] + phi["n"] * x[0]


def discrete_log_prob(phi, x, z):
    return jax.nn.log_softmax(q_logits(phi, x))[z["d"]]


def log_prob(phi, x, z):
    return discrete_log_prob(phi, x, z) + log_normal(z["c"], q_mean(phi, x)[z["d"]], phi["log_s"][z["d"]])


def random_sample(phi, rng, x):
    r1, r2 = jax.random.split(rng)
    d = jax.random.categorical(r1, q_logits(phi, x))
    return {"c": q_mean(phi, x)[d] + jnp.exp(phi["log_s"][d]) * jax.random.normal(r2), "d": d}


GUIDE = je.Guide(random_sample, log_prob, reparameterized={"c": True, "d": False},
                 discrete_log_prob=discrete_log_prob)


def params64():
    return {"model": {"logits": jnp.array([0.3, -0.2, 0.0]), "mu": jnp.array([-1.0, 0.5, 2.0])},
            "guide": {"a": jnp.array([0.2, 0.1, -0.4]), "b": jnp.array([-0.3, 0.2, 0.4]),
                      "m": jnp.array([-0.4, 0.6, 1.2]), "n": jnp.array([0.3, 0.2, 0.5]),
                      "log_s": jnp.array([-0.3, -0.1, -0.5])}}


def table_guide(noise):
    """The guide, with sample k's (d, eps) read from ``noise[k]`` (k found from the key)."""
    table = jax.random.key_data(jax.random.split(RNG, (1, K)))[0]

    def sample(phi, key, x):
        k = jnp.argmax(jnp.all(jax.random.key_data(key) == table, axis=-1))
        d = noise[k, 0].astype(jnp.int32)
        return {"c": q_mean(phi, x)[d] + jnp.exp(phi["log_s"][d]) * noise[k, 1], "d": d}

    return je.Guide(sample, log_prob, reparameterized={"c": True, "d": False}, discrete_log_prob=discrete_log_prob)


def nodes():
    """Every (d-state, eps-node) combination: noise (N, K, 2) and its weight under q (without phi's)."""
    eps, w = np.polynomial.hermite_e.hermegauss(NODES)
    w = w / np.sqrt(2 * np.pi)
    rows, weights = [], []
    for ds in itertools.product(range(C), repeat=K):
        for idx in itertools.product(range(NODES), repeat=K):
            rows.append([[d, eps[i]] for d, i in zip(ds, idx, strict=True)])
            weights.append((ds, np.prod(w[list(idx)])))
    return np.array(rows), weights


def log_weights_at(params, x, noise):
    """The K log-weights log p(x, z_k) - log q(z_k | x) at one node: noise[k] = (d_k, eps_k), c_k = mu_d + s_d eps_k."""
    phi, th = params["guide"], params["model"]
    d = noise[:, 0].astype(jnp.int32)
    c = q_mean(phi, x)[d] + jnp.exp(phi["log_s"][d]) * noise[:, 1]

    def one(ci, di):
        z = {"c": ci, "d": di}
        return MODEL.log_prior(th, z) + MODEL.log_likelihood(th, x, z) - log_prob(phi, x, z)

    return jax.vmap(one)(c, d)


def iwae_value(params, x, noise):
    """IWAE_K at one node, by hand (the reference for the loss value and x's gradient)."""
    return jax.nn.logsumexp(log_weights_at(params, x, noise)) - jnp.log(K)


def expected_iwae(params, noise, eps_weights, states):
    """E_q[IWAE_K]: the quadrature sum, differentiable in both params (q(d) weights included)."""
    log_qd = jax.nn.log_softmax(q_logits(params["guide"], X))
    prob = jnp.exp(jnp.sum(log_qd[states], axis=-1)) * eps_weights
    return jnp.sum(prob * jax.vmap(lambda nz: iwae_value(params, X, nz))(noise))


ESTIMATORS = {"dreg+vimco": {"continuous": "dreg", "discrete": "vimco"},
              "reparam+score": {"continuous": "reparam", "discrete": "score"},
              "stl+vimco": {"continuous": "stl", "discrete": "vimco"}}


@pytest.fixture(scope="module")
def exact():
    """The exact gradient and each estimator's expectation, both by enumeration x quadrature."""
    with jax.enable_x64(True):
        params = params64()
        noise, weights = nodes()
        states = jnp.array([ds for ds, _ in weights])
        eps_weights = jnp.array([w for _, w in weights])
        noise = jnp.asarray(noise)
        target = jax.grad(expected_iwae)(params, noise, eps_weights, states)
        log_qd = jax.nn.log_softmax(q_logits(params["guide"], X))
        prob = jnp.exp(jnp.sum(log_qd[states], axis=-1)) * eps_weights
        x = jnp.asarray(X)[None]

        def grads(nz):
            out = {}
            for label, estimator in ESTIMATORS.items():
                loss_fn = je.iwae(MODEL, table_guide(nz), num_samples=K, estimator=estimator)
                (loss, _), g = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)(params, RNG, x)
                out[label] = (loss, g)
            values, x_grads = jax.value_and_grad(lambda xx: iwae_value(params, xx, nz))(jnp.asarray(X))
            return out, values, x_grads

        per_node, values, x_grads = jax.jit(jax.vmap(grads))(noise)
        out = {label: (loss, jax.tree_util.tree_map(lambda g: jnp.tensordot(prob, g, axes=1), g_params), g_x)
               for label, (loss, (g_params, g_x)) in per_node.items()}
        return target, out, values, x_grads


def max_error(a, b):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("label", ["dreg+vimco", "reparam+score"])
def test_per_site_iwae_gradient_is_exact_by_enumeration(exact, label):
    target, out, values, x_grads = exact
    loss, mean, g_x = out[label]
    assert max_error(-loss, values) < 1e-10                     # the value is IWAE's at every node
    assert max_error(g_x[:, 0], -x_grads) < 1e-10              # x: the plain derivative of the value
    assert max_error(mean["model"], jax.tree_util.tree_map(lambda t: -t, target["model"])) < 1e-12
    err = max_error(mean["guide"], jax.tree_util.tree_map(lambda t: -t, target["guide"]))
    assert err < 1e-5, err    # quadrature error (dreg: 9e-4, 4e-5, 1e-6 with 6, 10, 16 nodes)


@pytest.mark.slow
def test_per_site_stl_is_biased_negative_control(exact):
    target, out, _, _ = exact
    _, mean, _ = out["stl+vimco"]
    err = max_error(mean["guide"], jax.tree_util.tree_map(lambda t: -t, target["guide"]))
    assert err > 1e-2, err    # the exact comparison above can fail: stl is biased for K > 1 (0.1 here)


# --------------------------------------------------------------------------------------
# Paired against the all-score estimator, on random noise (float32)
# --------------------------------------------------------------------------------------

R = 2000
XB = jnp.array([[0.7], [-0.4]], dtype=jnp.float32)


def params32():
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params64())


@pytest.fixture(scope="module")
def paired():
    params = params32()
    score = je.iwae(MODEL, GUIDE, num_samples=K, estimator="vimco")
    out = {}
    for label in ("dreg+vimco", "stl+vimco"):
        mixed = je.iwae(MODEL, GUIDE, num_samples=K, estimator=ESTIMATORS[label])
        out[label] = je.paired_bias_test(mixed, score, params, jax.random.key(1), XB, num_replicates=R)
    reps = {name: je.gradient_replicates(loss, params, jax.random.key(2), XB, num_replicates=R // 4)
            for name, loss in (("mixed", je.iwae(MODEL, GUIDE, num_samples=K, estimator=ESTIMATORS["dreg+vimco"])),
                               ("score", score))}
    return out, reps


@pytest.mark.slow
def test_per_site_agrees_with_all_score_paired(paired):
    tests, _ = paired
    assert tests["dreg+vimco"].max_abs_t < 5.0, tests["dreg+vimco"]


@pytest.mark.slow
def test_paired_negative_control_stl_is_caught(paired):
    tests, _ = paired
    assert tests["stl+vimco"].max_abs_t > 6.0, tests["stl+vimco"]


@pytest.mark.slow
def test_per_site_has_lower_variance_on_the_continuous_site(paired):
    _, reps = paired
    var = {name: jnp.var(r["guide"]["m"], axis=0) for name, r in reps.items()}
    assert bool(jnp.all(var["mixed"] < 0.5 * var["score"])), var


# --------------------------------------------------------------------------------------
# Through the NumPyro bridge: the declaration is filled from has_rsample
# --------------------------------------------------------------------------------------


def numpyro_pair():
    numpyro = pytest.importorskip("numpyro")
    dist = pytest.importorskip("numpyro.distributions")
    th = params64()["model"]

    def model(x):
        d = numpyro.sample("d", dist.Categorical(logits=th["logits"]))
        c = numpyro.sample("c", dist.Normal(th["mu"][d], 1.0))
        numpyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        phi = {k: numpyro.param(k, v) for k, v in params64()["guide"].items()}
        d = numpyro.sample("d", dist.Categorical(logits=q_logits(phi, x[None])))
        numpyro.sample("c", dist.Normal(q_mean(phi, x[None])[d], jnp.exp(phi["log_s"])[d]))

    from jaxelbo.numpyro import from_numpyro
    return from_numpyro(model, guide, jax.random.key(0), jnp.asarray(0.0))


@pytest.mark.slow
def test_bridge_declares_sites_and_matches_the_hand_written_guide():
    model, guide, params = numpyro_pair()
    assert guide.reparameterized == {"c": True, "d": False}
    hash(guide)                                   # the bridged guide stays hashable (jit static, lru_cache)
    phi = params["guide"]
    for d, c, x in ((0, -0.3, 0.7), (2, 1.1, -0.4)):
        z = {"c": jnp.asarray(c), "d": jnp.asarray(float(d))}
        zi = {"c": jnp.asarray(c), "d": jnp.asarray(d)}
        xx = jnp.asarray([x])
        np.testing.assert_allclose(guide.discrete_log_prob(phi, xx[0], z), discrete_log_prob(phi, xx, zi), rtol=1e-6)
        np.testing.assert_allclose(guide.log_prob(phi, xx[0], z), log_prob(phi, xx, zi), rtol=1e-6)


@pytest.mark.slow
def test_bridged_per_site_estimator_agrees_with_vimco_paired():
    model, guide, params = numpyro_pair()
    mixed = je.iwae(model, guide, num_samples=K, estimator={"continuous": "dreg", "discrete": "vimco"})
    score = je.iwae(model, guide, num_samples=K, estimator="vimco")
    test = je.paired_bias_test(mixed, score, params, jax.random.key(3), XB[:, 0], num_replicates=400)
    assert test.max_abs_t < 5.0, test
