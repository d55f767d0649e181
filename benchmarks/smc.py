"""Speed of ``je.smc_bound`` against a hand-written ``lax.scan`` bootstrap filter, same run.

Problem: the linear-Gaussian state-space model of ``jaxelbo.models.linear_gaussian_ssm``
(``dim_z = 2``, ``dim_x = 1``), a batch of ``B`` simulated sequences, the bootstrap proposal
with its own parameters ``phi`` (so both ``theta`` and ``phi`` get gradients), multinomial
resampling at every step. Grid: ``T`` in {10, 100, 1000} x ``K`` in {4, 16, 64}.

Contenders, each ``jit``-compiled:

- ``reference``: a bootstrap filter written by hand for this model: one ``lax.scan`` over time,
  the particles as a ``(K, dim_z)`` array (no per-particle ``vmap`` of user functions). It
  draws the same random numbers as ``je.smc_bound`` (the same key splits), so its value and
  gradient equal jaxelbo's on the same key; ``tests/test_bench_smc.py`` checks that, and this
  script checks it again for every (T, K) before timing.
- ``jaxelbo reparam`` and ``jaxelbo score-resampling``: ``je.smc_bound`` with the model and
  proposal of ``linear_gaussian_ssm``.

Timed: one call of ``jit(value_and_grad(loss))`` (with ``--value``, also of ``jit(loss)``), the
contenders interleaved within each repetition; medians over repetitions; ratios are medians
of the per-repetition ratios to the reference, so load drift on a shared machine cancels.

Sizing: ``--repetitions 15`` and ``B = 4``: the timed calls take well under a minute on an idle
2-core CPU; the 27 compilations dominate (a few seconds each when idle, so a few minutes in all).
The committed run (``benchmarks/results/smc-cpu.md``) took 40 minutes at a load average of 13-23
on the shared 2 cores: read its ratios (medians of paired, interleaved ratios), not its
absolute times.

Run: ``python benchmarks/smc.py`` (writes ``benchmarks/results/smc-<platform>.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxelbo as je

ssm = je.models.linear_gaussian_ssm
RESULTS = Path(__file__).resolve().parent / "results"
LOG_2PI = math.log(2.0 * math.pi)
DIM_Z, DIM_X = 2, 1


def _logpdf(v, mean, log_var):
    """Diagonal normal log density summed over the last axis (broadcast over particles)."""
    return -0.5 * jnp.sum(LOG_2PI + log_var + (v - mean) ** 2 * jnp.exp(-log_var), axis=-1)


def reference_bound(params, rng, x, num_particles: int):
    """Hand-written bootstrap filter: ``log Z_hat`` ``(B,)`` for the batch ``x`` ``(B, T, dim_x)``.

    Same key splits as ``je.smc_bound``: one key per sequence, split into particle and
    resampling keys, ``fold_in`` of the step for each; one key per particle for its noise.
    """
    theta, phi = params["model"], params["guide"]
    k = num_particles
    log_k = math.log(k)
    dz = theta["m0"].shape[0]

    def noise(rng_q, t):
        keys = jax.random.split(jax.random.fold_in(rng_q, t), k)
        return jax.vmap(lambda key: jax.random.normal(key, (dz,)))(keys)

    def emission(z, xt):
        return _logpdf(xt, z @ theta["C"].T, theta["log_r"])

    def one(key, xs):
        rng_q, rng_r = jax.random.split(key)
        z = phi["m0"] + jnp.exp(0.5 * phi["log_p0"]) * noise(rng_q, 0)
        log_a = (_logpdf(z, theta["m0"], theta["log_p0"]) + emission(z, xs[0])
                 - _logpdf(z, phi["m0"], phi["log_p0"]))
        log_z = jax.nn.logsumexp(log_a) - log_k
        log_w = log_a - jax.nn.logsumexp(log_a)

        def step(carry, inputs):
            z, log_w, log_z = carry
            t, xt = inputs
            anc = jax.random.categorical(jax.random.fold_in(rng_r, t), log_w, shape=(k,))
            z_prev = z[anc]
            mean_q = z_prev @ phi["A"].T
            z = mean_q + jnp.exp(0.5 * phi["log_q"]) * noise(rng_q, t)
            log_a = (_logpdf(z, z_prev @ theta["A"].T, theta["log_q"]) + emission(z, xt)
                     - _logpdf(z, mean_q, phi["log_q"]))
            unnorm = log_a - log_k
            inc = jax.nn.logsumexp(unnorm)
            return (z, unnorm - inc, log_z + inc), None

        ts = jnp.arange(1, xs.shape[0], dtype=jnp.int32)
        (_, _, log_z), _ = jax.lax.scan(step, (z, log_w, log_z), (ts, xs[1:]))
        return log_z

    return jax.vmap(one)(jax.random.split(rng, x.shape[0]), x)


def reference_loss(num_particles: int):
    """``(params, rng, x) -> (loss, aux)`` of the reference, like ``je.smc_bound``'s."""
    def loss(params, rng, x):
        bound = reference_bound(params, rng, x, num_particles)
        return -jnp.mean(bound), {"bound": bound}

    return loss


