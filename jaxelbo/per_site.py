r"""Per-site estimators: pathwise gradients for the reparameterised latents, score for the rest.

A guide with both kinds of latent, ``z = (c, d)`` with ``c = t(eps, phi; d, x)``
reparameterised and ``d`` discrete (or otherwise not reparameterised), declares which is
which (:attr:`jaxelbo.Guide.reparameterized`) and gives the log-density of the discrete
sites alone (:attr:`jaxelbo.Guide.discrete_log_prob`). The discrete sites are sampled
first (or independently), so ``q(c, d) = q_D(d) q_C(c | d)`` and
``log q_C = log q - log q_D``. An objective is then asked for

``estimator={"continuous": P, "discrete": S}``

with ``P`` one of ``reparam``, ``stl``, ``dreg`` and ``S`` one of ``score``, ``vimco``:
``c`` gets ``P``'s pathwise gradient conditional on the discrete sample and ``d`` the
score-function gradient with ``S``'s baseline, as NumPyro's ``TraceGraph_ELBO`` does for
the ELBO.

The IWAE gradient of such a guide. With ``L = log 1/K sum_k w~_k``, ``w = softmax(log w~)``,
``g_k = dlog w~_k/dc_k dc_k/dphi`` (the path derivative at fixed ``d``, ``log q`` at
``stop_gradient(phi)``) and ``q_D(d_k)``'s score ``s_k = dlog q_D(d_k)/dphi``,

.. math::

   \nabla_\phi \mathbb{E}[L] = \mathbb{E}\Big[\sum_k w_k \big(g_k
       - \partial_\phi \log q_C(c_k|d_k) - s_k\big) + \sum_k (L - L_{-k}) s_k\Big]

(the total derivative at fixed ``d``, plus the score term of ``d``; ``L_{-k}`` does not
depend on ``z_k``: VIMCO's baseline for ``vimco``, IWAE_{K-1} of the others for
``score``). Conditional on ``d`` and the other samples, ``c_k ~ q_C(. | d_k)``, so the
reparameterisation identity ``E[f(c_k) dlog q_C(c_k|d_k)/dphi] = E[df/dc_k dc_k/dphi]``
applied to ``f = w_k`` (``dw_k/dlog w~_k = w_k - w_k^2``) turns the middle term into
``-(w_k - w_k^2) g_k``:

.. math::

   \text{dreg:}\quad \sum_k w_k^2 g_k - \sum_k w_k s_k + \sum_k (L - L_{-k}) s_k .

For any bound ``F`` of :func:`jaxelbo.make_objective`, ``w_k`` is ``c_k = dF/dlog w~_k`` and
``w_k^2`` the objective's DReG weight ``d_k``; ``stl`` drops ``q_C``'s direct term and keeps
``c_k g_k`` (biased for IWAE with K > 1, as ``stl`` is). Every input other than
``params["guide"]`` gets the plain derivative of the loss value.

Which objectives take one (each refuses other pairs when the loss is built, naming the valid
choices): ``elbo``, ``iwae``, ``miwae``, ``ciwae``, ``piwae``, ``renyi``, ``jvi``, ``cubo`` and any
:func:`jaxelbo.make_objective` bound, with the signals their docstrings give; ``rws`` as
``{"continuous": "dreg", "discrete": "score"}`` (the wake-phi update is not a bound's gradient:
RWS-DReG on ``c``, ``sum_k w_k dlog q_D(d_k)/dphi`` on ``d``, no direct term,
``discrete_direct=False`` below); ``tvo`` as ``{"continuous": "reparam", "discrete": "score"}``
(the covariance term for ``d`` alone). ``piwae``'s ``phi`` ascends another bound than its
``theta``: its signals carry ``phi``'s own direct term, with ``discrete_direct=False``.

Example:
  >>> import jax, jax.numpy as jnp, jaxelbo as je
  >>> model = je.Model(lambda th, z: -0.5 * z["c"] ** 2 + jnp.log(0.5),
  ...                  lambda th, x, z: -0.5 * (x[0] - z["c"] - z["d"]) ** 2)
  >>> def sample(phi, rng, x):
  ...     r1, r2 = jax.random.split(rng)
  ...     d = jax.random.bernoulli(r1, jax.nn.sigmoid(phi["a"])).astype(jnp.int32)
  ...     return {"c": phi["m"][d] + jax.random.normal(r2), "d": d}
  >>> def log_q_d(phi, x, z):
  ...     return jnp.where(z["d"] == 1, jax.nn.log_sigmoid(phi["a"]), jax.nn.log_sigmoid(-phi["a"]))
  >>> def log_q(phi, x, z):
  ...     return log_q_d(phi, x, z) - 0.5 * (z["c"] - phi["m"][z["d"]]) ** 2
  >>> guide = je.Guide(sample, log_q, reparameterized={"c": True, "d": False}, discrete_log_prob=log_q_d)
  >>> loss_fn = je.iwae(model, guide, num_samples=4, estimator={"continuous": "dreg", "discrete": "vimco"})
  >>> params = {"model": {}, "guide": {"a": jnp.array(0.0), "m": jnp.zeros(2)}}
  >>> grads = jax.jit(jax.grad(lambda p: loss_fn(p, jax.random.key(0), jnp.ones((3, 1)))[0]))(params)
  >>> grads["guide"]["m"].shape
  (2,)

References:
  Tucker, Lawson, Gu & Maddison (2019). Doubly reparameterized gradient estimators for
  Monte Carlo objectives. ICLR. arXiv:1810.04152.
  Mnih & Rezende (2016). Variational inference for Monte Carlo objectives. ICML.
  arXiv:1602.06725.
  Schulman, Heess, Weber & Abbeel (2015). Gradient estimation using stochastic
  computation graphs. NeurIPS. arXiv:1506.05254.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxelbo import estimators as est
from jaxelbo.types import Guide, Model, PyTree
from jaxelbo.weights import batch_size_of, log_prob_latents, sample_keys, sample_latents

__all__ = ["KEYS", "PerSite", "is_per_site", "parse", "per_site_surrogate"]

KEYS = ("continuous", "discrete")
sg = jax.lax.stop_gradient


class PerSite(NamedTuple):
    """A per-site estimator: ``continuous`` (pathwise) for reparameterised sites, ``discrete`` (score) for the rest."""

    continuous: str
    discrete: str

    @property
    def name(self) -> str:
        """``"dreg+vimco"``: the spelling of loss names and logs."""
        return f"{self.continuous}+{self.discrete}"


def is_per_site(estimator: object) -> bool:
    """Whether ``estimator`` is a per-site spelling (a mapping) rather than one estimator's name."""
    return isinstance(estimator, Mapping)


