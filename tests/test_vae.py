"""Tests of the Burda et al. (2016) VAE in jaxelbo.models.vae."""

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo.models import vae

D, DZ = 12, 3


@pytest.fixture(scope="module")
def net():
    return vae.build(jax.random.key(0), D, hidden=(16, 8), latent_dim=DZ)


def test_param_shapes_and_mirrored_decoder(net):
    shapes = jax.tree.map(jnp.shape, net.params)
    enc, dec = shapes["guide"]["net"], shapes["model"]["net"]
    assert enc["hidden0"]["kernel"] == (D, 16) and enc["hidden1"]["kernel"] == (16, 8)
    assert enc["out"]["kernel"] == (8, 2 * DZ)
    assert dec["hidden0"]["kernel"] == (DZ, 8) and dec["hidden1"]["kernel"] == (8, 16)
    assert dec["out"]["kernel"] == (16, D)
    assert net.config == {"data_dim": D, "hidden": [16, 8], "latent_dim": DZ}


def test_default_is_burda_architecture():
    model, guide, params = vae.make(jax.random.key(0), 784)
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes["guide"]["net"]["hidden0"]["kernel"] == (784, 200)
    assert shapes["guide"]["net"]["out"]["kernel"] == (200, 100)
    assert shapes["model"]["net"]["hidden0"]["kernel"] == (50, 200)
    assert isinstance(model, je.Model) and isinstance(guide, je.Guide)


def test_output_bias_is_logit_of_data_mean():
    x = np.random.default_rng(0).random((50, D)).astype(np.float32)
    bias = vae.data_mean_logits(x)
    _, _, params = vae.make(jax.random.key(0), D, hidden=(4,), latent_dim=2, output_bias=bias)
    np.testing.assert_allclose(jax.nn.sigmoid(params["model"]["net"]["out"]["bias"]), x.mean(0), rtol=1e-5)
    with pytest.raises(ValueError, match="output_bias"):
        vae.make(jax.random.key(0), D, output_bias=jnp.zeros(D + 1))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="positive"):
        vae.make(jax.random.key(0), D, latent_dim=0)


def test_per_example_densities_match_hand_formulas(net):
    x = (jnp.arange(D) % 2).astype(jnp.float32)
    z = jnp.array([0.3, -1.2, 0.5])
    theta, phi = net.params["model"], net.params["guide"]
    chex.assert_shape(net.model.log_prior(theta, z), ())
    np.testing.assert_allclose(net.model.log_prior(theta, z),
                               -0.5 * jnp.sum(z**2) - 1.5 * math.log(2 * math.pi), rtol=1e-6)
    p = net.decode(theta, z)
    expected = jnp.sum(x * jnp.log(p) + (1 - x) * jnp.log1p(-p))
    np.testing.assert_allclose(net.model.log_likelihood(theta, x, z), expected, rtol=1e-5)
    mean, std = net.encode(phi, x)
    expected_q = jnp.sum(-0.5 * ((z - mean) / std) ** 2 - jnp.log(std) - 0.5 * math.log(2 * math.pi))
    np.testing.assert_allclose(net.guide.log_prob(phi, x, z), expected_q, rtol=1e-5)


def test_sample_is_reparameterised(net):
    x = jnp.linspace(0, 1, D)
    phi = net.params["guide"]
    key = jax.random.key(3)
    mean, std = net.encode(phi, x)
    z = net.guide.sample(phi, key, x)
    np.testing.assert_allclose(z, mean + std * jax.random.normal(key, (DZ,)), rtol=1e-6)
    # the path derivative dz/dmean-bias exists (z is a differentiable function of phi)
    g = jax.grad(lambda p: net.guide.sample(p, key, x).sum())(phi)
    np.testing.assert_allclose(g["net"]["out"]["bias"][:DZ], jnp.ones(DZ))


def test_samples_have_the_guide_moments(net):
    x = jnp.linspace(0, 1, D)
    phi = net.params["guide"]
    keys = jax.random.split(jax.random.key(4), 20000)
    z = jax.vmap(net.guide.sample, in_axes=(None, 0, None))(phi, keys, x)
    mean, std = net.encode(phi, x)
    se = std / math.sqrt(len(keys))
    assert jnp.all(jnp.abs(z.mean(0) - mean) < 5 * se)
    assert jnp.all(jnp.abs(z.std(0) / std - 1) < 0.05)


