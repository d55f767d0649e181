r"""Sequential bounds: sequential Monte Carlo over a state-space model (FIVO / AESMC / VSMC).

A :class:`StateSpaceModel` defines ``p_theta(z_{0:T-1}, x_{0:T-1}) = p(z_0) p(x_0 | z_0)
prod_{t>=1} p(z_t | z_{t-1}) p(x_t | z_t)`` through three per-step functions, and a
:class:`Proposal` ``q_phi(z_t | z_{t-1}, x_{0:T-1})`` may look at the whole sequence. With K
particles, incremental weights

.. math::

   \alpha_t^k = \frac{p_\theta(z_t^k \mid z_{t-1}^{a_t^k})\, p_\theta(x_t \mid z_t^k)}
                     {q_\phi(z_t^k \mid z_{t-1}^{a_t^k}, x)}

and normalised weights :math:`W_t^k \propto W_{t-1}^{a_t^k} \alpha_t^k` (reset to ``1/K`` when
the particles are resampled), the estimate

.. math::

   \log \hat Z = \sum_t \log \sum_k \bar W_{t-1}^k \alpha_t^k

is unbiased for ``p_theta(x)`` in ``Z_hat`` (Del Moral 2004), so ``E[log Z_hat] <= log p(x)``
is a bound: FIVO (Maddison et al. 2017), AESMC (Le et al. 2018), VSMC (Naesseth et al. 2018).
Without resampling it is IWAE over whole trajectories; with one particle, the ELBO.

Estimators (``params = {"model": theta, "guide": phi}``):

- ``reparam``: autodiff of ``log Z_hat`` with the ancestor indices held fixed. The
  resampling score terms are dropped, as FIVO and AESMC do; biased (the bias shrinks as K
  grows), low variance.
- ``score-resampling``: adds ``sum_t (log Z_hat - log Z_hat_{<t}) grad log P(a_t | W_{t-1})``
  for every resampling event ``t``. ``log Z_hat_{<t}``, the part of the estimate fixed before
  ``a_t`` is drawn, is the baseline; unbiased for ``grad E[log Z_hat]``. The score term is
  evaluated in a second pass that replays the same particles with ``x`` held constant, so
  ``x`` still gets the plain autodiff derivative (arrays closed over by the model or the
  proposal do receive the score term).
- ``stl``: ``reparam`` with the proposal's density evaluated at ``stop_gradient(phi)``
  (Roeder et al. 2017's path derivative): ``phi`` keeps only its path through the particles
  ``z_t = z(phi, eps)``; the ancestors are held fixed as in ``reparam``. The value is the same.
  At the exact smoothing proposal without resampling every weight is ``p(x)`` whatever the
  particles, so the ``phi``-gradient is exactly zero, where ``reparam``'s is a zero-mean score
  term. In general it is biased for ``phi``, like IWAE-STL for ``K > 1``; ``theta``, ``x`` and
  arrays closed over get the ``reparam`` gradient.

Variable-length batches: ``loss_fn(params, rng, x, lengths=None)``; ``x`` is padded to
``(B, T, ...)`` and ``lengths`` ``(B,)`` int gives each sequence's number of valid steps
(``None``: all ``T``). Steps ``t >= lengths[b]`` contribute nothing; their ``x_t`` is replaced
by ``x_0`` before the model sees it, so padding values never reach a gradient.

References:
  Maddison, Lawson, Tucker, Heess, Norouzi, Mnih, Doucet & Teh (2017). Filtering Variational
  Objectives. arXiv:1705.09279.
  Le, Igl, Rainforth, Jin & Wood (2018). Auto-Encoding Sequential Monte Carlo. arXiv:1705.10306.
  Naesseth, Linderman, Ranganath & Blei (2018). Variational Sequential Monte Carlo.
  arXiv:1705.11140.
  Douc, Cappé & Moulines (2005). Comparison of resampling schemes for particle filtering.
  arXiv:cs/0507025.
  Roeder, Wu & Duvenaud (2017). Sticking the Landing. arXiv:1703.09194.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxelbo.types import LossFn, PyTree

RESAMPLING = ("multinomial", "systematic", "stratified")
SMC_ESTIMATORS = ("reparam", "score-resampling", "stl")
_TINY = 1e-30


class StateSpaceModel(NamedTuple):
    """A state-space model given by per-step log densities (one sequence, one particle).

    Attributes:
      log_initial: ``(theta, z0) -> scalar``, ``log p_theta(z_0)``.
      log_transition: ``(theta, t, z_prev, z) -> scalar``, ``log p_theta(z_t | z_{t-1})``;
        ``t`` is an int32 scalar (traced under ``lax.scan``).
      log_emission: ``(theta, t, z, x_t) -> scalar``, ``log p_theta(x_t | z_t)``.
      sample: optional ``(theta, rng, num_steps) -> (z, x)``, one ancestral draw of a whole
        sequence, leading axis ``num_steps``.
    """

    log_initial: Callable[[PyTree, PyTree], jax.Array]
    log_transition: Callable[[PyTree, jax.Array, PyTree, PyTree], jax.Array]
    log_emission: Callable[[PyTree, jax.Array, PyTree, jax.Array], jax.Array]
    sample: Callable[[PyTree, jax.Array, int], tuple[PyTree, jax.Array]] | None = None


class Proposal(NamedTuple):
    """A proposal ``q_phi(z_t | z_{t-1}, x)`` that may look at the whole sequence ``x``.

    Attributes:
      sample: ``(phi, rng, t, z_prev, x) -> z_t``, reparameterised for the pathwise
        gradients; ``z_prev`` is ``None`` at ``t = 0``; ``x`` is the whole (padded) sequence
        ``(T, ...)``.
      log_prob: ``(phi, t, z_prev, x, z_t) -> scalar``.
    """

    sample: Callable[[PyTree, jax.Array, jax.Array, PyTree | None, jax.Array], PyTree]
    log_prob: Callable[[PyTree, jax.Array, PyTree | None, jax.Array, PyTree], jax.Array]


# --------------------------------------------------------------------------------------
# Resampling: ancestor draws and their log-probabilities (for the score terms)
# --------------------------------------------------------------------------------------


def _cdf(log_w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Upper and lower edges ``C_j``, ``C_{j-1}`` of each particle's interval in [0, 1]."""
    c = jnp.cumsum(jnp.exp(log_w))
    c = c / c[-1]
    return c, jnp.concatenate([jnp.zeros((1,), c.dtype), c[:-1]])


