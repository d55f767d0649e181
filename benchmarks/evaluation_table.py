"""Evaluate trained Fashion-MNIST VAEs three ways: IWAE-5000, AIS and BDMC, plus the amortisation gap.

Trains (or reuses) one ``jaxelbo train`` run per (method, stochastic layers), then evaluates
each with ``jaxelbo evaluate --method all``: log p(x) by IWAE with K = 5000 and by annealed
importance sampling (``je.ais_log_likelihood``), their paired difference, the k-hat fraction,
the amortisation gap (``je.amortisation_gap``) and the BDMC gap on points simulated from the
model (``je.bdmc``), with seconds per 1000 points. Writes
``benchmarks/results/evaluation_<dataset>.{md,json}``.

    python benchmarks/evaluation_table.py --runs-dir runs/evaltable --steps 400 \\
        --eval-num-points 20 --ais-steps 200 --ais-chains 4 --bdmc 8   # the committed, small table

References:
  Wu, Burda, Salakhutdinov & Grosse (2017), arXiv:1611.04273 (AIS and BDMC for decoders).
  Cremer, Li & Duvenaud (2018), arXiv:1801.03558 (the amortisation gap).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = [("VAE (ELBO)", "elbo", "reparam"), ("IWAE", "iwae", "reparam")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--runs-dir", default="runs/evaltable", help="where the training runs live (reused if done)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--stochastic-layers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--eval-num-points", type=int, default=20)
    p.add_argument("--eval-num-samples", type=int, default=5000)
    p.add_argument("--ais-steps", type=int, default=200)
    p.add_argument("--ais-chains", type=int, default=4)
    p.add_argument("--bdmc", type=int, default=8)
    p.add_argument("--amortisation-steps", type=int, default=100)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def train(args, objective: str, estimator: str, layers: int) -> Path:
    from jaxelbo.app.cli import main

    run = Path(args.runs_dir) / f"{objective}_{estimator}_{layers}"
    if not (run / "summary.json").is_file():
        code = main(["train", "--dataset", args.dataset, "--stochastic-layers", str(layers), "--objective", objective,
                     "--estimator", estimator, "--num-samples", "64", "--steps", str(args.steps), "--batch-size",
                     str(args.batch_size), "--eval-num-points", "20", "--eval-num-samples", "100", "--no-progress",
                     "--out", str(run), "--overwrite"])
        if code:
            raise SystemExit(f"training {run} failed ({code})")
    return run


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# Evaluation: {s['dataset']}, IWAE-{s['eval_num_samples']} vs AIS vs BDMC",
        "",
        f"Models: the Burda et al. VAEs of the training table (1 and 2 stochastic layers), trained here for only "
        f"{s['steps']} steps of batch {s['batch_size']} with K = 64 (the README's table used 1500; this machine, "
        f"2 CPU cores shared by 8 jobs, allowed no more), so they are far from converged. Evaluation on the first "
        f"{s['eval_num_points']} test images (binarised once): IWAE with K = {s['eval_num_samples']}; AIS with "
        f"{s['ais_steps']} sigmoidal temperatures, {s['ais_chains']} chains, HMC with 5 leapfrog steps and the step "
        f"size tuned towards 0.65 acceptance by a pilot run; BDMC on {s['bdmc']} points simulated from each model "
        f"with the same settings; amortisation gap with {s['amortisation_steps']} Adam steps per point "
        f"(learning rate 0.01, 16 samples). Device: {result['device']['cpu']} "
        f"({result['device']['cpu_count']} cores, platform {result['device']['platform']}); "
        f"jax {result['versions'].get('jax')}, "
        f"blackjax {result['versions'].get('blackjax')}; {result['date']}. Seconds include compilation.",
        "",
        "| method | layers | IWAE-5000 | AIS | AIS - IWAE (paired) | k-hat > 0.7 | BDMC gap (simulated) "
        "| amortisation gap | approximation gap | IWAE s/1000 pts | AIS s/1000 pts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        t = r["test"]
        lines.append(
            f"| {r['method']} | {r['layers']} | {t['log_likelihood']:.2f} +- {t['log_likelihood_stderr']:.2f} "
            f"| {t['ais_log_likelihood']:.2f} +- {t['ais_log_likelihood_stderr']:.2f} "
            f"| {t['ais_minus_iwae']:+.2f} +- {t['ais_minus_iwae_stderr']:.2f} "
            f"| {t.get('khat_above_0.7', float('nan')):.2f} "
            f"| {t['bdmc_gap']:.2f} +- {t['bdmc_gap_stderr']:.2f} | {t['amortisation_gap']:.2f} "
            f"| {t['approximation_gap']:.2f} | {t['log_likelihood_seconds_per_1000_points']:.0f} "
            f"| {t['ais_seconds_per_1000_points']:.0f} |")
    lines += ["", "Orderings by IWAE-5000 and by AIS (paired differences over the same test points, +- their "
              "standard error):", ""]
    lines += [f"- {o}" for o in result["orderings"]]
    return "\n".join(lines) + "\n"


def orderings(rows: list[dict]) -> list[str]:
    import numpy as np

    out = []
    pairs = [(("IWAE", 1), ("VAE (ELBO)", 1)), (("IWAE", 2), ("VAE (ELBO)", 2)),
             (("VAE (ELBO)", 2), ("VAE (ELBO)", 1)), (("IWAE", 2), ("IWAE", 1))]
    by = {(r["method"], r["layers"]): r for r in rows}
    for a, b in pairs:
        if a not in by or b not in by:
            continue
        parts = []
        for key, label in (("iwae_per_point", "IWAE-5000"), ("ais_per_point", "AIS")):
            d = np.asarray(by[a][key]) - np.asarray(by[b][key])
            se = d.std(ddof=1) / np.sqrt(len(d))
            parts.append(f"{label} {d.mean():+.2f} +- {se:.2f}")
        out.append(f"{a[0]} ({a[1]} layer{'s' if a[1] > 1 else ''}) - {b[0]} ({b[1]} layer{'s' if b[1] > 1 else ''}): "
                   + ", ".join(parts))
    return out


def main(argv=None) -> int:
    import jax
    import numpy as np

    import jaxelbo as je
    from jaxelbo.app import experiment

    args = parse_args(argv)
    t_start = time.perf_counter()
    rows = []
    for layers in args.stochastic_layers:
        for label, objective, estimator in METHODS:
            run = train(args, objective, estimator, layers)
            rec = experiment.evaluate_run(run, num_samples=args.eval_num_samples, num_points=args.eval_num_points,
                                          surgery=False, progress=not args.no_progress, method="all",
                                          ais_steps=args.ais_steps, ais_chains=args.ais_chains,
                                          bdmc_points=args.bdmc, amortisation_steps=args.amortisation_steps,
                                          keep_per_point=True)
            test = rec["test"]
            rows.append({"method": label, "layers": layers, "objective": objective, "estimator": estimator,
                         "run_dir": str(run), "test": {k: v for k, v in test.items() if not k.endswith("_per_point")},
                         "iwae_per_point": test["log_likelihood_per_point"],
                         "ais_per_point": test["ais_per_point"]})
            print(f"{label} ({layers}): " + ", ".join(f"{k} {v:.3f}" for k, v in test.items()
                                                      if isinstance(v, float)), flush=True)
    env = experiment.environment()
    try:
        import blackjax
        env.setdefault("versions", {})["blackjax"] = blackjax.__version__
    except ImportError:  # pragma: no cover
        pass
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "no_progress")},
              "rows": rows, "orderings": orderings(rows), "wall_seconds": time.perf_counter() - t_start,
              "jaxelbo": je.__version__, "jax_devices": str(jax.devices()), **env}
    result["settings"]["eval_num_points"] = args.eval_num_points
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"evaluation_{args.dataset}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    del np
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