def test_encoder_runs_once_per_example_under_the_sample_vmap(net):
    """With x unbatched on the sample axis, the first encoder layer is a (B, width) matmul."""
    B, K = 5, 7
    x = jnp.zeros((B, D))
    jaxpr = jax.make_jaxpr(lambda p: je.log_weights(net.model, net.guide, p, jax.random.key(0), x,
                                                     num_samples=K))(net.params)

    def eqns(jx):  # the equations of jx and of the jaxprs nested in them (custom_jvp bodies)
        for e in jx.eqns:
            yield e
            for v in e.params.values():
                if isinstance(v, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    yield from eqns(getattr(v, "jaxpr", v))

    dots = [str(e.outvars[0].aval.shape) for e in eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert {f"({B}, 16)", f"({B}, 8)", f"({B}, {2 * DZ})"} <= set(dots)  # encoder: once per example
    per_sample = [d for d in dots if d.startswith(f"({B}, {K},")]
    assert sorted(per_sample) == sorted([f"({B}, {K}, 8)", f"({B}, {K}, 16)", f"({B}, {K}, {D})"])  # decoder


def test_iwae_bound_on_the_vae(net):
    x = (jax.random.uniform(jax.random.key(1), (4, D)) < 0.5).astype(jnp.float32)
    loss_fn = je.iwae(net.model, net.guide, num_samples=16, estimator="dreg")
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(net.params, jax.random.key(2), x)
    chex.assert_shape(aux["bound"], (4,))
    chex.assert_tree_all_finite(grads)
    np.testing.assert_allclose(loss, -aux["bound"].mean(), rtol=1e-6)


@pytest.mark.slow  # 13 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_float64_params_flow():
    with jax.enable_x64(True):
        net64 = vae.build(jax.random.key(0), D, hidden=(4,), latent_dim=2, param_dtype=jnp.float64)
        x = jnp.ones(D, jnp.float64)
        z = net64.guide.sample(net64.params["guide"], jax.random.key(1), x)
        assert z.dtype == jnp.float64
        assert net64.model.log_likelihood(net64.params["model"], x, z).dtype == jnp.float64


def test_rebuild_has_the_same_structure(net):
    again = vae.rebuild(net.config)
    assert jax.tree.structure(again.params) == jax.tree.structure(net.params)


# --------------------------------------------------------------------------- two stochastic layers

DZ1, DZ2 = 4, 3


@pytest.fixture(scope="module")
def net2():
    return vae.build_two_layer(jax.random.key(0), D, hidden=((16, 8), (6,)), latent_dims=(DZ1, DZ2))


def _mlp(params, h):
    """Hand-written tanh MLP over flax's pure-dict params (kernel ``(in, out)``)."""
    layers = sorted(k for k in params if k.startswith("hidden"))
    for name in layers:
        h = jnp.tanh(h @ params[name]["kernel"] + params[name]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def _gauss(params, z, h):
    out = _mlp(params["net"], h)
    mean, log_std = out[: z.shape[-1]], out[z.shape[-1]:]
    return jnp.sum(-0.5 * ((z - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi))


def test_two_layer_shapes_mirror_burda_section_5():
    net = vae.build(jax.random.key(0), 784, stochastic_layers=2)
    shapes = jax.tree.map(jnp.shape, net.params)
    q1, q2 = shapes["guide"]["z1"]["net"], shapes["guide"]["z2"]["net"]
    p1, px = shapes["model"]["z1"]["net"], shapes["model"]["x"]["net"]
    assert [q1[k]["kernel"] for k in ("hidden0", "hidden1", "out")] == [(784, 100), (100, 100), (100, 200)]
    assert [q2[k]["kernel"] for k in ("hidden0", "hidden1", "out")] == [(100, 50), (50, 50), (50, 100)]
    assert [p1[k]["kernel"] for k in ("hidden0", "hidden1", "out")] == [(50, 50), (50, 50), (50, 200)]
    assert [px[k]["kernel"] for k in ("hidden0", "hidden1")] == [(100, 100), (100, 100)]
    assert px["out"]["bias"] == (784,)
    assert net.config == {"data_dim": 784, "hidden": [[100, 100], [50, 50]], "latent_dim": [100, 50],
                          "stochastic_layers": 2}
    again = vae.rebuild(net.config)
    assert jax.tree.structure(again.params) == jax.tree.structure(net.params)


def test_two_layer_bad_arguments_raise():
    with pytest.raises(ValueError, match="stochastic_layers must be 1 or 2"):
        vae.build(jax.random.key(0), D, stochastic_layers=3)
    with pytest.raises(ValueError, match="build_two_layer"):
        vae.build(jax.random.key(0), D, hidden=(8,), stochastic_layers=2)
    with pytest.raises(ValueError, match="one entry per stochastic layer"):
        vae.build_two_layer(jax.random.key(0), D, latent_dims=(3,))


def test_two_layer_densities_match_hand_formulas(net2):
    x = (jnp.arange(D) % 2).astype(jnp.float32)
    z1, z2 = jnp.array([0.3, -1.2, 0.5, 0.1]), jnp.array([0.7, -0.2, 1.1])
    theta, phi = net2.params["model"], net2.params["guide"]
    log_p_z2 = -0.5 * jnp.sum(z2**2) - 1.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(net2.model.log_prior(theta, (z1, z2)), log_p_z2 + _gauss(theta["z1"], z1, z2),
                               rtol=1e-5)
    logits = _mlp(theta["x"]["net"], z1)
    expected = jnp.sum(x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits))
    np.testing.assert_allclose(net2.model.log_likelihood(theta, x, (z1, z2)), expected, rtol=1e-5)
    np.testing.assert_allclose(net2.guide.log_prob(phi, x, (z1, z2)),
                               _gauss(phi["z1"], z1, x) + _gauss(phi["z2"], z2, z1), rtol=1e-5)
    np.testing.assert_allclose(net2.decode(theta, z1), jax.nn.sigmoid(logits), rtol=1e-5)


def test_two_layer_samples_are_ancestral(net2):
    """z1 ~ q(z1|x); given each z1, (z2 - mu2(z1)) / sigma2(z1) is standard normal."""
    x = jnp.linspace(0, 1, D)
    phi = net2.params["guide"]
    z1, z2 = jax.vmap(net2.guide.sample, in_axes=(None, 0, None))(phi, jax.random.split(jax.random.key(4), 20000), x)
    chex.assert_shape((z1, z2), ((20000, DZ1), (20000, DZ2)))
    mean1, std1 = net2.encode(phi, x)
    assert jnp.all(jnp.abs(z1.mean(0) - mean1) < 5 * std1 / math.sqrt(20000))
    out = jax.vmap(lambda h: _mlp(phi["z2"]["net"], h))(z1)
    u = (z2 - out[:, :DZ2]) * jnp.exp(-out[:, DZ2:])
    assert jnp.all(jnp.abs(u.mean(0)) < 5 / math.sqrt(20000)) and jnp.all(jnp.abs(u.std(0) - 1) < 0.03)
    # z2 depends on the first layer's parameters through z1
    g = jax.grad(lambda p: net2.guide.sample(p, jax.random.key(5), x)[1].sum())(phi)
    assert float(jnp.abs(g["z1"]["net"]["out"]["bias"]).sum()) > 0


@pytest.mark.slow  # 22 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_two_layer_posterior_means_and_generate(net2):
    x = (jax.random.uniform(jax.random.key(6), (5, D)) < 0.5).astype(jnp.float32)
    phi = net2.params["guide"]
    m1, m2 = net2.posterior_means(phi, jax.random.key(7), x)
    np.testing.assert_allclose(m1, net2.encode(phi, x)[0], rtol=1e-6)
    # the second layer's estimate is unbiased for E_q[z2 | x]: average it over 100 keys and
    # compare with the mean of 20000 draws of z2
    m2s = jax.vmap(lambda k: net2.posterior_means(phi, k, x)[1])(jax.random.split(jax.random.key(10), 100))
    _, z2 = jax.vmap(jax.vmap(net2.guide.sample, in_axes=(None, 0, None)), in_axes=(None, None, 0))(
        phi, jax.random.split(jax.random.key(8), 20000), x)
    se = jnp.sqrt(z2.var(1) / 20000 + m2s.var(0) / 100)
    assert jnp.all(jnp.abs(m2s.mean(0) - z2.mean(1)) < 5 * se)
    assert jnp.all(jnp.abs(m2s.mean(0) - z2.mean(1) - 0.2) > 5 * se)  # negative control: it has power
    images = net2.generate(net2.params["model"], jax.random.key(9), 7)
    chex.assert_shape(images, (7, D))
    assert jnp.all((images > 0) & (images < 1))


@pytest.mark.slow  # 16 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_elbo_surgery_on_two_layers(net2):
    """The tuple latent flows through the aggregate-posterior computation of ELBO surgery."""
    x = (jax.random.uniform(jax.random.key(11), (6, D)) < 0.5).astype(jnp.float32)
    s = je.elbo_surgery(net2.model, net2.guide, net2.params, jax.random.key(12), x, num_samples=2, chunk_size=4)
    chex.assert_tree_all_finite(tuple(s))
    assert -1e-4 <= float(s.index_code_mi) <= math.log(6) + 1e-4
    np.testing.assert_allclose(s.avg_kl, s.index_code_mi + s.marginal_kl, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_every_objective_and_estimator_runs_on_two_layers(net2):
    """Each (objective, estimator) pair: value == -+mean bound (lower/upper), finite gradients shaped like params."""
    from jaxelbo import registry

    x = (jax.random.uniform(jax.random.key(1), (3, D)) < 0.5).astype(jnp.float32)
    losses = {(o, e): registry.make(o, net2.model, net2.guide, estimator=e, num_samples=4)
              for o, e in registry.pairs()}

    @jax.jit
    def all_pairs(params, rng):
        return {pair: jax.value_and_grad(fn, has_aux=True)(params, rng, x) for pair, fn in losses.items()}

    results = all_pairs(net2.params, jax.random.key(2))
    assert len(results) >= 20
    for pair, ((loss, aux), grads) in results.items():
        chex.assert_shape(aux["bound"], (3,))
        chex.assert_trees_all_equal_shapes(grads, net2.params)
        chex.assert_tree_all_finite((loss, grads))
        if pair[0] != "piwae":  # piwae's value is the MIWAE bound phi trains on
            sign = registry.loss_sign(pair[0])  # +1 for an upper bound (cubo), minimised
            np.testing.assert_allclose(loss, sign * aux["bound"].mean(), rtol=1e-5, err_msg=str(pair))
        assert float(jnp.abs(grads["guide"]["z2"]["net"]["out"]["bias"]).sum()) > 0, pair


@pytest.mark.slow
def test_two_layers_train_and_evaluate_from_the_command_line(tmp_path, capsys):
    """``--stochastic-layers 2`` is recorded in config.json, evaluated per layer and honoured by evaluate."""
    from jaxelbo.app.cli import main

    out = tmp_path / "run"
    common = ["train", "--stochastic-layers", "2", "--steps", "10", "--batch-size", "16", "--num-samples", "4",
              "--eval-num-samples", "50", "--eval-chunk-size", "25", "--eval-every", "0", "--eval-num-points", "100",
              "--no-surgery", "--checkpoint-every", "5", "--log-every", "5", "--no-progress", "--out", str(out)]
    assert main(common) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["stochastic_layers"] == 2 and config["vae"]["stochastic_layers"] == 2
    test = json.loads((out / "summary.json").read_text())["test"]
    assert len(test["active_units_per_layer"]) == 2 and sum(test["active_units_per_layer"]) == test["active_units"]
    assert 0 <= test["active_units_per_layer"][0] <= 100 and 0 <= test["active_units_per_layer"][1] <= 50
    assert test["num_points"] == 100 and all(np.isfinite(test[k]) for k in ("log_likelihood", "iwae_64", "elbo"))
    assert main(["evaluate", str(out), "--eval-num-samples", "50", "--eval-chunk-size", "25",
                 "--eval-num-points", "100", "--no-surgery", "--no-progress"]) == 0
    again = json.loads((out / "evaluation.json").read_text())["test"]
    assert again["active_units_per_layer"] == test["active_units_per_layer"]
    for key in ("log_likelihood", "iwae_64", "elbo"):  # the same restored params and keys
        np.testing.assert_allclose(again[key], test[key], rtol=1e-5, err_msg=key)
    assert main([*common, "--resume", "--stochastic-layers", "1"]) == 2
    assert "stochastic_layers" in capsys.readouterr().err
    assert main(["train", "--stochastic-layers", "2", "--hidden", "16", "--out", str(tmp_path / "x")]) == 2
    assert "--stochastic-layers 2" in capsys.readouterr().err


def test_decoder_output_with_transposed_kernel_equals_the_layer():
    """The CPU layout of the decoder's output product changes neither values nor gradients."""
    from flax import nnx

    layer = nnx.Linear(5, 7, rngs=nnx.Rngs(params=0))
    graph, state = nnx.split(layer)
    h = jax.random.normal(jax.random.key(1), (3, 4, 5))

    def out(fn, st, h):
        return jnp.sum(jnp.sin(jax.vmap(lambda hk: fn(nnx.merge(graph, st), hk))(h)))

    want, want_grad = jax.value_and_grad(out, argnums=(1, 2))(lambda m, v: m(v), state, h)
    got, got_grad = jax.jit(jax.value_and_grad(out, argnums=(1, 2)), static_argnums=0)(
        vae.dense_with_transposed_kernel, state, h)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    chex.assert_trees_all_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(state)) == {"kernel": (5, 7), "bias": (7,)}
