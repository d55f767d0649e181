"""The VAE's softplus equals jax.nn.softplus (values and gradient) to float rounding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _dense_inputs():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.random(size=784) < 0.4, jnp.float32)
    h = jnp.tanh(jnp.asarray(rng.normal(size=(5, 200)), jnp.float32))
    kernel = jnp.asarray(rng.normal(size=(200, 784)) / 4, jnp.float32)
    bias = jnp.asarray(rng.normal(size=784), jnp.float32)
    return x, h, kernel, bias


def test_bernoulli_dense_log_prob_values_jitted_and_eager():
    """The forward-only form (bias inside the softplus reduction) equals the logits form."""
    x, h, kernel, bias = _dense_inputs()
    want = vae.bernoulli_log_prob(x, h @ kernel + bias)
    for fn in (vae.bernoulli_dense_log_prob, jax.jit(vae.bernoulli_dense_log_prob)):
        np.testing.assert_allclose(fn(x, h, kernel, bias), want, rtol=2e-6)
    # negative control: dropping the x . bias term is caught at this tolerance
    y = h @ kernel
    wrong = jnp.einsum("d,nd->n", x, y) - jnp.sum(vae.softplus(y + bias), axis=-1)
    assert not np.allclose(wrong, want, rtol=2e-6)


def test_bernoulli_dense_log_prob_derivative_is_the_training_form():
    """Differentiated, it is the derivative of the reference (transposed-kernel) form."""
    x, h, kernel, bias = _dense_inputs()

    def total(fn, *args):
        return jnp.sum(jnp.sin(fn(*args) / 100))

    argnums = (0, 1, 2, 3)
    got = jax.jit(jax.grad(lambda *a: total(vae.bernoulli_dense_log_prob, *a), argnums=argnums))(x, h, kernel, bias)
    ref = jax.jit(jax.grad(lambda *a: total(vae._bernoulli_dense_reference, *a), argnums=argnums))(x, h, kernel, bias)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    plain = jax.grad(lambda *a: total(lambda x, h, k, b: vae.bernoulli_log_prob(x, h @ k + b), *a),
                     argnums=argnums)(x, h, kernel, bias)
    for a, b in zip(got, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_vae_log_likelihood_uses_the_dense_form():
    """The VAE's log p(x | z) equals the Bernoulli log-likelihood of its decoder's logits."""
    from jaxelbo.models import vae as v

    net = v.build(jax.random.key(0), 784)
    x = jnp.asarray(np.random.default_rng(2).random(784) < 0.5, jnp.float32)
    z = jax.random.normal(jax.random.key(3), (6, 50))
    logits = jax.vmap(lambda zz: v.bernoulli_log_prob(x, jnp.log(net.decode(net.params["model"], zz))
                                                      - jnp.log1p(-net.decode(net.params["model"], zz))))(z)
    got = jax.vmap(lambda zz: net.model.log_likelihood(net.params["model"], x, zz))(z)
    np.testing.assert_allclose(got, logits, rtol=1e-4)


@pytest.mark.parametrize("stochastic_layers", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: over 5 s
def test_numpy_data_closed_over_by_jit_reaches_the_fused_output_layer(stochastic_layers):
    """A NumPy data set that ``jax.jit`` closes over (notebook 01's ``je.elbo_surgery``) reaches the
    fused output layer's custom_jvp through vmap; it used to fail with "non-canonical constant"."""
    import jaxelbo as je

    if stochastic_layers == 2:   # Burda et al.'s two-layer VAE, at toy widths (the same code path)
        net = vae.build_two_layer(jax.random.key(0), 16, hidden=((8,), (4,)), latent_dims=(3, 2),
                                  posterior_mean_samples=2)
    else:
        net = vae.build(jax.random.key(0), 16, hidden=(8,), latent_dim=2)
    x = (np.random.default_rng(0).random((6, 16)) > 0.5).astype(np.float32)
    rng = jax.random.key(1)
    for fn in (lambda p, xx: je.elbo_surgery(net.model, net.guide, p, rng, xx).elbo,
               lambda p, xx: je.log_likelihood(net.model, net.guide, p, rng, xx, num_samples=4).sum(),
               lambda p, xx: je.iwae(net.model, net.guide, num_samples=3)(p, rng, xx)[0]):
        closed_over = jax.jit(lambda p, fn=fn: fn(p, x))(net.params)     # x a NumPy constant of the program
        passed = jax.jit(fn)(net.params, jnp.asarray(x))                  # x an argument: the reference
        np.testing.assert_allclose(closed_over, passed, rtol=1e-5)


def test_bernoulli_dense_log_prob_takes_numpy_arrays_closed_over_and_vmapped():
    """The public fused layer itself accepts NumPy arguments that ``jax.jit`` closed over and
    ``vmap`` maps over (the rebinding lives in it, not only in ``decoder_log_prob``); the bare
    custom_jvp refuses them ("non-canonical constant"). Values and derivatives are those of
    the eager call."""
    r = np.random.default_rng(3)
    x = (r.random((5, 7)) > 0.5).astype(np.float32)
    h = r.normal(size=(4, 3)).astype(np.float32)
    kernel = r.normal(size=(3, 7)).astype(np.float32)
    bias = r.normal(size=(7,)).astype(np.float32)

    def over_x(b):
        return jax.vmap(lambda xx: vae.bernoulli_dense_log_prob(xx, h, kernel, b))(x).sum()

    def over_kernel():
        return jax.vmap(lambda kk: vae.bernoulli_dense_log_prob(x[0], h, kk, bias))(np.stack([kernel, -kernel]))

    for fn, args in ((over_x, (bias,)), (jax.value_and_grad(over_x), (bias,)), (over_kernel, ())):
        chex.assert_trees_all_close(jax.jit(fn)(*args), fn(*args), rtol=1e-5, atol=1e-6)
    want = vae._bernoulli_dense_reference(jnp.asarray(x), jnp.asarray(h)[:, None], jnp.asarray(kernel),
                                          jnp.asarray(bias))
    np.testing.assert_allclose(jax.jit(over_x)(bias), want.sum(), rtol=1e-5)
    with pytest.raises(Exception, match="non-canonical"):  # the control: the bare custom_jvp
        jax.jit(lambda: jax.vmap(lambda xx: vae._bernoulli_dense_log_prob(xx, jnp.asarray(h), kernel, bias))(x))()