def resample(rng: jax.Array, log_w: jax.Array, scheme: str) -> jax.Array:
    r"""Ancestor indices ``(K,)`` drawn from normalised log-weights ``log_w`` ``(K,)``.

    ``multinomial``: K independent categorical draws. ``stratified``: one uniform in each
    stratum, ``u_k = (k + U_k) / K``. ``systematic``: one uniform for all, ``u_k = (k + U) / K``;
    ``a_k = j`` when ``C_{j-1} <= u_k < C_j`` with ``C`` the cumulative weights.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> resample(jax.random.key(0), jnp.log(jnp.array([0.0, 1.0, 0.0])), "systematic")
      Array([1, 1, 1], dtype=int32)
    """
    k = log_w.shape[0]
    if scheme == "multinomial":
        return jax.random.categorical(rng, log_w, shape=(k,)).astype(jnp.int32)
    shape = (k,) if scheme == "stratified" else ()
    u = (jnp.arange(k, dtype=log_w.dtype) + jax.random.uniform(rng, shape, log_w.dtype)) / k
    upper, _ = _cdf(jax.lax.stop_gradient(log_w))
    return jnp.minimum(jnp.searchsorted(upper, u, side="right"), k - 1).astype(jnp.int32)


def resampling_log_prob(log_w: jax.Array, ancestors: jax.Array, scheme: str) -> jax.Array:
    r"""``log P(a | W)`` of an ancestor vector under a scheme; differentiable in ``log_w``.

    .. math::

       \text{multinomial: } \sum_k \log W_{a_k};\quad
       \text{stratified: } \sum_k \log K\,|[C_{a_k-1}, C_{a_k}) \cap [\tfrac kK, \tfrac{k+1}K)|;

       \text{systematic: } \log |\bigcap_k [K C_{a_k-1} - k,\, K C_{a_k} - k) \cap [0, 1)|.

    Example:
      >>> import jax.numpy as jnp
      >>> lw = jnp.log(jnp.array([0.25, 0.75]))
      >>> float(jnp.exp(resampling_log_prob(lw, jnp.array([0, 1]), "systematic")))
      0.5
    """
    k = log_w.shape[0]
    if scheme == "multinomial":
        return jnp.sum(log_w[ancestors])
    upper, lower = _cdf(log_w)
    idx = jnp.arange(k, dtype=log_w.dtype)
    if scheme == "stratified":
        hi = jnp.minimum(upper[ancestors], (idx + 1) / k)
        lo = jnp.maximum(lower[ancestors], idx / k)
        return jnp.sum(jnp.log(jnp.maximum(k * (hi - lo), _TINY)))
    hi = jnp.minimum(jnp.min(k * upper[ancestors] - idx), 1.0)
    lo = jnp.maximum(jnp.max(k * lower[ancestors] - idx), 0.0)
    return jnp.log(jnp.maximum(hi - lo, _TINY))


