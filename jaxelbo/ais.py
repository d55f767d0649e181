r"""Annealed importance sampling (AIS) and bidirectional Monte Carlo (BDMC) for ``log p(x)``.

AIS (Neal 2001) anneals from the guide to the posterior along the geometric path

.. math::

   \log \gamma_\beta(z) = (1 - \beta) \log q_\phi(z \mid x) + \beta \log p_\theta(x, z),
   \qquad 0 = \beta_0 < \beta_1 < \dots < \beta_T = 1,

with ``z_0 ~ q(z | x)``, ``z_t ~ K_t(z_{t-1}, .)`` a Markov kernel that leaves
``gamma_{beta_t}`` invariant (here Hamiltonian Monte Carlo from BlackJAX), and the weight

.. math::

   \log \hat Z = \sum_{t=1}^{T} (\beta_t - \beta_{t-1})
       \big[\log p_\theta(x, z_{t-1}) - \log q_\phi(z_{t-1} \mid x)\big],

an unbiased estimate of ``p(x)``: ``E[Z_hat] = p(x)``, so ``log mean_c Z_hat_c`` over C
chains is a stochastic lower bound of ``log p(x)``. With ``T = 1`` it is importance sampling
from ``q``. Run backwards from an exact posterior draw (available for data simulated from
the model), the same chain gives an unbiased estimate of ``1 / p(x)`` and hence a stochastic
*upper* bound; the pair is bidirectional Monte Carlo (Grosse et al. 2015), and the gap
between them bounds the error of either on such data (Wu et al. 2017).

BlackJAX is an optional extra (``pip install jaxelbo[ais]``), imported only when a chain runs.

References:
  Neal (2001), "Annealed importance sampling", Statistics and Computing 11, arXiv:physics/9803008.
  Grosse, Ghahramani & Adams (2015), "Sandwiching the marginal likelihood using bidirectional
  Monte Carlo", arXiv:1511.02543.
  Wu, Burda, Salakhutdinov & Grosse (2017), "On the quantitative analysis of decoder-based
  generative models", arXiv:1611.04273.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxelbo._validation import batch_size_of, check_count, check_inputs, check_model_guide
from jaxelbo.types import Guide, Model, PyTree, log_joint

#: ``(rng, position, logdensity_fn, step_size) -> (new_position, acceptance_probability)``
#: for one chain; ``position`` is the flattened latent, and the kernel must leave
#: ``exp(logdensity_fn)`` invariant.
Transition = Callable[[jax.Array, jax.Array, Callable[[jax.Array], jax.Array], jax.Array],
                      tuple[jax.Array, jax.Array]]

SCHEDULES = ("linear", "geometric", "sigmoidal")


class AISResult(NamedTuple):
    """What :func:`ais_log_likelihood` returns.

    Attributes:
      log_likelihood: ``(B,)``, ``log mean_c Z_hat_c``, a stochastic lower bound of ``log p(x)``.
      stderr: ``(B,)``, delta-method standard error of ``log_likelihood`` over the chains,
        ``std_c(Z_hat_c) / (sqrt(C) mean_c Z_hat_c)`` (``nan`` with one chain).
      acceptance: ``(B, T - 1)``, mean HMC acceptance probability of each transition over the chains.
      log_weights: ``(B, C)``, each chain's ``log Z_hat``.
      step_size: ``(B, T - 1)``, the step size used at each transition (after adaptation).
    """

    log_likelihood: jax.Array
    stderr: jax.Array
    acceptance: jax.Array
    log_weights: jax.Array
    step_size: jax.Array


class BDMCResult(NamedTuple):
    """What :func:`bdmc` returns.

    Attributes:
      x: the ``N`` simulated data points (leading axis ``N``).
      z: the latents they were simulated from (exact posterior draws given ``x``).
      forward: ``(N,)`` AIS estimates of ``log p(x_n)`` (stochastic lower bounds).
      reverse: ``(N,)`` reverse-AIS estimates (stochastic upper bounds).
      gap: scalar ``mean_n(reverse - forward)``: the width of the sandwich, which bounds the
        error of AIS with these settings on such data.
      forward_acceptance, reverse_acceptance: ``(N, T - 1)`` mean acceptance per transition.
    """

    x: PyTree
    z: PyTree
    forward: jax.Array
    reverse: jax.Array
    gap: jax.Array
    forward_acceptance: jax.Array
    reverse_acceptance: jax.Array


def ais_schedule(num_steps: int, schedule: str = "sigmoidal", *, beta_min: float = 1e-4,
                 sharpness: float = 4.0) -> jax.Array:
    r"""Inverse temperatures ``beta_0 = 0 < ... < beta_T = 1`` (``num_steps + 1`` values).

    * ``linear``: ``beta_t = t / T``;
    * ``geometric``: ``beta_t = beta_min^{1 - (t-1)/(T-1)}`` for ``t >= 1`` (log-spaced from
      ``beta_min`` to 1), ``beta_0 = 0``;
    * ``sigmoidal`` (Grosse et al. 2013; Wu et al. 2017):
      ``s_t = sigmoid(delta (2t/T - 1))``, ``beta_t = (s_t - s_0) / (s_T - s_0)``.

    Args:
      num_steps: T >= 1, the number of intermediate ratios.
      schedule: one of ``linear``, ``geometric``, ``sigmoidal``.
      beta_min: first non-zero temperature of ``geometric``.
      sharpness: ``delta`` of ``sigmoidal``.

    Returns:
      ``(T + 1,)`` float32 array, increasing from 0 to 1.

    Example:
      >>> import jaxelbo as je
      >>> je.ais_schedule(4, "linear").tolist()
      [0.0, 0.25, 0.5, 0.75, 1.0]

    References:
      Grosse, Maddison & Salakhutdinov (2013), "Annealing between distributions by averaging moments", NIPS.
    """
    num_steps = check_count("num_steps", num_steps)
    t = np.arange(num_steps + 1, dtype=np.float64)
    if schedule == "linear":
        betas = t / num_steps
    elif schedule == "geometric":
        if not 0.0 < beta_min < 1.0:
            raise ValueError(f"beta_min must be in (0, 1), got {beta_min}")
        frac = (t[1:] - 1.0) / max(num_steps - 1, 1)
        tail = np.exp(math.log(beta_min) * (1.0 - frac)) if num_steps > 1 else np.ones((1,))
        betas = np.concatenate([np.zeros((1,)), tail])
    elif schedule == "sigmoidal":
        s = 1.0 / (1.0 + np.exp(-sharpness * (2.0 * t / num_steps - 1.0)))
        betas = (s - s[0]) / (s[-1] - s[0])
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    betas[0], betas[-1] = 0.0, 1.0
    return jnp.asarray(betas, jnp.float32)


def hmc_transition(num_leapfrog_steps: int = 5) -> Transition:
    """BlackJAX's HMC kernel (velocity Verlet, identity mass) as a :data:`Transition`.

    Args:
      num_leapfrog_steps: leapfrog steps per transition.

    Returns:
      ``(rng, position, logdensity_fn, step_size) -> (position, acceptance_rate)``.
    """
    num_leapfrog_steps = check_count("num_leapfrog_steps", num_leapfrog_steps)

    def transition(rng, position, logdensity_fn, step_size):
        try:
            import blackjax
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            raise ImportError("AIS needs BlackJAX: pip install 'jaxelbo[ais]'") from e
        state = blackjax.hmc.init(position, logdensity_fn)
        kernel = blackjax.hmc.build_kernel()
        new, info = kernel(rng, state, logdensity_fn, step_size, jnp.ones_like(position), num_leapfrog_steps)
        return new.position, jnp.nan_to_num(info.acceptance_rate)

    return transition


# --------------------------------------------------------------------------------------
# One example, a group of chains
# --------------------------------------------------------------------------------------


class _Settings(NamedTuple):
    transition: Transition
    target_acceptance: float
    adapt_rate: float


def _densities(model: Model, guide: Guide, params: dict, x: PyTree, unravel: Callable):
    theta, phi = params["model"], params["guide"]

    def log_q(zf):
        return guide.log_prob(phi, x, unravel(zf))

    def log_w(zf):  # log p(x, z) - log q(z | x)
        z = unravel(zf)
        return log_joint(model, theta, x, z) - guide.log_prob(phi, x, z)

    return log_q, log_w


def _transitions(settings: _Settings, log_q: Callable, log_w: Callable, rng: jax.Array, z: jax.Array,
                 beta: jax.Array, log_step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One transition of each chain (rows of ``z``) targeting ``gamma_beta``; mean acceptance."""
    def logdensity(zf):
        return log_q(zf) + beta * log_w(zf)

    keys = jax.random.split(rng, z.shape[0])
    step = jnp.exp(log_step)
    z_new, acc = jax.vmap(lambda k, zf: settings.transition(k, zf, logdensity, step))(keys, z)
    return z_new, jnp.mean(acc)


