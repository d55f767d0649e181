"""Layer 5: gradient replicates and SNR, log-likelihood, q_IW resampling, ELBO surgery."""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp

from jaxelbo import snr
from jaxelbo._chunking import choose_rows, split_rows
from jaxelbo._validation import check_count, check_inputs
from jaxelbo.psis import psis_khat, psis_tail_size
from jaxelbo.snr import PairedBiasTest, paired_t_statistics
from jaxelbo.types import Guide, LossFn, Model, PyTree
from jaxelbo.weights import (
    batch_size_of,
    log_prob_latents,
    log_weights,
    sample_and_log_weights,
    sample_keys,
    sample_latents,
)

__all__ = ["ElboSurgery", "PairedBiasTest", "elbo_surgery", "gradient_replicates", "gradient_snr",
           "importance_resample", "log_likelihood", "paired_bias_test", "paired_t_statistics",
           "snr_from_replicates"]

# --------------------------------------------------------------------------------------
# Gradient replicates, SNR and paired bias tests: views over the engine in jaxelbo.snr
# --------------------------------------------------------------------------------------


def gradient_replicates(loss_fn: LossFn, params: PyTree, rng: jax.Array, x: PyTree, *,
                        num_replicates: int, chunk_size: int | None = None) -> PyTree:
    """``R`` independent draws of the gradient estimate, stacked on a leading axis.

    All replicates run as one vmapped, compiled program (:func:`jaxelbo.snr.replicate_gradients`;
    JAX caches it on ``loss_fn``, so later calls with the same loss do not compile again),
    sharded over the replicate axis when there are several devices; with ``chunk_size``
    they run ``chunk_size`` at a time (``jax.lax.map``), bounding memory at ``chunk_size``
    times one gradient's. Replicate ``r`` uses ``jax.random.split(rng, R)[r]`` whatever the
    chunking, so results do not depend on it.

    Args:
      loss_fn: ``(params, rng, x) -> (loss, aux)`` whose ``jax.grad`` is the estimator.
      params, rng, x: as for the loss.
      num_replicates: R >= 1.
      chunk_size: replicates per step (``None``: all at once).

    Returns:
      A pytree like ``params`` whose leaves have a leading axis ``num_replicates``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> loss_fn = je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="dreg")
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> reps = je.gradient_replicates(loss_fn, params, jax.random.key(0), jnp.ones((3, 2)), num_replicates=5)
      >>> reps["guide"]["A"].shape
      (5, 2, 2)
    """
    return _replicates({"loss": loss_fn}, params, rng, x, num_replicates, chunk_size)["loss"]


def _replicates(loss_fns: dict[str, LossFn], params: PyTree, rng: jax.Array, x: PyTree, num_replicates: int,
                chunk_size: int | None) -> dict[str, PyTree]:
    num_replicates = check_count("num_replicates", num_replicates)
    if chunk_size is not None:
        chunk_size = check_count("chunk_size", chunk_size)
    keys = jax.random.split(rng, num_replicates)
    if chunk_size is None or chunk_size >= num_replicates:
        keys = snr.shard_replicates(keys)
    items = tuple(loss_fns.items())
    try:
        hash(items)
    except TypeError:  # an unhashable callable: compiled for this call only
        return jax.jit(lambda p, k, xx: snr.replicate_gradients(loss_fns, p, k, xx, chunk_size=chunk_size))(
            params, keys, x)
    return _replicate_program(items, params, keys, x, chunk_size)


@functools.partial(jax.jit, static_argnames=("loss_items", "chunk_size"))
def _replicate_program(loss_items: tuple[tuple[str, LossFn], ...], params: PyTree, keys: jax.Array, x: PyTree,
                       chunk_size: int | None) -> dict[str, PyTree]:
    """The replicates as one compiled program, cached by JAX on the loss functions' identity: an
    eager call compiles once per loss (not op by op), and later calls with the same loss reuse it."""
    return snr.replicate_gradients(dict(loss_items), params, keys, x, chunk_size=chunk_size)