def parse(estimator: Mapping[str, Any], continuous: tuple[str, ...] = est.PATHWISE,
          discrete: tuple[str, ...] = est.SCORE_FUNCTION, objective: str = "this objective") -> PerSite:
    """Validate ``{"continuous": P, "discrete": S}`` and return it as a :class:`PerSite`.

    Args:
      estimator: the mapping, with exactly the keys ``continuous`` and ``discrete``.
      continuous, discrete: the estimators the objective supports for each part.
      objective: its name, for the error messages.

    Example:
      >>> parse({"continuous": "dreg", "discrete": "vimco"}).name
      'dreg+vimco'
    """
    keys = set(estimator)
    if keys != set(KEYS):
        raise ValueError(f"a per-site estimator is a dict with the keys 'continuous' and 'discrete', "
                         f"e.g. {{'continuous': 'dreg', 'discrete': 'vimco'}}; got keys {sorted(map(str, keys))}")
    spec = PerSite(estimator["continuous"], estimator["discrete"])
    for key, value, valid in (("continuous", spec.continuous, continuous), ("discrete", spec.discrete, discrete)):
        if not isinstance(value, str) or value not in valid:
            raise ValueError(f"{objective}: per-site estimator {key!r}: {value!r} is not supported; "
                             f"valid choices: {', '.join(valid)}")
    return spec


