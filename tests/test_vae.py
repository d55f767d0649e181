"""Tests of the Burda et al. (2016) VAE in jaxelbo.models.vae."""

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
    dots = [str(e.outvars[0].aval.shape) for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
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