# --------------------------------------------------------------------------------------
# One sequence
# --------------------------------------------------------------------------------------


class SMCTrace(NamedTuple):
    """What one SMC pass over one sequence records (time axis ``T``)."""

    log_z: jax.Array          # scalar log Z_hat
    increments: jax.Array     # (T,) log sum_k W_{t-1}^k alpha_t^k, 0 past the length
    resampled: jax.Array      # (T,) bool: ancestors drawn at the start of step t
    ancestors: jax.Array      # (T, K) int32 (identity where not resampled)
    log_prob_ancestors: jax.Array  # (T,) log P(a_t | W_{t-1}), 0 where not resampled
    ess: jax.Array            # (T,) ESS of W_t after weighting step t
    log_weights: jax.Array    # (K,) final normalised log-weights


def _ess(log_w: jax.Array) -> jax.Array:
    return 1.0 / jnp.sum(jnp.exp(2.0 * log_w))


def smc_trace(model: StateSpaceModel, proposal: Proposal, theta: PyTree, phi: PyTree, rng: jax.Array,
              x: jax.Array, length: jax.Array, *, num_particles: int, resampling: str = "multinomial",
              resample_when: str | float = "always", replay: tuple[jax.Array, jax.Array] | None = None
              ) -> SMCTrace:
    """Run SMC over one sequence ``x`` ``(T, ...)`` with ``length`` valid steps.

    Args:
      model, proposal: the state-space model and the proposal.
      theta, phi: their parameters.
      rng: a key; the particle noise at step t comes from ``fold_in(rng_q, t)`` and the
        resampling noise from ``fold_in(rng_r, t)``, so a replay reproduces the particles.
      x: one sequence, leading axis T.
      length: int scalar, the number of valid steps (``1 <= length <= T``).
      num_particles: K.
      resampling: ``multinomial``, ``systematic`` or ``stratified``.
      resample_when: ``"always"``, ``"never"`` or a float ``f`` in (0, 1]: resample when the
        ESS falls below ``f K``.
      replay: optional ``(resampled (T,), ancestors (T, K))`` to use instead of drawing them
        (for score terms and exact enumeration).

    Returns:
      An :class:`SMCTrace`.
    """
    k = num_particles
    num_steps = x.shape[0]
    rng_q, rng_r = jax.random.split(rng)
    log_k = math.log(k)

    def propose(t, z_prev, keys):
        if z_prev is None:
            z = jax.vmap(lambda key: proposal.sample(phi, key, t, None, x))(keys)
            log_a = jax.vmap(lambda zk: model.log_initial(theta, zk) + model.log_emission(theta, t, zk, x[0])
                             - proposal.log_prob(phi, t, None, x, zk))(z)
            return z, log_a
        x_t = jnp.where(t < length, x[t], x[0])
        z = jax.vmap(lambda key, zp: proposal.sample(phi, key, t, zp, x))(keys, z_prev)
        log_a = jax.vmap(lambda zp, zk: model.log_transition(theta, t, zp, zk) + model.log_emission(theta, t, zk, x_t)
                         - proposal.log_prob(phi, t, zp, x, zk))(z_prev, z)
        return z, log_a

    t0 = jnp.zeros((), jnp.int32)
    z0, log_a0 = propose(t0, None, jax.random.split(jax.random.fold_in(rng_q, 0), k))
    inc0 = jax.nn.logsumexp(log_a0) - log_k
    log_w0 = log_a0 - jax.nn.logsumexp(log_a0)
    first = (inc0, jnp.zeros((), bool), jnp.arange(k, dtype=jnp.int32), jnp.zeros((), log_w0.dtype), _ess(log_w0))

    def step(carry, inputs):
        z, log_w, log_z = carry
        t, replay_t = inputs
        valid = t < length
        if replay_t is None:
            if resample_when == "always":
                do = valid
            elif resample_when == "never":
                do = jnp.zeros((), bool)
            else:
                do = valid & (_ess(jax.lax.stop_gradient(log_w)) < float(resample_when) * k)
            anc = resample(jax.random.fold_in(rng_r, t), log_w, resampling)
        else:
            do, anc = replay_t
        anc = jnp.where(do, anc, jnp.arange(k, dtype=jnp.int32))
        lp = jnp.where(do, resampling_log_prob(log_w, anc, resampling), 0.0)
        z_prev = jax.tree.map(lambda leaf: leaf[anc], z)
        log_w = jnp.where(do, jnp.full_like(log_w, -log_k), log_w)
        z_new, log_a = propose(t, z_prev, jax.random.split(jax.random.fold_in(rng_q, t), k))
        unnorm = log_w + log_a
        inc = jax.nn.logsumexp(unnorm)
        log_w_new = jnp.where(valid, unnorm - inc, log_w)
        inc = jnp.where(valid, inc, 0.0)
        z_new = jax.tree.map(lambda a, b: jnp.where(valid, a, b), z_new, z_prev)
        return (z_new, log_w_new, log_z + inc), (inc, do, anc, lp, _ess(log_w_new))

    ts = jnp.arange(1, num_steps, dtype=jnp.int32)
    replay_xs = None if replay is None else (replay[0][1:], replay[1][1:])
    (_, log_w, log_z), rest = jax.lax.scan(step, (z0, log_w0, inc0), (ts, replay_xs))
    stacked = [jnp.concatenate([a[None], b]) for a, b in zip(first, rest, strict=True)]
    return SMCTrace(log_z, stacked[0], stacked[1], stacked[2], stacked[3], stacked[4], log_w)


