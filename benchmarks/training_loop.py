"""The training-loop section of the throughput benchmark: ``jaxelbo train``'s loop vs a tight loop.

``jaxelbo train`` runs :func:`jaxelbo.app.training.train`: the training set lives on the
device, and each chunk of steps (to the next log step) is one compiled ``fori_loop``
that draws its batches and binarisations with ``jax.random``. Its reference is the best
a Python loop can do with the *same* compiled step: ``make_train_step``'s jitted step
called back to back on batches already on the device (the same batches and keys, so
both reach the same parameters; checked). The ratio of their steps per second is the
loop's efficiency: 1.0 means the loop adds nothing to the step.

Setting: ``jaxelbo train``'s defaults (digits, 64-200-200-50 VAE, IWAE-DReG, dynamic
binarisation, Adam, a record every 50 steps) at batch ``B`` and each ``K``. Both are
timed alternately in a shuffled order, repeated; wall and process CPU time; medians of
the per-round ratios. Written by ``benchmarks/throughput.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

TARGET = 0.95  # jaxelbo train's steps/s >= TARGET x the tight loop's
MIN_STEPS = 200  # per timed call: four records of 50 steps, so that the loop's overlap of host and device counts
MAX_STEPS = 2000  # per timed call (the tight loop's batches are all placed on the device first)


def bench_training_loop(cfg: dict, log: Callable[[str], None], interleaved_times: Callable) -> dict:
    """Times ``training.train`` against a tight loop of its compiled step at every ``cfg["loop_num_samples"]``.

    Args:
      cfg: ``batch_size``, ``loop_num_samples``, ``loop_seconds`` (target wall time of one
        timed call, which sets the number of steps, at least 200), ``loop_repetitions``
        (interleaved rounds), ``seed``.
      log: progress messages.
      interleaved_times: the benchmark's timer (``throughput.interleaved_times``).

    Returns:
      ``{"setting", "rows": [...]}``; a row per K with steps, steps/s of both, the paired
      wall and CPU-time ratios, the loop's own ``steps_per_second`` records and the
      largest relative difference of the two runs' final parameters.
    """
    from jaxelbo import registry
    from jaxelbo.app import data, training
    from jaxelbo.models import vae

    batch_size, seed = cfg["batch_size"], cfg["seed"]
    ds = data.load("digits")
    net = vae.build(jax.random.key(seed), ds.data_dim, output_bias=vae.data_mean_logits(ds.train))
    optimizer = training.make_optimizer(1e-3)
    params, opt_state = net.params, optimizer.init(net.params)
    batches = data.BatchIterator(ds.train, batch_size, seed, "dynamic")
    rows = []
    for k in cfg["loop_num_samples"]:
        loss_fn = registry.make("iwae", net.model, net.guide, estimator="dreg", num_samples=k)
        row = {"num_samples": k, **time_loop(training.make_train_step(loss_fn, optimizer), params, opt_state,
                                             batches, cfg, interleaved_times)}
        rows.append(row)
        log(f"training loop K={k}: {row['loop_steps_per_s']:.0f} steps/s vs tight loop "
            f"{row['tight_steps_per_s']:.0f} steps/s: {row['ratio']:.3f}x (CPU time {row['cpu_ratio']:.3f}x)")
    setting = (f"digits ({len(ds.train)} training images, 64 pixels), VAE 64-200-200-50, IWAE-DReG, "
               f"dynamic binarisation, Adam, batch B = {batch_size}, a record every 50 steps")
    return {"setting": setting, "target": TARGET, "rows": rows}


def time_loop(step: Callable, params: dict, opt_state, batches, cfg: dict, interleaved_times: Callable) -> dict:
    """One K: ``training.train`` vs the tight loop of ``step`` over the same batches and keys."""
    from jaxelbo.app import training

    seed = cfg["seed"]

    def tight(n, xs, keys):
        p, o = params, opt_state
        for s in range(n):
            p, o, _ = step(p, o, keys[s], xs[s])
        return jax.block_until_ready(p)

    def loop(n):
        return training.train(step, params, opt_state, batches, num_steps=n, seed=seed, log_every=50,
                              progress=False)

    def inputs(n):
        xs = [jnp.asarray(batches.batch(s)) for s in range(n)]
        return jax.block_until_ready(xs), [training.step_key(seed, s) for s in range(n)]

    xs, keys = inputs(50)  # warm both, then size the timed calls from the tight loop's speed
    tight(50, xs, keys)
    loop(50)
    per_step = []
    for _ in range(3):  # the fastest of three: load bursts of a shared machine only slow a call down
        t0 = time.perf_counter()
        tight(50, xs, keys)
        per_step.append((time.perf_counter() - t0) / 50)
    n = int(np.clip(cfg["loop_seconds"] / min(per_step), MIN_STEPS, MAX_STEPS)) // 50 * 50
    xs, keys = inputs(n)
    last = {}

    def timed_tight():
        last["tight"] = tight(n, xs, keys)

    def timed_loop():
        last["loop"] = loop(n)

    cpu: dict = {}
    times = interleaved_times({"tight": timed_tight, "loop": timed_loop}, repetitions=cfg["loop_repetitions"],
                              warmup=1, seed=seed, cpu_times=cpu)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-30))
               for a, b in zip(jax.tree.leaves(last["loop"].params), jax.tree.leaves(last["tight"]), strict=True))
    records = [r["steps_per_second"] for r in last["loop"].history[1:]]
    return {"steps": n,
            "tight_steps_per_s": n / float(np.median(times["tight"])),
            "loop_steps_per_s": n / float(np.median(times["loop"])),
            "ratio": float(np.median(times["tight"] / times["loop"])),
            "cpu_ratio": float(np.median(cpu["tight"] / cpu["loop"])),
            "loop_record_steps_per_s": float(np.median(records)) if records else None,
            "params_max_rel_diff": diff}


def targets(section: dict | None) -> list[dict]:
    """``loop >= TARGET x tight loop`` at every K (the target rows of the benchmark)."""
    if not section:
        return []
    return [{"target": f"jaxelbo train loop >= {TARGET}x a tight loop of its compiled step (steps/s)",
             "num_samples": r["num_samples"], "value": r["ratio"], "met": bool(r["ratio"] >= TARGET)}
            for r in section["rows"]]


def to_markdown(section: dict | None, device: str) -> list[str]:
    """The section's markdown lines (empty if it did not run)."""
    if not section:
        return []
    lines = ["## Training loop: `jaxelbo train` vs a tight loop of the same compiled step", "",
             f"On {device}. {section['setting']}. Tight loop: `make_train_step`'s jitted step called back to "
             "back on the same batches, already on the device; loop: `training.train` (device-resident data, "
             "one compiled `fori_loop` per chunk). Ratio = loop steps/s over tight-loop steps/s (median of "
             "paired rounds).", "",
             "| K | steps | tight loop steps/s | loop steps/s | ratio (wall) | ratio (CPU time) | "
             "loop's logged steps/s | params max rel diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in section["rows"]:
        logged = "" if r["loop_record_steps_per_s"] is None else f"{r['loop_record_steps_per_s']:.0f}"
        lines.append(f"| {r['num_samples']} | {r['steps']} | {r['tight_steps_per_s']:.0f} | "
                     f"{r['loop_steps_per_s']:.0f} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} | {logged} | "
                     f"{r['params_max_rel_diff']:.1e} |")
    lines.append("")
    return lines
