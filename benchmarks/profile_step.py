"""Where the CPU gradient step's time goes: per-fusion CPU time from ``jax.profiler``.

Setting: ``jit(grad(iwae/reparam loss))`` on the flax Burda VAE (784-200-200-50), batch 64
of random binary data, ``--num-samples`` K. After a compiling warm-up, ``--steps`` steps
run under ``jax.profiler.trace``; the trace's per-op events (XLA:CPU thunks: YNN GEMM
fusions, loop fusions, copies) are summed over all threads and divided by the steps, so
each row is CPU milliseconds per step (the process's threads; on a loaded machine these
include time lost to other processes, so shares mean more than absolute numbers). Each
fusion is labelled with its root instruction and shape from the compiled HLO.

    python benchmarks/profile_step.py --out benchmarks/results     # writes profile-step-cpu.{json,md}
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _labels(hlo: str) -> dict[str, str]:
    """``{instruction name: "root op shape"}`` for the entry computation's instructions."""
    entry = hlo[hlo.index("ENTRY"):]
    out = {}
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(.*?(?:calls=%([\w.-]+))?", line)
        if not m:
            continue
        name, shape, op, comp = m.group(1), m.group(2), m.group(3), None
        c = re.search(r"calls=%([\w.-]+)", line)
        if c:
            comp = c.group(1)
        label = f"{op} {shape}"
        if comp and f"%{comp} " in hlo:
            body = hlo[hlo.index(f"%{comp} "):]
            body = body[:body.index("\n}")]
            root = [b for b in body.splitlines() if "ROOT" in b]
            if root:
                r = re.match(r"\s*ROOT %\S+ = (\S+) ([\w-]+)\(", root[0])
                if r:
                    label = f"{op}: {r.group(2)} -> {shape}"
        out[name] = label
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, nargs="+", default=[64])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)

    from jax.profiler import ProfileData

    import jaxelbo as je
    from jaxelbo.app.environment import describe
    from jaxelbo.models import vae

    load_start = [round(v, 2) for v in os.getloadavg()]
    net = vae.build(jax.random.key(0), 784)
    x = jax.random.bernoulli(jax.random.key(1), 0.5, (64, 784)).astype(jnp.float32)
    results = []
    for k in args.num_samples:
        loss = je.iwae(net.model, net.guide, num_samples=k, estimator="reparam")
        step = jax.jit(jax.grad(lambda p_, r, loss=loss: loss(p_, r, x)[0]))
        labels = _labels(step.lower(net.params, jax.random.key(3)).compile().as_text())
        jax.block_until_ready(step(net.params, jax.random.key(3)))
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                for _ in range(args.steps):
                    jax.block_until_ready(step(net.params, jax.random.key(3)))
            data = ProfileData.from_file(str(next(Path(d).rglob("*.xplane.pb"))))
        total: collections.Counter[str] = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if ev.name in labels:
                        total[ev.name] += ev.duration_ns
        all_ms = sum(total.values()) / args.steps / 1e6
        gemm_ms = sum(v for n, v in total.items() if "dot" in labels[n]) / args.steps / 1e6
        rows = [{"op": n, "what": labels[n], "cpu_ms": v / args.steps / 1e6, "share": v / sum(total.values())}
                for n, v in total.most_common(args.top)]
        results.append({"num_samples": k, "cpu_ms_all_ops": all_ms, "cpu_ms_products": gemm_ms, "top": rows})
    env = describe()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": env, "device": str(jax.devices()[0].device_kind), "steps": args.steps,
              "results": results, "load_average_start": load_start,
              "load_average_end": [round(v, 2) for v in os.getloadavg()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile-step-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Per-fusion CPU time of the iwae/reparam step (Burda VAE, B = 64; {result['device']}, "
          f"{env['device'].get('cpu')})", "",
          f"Date {result['date']}; load average {load_start} at start, {result['load_average_end']} at end. "
          f"`jax.profiler` over {args.steps} steps; CPU ms per step summed over threads.", "",
          f"Versions: {json.dumps(env['versions'])}", ""]
    for r in results:
        share = 100 * r["cpu_ms_products"] / r["cpu_ms_all_ops"]
        md += [f"## K = {r['num_samples']}: {r['cpu_ms_all_ops']:.1f} CPU ms per step in ops, "
               f"{r['cpu_ms_products']:.1f} in the matrix products ({share:.0f}%)",
               "", "| op | what (root of the fusion -> shape) | CPU ms / step | share |", "|---|---|---:|---:|"]
        md += [f"| `{row['op']}` | `{row['what']}` | {row['cpu_ms']:.2f} | {100 * row['share']:.1f}% |"
               for row in r["top"]]
        md.append("")
    (out / "profile-step-cpu.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
