"""Throughput of every jaxelbo objective x estimator on the Burda VAE, against references.

Run from a source checkout::

    python benchmarks/throughput.py --out benchmarks/results   # full run (several minutes on 2 CPU cores)
    python benchmarks/throughput.py --fast     # smoke run, into runs/bench

What is measured (all in one process, contenders interleaved in a shuffled order on
every repetition so that drift of a shared machine hits them alike; medians; jit
warm-up excluded; ``block_until_ready``):

1. **Gradient steps.** ``jax.jit(jax.grad(loss))`` on ``params`` for every objective x
   estimator in ``je.OBJECTIVES``, on the project's flax VAE (``jaxelbo.models.vae``,
   784-200-200-50, Bernoulli decoder), batch ``B = 64`` of random binary data (i.i.d.
   Bernoulli(1/2) pixels), ``K`` in {1, 8, 64, 512}. Each is reported in ms, as a ratio
   to plain IWAE (``iwae``/``reparam``) and as a multiple of the GEMM floor: the same
   step's matrix products alone (forward and backward of encoder and decoder).
   Losses come from :func:`jaxelbo.registry.make`: ``miwae``/``piwae`` split the budget as
   ``M x K/M`` (:func:`jaxelbo.registry.split_budget`, e.g. 512 = 16 x 32), ``beta`` and
   ``alpha`` take the registry's defaults.
2. **References**, each checked to give the same gradients on the same noise before it
   is timed: the same VAE written by hand on a ``(B, K)`` batch in plain JAX (IWAE, and
   DReG with a ``custom_vjp`` hook), jaxelbo with a hand-written per-example model
   instead of flax, PyTorch IWAE and hook-style DReG (CPU; checked on JAX's noise, timed
   drawing its own with ``torch.randn``; ``OMP_WAIT_POLICY=PASSIVE`` unless set, since
   spinning OpenMP threads are several times slower on a shared machine), and TFP-JAX's
   ``DOUBLY_REPARAMETERIZED`` loss (whose model gradient uses ``w^2``; reported).
   Wall time and process CPU time (all threads) are both recorded.
3. **log_likelihood** at large K: time per test point and XLA's compiled memory for two
   chunk sizes and two K, showing memory set by the chunk, flat in K.
4. **SNR sweep**: ``je.gradient_replicates`` (one vmapped program over R replicates) vs
   a Python loop of R jitted single-replicate calls, on the linear-Gaussian toy.

5. **Training loop**: ``jaxelbo train``'s loop (``training.train``: data on the device,
   one compiled ``fori_loop`` per chunk of steps) against a tight Python loop of the same
   compiled step on device-resident batches, in steps per second, at K in {1, 8, 64}
   (``benchmarks/training_loop.py``).

Writes ``throughput-<device>.json`` and ``.md`` into ``runs/bench`` under the current
directory, or ``--out`` (``--out benchmarks/results`` refreshes the committed results;
``--only-loop``: ``training-loop-<device>.json`` and ``.md``, section 5 alone). References
that cannot run (PyTorch or TFP not installed, ``--no-references``, their estimator not
selected) are listed in the output with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# PyTorch's OpenMP threads spin-wait by default; on a shared (oversubscribed) machine that
# makes it several times slower. Passive waiting is the fair setting for the reference.
# Must be set before torch is imported; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import training_loop  # noqa: E402
from references import burda  # noqa: E402

import jaxelbo as je  # noqa: E402
from jaxelbo import registry  # noqa: E402
from jaxelbo.app.environment import describe  # noqa: E402

GRAD_RTOL = 1e-3  # max |a - b| / max |b| per leaf, float32 sums over B*K samples
DEFAULTS = {"num_samples": [1, 8, 64, 512], "batch_size": 64, "repetitions": 20,
            "ll_num_samples": 5000, "ll_num_points": 1000, "ll_chunk_sizes": [50, 500],
            "num_replicates": 1000, "loop_num_samples": [1, 8, 64], "loop_seconds": 1.0, "loop_repetitions": 9}
FAST = {"num_samples": [1, 8], "batch_size": 16, "repetitions": 3,
        "ll_num_samples": 500, "ll_num_points": 100, "ll_chunk_sizes": [50, 250],
        "num_replicates": 100, "loop_num_samples": [1, 8], "loop_seconds": 0.2, "loop_repetitions": 3}
REFERENCE = ("iwae", "reparam")
TARGETS = {
    "estimator_overhead": 1.02,   # dreg (iwae, rws), stl, reparam vs plain IWAE at K >= 8
    "floor_multiple": 2.0,        # plain IWAE vs its GEMM floor at K = 64
    "per_example_vs_hand": 1.05,  # vmapped per-example model vs hand-batched
    "torch_speedup": 1.1,         # jaxelbo faster than PyTorch at K = 64 and 512
    "snr_vmap_speedup": 20.0,     # vmapped SNR sweep vs Python loop
}


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def interleaved_times(steps: dict[str, Callable[[], object]], *, repetitions: int, warmup: int = 2,
                      seed: int = 0, progress: Callable[[], None] | None = None,
                      cpu_times: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Wall seconds per call of each zero-argument ``step`` (which must block until done).

    Every step is called ``warmup`` times first (compilation, caches), then
    ``repetitions`` rounds run every step once, in a fresh random order each round, so
    slow drift of a shared machine affects all steps alike. If ``cpu_times`` is given it
    receives the process CPU seconds (all threads) of each call: the work done, which
    depends less than wall time on other processes competing for the cores.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    shuffler = random.Random(seed)
    for _ in range(repetitions):
        shuffler.shuffle(order)
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        if progress is not None:
            progress()
    if cpu_times is not None:
        cpu_times.update({name: np.asarray(c) for name, c in cpu.items()})
    return {name: np.asarray(t) for name, t in times.items()}


def paired_ratio(t: np.ndarray, t_ref: np.ndarray) -> float:
    """Median over rounds of ``t / t_ref`` (both timed in the same round)."""
    return float(np.median(t / t_ref))


def jax_step(fn: Callable, *args) -> Callable[[], object]:
    return lambda: jax.block_until_ready(fn(*args))


# --------------------------------------------------------------------------------------
# Gradient checks
# --------------------------------------------------------------------------------------


def max_relative_error(a, b) -> float:
    """``max over leaves of max|a - b| / max|b|`` for two pytrees of the same structure."""
    def one(u, v):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        return float(np.max(np.abs(u - v)) / max(np.max(np.abs(v)), 1e-30))

    return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(one, a, b)))


# --------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One timed gradient step."""

    name: str
    implementation: str  # jaxelbo | jaxelbo-dict | hand-batched | torch | tfp | gemm-floor
    objective: str | None
    estimator: str | None
    step: Callable[[], object] | None = None
    grad_check: dict = field(default_factory=dict)