def snr_from_replicates(replicates: PyTree, mean: PyTree | None = None, *, ddof: int = 1) -> PyTree:
    """Per-element ``|mean| / std`` over the leading (replicate) axis (:func:`jaxelbo.snr.signal_to_noise`).

    Args:
      replicates: leaves with a leading axis R.
      mean: optional pytree of better estimates of the mean (Tucker et al. 2019 use the
        low-variance, unbiased DReG replicates' mean when the estimator's own mean is
        swamped by its noise).
      ddof: ``std`` divides the squared deviations by ``R - ddof``; 1 (the default) is the
        sample variance that :class:`jaxelbo.snr.Moments` uses too.

    Returns:
      A pytree like one replicate; ``0`` where mean and std are both zero.
    """
    moments = jax.tree_util.tree_map(snr.replicate_moments, replicates)
    is_moments = lambda m: isinstance(m, snr.Moments)
    if mean is None:
        mean = jax.tree_util.tree_map(lambda m: m.mean, moments, is_leaf=is_moments)
    return jax.tree_util.tree_map(lambda m, mu: snr.signal_to_noise(mu, m.m2 / (m.count - ddof)),
                                  moments, mean, is_leaf=is_moments)


def gradient_snr(loss_fn: LossFn, params: PyTree, rng: jax.Array, x: PyTree, *, num_replicates: int,
                 chunk_size: int | None = None, ddof: int = 1) -> PyTree:
    """Signal-to-noise ratio ``|E[g]| / std[g]`` of every gradient element.

    Rainforth et al. (2018, arXiv:1802.04537) show that for IWAE it grows as
    ``sqrt(K)`` for ``theta`` and shrinks as ``1/sqrt(K)`` for ``phi``. ``std`` is the
    sample standard deviation over the R replicates of :func:`gradient_replicates` with
    ``ddof`` (default 1, as :class:`jaxelbo.snr.Moments`, so this equals the SNR of
    :func:`jaxelbo.snr.gradient_moments` on the same keys, which streams it for large R).
    ``num_replicates`` must exceed ``ddof`` (a standard deviation needs that many).
    Elements whose gradient is identically zero get ``0``.

    Args:
      loss_fn, params, rng, x, num_replicates, chunk_size: as for :func:`gradient_replicates`.
      ddof: the standard deviation divides by ``R - ddof``.

    Returns:
      A pytree like ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> loss_fn = je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="dreg")
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> snr = je.gradient_snr(loss_fn, params, jax.random.key(0), jnp.ones((3, 2)), num_replicates=50)
      >>> snr["model"]["mu"].shape
      (2,)
    """
    num_replicates = check_count("num_replicates", num_replicates)
    if num_replicates <= ddof:
        raise ValueError(f"gradient_snr needs num_replicates > ddof ({ddof}) to estimate a standard deviation, "
                         f"got num_replicates={num_replicates}; use at least {ddof + 1}")
    reps = gradient_replicates(loss_fn, params, rng, x, num_replicates=num_replicates, chunk_size=chunk_size)
    return snr_from_replicates(reps, ddof=ddof)


def paired_bias_test(loss_a: LossFn, loss_b: LossFn, params: PyTree, rng: jax.Array, x: PyTree, *,
                     num_replicates: int, rtol: float = 1e-4, threshold: float = 4.0) -> PairedBiasTest:
    r"""Do two gradient estimators have the same expectation? A paired t-test per element.

    Replicate ``r`` evaluates both ``jax.grad`` of ``loss_a`` and of ``loss_b`` on the same
    key (the same latent noise), so the difference ``d_r = g_a - g_b`` cancels most of the
    noise they share; under ``E[d] = 0`` each element's

    .. math:: t = \frac{\bar d}{s_d / \sqrt{R}}

    is approximately standard normal, ``rms_t`` is about 1 and ``|t| > 4`` is rare
    (``p ~ 6e-5`` per element). A bias shows up as ``|t|`` growing like ``sqrt(R)``.
    All replicates run as one vmapped program, sharded over the replicate axis when
    there are several devices (as :func:`gradient_replicates`). Elements where both
    agree to ``rtol`` in every replicate get ``t = 0`` (see :func:`jaxelbo.snr.paired_t_statistics`).

    Args:
      loss_a, loss_b: ``(params, rng, x) -> (loss, aux)`` estimating the same gradient.
      params, rng, x: as for the losses (``params`` any pytree).
      num_replicates: R >= 2.
      rtol: relative agreement below which an element's difference counts as rounding.
      threshold: ``num_large`` counts the elements with ``|t|`` above it.

    Returns:
      a :class:`PairedBiasTest`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> params["guide"]["b"] = params["guide"]["b"] + 0.5
      >>> a = je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="reparam")
      >>> b = je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="dreg")
      >>> test = je.paired_bias_test(a, b, params, jax.random.key(0), jnp.ones((2, 2)), num_replicates=2000)
      >>> bool(test.max_abs_t < 5.0)
      True

    References:
      Tucker, Lawson, Gu & Maddison (2019), arXiv:1810.04152 (their bias-check mode).
    """
    num_replicates = check_count("num_replicates", num_replicates)
    if num_replicates < 2:
        raise ValueError(f"num_replicates must be >= 2 for a t-test, got {num_replicates}")
    reps = _replicates({"a": loss_a, "b": loss_b}, params, rng, x, num_replicates, None)
    return paired_t_statistics(reps["a"], reps["b"], rtol=rtol, threshold=threshold)