def _forward_chains(settings: _Settings, log_q: Callable, log_w: Callable, rng: jax.Array, z0: jax.Array,
                    betas: jax.Array, log_steps: jax.Array, adapt: bool, callback: Callable | None):
    """Forward AIS for chains ``z0`` ``(C, D)``: ``(log Z_hat (C,), acceptance (T-1,), log_step (T-1,))``.

    ``log_steps[0]`` starts the adaptation when ``adapt``; else ``log_steps`` are used as given.
    """
    lw0 = jnp.zeros(z0.shape[:1], z0.dtype)

    def body(carry, inputs):
        z, lw, log_step = carry
        t, beta_prev, beta, fixed = inputs
        lw = lw + (beta - beta_prev) * jax.vmap(log_w)(z)
        step_here = log_step if adapt else fixed
        z, acc = _transitions(settings, log_q, log_w, jax.random.fold_in(rng, t), z, beta, step_here)
        if adapt:
            log_step = log_step + settings.adapt_rate * (acc - settings.target_acceptance)
        if callback is not None:
            jax.debug.callback(callback, t)
        return (z, lw, log_step), (acc, step_here)

    num_steps = betas.shape[0] - 1
    inputs = (jnp.arange(1, num_steps), betas[:-2], betas[1:-1], log_steps)
    (z, lw, _), (acc, used) = jax.lax.scan(body, (z0, lw0, log_steps[0]), inputs)
    lw = lw + (betas[-1] - betas[-2]) * jax.vmap(log_w)(z)
    return lw, acc, used


