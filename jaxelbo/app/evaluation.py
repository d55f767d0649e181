"""Evaluation of a trained VAE on a held-out set.

Reports, as plain floats:

* ``log_likelihood``: ``(1/N) sum_n log p(x_n)`` estimated by IWAE with K = 5000
  (Burda et al. 2016), streamed in chunks by :func:`jaxelbo.log_likelihood`, with its
  standard error over the N points;
* ``iwae_64``: the IWAE bound with K = 64; ``elbo``: the ELBO (estimated with the same
  64 samples, ``mean_k log w_k``);
* ``khat_above_0.7``: the fraction of points whose PSIS k-hat (:func:`jaxelbo.psis_khat`,
  Vehtari et al. 2024, arXiv:1507.02646) of those 64 weights exceeds 0.7, i.e. where
  importance sampling from the guide is unreliable; ``log_likelihood_khat_above_0.7``: the
  same of the log-likelihood estimate's K weights (``je.log_likelihood(..., return_khat=True)``);
  above :data:`KHAT_WARNING_FRACTION` ``jaxelbo evaluate`` says so in one line
  (:func:`khat_warning`);
* ``active_units``: the number of latent dimensions with ``Var_x(E_q[z_i | x]) > 0.01``
  (Burda et al. 2016, section 5.2), and ``active_units_per_layer`` (one count per
  stochastic layer) when the VAE's ``posterior_means`` is given;
* ELBO surgery (Hoffman & Johnson 2016) via :func:`jaxelbo.elbo_surgery`:
  ``reconstruction``, ``index_code_mi``, ``marginal_kl``, ``avg_kl``;
* ``cubo_2``: the chi upper bound ``CUBO_2 = 1/2 log E_q[w~^2]`` (Dieng et al. 2017,
  :func:`jaxelbo.cubo`), estimated from the same K = 5000 draws as ``log_likelihood``
  (:func:`log_likelihood_and_cubo`), and the *sandwich* (:func:`sandwich`):
  ``ELBO <= IWAE_64 <= log p(x) <= CUBO_2``, with ``sandwich_log_likelihood`` the best
  estimate of ``log p(x)`` (AIS when it was run, else IWAE-5000), ``sandwich_width``
  ``= CUBO_2 - sandwich_log_likelihood`` (how far the upper side is from the best lower
  estimate), ``sandwich_width_elbo`` ``= CUBO_2 - ELBO`` and ``sandwich_ordered`` (whether
  the four numbers came out in order; the CUBO estimate is biased low, so it can fall below
  the truth with heavy-tailed weights);
* with ``method="ais"`` or ``"all"`` (:func:`evaluate_ais`): ``ais_log_likelihood`` (AIS,
  :func:`jaxelbo.ais_log_likelihood`) with its standard error, ``ais_minus_iwae`` (paired, per
  point), the amortisation and approximation gaps (:func:`jaxelbo.amortisation_gap`) and, with
  ``bdmc_points``, the BDMC gap on data simulated from the model (:func:`jaxelbo.bdmc`), each
  with its seconds and seconds per 1000 points.

References:
  Burda, Grosse & Salakhutdinov (2016), arXiv:1509.00519.
  Dieng, Tran, Ranganath, Paisley & Blei (2017), arXiv:1611.00328 (CUBO and the sandwich).
  Wu, Burda, Salakhutdinov & Grosse (2017), arXiv:1611.04273 (AIS and BDMC for decoders).
  Cremer, Li & Duvenaud (2018), arXiv:1801.03558 (the amortisation gap).
  Hoffman & Johnson (2016), "ELBO surgery", NIPS workshop on Advances in Approximate
  Bayesian Inference.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxelbo as je
from jaxelbo.psis import KHAT_THRESHOLD, psis_tail_size
from jaxelbo.weights import log_mean_exp

ACTIVE_UNIT_THRESHOLD = 0.01
METHODS = ("iwae", "ais", "all")


def active_units(encode: Callable, phi, x: jax.Array, threshold: float = ACTIVE_UNIT_THRESHOLD
                 ) -> tuple[int, np.ndarray]:
    """Burda et al.'s active units: ``A_u = Var_x(E_{q(z|x)}[z_u]) > threshold``.

    Args:
      encode: ``(phi, x) -> (mean, std)`` of the Gaussian guide, batched over ``x``.
      phi: guide parameters.
      x: ``(N, D)`` data.

    Returns:
      ``(count, per-unit variances)``.
    """
    mean, _ = jax.jit(encode)(phi, jnp.asarray(x))
    var = np.asarray(jnp.var(mean, axis=0))
    return int(np.sum(var > threshold)), var


def active_units_per_layer(posterior_means: Callable, phi, rng: jax.Array, x: np.ndarray, *,
                           threshold: float = ACTIVE_UNIT_THRESHOLD, batch_size: int = 500) -> list[int]:
    r"""Active units of each stochastic layer: ``A_u = Cov_x(E_{q(z_l|x)}[u]) > threshold``.

    .. math::

       A_u = \operatorname{Var}_{x}\big(\mathbb E_{q(z_l \mid x)}[u]\big), \qquad u \in z_l,

    with the inner expectation given per batch by ``posterior_means`` (exact for a first
    layer, Monte Carlo over ``z_1`` for a second one; Burda et al. 2016, section 5.2).

    Args:
      posterior_means: ``(phi, rng, x) -> tuple of (N, d_l)`` (``VAE.posterior_means``).
      phi: guide parameters.
      rng: PRNG key (batch ``i`` uses ``fold_in(rng, i)``).
      x: ``(N, D)`` data.

    Returns:
      One count per layer.
    """
    fn = jax.jit(posterior_means)
    per_batch = [fn(phi, jax.random.fold_in(rng, i), jnp.asarray(xb)) for i, xb in enumerate(_batches(x, batch_size))]
    means = [np.concatenate([np.asarray(b[layer]) for b in per_batch]) for layer in range(len(per_batch[0]))]
    return [int(np.sum(np.var(m, axis=0) > threshold)) for m in means]


def _batches(x: np.ndarray, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


def evaluate(model: je.Model, guide: je.Guide, params: dict, rng: jax.Array, x: np.ndarray, *,
             encode: Callable | None = None, posterior_means: Callable | None = None,
             num_samples_ll: int = 5000, chunk_size: int | str = "auto",
             num_samples_iwae: int = 64, batch_size: int = 100, surgery: bool = True,
             surgery_chunk_size: int = 256, progress: bool = False, method: str = "iwae",
             ais_steps: int = 1000, ais_chains: int = 16, bdmc_points: int = 0,
             amortisation_steps: int = 300, ais_kwargs: dict | None = None, keep_per_point: bool = False) -> dict:
    """All evaluation numbers of ``params`` on ``x`` (``(N, D)``), as a dict of floats.

    Args:
      model, guide, params: the VAE.
      rng: PRNG key (each quantity and each batch gets its own fold).
      x: the evaluation set (already binarised, see :func:`jaxelbo.app.data.evaluation_split`).
      encode: ``(phi, x) -> (mean, std)`` for the active-unit count (skipped if None).
      posterior_means: the VAE's ``(phi, rng, x) -> per-layer E_q[z_l | x]``; when given,
        active units are counted per stochastic layer (``active_units_per_layer``) and
        ``active_units`` is their sum (``encode`` is then not needed).
      num_samples_ll: K of the log-likelihood estimate (Burda et al.: 5000) and of the
        ``cubo_2`` estimate on the same draws; 0 skips both (and the sandwich).
      chunk_size: samples per chunk of the log-likelihood estimate, or ``"auto"`` (or 0,
        the default): points and samples per chunk chosen from the machine
        (:func:`jaxelbo.log_likelihood`).
      num_samples_iwae: K of the reported IWAE bound (and of the ELBO estimate).
      batch_size: examples per evaluation batch.
      surgery: compute the ELBO-surgery terms (O(N^2) guide evaluations).
      progress: show a tqdm bar over the points of the log-likelihood estimate (the
        slow part: about N x num_samples_ll decoder passes) and over the AIS steps.
      method: ``iwae`` (IWAE-``num_samples_ll`` only), ``ais`` (AIS instead of it; the
        ``num_samples_ll`` draws then give ``cubo_2`` only) or ``all``
        (both, their paired difference, the amortisation gap and, with ``bdmc_points``, BDMC);
        see :func:`evaluate_ais`.
      ais_steps, ais_chains: AIS temperatures and chains per point.
      bdmc_points: points simulated from the model for the BDMC gap (0 skips it).
      amortisation_steps: Adam steps of the local Gaussians of the amortisation gap (0 skips it).
      ais_kwargs: further keyword arguments of :func:`jaxelbo.ais_log_likelihood`.
      keep_per_point: also return ``log_likelihood_per_point`` and ``ais_per_point`` (lists).

    Returns:
      ``num_points`` (N), the IWAE bound and ELBO, ``log_likelihood`` with its standard
      error and ``log_likelihood_seconds`` (wall time of the estimate), active units and
      the ELBO-surgery terms, ``cubo_2`` and the sandwich (:func:`sandwich`), as plain numbers.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    report_iwae = method != "ais"  # with AIS alone, the K draws only give CUBO_2
    x = np.asarray(x)
    n = len(x)
    out: dict = {"num_points": n, "method": method}
    ll = None
    bounds = _bounds_fn(model, guide, num_samples_iwae)
    iw, el, kh = [], [], []
    for i, xb in enumerate(_batches(x, batch_size)):
        a, b, c = bounds(params, jax.random.fold_in(jax.random.fold_in(rng, 1), i), jnp.asarray(xb))
        iw.append(np.asarray(a))
        el.append(np.asarray(b))
        kh.append(np.asarray(c))
    iw, el, kh = np.concatenate(iw), np.concatenate(el), np.concatenate(kh)
    out[f"iwae_{num_samples_iwae}"] = float(iw.mean())
    out["elbo"] = float(el.mean())
    if not np.isnan(kh).all():
        out[f"khat_above_{KHAT_THRESHOLD}"] = float(np.mean(kh > KHAT_THRESHOLD))

    if num_samples_ll:
        from tqdm.auto import tqdm

        ll_fn = _log_likelihood_fn(model, guide, num_samples_ll, "auto" if chunk_size in (0, "auto") else chunk_size)
        t0 = time.perf_counter()
        lls, cubos, khats = [], [], []
        with tqdm(total=n, desc=f"log p(x), K={num_samples_ll}", unit="point", disable=not progress,
                  dynamic_ncols=True, mininterval=0.5) as bar:
            for i, xb in enumerate(_batches(x, batch_size)):
                a, c, kh_b = ll_fn(params, jax.random.fold_in(jax.random.fold_in(rng, 0), i), jnp.asarray(xb))
                lls.append(np.asarray(a))
                cubos.append(np.asarray(c))
                khats.append(np.asarray(kh_b))
                bar.update(len(xb))
        seconds = time.perf_counter() - t0
        out["cubo_2"], out["cubo_2_stderr"] = _mean_and_stderr(np.concatenate(cubos))
        out["cubo_2_num_samples"] = int(num_samples_ll)
        if report_iwae:
            ll, ll_khat = np.concatenate(lls), np.concatenate(khats)
            if not np.isnan(ll_khat).all():
                out[f"log_likelihood_khat_above_{KHAT_THRESHOLD}"] = float(np.mean(ll_khat > KHAT_THRESHOLD))
            out["log_likelihood_seconds"] = seconds
            out["log_likelihood"] = float(ll.mean())
            out["log_likelihood_stderr"] = float(ll.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
            out["log_likelihood_num_samples"] = int(num_samples_ll)
            out["log_likelihood_seconds_per_1000_points"] = out["log_likelihood_seconds"] * 1000.0 / n
            if keep_per_point:
                out["log_likelihood_per_point"] = ll.tolist()
        else:
            out["cubo_2_seconds"] = seconds

    if method in ("ais", "all"):
        out.update(evaluate_ais(model, guide, params, jax.random.fold_in(rng, 4), x, num_steps=ais_steps,
                                num_chains=ais_chains, iwae=ll, bdmc_points=bdmc_points if method == "all" else 0,
                                amortisation_steps=amortisation_steps if method == "all" else 0,
                                progress=progress, keep_per_point=keep_per_point, **(ais_kwargs or {})))

    out.update(sandwich(out, num_samples_iwae))

    if posterior_means is not None:
        counts = active_units_per_layer(posterior_means, params["guide"], jax.random.fold_in(rng, 3), x)
        out["active_units"], out["active_units_per_layer"] = sum(counts), counts
    elif encode is not None:
        out["active_units"], _ = active_units(encode, params["guide"], x)

    if surgery:
        s = _surgery_fn(model, guide, surgery_chunk_size)(params, jax.random.fold_in(rng, 2), jnp.asarray(x))
        for field in ("elbo", "reconstruction", "index_code_mi", "marginal_kl", "avg_kl"):
            out[f"surgery_{field}"] = float(getattr(s, field))
        out["surgery_log_num_points"] = math.log(n)
    return out


def sandwich(results: dict, num_samples_iwae: int = 64) -> dict:
    """The sandwich ``ELBO <= IWAE_K <= log p(x) <= CUBO_2`` from :func:`evaluate`'s numbers.

    ``log p(x)`` is the best estimate there is: ``ais_log_likelihood`` if AIS ran, else
    ``log_likelihood`` (IWAE with K = 5000). Empty when ``cubo_2`` or both estimates of
    ``log p(x)`` are missing (e.g. ``num_samples_ll = 0``).

    Returns:
      ``sandwich_log_likelihood`` and ``sandwich_log_likelihood_method`` (``"ais"`` or
      ``"iwae_<K>"``), ``sandwich_width`` (``cubo_2 - sandwich_log_likelihood``),
      ``sandwich_width_elbo`` (``cubo_2 - elbo``) and ``sandwich_ordered`` (the four in order).

    Example:
      >>> r = {"elbo": -3.0, "iwae_64": -2.5, "log_likelihood": -2.4, "log_likelihood_num_samples": 5000,
      ...      "cubo_2": -2.1}
      >>> s = sandwich(r)
      >>> s["sandwich_log_likelihood_method"], round(s["sandwich_width"], 3), s["sandwich_ordered"]
      ('iwae_5000', 0.3, True)
    """
    if "cubo_2" not in results:
        return {}
    if "ais_log_likelihood" in results:
        lower, method = results["ais_log_likelihood"], "ais"
    elif "log_likelihood" in results:
        lower, method = results["log_likelihood"], f"iwae_{results.get('log_likelihood_num_samples', '')}"
    else:
        return {}
    chain = [results["elbo"], results[f"iwae_{num_samples_iwae}"], lower, results["cubo_2"]]
    return {"sandwich_log_likelihood": float(lower), "sandwich_log_likelihood_method": method,
            "sandwich_width": float(results["cubo_2"] - lower),
            "sandwich_width_elbo": float(results["cubo_2"] - results["elbo"]),
            "sandwich_ordered": bool(all(a <= b for a, b in zip(chain, chain[1:], strict=False)))}


def log_likelihood_and_cubo(model: je.Model, guide: je.Guide, params: dict, rng: jax.Array, x: jax.Array, *,
                            num_samples: int = 5000, chunk_size: int | str = "auto", n: float = 2.0,
                            return_khat: bool = False) -> tuple[jax.Array, ...]:
    r"""``(IWAE_K, CUBO_n)`` per example, from the same K draws, streamed in chunks.

    .. math:: \widehat{\log p}(x) = \log \frac1K \sum_k \tilde w_k, \qquad
       \widehat{\mathrm{CUBO}}_n(x) = \frac1n \log \frac1K \sum_k \tilde w_k^{\,n} .

    The draws and chunks are those of :func:`jaxelbo.log_likelihood` (sample ``k`` of
    point ``b`` uses ``fold_in(split(rng, B)[b], k)``; ``chunk_size="auto"`` chooses the
    chunks from the machine), so the first output is its estimate; per example
    ``CUBO_n >= IWAE_K`` on the same draws (the power-mean inequality), and both are biased
    low of their targets ``log p(x)`` and ``CUBO_n``. With ``return_khat`` (and K >= 25), a
    third output: the PSIS k-hat of the K weights, as ``je.log_likelihood(...,
    return_khat=True)`` computes it (``nan`` below 25 samples).

    Returns:
      two (``return_khat``: three) ``(B,)`` arrays.
    """
    from jaxelbo.diagnostics import streamed_log_mean_exp

    with_khat = return_khat and psis_tail_size(int(num_samples)) >= 5
    out = streamed_log_mean_exp(model, guide, params, rng, x, num_samples=int(num_samples),
                                chunk_size=chunk_size, powers=(1.0, float(n)), khat=with_khat)
    one, power = out[0], out[1]
    if not return_khat:
        return one, power / n
    return one, power / n, out[2] if with_khat else jnp.full(one.shape, jnp.nan, one.dtype)


def _mean_and_stderr(v: np.ndarray) -> tuple[float, float]:
    v = np.asarray(v, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def evaluate_ais(model: je.Model, guide: je.Guide, params: dict, rng: jax.Array, x: np.ndarray, *,
                 num_steps: int = 1000, num_chains: int = 16, batch_size: int = 10, iwae: np.ndarray | None = None,
                 bdmc_points: int = 0, amortisation_steps: int = 300, progress: bool = False,
                 keep_per_point: bool = False, **ais_kwargs) -> dict:
    r"""AIS log-likelihood, its gap to IWAE, the amortisation gap and the BDMC gap, as floats.

    * ``ais_log_likelihood``: ``(1/N) sum_n AIS(x_n)`` (:func:`jaxelbo.ais_log_likelihood`,
      ``num_steps`` temperatures, ``num_chains`` chains), a stochastic lower bound, with
      ``ais_log_likelihood_stderr`` over the points and ``ais_chain_stderr`` (the mean
      over points of each estimate's standard error over chains); ``ais_acceptance``;
    * ``ais_minus_iwae`` (when ``iwae``, the per-point IWAE estimates, is given): the mean
      of ``AIS(x_n) - IWAE(x_n)`` and its paired standard error; positive means IWAE is loose;
    * ``amortisation_gap`` ``= ELBO[q*] - ELBO[q_phi]`` and ``approximation_gap``
      ``= AIS - ELBO[q*]`` (:func:`jaxelbo.amortisation_gap`, ``amortisation_steps`` Adam steps);
    * ``bdmc_gap``: with ``bdmc_points`` > 0, the mean width ``reverse - forward`` of the
      BDMC sandwich on that many points simulated from the model (:func:`jaxelbo.bdmc`,
      same settings as the AIS run), with ``bdmc_forward`` and ``bdmc_reverse``;
    * ``*_seconds`` and ``*_seconds_per_1000_points``: wall times (compilation included).

    The tqdm bar (``progress``) counts AIS transitions, ``N x (num_steps - 1)`` in all.

    Returns:
      A dict of plain numbers.
    """
    from tqdm.auto import tqdm

    x = np.asarray(x)
    n = len(x)
    out: dict = {"ais_num_steps": int(num_steps), "ais_num_chains": int(num_chains)}
    chain_chunk = int(ais_kwargs.pop("chain_chunk_size", min(num_chains, 16)))
    num_batches = -(-n // batch_size)
    calls_per_batch = max(num_steps - 1, 0) * -(-num_chains // chain_chunk)  # one per transition and chain chunk
    with tqdm(total=num_batches * max(num_steps - 1, 0), desc=f"AIS, T={num_steps}, {batch_size} points at a time",
              unit="step", disable=not progress, dynamic_ncols=True, mininterval=0.5) as bar:
        def tick(t):
            del t
            bar.update(max(num_steps - 1, 0) / calls_per_batch)

        fn = _ais_fn(model, guide, num_steps, num_chains, chain_chunk, tuple(sorted(ais_kwargs.items())),
                     tick if progress and calls_per_batch else None)
        t0 = time.perf_counter()
        lls, ses, accs = [], [], []
        for i, xb in enumerate(_batches(x, batch_size)):
            res = fn(params, jax.random.fold_in(rng, i), jnp.asarray(xb))
            lls.append(np.asarray(res.log_likelihood))
            ses.append(np.asarray(res.stderr))
            accs.append(np.asarray(res.acceptance))
            bar.n = (i + 1) * max(num_steps - 1, 0)
            bar.refresh()
    ais = np.concatenate(lls)
    seconds = time.perf_counter() - t0
    out["ais_log_likelihood"], out["ais_log_likelihood_stderr"] = _mean_and_stderr(ais)
    if keep_per_point:
        out["ais_per_point"] = ais.tolist()
    out["ais_chain_stderr"] = float(np.nanmean(np.concatenate(ses)))
    acc = np.concatenate(accs)
    out["ais_acceptance"] = float(acc.mean()) if acc.size else None
    out["ais_seconds"] = seconds
    out["ais_seconds_per_1000_points"] = seconds * 1000.0 / n
    if iwae is not None:
        out["ais_minus_iwae"], out["ais_minus_iwae_stderr"] = _mean_and_stderr(ais - np.asarray(iwae))
    if amortisation_steps:
        t0 = time.perf_counter()
        fn_gap = _gap_fn(model, guide, int(amortisation_steps))
        gaps = [fn_gap(params, jax.random.fold_in(jax.random.fold_in(rng, 1), i), jnp.asarray(xb),
                       jnp.asarray(ais[i * batch_size:i * batch_size + len(xb)]))
                for i, xb in enumerate(_batches(x, batch_size))]
        amort = np.concatenate([np.asarray(g.amortisation_gap) for g in gaps])
        approx = np.concatenate([np.asarray(g.approximation_gap) for g in gaps])
        out["amortisation_gap"], out["amortisation_gap_stderr"] = _mean_and_stderr(amort)
        out["approximation_gap"], out["approximation_gap_stderr"] = _mean_and_stderr(approx)
        out["amortisation_steps"] = int(amortisation_steps)
        out["amortisation_seconds"] = time.perf_counter() - t0
    if bdmc_points:
        t0 = time.perf_counter()
        res = _bdmc_fn(model, guide, int(bdmc_points), num_steps, num_chains, chain_chunk,
                       tuple(sorted(ais_kwargs.items())))(params, jax.random.fold_in(rng, 2))
        out["bdmc_num_points"] = int(bdmc_points)
        out["bdmc_forward"] = float(np.mean(np.asarray(res.forward)))
        out["bdmc_reverse"] = float(np.mean(np.asarray(res.reverse)))
        out["bdmc_gap"], out["bdmc_gap_stderr"] = _mean_and_stderr(np.asarray(res.reverse) - np.asarray(res.forward))
        out["bdmc_seconds"] = time.perf_counter() - t0
        out["bdmc_seconds_per_1000_points"] = out["bdmc_seconds"] * 1000.0 / int(bdmc_points)
    return out


@functools.lru_cache(maxsize=16)
def _ais_fn(model: je.Model, guide: je.Guide, num_steps: int, num_chains: int, chain_chunk: int, kwargs: tuple,
            callback: Callable | None):
    return jax.jit(lambda params, rng, xb: je.ais_log_likelihood(
        model, guide, params, rng, xb, num_steps=num_steps, num_chains=num_chains, chain_chunk_size=chain_chunk,
        callback=callback, **dict(kwargs)))


@functools.lru_cache(maxsize=16)
def _bdmc_fn(model: je.Model, guide: je.Guide, num_points: int, num_steps: int, num_chains: int, chain_chunk: int,
             kwargs: tuple):
    return jax.jit(lambda params, rng: je.bdmc(model, guide, params, rng, num_points=num_points, num_steps=num_steps,
                                               num_chains=num_chains, chain_chunk_size=chain_chunk, **dict(kwargs)))


@functools.lru_cache(maxsize=16)
def _gap_fn(model: je.Model, guide: je.Guide, num_steps: int):
    return jax.jit(lambda params, rng, xb, ll: je.amortisation_gap(model, guide, params, rng, xb, log_likelihood=ll,
                                                                   num_steps=num_steps))


# Compiled evaluation functions, cached per (model, guide, sizes) so that evaluating many
# runs of the same architecture (benchmarks) compiles each once.
def _bounds(model: je.Model, guide: je.Guide, num_samples: int, params: dict, rng: jax.Array, xb: jax.Array):
    """``(IWAE_K, ELBO_K, k-hat)`` per example of the batch ``xb``, from the same K samples
    (k-hat is ``nan`` below 25 samples)."""
    lw = je.log_weights(model, guide, params, rng, xb, num_samples=num_samples)
    khat = je.psis_khat(lw) if psis_tail_size(num_samples) >= 5 else jnp.full(lw.shape[:1], jnp.nan)
    return log_mean_exp(lw), jnp.mean(lw, axis=-1), khat


@functools.lru_cache(maxsize=32)
def _bounds_fn(model: je.Model, guide: je.Guide, num_samples: int):
    return jax.jit(functools.partial(_bounds, model, guide, num_samples))


@functools.lru_cache(maxsize=32)
def _log_likelihood_fn(model: je.Model, guide: je.Guide, num_samples: int, chunk_size: int | str):
    return jax.jit(lambda params, rng, xb: log_likelihood_and_cubo(model, guide, params, rng, xb,
                                                                   num_samples=num_samples, chunk_size=chunk_size,
                                                                   return_khat=True))


#: ``jaxelbo evaluate`` warns when more than this fraction of points has k-hat > 0.7.
KHAT_WARNING_FRACTION = 0.1


def khat_warning(result: dict) -> str | None:
    """One line when more than :data:`KHAT_WARNING_FRACTION` of the points have k-hat > 0.7, else None.

    Reads the k-hat of the log-likelihood estimate's K weights
    (``log_likelihood_khat_above_0.7``), or of the IWAE-64 weights when that is all there is.
    """
    key = f"log_likelihood_khat_above_{KHAT_THRESHOLD}"
    what = f"log p(x) (K={result.get('log_likelihood_num_samples')})"
    if key not in result:
        key, what = f"khat_above_{KHAT_THRESHOLD}", "the IWAE bound"
    fraction = result.get(key)
    if fraction is None or fraction <= KHAT_WARNING_FRACTION:
        return None
    return (f"warning: k-hat > {KHAT_THRESHOLD} on {100 * fraction:.0f}% of points: {what} is dominated by a few "
            f"importance weights and not to be trusted; estimate it by AIS instead (--method ais)")


@functools.lru_cache(maxsize=32)
def _surgery_fn(model: je.Model, guide: je.Guide, chunk_size: int):
    return jax.jit(lambda params, rng, xa: je.elbo_surgery(model, guide, params, rng, xa, num_samples=1,
                                                           chunk_size=chunk_size))


def validation_fn(model: je.Model, guide: je.Guide, x: np.ndarray, *, seed: int = 0,
                  num_samples: int = 64, batch_size: int = 500) -> Callable[[dict], dict]:
    """``params -> {"iwae_<K>", "elbo"}`` on ``x`` with a fixed key: the loop's validation.

    One compiled program: the batches of ``x`` (the last padded, the padding masked) run
    one after another under ``jax.lax.map``, so memory is that of one batch and the
    program does not grow with ``len(x)``.
    """
    x = jnp.asarray(x)
    n = x.shape[0]
    batch_size = min(batch_size, n)
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    x_batches = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]).reshape(num_batches, batch_size, *x.shape[1:])

    @jax.jit
    def fn(params):
        rng = jax.random.key(seed)

        def one(args):
            i, xb = args
            return _bounds(model, guide, num_samples, params, jax.random.fold_in(rng, i), xb)

        iw, el, _ = jax.lax.map(one, (jnp.arange(num_batches), x_batches))
        iw, el = iw.reshape(-1)[:n], el.reshape(-1)[:n]
        return {f"iwae_{num_samples}": jnp.mean(iw), "elbo": jnp.mean(el)}

    return fn
