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
from jax.extend.core import Literal

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
    checks: list[tuple[str, Callable[..., Any]]] = [
        ("guide.log_prob(phi, x, z)", lambda xx, zz: guide.log_prob(phi, xx, zz)),
        ("model.log_prior(theta, z)", lambda xx, zz: model.log_prior(theta, zz)),
        ("model.log_likelihood(theta, x, z)", lambda xx, zz: model.log_likelihood(theta, xx, zz))]
    for name, fn in checks:
        try:
            closed, out = jax.make_jaxpr(fn, return_shape=True)(x0, z)
        except Exception as e:  # re-raised with context
            raise ValueError(f"{name} failed on the z of shape {z_shapes} that guide.sample returns "
                             f"(x[0] of shape {shapes}); do sample and log_prob agree? "
                             f"({type(e).__name__}: {e})") from e
        if not (hasattr(out, "shape") and out.shape == ()):
            got = jax.tree_util.tree_map(lambda s: s.shape, out)
            raise ValueError(f"{name} must return a scalar for one example, got shape {got} "
                             f"(z from guide.sample has shape {z_shapes}); sum over the latent and "
                             "data dimensions, and check that sample and log_prob agree")
        num_x = len(jax.tree_util.tree_leaves(x0))
        found = _outer_broadcast_of_z(closed.jaxpr, num_x)
        if found is not None:
            z_shape, other, result = found
            raise ValueError(
                f"{name} broadcasts a z of shape {z_shape} from guide.sample against an array of shape "
                f"{other} into shape {result}: an outer broadcast, which sums over pairs of elements and "
                "gives a wrong log-density with no error. Make guide.sample return the shape that "
                "guide.log_prob and the model expect (e.g. (D,) rather than (D, 1))")


# Elementwise primitives that broadcast size-1 axes of equal-rank operands.
_ELEMENTWISE = frozenset({"add", "sub", "mul", "div", "pow", "max", "min", "atan2", "rem", "nextafter",
                          "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "select_n", "add_any"})
_SUBJAXPRS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _outer_broadcast_of_z(jaxpr: Any, num_x: int) -> tuple[tuple, tuple, tuple] | None:
    """The first elementwise op of ``jaxpr`` (inputs: ``num_x`` leaves of x, then the leaves
    of z) that broadcasts a value shaped like a z leaf (``z`` or an elementwise function of
    it, possibly rank-promoted) against a value that does not depend on z, each stretched
    along an axis where the other is not: ``(D, 1)`` against ``(1, D)`` into ``(D, D)``.
    Returns ``(z_shape, other_shape, result_shape)`` or ``None``.

    Pairwise terms of z with itself (both operands depend on z), a z stretched against a
    larger array (a mixture's components) and scalars are not outer broadcasts.
    """
    # per variable: (depends on z, the shape it had before broadcasting if it is z-shaped else None,
    # its shape before any rank-promoting/stretching broadcast_in_dim)
    info: dict[Any, tuple[bool, tuple | None, tuple]] = {}
    for i, v in enumerate(jaxpr.invars):
        shape = tuple(v.aval.shape) if hasattr(v.aval, "shape") else ()
        info[v] = (i >= num_x, shape if i >= num_x else None, shape)
    return _walk(jaxpr, info)


def _get(info: dict, v: Any) -> tuple[bool, tuple | None, tuple]:
    shape = tuple(getattr(v.aval, "shape", ()))
    return (False, None, shape) if isinstance(v, Literal) else info.get(v, (False, None, shape))


def _padded(shape: tuple, rank: int) -> tuple:
    return (1,) * (rank - len(shape)) + tuple(shape)


def _walk(jaxpr: Any, info: dict) -> tuple[tuple, tuple, tuple] | None:
    for eqn in jaxpr.eqns:
        ins = [_get(info, v) for v in eqn.invars]
        depends = any(d for d, _, _ in ins)
        outs = eqn.outvars
        sub = next((eqn.params[k] for k in _SUBJAXPRS if k in eqn.params), None)
        if sub is not None and depends:
            inner = getattr(sub, "jaxpr", sub)
            if len(inner.invars) == len(eqn.invars):
                inner_info = {iv: ins[i] for i, iv in enumerate(inner.invars)}
                found = _walk(inner, inner_info)
                if found is not None:
                    return found
                for ov, iv in zip(outs, inner.outvars, strict=False):
                    info[ov] = _get(inner_info, iv)
                continue
        if len(outs) != 1 or not depends:
            continue
        out = outs[0]
        out_shape = tuple(getattr(out.aval, "shape", ()))
        name = eqn.primitive.name
        if name == "broadcast_in_dim":
            d, z_origin, origin = ins[0]
            dims = tuple(eqn.params["broadcast_dimensions"])
            trailing = dims == tuple(range(len(out_shape) - len(origin), len(out_shape)))
            info[out] = (d, z_origin if trailing else None, _padded(origin, len(out_shape)) if trailing else out_shape)
            continue
        if name in _ELEMENTWISE:
            rank = len(out_shape)
            for zi, (_, z_origin, origin) in enumerate(ins):
                if z_origin is None or not rank:
                    continue
                zo = _padded(origin, rank)
                for oi, (od, _, other) in enumerate(ins):
                    if oi == zi or od or not other or len(_padded(other, rank)) != rank:
                        continue
                    ot = _padded(other, rank)
                    z_stretched = any(zo[a] == 1 < out_shape[a] and ot[a] == out_shape[a] for a in range(rank))
                    o_stretched = any(ot[a] == 1 < out_shape[a] and zo[a] == out_shape[a] for a in range(rank))
                    if z_stretched and o_stretched:
                        return tuple(z_origin), tuple(other), out_shape
            shaped = [(zo, o) for _, zo, o in ins if zo is not None and _padded(o, len(out_shape)) == out_shape]
            info[out] = (True, shaped[0][0] if shaped else None, shaped[0][1] if shaped else out_shape)
            continue
        if len(ins) == 1 and ins[0][1] is not None and tuple(getattr(eqn.invars[0].aval, "shape", ())) == out_shape:
            info[out] = (True, ins[0][1], ins[0][2])           # unary elementwise: still z-shaped
            continue
        info[out] = (True, None, out_shape)
    return None
