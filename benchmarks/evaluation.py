"""Evaluation speed: ``je.log_likelihood`` of the Burda VAE at K = 5000 against the GEMM rate.

Setting: the project's flax VAE (784-200-200-50, Bernoulli decoder), random binary
points (i.i.d. Bernoulli(1/2) pixels), K = 5000 samples per point, the points passed
in calls of ``--batch-size`` points (``jaxelbo evaluate`` passes 100). Contenders, each
one pass over the same ``--num-points`` points, timed in a shuffled order every round
(after a compiling warm-up), medians of per-round ratios:

* ``before``: the code as it was before the chunk chooser: ``chunk_size=500`` samples
  with every point of the call in one chunk (50,000 rows per step at 100 points),
  ``jax.nn.softplus`` and the logits materialised;
* ``logits``: the previous default, the machine-chosen chunking (chosen for this
  graph) with ``vae.softplus`` on materialised logits ``h W + b`` (the decoder's output
  layer with its transposed-kernel read, then ``vae.bernoulli_log_prob``);
* ``auto``: today's default (``chunk_size="auto"``; the output layer and the Bernoulli
  log-likelihood in one, ``vae.bernoulli_dense_log_prob``: no logits materialised, no
  kernel transpose per chunk, the bias added inside the softplus reduction);
* ``GEMM``: the decoder's three matrix products alone, ``(M, 50) x (50, 200) x (200, 200)
  x (200, 784)`` chained, at ``M`` = the auto chunk's rows, 1024 and 4096, called (async)
  over as many rows as one evaluation pass; the fastest is the reference rate.

GFLOP/s count the matrix products an evaluation needs: per sample the decoder's
``2 (50*200 + 200*200 + 200*784)`` and per point the encoder's once. The estimates of
``before`` and ``auto`` are compared (the draws do not depend on the chunking).

    python benchmarks/evaluation.py --out benchmarks/results   # writes evaluation-speed-<device>.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _interleave import interleaved  # noqa: E402

DX, H, DZ = 784, 200, 50
DEC_FLOPS = 2 * (DZ * H + H * H + H * DX)
ENC_FLOPS = 2 * (DX * H + H * H + H * 2 * DZ)


def _old_bernoulli_log_prob(x, logits):
    """The Bernoulli log-likelihood as it was before ``vae.softplus`` (``jax.nn.softplus``)."""
    return jnp.einsum("...d,...d->...", x, logits) - jnp.sum(jax.nn.softplus(logits), axis=-1)


def gemm_pass(rows: int, total_rows: int):
    """``(run, rows_done)``: ``run()`` does the decoder's three products on ``rows`` rows,
    ``total_rows / rows`` times (dispatched asynchronously, one block at the end)."""
    keys = jax.random.split(jax.random.key(7), 4)
    z = jax.random.normal(keys[0], (rows, DZ))
    w = [jax.random.normal(k, s) / np.sqrt(s[0]) for k, s in zip(keys[1:], [(DZ, H), (H, H), (H, DX)], strict=True)]
    reps = max(total_rows // rows, 1)
    chain = jax.jit(lambda z, w1, w2, w3: jnp.dot(jnp.dot(jnp.dot(z, w1), w2), w3)[0, 0])
    jax.block_until_ready(chain(z, *w))
    return (lambda: jax.block_until_ready([chain(z, *w) for _ in range(reps)])), reps * rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-points", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=100, help="points per call (jaxelbo evaluate: 100)")
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)

    import jaxelbo as je
    from jaxelbo import _chunking
    from jaxelbo.app.environment import describe
    from jaxelbo.diagnostics import log_likelihood_chunks
    from jaxelbo.models import vae

    load_start = [round(v, 2) for v in os.getloadavg()]
    n, k, b = args.num_points, args.num_samples, min(args.batch_size, args.num_points)
    net = vae.build(jax.random.key(0), DX)
    model, guide, params = net.model, net.guide, net.params
    x_all = jax.random.bernoulli(jax.random.key(1), 0.5, (n, DX)).astype(jnp.float32)
    batches = [x_all[i:i + b] for i in range(0, n, b)]

    def patched(dense):
        """Trace with ``dense`` as the VAE's fused output layer + log-likelihood (None: today's)."""
        saved = vae.bernoulli_dense_log_prob
        if dense is not None:
            vae.bernoulli_dense_log_prob = dense
        _chunking._BYTES_PER_ROW.clear()  # the chunk is chosen for the graph traced
        return saved

    def chunks(dense):
        saved = patched(dense)
        try:
            return log_likelihood_chunks(model, guide, params, jax.random.key(0), batches[0], num_samples=k)
        finally:
            vae.bernoulli_dense_log_prob = saved

    def logits_form(x, h, kernel, bias):
        return vae.bernoulli_log_prob(x, vae._dense_transposed(h, kernel, bias))

    def before_form(x, h, kernel, bias):
        return _old_bernoulli_log_prob(x, vae._dense_transposed(h, kernel, bias))

    old_points, old_samples = chunks(logits_form)
    points, samples = chunks(None)
    rows = points * samples
    per_row = next(iter(v for key, v in _chunking._BYTES_PER_ROW.items() if key[0][0] == "log_likelihood"))

    def ll_pass(chunk_size, points_per_chunk=None, dense=None):
        """One pass over the points, traced with ``dense`` as the VAE's output layer + log-likelihood."""
        fn = jax.jit(lambda p_, r, xb: je.log_likelihood(model, guide, p_, r, xb, num_samples=k,
                                                         chunk_size=chunk_size, points_per_chunk=points_per_chunk))
        saved = patched(dense)
        try:
            jax.block_until_ready(fn(params, jax.random.key(0), batches[0]))
        finally:
            vae.bernoulli_dense_log_prob = saved

        def run():
            return np.concatenate([np.asarray(fn(params, jax.random.fold_in(jax.random.key(2), i), xb))
                                   for i, xb in enumerate(batches)])
        return run

    contenders = ("before", "logits", "auto")
    fns = {"before": ll_pass(500, None, before_form),
           "logits": ll_pass(old_samples, old_points, logits_form),
           "auto": ll_pass("auto")}
    gemm_rows = {}
    for m in sorted({rows, 1024, 4096}):
        fns[f"GEMM M={m}"], gemm_rows[f"GEMM M={m}"] = gemm_pass(m, n * k)
    values = {name: fns[name]() for name in contenders}
    t = interleaved(fns, args.repetitions)
    ll_flops = n * k * DEC_FLOPS + n * ENC_FLOPS
    gemm = {name: gemm_rows[name] * DEC_FLOPS / t[name] / 1e9 for name in gemm_rows}  # per round
    best_gemm = max(gemm, key=lambda name: float(np.median(gemm[name])))
    rowsd = []
    for name in contenders:
        rate = ll_flops / t[name] / 1e9
        rowsd.append({"name": name, "seconds": float(np.median(t[name])), "points_per_s": float(np.median(n / t[name])),
                      "gflop_per_s": float(np.median(rate)),
                      "fraction_of_gemm": float(np.median(rate / gemm[best_gemm])),
                      "time_vs_before": float(np.median(t[name] / t["before"])),
                      "time_vs_logits": float(np.median(t[name] / t["logits"])),
                      "max_abs_diff_vs_before": float(np.max(np.abs(values[name] - values["before"])))})
    for name in gemm_rows:
        rowsd.append({"name": name, "seconds": float(np.median(t[name])), "gflop_per_s": float(np.median(gemm[name]))})
    env = describe()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": env, "device": str(jax.devices()[0].device_kind),
              "setting": {"num_points": n, "num_samples": k, "points_per_call": b, "repetitions": args.repetitions,
                          "model": "flax VAE 784-200-200-50", "data": "random binary"},
              "auto_chunk": {"points": points, "samples": samples, "rows": rows, "temp_bytes_per_row": per_row,
                             "budget_bytes": _chunking.cache_bytes(), "cpu_min_rows": _chunking._CPU_MIN_ROWS},
              "logits_chunk": {"points": old_points, "samples": old_samples},
              "gemm_reference": best_gemm, "rows": rowsd,
              "load_average_start": load_start, "load_average_end": [round(v, 2) for v in os.getloadavg()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if jax.devices()[0].platform == "cpu" else jax.devices()[0].platform
    (out / f"evaluation-speed-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Evaluation speed: je.log_likelihood at K = {k} ({result['device']}, {env['device'].get('cpu')})", "",
          f"Date {result['date']}; load average {load_start} at start, {result['load_average_end']} at end "
          "(a shared 2-core machine: absolute times are noisy; ratios are paired per round).", "",
          f"Versions: {json.dumps(env['versions'])}", "",
          f"{n} random binary points in calls of {b}, {args.repetitions} interleaved rounds. The auto chunk: "
          f"{points} point(s) x {samples} samples = {rows} rows per step ({per_row / 1024:.1f} KiB of XLA temporaries "
          f"per row against a {result['auto_chunk']['budget_bytes'] / 2**20:.0f} MiB cache budget, and at least "
          f"{_chunking._CPU_MIN_ROWS} rows on CPU); the logits form's "
          f"auto chunk: {old_points} x {old_samples}. GFLOP/s count the decoder's products per sample and the "
          "encoder's once per point; the GEMM reference is the fastest row below, timed in the same rounds.", "",
          "| contender | seconds | points / s | GFLOP/s | of the GEMM rate | time vs before | time vs logits | "
          "max abs diff vs before |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rowsd:
        if row["name"].startswith("GEMM"):
            md.append(f"| {row['name']} (decoder products alone) | {row['seconds']:.2f} | | {row['gflop_per_s']:.1f} | "
                      f"{'reference' if row['name'] == best_gemm else ''} | | | |")
        else:
            md.append(f"| {row['name']} | {row['seconds']:.2f} | {row['points_per_s']:.2f} | "
                      f"{row['gflop_per_s']:.1f} | "
                      f"{100 * row['fraction_of_gemm']:.0f}% | {row['time_vs_before']:.2f} | "
                      f"{row['time_vs_logits']:.2f} | "
                      f"{row['max_abs_diff_vs_before']:.1e} |")
    (out / f"evaluation-speed-{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
