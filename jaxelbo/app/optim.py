"""The training optimiser: Adam per part, behind a guard that never applies a non-finite step.

* :func:`make_optimizer` builds separate Adam optimisers for the decoder (theta,
  ``params["model"]``) and the encoder (phi, ``params["guide"]``) with
  :func:`optax.partition`, wrapped in :func:`skip_non_finite`.
* :func:`skip_non_finite` applies a step only if everything it produces is finite, and
  counts the steps it refused; :func:`skipped_steps` and :func:`consecutive_non_finite`
  read those counts from any optimiser state that holds a :class:`SkipNonFiniteState`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def param_labels(params: dict) -> dict:
    """``{"model": "model" at every leaf, "guide": "guide" at every leaf}`` for optax.partition.

    Example:
      >>> import jax.numpy as jnp
      >>> param_labels({"model": {"w": jnp.ones(2)}, "guide": {"v": jnp.ones(1)}})
      {'model': {'w': 'model'}, 'guide': {'v': 'guide'}}
    """
    return {name: jax.tree.map(lambda _, n=name: n, params[name]) for name in params}


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_non_finite` (the field names of ``optax.ApplyIfFiniteState``).

    Attributes:
      notfinite_count: non-finite steps in a row, up to now (0 after a finite step).
      last_finite: whether the last step was applied.
      total_notfinite: non-finite steps in all.
      inner_state: the wrapped optimiser's state (untouched by non-finite steps).
    """

    notfinite_count: jax.Array
    last_finite: jax.Array
    total_notfinite: jax.Array
    inner_state: Any


def _all_finite(tree: Any) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def skip_non_finite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that a non-finite step never reaches the parameters.

    A step is applied only if the gradient, ``inner``'s update, ``inner``'s new state
    and (when ``params`` are given) the updated parameters are all finite; otherwise the
    update is zero and ``inner``'s state (e.g. Adam's moments) is kept. (A finite
    gradient of 1e20 overflows Adam's second moment while its update stays finite: such a
    step is skipped too, so the state never holds an Inf.) It never gives up, however many
    non-finite steps come in a row: the caller decides when to stop, from
    :func:`consecutive_non_finite`.

    Args:
      inner: the optimiser to protect.

    Returns:
      The wrapped transformation; its state is a :class:`SkipNonFiniteState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = skip_non_finite(optax.sgd(0.1))
      >>> params = {"w": jnp.ones(2)}
      >>> updates, state = opt.update({"w": jnp.array([jnp.nan, 1.0])}, opt.init(params), params)
      >>> updates["w"].tolist(), int(state.total_notfinite)
      ([0.0, 0.0], 1)
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return SkipNonFiniteState(jnp.zeros([], jnp.int32), jnp.array(True), jnp.zeros([], jnp.int32),
                                  inner.init(params))

    def update(grads, state, params=None, **extra_args):
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        ok = _all_finite(grads) & _all_finite(updates) & _all_finite(inner_state)
        if params is not None:
            ok = ok & _all_finite(optax.apply_updates(params, updates))
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        inner_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), inner_state, state.inner_state)
        bad = (~ok).astype(jnp.int32)
        return updates, SkipNonFiniteState(notfinite_count=(state.notfinite_count + 1) * bad, last_finite=ok,
                                           total_notfinite=state.total_notfinite + bad, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(learning_rate: float = 1e-3, *, guide_learning_rate: float | None = None,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-4) -> optax.GradientTransformation:
    """Adam for theta and phi separately (Burda et al. 2016: beta1 0.9, beta2 0.999, eps 1e-4).

    ``optax.partition`` routes ``params["model"]`` and ``params["guide"]`` to their own
    Adam (``guide_learning_rate`` defaults to ``learning_rate``); the whole is wrapped in
    :func:`skip_non_finite`: a non-finite step leaves params and moments untouched and
    is counted (see :func:`skipped_steps`).

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"model": {"w": jnp.ones(2)}, "guide": {"v": jnp.ones(1)}}
      >>> int(skipped_steps(make_optimizer(1e-3).init(params)))
      0

    References:
      Burda, Grosse and Salakhutdinov (2016), Importance Weighted Autoencoders, arXiv:1509.00519.
    """
    guide_learning_rate = learning_rate if guide_learning_rate is None else guide_learning_rate
    inner = optax.partition(
        {"model": optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
         "guide": optax.adam(guide_learning_rate, b1=b1, b2=b2, eps=eps)},
        param_labels)
    return skip_non_finite(inner)


def _count(opt_state: Any, field: str) -> jax.Array:
    def has(s):
        return hasattr(s, field)

    for s in [opt_state, *jax.tree.leaves(opt_state, is_leaf=has)]:
        if has(s):
            return jnp.asarray(getattr(s, field))
    return jnp.zeros((), jnp.int32)


def skipped_steps(opt_state: Any) -> jax.Array:
    """Total non-finite steps skipped (by :func:`skip_non_finite`; 0 if the state has none)."""
    return _count(opt_state, "total_notfinite")


def consecutive_non_finite(opt_state: Any) -> jax.Array:
    """Non-finite steps in a row up to now (0 if the last step was finite or the state has none)."""
    return _count(opt_state, "notfinite_count")
