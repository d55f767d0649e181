"""Shared fixtures: strict numerics for the core, jit/eager parameterisation."""

import jax
import pytest


@pytest.fixture
def strict_numerics():
    """Strict dtype promotion and no implicit rank promotion (as equinox's tests do)."""
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(params=[True, False], ids=["jit", "eager"])
def maybe_jit(request):
    """``jax.jit`` or the identity: every test that takes it runs both ways."""
    return jax.jit if request.param else (lambda f: f)
