"""Layer 4: the bounds. Each factory returns a pure ``(params, rng, x) -> (loss, aux)``.

``loss`` equals ``-mean_b bound_b`` in value whatever the estimator; ``jax.grad(loss)``
is the chosen estimator of its gradient (see :mod:`jaxelbo.estimators`). ``aux`` holds
``bound`` ``(B,)``, ``log_weights`` ``(B, K)`` (``(B, M, K)`` for ``miwae``/``piwae``),
``ess`` ``(B,)`` and, with at least 25 samples per example, ``khat`` ``(B,)``: the PSIS
k-hat of each example's M K weights (:func:`jaxelbo.psis_khat`; about 0.3% of a VAE step,
and nothing when unused under ``jit``). Every factory validates its configuration when it is called, and
the shapes of the model, guide and batch when the loss is first traced.

Example:
  >>> import jax, jax.numpy as jnp, jaxelbo as je
  >>> lg = je.models.linear_gaussian
  >>> loss_fn = je.iwae(lg.model(), lg.guide(), num_samples=8, estimator="dreg")
  >>> params = lg.optimal_params(jnp.zeros(2))
  >>> x = jnp.ones((4, 2))
  >>> loss, aux = loss_fn(params, jax.random.key(0), x)
  >>> aux["log_weights"].shape
  (4, 8)
  >>> grads = jax.grad(lambda p: loss_fn(p, jax.random.key(0), x)[0])(params)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp

from jaxelbo import estimators as est
from jaxelbo import ovis, per_site, registry, wake_sleep
from jaxelbo._validation import check_count, check_inputs, check_model_guide, check_real
from jaxelbo.psis import psis_khat, psis_tail_size
from jaxelbo.types import Aux, Estimator, Guide, LossFn, Model, PyTree
from jaxelbo.weights import effective_sample_size, leave_one_out_logsumexp, log_mean_exp

_MAX_LOG_RATIO = 80.0  # exp(80) is finite in float32; see `piwae`.


# --------------------------------------------------------------------------------------
# The one factory: any bound of one example's log-weights, every estimator
# --------------------------------------------------------------------------------------

PerExampleFn = Callable[[jax.Array], jax.Array]


def _as_estimator(estimator: str | Mapping[str, str]) -> Estimator:
    """A built-in's ``estimator`` (any string; :func:`make_objective` validates it) as the Literal type."""
    return cast(Estimator, estimator)


