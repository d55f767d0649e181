"""The linear-Gaussian toy the objective tests share: data, model, guide and params moved off the optimum.

``jaxelbo.models.linear_gaussian`` with D = 3 has a closed-form ``log p(x)``, posterior and ELBO; the
tests move the params away from the optimum so that no gradient is zero by accident.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxelbo.models import linear_gaussian as lg

D = 3
MU = jnp.array([0.3, -0.5, 1.0])
MODEL, GUIDE = lg.model(), lg.guide()
RNG = jax.random.key(0)


def data(batch_size: int):
    """``batch_size`` rows of x drawn from the model at ``MU`` (the same rows in every file)."""
    return lg.sample_data(jax.random.key(7), MU, batch_size)


def perturbed(params, *, a_noise: float = 0.1, log_scale_shift: float | None = None):
    """``params`` moved off the optimum: guide ``A`` + ``a_noise`` x N(0, 1), ``b`` - 0.2, model ``mu`` + 0.3,
    and the guide's ``log_scale`` + ``log_scale_shift`` when given."""
    g = dict(params["guide"])
    g["A"] = g["A"] + a_noise * jax.random.normal(jax.random.key(1), (D, D), g["A"].dtype)
    g["b"] = g["b"] - 0.2
    if log_scale_shift is not None:
        g["log_scale"] = g["log_scale"] + log_scale_shift
    return {"model": {"mu": params["model"]["mu"] + 0.3}, "guide": g}


def to_float64(tree):
    """Every array leaf of ``tree`` as float64 (call inside ``jax.enable_x64(True)``)."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def assert_x_gradient_is_the_fd(loss, x, *, h: float = 1e-5):
    """``jax.grad(loss)(x)`` along a random direction equals the central finite difference of
    ``loss`` (a scalar function of ``x`` on a fixed key), and is not a vacuous zero. Float64."""
    g = jax.grad(loss)(x)
    direction = jax.random.normal(jax.random.key(5), x.shape, x.dtype)
    fd = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    assert abs(float(jnp.vdot(g, direction))) > 1e-2  # not a vacuous zero
    np.testing.assert_allclose(jnp.vdot(g, direction), fd, rtol=1e-6, atol=1e-9)
