"""Runs per hour: R training runs as one compiled program (``train_many``) vs the same R runs in turn.

Setting: digits (64 pixels), VAE 64-200-200-50, Adam, dynamic binarisation, batch 64,
K samples; the runs are seeds x (IWAE-DReG, IWAE), one step function per pair. Both ways
are timed alternately (shuffled order, repeated, after a compiling warm-up); medians of
per-round ratios. Parameters of the two ways are compared (max relative difference).

    python benchmarks/train_many.py --out benchmarks/results       # writes train-many-<platform>.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _interleave import interleaved  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)

    from jaxelbo import registry
    from jaxelbo.app import data, train_many, training
    from jaxelbo.app.environment import describe
    from jaxelbo.models import vae

    ds = data.load("digits")
    opt = training.make_optimizer(1e-3)
    net = vae.build(jax.random.key(0), ds.data_dim)
    steps = {e: training.make_train_step(registry.make("iwae", net.model, net.guide, estimator=e,
                                                       num_samples=args.num_samples), opt)
             for e in ("dreg", "reparam")}
    runs = []
    for step_fn in steps.values():
        for seed in range(args.seeds):
            params = vae.build(jax.random.key(seed), ds.data_dim).params
            runs.append(train_many.Run(step_fn, params, opt.init(params),
                                       data.BatchIterator(ds.train, 64, seed, "dynamic"), seed))

    def together():
        return jax.block_until_ready([r.params for r in train_many.train_many(runs, num_steps=args.steps,
                                                                              log_every=args.steps)])

    def in_turn():
        return jax.block_until_ready([training.train(r.step_fn, r.params, r.opt_state, r.batches,
                                                     num_steps=args.steps, seed=r.seed, log_every=args.steps,
                                                     progress=False, write_metrics=False).params for r in runs])

    load_start = [round(v, 2) for v in os.getloadavg()]
    a, b = together(), in_turn()  # compile both
    err = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / max(float(np.max(np.abs(v))), 1e-30))
              for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    times = interleaved({"one program": together, "in turn": in_turn}, args.repetitions)
    t1, t2 = times["one program"], times["in turn"]
    n = len(runs)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": describe(), "device": str(jax.devices()[0].device_kind),
              "setting": {"runs": n, "pairs": ["iwae/dreg", "iwae/reparam"], "seeds": args.seeds,
                          "num_samples": args.num_samples, "steps": args.steps, "batch_size": 64,
                          "dataset": "digits", "repetitions": args.repetitions},
              "one_program_s": float(np.median(t1)), "in_turn_s": float(np.median(t2)),
              "runs_per_hour_one_program": 3600 * n / float(np.median(t1)),
              "runs_per_hour_in_turn": 3600 * n / float(np.median(t2)),
              "speedup": float(np.median(t2 / t1)), "max_rel_param_diff": err,
              "load_average_start": load_start, "load_average_end": [round(v, 2) for v in os.getloadavg()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = jax.devices()[0].platform  # train-many-cpu, train-many-gpu, ...
    (out / f"train-many-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# train_many: {n} runs as one program vs in turn ({result['device']})", "",
          f"Date {result['date']}; load average {load_start} at start, {result['load_average_end']} at end "
          f"({os.cpu_count()} CPU cores; absolute times are noisy, the ratio is paired per round).", "",
          f"Versions: {json.dumps(result['environment'])}", "",
          f"digits, VAE 64-200-200-50, batch 64, K = {args.num_samples}, {args.steps} steps per run, "
          f"runs: {args.seeds} seeds x (iwae/dreg, iwae/reparam); {args.repetitions} interleaved rounds.", "",
          "| way | seconds (median) | runs / hour |", "|---|---:|---:|",
          f"| one program (`train_many`) | {result['one_program_s']:.2f} | {result['runs_per_hour_one_program']:.0f} |",
          f"| in turn (`training.train`) | {result['in_turn_s']:.2f} | {result['runs_per_hour_in_turn']:.0f} |", "",
          f"Speed-up (median of per-round ratios): **{result['speedup']:.2f}x**; parameters of the two ways "
          f"differ by at most {err:.1e} (relative)."]
    (out / f"train-many-{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