# --------------------------------------------------------------------------------------
# The bound
# --------------------------------------------------------------------------------------


def _check_config(num_particles: int, resampling: str, resample_when: Any, estimator: str) -> None:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
    if resampling not in RESAMPLING:
        raise ValueError(f"resampling must be one of {RESAMPLING}, got {resampling!r}")
    if isinstance(resample_when, str):
        if resample_when not in ("always", "never"):
            raise ValueError(f"resample_when must be 'always', 'never' or an ESS fraction in (0, 1], "
                             f"got {resample_when!r}")
    elif isinstance(resample_when, bool) or not isinstance(resample_when, int | float) \
            or not 0.0 < float(resample_when) <= 1.0:
        raise ValueError(f"resample_when as an ESS fraction must lie in (0, 1], got {resample_when!r}")
    if estimator not in SMC_ESTIMATORS:
        raise ValueError(f"smc_bound supports estimators {SMC_ESTIMATORS}, got {estimator!r}")


def _check_batch(x: jax.Array, lengths: jax.Array | None) -> jax.Array:
    if not hasattr(x, "ndim") or x.ndim < 2:
        raise ValueError(f"smc_bound expects x of shape (B, T, ...), got shape {getattr(x, 'shape', None)}; "
                         "for one sequence pass x[None]")
    batch, num_steps = x.shape[0], x.shape[1]
    if lengths is None:
        return jnp.full((batch,), num_steps, jnp.int32)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an int array of shape ({batch},), got {lengths.dtype}{lengths.shape}")
    return lengths.astype(jnp.int32)


def _path_derivative(proposal: Proposal) -> Proposal:
    """The proposal with ``log_prob`` evaluated at ``stop_gradient(phi)`` (STL); ``sample`` unchanged."""
    def log_prob(phi: PyTree, t: jax.Array, z_prev: PyTree | None, x: jax.Array, z: PyTree) -> jax.Array:
        return proposal.log_prob(jax.lax.stop_gradient(phi), t, z_prev, x, z)

    return Proposal(sample=proposal.sample, log_prob=log_prob)