def _reverse_chains(settings: _Settings, log_q: Callable, log_w: Callable, rng: jax.Array, z_exact: jax.Array,
                    betas: jax.Array, log_steps: jax.Array):
    """Reverse AIS from exact posterior draws ``z_exact`` ``(C, D)``: per chain
    ``-log W`` with ``E[W] = 1 / p(x)`` (a stochastic upper bound of ``log p(x)`` after
    ``-log mean exp(-.)``), and the acceptance per transition (in forward order)."""
    minus_lw0 = (betas[-1] - betas[-2]) * jax.vmap(log_w)(z_exact)

    def body(carry, inputs):
        z, mlw = carry
        t, beta_prev, beta, log_step = inputs
        z, acc = _transitions(settings, log_q, log_w, jax.random.fold_in(rng, t), z, beta, log_step)
        mlw = mlw + (beta - beta_prev) * jax.vmap(log_w)(z)
        return (z, mlw), acc

    num_steps = betas.shape[0] - 1
    inputs = (jnp.arange(1, num_steps)[::-1], betas[:-2][::-1], betas[1:-1][::-1], log_steps[::-1])
    (_, mlw), acc = jax.lax.scan(body, (z_exact, minus_lw0), inputs)
    return mlw, acc[::-1]


# --------------------------------------------------------------------------------------
# Batching and chunking
# --------------------------------------------------------------------------------------


