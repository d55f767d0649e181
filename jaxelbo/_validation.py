"""Checks shared by the core's public functions (internal: no public name lives here).

Every check raises ``TypeError`` or ``ValueError`` with a message that names the argument,
what was given and what is expected, so that a bad configuration fails where it is made.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxelbo.types import Guide, Model, PyTree


def check_count(name: str, value) -> int:
    """``value`` as a Python ``int >= 1`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_real(name: str, value) -> float:
    """``value`` as a finite Python ``float`` (bools and arrays are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_model_guide(model: Model, guide: Guide) -> None:
    """``model`` is a :class:`jaxelbo.Model` and ``guide`` a :class:`jaxelbo.Guide`."""
    if not isinstance(model, Model):
        raise TypeError("model must be a jaxelbo.Model(log_prior, log_likelihood), "
                        f"got {type(model).__name__}")
    if not isinstance(guide, Guide):
        raise TypeError(f"guide must be a jaxelbo.Guide(sample, log_prob), got {type(guide).__name__}")


def batch_size_of(x: PyTree) -> int:
    """The leading (batch) axis shared by every leaf of ``x``; raises if there is none."""
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise ValueError("x is empty: expected a batch with a leading axis B")
    sizes = set()
    for leaf in leaves:
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"x must be a batch with a leading axis B, got a scalar leaf of shape {jnp.shape(leaf)}; "
                "for one example use x[None]")
        sizes.add(jnp.shape(leaf)[0])
    if len(sizes) != 1:
        raise ValueError(f"every leaf of x must share the leading batch axis, got sizes {sorted(sizes)}")
    if 0 in sizes:
        raise ValueError("x is an empty batch (leading axis B = 0); a batch needs at least one example")
    return sizes.pop()


def check_inputs(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree) -> None:
    """Trace-time checks of ``params``, the batch and the per-example functions' shapes.

    Runs the model and guide abstractly (``jax.eval_shape``) on ``x[0]``: costs no FLOPs
    and, under ``jit``, happens once per compilation.
    """
    if not isinstance(params, dict) or set(params) != {"model", "guide"}:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise TypeError(f'params must be a dict {{"model": theta, "guide": phi}}, got {got}')
    batch_size_of(x)
    theta, phi = params["model"], params["guide"]
    x0 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), x)
    key = jax.eval_shape(lambda r: jax.random.split(r, (1, 1))[0, 0], rng)
    shapes = jax.tree_util.tree_map(lambda s: s.shape, x0)
    try:
        z = jax.eval_shape(guide.sample, phi, key, x0)
    except Exception as e:  # re-raised with context
        raise ValueError(f"guide.sample(phi, rng, x[0]) failed on one example of shape {shapes}; "
                         f"is x a batch with a leading axis B? ({type(e).__name__}: {e})") from e
    z_shapes = jax.tree_util.tree_map(lambda s: s.shape, z)
    checks: list[tuple[str, Callable[..., Any], tuple]] = [
        ("guide.log_prob(phi, x, z)", guide.log_prob, (phi, x0, z)),
        ("model.log_prior(theta, z)", model.log_prior, (theta, z)),
        ("model.log_likelihood(theta, x, z)", model.log_likelihood, (theta, x0, z))]
    for name, fn, args in checks:
        try:
            out = jax.eval_shape(fn, *args)
        except Exception as e:  # re-raised with context
            raise ValueError(f"{name} failed on the z of shape {z_shapes} that guide.sample returns "
                             f"(x[0] of shape {shapes}); do sample and log_prob agree? "
                             f"({type(e).__name__}: {e})") from e
        if not (hasattr(out, "shape") and out.shape == ()):
            got = jax.tree_util.tree_map(lambda s: s.shape, out)
            raise ValueError(f"{name} must return a scalar for one example, got shape {got} "
                             f"(z from guide.sample has shape {z_shapes}); sum over the latent and "
                             "data dimensions, and check that sample and log_prob agree")
