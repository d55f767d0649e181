"""The CPU gradient step before and after ``vae.softplus``, against the GEMM floor and PyTorch.

One process, contenders interleaved in a shuffled order every round (after warm-up):
``jaxelbo iwae/reparam`` on the flax Burda VAE traced with the old Bernoulli
log-likelihood (``jax.nn.softplus``: "before") and with today's (``vae.softplus``:
"after"), the GEMM floor and PyTorch IWAE of ``benchmarks/throughput.py`` (gradient-checked;
``OMP_WAIT_POLICY=PASSIVE``), batch 64 of random binary data, K in {1, 8, 64, 512}.
Reports medians of per-round ratios: step / GEMM floor and PyTorch / jaxelbo (> 1: jaxelbo
is faster), before and after, and the largest relative gradient difference of the two.

    python benchmarks/step_softplus.py --out benchmarks/results   # writes step-softplus-cpu.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import throughput  # noqa: E402
from references import burda  # noqa: E402


def _old_bernoulli_log_prob(x, logits):
    return jnp.einsum("...d,...d->...", x, logits) - jnp.sum(jax.nn.softplus(logits), axis=-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--repetitions", type=int, default=10)
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    from jaxelbo import registry
    from jaxelbo.models import vae

    load_start = [round(v, 2) for v in os.getloadavg()]
    cfg = {"seed": 0, "model": "flax"}
    model, guide, params = throughput.burda_vae(cfg)
    x = burda.random_binary_data(jax.random.key(1), 64)
    rng = jax.random.key(2)
    rows = []
    for k in args.num_samples:
        contenders = throughput.build_contenders(model, guide, params, x, rng, num_samples=k,
                                                 pairs=[("iwae", "reparam")], references=True, log=print)
        steps = {c.name: c.step for c in contenders if c.step is not None
                 and c.name in ("jaxelbo iwae/reparam", "GEMM floor", "PyTorch iwae/reparam")}
        loss = registry.make("iwae", model, guide, estimator="reparam", num_samples=k)
        saved = vae.bernoulli_log_prob
        vae.bernoulli_log_prob = _old_bernoulli_log_prob
        try:  # traced (by the first call) with the old log-likelihood
            old = jax.jit(jax.grad(lambda p_, loss=loss: loss(p_, rng, x)[0]))
            g_old = old(params)
        finally:
            vae.bernoulli_log_prob = saved
        new = jax.jit(jax.grad(lambda p_, loss=loss: loss(p_, rng, x)[0]))
        err = throughput.max_relative_error(new(params), g_old)
        steps["before"] = throughput.jax_step(old, params)
        t = throughput.interleaved_times(steps, repetitions=args.repetitions, seed=k)
        ratio = throughput.paired_ratio
        row = {"num_samples": k, "grad_max_rel_diff": err,
               "ms": {n: 1e3 * float(np.median(v)) for n, v in t.items()},
               "floor_multiple_before": ratio(t["before"], t["GEMM floor"]),
               "floor_multiple_after": ratio(t["jaxelbo iwae/reparam"], t["GEMM floor"]),
               "after_over_before": ratio(t["jaxelbo iwae/reparam"], t["before"])}
        if "PyTorch iwae/reparam" in t:
            row["torch_over_jaxelbo_before"] = ratio(t["PyTorch iwae/reparam"], t["before"])
            row["torch_over_jaxelbo_after"] = ratio(t["PyTorch iwae/reparam"], t["jaxelbo iwae/reparam"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    env = throughput.environment()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": env, "repetitions": args.repetitions, "batch_size": 64, "rows": rows,
              "load_average_start": load_start, "load_average_end": [round(v, 2) for v in os.getloadavg()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step-softplus-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    f = throughput._fmt
    md = ["# CPU step before/after vae.softplus (iwae/reparam, Burda VAE, B = 64)", "",
          f"Device: {throughput.describe_device(env)}; date {result['date']}; load average {load_start} at start, "
          f"{result['load_average_end']} at end; {args.repetitions} interleaved rounds; "
          f"versions {json.dumps(env['versions'])}.", "",
          "| K | step / GEMM floor, before | after | PyTorch / jaxelbo, before | after | after / before | "
          "grad max rel diff |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['num_samples']} | {f(r['floor_multiple_before'])} | {f(r['floor_multiple_after'])} | "
                  f"{f(r.get('torch_over_jaxelbo_before'))} | {f(r.get('torch_over_jaxelbo_after'))} | "
                  f"{f(r['after_over_before'])} | {r['grad_max_rel_diff']:.1e} |")
    (out / "step-softplus-cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