def smc_bound(model: StateSpaceModel, proposal: Proposal, *, num_particles: int,
              resampling: str = "multinomial", resample_when: str | float = "always",
              estimator: str = "reparam") -> LossFn:
    r"""The SMC bound ``E[log Z_hat] <= log p(x)`` (FIVO / AESMC / VSMC) as a loss.

    ``loss = -mean_b log Z_hat_b`` in value; ``jax.grad`` of it is the chosen estimator.
    See the module docstring for the math and the estimators.

    Args:
      model: a :class:`StateSpaceModel`.
      proposal: a :class:`Proposal`.
      num_particles: K, particles per sequence.
      resampling: ``multinomial`` (default), ``systematic`` or ``stratified``.
      resample_when: ``"always"`` (default), ``"never"`` (IWAE over trajectories) or an ESS
        fraction ``f`` in (0, 1] (resample when ESS < f K).
      estimator: ``reparam`` (default), ``score-resampling`` or ``stl`` (path derivative for the
        proposal: its density at ``stop_gradient(phi)``).

    Returns:
      ``loss_fn(params, rng, x, lengths=None) -> (loss, aux)`` with ``params = {"model":
      theta, "guide": phi}``, ``x`` ``(B, T, ...)``, optional ``lengths`` ``(B,)`` int.
      ``aux``: ``bound`` ``(B,)`` (``log Z_hat``), ``ess`` ``(B, T)`` (after weighting each
      step), ``num_resampled`` ``(B,)`` (resampling events), ``log_weights`` ``(B, K)`` (final
      normalised log-weights).

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> ssm = je.models.linear_gaussian_ssm
      >>> params = ssm.default_params(dim_z=1, dim_x=1)
      >>> x = jnp.zeros((2, 5, 1))
      >>> loss_fn = je.smc_bound(ssm.model(), ssm.bootstrap_proposal(), num_particles=4)
      >>> loss, aux = loss_fn(params, jax.random.key(0), x)
      >>> aux["bound"].shape, aux["ess"].shape
      ((2,), (2, 5))

    References:
      Maddison et al. (2017), arXiv:1705.09279; Le et al. (2018), arXiv:1705.10306;
      Naesseth et al. (2018), arXiv:1705.11140.
    """
    _check_config(num_particles, resampling, resample_when, estimator)
    config = dict(num_particles=num_particles, resampling=resampling, resample_when=resample_when)
    if estimator == "stl":
        proposal = _path_derivative(proposal)

    def loss_fn(params: dict, rng: jax.Array, x: jax.Array, lengths: jax.Array | None = None
                ) -> tuple[jax.Array, dict]:
        if not isinstance(params, dict) or set(params) != {"model", "guide"}:
            raise ValueError("params must be {'model': theta, 'guide': phi}")
        lens = _check_batch(x, lengths)
        theta, phi = params["model"], params["guide"]
        keys = jax.random.split(rng, x.shape[0])

        def one(key, xb, length):
            return smc_trace(model, proposal, theta, phi, key, xb, length, **config)

        trace = jax.vmap(one)(keys, x, lens)
        bound = trace.log_z
        surrogate = bound
        if estimator == "score-resampling":
            x_const = jax.lax.stop_gradient(x)
            replay = (trace.resampled, trace.ancestors)

            def replayed(key, xb, length, done, anc):
                return smc_trace(model, proposal, theta, phi, key, xb, length, replay=(done, anc),
                                 **config).log_prob_ancestors

            lp = jax.vmap(replayed)(keys, x_const, lens, *replay)
            inc = jax.lax.stop_gradient(trace.increments)
            reward = jnp.cumsum(inc[:, ::-1], axis=1)[:, ::-1]  # log Z_hat - log Z_hat_{<t}
            score = jnp.sum(reward * lp, axis=1)
            surrogate = bound + score - jax.lax.stop_gradient(score)
        aux = {"bound": jax.lax.stop_gradient(bound), "ess": jax.lax.stop_gradient(trace.ess),
               "num_resampled": jnp.sum(trace.resampled, axis=1),
               "log_weights": jax.lax.stop_gradient(trace.log_weights)}
        return -jnp.mean(surrogate), aux

    loss_fn.__name__ = f"smc_{resampling}_{estimator}_loss"
    return loss_fn
