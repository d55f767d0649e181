"""XLA:CPU flags against the default, one worker process per setting, steps interleaved.

Each setting (``XLA_FLAGS`` value) gets a worker process that compiles the iwae/reparam
step of the flax Burda VAE (B = 64, random binary data) and the GEMM floor
(``references.burda.gemm_floor``) at each K, then times one call per command read from
stdin. The coordinator sends every (setting, step|floor, K) once per round in a shuffled
order, so only one worker runs at a time. Identical-flag control workers (``default#2``,
``default#3``) show the spread between processes, which a flag must beat to count.
Gradients are compared with the default worker's (max relative difference).

    python benchmarks/xla_flags.py --rounds 10       # prints the table
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {"default": "", "default#2": "", "default#3": "",
            "--xla_cpu_use_xnnpack=false": "--xla_cpu_use_xnnpack=false",
            "--xla_cpu_experimental_ynn_fusion_type=": "--xla_cpu_experimental_ynn_fusion_type=",
            "--xla_cpu_prefer_vector_width=512": "--xla_cpu_prefer_vector_width=512"}


def worker(ks: list[int], out: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(HERE))
    from references import burda

    import jaxelbo as je
    from jaxelbo.models import vae

    net = vae.build(jax.random.key(0), 784)
    x = jax.random.bernoulli(jax.random.key(1), 0.5, (64, 784)).astype(jnp.float32)
    fns = {}
    for k in ks:
        loss = je.iwae(net.model, net.guide, num_samples=k, estimator="reparam")
        step = jax.jit(jax.grad(lambda p, r, loss=loss: loss(p, r, x)[0]))
        grad = jax.block_until_ready(step(net.params, jax.random.key(3)))
        floor, inputs = jax.jit(burda.gemm_floor), burda.gemm_floor_inputs(jax.random.key(5), 64, k)
        jax.block_until_ready(floor(inputs))
        fns[("step", k)] = lambda step=step: jax.block_until_ready(step(net.params, jax.random.key(3)))
        fns[("floor", k)] = lambda floor=floor, inputs=inputs: jax.block_until_ready(floor(inputs))
        np.save(f"{out}-{k}.npy", np.concatenate([np.ravel(a) for a in jax.tree.leaves(grad)]))
    print("ready", flush=True)
    for line in sys.stdin:
        what, k = line.split()
        t0 = time.perf_counter()
        fns[(what, int(k))]()
        print(time.perf_counter() - t0, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, nargs="+", default=[8, 64])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.num_samples, args.worker)
        return 0
    import numpy as np

    ks = args.num_samples
    print(f"load average at start {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        procs = {}
        for i, (name, flags) in enumerate(SETTINGS.items()):
            env = dict(os.environ, XLA_FLAGS=flags)
            procs[name] = subprocess.Popen([sys.executable, __file__, "--worker", f"{d}/w{i}", "--num-samples",
                                            *map(str, ks)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           text=True, env=env)
        for proc in procs.values():
            assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        times: dict = {(n, w, k): [] for n in SETTINGS for w in ("step", "floor") for k in ks}
        for r in range(args.rounds):
            items = list(times)
            random.Random(r).shuffle(items)
            for name, what, k in items:
                proc = procs[name]
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(f"{what} {k}\n")
                proc.stdin.flush()
                times[(name, what, k)].append(float(proc.stdout.readline()))
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()
        print(f"load average at end {os.getloadavg()}")
        print("| K | XLA_FLAGS | step ms | step vs default | step / GEMM floor | grad max rel. diff |")
        print("|---:|---|---:|---:|---:|---:|")
        for k in ks:
            base = np.asarray(times[("default", "step", k)])
            g0 = np.load(f"{d}/w0-{k}.npy")
            for i, name in enumerate(SETTINGS):
                s, f = np.asarray(times[(name, "step", k)]), np.asarray(times[(name, "floor", k)])
                g = np.load(f"{d}/w{i}-{k}.npy")
                print(f"| {k} | `{name}` | {1e3 * np.median(s):.1f} | {np.median(s / base):.3f} | "
                      f"{np.median(s / f):.2f} | {np.max(np.abs(g - g0)) / np.max(np.abs(g0)):.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