# --------------------------------------------------------------------------------------
# Log-likelihood
# --------------------------------------------------------------------------------------


def _streaming_logsumexp(carry: tuple[jax.Array, jax.Array], values: jax.Array, axis: int):
    """One step of a streaming logsumexp: fold ``values`` (``-inf`` = masked) into
    ``(m, s)`` with ``m' = max(m, max values)``, ``s' = s e^{m - m'} + sum e^{values - m'}``,
    so that ``logsumexp = m + log s`` at the end."""
    running_max, running_sum = carry
    new_max = jnp.maximum(running_max, jnp.max(values, axis=axis))
    safe = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    running_sum = (running_sum * jnp.exp(running_max - safe)
                   + jnp.sum(jnp.exp(values - jnp.expand_dims(safe, axis)), axis=axis))
    return new_max, running_sum


def _log_weight_block(model: Model, guide: Guide, num_samples: int, samples: int):
    """``(params, point_keys (g,), x (g, ...), j) -> (g, samples)`` log-weights of the
    samples ``j * samples + (0..samples-1)`` of each point, ``-inf`` past ``num_samples``.

    Sample ``k`` of point ``b`` always uses ``fold_in(point_keys[b], k)``, so the draws do
    not depend on the chunking."""

    def block(params, point_keys, x, j):
        index = j * samples + jnp.arange(samples)
        keys = jax.vmap(lambda key: jax.vmap(lambda i: jax.random.fold_in(key, i))(index))(point_keys)
        _, log_p, log_q = sample_and_log_weights(model, guide, params, keys, x)
        return jnp.where((index < num_samples)[None, :], log_p - log_q, -jnp.inf)

    return block


def log_likelihood_chunks(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                          num_samples: int = 5000) -> tuple[int, int]:
    """``(points, samples)`` per step that :func:`log_likelihood` uses with ``chunk_size="auto"``.

    One step evaluates ``points x samples`` (example, sample) rows. Their number is the
    machine's budget divided by the bytes per row that XLA's memory analysis reports for
    one compiled step: on CPU the L2 caches (so that the element-wise passes over the
    decoder's outputs stay in cache and the matrix products run at speed), but on CPU
    at least 1024 rows (a step's fixed cost; at most 64 MiB of temporaries), elsewhere
    1 GiB (see ``jaxelbo._chunking``). Samples come first, so each point's encoder runs
    once per ``samples`` draws.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> from jaxelbo.diagnostics import log_likelihood_chunks
      >>> lg = je.models.linear_gaussian
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> log_likelihood_chunks(lg.model(), lg.guide(), params, jax.random.key(0), jnp.ones((3, 2)),
      ...                       num_samples=100)
      (3, 100)
    """
    num_samples = check_count("num_samples", num_samples)
    check_inputs(model, guide, params, rng, x)
    one = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:1], x)
    args = (params, jax.random.split(rng, 1), one, jnp.zeros((), jnp.int32))
    rows = choose_rows(lambda r: _log_weight_block(model, guide, num_samples, r), *args,
                       cache_key=("log_likelihood", model, guide, num_samples))
    return split_rows(rows, batch_size_of(x), num_samples)