def contenders(num_particles: int) -> dict:
    model, proposal = ssm.model(), ssm.bootstrap_proposal()
    out = {"reference": reference_loss(num_particles)}
    for est in ("reparam", "score-resampling"):
        out[f"jaxelbo {est}"] = je.smc_bound(model, proposal, num_particles=num_particles,
                                             resampling="multinomial", resample_when="always", estimator=est)
    return out


def problem(num_steps: int, batch: int, seed: int = 0):
    """Parameters (``phi`` a shifted copy of ``theta``) and ``B`` sequences simulated from the model."""
    params = ssm.default_params(dim_z=DIM_Z, dim_x=DIM_X)
    phi = params["guide"]
    params["guide"] = dict(phi, m0=phi["m0"] + 0.3, log_q=phi["log_q"] + 0.2)
    keys = jax.random.split(jax.random.key(seed), batch)
    x = jax.vmap(lambda k: ssm.model().sample(params["model"], k, num_steps)[1])(keys)
    return params, x


def agreement(programs: dict, params, x, rng) -> dict:
    """Largest differences of value and gradient between the reference and jaxelbo reparam, same key."""
    ref = programs["reference/value_and_grad"](params, rng, x)
    ours = programs["jaxelbo reparam/value_and_grad"](params, rng, x)
    bound_err = float(jnp.max(jnp.abs(ref[0][1]["bound"] - ours[0][1]["bound"])))
    g_ref, g_ours = (np.concatenate([np.ravel(v) for v in jax.tree.leaves(g[1])]) for g in (ref, ours))
    grad_rel = float(np.max(np.abs(g_ref - g_ours)) / (np.max(np.abs(g_ref)) + 1e-30))
    return {"bound_max_abs_err": bound_err, "grad_max_rel_err": grad_rel}


def time_config(num_steps: int, num_particles: int, args) -> dict:
    params, x = problem(num_steps, args.batch)
    fns = contenders(num_particles)
    kinds = ("value_and_grad", "value") if args.value else ("value_and_grad",)
    programs, compile_s = {}, {}
    for name, fn in fns.items():
        for kind in kinds:
            if kind == "value" and name == "jaxelbo score-resampling":
                continue  # the same forward value as reparam
            f = jax.jit(jax.value_and_grad(fn, has_aux=True) if kind == "value_and_grad" else fn)
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, jax.random.key(0), x))
            compile_s[f"{name}/{kind}"] = time.perf_counter() - t0
            programs[f"{name}/{kind}"] = f
    check = agreement(programs, params, x, jax.random.key(1))
    times: dict[str, list[float]] = {n: [] for n in programs}
    for r in range(args.repetitions):
        key = jax.random.key(100 + r)
        for name, f in programs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, key, x))
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, ts in times.items():
        contender, kind = name.split("/")
        ref = np.asarray(times[f"reference/{kind}"])
        rows.append({"contender": contender, "kind": kind, "median_ms": 1e3 * float(np.median(ts)),
                     "steps_per_s": 1.0 / float(np.median(ts)),
                     "ratio_to_reference": float(np.median(np.asarray(ts) / ref)),
                     "compile_and_first_call_s": compile_s[name]})
    return {"T": num_steps, "K": num_particles, "check": check, "rows": rows}


