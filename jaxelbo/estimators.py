"""Layer 3: gradient estimators, as surrogates built from log-weights.

An objective (layer 4) is a bound ``F(log w~)`` of the K log-weights of one example. An
*estimator* is a way of building a surrogate ``S`` with ``S == F`` in value whose
gradient is an unbiased (or knowingly biased) Monte Carlo estimate of ``grad E[F]``.
``theta`` enters only through ``log p_theta(x, z)`` and always receives the objective's
own weights ``c_k = dF / dlog w~_k``; the estimators differ in what ``phi`` receives:

``reparam``
  Plain autodiff through ``z_k = t(eps_k, phi)`` and ``log q_phi``: the total derivative
  ``sum_k c_k (dlog w~_k/dz_k dz_k/dphi - dlog q_phi(z_k)/dphi)``
  (Kingma & Welling 2014, arXiv:1312.6114; Burda et al. 2016, arXiv:1509.00519).
``stl``
  "Sticking the landing" (Roeder, Wu & Duvenaud 2017, arXiv:1703.09194): ``log q`` is
  evaluated at ``stop_gradient(phi)``, keeping the path derivative
  ``g_k = dlog w~_k/dz_k dz_k/dphi`` and dropping the score term. Unbiased for the ELBO;
  biased for IWAE with K > 1 (Tucker et al. 2019).
``dreg``
  Doubly-reparameterised (Tucker, Lawson, Gu & Maddison 2019, arXiv:1810.04152). The
  score term ``E[sum_k c_k dlog q(z_k)/dphi]`` is rewritten by the reparameterisation
  identity ``E_q[f(z) dlog q/dphi] = E[df(z(eps, phi))/dz dz/dphi]`` applied to
  ``f = c_k(log w~)``, which depends on ``z_k`` through ``log w~_k``. The result is
  ``sum_k d_k g_k`` with ``d_k = c_k - dc_k / dlog w~_k``: ``w_k^2`` for IWAE,
  ``w_k - w_k^2`` for the RWS wake-phi update, and so on (each objective supplies
  ``d / c``). It costs one forward and one backward pass: a ``custom_vjp`` saves the
  ratio ``r_k = d_k / c_k`` in the forward pass and multiplies the cotangent of ``z_k``
  by it in the backward pass, so ``theta`` keeps ``c_k`` while ``phi`` gets ``d_k``.
``score``
  REINFORCE / likelihood ratio (Williams 1992; Paisley et al. 2012, arXiv:1206.6430;
  Mnih & Gregor 2014, arXiv:1402.0030): ``z`` is held constant and
  ``sum_k (L_k - b_k) dlog q(z_k)/dphi`` is added to the direct term, with a baseline
  ``b_k`` that does not depend on ``z_k`` (leave-one-out), so the estimate stays unbiased.
``vimco``
  Mnih & Rezende 2016 (arXiv:1602.06725): ``score`` for IWAE with the per-sample
  baseline ``L_{-k} = log 1/K (sum_{j != k} w~_j + exp(mean_{j != k} log w~_j))``.
  Works for discrete latents.

The two engines below, :func:`pathwise_surrogate` and :func:`score_surrogate`, are all
the machinery; the objectives only supply ``F`` and the per-sample ratios or signals
(:func:`jaxelbo.make_objective` derives both from ``F`` by autodiff when they are not
given: :func:`dreg_weights`, :func:`leave_one_out_signal`).

**Every other input gets its plain derivative.** Only ``params["guide"]`` is rerouted.
The batch ``x`` and any array the model or the guide closes over (hoisted with
:func:`jax.closure_convert`) receive the plain autodiff derivative of the Monte Carlo
value, ``theta`` the bound's own weights. The rerouting is a ``custom_jvp`` with
symbolic zeros: nothing is computed for an input that is not differentiated, forward
mode (``jax.jvp``, ``jax.jacfwd``) works, and reverse mode is still one forward and one
backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxelbo.types import Estimator, Guide, Model, PyTree
from jaxelbo.weights import (
    batch_size_of,
    leave_one_out_logsumexp,
    leave_one_out_mean,
    log_joint_latents,
    log_mean_exp,
    log_prob_latents,
    sample_and_log_weights,
    sample_keys,
    sample_latents,
)

__all__ = ["ESTIMATORS", "PATHWISE", "SCORE_FUNCTION", "check_continuous_latents", "dreg_ratio_from_weights",
           "dreg_weights", "elbo_score_signal", "iwae_score_signal", "leave_one_out_logsumexp",
           "leave_one_out_mean", "leave_one_out_signal", "pathwise_surrogate", "reparameterized_leaves",
           "score_surrogate", "vimco_signal"]

#: ``ovis`` / ``ovis-mc``: :mod:`jaxelbo.ovis`
ESTIMATORS: tuple[Estimator, ...] = ("reparam", "stl", "dreg", "score", "vimco", "ovis", "ovis-mc")
PATHWISE: tuple[Estimator, ...] = ("reparam", "stl", "dreg")
SCORE_FUNCTION: tuple[Estimator, ...] = ("score", "vimco")

sg = jax.lax.stop_gradient

BoundFn = Callable[[jax.Array], jax.Array]     # (B, *S) log-weights -> (B,) bound
RatioFn = Callable[[jax.Array], jax.Array]     # (B, *S) log-weights -> (B, *S) d / c
SignalFn = Callable[[jax.Array], jax.Array]    # (B, *S) log-weights -> (B, *S) learning signal


# --------------------------------------------------------------------------------------
# Learning signals and DReG weights
# --------------------------------------------------------------------------------------


def iwae_score_signal(log_weights: jax.Array) -> jax.Array:
    """Learning signal ``L - b_k`` of ``z_k`` for the IWAE score estimator.

    ``L = log 1/K sum_j w~_j`` and the baseline ``b_k = log 1/(K-1) sum_{j != k} w~_j``
    (the IWAE_{K-1} bound of the other samples) does not depend on ``z_k``. K = 1: b = 0.
    """
    bound = log_mean_exp(log_weights)[..., None]
    k = log_weights.shape[-1]
    if k == 1:
        return jnp.broadcast_to(bound, log_weights.shape)
    return bound - (leave_one_out_logsumexp(log_weights) - math.log(k - 1))


def vimco_signal(log_weights: jax.Array) -> jax.Array:
    """VIMCO learning signal ``L - L_{-k}`` (Mnih & Rezende 2016, eq. 10).

    ``L_{-k} = log 1/K (sum_{j != k} w~_j + exp(mean_{j != k} log w~_j))``: the bound
    with ``w~_k`` replaced by the geometric mean of the others. K = 1 has no other
    samples; the baseline is then 0 (plain REINFORCE).
    """
    bound = log_mean_exp(log_weights)[..., None]
    k = log_weights.shape[-1]
    if k == 1:
        return jnp.broadcast_to(bound, log_weights.shape)
    loo = jnp.logaddexp(leave_one_out_logsumexp(log_weights), leave_one_out_mean(log_weights))
    return bound - (loo - math.log(k))


def elbo_score_signal(log_weights: jax.Array) -> jax.Array:
    """Signal ``(log w~_k - b_k) / K`` for the K-sample ELBO, ``b_k = mean_{j != k} log w~_j``."""
    k = log_weights.shape[-1]
    if k == 1:
        return log_weights
    return (log_weights - leave_one_out_mean(log_weights)) / k


def leave_one_out_signal(bound_fn: BoundFn, log_weights: jax.Array) -> jax.Array:
    """Score-function learning signal ``s_k = F(l) - F(l with l_k := mean_{j != k} l_j)``.

    The baseline is the bound of ONE example's log-weights ``l`` (any shape, all of its
    N entries are the samples) with sample k's entry replaced by the mean of the others,
    so it does not depend on ``z_k`` and the estimate stays unbiased. For IWAE this is
    VIMCO's baseline (Mnih & Rezende 2016, arXiv:1602.06725), for the ELBO the
    leave-one-out mean. Costs N evaluations of ``F`` (O(N^2) for the usual bounds). With
    N = 1 the baseline is 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxelbo.estimators import leave_one_out_signal, vimco_signal
      >>> from jaxelbo.weights import log_mean_exp
      >>> lw = jnp.array([0.0, -1.0, 2.0, 0.5])
      >>> bool(jnp.allclose(leave_one_out_signal(log_mean_exp, lw), vimco_signal(lw), atol=1e-6))
      True
    """
    shape = log_weights.shape
    flat = log_weights.reshape(-1)
    n = flat.shape[0]

    def f(v: jax.Array) -> jax.Array:
        return bound_fn(v.reshape(shape))

    value = f(flat)
    if n == 1:
        return jnp.broadcast_to(value, shape)
    replaced = jnp.where(jnp.eye(n, dtype=bool), leave_one_out_mean(flat)[:, None], flat[None, :])
    return (value - jax.vmap(f)(replaced)).reshape(shape)


def dreg_weights(bound_fn: BoundFn, log_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(c, d)`` of one example by autodiff: ``c = grad F`` and ``d_k = c_k - dc_k / dlog w~_k``.

    ``c`` is what ``theta`` (and every input but ``phi``) receives per sample; ``d`` is the
    doubly-reparameterised weight of ``phi``'s path derivative ``g_k`` (Tucker et al.
    2019, arXiv:1810.04152, generalised to any smooth ``F``). The Hessian's diagonal is
    taken forward-over-reverse, one ``jvp`` of ``grad F`` per sample (vmapped): O(N) times
    the cost of ``grad F``, N the number of samples of the example. Pass a closed form to
    :func:`jaxelbo.make_objective` (``dreg_ratio``) where N is large.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxelbo.estimators import dreg_weights
      >>> from jaxelbo.weights import log_mean_exp
      >>> lw = jnp.array([0.0, -1.0, 2.0])
      >>> c, d = dreg_weights(log_mean_exp, lw)
      >>> bool(jnp.allclose(d, jax.nn.softmax(lw) ** 2, atol=1e-6))   # IWAE: w_k^2
      True
    """
    shape = log_weights.shape
    flat = log_weights.reshape(-1)

    def grad_f(v: jax.Array) -> jax.Array:
        return jax.grad(lambda u: bound_fn(u.reshape(shape)))(v)

    c = grad_f(flat)
    basis = jnp.eye(flat.shape[0], dtype=flat.dtype)
    hessian_diag = jnp.diagonal(jax.vmap(lambda e: jax.jvp(grad_f, (flat,), (e,))[1])(basis))
    return c.reshape(shape), (c - hessian_diag).reshape(shape)


