"""The VAE's softplus equals jax.nn.softplus (values and gradient) to float rounding."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxelbo.models import vae

LOGITS = jnp.concatenate([jnp.array([-1e4, -100.0, -30.0, -1e-8, 0.0, 1e-8, 30.0, 100.0, 1e4]),
                          jnp.linspace(-20.0, 20.0, 4001)])


def test_softplus_values_and_gradient():
    np.testing.assert_allclose(vae.softplus(LOGITS), jax.nn.softplus(LOGITS), rtol=2e-7, atol=0)
    grad = jax.vmap(jax.grad(vae.softplus))(LOGITS)
    np.testing.assert_allclose(grad, jax.nn.sigmoid(LOGITS), rtol=1e-6, atol=1e-30)
    assert float(jax.grad(vae.softplus)(0.0)) == 0.5
    # negative control: the naive log(1 + e^l) overflows where the test looks
    naive = jnp.log(1 + jnp.exp(LOGITS))
    assert not np.allclose(naive, jax.nn.softplus(LOGITS), rtol=2e-7, atol=0)


def test_softplus_special_values():
    special = jnp.array([-jnp.inf, jnp.inf, jnp.nan])
    np.testing.assert_array_equal(vae.softplus(special), jax.nn.softplus(special))


def test_bernoulli_log_prob_matches_the_textbook_form():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(7, 784)) * 4, jnp.float32)
    x = jnp.asarray(rng.random(size=784) < 0.3, jnp.float32)
    p = jax.nn.sigmoid(logits.astype(jnp.float64) if jax.config.jax_enable_x64 else logits)
    want = jnp.sum(x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits), axis=-1)
    np.testing.assert_allclose(vae.bernoulli_log_prob(x, logits), want, rtol=2e-6)
    del p