def to_markdown(result: dict) -> str:
    env = result["environment"]
    dev = env["device"]
    cfg = result["config"]
    lines = [
        f"# `je.smc_bound` against a hand-written `lax.scan` bootstrap filter ({dev['platform']}, "
        f"{dev.get('cpu')}, {dev.get('cpu_count')} cores)",
        "",
        f"Date {env['date']}, wall {result['wall_seconds']:.0f} s, load average {result['load_start']} at start, "
        f"{result['load_end']} at end.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".  ",
        f"Linear-Gaussian SSM (dim_z = {DIM_Z}, dim_x = {DIM_X}), B = {cfg['batch']} sequences, bootstrap "
        f"proposal with its own phi, multinomial resampling at every step; {cfg['repetitions']} interleaved "
        "repetitions per (T, K); median ms per call; ratios are medians of per-repetition ratios to the "
        "reference (same run).",
        "",
    ]
    grid = result["grid"]
    ks = sorted({g["K"] for g in grid})
    for kind, title in (("value_and_grad", "value and gradient, `jit(value_and_grad(loss))`"),
                        ("value", "value only, `jit(loss)`")):
        names = [r["contender"] for r in grid[0]["rows"] if r["kind"] == kind]
        if not names:
            continue
        lines += [f"## {title}", "", "| T | contender | " + " | ".join(f"K={k} ms" for k in ks) + " | "
                  + " | ".join(f"K={k} ratio" for k in ks) + " |",
                  "|---:|---|" + "---:|" * (2 * len(ks))]
        for t in sorted({g["T"] for g in grid}):
            for name in names:
                cells = [next(r for r in g["rows"] if r["contender"] == name and r["kind"] == kind)
                         for k in ks for g in grid if g["T"] == t and g["K"] == k]
                lines.append(f"| {t} | {name} | " + " | ".join(f"{c['median_ms']:.2f}" for c in cells) + " | "
                             + " | ".join(f"{c['ratio_to_reference']:.2f}" for c in cells) + " |")
        lines.append("")
    worst_b = max(g["check"]["bound_max_abs_err"] for g in grid)
    worst_g = max(g["check"]["grad_max_rel_err"] for g in grid)
    lines += [f"Reference check (same key, before timing): largest |log Z_hat difference| {worst_b:.1e}, "
              f"largest gradient difference relative to the gradient's largest element {worst_g:.1e}, "
              "over the whole grid.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000], help="sequence lengths T")
    parser.add_argument("--particles", type=int, nargs="+", default=[4, 16, 64], help="particle counts K")
    parser.add_argument("--batch", type=int, default=4, help="sequences per call, B")
    parser.add_argument("--repetitions", type=int, default=15)
    parser.add_argument("--value", action="store_true", help="also time the value alone (more compilations)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from jaxelbo.app.environment import describe

    t0 = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    grid = []
    for t in args.steps:
        for k in args.particles:
            grid.append(time_config(t, k, args))
            print(f"T={t} K={k}: " + ", ".join(f"{r['contender']}/{r['kind']} {r['median_ms']:.2f} ms"
                                               for r in grid[-1]["rows"]), flush=True)
    config = {"batch": args.batch, "repetitions": args.repetitions, "value": args.value, "dim_z": DIM_Z, "dim_x": DIM_X}
    result = {"environment": describe(), "config": config,
              "load_start": load_start, "load_end": [round(v, 2) for v in os.getloadavg()],
              "grid": grid, "wall_seconds": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"smc-{result['environment']['device']['platform']}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