def grad_of(loss_fn: Callable) -> Callable:
    """``jax.jit(jax.grad(params -> loss))`` of a jaxelbo ``(loss, aux)`` loss."""
    return jax.jit(jax.grad(lambda params, rng, x: loss_fn(params, rng, x)[0]))


def selected_pairs(objectives: list[str] | None, estimators: list[str] | None) -> list[tuple[str, str]]:
    """Every supported (objective, estimator) passing the filters (:func:`jaxelbo.registry.pairs`:
    unknown names and unsupported pairs are refused as ``jaxelbo train`` refuses them)."""
    pairs = registry.pairs(objectives, estimators)
    if REFERENCE not in pairs:
        pairs.insert(0, REFERENCE)  # every ratio is taken against plain IWAE
    return pairs


def build_contenders(model, guide, params, x, rng, *, num_samples: int, pairs, references: bool,
                     log: Callable[[str], None], plain_model_row: bool = True,
                     skipped: dict[str, str] | None = None) -> list[Contender]:
    """Every contender at one K, references gradient-checked (failures are not timed).

    ``skipped`` receives ``{reference: why}`` for every reference that is not built, and for
    every pair that refuses this K (a leave-one-out estimator at K = 1).
    """
    skipped = {} if skipped is None else skipped
    batch_size = x.shape[0]
    out = []
    grads = {}
    for objective, estimator in pairs:
        try:
            loss_fn = registry.make(objective, model, guide, estimator=estimator, num_samples=num_samples)
        except ValueError as err:  # a pair that needs more samples (leave-one-out at K = 1): listed, not timed
            skipped[f"jaxelbo {objective}/{estimator} at K = {num_samples}"] = str(err)
            continue
        fn = grad_of(loss_fn)
        out.append(Contender(f"jaxelbo {objective}/{estimator}", "jaxelbo", objective, estimator,
                             jax_step(fn, params, rng, x)))
        if objective == "iwae" and estimator in ("reparam", "dreg"):
            grads[estimator] = fn(params, rng, x)

    floor_inputs = burda.gemm_floor_inputs(jax.random.fold_in(rng, 1), batch_size, num_samples, x.dtype)
    out.append(Contender("GEMM floor", "gemm-floor", None, None,
                         jax_step(jax.jit(burda.gemm_floor), floor_inputs)))
    if not references:
        for name in REFERENCE_NAMES:
            skipped[name] = "--no-references"
        return out

    def checked(contender: Contender, got, want, what: str) -> Contender:
        err = max_relative_error(got, want)
        contender.grad_check = {"against": what, "max_rel_err": err, "ok": bool(err <= GRAD_RTOL)}
        if not contender.grad_check["ok"]:
            log(f"  {contender.name}: gradients differ from {what} (max rel err {err:.2e}); not timed")
            contender.step = None
        return contender

    # jaxelbo with a hand-written per-example model (no flax) and the hand-batched model.
    for e in ("reparam", "dreg"):
        if e not in grads:
            for name in ("hand-batched JAX", "PyTorch"):
                skipped[f"{name} iwae/{e}"] = f"needs iwae/{e} among the timed pairs (--objective, --estimator)"
    if not plain_model_row:
        skipped["jaxelbo with a plain-JAX model"] = "the model under test is already plain JAX (--model plain)"
    elif "reparam" not in grads:
        skipped["jaxelbo with a plain-JAX model"] = "needs iwae/reparam among the timed pairs"
    if plain_model_row and "reparam" in grads:
        dict_model, dict_guide = burda.model_and_guide()
        fn = grad_of(je.iwae(dict_model, dict_guide, num_samples=num_samples, estimator="reparam"))
        out.append(checked(Contender("jaxelbo iwae/reparam, plain-JAX model", "jaxelbo-dict", "iwae",
                                     "reparam", jax_step(fn, params, rng, x)),
                           fn(params, rng, x), grads["reparam"], "jaxelbo iwae/reparam"))
    for estimator, loss in (("reparam", burda.hand_iwae_loss), ("dreg", burda.hand_dreg_loss)):
        fn = jax.jit(jax.grad(lambda p, r, x, loss=loss: loss(p, r, x, num_samples=num_samples)))
        if estimator in grads:
            out.append(checked(Contender(f"hand-batched JAX iwae/{estimator}", "hand-batched", "iwae",
                                         estimator, jax_step(fn, params, rng, x)),
                               fn(params, rng, x), grads[estimator], f"jaxelbo iwae/{estimator}"))

    eps = np.asarray(burda.noise(rng, batch_size, num_samples, x.dtype))
    try:
        from references import torch_ref
    except ImportError as e:
        skipped["PyTorch"] = f"torch is not installed ({e}); pip install -e '.[bench]'"
    else:
        for estimator in ("reparam", "dreg"):
            if estimator not in grads:
                continue
            module, step = torch_ref.make_step(params, np.asarray(x), eps, estimator)
            step()  # checked on JAX's noise, then timed drawing its own (torch.randn) as JAX does
            _, timed_step = torch_ref.make_step(params, np.asarray(x), eps, estimator, draw_noise=True)
            out.append(checked(Contender(f"PyTorch iwae/{estimator}", "torch", "iwae", estimator, timed_step),
                               module.gradients(), grads[estimator], f"jaxelbo iwae/{estimator}"))

    from references import tfp_ref
    why = tfp_ref.available()
    if why is not None:
        skipped["TFP-JAX"] = f"tfp-nightly is not importable ({why}); pip install -e '.[bench]'"
    elif "dreg" not in grads:
        skipped["TFP-JAX"] = "needs iwae/dreg among the timed pairs (--objective, --estimator)"
    else:
        fn = jax.jit(jax.grad(lambda p, r, x: tfp_ref.dreg_loss(p, r, x, num_samples=num_samples)))
        tfp_grads = fn(params, rng, x)
        tfp_eps = tfp_ref.noise(params, rng, x, num_samples=num_samples)
        want = jax.jit(jax.grad(burda.hand_dreg_loss_eps))(params, tfp_eps, x)
        c = checked(Contender("TFP-JAX iwae/dreg", "tfp", "iwae", "dreg",
                              jax_step(fn, params, rng, x)),
                    tfp_grads["guide"], want["guide"], "IWAE-DReG, guide only, on TFP's noise")
        c.grad_check["model_max_rel_err"] = max_relative_error(tfp_grads["model"], want["model"])
        c.grad_check["note"] = ("TFP's DOUBLY_REPARAMETERIZED gives the model sum_k w_k^2 grad log p "
                                "instead of IWAE's sum_k w_k grad log p")
        out.append(c)
    return out


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