@overload
def log_likelihood(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                   num_samples: int = ..., chunk_size: int | str | None = ...,
                   points_per_chunk: int | None = ..., return_khat: Literal[False] = ...) -> jax.Array: ...


@overload
def log_likelihood(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                   num_samples: int = ..., chunk_size: int | str | None = ...,
                   points_per_chunk: int | None = ..., return_khat: Literal[True]) -> tuple[jax.Array, jax.Array]: ...


def log_likelihood(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                   num_samples: int = 5000, chunk_size: int | str | None = "auto",
                   points_per_chunk: int | None = None,
                   return_khat: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Estimate ``log p(x)`` by IWAE_K with large K (Burda et al. 2016 use K = 5000).

    .. math::

       \hat L(x_b) = \log \frac1K \sum_{k=1}^K
           \frac{p_\theta(x_b, z_{bk})}{q_\phi(z_{bk} \mid x_b)},
       \qquad z_{bk} \sim q_\phi(\cdot \mid x_b) \text{ drawn with } \mathrm{fold\_in}(r_b, k),

    with ``r_b = split(rng, B)[b]``: the draws do not depend on the chunking, so every
    chunking gives the same estimate up to float rounding. Samples are evaluated
    ``points_per_chunk`` points times ``chunk_size`` samples at a time and reduced by a
    streaming logsumexp ``(m, s) <- (max(m, max lw), s e^{m - m'} + sum e^{lw - m'})``, so
    memory is one chunk's whatever ``num_samples``; the last chunk is masked.

    Args:
      model, guide, params: as for the objectives.
      rng: a PRNG key.
      x: a batch with a leading axis B.
      num_samples: K.
      chunk_size: samples per chunk; ``"auto"`` (default) chooses samples and points
        per chunk from the machine (:func:`log_likelihood_chunks`: XLA's memory
        analysis of one chunk against the CPU's cache, or 1 GiB on an accelerator);
        ``None``: all K at once.
      points_per_chunk: points per chunk with an integer or ``None`` ``chunk_size``
        (default: all B).
      return_khat: also return each example's PSIS k-hat of its K weights
        (:func:`jaxelbo.psis_khat`, equal to it on the same draws; needs K >= 25): the
        ``M + 1`` largest log-weights (``M = psis_tail_size(K)``, 213 of 5000) are kept by a
        streaming top-k, all that k-hat reads. Where k-hat > 0.7
        (:data:`jaxelbo.psis.KHAT_THRESHOLD`) the estimate is dominated by a few weights and
        may lie far from ``log p(x)``: prefer :func:`jaxelbo.ais_log_likelihood` there.

    Returns:
      ``(B,)`` estimates, each a stochastic lower bound whose gap shrinks as ``O(1/K)``;
      with ``return_khat``, ``(estimates, khat)``, both ``(B,)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> x = jnp.ones((3, 2))
      >>> a = je.log_likelihood(lg.model(), lg.guide(), params, jax.random.key(0), x, num_samples=100)
      >>> b = je.log_likelihood(lg.model(), lg.guide(), params, jax.random.key(0), x, num_samples=100,
      ...                       chunk_size=7, points_per_chunk=2)
      >>> bool(jnp.allclose(a, b, rtol=1e-6))
      True
      >>> params = lg.optimal_params(jnp.zeros(4))
      >>> params["guide"]["log_scale"] = jnp.log(0.1)                        # far too narrow a guide
      >>> ll, khat = je.log_likelihood(lg.model(), lg.guide(), params, jax.random.key(0), jnp.ones((3, 4)),
      ...                              num_samples=1000, return_khat=True)
      >>> ll.shape, bool((khat > 0.7).all())      # heavy tails: not to be trusted
      ((3,), True)

    References:
      Burda, Grosse & Salakhutdinov (2016), arXiv:1509.00519.
      Vehtari, Simpson, Gelman, Yao & Gabry (2024), JMLR 25(72), arXiv:1507.02646 (k-hat).
    """
    if not return_khat:
        return streamed_log_mean_exp(model, guide, params, rng, x, num_samples=num_samples, chunk_size=chunk_size,
                                     points_per_chunk=points_per_chunk)[0]
    estimate, khat = streamed_log_mean_exp(model, guide, params, rng, x, num_samples=num_samples,
                                           chunk_size=chunk_size, points_per_chunk=points_per_chunk, khat=True)
    return estimate, khat


def streamed_log_mean_exp(model: Model, guide: Guide, params: dict, rng: jax.Array, x: PyTree, *,
                          num_samples: int = 5000, chunk_size: int | str | None = "auto",
                          points_per_chunk: int | None = None,
                          powers: tuple[float, ...] = (1.0,), khat: bool = False) -> tuple[jax.Array, ...]:
    """``log (1/K) sum_k w_k^n`` per example for each ``n`` in ``powers``, on the draws
    and chunks of :func:`log_likelihood` (whose estimate is ``powers=(1.0,)``).

    With ``khat``, also the PSIS k-hat of each example's K weights, from a streaming
    top-k of its ``M + 1`` largest log-weights (all that :func:`jaxelbo.psis_khat` reads).

    Returns:
      one ``(B,)`` array per power (and, with ``khat``, the ``(B,)`` k-hat last).
    """
    num_samples = check_count("num_samples", num_samples)
    check_inputs(model, guide, params, rng, x)
    tail = psis_tail_size(num_samples) + 1 if khat else 0
    if khat and tail < 6:
        raise ValueError(f"log_likelihood(return_khat=True) needs num_samples >= 25 (a PSIS tail of 5 or more), "
                         f"got {num_samples}")
    batch = batch_size_of(x)
    if isinstance(chunk_size, str) and chunk_size == "auto":
        if points_per_chunk is not None:
            raise ValueError('points_per_chunk needs an integer or None chunk_size, not "auto"')
        points, samples = log_likelihood_chunks(model, guide, params, rng, x, num_samples=num_samples)
    elif chunk_size is None or not isinstance(chunk_size, str):
        samples = num_samples if chunk_size is None else min(check_count("chunk_size", chunk_size), num_samples)
        points = batch if points_per_chunk is None else min(check_count("points_per_chunk", points_per_chunk), batch)
    else:
        raise ValueError(f'chunk_size must be a positive integer, None or "auto", got {chunk_size!r}')
    num_chunks = -(-num_samples // samples)
    num_groups = -(-batch // points)
    pad = num_groups * points - batch

    def grouped(a):
        a = jnp.asarray(a)
        if pad:
            a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)])
        return a.reshape(num_groups, points, *a.shape[1:])

    x_groups = jax.tree_util.tree_map(grouped, x)
    key_groups = grouped(jax.random.split(rng, batch))
    block = _log_weight_block(model, guide, num_samples, samples)
    dtype = jax.eval_shape(lambda: log_weights(model, guide, params, rng, x, num_samples=1)).dtype

    def one_group(inputs):
        keys, xg = inputs

        def body(carry, j):
            streams, top = carry
            lw = block(params, keys, xg, j)
            if tail:
                top = jax.lax.top_k(jnp.concatenate([top, lw], axis=-1), tail)[0]
            return (tuple(_streaming_logsumexp(c, n * lw if n != 1 else lw, axis=-1)
                          for c, n in zip(streams, powers, strict=True)), top), None

        init = (jnp.full((points,), -jnp.inf, dtype), jnp.zeros((points,), dtype))
        top0 = jnp.full((points, tail), -jnp.inf, dtype)
        (out, top), _ = jax.lax.scan(body, (tuple(init for _ in powers), top0), jnp.arange(num_chunks))
        return tuple(m + jnp.log(s) for m, s in out), top

    out, top = jax.lax.map(one_group, (key_groups, x_groups))
    results = tuple(o.reshape(-1)[:batch] - math.log(num_samples) for o in out)
    if not khat:
        return results
    top = top.reshape(-1, tail)[:batch]
    # psis_khat reads only the M + 1 largest of the K log-weights: the others may be -inf
    padded = jnp.concatenate([jnp.full((batch, num_samples - tail), -jnp.inf, dtype), top[:, ::-1]], axis=-1)
    return (*results, psis_khat(padded))


# --------------------------------------------------------------------------------------
# Importance resampling: draws from the implicit posterior q_IW
# --------------------------------------------------------------------------------------


def _fits(model: Model, guide: Guide, params: PyTree, rng: jax.Array, x_batch: PyTree) -> Exception | None:
    """``None`` when ``x_batch`` passes :func:`check_inputs` as a batch, else the error."""
    try:
        check_inputs(model, guide, params, rng, x_batch)
    except (TypeError, ValueError) as e:
        return e
    return None


def importance_resample(model: Model, guide: Guide, params: PyTree, rng: jax.Array, x: PyTree, *,
                        num_samples: int, num_draws: int, batched: bool = False) -> PyTree:
    r"""Draws from the implicit IWAE posterior ``q_IW`` for one example ``x`` (or a batch).

    Each draw samples ``z_1..z_K ~ q(z|x)`` and returns ``z_j`` with probability
    ``w_j = softmax(log w~)_j`` (sampling-importance-resampling). Cremer, Morris &
    Duvenaud (2017, arXiv:1704.02916) show that IWAE_K is the ELBO of this ``q_IW``,
    which approaches ``p(z|x)`` as K grows.

    Args:
      model, guide, params: as for the objectives.
      rng: a PRNG key.
      x: one example (default), whatever its shape; with ``batched=True``, a batch with
        a leading axis B, as for :func:`log_likelihood`.
      num_samples: K, the proposals per draw.
      num_draws: N, the draws per example.
      batched: ``False`` (default): ``x`` is one example, even when its shape would
        also read as a batch; ``True``: ``x`` is a batch and every row gets its draws.

    Returns:
      For one example, leaves shaped ``(num_draws, *z)``; with ``batched=True``,
      ``(B, num_draws, *z)``. With the same ``rng``, ``x`` gives the draws that
      ``x[None]`` gives with ``batched=True``, without the leading 1.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> x = jnp.ones((5, 2))
      >>> je.importance_resample(lg.model(), lg.guide(), params, jax.random.key(0), x[0],
      ...                        num_samples=16, num_draws=100).shape
      (100, 2)
      >>> je.importance_resample(lg.model(), lg.guide(), params, jax.random.key(0), x,
      ...                        num_samples=16, num_draws=100, batched=True).shape
      (5, 100, 2)
    """
    num_samples = check_count("num_samples", num_samples)
    num_draws = check_count("num_draws", num_draws)
    if not isinstance(batched, bool):
        raise TypeError(f"importance_resample: batched must be True or False, got {batched!r}")
    x_batch = x if batched else jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], x)
    problem = _fits(model, guide, params, rng, x_batch)
    if problem is not None:
        if not batched and _fits(model, guide, params, rng, x) is None:
            raise ValueError(f"importance_resample: x is not one example ({problem}); it fits a batch with a "
                             f"leading axis B: pass batched=True (returns (B, num_draws, ...))") from problem
        if not batched:
            raise type(problem)(f"importance_resample: x is taken as one example (batched=True takes a batch) and "
                                f"the guide or model refuse it: {problem}") from problem
        raise problem
    batch = batch_size_of(x_batch)

    def one_draw(key):  # one draw for every example: leaves (B, *z)
        k_sample, k_pick = jax.random.split(key)
        keys = sample_keys(k_sample, batch, num_samples)
        z, log_p, log_q = sample_and_log_weights(model, guide, params, keys, x_batch)
        lw = log_p - log_q
        j = jax.random.categorical(k_pick, lw, axis=-1)
        return jax.tree_util.tree_map(lambda leaf: leaf[jnp.arange(batch), j], z)

    draws = jax.vmap(one_draw)(jax.random.split(rng, num_draws))          # (N, B, *z)
    draws = jax.tree_util.tree_map(lambda leaf: jnp.swapaxes(leaf, 0, 1), draws)
    return draws if batched else jax.tree_util.tree_map(lambda leaf: leaf[0], draws)


# --------------------------------------------------------------------------------------
# ELBO surgery
# --------------------------------------------------------------------------------------


class ElboSurgery(NamedTuple):
    """Hoffman & Johnson (2016) decomposition of the ELBO over a data set of N points.

    ``elbo = reconstruction - index_code_mi - marginal_kl`` and
    ``avg_kl = index_code_mi + marginal_kl``; ``0 <= index_code_mi <= log N``.
    """

    elbo: jax.Array
    reconstruction: jax.Array
    index_code_mi: jax.Array
    marginal_kl: jax.Array
    avg_kl: jax.Array
    log_num_points: jax.Array


def elbo_surgery(model: Model, guide: Guide, params: dict, rng: jax.Array, x_all: PyTree, *,
                 num_samples: int = 1, chunk_size: int = 256) -> ElboSurgery:
    """ELBO surgery (Hoffman & Johnson 2016, "ELBO surgery: yet another way to carve up
    the variational evidence lower bound", NIPS AABI workshop).

    With the aggregate posterior ``q(z) = 1/N sum_n q(z | x_n)``:

    .. math::

       \\mathrm{ELBO} = \\frac1N \\sum_n \\mathbb{E}_{q(z|x_n)}[\\log p(x_n|z)]
         - I_q[n; z] - \\mathrm{KL}(q(z) \\,\\|\\, p(z)),
       \\qquad I_q[n; z] = \\mathbb{E}[\\log q(z|x_n) - \\log q(z)] \\le \\log N .

    Each point gets ``num_samples`` draws ``z ~ q(z|x_n)``; ``log q(z)`` is evaluated
    against all N guides, ``chunk_size`` data points at a time with a streaming
    logsumexp, so memory is ``O(N * num_samples * chunk_size)`` scalars.
    """
    num_samples = check_count("num_samples", num_samples)
    chunk_size = check_count("chunk_size", chunk_size)
    check_inputs(model, guide, params, rng, x_all)
    theta, phi = params["model"], params["guide"]
    n = batch_size_of(x_all)
    keys = sample_keys(rng, n, num_samples)
    z = sample_latents(guide, phi, keys, x_all)                      # (N, S, ...)
    log_q_own = log_prob_latents(guide, phi, x_all, z)               # (N, S)
    log_prior = jax.vmap(jax.vmap(model.log_prior, (None, 0)), (None, 0))(theta, z)
    log_lik = jax.vmap(jax.vmap(model.log_likelihood, (None, None, 0)), (None, 0, 0))(theta, x_all, z)

    # log q(z_i) = logsumexp_n log q(z_i | x_n) - log N, streamed over chunks of n.
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    x_padded = jax.tree_util.tree_map(
        lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) if pad else a, x_all)
    x_chunks = jax.tree_util.tree_map(lambda a: a.reshape(num_chunks, chunk_size, *a.shape[1:]), x_padded)
    z_flat = jax.tree_util.tree_map(lambda a: a.reshape(n * num_samples, *a.shape[2:]), z)
    cross = jax.vmap(jax.vmap(guide.log_prob, (None, None, 0)), (None, 0, None))  # (chunk, N*S)

    def body(carry, inputs):
        x_chunk, i = inputs
        lq = cross(phi, x_chunk, z_flat)
        valid = (i * chunk_size + jnp.arange(chunk_size) < n)[:, None]
        return _streaming_logsumexp(carry, jnp.where(valid, lq, -jnp.inf), axis=0), None

    dtype = log_q_own.dtype
    init = (jnp.full((n * num_samples,), -jnp.inf, dtype), jnp.zeros((n * num_samples,), dtype))
    (mx, sm), _ = jax.lax.scan(body, init, (x_chunks, jnp.arange(num_chunks)))
    log_q_agg = (mx + jnp.log(sm) - math.log(n)).reshape(n, num_samples)

    reconstruction = jnp.mean(log_lik)
    index_code_mi = jnp.mean(log_q_own - log_q_agg)
    marginal_kl = jnp.mean(log_q_agg - log_prior)
    avg_kl = jnp.mean(log_q_own - log_prior)
    return ElboSurgery(elbo=reconstruction - avg_kl, reconstruction=reconstruction,
                       index_code_mi=index_code_mi, marginal_kl=marginal_kl, avg_kl=avg_kl,
                       log_num_points=jnp.asarray(math.log(n), dtype))
