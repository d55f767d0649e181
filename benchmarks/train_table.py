"""Train the Burda et al. (2016) VAE with eight objective/estimator pairs on one sample budget.

Every method draws 64 samples per example per step (K = 64, or M x K = 8 x 8 for MIWAE
and PIWAE), uses the same architecture, optimiser, batches and number of steps, and is
trained with three seeds. Each run is evaluated on the test set: log-likelihood by IWAE
with K = 5000 (Burda et al. 2016), IWAE-64, ELBO and active units. Writes
``benchmarks/results/train_table.{md,json}``.

    python benchmarks/train_table.py                 # the committed table (digits)
    python benchmarks/train_table.py --steps 200 --seeds 0 --out runs/table   # a smoke run

References:
  Burda, Grosse & Salakhutdinov (2016), arXiv:1509.00519 (VAE/IWAE, active units).
  Roeder, Wu & Duvenaud (2017), arXiv:1703.09194 (STL).
  Tucker, Lawson, Gu & Maddison (2019), arXiv:1810.04152 (DReG, RWS-DReG).
  Rainforth et al. (2018), arXiv:1802.04537 (MIWAE, CIWAE, PIWAE).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, objective, estimator, extra settings)
METHODS = [
    ("VAE (ELBO)", "elbo", "reparam", {}),
    ("IWAE", "iwae", "reparam", {}),
    ("IWAE-STL", "iwae", "stl", {}),
    ("IWAE-DReG", "iwae", "dreg", {}),
    ("RWS-DReG", "rws", "dreg", {}),
    ("MIWAE (8x8)", "miwae", "reparam", {"num_outer": 8}),
    ("CIWAE (beta=0.5)", "ciwae", "reparam", {"beta": 0.5}),
    ("PIWAE (8x8)", "piwae", "reparam", {"num_outer": 8}),
]
COLUMNS = [("log_likelihood", "test log p(x) (K=5000)"), ("iwae_64", "IWAE-64"), ("elbo", "ELBO"),
           ("active_units", "active units")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-num-samples", type=int, default=5000)
    p.add_argument("--methods", nargs="+", default=None, help="labels to run (default all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite train_table.md from the train_table.json in --out, training nothing")
    return p.parse_args(argv)


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def markdown(result: dict) -> str:
    s = result["settings"]
    env = result["environment"]
    lines = [
        f"# Training table: {s['dataset']}, {s['steps']} steps, batch {s['batch_size']}, "
        f"budget {s['num_samples']} samples/example, {len(s['seeds'])} seeds",
        "",
        f"Burda et al. VAE ({'-'.join(str(h) for h in s['hidden'])} tanh, {s['latent_dim']} latents, "
        f"Bernoulli decoder, dynamic binarisation), Adam lr {s['learning_rate']} (eps 1e-4), "
        f"{s['steps']} steps of batch {s['batch_size']} "
        f"(~{s['steps'] * s['batch_size'] / result['train_size']:.0f} epochs of {result['train_size']} "
        "training images: a short run, sized so that the whole table takes ~15 minutes on 2 CPU cores "
        "(this one took "
        f"{result['wall_seconds'] / 60:.0f} minutes on a CPU shared with other jobs), so the bounds are "
        "far from converged). Test set: "
        f"{result['test_size']} images binarised once with a fixed key. Mean +- std over seeds "
        f"{', '.join(str(x) for x in s['seeds'])}; higher is better for every bound column.",
        "",
        "| method | objective | estimator | " + " | ".join(c for _, c in COLUMNS) + " | train s/run |",
        "|---|---|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for row in result["rows"]:
        cells = []
        for key, _ in COLUMNS:
            m, sd = row[key]["mean"], row[key]["std"]
            cells.append(f"{m:.1f} +- {sd:.1f}" if key == "active_units" else f"{m:.2f} +- {sd:.2f}")
        lines.append(f"| {row['method']} | {row['objective']} | {row['estimator']} | " + " | ".join(cells)
                     + f" | {row['train_seconds']['mean']:.1f} |")
    lines += ["", f"Device: {env['device']['device_kind']} ({env['device']['platform']}); "
              f"jax {env['versions']['jax']}, flax {env['versions']['flax']}, "
              f"optax {env['versions']['optax']}; "
              f"{env['date']}; total wall time {result['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown_only:
        result = json.loads((Path(args.out) / "train_table.json").read_text())
        (Path(args.out) / "train_table.md").write_text(markdown(result))
        print(markdown(result))
        return 0
    from tqdm.auto import tqdm

    from jaxelbo.app import data
    from jaxelbo.app.experiment import DEFAULTS, environment, train_and_evaluate

    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    if not methods:
        raise SystemExit(f"no method matches; valid labels: {', '.join(m[0] for m in METHODS)}")
    t0 = time.perf_counter()
    cache: dict = {}
    rows = []
    runs = [(m, seed) for m in methods for seed in args.seeds]
    per_method: dict = {}
    for (label, objective, estimator, extra), seed in tqdm(runs, disable=args.no_progress, desc="runs"):
        settings = {**DEFAULTS, "dataset": args.dataset, "data_dir": args.data_dir, "objective": objective,
                    "estimator": estimator, "num_samples": args.num_samples, "steps": args.steps,
                    "batch_size": args.batch_size, "seed": seed, "learning_rate": args.learning_rate,
                    "eval_every": 0, "checkpoint_every": 0, "log_every": max(args.steps // 10, 1),
                    "eval_num_samples": args.eval_num_samples, "surgery": False, **extra}
        summary = train_and_evaluate(settings, None, progress=False, plots=False, cache=cache)
        per_method.setdefault(label, []).append(
            {"seed": seed, **summary["test"], "train_seconds": summary["wall_seconds"]["train"],
             "evaluate_seconds": summary["wall_seconds"]["evaluate"],
             "steps_per_second": summary["steps_per_second"], "skipped_steps": summary["skipped_steps"]})
    for label, objective, estimator, extra in methods:
        runs_m = per_method[label]
        row = {"method": label, "objective": objective, "estimator": estimator, **extra, "runs": runs_m}
        for key in [k for k, _ in COLUMNS] + ["train_seconds", "steps_per_second"]:
            m, sd = mean_std([r[key] for r in runs_m])
            row[key] = {"mean": m, "std": sd}
        rows.append(row)
    ds = data.load(args.dataset, args.data_dir)
    result = {"settings": {**{k: DEFAULTS[k] for k in ("hidden", "latent_dim")}, **vars(args)},
              "train_size": len(ds.train), "test_size": len(ds.test), "rows": rows,
              "wall_seconds": time.perf_counter() - t0, "environment": environment()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_table.json").write_text(json.dumps(result, indent=1))
    (out / "train_table.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
