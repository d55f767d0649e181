"""log_likelihood's chunking: chosen from the machine, and never changing the estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo import _chunking
from jaxelbo.diagnostics import _log_weight_block, log_likelihood_chunks
from jaxelbo.models import linear_gaussian as lg
from jaxelbo.models import vae

D, K = 16, 50


@pytest.fixture(scope="module")
def net():
    x = jax.random.bernoulli(jax.random.key(1), 0.4, (5, D)).astype(jnp.float32)
    model, guide, params = vae.make(jax.random.key(0), D, hidden=(8,), latent_dim=3)
    return model, guide, params, x


@pytest.mark.parametrize("chunk_size, points", [(None, None), (7, 2), (1, 3)])
def test_every_chunking_gives_the_same_estimate(net, chunk_size, points):
    model, guide, params, x = net
    auto = je.log_likelihood(model, guide, params, jax.random.key(2), x, num_samples=K)
    got = je.log_likelihood(model, guide, params, jax.random.key(2), x, num_samples=K, chunk_size=chunk_size,
                            points_per_chunk=points)
    np.testing.assert_allclose(got, auto, rtol=2e-6, atol=2e-6)
    # negative control: another key moves the estimate by far more than the tolerance
    other = je.log_likelihood(model, guide, params, jax.random.key(3), x, num_samples=K, chunk_size=chunk_size,
                              points_per_chunk=points)
    assert np.max(np.abs(other - auto)) > 1e-3


def test_one_point_alone_gets_the_same_estimate(net):
    # point b's draws depend on b and rng only, not on which chunk or group it lands in
    model, guide, params, x = net
    ll = je.log_likelihood(model, guide, params, jax.random.key(2), x, num_samples=K, chunk_size=9,
                           points_per_chunk=2)
    assert ll.shape == (5,)
    jitted = jax.jit(lambda p: je.log_likelihood(model, guide, p, jax.random.key(2), x, num_samples=K))(params)
    np.testing.assert_allclose(jitted, ll, rtol=2e-6, atol=2e-6)


def _log_likelihood_bytes_per_row(model, guide, params, x):
    """XLA's temporary bytes per row of log_likelihood's step at K = 5000, as its chunk chooser reads them."""
    return _chunking.bytes_per_row(
        lambda r: _log_weight_block(model, guide, 5000, r),
        (params, jax.random.split(jax.random.key(0), 1), x[:1], jnp.zeros((), jnp.int32)),
        cache_key=("log_likelihood", model, guide, 5000))


def test_auto_rows_fill_the_budget(net, monkeypatch):
    # rows per step = budget / (XLA's temp bytes per row), split into points x samples
    model, guide, params, _ = net
    big = jax.random.bernoulli(jax.random.key(1), 0.4, (400, D)).astype(jnp.float32)
    per_row = _log_likelihood_bytes_per_row(model, guide, params, big)
    assert per_row > 4 * D  # at least the logits of a row
    for budget in (1 << 20, 8 << 20):
        monkeypatch.setattr(_chunking, "cache_bytes", lambda budget=budget: budget)
        points, samples = log_likelihood_chunks(model, guide, params, jax.random.key(0), big, num_samples=5000)
        target = budget / per_row
        assert target / 2 <= points * samples <= target, (budget, points, samples, per_row)


def test_cpu_steps_get_at_least_the_floor_of_rows(net, monkeypatch):
    # a small cache no longer shrinks CPU steps below 1024 rows (a step's fixed cost),
    # unless those rows would need more than the temporaries' cap
    if jax.default_backend() != "cpu":
        pytest.skip("the floor is a CPU rule")
    model, guide, params, _ = net
    big = jax.random.bernoulli(jax.random.key(1), 0.4, (400, D)).astype(jnp.float32)
    monkeypatch.setattr(_chunking, "cache_bytes", lambda: 1 << 10)
    points, samples = log_likelihood_chunks(model, guide, params, jax.random.key(0), big, num_samples=5000)
    assert 512 <= points * samples <= _chunking._CPU_MIN_ROWS, (points, samples)
    # control: with the cap below 1024 rows' temporaries, the cap binds
    per_row = _log_likelihood_bytes_per_row(model, guide, params, big)
    monkeypatch.setattr(_chunking, "_CPU_MAX_STEP_BYTES", 100 * per_row)
    points, samples = log_likelihood_chunks(model, guide, params, jax.random.key(0), big, num_samples=5000)
    assert 64 <= points * samples <= 100, (points, samples)


@pytest.mark.parametrize("rows, n, k, want", [(1000, 100, 5000, (1, 1000)), (3000, 100, 5000, (1, 2500)),
                                              (2500, 100, 500, (5, 500)), (900, 100, 5000, (1, 834)),
                                              (10**6, 7, 50, (7, 50)),
                                              (64, 100, 50, (1, 50)), (120, 7, 50, (2, 50))])
def test_split_rows(rows, n, k, want):
    assert _chunking.split_rows(rows, n, k) == want


def test_linear_gaussian_auto_equals_one_chunk():
    params = lg.optimal_params(jnp.zeros(2))
    x = jnp.ones((3, 2))
    a = je.log_likelihood(lg.model(), lg.guide(), params, jax.random.key(0), x, num_samples=300)
    b = je.log_likelihood(lg.model(), lg.guide(), params, jax.random.key(0), x, num_samples=300, chunk_size=None)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bad_chunk_size_is_refused():
    params = lg.optimal_params(jnp.zeros(2))
    with pytest.raises(ValueError, match="chunk_size"):
        je.log_likelihood(lg.model(), lg.guide(), params, jax.random.key(0), jnp.ones((3, 2)), chunk_size="big")
    with pytest.raises(ValueError, match="points_per_chunk"):
        je.log_likelihood(lg.model(), lg.guide(), params, jax.random.key(0), jnp.ones((3, 2)), points_per_chunk=2)