REFERENCE_NAMES = ("jaxelbo with a plain-JAX model", "hand-batched JAX", "PyTorch", "TFP-JAX")
COMPARISONS = (  # (numerator, denominator, what): paired ratios of two contenders' times
    ("jaxelbo iwae/reparam", "hand-batched JAX iwae/reparam", "per_example_over_hand"),
    ("jaxelbo iwae/dreg", "hand-batched JAX iwae/dreg", "per_example_over_hand"),
    ("jaxelbo iwae/reparam", "jaxelbo iwae/reparam, plain-JAX model", "flax_over_plain_model"),
    ("PyTorch iwae/reparam", "jaxelbo iwae/reparam", "torch_over_jaxelbo"),
    ("PyTorch iwae/dreg", "jaxelbo iwae/dreg", "torch_over_jaxelbo"),
    ("TFP-JAX iwae/dreg", "jaxelbo iwae/dreg", "tfp_over_jaxelbo"),
)


def burda_vae(cfg: dict):
    """``(model, guide, params)`` of the VAE under test (``cfg["model"]``: flax or plain)."""
    rng = jax.random.key(cfg["seed"])
    if cfg["model"] == "plain":
        return (*burda.model_and_guide(), burda.init_params(rng))
    from jaxelbo.models import vae

    return vae.make(rng, burda.X_DIM)


