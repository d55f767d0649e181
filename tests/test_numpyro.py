"""The NumPyro bridge, checked against closed forms and against NumPyro's own ELBO estimators."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

numpyro = pytest.importorskip("numpyro")

import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import RenyiELBO, Trace_ELBO, init_to_value  # noqa: E402
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402

import jaxelbo as je  # noqa: E402
from jaxelbo.numpyro import constrained_params, from_numpyro, unconstrained_params  # noqa: E402

D = 2
MU = jnp.array([0.3, -0.5])
X = jnp.array([[1.0, 0.5], [-0.4, 2.0], [0.0, 0.0], [2.5, -1.0], [0.7, 0.1], [-1.2, -0.3]])


def normal_logpdf(v, mean, var):
    return -0.5 * jnp.sum(jnp.log(2 * jnp.pi * var) + (v - mean) ** 2 / var)


# The conjugate Gaussian model of one example: z ~ N(mu, I), x | z ~ N(z, I); p(x) = N(mu, 2I).
def model(x):
    mu = numpyro.param("mu", MU)
    z = numpyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
    numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def guide(x, a=0.5, b=MU / 2, s=None):  # the exact posterior by default: N(x/2 + mu/2, I/2)
    a = numpyro.param("a", a)
    b = numpyro.param("b", b)
    s = numpyro.param("s", math.sqrt(0.5) if s is None else s, constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(a * x + b, s).to_event(1))


def off_guide(x):  # not the posterior: b off by 0.8, scale 1 instead of sqrt(1/2)
    guide(x, b=MU / 2 + 0.8, s=1.0)


# The same model over a batch, in one NumPyro program with a plate (what NumPyro's own ELBOs take).
def batch_model(xs):
    mu = numpyro.param("mu", MU)
    with numpyro.plate("data", xs.shape[0]):
        z = numpyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=xs)


def batch_off_guide(xs):
    a = numpyro.param("a", 0.5)
    b = numpyro.param("b", MU / 2 + 0.8)
    s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
    with numpyro.plate("data", xs.shape[0]):
        numpyro.sample("z", dist.Normal(a * xs + b, s).to_event(1))


def z_score(a: np.ndarray, b: np.ndarray) -> float:
    """(mean a - mean b) / its standard error, for independent replicates."""
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    return float((a.mean() - b.mean()) / se)


def test_sites_map_to_log_prior_log_likelihood_and_log_prob():
    m, g, params = from_numpyro(model, guide, jax.random.key(0), X[0])
    assert sorted(params["model"]) == ["mu"] and sorted(params["guide"]) == ["a", "b", "s"]
    # the positive parameter travels unconstrained: biject_to(positive) is exp
    np.testing.assert_allclose(params["guide"]["s"], math.log(math.sqrt(0.5)), rtol=1e-6)
    z = g.sample(params["guide"], jax.random.key(1), X[1])
    assert set(z) == {"z"} and z["z"].shape == (D,)
    theta, phi = params["model"], params["guide"]
    np.testing.assert_allclose(m.log_prior(theta, z), normal_logpdf(z["z"], MU, 1.0), rtol=1e-6)
    np.testing.assert_allclose(m.log_likelihood(theta, X[1], z), normal_logpdf(X[1], z["z"], 1.0), rtol=1e-6)
    np.testing.assert_allclose(g.log_prob(phi, X[1], z), normal_logpdf(z["z"], 0.5 * X[1] + MU / 2, 0.5),
                               rtol=1e-6)
    flat = constrained_params(params, model, guide, X[0])
    np.testing.assert_allclose(flat["s"], math.sqrt(0.5), rtol=1e-6)
    np.testing.assert_allclose(flat["mu"], MU)
    back = unconstrained_params({**flat, "s": 2.0}, model, guide, X[0])
    np.testing.assert_allclose(back["guide"]["s"], math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(back["model"]["mu"], MU)
    with pytest.raises(ValueError, match=r"no entry for the guide parameters \['a'\]"):
        unconstrained_params({k: v for k, v in flat.items() if k != "a"}, model, guide, X[0])


@pytest.mark.slow  # ~3 s: K = 5000 compiled
def test_log_likelihood_matches_the_closed_form():
    exact = jax.vmap(lambda x: normal_logpdf(x, MU, 2.0))(X)
    m, g, params = from_numpyro(model, guide, jax.random.key(0), X[0])
    # at the exact posterior every log-weight equals log p(x): IWAE is exact for any K
    ll = jax.jit(lambda p: je.log_likelihood(m, g, p, jax.random.key(1), X, num_samples=16))(params)
    np.testing.assert_allclose(ll, exact, rtol=1e-5, atol=1e-5)
    # with a guide off the posterior, K = 5000 brings IWAE within a few hundredths of a nat
    m, g, params = from_numpyro(model, off_guide, jax.random.key(0), X[0])
    ll = jax.jit(lambda p: je.log_likelihood(m, g, p, jax.random.key(1), X, num_samples=5000))(params)
    assert np.max(np.abs(ll - exact)) < 0.05, ll - exact


@pytest.mark.slow  # ~10 s: 1000 replicates of each loss, compiled
def test_iwae_averages_to_numpyro_renyi_elbo():
    """je.iwae's loss (times B) and NumPyro's RenyiELBO(alpha=0) loss estimate the same -sum_b E[IWAE_K]."""
    num_replicates, k = 1000, 8
    m, g, params = from_numpyro(model, off_guide, jax.random.key(0), X[0])
    param_map = constrained_params(params, model, off_guide, X[0])
    keys = jax.random.split(jax.random.key(2), num_replicates)
    loss_fn = je.iwae(m, g, num_samples=k, estimator="dreg")
    ours = jax.jit(jax.vmap(lambda r: loss_fn(params, r, X)[0] * X.shape[0]))(keys)

    def numpyro_losses(num_particles):
        elbo = RenyiELBO(alpha=0.0, num_particles=num_particles)
        return jax.jit(jax.vmap(lambda r: elbo.loss(r, param_map, batch_model, batch_off_guide, X)))(keys)

    theirs = numpyro_losses(k)
    assert abs(z_score(np.asarray(ours), np.asarray(theirs))) < 4.0
    # negative control: the same comparison detects IWAE_2 against IWAE_8
    assert abs(z_score(np.asarray(ours), np.asarray(numpyro_losses(2)))) > 8.0


def regression_data(num_points=20, num_features=3):
    kx, kw, kn = jax.random.split(jax.random.key(5), 3)
    xs = jax.random.normal(kx, (num_points, num_features))
    w = jax.random.normal(kw, (num_features,))
    return xs, xs @ w + 0.5 * jax.random.normal(kn, (num_points,))


def regression(xs, ys):  # global latents: the weights and the noise scale of a Bayesian regression
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([xs.shape[-1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    numpyro.sample("y", dist.Normal(xs @ w, sigma).to_event(1), obs=ys)


def regression_known_noise(xs, ys):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([xs.shape[-1]]).to_event(1))
    numpyro.sample("y", dist.Normal(xs @ w, 0.5).to_event(1), obs=ys)


@pytest.mark.slow  # ~5 s
def test_autonormal_elbo_matches_the_closed_form():
    """AutoNormal on a regression with known noise: the Gaussian ELBO is analytic."""
    xs, ys = regression_data()
    auto = AutoNormal(regression_known_noise)
    m, g, params = from_numpyro(regression_known_noise, auto, jax.random.key(0), xs, ys)
    assert sorted(params["guide"]) == ["w_auto_loc", "w_auto_scale"] and params["model"] == {}
    flat = constrained_params(params, regression_known_noise, auto, xs, ys)
    loc, scale = flat["w_auto_loc"], flat["w_auto_scale"]
    var_noise = 0.25
    exact = (jnp.sum(-0.5 * jnp.log(2 * jnp.pi * var_noise)
                     - ((ys - xs @ loc) ** 2 + (xs ** 2) @ scale ** 2) / (2 * var_noise))
             + jnp.sum(-0.5 * jnp.log(2 * jnp.pi) - (loc ** 2 + scale ** 2) / 2)
             + jnp.sum(0.5 * jnp.log(2 * jnp.pi * jnp.e * scale ** 2)))
    batch = (xs[None], ys[None])  # the whole data set is one example
    loss_fn = je.elbo(m, g, num_samples=20_000)
    loss, aux = jax.jit(loss_fn)(params, jax.random.key(3), batch)
    std_error = float(jnp.std(aux["log_weights"]) / math.sqrt(20_000))
    assert abs(float(-loss - exact)) < 4 * std_error, (float(-loss), float(exact), std_error)


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoDiagonalNormal])
def test_log_densities_equal_numpyros_own(autoguide):
    """Bridged log p(x, z) and log q(z|x) equal numpyro.infer.util.log_density on the same z.

    AutoNormal samples sigma > 0 through a transformed Normal, AutoDiagonalNormal through an
    auxiliary site and Delta sites carrying the log-Jacobian: both paths are scored.
    """
    xs, ys = regression_data()
    auto = autoguide(regression, init_scale=0.3)
    m, g, params = from_numpyro(regression, auto, jax.random.key(0), xs, ys)
    param_map = constrained_params(params, regression, auto, xs, ys)

    @jax.jit
    def both(rng):
        z = g.sample(params["guide"], rng, (xs, ys))
        ours = (g.log_prob(params["guide"], (xs, ys), z),
                m.log_prior(params["model"], z) + m.log_likelihood(params["model"], (xs, ys), z))
        theirs = (log_density(auto, (xs, ys), {}, {**param_map, **z})[0],
                  log_density(regression, (xs, ys), {}, z)[0])
        return z, ours, theirs

    for seed in range(3):
        z, ours, theirs = both(jax.random.key(seed))
        assert {"w", "sigma"} <= set(z) and float(z["sigma"]) > 0
        np.testing.assert_allclose(ours, theirs, rtol=1e-5)


@pytest.mark.slow  # ~8 s
def test_elbo_averages_to_numpyro_trace_elbo_with_a_constrained_latent():
    xs, ys = regression_data()
    w_ls = jnp.linalg.lstsq(xs, ys)[0]  # start near the posterior: a low-variance ELBO
    auto = AutoNormal(regression, init_scale=0.1, init_loc_fn=init_to_value(values={"w": w_ls, "sigma": 0.5}))
    m, g, params = from_numpyro(regression, auto, jax.random.key(0), xs, ys)
    param_map = constrained_params(params, regression, auto, xs, ys)
    num_replicates = 2000
    keys = jax.random.split(jax.random.key(4), num_replicates)
    loss_fn = je.elbo(m, g, num_samples=1)
    ours = np.asarray(jax.jit(jax.vmap(lambda r: loss_fn(params, r, (xs[None], ys[None]))[0]))(keys))

    def trace_elbo(param_map):
        return np.asarray(jax.jit(jax.vmap(lambda r: Trace_ELBO().loss(r, param_map, regression, auto, xs, ys)))(
            keys))

    assert abs(z_score(ours, trace_elbo(param_map))) < 4.0
    # negative control: a guide 1.5 times wider (about half a nat worse) is detected
    wider = {**param_map, "w_auto_scale": 1.5 * param_map["w_auto_scale"]}
    assert abs(z_score(ours, trace_elbo(wider))) > 8.0


@pytest.mark.slow  # ~15 s: 4000 paired replicates of two gradients, and a control
def test_dreg_and_reparam_gradients_agree_paired():
    m, g, params = from_numpyro(model, off_guide, jax.random.key(0), X[0])
    dreg = je.iwae(m, g, num_samples=8, estimator="dreg")
    reparam = je.iwae(m, g, num_samples=8, estimator="reparam")
    stl = je.iwae(m, g, num_samples=8, estimator="stl")
    same = jax.jit(lambda p: je.paired_bias_test(dreg, reparam, p, jax.random.key(6), X[:3],
                                                 num_replicates=4000))(params)
    assert float(same.max_abs_t) < 4.5, same.t
    # negative control: STL is biased for K > 1 and the same test sees it
    biased = jax.jit(lambda p: je.paired_bias_test(dreg, stl, p, jax.random.key(6), X[:3],
                                                   num_replicates=4000))(params)
    assert float(biased.max_abs_t) > 6.0, biased.t


@pytest.mark.slow  # ~8 s: five compiled gradients
def test_pytree_z_through_every_estimator():
    """z is a dict of sites: every IWAE estimator returns the same bound on the same key, finite gradients."""
    m, g, params = from_numpyro(model, off_guide, jax.random.key(0), X[0])
    values = {}
    for estimator in je.OBJECTIVES["iwae"]:
        loss_fn = je.iwae(m, g, num_samples=4, estimator=estimator)
        (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, jax.random.key(7), X)
        values[estimator] = float(loss)
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(grads))
        assert float(jnp.abs(grads["guide"]["b"]).sum()) > 0
    np.testing.assert_allclose(list(values.values()), values["reparam"], rtol=1e-5)


# A Gaussian mixture with a categorical (not reparameterisable) guide.
LOCS = jnp.array([-2.0, 0.0, 3.0])


def mixture(x):
    c = numpyro.sample("c", dist.Categorical(probs=jnp.ones(3) / 3))
    numpyro.sample("x", dist.Normal(LOCS[c], 1.0), obs=x)


def mixture_guide(x):
    w = numpyro.param("w", jnp.array([-0.5, 0.1, 0.4]))
    b = numpyro.param("b", jnp.array([0.2, 0.3, -0.1]))
    numpyro.sample("c", dist.Categorical(logits=w * x + b))


def test_pathwise_estimators_refuse_a_discrete_guide():
    m, g, params = from_numpyro(mixture, mixture_guide, jax.random.key(0), jnp.zeros(()))
    assert g.reparameterized == {"c": False}   # filled from has_rsample
    for estimator in ("reparam", "stl", "dreg"):
        loss_fn = je.iwae(m, g, num_samples=3, estimator=estimator)
        with pytest.raises(TypeError, match=r"declares z\['c'\] not reparameterised.*'score' or 'vimco'"):
            jax.eval_shape(loss_fn, params, jax.random.key(0), jnp.ones(4))   # at trace time


def test_discrete_guide_log_prob_normalises():
    m, g, params = from_numpyro(mixture, mixture_guide, jax.random.key(0), jnp.zeros(()))
    probs = [jnp.exp(g.log_prob(params["guide"], jnp.asarray(0.7), {"c": jnp.asarray(float(c))}))
             for c in range(3)]
    np.testing.assert_allclose(sum(probs), 1.0, rtol=1e-6)


@pytest.mark.slow  # ~10 s: 20,000 replicates of two score-function gradients
@pytest.mark.parametrize("estimator", ["vimco", "score"])
def test_score_estimators_on_a_discrete_guide_match_the_enumerated_gradient(estimator):
    """The expected IWAE_3 bound of one example is a sum over 3^3 latent configurations."""
    x, k = jnp.asarray([1.4]), 3
    m, g, params = from_numpyro(mixture, mixture_guide, jax.random.key(0), x[0])

    def expected_iwae(phi):  # written from the formulas, not from the bridge
        log_q = jax.nn.log_softmax(phi["w"] * x[0] + phi["b"])
        log_p = math.log(1 / 3) - 0.5 * math.log(2 * math.pi) - 0.5 * (x[0] - LOCS) ** 2
        total = 0.0
        for cs in itertools.product(range(3), repeat=k):
            cs = jnp.asarray(cs)
            log_w = log_p[cs] - log_q[cs]
            total = total + jnp.exp(jnp.sum(log_q[cs])) * (jax.nn.logsumexp(log_w) - math.log(k))
        return total

    exact = jax.grad(expected_iwae)(params["guide"])
    loss_fn = je.iwae(m, g, num_samples=k, estimator=estimator)
    reps = jax.jit(lambda p: je.gradient_replicates(loss_fn, p, jax.random.key(8), x, num_replicates=20_000))(
        params)["guide"]
    for name in ("w", "b"):
        mean, se = -reps[name].mean(0), reps[name].std(0) / math.sqrt(20_000)
        assert np.all(np.abs(mean - exact[name]) < 4.5 * se), (name, mean, exact[name], se)


def test_bad_input_fails_with_one_clear_line():
    with pytest.raises(ValueError, match="arguments of one example"):
        from_numpyro(model, guide, jax.random.key(0))

    def guide_without_z(x):
        numpyro.param("a", 0.5)

    with pytest.raises(ValueError, match=r"model latent sites \['z'\] have no site"):
        from_numpyro(model, guide_without_z, jax.random.key(0), X[0])

    def guide_sharing_mu(x):
        mu = numpyro.param("mu", MU)
        numpyro.sample("z", dist.Normal(mu, 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"names \['mu'\] appear in both"):
        from_numpyro(model, guide_sharing_mu, jax.random.key(0), X[0])
    m, g, params = from_numpyro(regression, AutoNormal(regression), jax.random.key(0), *regression_data())
    with pytest.raises(ValueError, match="must be a tuple of 2 batches"):
        je.elbo(m, g)(params, jax.random.key(0), jnp.ones((1, 20)))


def test_import_jaxelbo_does_not_import_numpyro():
    import subprocess
    import sys

    code = "import sys, jaxelbo; assert 'numpyro' not in sys.modules, 'numpyro imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------
# Real parameter pytrees (numpyro.module with stax) and what the bridge refuses
# --------------------------------------------------------------------------------------

VAE_D, VAE_L = 6, 2


def vae_encoder():
    from jax.example_libraries import stax

    return stax.serial(stax.Dense(5), stax.Softplus, stax.FanOut(2),
                       stax.parallel(stax.Dense(VAE_L), stax.serial(stax.Dense(VAE_L), stax.Exp)))


def vae_decoder():
    from jax.example_libraries import stax

    return stax.serial(stax.Dense(5), stax.Softplus, stax.Dense(VAE_D), stax.Sigmoid)


def vae_model(x):  # as NumPyro's examples/vae.py writes it, for one example
    decode = numpyro.module("decoder", vae_decoder(), (1, VAE_L))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([VAE_L]).to_event(1))
    numpyro.sample("x", dist.Bernoulli(decode(z)).to_event(1), obs=x)


def vae_guide(x):
    encode = numpyro.module("encoder", vae_encoder(), (1, VAE_D))
    loc, scale = encode(x)
    numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


@pytest.mark.slow  # a few seconds idle: two stax networks traced and differentiated
def test_numpyro_module_parameters_round_trip_and_train():
    x = (jnp.arange(VAE_D) % 2).astype(jnp.float32)
    m, g, params = from_numpyro(vae_model, vae_guide, jax.random.key(0), x)
    values = constrained_params(params, vae_model, vae_guide, x)
    assert isinstance(values["decoder$params"], list)   # stax's pytree: a list of tuples
    back = unconstrained_params(values, vae_model, vae_guide, x)
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params)
    assert jax.tree.all(chex_equal)
    loss, grads = jax.value_and_grad(lambda p: je.elbo(m, g, num_samples=2)(p, jax.random.key(1), x[None])[0])(
        params)
    assert np.isfinite(loss)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))


def test_a_plated_model_given_one_example_is_refused():
    def plated(x):  # written for a data set (N, D), handed x[0] of shape (D,)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
            numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def plated_guide(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(0.5 * x, 0.7).to_event(1))

    with pytest.raises(ValueError, match=r"'x' has shape \(2,\) but its distribution \(inside plates \['data'\]\) "
                                         r"has shape \(2, 2\): its log-density would be counted 2 times"):
        from_numpyro(plated, plated_guide, jax.random.key(0), X[0])


def test_a_guide_outside_the_priors_support_is_refused():
    def scale_model(x):
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        numpyro.sample("x", dist.Normal(0.0, s).expand([D]).to_event(1), obs=x)

    def normal_guide(x):
        numpyro.sample("s", dist.Normal(numpyro.param("loc", 1.0), 0.5))

    def lognormal_guide(x):
        numpyro.sample("s", dist.LogNormal(numpyro.param("loc", 0.0), 0.5))

    with pytest.raises(ValueError, match=r"guide site 's' has support Real\(\) but the model's HalfNormal site has "
                                         r"support Positive"):
        from_numpyro(scale_model, normal_guide, jax.random.key(0), X[0])
    from_numpyro(scale_model, lognormal_guide, jax.random.key(0), X[0])   # the same support: accepted
    from_numpyro(scale_model, AutoNormal(scale_model), jax.random.key(0), X[0])


def test_an_improper_prior_is_bridged():
    def improper(x):
        z = numpyro.sample("z", dist.ImproperUniform(dist.constraints.real, (), (D,)))
        numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def flat_guide(x):
        numpyro.sample("z", dist.Normal(x, 1.0).to_event(1))

    m, g, params = from_numpyro(improper, flat_guide, jax.random.key(0), X[0])
    z = {"z": jnp.array([0.1, 0.2])}
    np.testing.assert_allclose(m.log_prior(params["model"], z), 0.0)
    np.testing.assert_allclose(m.log_likelihood(params["model"], X[0], z),
                               normal_logpdf(X[0], z["z"], 1.0), rtol=1e-6)


# --------------------------------------------------------------------------------------
# Models written for the whole data set, with a data plate
# --------------------------------------------------------------------------------------


def subsampled_model(xs, batch_size=None):  # as NumPyro users write it: the plate subsamples the data
    mu = numpyro.param("mu", MU)
    with numpyro.plate("data", xs.shape[0], subsample_size=batch_size) as idx:
        z = numpyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=xs[idx])


def subsampled_guide(xs, batch_size=None):
    a = numpyro.param("a", 0.5)
    b = numpyro.param("b", MU / 2 + 0.8)
    s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
    with numpyro.plate("data", xs.shape[0], subsample_size=batch_size) as idx:
        numpyro.sample("z", dist.Normal(a * xs[idx] + b, s).to_event(1))


@pytest.mark.parametrize("plated", [(batch_model, batch_off_guide), (subsampled_model, subsampled_guide)],
                         ids=["plate", "subsample_size"])
@pytest.mark.slow  # a few seconds idle: four vmapped traces of a NumPyro program
def test_a_data_plate_gives_each_data_point_its_own_log_weight(plated):
    model_fn, guide_fn = plated
    args = (X,) if model_fn is batch_model else (X, 3)   # batch_size 3 is static: it stays a Python int
    m, g, params = from_numpyro(model_fn, guide_fn, jax.random.key(0), *args, data_plate="data")
    m1, g1, params1 = from_numpyro(model, off_guide, jax.random.key(0), X[0])   # the one-example model
    assert jax.tree.structure(params) == jax.tree.structure(params1)
    z = g.sample(params["guide"], jax.random.key(1), X[2])
    assert z["z"].shape == (D,)                         # one data point's value: the plate axis is gone
    lw = je.log_weights(m, g, params, jax.random.key(2), X, num_samples=3)
    lw1 = je.log_weights(m1, g1, params, jax.random.key(2), X, num_samples=3)
    np.testing.assert_allclose(lw, lw1, rtol=1e-6)      # unscaled: no N / B factor in a data point's weight
    # and their sum is NumPyro's own log-joint of the whole data set minus the guide's
    zs = {"z": X[::-1] * 0.3 + 0.1}
    values = constrained_params(params, batch_model, batch_off_guide, X)
    log_p, _ = log_density(batch_model, (X,), {}, {**values, **zs})
    log_q, _ = log_density(batch_off_guide, (X,), {}, {**values, **zs})
    per_point = jax.vmap(lambda x, z: m.log_prior(params["model"], z) + m.log_likelihood(params["model"], x, z)
                         - g.log_prob(params["guide"], x, z))(X, zs)
    np.testing.assert_allclose(jnp.sum(per_point), log_p - log_q, rtol=1e-6)


def schools_given_globals(J, sigma, y):  # eight schools with the globals as parameters: J stays static
    mu = numpyro.param("mu", 1.0)
    tau = numpyro.param("tau", 2.0, constraint=dist.constraints.positive)
    with numpyro.plate("J", J):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def schools_posterior(J, sigma, y):  # the exact posterior of theta_j given mu = 1, tau = 2
    prec = 1 / 4.0 + 1 / sigma**2
    with numpyro.plate("J", J):
        numpyro.sample("theta", dist.Normal((1.0 / 4.0 + y / sigma**2) / prec, jnp.sqrt(1 / prec)))


SIGMA = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
Y = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])


def test_static_arguments_stay_static_and_the_bound_is_exact():
    m, g, params = from_numpyro(schools_given_globals, schools_posterior, jax.random.key(0), 8, SIGMA, Y,
                                data_plate="J")
    loss, aux = jax.jit(je.iwae(m, g, num_samples=4, estimator="dreg"))(params, jax.random.key(1), (SIGMA, Y))
    exact = jax.scipy.stats.norm.logpdf(Y, 1.0, jnp.sqrt(4.0 + SIGMA**2))   # p(y_j) = N(mu, tau^2 + sigma_j^2)
    np.testing.assert_allclose(aux["bound"], exact, rtol=1e-5)
    np.testing.assert_allclose(aux["log_weights"], jnp.broadcast_to(exact[:, None], (8, 4)), rtol=1e-5)


def test_plate_mode_refuses_what_it_cannot_read_in_one_line():
    with pytest.raises(ValueError, match=r"no plate of that name \(its plates: \['data'\]\)"):
        from_numpyro(batch_model, batch_off_guide, jax.random.key(0), X, data_plate="batch")
    with pytest.raises(ValueError, match=r"subsamples plate 'data' \(size 6, subsample_size 3\): pass the whole "
                                         r"data set and data_plate='data'"):
        from_numpyro(subsampled_model, subsampled_guide, jax.random.key(0), X, 3)

    def global_mean(xs):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", xs.shape[0]):
            numpyro.sample("x", dist.Normal(mu, 1.0), obs=xs)

    with pytest.raises(ValueError, match=r"latent sites \['mu'\] lie outside the data plate 'data'"):
        from_numpyro(global_mean, AutoNormal(global_mean), jax.random.key(0), X[:, 0], data_plate="data")
    m, g, params = from_numpyro(batch_model, batch_off_guide, jax.random.key(0), X, data_plate="data")
    with pytest.raises(ValueError, match="lost an axis: x needs a leading batch axis B"):
        je.iwae(m, g, num_samples=2)(params, jax.random.key(0), X[0])
    with pytest.raises(ValueError, match=r"shapes \[\(3,\)\], but the data arguments' rows had shapes \[\(2,\)\]"):
        je.iwae(m, g, num_samples=2)(params, jax.random.key(0), jnp.ones((4, 3)))


# --------------------------------------------------------------------------------------
# Global and local latents: mu ~ N(0, S0^2), z_n | mu ~ N(mu, 1), x_n | z_n ~ N(z_n, 1)
# --------------------------------------------------------------------------------------

S0 = 2.0
XG = jnp.array([0.5, -1.0, 2.0, 1.5, 0.0, 3.0])
POST_PREC = 1 / S0**2 + len(XG) / 2            # p(mu | x) = N(sum(x) / 2 / prec, 1 / prec)
POST_MEAN = float(jnp.sum(XG) / 2 / POST_PREC)


def global_mean_model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, S0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(mu, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def global_mean_guide(x, m=POST_MEAN, s=POST_PREC**-0.5):  # exact locals given mu: N((mu + x_n)/2, 1/2)
    mu = numpyro.sample("mu", dist.Normal(numpyro.param("m", m),
                                          numpyro.param("s", s, constraint=dist.constraints.positive)))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal((mu + x) / 2, math.sqrt(0.5)))


def off_global_guide(x):
    global_mean_guide(x, m=0.3, s=0.5)


def log_evidence(x):  # x ~ N(0, 2 I + S0^2 11^T)
    cov = 2 * jnp.eye(len(x)) + S0**2
    return jax.scipy.stats.multivariate_normal.logpdf(x, jnp.zeros(len(x)), cov)


def global_elbo(m, s, x):  # E_q(mu)[log p(x, mu) - log q(mu)], with the locals integrated exactly
    e = jnp.sum(-0.5 * jnp.log(4 * jnp.pi) - ((x - m) ** 2 + s**2) / 4)
    e = e - 0.5 * jnp.log(2 * jnp.pi * S0**2) - (m**2 + s**2) / (2 * S0**2)
    return e + 0.5 * jnp.log(2 * jnp.pi * math.e * s**2)


@pytest.mark.slow  # a few seconds idle: two compiled bounds
def test_global_local_bound_is_exact_with_exact_guides():
    from jaxelbo.numpyro import global_local_iwae

    loss_fn, params = global_local_iwae(global_mean_model, global_mean_guide, jax.random.key(0), XG,
                                        data_plate="data", num_samples=3, num_global_samples=4)
    loss, aux = jax.jit(loss_fn)(params, jax.random.key(1), XG)
    np.testing.assert_allclose(len(XG) * jnp.mean(aux["bound"]), log_evidence(XG), rtol=1e-5)
    np.testing.assert_allclose(loss, -jnp.mean(aux["bound"]), rtol=1e-6)
    assert aux["log_weights"].shape == (len(XG), 4, 3)
    off_loss, off_params = global_local_iwae(global_mean_model, off_global_guide, jax.random.key(0), XG,
                                             data_plate="data", num_samples=3)
    _, off = jax.jit(off_loss)(off_params, jax.random.key(1), XG)
    assert len(XG) * jnp.mean(off["bound"]) < log_evidence(XG) - 0.1   # control: an off guide is below


@pytest.mark.slow  # a few seconds idle: 16 batches through one compiled bound
def test_global_local_bound_is_unbiased_under_subsampling():
    from jaxelbo.numpyro import global_local_iwae

    loss_fn, params = global_local_iwae(global_mean_model, off_global_guide, jax.random.key(0), XG,
                                        data_plate="data", num_samples=2, num_global_samples=3)
    run = jax.jit(lambda x: len(XG) * jnp.mean(loss_fn(params, jax.random.key(4), x)[1]["bound"]))
    subsets = [jnp.array(c) for c in itertools.combinations(range(len(XG)), 2)]
    # the same global draws (the key) for every subset; the locals are exact, so the mean over
    # all 15 batches of 2 equals the full-data estimate exactly
    np.testing.assert_allclose(np.mean([run(XG[c]) for c in subsets]), run(XG), rtol=1e-5)
    assert abs(float(run(XG[subsets[0]]) - run(XG))) > 0.1              # a single batch is not


@pytest.mark.slow  # ~5 s: 2000 replicates of two compiled gradients
@pytest.mark.parametrize("estimator", ["reparam", "dreg"])
def test_global_local_gradient_matches_the_exact_one(estimator):
    from jaxelbo.numpyro import global_local_iwae

    loss_fn, params = global_local_iwae(global_mean_model, off_global_guide, jax.random.key(0), XG,
                                        data_plate="data", num_samples=3, estimator=estimator)
    reps = jax.jit(lambda p: je.gradient_replicates(loss_fn, p, jax.random.key(2), XG, num_replicates=2000))(
        params)["guide"]
    def exact(m):
        return jax.grad(lambda m, u: -global_elbo(m, jnp.exp(u), XG) / len(XG), argnums=(0, 1))(m, jnp.log(0.5))
    for m, should_pass in ((0.3, True), (0.4, False)):                # 0.4: a control the test rejects
        z = [(reps[k].mean() - e) / (reps[k].std() / math.sqrt(2000)) for k, e in zip("ms", exact(m), strict=True)]
        assert (max(abs(float(v)) for v in z) < 5.0) == should_pass, (m, z)


# --------------------------------------------------------------------------------------
# Eight schools as NumPyro's README writes it: centred, and non-centred by TransformReparam
# --------------------------------------------------------------------------------------

SCHOOLS_Y = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("J", 8):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, SCHOOLS_SIGMA), obs=y)


def eight_schools_noncentered(y=None):
    from numpyro.infer.reparam import TransformReparam

    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("J", 8):
        with numpyro.handlers.reparam(config={"theta": TransformReparam()}):
            theta = numpyro.sample("theta", dist.TransformedDistribution(
                dist.Normal(0.0, 1.0), dist.transforms.AffineTransform(mu, tau)))
        numpyro.sample("obs", dist.Normal(theta, SCHOOLS_SIGMA), obs=y)


@pytest.mark.slow  # a few seconds: two models traced
@pytest.mark.parametrize("fn", [eight_schools, eight_schools_noncentered], ids=["centred", "non-centred"])
def test_eight_schools_log_weights_equal_numpyros_log_densities(fn):
    auto = AutoNormal(fn, init_scale=0.5)
    m, g, params = from_numpyro(fn, auto, jax.random.key(0), SCHOOLS_Y)
    param_map = constrained_params(params, fn, auto, SCHOOLS_Y)

    @jax.jit
    def both(rng):
        z = g.sample(params["guide"], rng, SCHOOLS_Y)
        ours = (g.log_prob(params["guide"], SCHOOLS_Y, z),
                m.log_prior(params["model"], z) + m.log_likelihood(params["model"], SCHOOLS_Y, z))
        theirs = (log_density(auto, (SCHOOLS_Y,), {}, {**param_map, **z})[0],
                  log_density(fn, (SCHOOLS_Y,), {}, z)[0])
        return ours, theirs

    for seed in range(2):
        ours, theirs = both(jax.random.key(seed))
        np.testing.assert_allclose(ours, theirs, rtol=1e-5)