def _float_dtype() -> Any:
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def per_site_surrogate(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                       sample_shape: tuple[int, ...], bound_fn: est.BoundFn, estimator: PerSite,
                       signal_fn: est.SignalFn, dreg_ratio: est.RatioFn | None = None,
                       phi_ratio: est.RatioFn | None = None,
                       discrete_direct: bool = True) -> tuple[jax.Array, jax.Array]:
    """Surrogate bound of a per-site estimator; returns ``(surrogate (B,), log_w (B, *sample_shape))``.

    The value is ``bound_fn(log w~)``. ``theta`` gets ``c_k dlog p/dtheta``; ``phi`` gets
    the pathwise estimator ``estimator.continuous`` through the reparameterised sites (at
    fixed discrete sites), the direct term ``-c_k dlog q_D(d_k)/dphi`` and the score term
    ``sum_k s_k dlog q_D(d_k)/dphi`` with ``s = signal_fn(log w~)``; every other input the
    plain derivative of the value.

    Args:
      sample_shape: ``(K,)`` or ``(M, K)``.
      bound_fn: the bound of ``(B, *sample_shape)`` log-weights, shape ``(B,)``.
      estimator: the :class:`PerSite` choice.
      signal_fn: the discrete sites' learning signal, ``(B, *S) -> (B, *S)``.
      dreg_ratio: ``d_k / c_k`` (needed for ``continuous="dreg"``).
      phi_ratio: as for :func:`jaxelbo.estimators.pathwise_surrogate`.
      discrete_direct: ``False`` drops the direct term ``-c_k dlog q_D(d_k)/dphi`` (``log q_D``
        enters the log-weights at ``stop_gradient(phi)``), so the discrete sites get the
        signal's term alone: RWS's wake-phi update, which is not the gradient of a bound.
    """
    if guide.reparameterized is None or guide.discrete_log_prob is None:
        raise TypeError(f"per-site estimator {estimator.name!r} needs a guide that declares its reparameterised "
                        "sites and gives the others' log-density: Guide(sample, log_prob, reparameterized=..., "
                        "discrete_log_prob=...) (jaxelbo.numpyro.from_numpyro fills both)")
    discrete_log_prob = guide.discrete_log_prob
    theta, phi = params["model"], params["guide"]
    batch = batch_size_of(x)
    keys = sample_keys(rng, batch, math.prod(sample_shape))
    z_struct = jax.eval_shape(lambda p: sample_latents(guide, p, keys, x), phi)
    flags = est.reparameterized_leaves(guide, z_struct)
    assert flags is not None
    treedef = jax.tree_util.tree_structure(z_struct)
    dtypes = [leaf.dtype for leaf in jax.tree_util.tree_leaves(z_struct)]
    for (path, leaf), flag in zip(jax.tree_util.tree_flatten_with_path(z_struct)[0], flags, strict=True):
        if flag and not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(f"the guide declares z{jax.tree_util.keystr(path)} reparameterised, but it has the "
                            f"discrete dtype {leaf.dtype}; declare it False (Guide.reparameterized)")
    real = _float_dtype()

    def to_float(z: PyTree) -> PyTree:  # discrete sites held fixed, carried as floats
        leaves = jax.tree_util.tree_leaves(z)
        return jax.tree_util.tree_unflatten(treedef, [
            leaf if flag else sg(leaf).astype(leaf.dtype if jnp.issubdtype(leaf.dtype, jnp.inexact) else real)
            for leaf, flag in zip(leaves, flags, strict=True)])

    def from_float(z: PyTree) -> PyTree:
        leaves = jax.tree_util.tree_leaves(z)
        return jax.tree_util.tree_unflatten(treedef, [
            leaf if flag else leaf.astype(dtype) for leaf, flag, dtype in zip(leaves, flags, dtypes, strict=True)])

    def sample_one(p: PyTree, key: jax.Array, xx: PyTree) -> PyTree:
        return to_float(guide.sample(p, key, xx))

    def log_q_continuous(p: PyTree, xx: PyTree, z: PyTree) -> jax.Array:
        zz = from_float(z)
        return guide.log_prob(p, xx, zz) - discrete_log_prob(p, xx, zz)

    def log_q_discrete(p: PyTree, xx: PyTree, z: PyTree) -> jax.Array:
        return discrete_log_prob(p, xx, from_float(z))

    # log p(x, z) - log q_D(d): its phi enters as a "model" parameter, so it gets the
    # bound's own weights c_k (the direct term), never a pathwise ratio; with
    # discrete_direct=False it enters at stop_gradient(phi) and gets nothing.
    def direct_phi(p: PyTree) -> PyTree:
        return p if discrete_direct else sg(p)

    shifted = Model(log_prior=lambda tp, z: model.log_prior(tp[0], from_float(z)),
                    log_likelihood=lambda tp, xx, z: model.log_likelihood(tp[0], xx, from_float(z))
                    - log_q_discrete(direct_phi(tp[1]), xx, z))
    continuous = Guide(sample=sample_one, log_prob=log_q_continuous)
    _check_paths(continuous, flags, phi, keys, x, estimator)
    ratio: est.RatioFn | None
    if estimator.continuous == "dreg":
        if dreg_ratio is None:
            raise ValueError("this objective has no DReG weights")
        ratio, direct = dreg_ratio, False
    else:
        ratio, direct = phi_ratio, estimator.continuous == "reparam"
    log_w, _ = est._routed(shifted, continuous, (theta, phi), phi, keys, x, ratio_fn=ratio, pathwise=True,
                           direct=direct, score=False, sample_shape=sample_shape)
    shape = (batch, *sample_shape)
    log_w = log_w.reshape(shape)

    # the discrete sites' score, d log q_D(d_k) / d phi at fixed z, x and closed-over arrays
    z_fixed = sg(sample_latents(continuous, sg(phi), keys, sg(x)))
    log_q_c, consts = jax.closure_convert(
        lambda p, xx, zz: log_prob_latents(Guide(sample_one, log_q_discrete), p, xx, zz), phi, x, z_fixed)
    log_q_d = log_q_c(phi, sg(x), z_fixed, *[sg(c) for c in consts]).reshape(shape)
    signal = sg(signal_fn(log_w))
    extra = jnp.sum((signal * (log_q_d - sg(log_q_d))).reshape(batch, -1), axis=-1)
    return bound_fn(log_w) + extra, log_w


def _check_paths(continuous: Guide, flags: list[bool], phi: PyTree, keys: jax.Array, x: PyTree,
                 estimator: PerSite) -> None:
    """Trace-time error when a site declared reparameterised carries no derivative with respect to ``phi``."""
    def sample_continuous(p: PyTree, key: jax.Array, xx: PyTree) -> list:
        leaves = jax.tree_util.tree_leaves(continuous.sample(p, key, xx))
        return [leaf for leaf, flag in zip(leaves, flags, strict=True) if flag]

    bad = est._latents_without_derivative(Guide(sample_continuous, continuous.log_prob), phi, keys, x)
    if bad:
        raise TypeError(f"per-site estimator {estimator.name!r}: {len(bad)} site(s) the guide declares "
                        "reparameterised carry no derivative with respect to phi (a discrete sample cast to "
                        "float, or a stop_gradient); declare them False in Guide.reparameterized")