def _log_mean_exp_and_stderr(lw: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = lw.shape[-1]
    m = jax.scipy.special.logsumexp(lw, axis=-1) - math.log(c)
    if c < 2:
        return m, jnp.full(m.shape, jnp.nan, lw.dtype)
    ratio = jnp.exp(lw - m[..., None])  # Z_hat_c / mean Z_hat, mean 1
    return m, jnp.std(ratio, axis=-1, ddof=1) / math.sqrt(c)


def _map_batch(fn: Callable, args: Any, batch: int, chunk: int):
    """``jax.vmap(fn)`` over the leading axis of ``args``, ``chunk`` examples at a time
    (``lax.map``; the last chunk padded by repeating the first example)."""
    chunk = min(chunk, batch)
    num = -(-batch // chunk)
    pad = num * chunk - batch

    def padded(a):
        a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) if pad else a
        return a.reshape(num, chunk, *a.shape[1:])

    out = jax.lax.map(lambda a: jax.vmap(fn)(*a), jax.tree.map(padded, args))
    return jax.tree.map(lambda o: o.reshape(num * chunk, *o.shape[2:])[:batch], out)


def _check(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree) -> int:
    check_model_guide(model, guide)
    check_inputs(model, guide, params, rng, x)
    return batch_size_of(x)


def _resolve(num_steps: int, num_chains: int, schedule: str | jax.Array, num_leapfrog_steps: int,
             transition: Transition | None, target_acceptance: float, adapt_rate: float):
    num_steps = check_count("num_steps", num_steps)
    num_chains = check_count("num_chains", num_chains)
    if isinstance(schedule, str):
        betas = ais_schedule(num_steps, schedule)
    else:
        betas = jnp.asarray(schedule, jnp.float32)
        if betas.shape != (num_steps + 1,):
            raise ValueError(f"a schedule array must have shape ({num_steps + 1},) (num_steps + 1), got {betas.shape}")
    if not 0.0 < target_acceptance < 1.0:
        raise ValueError(f"target_acceptance must be in (0, 1), got {target_acceptance}")
    settings = _Settings(transition or hmc_transition(num_leapfrog_steps), float(target_acceptance), float(adapt_rate))
    return num_steps, num_chains, betas, settings


def _adapted_steps(settings: _Settings, log_q, log_w, rng, z_init: jax.Array, betas: jax.Array,
                   step_size: float, adaptation: str) -> jax.Array:
    """The step-size schedule ``(T-1,)`` (log) of the chains: fixed, or tuned by a pilot run."""
    n = betas.shape[0] - 2
    log_steps = jnp.full((max(n, 0),), math.log(step_size), z_init.dtype)
    if adaptation == "pilot" and n > 0:
        _, _, log_steps = _forward_chains(settings, log_q, log_w, rng, z_init, betas, log_steps, True, None)
    return log_steps


def ais_log_likelihood(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                       num_steps: int = 100, num_chains: int = 16, schedule: str | jax.Array = "sigmoidal",
                       num_leapfrog_steps: int = 5, step_size: float = 0.05, adaptation: str = "pilot",
                       target_acceptance: float = 0.65, adapt_rate: float = 1.0, num_adapt_chains: int = 4,
                       batch_chunk_size: int = 16, chain_chunk_size: int = 16,
                       transition: Transition | None = None, callback: Callable | None = None) -> AISResult:
    r"""AIS estimate of ``log p(x)`` per example, annealing from ``q(z | x)`` to ``p(z | x)``.

    .. math::

       \hat{\mathcal L}(x) = \log \frac1C \sum_{c=1}^C \hat Z_c, \qquad
       \log \hat Z_c = \sum_{t=1}^T (\beta_t - \beta_{t-1})\,
         [\log p(x, z^c_{t-1}) - \log q(z^c_{t-1} \mid x)],

    ``E[Z_hat_c] = p(x)``, so ``E[hat L] <= log p(x)``. Transitions are HMC
    (:func:`hmc_transition`) on the flattened latent (pytrees are raveled). The step size
    of transition ``t`` is tuned towards ``target_acceptance`` by
    ``log eps <- log eps + adapt_rate (accept - target)`` after each temperature, from the
    chains' mean acceptance:

    * ``adaptation="pilot"`` (default): a separate pilot run of ``num_adapt_chains`` chains
      (its own random numbers) tunes the schedule ``eps_1..eps_{T-1}``, and the reported
      chains then run with it fixed, so each ``Z_hat_c`` stays exactly unbiased;
    * ``"online"``: each group of chains adapts while it runs (Wu et al. 2017's practice; no
      pilot cost, a small bias because a kernel then depends on the chains' past);
    * ``"none"``: ``step_size`` throughout.

    Memory stays flat: examples go ``batch_chunk_size`` at a time (``lax.map``) and chains
    ``chain_chunk_size`` at a time (``lax.scan``). Chain ``c`` of example ``b`` starts at
    ``guide.sample(phi, fold_in(fold_in(fold_in(rng, 0), b), c), x_b)``. Jit- and
    vmap-compatible; ``params`` are treated as constants (``stop_gradient``).

    Args:
      model, guide, params: as for the objectives.
      rng: PRNG key.
      x: a batch with leading axis B.
      num_steps: T, the number of temperatures after 0 (``T = 1`` is importance sampling
        from ``q`` with C samples; there are ``T - 1`` transitions).
      num_chains: C, independent chains per example.
      schedule: ``linear``, ``geometric`` or ``sigmoidal`` (:func:`ais_schedule`), or a
        ``(T + 1,)`` array from 0 to 1.
      num_leapfrog_steps: leapfrog steps per HMC transition.
      step_size: initial (or, with ``adaptation="none"``, fixed) leapfrog step size.
      adaptation: ``pilot``, ``online`` or ``none``.
      target_acceptance: acceptance rate the step size is tuned towards.
      adapt_rate: gain of the log-step-size update.
      num_adapt_chains: chains of the pilot run.
      batch_chunk_size: examples per vectorised chunk.
      chain_chunk_size: chains per vectorised chunk.
      transition: override the kernel, ``(rng, position, logdensity_fn, step_size) ->
        (position, acceptance)``; it must leave ``exp(logdensity_fn)`` invariant.
      callback: optional host function called with the transition index ``t`` (a scalar
        array) at every transition of every chunk (through ``jax.debug.callback``), e.g.
        to drive a progress bar.

    Returns:
      :class:`AISResult` with ``log_likelihood`` ``(B,)``, ``stderr`` ``(B,)``,
      ``acceptance`` ``(B, T-1)``, ``log_weights`` ``(B, C)`` and ``step_size`` ``(B, T-1)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> from jaxelbo.models import linear_gaussian as lg
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> x = jnp.ones((3, 2))
      >>> out = je.ais_log_likelihood(lg.model(), lg.guide(), params, jax.random.key(0), x,
      ...                             num_steps=5, num_chains=4)
      >>> out.log_weights.shape, out.acceptance.shape
      ((3, 4), (3, 4))
      >>> bool(jnp.allclose(out.log_likelihood, lg.log_marginal(params["model"], x), atol=1e-4))
      True

    References:
      Neal (2001), arXiv:physics/9803008; Wu, Burda, Salakhutdinov & Grosse (2017),
      arXiv:1611.04273.
    """
    if adaptation not in ("pilot", "online", "none"):
        raise ValueError(f"adaptation must be 'pilot', 'online' or 'none', got {adaptation!r}")
    num_steps, num_chains, betas, settings = _resolve(num_steps, num_chains, schedule, num_leapfrog_steps,
                                                      transition, target_acceptance, adapt_rate)
    batch = _check(model, guide, params, rng, x)
    cc = min(check_count("chain_chunk_size", chain_chunk_size), num_chains)
    num_chunks = -(-num_chains // cc)
    na = min(check_count("num_adapt_chains", num_adapt_chains), num_chains)
    params = jax.lax.stop_gradient(params)
    rng_init, rng_mcmc, rng_pilot = (jax.random.fold_in(rng, i) for i in range(3))

    def one(b, xb):
        k_init = jax.random.fold_in(rng_init, b)
        z_example = guide.sample(params["guide"], k_init, xb)
        _, unravel = ravel_pytree(z_example)
        log_q, log_w = _densities(model, guide, params, xb, unravel)

        def init(c):
            return ravel_pytree(guide.sample(params["guide"], jax.random.fold_in(k_init, c), xb))[0]

        pilot_z = jax.vmap(init)(jnp.arange(num_chains, num_chains + na))
        log_steps = _adapted_steps(settings, log_q, log_w, jax.random.fold_in(rng_pilot, b), pilot_z, betas,
                                   step_size, "pilot" if adaptation == "pilot" else "none")

        def chunk(_, j):
            z0 = jax.vmap(init)(j * cc + jnp.arange(cc))
            k = jax.random.fold_in(jax.random.fold_in(rng_mcmc, b), j)
            if num_steps == 1:
                return None, (jax.vmap(log_w)(z0), jnp.zeros((0,), z0.dtype), jnp.zeros((0,), z0.dtype))
            return None, _forward_chains(settings, log_q, log_w, k, z0, betas, log_steps, adaptation == "online",
                                         callback)

        _, (lw, acc, used) = jax.lax.scan(chunk, None, jnp.arange(num_chunks))
        return lw.reshape(-1)[:num_chains], jnp.mean(acc, axis=0), jnp.exp(jnp.mean(used, axis=0))

    lw, acc, steps = _map_batch(one, (jnp.arange(batch), x), batch, check_count("batch_chunk_size",
                                                                                batch_chunk_size))
    ll, se = _log_mean_exp_and_stderr(lw)
    return AISResult(log_likelihood=ll, stderr=se, acceptance=acc, log_weights=lw, step_size=steps)


def reverse_ais_log_likelihood(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, z: PyTree,
                               *, num_steps: int = 100, num_chains: int = 16,
                               schedule: str | jax.Array = "sigmoidal", num_leapfrog_steps: int = 5,
                               step_size: float = 0.05, adaptation: str = "pilot", target_acceptance: float = 0.65,
                               adapt_rate: float = 1.0, num_adapt_chains: int = 4, batch_chunk_size: int = 16,
                               step_sizes: jax.Array | None = None,
                               transition: Transition | None = None) -> AISResult:
    r"""Reverse AIS from exact posterior draws ``z ~ p(z | x)``: a stochastic upper bound.

    Runs the AIS chain backwards, ``beta`` from 1 to 0, starting every chain of example
    ``b`` at ``z_b``:

    .. math::

       \log \hat W = \sum_{t=1}^T (\beta_{t-1} - \beta_t)
         [\log p(x, z_{t-1}) - \log q(z_{t-1} \mid x)], \qquad E[\hat W] = 1 / p(x),

    so ``-log mean_c W_hat_c`` has expectation ``>= log p(x)``. The step sizes are tuned
    by a forward pilot run from ``q`` as in :func:`ais_log_likelihood` (``adaptation``
    ``pilot``, or ``none``) unless ``step_sizes`` gives them, and the kernels, reversible
    HMC, are the forward ones in reverse order.

    Args:
      z: exact posterior draws, one per example (leading axis B), e.g. the latents
        ``Model.sample`` drew ``x`` from.
      step_sizes: optional ``(B, T - 1)`` step size of each transition (e.g. the
        ``step_size`` a forward run reported); no pilot run then.
      others: as for :func:`ais_log_likelihood`.

    Returns:
      :class:`AISResult` whose ``log_likelihood`` is the upper bound and whose
      ``log_weights`` ``(B, C)`` are each chain's ``-log W_hat``.

    References:
      Grosse, Ghahramani & Adams (2015), arXiv:1511.02543.
    """
    if adaptation not in ("pilot", "none"):
        raise ValueError(f"adaptation of reverse AIS must be 'pilot' or 'none', got {adaptation!r}")
    num_steps, num_chains, betas, settings = _resolve(num_steps, num_chains, schedule, num_leapfrog_steps,
                                                      transition, target_acceptance, adapt_rate)
    batch = _check(model, guide, params, rng, x)
    given = step_sizes is not None
    if step_sizes is not None:
        step_sizes = jnp.asarray(step_sizes)
        if step_sizes.shape != (batch, num_steps - 1):
            raise ValueError(f"step_sizes must have shape ({batch}, {num_steps - 1}) (B, num_steps - 1), "
                             f"got {step_sizes.shape}")
    else:
        step_sizes = jnp.full((batch, num_steps - 1), jnp.nan)
    na = min(check_count("num_adapt_chains", num_adapt_chains), num_chains)
    params = jax.lax.stop_gradient(params)
    rng_mcmc, rng_pilot = jax.random.fold_in(rng, 3), jax.random.fold_in(rng, 2)
    use_pilot = adaptation == "pilot" and not given

    def one(b, xb, zb, steps_b):
        z_flat, unravel = ravel_pytree(zb)
        log_q, log_w = _densities(model, guide, params, xb, unravel)
        if given:
            log_steps = jnp.log(steps_b).astype(z_flat.dtype)
        else:
            k_init = jax.random.fold_in(jax.random.fold_in(rng, 4), b)
            pilot_z = jax.vmap(lambda c: ravel_pytree(guide.sample(params["guide"], jax.random.fold_in(k_init, c),
                                                                   xb))[0])(jnp.arange(na))
            log_steps = _adapted_steps(settings, log_q, log_w, jax.random.fold_in(rng_pilot, b), pilot_z, betas,
                                       step_size, "pilot" if use_pilot else "none")
        zs = jnp.broadcast_to(z_flat, (num_chains, z_flat.shape[0]))
        mlw, acc = _reverse_chains(settings, log_q, log_w, jax.random.fold_in(rng_mcmc, b), zs, betas, log_steps)
        return mlw, acc, jnp.exp(log_steps)

    mlw, acc, steps = _map_batch(one, (jnp.arange(batch), x, z, step_sizes), batch,
                                 check_count("batch_chunk_size", batch_chunk_size))
    neg, ratio_se = _log_mean_exp_and_stderr(-mlw)
    return AISResult(log_likelihood=-neg, stderr=ratio_se, acceptance=acc, log_weights=mlw, step_size=steps)


def bdmc(model: Model, guide: Guide, params: dict, rng: jax.Array, *, num_points: int, num_steps: int = 100,
         num_chains: int = 16, **kwargs: Any) -> BDMCResult:
    r"""Bidirectional Monte Carlo: the AIS sandwich of ``log p(x)`` on data simulated from the model.

    Draws ``(z_n, x_n) ~ p_theta(z, x)`` with ``model.sample`` (so ``z_n`` is an exact
    posterior draw given ``x_n``), then runs forward AIS from ``q(z | x_n)`` (a stochastic
    lower bound) and reverse AIS from ``z_n`` (a stochastic upper bound):

    .. math::

       E[\text{forward}_n] \le \log p(x_n) \le E[\text{reverse}_n], \qquad
       \text{gap} = \frac1N \sum_n (\text{reverse}_n - \text{forward}_n).

    The gap bounds the error of forward AIS with the same settings on data like the
    simulated data (Grosse et al. 2015; Wu et al. 2017 use it to validate AIS on real data).

    Args:
      model: must have ``sample``.
      guide, params, rng: as for :func:`ais_log_likelihood`.
      num_points: N, the simulated points.
      num_steps, num_chains, **kwargs: passed to :func:`ais_log_likelihood`; the reverse
        run (:func:`reverse_ais_log_likelihood`) shares the schedule, the kernel and the
        step sizes the forward run used (tuned on the forward chains, hence independent
        of the reverse ones).

    Returns:
      :class:`BDMCResult`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> from jaxelbo.models import linear_gaussian as lg
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> out = je.bdmc(lg.model(), lg.guide(), params, jax.random.key(0), num_points=3, num_steps=4,
      ...               num_chains=2)
      >>> out.forward.shape, out.reverse.shape, bool(abs(out.gap) < 1e-4)
      ((3,), (3,), True)

    References:
      Grosse, Ghahramani & Adams (2015), arXiv:1511.02543; Wu et al. (2017), arXiv:1611.04273.
    """
    if model.sample is None:
        raise ValueError("bdmc needs a model with sample(theta, rng) -> (z, x) to simulate data")
    num_points = check_count("num_points", num_points)
    rng_sim, rng_fwd, rng_rev = jax.random.split(rng, 3)
    theta = jax.lax.stop_gradient(params["model"])
    simulate = model.sample
    z, x = jax.vmap(lambda k: simulate(theta, k))(jax.random.split(rng_sim, num_points))
    fwd = ais_log_likelihood(model, guide, params, rng_fwd, x, num_steps=num_steps, num_chains=num_chains, **kwargs)
    rev_kwargs = {k: v for k, v in kwargs.items()
                  if k in ("schedule", "num_leapfrog_steps", "batch_chunk_size", "transition")}
    rev = reverse_ais_log_likelihood(model, guide, params, rng_rev, x, z, num_steps=num_steps,
                                     num_chains=num_chains, step_sizes=fwd.step_size, adaptation="none",
                                     **rev_kwargs)
    return BDMCResult(x=x, z=z, forward=fwd.log_likelihood, reverse=rev.log_likelihood,
                      gap=jnp.mean(rev.log_likelihood - fwd.log_likelihood), forward_acceptance=fwd.acceptance,
                      reverse_acceptance=rev.acceptance)