def _at_least_float32(dtype: Any) -> Any:
    """``float32`` for a narrower float dtype (float16, bfloat16), else ``dtype`` itself."""
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def dreg_ratio_from_weights(c: jax.Array, d: jax.Array) -> jax.Array:
    """``r_k = d_k / c_k``, and 0 where ``|c_k|`` underflows (below ``1e8`` times the tiniest normal).

    The single-pass DReG routes ``phi``'s cotangent as ``r_k c_k = d_k``; a sample whose
    ``c_k`` is (numerically) zero then contributes nothing to ``phi``. Computed in float32
    at least (``1e8 * tiny`` of float16 is out of its range), returned in ``c``'s dtype.
    """
    wide = _at_least_float32(c.dtype)                   # float16's 1e8 * tiny overflows: compare in float32
    c32, d32 = c.astype(wide), d.astype(wide)
    safe = jnp.abs(c32) > 1e8 * jnp.finfo(wide).tiny
    return jnp.where(safe, d32 / jnp.where(safe, c32, 1.0), 0.0).astype(c.dtype)


# --------------------------------------------------------------------------------------
# Routing: log-weights whose phi-tangent is rerouted, every other input's plain
# --------------------------------------------------------------------------------------


def _is_zero(tangent: PyTree) -> bool:
    return all(isinstance(leaf, SymbolicZero) for leaf in
               jax.tree_util.tree_leaves(tangent, is_leaf=lambda t: isinstance(t, SymbolicZero)))