def bench_gradient_steps(cfg: dict, log, progress_factory,
                         skipped: dict[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """Sections 1 and 2: every contender at every K (``skipped``: see :func:`build_contenders`).

    Returns:
      ``(rows, comparisons)``: one row per contender and K (times, ratio to plain IWAE,
      multiple of the GEMM floor, gradient check), and the paired ratios of
      :data:`COMPARISONS`.
    """
    model, guide, params = burda_vae(cfg)
    x = burda.random_binary_data(jax.random.key(cfg["seed"] + 1), cfg["batch_size"])
    rng = jax.random.key(cfg["seed"] + 2)
    pairs = selected_pairs(cfg["objective"], cfg["estimator"])
    rows, comparisons = [], []
    for k in cfg["num_samples"]:
        log(f"K = {k}: building and checking contenders")
        contenders = build_contenders(model, guide, params, x, rng, num_samples=k, pairs=pairs,
                                      references=cfg["references"], log=log,
                                      plain_model_row=cfg["model"] == "flax", skipped=skipped)
        timed = {c.name: c.step for c in contenders if c.step is not None}
        bar = progress_factory(cfg["repetitions"], f"K = {k}: {len(timed)} contenders")
        cpu = {}
        times = interleaved_times(timed, repetitions=cfg["repetitions"], seed=cfg["seed"] + k,
                                  progress=bar.update, cpu_times=cpu)
        bar.close()
        ref_name = f"jaxelbo {REFERENCE[0]}/{REFERENCE[1]}"
        ref = times[ref_name]
        floor = times["GEMM floor"]
        for c in contenders:
            row = {"num_samples": k, "batch_size": cfg["batch_size"], "name": c.name,
                   "implementation": c.implementation, "objective": c.objective, "estimator": c.estimator}
            if c.grad_check:
                row["grad_check"] = c.grad_check
            if c.name in times:
                t = times[c.name]
                row.update(median_ms=1e3 * float(np.median(t)),
                           q25_ms=1e3 * float(np.percentile(t, 25)), q75_ms=1e3 * float(np.percentile(t, 75)),
                           ratio_to_iwae=paired_ratio(t, ref), floor_multiple=paired_ratio(t, floor),
                           cpu_ms=1e3 * float(np.median(cpu[c.name])),
                           cpu_ratio_to_iwae=paired_ratio(cpu[c.name], cpu[ref_name]),
                           cpu_floor_multiple=paired_ratio(cpu[c.name], cpu["GEMM floor"]))
            if c.implementation == "gemm-floor":
                flops = burda.gemm_flops(cfg["batch_size"], k)
                row["gflops"] = flops / 1e9
                row["gflop_per_s"] = flops / float(np.median(floor)) / 1e9
            rows.append(row)
        for num, den, what in COMPARISONS:
            if num in times and den in times:
                comparisons.append({"num_samples": k, "what": what, "numerator": num, "denominator": den,
                                    "ratio": paired_ratio(times[num], times[den]),
                                    "cpu_ratio": paired_ratio(cpu[num], cpu[den])})
    return rows, comparisons


def bench_log_likelihood(cfg: dict, log) -> dict:
    """Section 3: log_likelihood time and compiled memory for chunk sizes and K."""
    model, guide, params = burda_vae(cfg)
    num_points = cfg["ll_num_points"]
    batch = min(100, num_points)
    x_all = burda.random_binary_data(jax.random.key(cfg["seed"] + 3), num_points)
    rng = jax.random.key(cfg["seed"] + 4)
    k_big = cfg["ll_num_samples"]
    k_small = max(k_big // 5, max(cfg["ll_chunk_sizes"]))

    def compiled(num_samples, chunk_size):
        fn = jax.jit(lambda p, r, x: je.log_likelihood(model, guide, p, r, x, num_samples=num_samples,
                                                       chunk_size=chunk_size))
        return fn, fn.lower(params, rng, x_all[:batch]).compile()

    memory = []
    for k in (k_small, k_big):
        for chunk in cfg["ll_chunk_sizes"]:
            _, comp = compiled(k, chunk)
            stats = comp.memory_analysis()
            memory.append({"num_samples": k, "chunk_size": chunk, "batch_size": batch,
                           "temp_mib": stats.temp_size_in_bytes / 2**20,
                           "argument_mib": stats.argument_size_in_bytes / 2**20,
                           "output_mib": stats.output_size_in_bytes / 2**20})
    timing = []
    for chunk in cfg["ll_chunk_sizes"]:
        fn, _ = compiled(k_big, chunk)
        jax.block_until_ready(fn(params, rng, x_all[:batch]))
        t0 = time.perf_counter()
        for i, start in enumerate(range(0, num_points, batch)):
            out = fn(params, jax.random.fold_in(rng, i), x_all[start:start + batch])
        jax.block_until_ready(out)
        seconds = time.perf_counter() - t0
        timing.append({"num_samples": k_big, "chunk_size": chunk, "num_points": num_points,
                       "batch_size": batch, "seconds": seconds,
                       "ms_per_point": 1e3 * seconds / num_points,
                       "samples_per_s": num_points * k_big / seconds})
        log(f"log_likelihood K={k_big} chunk={chunk}: {seconds:.1f} s for {num_points} points")
    return {"timing": timing, "memory": memory,
            "note": f"test points in batches of {batch}; memory is XLA's compiled temp allocation "
                    "(jit(...).lower(...).compile().memory_analysis())"}


def bench_snr_sweep(cfg: dict, log) -> dict:
    """Section 4: vmapped gradient replicates vs a Python loop of jitted single replicates."""
    lg = je.models.linear_gaussian
    dim, k, r = 20, 10, cfg["num_replicates"]
    mu = jax.random.normal(jax.random.key(cfg["seed"] + 5), (dim,))
    params = lg.optimal_params(mu)
    params = jax.tree_util.tree_map(lambda a: a + 0.1, params)  # away from the optimum
    x = lg.sample_data(jax.random.key(cfg["seed"] + 6), mu, 1)
    loss_fn = je.iwae(lg.model(), lg.guide(), num_samples=k, estimator="dreg")
    rng = jax.random.key(cfg["seed"] + 7)

    vmapped = jax.jit(lambda p, rng, x: je.gradient_replicates(loss_fn, p, rng, x, num_replicates=r))
    single = jax.jit(jax.grad(lambda p, key, x: loss_fn(p, key, x)[0]))
    keys = list(jax.random.split(rng, r))

    reps = vmapped(params, rng, x)
    looped = [single(params, key, x) for key in keys[:3]]
    err = max_relative_error(jax.tree_util.tree_map(lambda a: a[:3], reps),
                             jax.tree_util.tree_map(lambda *a: jnp.stack(a), *looped))

    def loop():
        return jax.block_until_ready([single(params, key, x) for key in keys])

    times = interleaved_times({"vmapped": jax_step(vmapped, params, rng, x), "loop": loop},
                              repetitions=max(3, cfg["repetitions"] // 4), warmup=1, seed=cfg["seed"])
    out = {"model": f"linear-Gaussian D={dim}", "objective": "iwae", "estimator": "dreg", "num_samples": k,
           "batch_size": 1, "num_replicates": r,
           "vmapped_ms": 1e3 * float(np.median(times["vmapped"])),
           "loop_ms": 1e3 * float(np.median(times["loop"])),
           "speedup": paired_ratio(times["loop"], times["vmapped"]),
           "replicates_match_loop_max_rel_err": err}
    log(f"SNR sweep R={r}: vmapped {out['vmapped_ms']:.1f} ms, loop {out['loop_ms']:.1f} ms, "
        f"{out['speedup']:.0f}x")
    return out


# --------------------------------------------------------------------------------------
# Targets, metadata, output
# --------------------------------------------------------------------------------------


def _row(rows, k, name):
    for r in rows:
        if r["num_samples"] == k and r["name"] == name and "median_ms" in r:
            return r
    return None


def evaluate_targets(rows: list[dict], comparisons: list[dict], snr: dict | None) -> list[dict]:
    """Every performance target, with the measured (paired) ratio and whether it is met."""
    out = []

    def add(target, k, value, met):
        out.append({"target": target, "num_samples": k, "value": value, "met": bool(met)})

    lim = TARGETS["estimator_overhead"]
    for k in sorted({r["num_samples"] for r in rows}):
        for name in ("iwae/dreg", "rws/dreg", "iwae/stl"):
            r = _row(rows, k, f"jaxelbo {name}")
            if r is not None and k >= 8:
                add(f"{name} <= {lim}x plain IWAE", k, r["ratio_to_iwae"], r["ratio_to_iwae"] <= lim)
        r = _row(rows, k, "jaxelbo iwae/reparam")
        if r is not None and k == 64:
            lim_f = TARGETS["floor_multiple"]
            v = r["floor_multiple"]
            add(f"plain IWAE step <= {lim_f}x GEMM floor", k, v, v <= lim_f)
    for c in comparisons:
        k, v = c["num_samples"], c["ratio"]
        if c["what"] == "per_example_over_hand" and k == 64:
            lim = TARGETS["per_example_vs_hand"]
            add(f"{c['numerator']} (per-example, vmapped) <= {lim}x hand-batched", k, v, v <= lim)
        if c["what"] == "torch_over_jaxelbo" and k in (64, 512):
            lim = TARGETS["torch_speedup"]
            add(f"{c['denominator']} >= {lim}x faster than {c['numerator']}", k, v, v >= lim)
    if snr is not None:
        lim = TARGETS["snr_vmap_speedup"]
        add(f"vmapped SNR sweep >= {lim}x faster than a loop", snr["num_samples"], snr["speedup"],
            snr["speedup"] >= lim)
    return out


def environment() -> dict:
    """jaxelbo's environment record plus the references' versions and torch's OpenMP policy."""
    env = describe(extra_packages=("torch", "tfp-nightly"))
    env["versions"]["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    return env


def device_tag() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in f"{dev.platform}-{dev.device_kind}".lower())


def describe_device(env: dict) -> str:
    """The device in words, e.g. ``cpu (AMD EPYC ..., 2 cores)`` or ``gpu (NVIDIA H100 ...)``."""
    dev = env["device"]
    if dev["platform"] == "cpu":
        return f"cpu ({dev.get('cpu')}, {dev.get('cpu_count')} cores)"
    return f"{dev['platform']} ({dev.get('device_kind', '')})"


def _fmt(v, spec=".2f"):
    return "" if v is None else format(v, spec)


def to_markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [f"# jaxelbo throughput on {env['device']['platform']} ({env['device']['cpu']}, "
             f"{env['device']['cpu_count']} cores)", "",
             f"Date {result['date']}, wall {result['wall_seconds']:.0f} s, load average "
             f"{result['load_average_start']} at start, {result['load_average_end']} at end.  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".  ",
             f"Burda VAE (784-200-200-50 tanh, Bernoulli decoder; "
             f"{'`jaxelbo.models.vae`' if cfg['model'] == 'flax' else 'plain per-example JAX'}), batch "
             f"B = {cfg['batch_size']} of random binary data, {cfg['repetitions']} interleaved repetitions, "
             "median ms per `jit(grad(loss))` step; ratios are medians of per-round ratios.", ""]
    if not result["gradient_steps"]:
        lines = lines[:-2]  # no gradient-step section: its setting line does not apply
    rows = result["gradient_steps"]
    ks = sorted({r["num_samples"] for r in rows})
    names = list(dict.fromkeys(r["name"] for r in rows))
    by = {(r["name"], r["num_samples"]): r for r in rows}
    for title, key, spec in () if not rows else (("Median ms per gradient step", "median_ms", ".1f"),
                             ("Ratio to plain IWAE (`iwae`/`reparam`), same run", "ratio_to_iwae", ".3f"),
                             ("Multiple of the GEMM floor (the step's matrix products alone)",
                              "floor_multiple", ".2f"),
                             ("CPU ms per step (process CPU time, all threads)", "cpu_ms", ".1f"),
                             ("CPU-time ratio to plain IWAE", "cpu_ratio_to_iwae", ".3f"),
                             ("CPU-time multiple of the GEMM floor", "cpu_floor_multiple", ".2f")):
        lines += [f"## {title}", "", "| contender | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "|---|" + "---:|" * len(ks)]
        for n in names:
            cells = []
            for k in ks:
                r = by.get((n, k))
                cells.append("" if r is None else ("not timed" if key not in r else _fmt(r[key], spec)))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    floor_rows = [r for r in rows if r["implementation"] == "gemm-floor" and "gflop_per_s" in r]
    if floor_rows:
        lines += ["GEMM floor throughput: " + ", ".join(
            f"K={r['num_samples']}: {r['gflops']:.2f} GFLOP in {r['median_ms']:.1f} ms "
            f"({r['gflop_per_s']:.0f} GFLOP/s)" for r in floor_rows) + ".", ""]
    checks = [r for r in rows if r.get("grad_check")]
    if checks:
        lines += ["## Gradient checks of the references (same noise, before timing)", "",
                  "| contender | K | against | max rel err | ok |", "|---|---:|---|---:|---|"]
        for r in checks:
            g = r["grad_check"]
            extra = (f" (model gradient: rel err {g['model_max_rel_err']:.2f}, see note)"
                     if "model_max_rel_err" in g else "")
            lines.append(f"| {r['name']} | {r['num_samples']} | {g['against']}{extra} | "
                         f"{g['max_rel_err']:.1e} | {'yes' if g['ok'] else 'NO'} |")
        notes = {r["grad_check"]["note"] for r in checks if "note" in r["grad_check"]}
        lines += [""] + [f"Note: {n}." for n in sorted(notes)] + [""]
    skipped = result.get("skipped_references")
    if skipped:
        lines += ["## References not run", "", "| reference | why |", "|---|---|"]
        lines += [f"| {s['reference']} | {s['why']} |" for s in skipped] + [""]
    comps = result.get("comparisons")
    if comps:
        lines += ["## Head to head (paired ratios of times, same run)", "",
                  "| numerator | denominator | K | wall ratio | CPU-time ratio |", "|---|---|---:|---:|---:|"]
        for c in comps:
            lines.append(f"| {c['numerator']} | {c['denominator']} | {c['num_samples']} | {c['ratio']:.3f} | "
                         f"{c['cpu_ratio']:.3f} |")
        lines.append("")
    ll = result.get("log_likelihood")
    if ll:
        lines += ["## `je.log_likelihood`", "", ll["note"] + ".", "",
                  "| K | chunk | points | seconds | ms / point | samples / s |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for t in ll["timing"]:
            lines.append(f"| {t['num_samples']} | {t['chunk_size']} | {t['num_points']} | "
                         f"{t['seconds']:.1f} | {t['ms_per_point']:.1f} | {t['samples_per_s']:.3g} |")
        lines += ["", "| K | chunk | batch | XLA temp MiB |", "|---:|---:|---:|---:|"]
        for m in ll["memory"]:
            lines.append(f"| {m['num_samples']} | {m['chunk_size']} | {m['batch_size']} | "
                         f"{m['temp_mib']:.1f} |")
        lines.append("")
    snr = result.get("snr_sweep")
    if snr:
        lines += ["## SNR sweep: vmapped replicates vs a Python loop", "",
                  f"{snr['model']}, {snr['objective']}/{snr['estimator']}, K = {snr['num_samples']}, "
                  f"R = {snr['num_replicates']}: `je.gradient_replicates` {snr['vmapped_ms']:.1f} ms, "
                  f"loop of jitted single replicates {snr['loop_ms']:.1f} ms: **{snr['speedup']:.0f}x** "
                  f"(replicates equal the loop's to {snr['replicates_match_loop_max_rel_err']:.1e}).", ""]
    lines += training_loop.to_markdown(result.get("training_loop"), describe_device(env))
    if result.get("targets"):
        lines += ["## Targets", "", "| target | K | measured | met |", "|---|---:|---:|---|"]
        for t in result["targets"]:
            met = "yes" if t["met"] else "NO"
            lines.append(f"| {t['target']} | {t['num_samples']} | {t['value']:.3f} | {met} |")
        lines.append("")
    return "\n".join(lines)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


#: where results go unless ``--out`` is given (relative to the current directory)
DEFAULT_OUT = Path("runs") / "bench"
_PACKAGE = Path(je.__file__).resolve().parent  # results are never written inside the jaxelbo package


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags."""
    parser.add_argument("--num-samples", type=int, nargs="+", default=None, metavar="K",
                        help="numbers of importance samples K (default 1 8 64 512; --fast: 1 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step B (default 64)")
    parser.add_argument("--repetitions", type=int, default=None,
                        help="timed repetitions per contender, interleaved (default 20; --fast: 3)")
    parser.add_argument("--objective", nargs="+", default=None,
                        help="objectives to time (default: all of je.OBJECTIVES)")
    parser.add_argument("--estimator", nargs="+", default=None,
                        help="estimators to time (default: every one each objective supports); every "
                             "supported objective x estimator pair of the two lists is timed, and an "
                             "objective or estimator that forms no supported pair is refused, as by train")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the hand-batched JAX, PyTorch and TFP references (the output lists what "
                             "was skipped and why)")
    parser.add_argument("--no-steps", action="store_true",
                        help="skip the gradient-step timings (sections log_likelihood and SNR only)")
    parser.add_argument("--no-log-likelihood", action="store_true", help="skip the log_likelihood timing")
    parser.add_argument("--no-snr", action="store_true", help="skip the vmapped-vs-loop SNR sweep")
    parser.add_argument("--no-loop", action="store_true",
                        help="skip the training-loop section (jaxelbo train's loop vs a tight loop)")
    parser.add_argument("--only-loop", action="store_true",
                        help="run the training-loop section alone; writes training-loop-<device>.{json,md}")
    parser.add_argument("--loop-num-samples", type=int, nargs="+", default=None, metavar="K",
                        help="K of the training-loop section (default 1 8 64; --fast: 1 8)")
    parser.add_argument("--ll-num-samples", type=int, default=None,
                        help="K of the log_likelihood benchmark (default 5000; --fast: 500)")
    parser.add_argument("--ll-num-points", type=int, default=None,
                        help="test points of the log_likelihood benchmark (default 1000; --fast: 100)")
    parser.add_argument("--ll-chunk-sizes", type=int, nargs="+", default=None,
                        help="chunk sizes compared by the log_likelihood benchmark (default 50 500)")
    parser.add_argument("--num-replicates", type=int, default=None,
                        help="R of the SNR sweep (default 1000; --fast: 100)")
    parser.add_argument("--model", choices=("flax", "plain"), default="flax",
                        help="the VAE under test: jaxelbo.models.vae (flax NNX, default) or the same "
                             "network as plain per-example JAX functions")
    parser.add_argument("--fast", action="store_true", help="smoke run: small sizes, few repetitions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default=None,
                        help="directory for throughput-<device>.{json,md} (default runs/bench under the "
                             "current directory; pass --out benchmarks/results to refresh the committed results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_dir(out: str | Path | None) -> Path:
    """The directory results are written to: ``out``, or ``runs/bench`` under the current directory.

    Raises:
      ValueError: ``out`` lies inside the installed jaxelbo package.
    """
    path = Path(out) if out else Path.cwd() / DEFAULT_OUT
    resolved = path.resolve()
    if resolved == _PACKAGE or _PACKAGE in resolved.parents:
        raise ValueError(f"--out {path} is inside the jaxelbo package ({_PACKAGE}); write results elsewhere "
                         f"(default: {DEFAULT_OUT} under the current directory)")
    return path


def config_from_args(args: argparse.Namespace) -> dict:
    base = FAST if args.fast else DEFAULTS
    cfg = {key: (getattr(args, key) if getattr(args, key, None) is not None else value)
           for key, value in base.items()}
    for key in ("batch_size", "repetitions", "ll_num_samples", "ll_num_points", "num_replicates"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    for key in ("num_samples", "ll_chunk_sizes", "loop_num_samples"):
        if any(v < 1 for v in cfg[key]):
            raise ValueError(f"--{key.replace('_', '-')} values must be >= 1, got {cfg[key]}")
    cfg.update(seed=args.seed, fast=bool(args.fast), model=args.model, objective=args.objective,
               estimator=args.estimator, references=not args.no_references)
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed ``args`` (see ``jaxelbo.app.commands.bench``); returns 0."""
    try:
        cfg = config_from_args(args)
        selected_pairs(cfg["objective"], cfg["estimator"])
        out_dir = output_dir(args.out)  # runs/bench under the current directory by default
    except ValueError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    show = not args.no_progress

    def log(msg: str) -> None:
        if show:
            print(msg, file=sys.stderr, flush=True)

    def progress_factory(total: int, desc: str):
        if not show:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="round", file=sys.stderr, leave=False)

    t0 = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(), "config": {k: v for k, v in cfg.items()},
              "load_average_start": load_start}
    result["config"]["data"] = "random binary (i.i.d. Bernoulli(1/2) pixels), 784 dims"
    only_loop = bool(getattr(args, "only_loop", False))
    skipped: dict[str, str] = {}
    result["gradient_steps"], result["comparisons"] = (
        ([], []) if args.no_steps or only_loop else bench_gradient_steps(cfg, log, progress_factory, skipped))
    result["skipped_references"] = [{"reference": name, "why": why} for name, why in skipped.items()]
    for name, why in skipped.items():  # always said, progress bar or not
        print(f"bench: skipped the {name} reference: {why}", file=sys.stderr)
    result["log_likelihood"] = (None if args.no_log_likelihood or only_loop
                                else bench_log_likelihood(cfg, log))
    result["snr_sweep"] = None if args.no_snr or only_loop else bench_snr_sweep(cfg, log)
    result["training_loop"] = (None if getattr(args, "no_loop", False) and not only_loop
                               else training_loop.bench_training_loop(cfg, log, interleaved_times))
    result["targets"] = (evaluate_targets(result["gradient_steps"], result["comparisons"], result["snr_sweep"])
                         + training_loop.targets(result["training_loop"]))
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    result["wall_seconds"] = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{'training-loop' if only_loop else 'throughput'}-{device_tag()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    stem.with_suffix(".md").write_text(markdown + "\n")
    if show:
        print(markdown)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