def _sample_shape(num_samples: int | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(num_samples, tuple):
        if not num_samples:
            raise ValueError("num_samples must be an int K or a non-empty tuple such as (M, K), got ()")
        return tuple(check_count("num_samples", n) for n in num_samples)
    return (check_count("num_samples", num_samples),)


def _check_custom_estimator(estimator: object, supported: tuple[str, ...]) -> None:
    if not isinstance(estimator, str):
        raise TypeError(f"estimator must be a string, got {estimator!r}; valid choices: {', '.join(est.ESTIMATORS)}")
    if estimator not in est.ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid choices: {', '.join(est.ESTIMATORS)}")
    if estimator not in supported:
        raise ValueError(f"make_objective: estimator {estimator!r} needs a closed-form learning signal "
                         f"(signals={{{estimator!r}: fn}}); valid choices here: {', '.join(supported)}")


def _check_bound_fn(bound_fn: PerExampleFn, sample_shape: tuple[int, ...], dtype: Any) -> None:
    try:
        out = jax.eval_shape(bound_fn, jax.ShapeDtypeStruct(sample_shape, dtype))
    except Exception as e:
        raise ValueError(f"bound_fn failed on one example's log-weights of shape {sample_shape} "
                         f"({type(e).__name__}: {e})") from e
    if not (hasattr(out, "shape") and out.shape == ()):
        got = jax.tree_util.tree_map(lambda s: s.shape, out)
        raise ValueError(f"bound_fn must map ONE example's log-weights, shape {sample_shape}, to a scalar; "
                         f"got shape {got}")


def make_objective(model: Model, guide: Guide, bound_fn: PerExampleFn, *,
                   num_samples: int | tuple[int, ...], estimator: Estimator | Mapping[str, str] = "reparam",
                   dreg_ratio: PerExampleFn | None = None,
                   signals: Mapping[str, PerExampleFn] | None = None,
                   phi_ratio: PerExampleFn | None = None, direct_score: bool = True,
                   name: str | None = None) -> LossFn:
    """The loss of any bound ``F`` of one example's log-weights, with any estimator.

    ``bound_fn`` maps ONE example's log-weights ``log w~``, an array of shape
    ``num_samples`` (``(K,)``, or ``(M, K)`` for ``num_samples=(M, K)``), to a scalar;
    it must be differentiable. The loss is ``-mean_b F(log w~_b)`` and its gradient the
    chosen estimator. With ``c = grad F`` (what ``theta`` receives on each
    ``grad log p(x, z_k)``):

    * ``reparam``: plain autodiff, ``phi`` gets ``sum_k c_k dlog w~_k / dphi``;
    * ``stl``: ``log q`` at ``stop_gradient(phi)``, ``phi`` gets ``sum_k c_k g_k`` with the
      path derivative ``g_k`` (Roeder et al. 2017); biased unless ``c`` is constant;
    * ``dreg``: ``phi`` gets ``sum_k d_k g_k``,
      :math:`d_k = c_k - \\partial c_k / \\partial \\log \\tilde w_k`
      (Tucker et al. 2019, for any smooth ``F``), from the Hessian's diagonal by autodiff
      (:func:`jaxelbo.estimators.dreg_weights`, O(N) ``jvp`` s of ``grad F`` per example),
      or from ``dreg_ratio`` where given. One forward and one backward pass;
    * ``score``: REINFORCE with the leave-one-out baseline ``F`` with ``log w~_k``
      replaced by the mean of the others (:func:`jaxelbo.estimators.leave_one_out_signal`),
      or ``signals["score"]``. ``z`` may be discrete.

    Every input other than ``params["guide"]`` (the batch ``x``, arrays the model or the
    guide close over) gets the plain derivative of the loss value, in reverse and forward
    mode alike.

    Args:
      model, guide: the :class:`~jaxelbo.Model` and :class:`~jaxelbo.Guide`.
      bound_fn: ``F``, one example's log-weights -> scalar.
      num_samples: ``K``, or a tuple such as ``(M, K)`` (``prod`` draws per example).
      estimator: ``reparam`` (default), ``stl``, ``dreg``, ``score`` (``vimco`` or another
        score-function signal only through ``signals``), or a per-site estimator
        ``{"continuous": P, "discrete": S}`` for a guide that declares its reparameterised
        sites (:mod:`jaxelbo.per_site`): ``P`` a pathwise estimator the objective supports,
        ``S`` ``score`` (``signals["score"]``, else the leave-one-out signal) or ``vimco``
        where ``signals`` gives it. With ``phi_ratio`` only with ``direct_score=False`` and
        signals that include ``phi``'s direct term (as :func:`piwae` does).
      dreg_ratio: optional closed form of ``d / c`` for one example (cheaper than autodiff
        for large N); where ``c_k`` is 0 a sample gives nothing to ``phi``.
      signals: optional closed-form learning signals per score-function estimator, e.g.
        ``{"vimco": jaxelbo.estimators.vimco_signal}``, each one example -> its shape.
      phi_ratio: where ``phi`` ascends another bound than ``theta`` (PIWAE), the ratio of
        ``phi``'s weights to ``c`` for ``reparam``/``stl``.
      direct_score: ``False`` drops ``F``'s direct ``-c_k dlog q/dphi`` term from ``score``
        (RWS's wake-phi update), and from the discrete sites of a per-site estimator.
      name: the objective's name (a registered name validates the estimator against
        :data:`jaxelbo.OBJECTIVES`); default ``"custom"``.

    Returns:
      ``loss_fn(params, rng, x) -> (loss, aux)`` (a :class:`~jaxelbo.types.LossFn`),
      pure and ``jit``-able; ``aux`` is a :class:`~jaxelbo.types.Aux` dict: ``bound``
      ``(B,)``, ``log_weights`` ``(B, *num_samples)``, ``ess`` ``(B,)`` and, with >= 25
      samples, ``khat`` ``(B,)``, all without gradients.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> def iwae_bound(lw):          # one example's K log-weights -> a scalar
      ...     return jax.nn.logsumexp(lw) - jnp.log(lw.shape[0])
      >>> mine = je.make_objective(lg.model(), lg.guide(), iwae_bound, num_samples=8, estimator="dreg")
      >>> ref = je.iwae(lg.model(), lg.guide(), num_samples=8, estimator="dreg")
      >>> params, x, rng = lg.optimal_params(jnp.zeros(2)), jnp.ones((3, 2)), jax.random.key(0)
      >>> bool(jnp.allclose(mine(params, rng, x)[0], ref(params, rng, x)[0]))
      True

    References:
      Tucker, Lawson, Gu & Maddison (2019). Doubly reparameterized gradient estimators for
      Monte Carlo objectives. ICLR. arXiv:1810.04152.
      Mnih & Rezende (2016). Variational inference for Monte Carlo objectives. ICML.
      arXiv:1602.06725.
    """
    check_model_guide(model, guide)
    if not callable(bound_fn):
        raise TypeError(f"bound_fn must be a function of one example's log-weights, got {bound_fn!r}")
    sample_shape = _sample_shape(num_samples)
    signals = dict(signals or {})
    sites: per_site.PerSite | None = None
    if per_site.is_per_site(estimator):
        label = name or "make_objective"
        if phi_ratio is not None and direct_score:
            raise ValueError(f"{label}: a per-site estimator with phi_ratio (phi ascends another bound than "
                             "theta) needs direct_score=False and signals that carry phi's own direct term "
                             "-c'_k, as piwae's do: the discrete sites' direct term would get theta's weights")
        # the pathwise part: what the objective supports; the discrete part: "score" (the
        # objective's signal, else the leave-one-out one of F) and the signals it gives
        valid = registry.get(name).estimators if name is not None and name in registry.names() else est.PATHWISE
        score_valid = tuple(e for e in est.SCORE_FUNCTION if e == "score" or e in signals)
        sites = per_site.parse(cast(Mapping[str, Any], estimator),
                               tuple(e for e in est.PATHWISE if e in valid), score_valid, label)
    elif name is not None and name in registry.names():
        registry.check_estimator(name, cast(str, estimator))
    else:
        supported = tuple(e for e in est.ESTIMATORS if e in est.PATHWISE or e == "score" or e in signals)
        _check_custom_estimator(estimator, supported)
    label = name or "custom"
    _check_bound_fn(bound_fn, sample_shape, jnp.float32)
    batched_bound = jax.vmap(bound_fn)

    def batched(fn: PerExampleFn | None) -> est.RatioFn | None:
        return None if fn is None else jax.vmap(fn)

    if dreg_ratio is None:
        def dreg_ratio(lw: jax.Array) -> jax.Array:
            return est.dreg_ratio_from_weights(*est.dreg_weights(bound_fn, lw))

    def generic_signal(lw: jax.Array) -> jax.Array:
        return est.leave_one_out_signal(bound_fn, lw)

    signal = signals.get(sites.discrete if sites is not None else cast(str, estimator), generic_signal)

    def loss_fn(params: dict, rng: jax.Array, x: PyTree) -> tuple[jax.Array, Aux]:
        check_inputs(model, guide, params, rng, x)
        if sites is not None:
            surrogate, log_w = per_site.per_site_surrogate(
                model, guide, params, rng, x, sample_shape=sample_shape, bound_fn=batched_bound, estimator=sites,
                signal_fn=jax.vmap(signal), dreg_ratio=batched(dreg_ratio), phi_ratio=batched(phi_ratio),
                discrete_direct=direct_score)
        elif estimator in est.PATHWISE:
            surrogate, log_w = est.pathwise_surrogate(
                model, guide, params, rng, x, sample_shape=sample_shape, bound_fn=batched_bound,
                estimator=estimator, dreg_ratio=batched(dreg_ratio), phi_ratio=batched(phi_ratio))
        else:
            surrogate, log_w = est.score_surrogate(
                model, guide, params, rng, x, sample_shape=sample_shape, bound_fn=batched_bound,
                signal_fn=jax.vmap(signal), direct=direct_score)
        log_w = jax.lax.stop_gradient(log_w)
        ess = effective_sample_size(log_w, axis=-1)
        aux: Aux = {"bound": jax.lax.stop_gradient(surrogate), "log_weights": log_w,
                    "ess": ess.reshape(ess.shape[0], -1).mean(axis=-1)}
        flat = log_w.reshape(log_w.shape[0], -1)
        if psis_tail_size(flat.shape[-1]) >= 5:  # PSIS fits a tail of at least 5 weights
            aux["khat"] = psis_khat(flat)
        return -jnp.mean(surrogate), aux

    spelled = sites.name if sites is not None else estimator
    loss_fn.__name__ = f"{label}_{spelled}_loss"
    loss_fn.__doc__ = f"-mean {label} bound; gradient: {spelled} estimator. Returns (loss, aux)."
    return loss_fn


def _softmax(log_w: jax.Array) -> jax.Array:
    return jax.nn.softmax(log_w, axis=-1)


# --------------------------------------------------------------------------------------
# The bounds
# --------------------------------------------------------------------------------------


def elbo(model: Model, guide: Guide, *, num_samples: int = 1,
         estimator: str | Mapping[str, str] = "reparam") -> LossFn:
    """The K-sample ELBO, ``mean_k log w~_k`` (Kingma & Welling 2014, arXiv:1312.6114).

    .. math:: \\mathcal{L}_K = \\frac{1}{K} \\sum_k \\log \\frac{p_\\theta(x, z_k)}{q_\\phi(z_k|x)}

    Estimators: ``reparam``, ``stl`` (Roeder et al. 2017), ``score`` (leave-one-out
    baseline ``mean_{j != k} log w~_j`` when K > 1).

    Args:
      model: a :class:`~jaxelbo.Model` of per-example ``log_prior`` and ``log_likelihood``.
      guide: a :class:`~jaxelbo.Guide`; reparameterised for ``reparam``, ``stl`` and ``dreg``.
      num_samples: K >= 1 draws per example (default 1).
      estimator: ``reparam`` (default), ``stl`` or ``score``; or per site,
        ``{"continuous": "reparam" | "stl", "discrete": "score"}`` (:mod:`jaxelbo.per_site`).

    Returns:
      ``loss_fn(params, rng, x) -> (loss, aux)``, pure and ``jit``-able. It takes
      ``params = {"model": theta, "guide": phi}`` (any pytrees, as the model and the guide
      use them), a PRNG key ``rng`` and a batch ``x`` (a pytree whose leaves share a
      leading axis B). ``loss`` is the scalar ``-mean_b ELBO_K(x_b)`` and ``jax.grad`` of it
      is the chosen estimator; ``aux`` holds ``bound`` ``(B,)``, ``log_weights``
      ``(B, K)``, ``ess`` ``(B,)`` and, with >= 25 samples, ``khat`` ``(B,)``, all without gradients.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> loss_fn = je.elbo(lg.model(), lg.guide(), num_samples=4, estimator="stl")
      >>> loss, aux = loss_fn(lg.optimal_params(jnp.zeros(2)), jax.random.key(0), jnp.ones((3, 2)))
      >>> aux["log_weights"].shape
      (3, 4)
    """
    k = check_count("num_samples", num_samples)
    return make_objective(model, guide, jnp.mean, num_samples=k, estimator=_as_estimator(estimator),
                          signals={"score": est.elbo_score_signal}, name="elbo")


def iwae(model: Model, guide: Guide, *, num_samples: int, estimator: str | Mapping[str, str] = "reparam",
         gamma: float | None = None, num_auxiliary: int | None = None) -> LossFn:
    """The importance-weighted bound (Burda, Grosse & Salakhutdinov 2016, arXiv:1509.00519).

    .. math:: \\mathcal{L}_K = \\log \\frac{1}{K} \\sum_k \\tilde w_k
       \\;\\le\\; \\mathcal{L}_{K+1} \\;\\le\\; \\log p_\\theta(x)

    ``theta`` receives ``sum_k w_k grad log p(x, z_k)``. Estimators: ``reparam``, ``stl``
    (biased for K > 1), ``dreg`` (``phi`` gets ``sum_k w_k^2 g_k``; Tucker et al. 2019,
    arXiv:1810.04152), ``score`` (leave-one-out IWAE_{K-1} baseline), ``vimco`` (Mnih &
    Rezende 2016, arXiv:1602.06725).

    Args:
      model: a :class:`~jaxelbo.Model` of per-example ``log_prior`` and ``log_likelihood``.
      guide: a :class:`~jaxelbo.Guide`; reparameterised for ``reparam``, ``stl`` and ``dreg``.
      num_samples: K >= 1 importance samples per example.
      estimator: ``reparam`` (default), ``stl``, ``dreg``, ``score``, ``vimco``, ``ovis`` or
        ``ovis-mc`` (the last four also for discrete latents; ``ovis``/``ovis-mc`` are the
        control variates of Liévin et al. 2020, arXiv:2008.01998, see :mod:`jaxelbo.ovis`); or
        per site for a mixed guide, ``{"continuous": "dreg", "discrete": "vimco"}``
        (any of ``reparam``/``stl``/``dreg`` with ``score``/``vimco``; :mod:`jaxelbo.per_site`).
      gamma: ``ovis`` only: the asymptotic control variate's ``gamma`` (default 1, the
        paper's; biased unless 0, see :mod:`jaxelbo.ovis`).
      num_auxiliary: ``ovis-mc`` only: S extra draws for the control variate (default K).

    Returns:
      ``loss_fn(params, rng, x) -> (loss, aux)``, pure and ``jit``-able. It takes
      ``params = {"model": theta, "guide": phi}`` (any pytrees, as the model and the guide
      use them), a PRNG key ``rng`` and a batch ``x`` (a pytree whose leaves share a
      leading axis B). ``loss`` is the scalar ``-mean_b IWAE_K(x_b)`` and ``jax.grad`` of it
      is the chosen estimator; ``aux`` holds ``bound`` ``(B,)``, ``log_weights``
      ``(B, K)``, ``ess`` ``(B,)`` and, for K >= 25, ``khat`` ``(B,)``, all without gradients.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> loss_fn = je.iwae(lg.model(), lg.guide(), num_samples=32, estimator="dreg")
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
      >>> (loss, aux), grads = step(params, jax.random.key(0), jnp.ones((3, 2)))
      >>> sorted(aux), sorted(grads)
      (['bound', 'ess', 'khat', 'log_weights'], ['guide', 'model'])
    """
    k = check_count("num_samples", num_samples)
    for name, value, user in (("gamma", gamma, "ovis"), ("num_auxiliary", num_auxiliary, "ovis-mc")):
        if value is not None and estimator != user:
            raise ValueError(f"iwae: {name} is a setting of estimator {user!r} only, not of {estimator!r}")
    if estimator in ("ovis", "ovis-mc") and k < 2:
        raise ValueError(f"iwae: estimator {estimator!r} leaves one sample out, so it needs num_samples >= 2")
    if estimator == "ovis-mc":
        check_model_guide(model, guide)
        s = k if num_auxiliary is None else check_count("num_auxiliary", num_auxiliary)
        return ovis.ovis_mc_loss(model, guide, num_samples=k, num_auxiliary=s)
    g = ovis.DEFAULT_GAMMA if gamma is None else check_real("gamma", gamma)
    return make_objective(model, guide, log_mean_exp, num_samples=k, estimator=_as_estimator(estimator),
                          dreg_ratio=_softmax, name="iwae",
                          signals={"score": est.iwae_score_signal, "vimco": est.vimco_signal,
                                   "ovis": lambda lw: ovis.ovis_asymptotic_signal(lw, g)})


def miwae(model: Model, guide: Guide, *, num_outer: int, num_inner: int,
          estimator: str | Mapping[str, str] = "reparam") -> LossFn:
    """Mean of M independent IWAE_K bounds (Rainforth et al. 2018, arXiv:1802.04537).

    .. math:: \\mathcal{L}_{M,K} = \\frac{1}{M} \\sum_m \\log \\frac{1}{K} \\sum_k \\tilde w_{m,k}

    ``dreg`` gives ``phi`` the mean of the M IWAE-DReG terms.

    Args:
      model: a :class:`~jaxelbo.Model` of per-example ``log_prior`` and ``log_likelihood``.
      guide: a :class:`~jaxelbo.Guide`; reparameterised for ``reparam``, ``stl`` and ``dreg``.
      num_outer: M >= 1 independent groups per example.
      num_inner: K >= 1 samples per group (M K draws per example in all).
      estimator: ``reparam`` (default), ``stl`` or ``dreg``; or per site for a mixed guide
        (:mod:`jaxelbo.per_site`), ``{"continuous": P, "discrete": S}`` with ``P`` one of those
        and ``S`` ``score`` or ``vimco``: the discrete sites of ``z_mk`` get the learning signal
        ``(L_m - L_m^(-k)) / M`` of their group's IWAE_K, with IWAE_{K-1} of the group's others
        (``score``) or VIMCO's baseline (``vimco``) as ``L_m^(-k)``.

    Returns:
      ``loss_fn(params, rng, x) -> (loss, aux)``, pure and ``jit``-able. It takes
      ``params = {"model": theta, "guide": phi}`` (any pytrees, as the model and the guide
      use them), a PRNG key ``rng`` and a batch ``x`` (a pytree whose leaves share a
      leading axis B). ``loss`` is the scalar ``-mean_b MIWAE_{M,K}(x_b)`` and ``jax.grad`` of it
      is the chosen estimator; ``aux`` holds ``bound`` ``(B,)``, ``log_weights``
      ``(B, M, K)``, ``ess`` ``(B,)`` and, with >= 25 samples, ``khat`` ``(B,)``, all without gradients.
      ``ess`` is the mean over the M groups.
    """
    m = check_count("num_outer", num_outer)
    k = check_count("num_inner", num_inner)
    return make_objective(model, guide, lambda lw: jnp.mean(log_mean_exp(lw), axis=-1), num_samples=(m, k),
                          estimator=_as_estimator(estimator), dreg_ratio=_softmax, name="miwae",
                          signals={"score": lambda lw: est.iwae_score_signal(lw) / m,
                                   "vimco": lambda lw: est.vimco_signal(lw) / m})


def ciwae(model: Model, guide: Guide, *, num_samples: int, beta: float = 0.5,
          estimator: str | Mapping[str, str] = "reparam") -> LossFn:
    """Convex combination ``beta * ELBO_K + (1 - beta) * IWAE_K`` (Rainforth et al. 2018).

    The weights of sample k are ``c_k = beta/K + (1 - beta) w_k``; ``dreg`` applies only to
    the IWAE part: ``phi`` gets ``sum_k (beta/K + (1 - beta) w_k^2) g_k``.

    Args:
      model: a :class:`~jaxelbo.Model` of per-example ``log_prior`` and ``log_likelihood``.
      guide: a :class:`~jaxelbo.Guide`; reparameterised for ``reparam``, ``stl`` and ``dreg``.
      num_samples: K >= 1 samples per example, shared by both terms.
      beta: the ELBO's weight, in ``[0, 1]`` (0: IWAE, 1: the ELBO); default 0.5, the
        default of ``jaxelbo train --beta`` and of :func:`jaxelbo.registry.make` too.
      estimator: ``reparam`` (default), ``stl`` or ``dreg``; or per site for a mixed guide
        (:mod:`jaxelbo.per_site`), ``{"continuous": P, "discrete": S}`` with ``P`` one of those
        and ``S`` ``score`` or ``vimco``: the discrete sites get ``beta`` times the ELBO's
        leave-one-out signal plus ``1 - beta`` times IWAE's (``score``) or VIMCO's (``vimco``).

    Returns:
      ``loss_fn(params, rng, x) -> (loss, aux)``, pure and ``jit``-able. It takes
      ``params = {"model": theta, "guide": phi}`` (any pytrees, as the model and the guide
      use them), a PRNG key ``rng`` and a batch ``x`` (a pytree whose leaves share a
      leading axis B). ``loss`` is the scalar ``-mean_b CIWAE_{K,beta}(x_b)`` and ``jax.grad`` of it
      is the chosen estimator; ``aux`` holds ``bound`` ``(B,)``, ``log_weights``
      ``(B, K)``, ``ess`` ``(B,)`` and, with >= 25 samples, ``khat`` ``(B,)``, all without gradients.
    """
    k = check_count("num_samples", num_samples)
    beta = check_real("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")

    def bound_fn(lw):
        return beta * jnp.mean(lw, axis=-1) + (1.0 - beta) * log_mean_exp(lw)

    def dreg_ratio(lw):
        w = _softmax(lw)
        if beta == 0.0:
            return w
        return (beta / k + (1.0 - beta) * w * w) / (beta / k + (1.0 - beta) * w)

    def signal(iwae_signal: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
        return lambda lw: beta * est.elbo_score_signal(lw) + (1.0 - beta) * iwae_signal(lw)

    return make_objective(model, guide, bound_fn, num_samples=k, estimator=_as_estimator(estimator),
                          dreg_ratio=dreg_ratio, name="ciwae",
                          signals={"score": signal(est.iwae_score_signal), "vimco": signal(est.vimco_signal)})


def piwae(model: Model, guide: Guide, *, num_outer: int, num_inner: int,
          estimator: str | Mapping[str, str] = "reparam") -> LossFn:
    """Partially importance-weighted auto-encoder (Rainforth et al. 2018, arXiv:1802.04537).

    ``theta`` is trained on IWAE_{MK} over all ``M*K`` samples (weights
    ``W_mk = softmax_all(log w~)``), ``phi`` on MIWAE_{M,K} (weights
    ``w_mk / M``, ``w`` normalised within group m), from the same samples in one pass.
    The reported bound (and the loss value) is IWAE_{MK}. ``dreg`` gives ``phi``
    ``1/M sum_mk w_mk^2 g_mk``.

    Numerics: ``phi``'s cotangents are ``theta``'s scaled by ``(w_mk / M) / W_mk``; a
    group whose share of the total weight underflows (below ``exp(-80)`` in float32)
    contributes nothing to ``phi``'s gradient.

    Args:
      model: a :class:`~jaxelbo.Model` of per-example ``log_prior`` and ``log_likelihood``.
      guide: a :class:`~jaxelbo.Guide`; reparameterised for ``reparam``, ``stl`` and ``dreg``.
      num_outer: M >= 1 groups (``phi``'s MIWAE_{M,K}).
      num_inner: K >= 1 samples per group.
      estimator: ``reparam`` (default) or ``dreg``; or per site for a mixed guide
        (:mod:`jaxelbo.per_site`), ``{"continuous": "reparam" | "dreg", "discrete": "score" | "vimco"}``:
        the discrete sites get MIWAE's score-function gradient (``phi``'s bound), i.e. the
        learning signal ``(L_m - L_m^(-k) - w_mk) / M`` of :func:`miwae` with MIWAE's own
        direct term ``-w_mk / M`` folded in, while ``theta`` keeps IWAE_{MK}'s weights.

    Returns:
      ``loss_fn(params, rng, x) -> (loss, aux)``, pure and ``jit``-able. It takes
      ``params = {"model": theta, "guide": phi}`` (any pytrees, as the model and the guide
      use them), a PRNG key ``rng`` and a batch ``x`` (a pytree whose leaves share a
      leading axis B). ``loss`` is the scalar ``-mean_b IWAE_{MK}(x_b)`` and ``jax.grad`` of it
      is the chosen estimator; ``aux`` holds ``bound`` ``(B,)``, ``log_weights``
      ``(B, M, K)``, ``ess`` ``(B,)`` and, with >= 25 samples, ``khat`` ``(B,)``, all without gradients.
      ``ess`` is the mean over the M groups.
    """
    m = check_count("num_outer", num_outer)
    k = check_count("num_inner", num_inner)

    def log_group_share(lw):  # log of (1/M) / (sum_k W_mk) = LSE_all - LSE_m - log M
        lse_m = jax.nn.logsumexp(lw, axis=-1, keepdims=True)
        lse_all = jax.nn.logsumexp(lw, axis=(-2, -1), keepdims=True)
        return lse_all - lse_m - math.log(m), lse_m

    def phi_ratio(lw):
        log_r, _ = log_group_share(lw)
        return jnp.broadcast_to(jnp.exp(jnp.minimum(log_r, _MAX_LOG_RATIO)), lw.shape)

    def dreg_ratio(lw):
        log_r, lse_m = log_group_share(lw)
        return jnp.exp(jnp.minimum(log_r + lw - lse_m, _MAX_LOG_RATIO))

    # per site: phi's (MIWAE's) direct term on the discrete sites rides in the signal (direct_score=False;
    # the whole-guide score estimators, which direct_score also governs, are not piwae's)
    def signal(iwae_signal: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
        return lambda lw: (iwae_signal(lw) - _softmax(lw)) / m

    return make_objective(model, guide, lambda lw: log_mean_exp(lw.reshape(-1)), num_samples=(m, k),
                          estimator=_as_estimator(estimator), phi_ratio=phi_ratio, dreg_ratio=dreg_ratio, name="piwae",
                          signals={"score": signal(est.iwae_score_signal), "vimco": signal(est.vimco_signal)},
                          direct_score=False)


def renyi(model: Model, guide: Guide, *, num_samples: int, alpha: float = 0.5,
          estimator: str | Mapping[str, str] = "reparam") -> LossFn:
    """The variational Renyi bound (Li & Turner 2016, arXiv:1602.02311).

    .. math:: \\mathcal{L}_\\alpha = \\frac{1}{1-\\alpha}
       \\log \\frac{1}{K} \\sum_k \\tilde w_k^{1-\\alpha}

    ``alpha = 0`` is IWAE; ``alpha = 1`` is its limit, the ELBO (computed as such, not
    by dividing by zero). Both parameters get weights ``v = softmax((1 - alpha) log w~)``;
    ``dreg`` gives ``phi`` ``sum_k (alpha v_k + (1 - alpha) v_k^2) g_k``, from the same
    reparameterisation identity as IWAE-DReG (``alpha = 1`` reduces it to STL).

    Args:
      model: a :class:`~jaxelbo.Model` of per-example ``log_prior`` and ``log_likelihood``.
      guide: a :class:`~jaxelbo.Guide`; reparameterised for ``reparam``, ``stl`` and ``dreg``.
      num_samples: K >= 1 samples per example.
      alpha: the order, any finite float (0: IWAE, 1: the ELBO); default 0.5, the default
        of ``jaxelbo train --objective renyi --alpha`` and of :func:`jaxelbo.registry.make` too.
      estimator: ``reparam`` (default), ``stl`` or ``dreg``; or per site for a mixed guide
        (:mod:`jaxelbo.per_site`), ``{"continuous": P, "discrete": S}`` with ``P`` one of those
        and ``S`` ``score`` (baseline: the bound of the K - 1 other samples) or ``vimco`` (the
        bound with ``log w~_k`` replaced by the mean of the others, VIMCO's construction);
        both are IWAE's at ``alpha = 0`` and the ELBO's leave-one-out signal at ``alpha = 1``.

    Returns:
      ``loss_fn(params, rng, x) -> (loss, aux)``, pure and ``jit``-able. It takes
      ``params = {"model": theta, "guide": phi}`` (any pytrees, as the model and the guide
      use them), a PRNG key ``rng`` and a batch ``x`` (a pytree whose leaves share a
      leading axis B). ``loss`` is the scalar ``-mean_b L_alpha(x_b)`` and ``jax.grad`` of it
      is the chosen estimator; ``aux`` holds ``bound`` ``(B,)``, ``log_weights``
      ``(B, K)``, ``ess`` ``(B,)`` and, with >= 25 samples, ``khat`` ``(B,)``, all without gradients.
    """
    k = check_count("num_samples", num_samples)
    alpha = check_real("alpha", alpha)

    def bound_fn(lw):
        if alpha == 1.0:
            return jnp.mean(lw, axis=-1)
        return log_mean_exp((1.0 - alpha) * lw) / (1.0 - alpha)

    def dreg_ratio(lw):
        return alpha + (1.0 - alpha) * _softmax((1.0 - alpha) * lw)

    def score_signal(lw):  # L - L_alpha of the K - 1 others
        if alpha == 1.0:
            return est.elbo_score_signal(lw)
        bound = bound_fn(lw)[..., None]
        if k == 1:
            return jnp.broadcast_to(bound, lw.shape)
        a = 1.0 - alpha
        return bound - (leave_one_out_logsumexp(a * lw) - math.log(k - 1)) / a

    return make_objective(model, guide, bound_fn, num_samples=k, estimator=_as_estimator(estimator),
                          dreg_ratio=dreg_ratio, name="renyi",
                          signals={"score": score_signal, "vimco": lambda lw: est.leave_one_out_signal(bound_fn, lw)})


def rws(model: Model, guide: Guide, *, num_samples: int, estimator: str | Mapping[str, str] = "dreg",
        alpha: float = 1.0, insomnia: float = 1.0, num_sleep_samples: int | None = None,
        defensive: float = 0.0) -> LossFn:
    """Reweighted wake-sleep (Bornschein & Bengio 2015, arXiv:1406.2751) and DReG(alpha).

    ``theta`` ascends IWAE_K (``sum_k w_k grad log p(x, z_k)``); ``phi`` follows the
    wake-phi update, which minimises ``KL(p(z|x) || q_phi(z|x))``: ascent direction
    ``sum_k w_k grad log q(z_k)`` with ``z`` held constant (``score``), or its
    doubly-reparameterised form ``sum_k (w_k - w_k^2) g_k`` (``dreg``; Tucker et al.
    2019). The loss value is ``-IWAE_K``.

    With ``alpha < 1``, ``dreg`` is Tucker et al.'s DReG(alpha): ``phi`` ascends

    .. math:: \\sum_k \\big(\\alpha w_k + (1 - 2\\alpha) w_k^2\\big) g_k
       = \\alpha \\,\\text{(RWS-DReG)} + (1 - \\alpha) \\,\\text{(IWAE-DReG)},

    so ``alpha = 0`` is IWAE-DReG (``phi`` ascends IWAE_K too) and ``alpha = 1`` (the
    default) the wake-phi update; Tucker et al. use ``alpha = 0.9``. ``score`` supports
    only ``alpha = 1``.

    The other phi updates of Le et al. (2019) (:mod:`jaxelbo.wake_sleep`):

    - ``insomnia = 0``: **sleep-phi**, ascend ``E_{p_theta(z, x)}[log q_phi(z | x)]``,
      estimated by the mean over ``num_sleep_samples`` ancestral draws of
      :attr:`Model.sample` (at ``stop_gradient(theta)``); ``phi``'s loss gradient is minus
      that mean. ``0 < insomnia < 1`` mixes ``insomnia * wake + (1 - insomnia) * sleep``
      (Pyro's convention). The loss value and ``theta``'s gradient do not depend on
      ``insomnia``: the wake samples are drawn from ``rng`` as for ``insomnia = 1`` and the
      sleep draws from ``fold_in(rng, 1)``.
    - ``defensive = delta > 0``: wake-phi with proposals from
      ``(1 - delta) q(z|x) + delta p(z)`` and
      ``log w~ = log p(x, z) - log((1 - delta) q(z|x) + delta p(z))`` (``score`` only;
      ``z`` is drawn from the prior through :attr:`Model.sample`). ``theta`` gets
      ``sum_k w_k grad log p(x, z_k)`` with these weights.

    **Mixed guides.** The wake-phi update holds ``z`` fixed, so ``score`` needs no
    reparameterisation and already suits a guide with discrete sites: every site gets
    ``sum_k w_k grad log q(z_k)``. The per-site estimator
    ``{"continuous": "dreg", "discrete": "score"}`` (:mod:`jaxelbo.per_site`) gives the
    reparameterised sites ``c`` the doubly-reparameterised form instead, conditional on the
    discrete sample ``d`` (the reparameterisation identity holds for ``c_k ~ q_C(. | d_k)``
    with ``d`` fixed, and ``log q_D(d_k)`` does not depend on ``c_k``):

    .. math:: \\sum_k \\big(\\alpha w_k + (1 - 2\\alpha) w_k^2\\big) g_k
       + \\sum_k \\big(\\alpha w_k + (1 - \\alpha)(L - L_{-k} - w_k)\\big) s_k,

    ``s_k = dlog q_D(d_k)/dphi``, ``L_{-k}`` the IWAE_{K-1} bound of the others (the IWAE
    share's score baseline, present only for ``alpha < 1``); both times ``insomnia``. At
    ``alpha = 1`` the discrete sites get the wake-phi ``sum_k w_k s_k``, so this estimator
    and ``score`` have the same expectation. ``reparam``/``stl`` (gradients of a bound, which
    wake-phi is not) and ``vimco`` are refused, as is ``defensive > 0``.

    Args:
      num_samples: K.
      estimator: ``dreg`` (default) or ``score``; or ``{"continuous": "dreg", "discrete": "score"}``
        for a guide that declares its reparameterised sites.
      alpha: the wake-phi share of ``phi``'s update, in ``[0, 1]``.
      insomnia: the wake share of ``phi``'s update, in ``[0, 1]`` (1: wake-phi, 0: sleep-phi).
      num_sleep_samples: draws from the model per step for sleep-phi (default ``num_samples``).
      defensive: ``delta`` in ``[0, 1]``, the prior's share of the wake proposal (default 0).

    Returns:
      ``loss_fn(params, rng, x) -> (loss, aux)``, pure and ``jit``-able. It takes
      ``params = {"model": theta, "guide": phi}`` (any pytrees, as the model and the guide
      use them), a PRNG key ``rng`` and a batch ``x`` (a pytree whose leaves share a
      leading axis B). ``loss`` is the scalar ``-mean_b IWAE_K(x_b)`` and ``jax.grad`` of it
      is the chosen estimator; ``aux`` holds ``bound`` ``(B,)``, ``log_weights``
      ``(B, K)``, ``ess`` ``(B,)`` and, with >= 25 samples, ``khat`` ``(B,)``, all without gradients.
      Its value is IWAE's; only ``phi``'s gradient differs.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> loss_fn = je.rws(lg.model(), lg.guide(), num_samples=8, alpha=0.9)
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> grads = jax.jit(jax.grad(lambda p: loss_fn(p, jax.random.key(0), jnp.ones((3, 2)))[0]))(params)

      >>> sleep = je.rws(lg.model(), lg.guide(), num_samples=8, insomnia=0.0, num_sleep_samples=16)
      >>> grads = jax.jit(jax.grad(lambda p: sleep(p, jax.random.key(0), jnp.ones((3, 2)))[0]))(params)

    References:
      Tucker, Lawson, Gu & Maddison (2019). Doubly reparameterized gradient estimators for
      Monte Carlo objectives. ICLR. arXiv:1810.04152.
      Le, Kosiorek, Siddharth, Teh & Wood (2019). Revisiting reweighted wake-sleep for models
      with stochastic control flow. UAI. arXiv:1805.10469.
    """
    k = check_count("num_samples", num_samples)
    alpha = check_real("alpha", alpha)
    insomnia = check_real("insomnia", insomnia)
    defensive = check_real("defensive", defensive)
    if not 0.0 <= insomnia <= 1.0:
        raise ValueError(f"rws: insomnia must lie in [0, 1] (1 wake-phi, 0 sleep-phi), got {insomnia}")
    if not 0.0 <= defensive <= 1.0:
        raise ValueError(f"rws: defensive must lie in [0, 1], got {defensive}")
    num_sleep = k if num_sleep_samples is None else check_count("num_sleep_samples", num_sleep_samples)
    if insomnia < 1.0:
        wake_sleep.require_sample(model, f"rws with insomnia={insomnia} (sleep-phi)")
    if defensive > 0.0:
        wake_sleep.require_sample(model, f"rws with defensive={defensive} (proposals from the prior)")
        if estimator != "score":
            raise ValueError(f"rws: defensive={defensive} needs estimator 'score' (the mixture proposal is not "
                             f"reparameterised), got {estimator!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"rws: alpha must lie in [0, 1], got {alpha}")
    if estimator == "score" and alpha != 1.0:
        raise ValueError(f"rws: estimator 'score' supports only alpha = 1 (the wake-phi update), got {alpha}; "
                         "use estimator 'dreg' for DReG(alpha)")

    def wake_signal(lw):  # alpha * wake-phi + (1 - alpha) * IWAE's score term (its direct term included)
        w = _softmax(lw)
        if alpha == 1.0:
            return insomnia * w
        return insomnia * (alpha * w + (1.0 - alpha) * (est.iwae_score_signal(lw) - w))

    if defensive > 0.0:
        check_model_guide(model, guide)
        registry.check_estimator("rws", cast(str, estimator))
        wake = wake_sleep.defensive_wake_loss(model, guide, num_samples=k, defensive=defensive, insomnia=insomnia)
    else:
        wake = make_objective(model, guide, log_mean_exp, num_samples=k, estimator=_as_estimator(estimator),
                              dreg_ratio=lambda lw: insomnia * (alpha + (1.0 - 2.0 * alpha) * _softmax(lw)),
                              signals={"score": wake_signal}, direct_score=False, name="rws")
    if insomnia == 1.0:
        return wake

    def loss_fn(params: dict, rng: jax.Array, x: PyTree) -> tuple[jax.Array, dict]:
        loss, aux = wake(params, rng, x)
        sleep = wake_sleep.sleep_phi_surrogate(model, guide, params, jax.random.fold_in(rng, 1),
                                               num_sleep_samples=num_sleep)
        return loss + (1.0 - insomnia) * sleep, aux

    spelled = per_site.parse(estimator).name if isinstance(estimator, Mapping) else estimator
    loss_fn.__name__ = f"rws_{spelled}_insomnia_loss"
    loss_fn.__doc__ = f"-mean IWAE bound; phi: {insomnia:g} wake + {1 - insomnia:g} sleep. Returns (loss, aux)."
    return loss_fn


def jvi_bound(log_weights: jax.Array) -> jax.Array:
    """The jackknife bound ``K IWAE_K - (K - 1) mean_i IWAE_{K-1}^(-i)`` along the last axis.

    Computed as ``IWAE_K + (K - 1) mean_i (LSE - LSE_{-i} - log(K / (K - 1)))`` (no
    cancellation between two large multiples); ``LSE_{-i}`` from
    :func:`jaxelbo.weights.leave_one_out_logsumexp`. Needs K >= 2.
    """
    k = log_weights.shape[-1]
    lse = jax.nn.logsumexp(log_weights, axis=-1, keepdims=True)
    gaps = lse - leave_one_out_logsumexp(log_weights) - math.log(k / (k - 1))
    return lse[..., 0] - math.log(k) + (k - 1) * jnp.mean(gaps, axis=-1)


def jvi_weights(log_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(c, d)``: JVI's own weights ``c_k = dJ/dlog w~_k`` and its DReG weights ``d_k``.

    With ``w = softmax(log w~)`` and ``w^(-i)_k = w~_k / sum_{j != i} w~_j`` (the weights
    of the bound that leaves sample i out),

    .. math:: c_k = K w_k - \\frac{K-1}{K} \\sum_{i \\ne k} w^{(-i)}_k, \\qquad
              d_k = K w_k^2 - \\frac{K-1}{K} \\sum_{i \\ne k} \\big(w^{(-i)}_k\\big)^2 .

    ``d`` follows from the IWAE-DReG identity applied to each term (each IWAE_{K-1}^(-i)
    is an IWAE bound of the K - 1 samples it keeps, whose DReG weights are its own
    squared normalised weights); equivalently ``d_k = c_k - dc_k / dlog w~_k``.
    ``sum_k c_k = 1``, but single ``c_k`` may be zero or negative. Sums over ``i != k``
    are leave-one-out log-sum-exps, so the cost is O(K).
    """
    k = log_weights.shape[-1]
    lw = log_weights - jnp.max(log_weights, axis=-1, keepdims=True)
    loo = leave_one_out_logsumexp(lw)                                  # LSE_{-i}
    w = _softmax(lw)
    c = k * w - (k - 1) / k * jnp.exp(lw + leave_one_out_logsumexp(-loo))
    d = k * w * w - (k - 1) / k * jnp.exp(2.0 * lw + leave_one_out_logsumexp(-2.0 * loo))
    return c, d


def jvi(model: Model, guide: Guide, *, num_samples: int, estimator: str | Mapping[str, str] = "reparam") -> LossFn:
    """Jackknife variational inference (Nowozin 2018), first order.

    .. math:: \\mathcal{J}_K = K \\mathcal{L}_K - \\frac{K-1}{K} \\sum_{i=1}^K
       \\mathcal{L}_{K-1}^{(-i)},

    where ``L_{K-1}^(-i)`` is the IWAE bound of the K - 1 samples other than i. The
    jackknife removes the O(1/K) term of IWAE's bias, leaving O(1/K^2). **JVI is not a
    lower bound** on ``log p(x)``: it can overshoot it, and its weights ``c_k`` (what
    ``theta`` receives, see :func:`jvi_weights`) can be negative.

    Estimators: ``reparam`` (total derivative) and ``dreg`` (JVI-DReG: ``phi`` gets
    ``sum_k d_k g_k`` with the weights ``d`` of :func:`jvi_weights`; Tucker et al. 2019).
    ``dreg`` saves ``r_k = d_k / c_k`` in the forward pass, with ``c`` from the same
    autodiff of the bound as the backward pass, so ``phi``'s cotangent ``r_k c_k`` is
    ``d_k`` for positive and negative ``c_k`` alike; a sample whose ``c_k`` underflows
    (``|c_k| < 1e8 * tiny``, then ``|d_k|`` is negligible too unless ``c_k`` cancels to 0
    exactly) contributes nothing to ``phi``.

    Args:
      num_samples: K >= 2.
      estimator: ``reparam`` or ``dreg``; or per site for a mixed guide (:mod:`jaxelbo.per_site`),
        ``{"continuous": "reparam" | "dreg", "discrete": "score"}``: the discrete sites get the
        leave-one-out signal ``J(log w~) - J(log w~ with log w~_k := mean_{j != k} log w~_j)``
        (O(K^2) per example).

    Returns:
      ``loss_fn(params, rng, x) -> (loss, aux)``, pure and ``jit``-able. It takes
      ``params = {"model": theta, "guide": phi}`` (any pytrees, as the model and the guide
      use them), a PRNG key ``rng`` and a batch ``x`` (a pytree whose leaves share a
      leading axis B). ``loss`` is the scalar ``-mean_b J_K(x_b)`` and ``jax.grad`` of it
      is the chosen estimator; ``aux`` holds ``bound`` ``(B,)``, ``log_weights``
      ``(B, K)``, ``ess`` ``(B,)`` and, with >= 25 samples, ``khat`` ``(B,)``, all without gradients.
      ``bound`` is the jackknife estimate, not a lower bound.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> loss_fn = je.jvi(lg.model(), lg.guide(), num_samples=8, estimator="dreg")
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> loss, aux = loss_fn(params, jax.random.key(0), jnp.ones((3, 2)))
      >>> aux["bound"].shape
      (3,)

    References:
      Nowozin (2018). Debiasing evidence approximations: on importance-weighted
      autoencoders and jackknife variational inference. ICLR. openreview HyZoi-WRb.
      Tucker, Lawson, Gu & Maddison (2019). arXiv:1810.04152.
    """
    k = check_count("num_samples", num_samples)
    if k < 2:
        raise ValueError(f"jvi leaves one sample out, so it needs num_samples >= 2, got {k}")

    def dreg_ratio(lw):
        c = jax.grad(lambda v: jnp.sum(jvi_bound(v)))(lw)
        return est.dreg_ratio_from_weights(c, jvi_weights(lw)[1])

    return make_objective(model, guide, jvi_bound, num_samples=k, estimator=_as_estimator(estimator),
                          dreg_ratio=dreg_ratio, name="jvi")


# --------------------------------------------------------------------------------------
# The registry: name -> constructor, estimators, budget split, extra keywords
# --------------------------------------------------------------------------------------

registry.register("elbo", elbo, estimators=("reparam", "stl", "score"))
registry.register("iwae", iwae, estimators=("reparam", "stl", "dreg", "score", "vimco", "ovis", "ovis-mc"))
registry.register("miwae", miwae, estimators=("reparam", "stl", "dreg"), nested=True)
registry.register("ciwae", ciwae, estimators=("reparam", "stl", "dreg"), keywords={"beta": 0.5})
registry.register("piwae", piwae, estimators=("reparam", "dreg"), nested=True)
registry.register("renyi", renyi, estimators=("reparam", "stl", "dreg"), keywords={"alpha": 0.5})
registry.register("rws", rws, estimators=("score", "dreg"), keywords={"alpha": 1.0})
registry.register("jvi", jvi, estimators=("reparam", "dreg"))

#: Every objective and the estimators it supports (the design's table), read from the registry.
OBJECTIVES = registry.OBJECTIVES