def _instantiate(tangent: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape, t.dtype) if isinstance(t, SymbolicZero) else t,
                                  tangent, is_leaf=lambda t: isinstance(t, SymbolicZero))


def _zeros_like(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def _scale_leaves(tree: PyTree, r: jax.Array) -> PyTree:
    """Multiply every leaf of shape ``(B, N, ...)`` by ``r`` of shape ``(B, N)``."""
    def scale(leaf: jax.Array) -> jax.Array:
        return leaf * r.reshape(r.shape + (1,) * (leaf.ndim - r.ndim)).astype(leaf.dtype)

    return jax.tree_util.tree_map(scale, tree)


def _add(a: PyTree | None, b: PyTree | None) -> PyTree | None:
    if a is None:
        return b
    if b is None:
        return a
    return jax.tree_util.tree_map(jnp.add, a, b)


def _linearize(fn: Callable[..., Any], args: Sequence[Any], live: Sequence[bool]) -> tuple[Any, Callable | None]:
    """``fn(*args)`` and its linear map in the ``live`` arguments only (``None`` if none is live)."""
    idx = [i for i, flag in enumerate(live) if flag]
    if not idx:
        return fn(*args), None

    def partial_fn(*live_args: Any) -> Any:
        full = list(args)
        for i, a in zip(idx, live_args, strict=True):
            full[i] = a
        return fn(*full)

    out, lin = jax.linearize(partial_fn, *[args[i] for i in idx])
    return out, lin


def _continuous(tree: PyTree) -> bool:
    return all(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in jax.tree_util.tree_leaves(tree))


def _routed(model: Model, guide: Guide, theta: PyTree, phi: PyTree, keys: jax.Array, x: PyTree, *,
            ratio_fn: RatioFn | None, pathwise: bool, direct: bool, score: bool,
            sample_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(log_w, score)`` of shape ``(B, N)``: the log-weights and a zero carrying ``phi``'s score tangent.

    The tangent of ``log_w`` (and so, transposed, every cotangent) is the plain derivative
    in ``theta``, ``x`` and every array closed over by the model or the guide. In ``phi``
    it is routed: the path through ``z = t(eps, phi; x)`` (only when ``pathwise``) and,
    when ``direct``, ``log q``'s own dependence on ``phi`` are multiplied per sample by
    ``r = ratio_fn(log w~)`` (1 when ``ratio_fn`` is None), computed once from the primal
    log-weights. ``score`` is zero in value; with ``score=True`` its tangent is
    ``dlog q(z_k)/dphi`` at fixed ``z`` and ``x`` (the score-function estimators' term).
    When ``x`` and the closed-over arrays are not differentiated (symbolic zeros), every
    linear map is applied once: one forward and one backward pass.
    """
    def sample_fn(p: PyTree, k: jax.Array, xx: PyTree) -> PyTree:
        return sample_latents(guide, p, k, xx)

    def log_p_fn(t: PyTree, xx: PyTree, z: PyTree) -> jax.Array:
        return log_joint_latents(model, t, xx, z)

    def log_q_fn(p: PyTree, xx: PyTree, z: PyTree) -> jax.Array:
        return log_prob_latents(guide, p, xx, z)

    z_struct = jax.eval_shape(sample_fn, phi, keys, x)
    z0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), z_struct)
    sample_c, cs = jax.closure_convert(sample_fn, phi, keys, x)
    log_p_c, cp = jax.closure_convert(log_p_fn, theta, x, z0)
    log_q_c, cq = jax.closure_convert(log_q_fn, phi, x, z0)
    z_moves = _continuous(z_struct)

    @jax.custom_jvp
    def routed(theta: PyTree, phi: PyTree, x: PyTree, keys: jax.Array, cs: list, cp: list,
               cq: list) -> tuple[jax.Array, jax.Array]:
        z = sample_c(phi, keys, x, *cs)
        log_w = log_p_c(theta, x, z, *cp) - log_q_c(phi, x, z, *cq)
        return log_w, jnp.zeros_like(log_w)

    def rule(primals: tuple, tangents: tuple) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        theta, phi, x, keys, cs, cp, cq = primals
        live = [not _is_zero(t) for i, t in enumerate(tangents) if i != 3]
        l_theta, l_phi, l_x, l_cs, l_cp, l_cq = live
        d_theta, d_phi, d_x, _, d_cs, d_cp, d_cq = (_instantiate(t) for t in tangents)
        # z = t(eps, phi; x, cs): the phi-path (rerouted) and the x-path (plain), kept apart
        l_zphi = z_moves and pathwise and l_phi
        l_zx = z_moves and (l_x or l_cs)
        z, s_lin = _linearize(lambda p, xx, c: sample_c(p, keys, xx, *c), (phi, x, cs), (l_zphi, l_zx, l_zx))
        dz_phi = dz_x = None
        if s_lin is not None:
            if l_zphi and l_zx:
                dz_phi = s_lin(d_phi, _zeros_like(x), _zeros_like(cs))
                dz_x = s_lin(_zeros_like(phi), d_x, d_cs)
            elif l_zphi:
                dz_phi = s_lin(d_phi)
            else:
                dz_x = s_lin(d_x, d_cs)
        l_z = l_zphi or l_zx
        log_p, p_lin = _linearize(lambda t, xx, c, zz: log_p_c(t, xx, zz, *c), (theta, x, cp, z),
                                  (l_theta, l_x, l_cp, l_z))
        q_phi = l_phi and (direct or score)
        q_live = (q_phi, l_x, l_cq, l_z)
        log_q, q_lin = _linearize(lambda p, xx, c, zz: log_q_c(p, xx, zz, *c), (phi, x, cq, z), q_live)
        log_w = log_p - log_q
        # the per-sample weights are computed in float32 at least (float16 loses them) and cast back
        wide = _at_least_float32(log_w.dtype)
        ratio = None if ratio_fn is None else sg(
            ratio_fn(log_w.astype(wide).reshape((log_w.shape[0], *sample_shape))).reshape(log_w.shape)
            .astype(log_w.dtype))

        def times_r(t: PyTree) -> PyTree:
            return t if ratio is None else _scale_leaves(t, ratio)

        dz = _add(dz_x, None if dz_phi is None else times_r(dz_phi))

        def apply(lin: Callable, flags: Sequence[bool], tangents: Sequence[Any], primals: Sequence[Any]) -> Any:
            return lin(*[_zeros_like(p) if t is None else t
                         for t, p, flag in zip(tangents, primals, flags, strict=True) if flag])

        d_log_w = jnp.zeros_like(log_w)
        if p_lin is not None:  # log p: plain in theta, x, cp; z's tangent already carries r on its phi-path
            d_log_w = apply(p_lin, (l_theta, l_x, l_cp, l_z), (d_theta, d_x, d_cp, dz), (theta, x, cp, z))
        d_score = jnp.zeros_like(log_w)
        if q_lin is not None:  # log q: its phi part (direct and through z) rerouted, its x part plain
            q_primals = (phi, x, cq, z)
            has_phi = q_phi or dz_phi is not None
            has_x = l_x or l_cq or dz_x is not None
            if has_phi and has_x:
                phi_part = apply(q_lin, q_live, (d_phi, None, None, dz_phi), q_primals)
                x_part = apply(q_lin, q_live, (None, d_x, d_cq, dz_x), q_primals)
            elif has_phi:
                phi_part, x_part = apply(q_lin, q_live, (d_phi, None, None, dz_phi), q_primals), None
            else:
                phi_part, x_part = None, apply(q_lin, q_live, (None, d_x, d_cq, dz_x), q_primals)
            if phi_part is not None and (direct or pathwise):
                d_log_w = d_log_w - times_r(phi_part)
            if x_part is not None:
                d_log_w = d_log_w - x_part
            if score and phi_part is not None:
                d_score = phi_part
        return (log_w, jnp.zeros_like(log_w)), (d_log_w, d_score)

    routed.defjvp(rule, symbolic_zeros=True)
    return routed(theta, phi, x, keys, cs, cp, cq)


def check_continuous_latents(guide: Guide, phi: PyTree, keys: jax.Array, x: PyTree, estimator: str) -> None:
    """Trace-time error when ``guide.sample`` returns a non-float ``z`` for a pathwise estimator.

    ``reparam``, ``stl`` and ``dreg`` differentiate through ``z = t(eps, phi)``; an integer
    (or boolean) ``z`` has no such derivative. Costs no FLOPs (``jax.eval_shape``).
    """
    z = jax.eval_shape(lambda p: sample_latents(guide, p, keys, x), phi)
    declared = reparameterized_leaves(guide, z)
    if declared is not None and not all(declared):
        paths = [jax.tree_util.keystr(path) for (path, _), flag in
                 zip(jax.tree_util.tree_flatten_with_path(z)[0], declared, strict=True) if not flag]
        raise TypeError(f"estimator {estimator!r} differentiates through z, but the guide declares "
                        f"z{', z'.join(paths)} not reparameterised (Guide.reparameterized); use a per-site "
                        f"estimator such as "
                        f"estimator={{'continuous': 'dreg', 'discrete': 'vimco'}} (jaxelbo.per_site), or a "
                        f"score-function estimator: {' or '.join(map(repr, SCORE_FUNCTION))}")
    for path, leaf in jax.tree_util.tree_flatten_with_path(z)[0]:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            where = f" at {jax.tree_util.keystr(path)}" if path else ""
            raise TypeError(f"estimator {estimator!r} differentiates through z, but guide.sample returns a "
                            f"discrete z{where} (dtype {leaf.dtype}); for discrete latents use a "
                            f"score-function estimator: {' or '.join(map(repr, SCORE_FUNCTION))}")
    for path in _latents_without_derivative(guide, phi, keys, x):
        where = f" {jax.tree_util.keystr(path)}" if path else ""
        raise TypeError(f"estimator {estimator!r} differentiates through z, but z{where} from guide.sample carries "
                        f"no derivative with respect to phi (a discrete sample cast to float, or a stop_gradient): "
                        f"the pathwise gradient would be silently zero or biased; for discrete latents use a "
                        f"score-function estimator: {' or '.join(map(repr, SCORE_FUNCTION))}")


def reparameterized_leaves(guide: Guide, z: PyTree) -> list[bool] | None:
    """Per leaf of ``z``, the guide's declaration :attr:`Guide.reparameterized`; ``None`` if it has none.

    The declaration is a pytree prefix of ``z`` with bool leaves (a top-level mapping of
    another type, e.g. a hashable one that keeps the guide hashable, reads as a dict); a
    mismatch raises a ``ValueError`` naming both structures.
    """
    declared = guide.reparameterized
    if declared is None:
        return None
    if isinstance(declared, Mapping) and type(declared) is not dict:  # a hashable mapping reads as a dict
        declared = dict(declared)
    try:
        full = jax.tree_util.tree_map(lambda flag, sub: jax.tree_util.tree_map(lambda _: flag, sub), declared, z)
    except (ValueError, TypeError) as e:
        raise ValueError(f"Guide.reparameterized must be a pytree prefix of z with bool leaves; got "
                         f"{jax.tree_util.tree_structure(declared)} for z of structure "
                         f"{jax.tree_util.tree_structure(z)}") from e
    flags = jax.tree_util.tree_leaves(full)
    if not all(isinstance(f, bool) for f in flags):
        raise TypeError(f"Guide.reparameterized must have Python bool leaves, got {declared!r}")
    return flags


def _latents_without_derivative(guide: Guide, phi: PyTree, keys: jax.Array, x: PyTree) -> list:
    """Paths of the leaves of ``z`` whose derivative with respect to ``phi`` is symbolically zero.

    Traces the VJP of ``guide.sample`` (no FLOPs) and follows the data dependence back
    from the cotangent of ``phi`` to the cotangent of each leaf of ``z``. Conservative: an
    operation counts as depending on every input, so only a derivative that is zero by
    construction (an integer sample cast to float, ``stop_gradient``) is reported. A
    ``phi`` without floating-point leaves, or a guide whose VJP cannot be traced (a
    custom rule that raises), reports nothing.
    """
    phi_leaves = jax.tree_util.tree_leaves(phi)
    if not any(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in phi_leaves):
        return []
    z_shape = jax.eval_shape(lambda p: sample_latents(guide, p, keys, x), phi)
    z_paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(z_shape)[0]]

    def phi_cotangent(p, cotangent):
        _, vjp = jax.vjp(lambda q: sample_latents(guide, q, keys, x), p)
        return vjp(cotangent)

    try:
        closed = jax.make_jaxpr(phi_cotangent)(phi, jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype), z_shape))
    except Exception:  # a guide that refuses to be differentiated says so itself
        return []
    jaxpr = closed.jaxpr
    needed = {v for v in jaxpr.outvars if not hasattr(v, "val")}
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars):
            needed.update(v for v in eqn.invars if not hasattr(v, "val"))
    cotangent_vars = jaxpr.invars[len(phi_leaves):]
    depends = _depends_on_phi(guide, phi, keys, x)
    return [path for path, var, dep in zip(z_paths, cotangent_vars, depends, strict=True)
            if dep and var not in needed]


def _depends_on_phi(guide: Guide, phi: PyTree, keys: jax.Array, x: PyTree) -> list[bool]:
    """Per leaf of ``z``: does its value depend on ``phi`` at all (forward data dependence)?

    A leaf that does not (a local guide without parameters, fixed given ``x``) has a zero
    pathwise derivative by right, and is not reported by :func:`_latents_without_derivative`.
    Conservative in the same way: an operation depends on every one of its inputs.
    """
    jaxpr = jax.make_jaxpr(lambda p: sample_latents(guide, p, keys, x))(phi).jaxpr
    reached = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if any(not hasattr(v, "val") and v in reached for v in eqn.invars):
            reached.update(eqn.outvars)
    return [not hasattr(v, "val") and v in reached for v in jaxpr.outvars]


# --------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------


def pathwise_surrogate(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                       sample_shape: tuple[int, ...], bound_fn: BoundFn, estimator: str,
                       dreg_ratio: RatioFn | None = None,
                       phi_ratio: RatioFn | None = None) -> tuple[jax.Array, jax.Array]:
    """Surrogate bound for ``reparam``, ``stl`` or ``dreg``; returns ``(surrogate (B,), log_w)``.

    Args:
      sample_shape: ``(K,)`` or ``(M, K)``; the guide is sampled ``prod(sample_shape)``
        times per example.
      bound_fn: the bound of ``(B, *sample_shape)`` log-weights, shape ``(B,)``.
      dreg_ratio: ``d_k / c_k`` of the objective's DReG weights, ``(B, *S) -> (B, *S)``
        (needed for ``dreg``).
      phi_ratio: where ``phi`` optimises a different bound than ``theta`` (PIWAE), the
        ratio of ``phi``'s weights to ``theta``'s for ``reparam``/``stl``.
    """
    theta, phi = params["model"], params["guide"]
    batch = batch_size_of(x)
    keys = sample_keys(rng, batch, math.prod(sample_shape))
    check_continuous_latents(guide, phi, keys, x, estimator)
    ratio: RatioFn | None
    if estimator == "dreg":
        if dreg_ratio is None:
            raise ValueError("this objective has no DReG weights")
        ratio, direct = dreg_ratio, False
    else:
        ratio, direct = phi_ratio, estimator == "reparam"
    if ratio is None:  # plain autodiff: reparam, or stl's log q at stop_gradient(phi)
        _, log_p, log_q = sample_and_log_weights(model, guide, params, keys, x,
                                                 log_q_params=phi if direct else sg(phi))
        log_w = log_p - log_q
    else:
        log_w, _ = _routed(model, guide, theta, phi, keys, x, ratio_fn=ratio, pathwise=True, direct=direct,
                           score=False, sample_shape=sample_shape)
    log_w = log_w.reshape((batch, *sample_shape))
    return bound_fn(log_w), log_w


def score_surrogate(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                    sample_shape: tuple[int, ...], bound_fn: BoundFn, signal_fn: SignalFn,
                    direct: bool = True) -> tuple[jax.Array, jax.Array]:
    """Score-function surrogate ``F(log w~) + sum_k sg(s_k) (log q_k - sg(log q_k))``.

    ``z`` is never differentiated with respect to ``phi`` (it may be discrete). ``theta``
    gets ``c_k`` through ``log p``; ``phi`` gets the signals ``s_k`` on
    ``dlog q(z_k)/dphi`` plus, when ``direct``, the direct term ``-c_k dlog q(z_k)/dphi``
    of ``F``. ``x`` and closed-over arrays get the plain derivative of the value (through
    a continuous ``z`` too), without the score term.
    """
    batch = batch_size_of(x)
    keys = sample_keys(rng, batch, math.prod(sample_shape))
    shape = (batch, *sample_shape)
    log_w, score = _routed(model, guide, params["model"], params["guide"], keys, x, ratio_fn=None,
                           pathwise=False, direct=direct, score=True, sample_shape=sample_shape)
    log_w, score = log_w.reshape(shape), score.reshape(shape)
    signal = sg(signal_fn(log_w))
    extra = jnp.sum((signal * score).reshape(batch, -1), axis=-1)
    return bound_fn(log_w) + extra, log_w
