"""Train the Burda et al. (2016) VAE with several objective/estimator pairs on one sample budget.

Every method draws the same number of samples per example per step (K = 64, or M x K =
8 x 8 for MIWAE and PIWAE), uses the same architecture, optimiser, batches and number of
steps. Each run is evaluated on the test set (or its first ``--eval-num-points`` images):
log-likelihood by IWAE with K = 5000 (Burda et al. 2016), IWAE-64, ELBO and active units
per stochastic layer. Writes ``benchmarks/results/train_table.{md,json}`` for digits and
``train_table_<dataset>.{md,json,png}`` for the others (the PNG: test log p(x) and active
units per method, one and two stochastic layers).

    python benchmarks/train_table.py                 # the committed digits table (8 methods, 3 seeds)
    python benchmarks/train_table.py --dataset fashion-mnist --stochastic-layers 1 2 \\
        --steps 3000 --seeds 0 --eval-num-points 500  # binarised Fashion-MNIST, 5 methods x 2
    python benchmarks/train_table.py --steps 200 --seeds 0 --out runs/table   # a smoke run
    python benchmarks/train_table.py --runs together   # every run of the table as one vmapped program

``--runs together`` trains every run (method x layers x seed) with
:func:`jaxelbo.app.train_many.train_many` (one compiled program advancing all of them, each
with its own streams; parameters equal to the runs trained in turn up to float rounding)
and then evaluates each as ``--runs in-turn`` does; ``train_seconds`` is then the table's
training wall time divided by the number of runs, and ``table_train_seconds`` the whole.

Fashion-MNIST is read from where Debian's ``dataset-fashion-mnist`` package installs it
(or ``--data-dir``). Results are written after every run, so an interrupted table keeps
what it finished; ``--markdown-only`` rewrites the markdown and figure from the JSON.

References:
  Burda, Grosse & Salakhutdinov (2016), arXiv:1509.00519 (VAE/IWAE, two stochastic
  layers, active units).
  Roeder, Wu & Duvenaud (2017), arXiv:1703.09194 (STL).
  Tucker, Lawson, Gu & Maddison (2019), arXiv:1810.04152 (DReG, RWS-DReG).
  Rainforth et al. (2018), arXiv:1802.04537 (MIWAE, CIWAE, PIWAE).
  Xiao, Rasul & Vollgraf (2017), arXiv:1708.07747 (Fashion-MNIST).
"""

from __future__ import annotations

import argparse
import json
import math
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
# The methods of the 28x28 table (the reproduction of Burda et al. and Tucker et al.).
PAPER_METHODS = ("VAE (ELBO)", "IWAE", "IWAE-STL", "IWAE-DReG", "RWS-DReG")
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
    p.add_argument("--stochastic-layers", type=int, nargs="+", choices=(1, 2), default=[1])
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-num-samples", type=int, default=5000)
    p.add_argument("--eval-num-points", type=int, default=None,
                   help="evaluate on the first N test images (default: all)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="labels to run (default: all for digits, the five of PAPER_METHODS otherwise)")
    p.add_argument("--runs", choices=("in-turn", "together"), default="in-turn",
                   help="train the runs one after another, or all as one vmapped program (train_many)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite the markdown (and figure) from the JSON in --out, training nothing")
    return p.parse_args(argv)


def stem(dataset: str) -> str:
    return "train_table" if dataset == "digits" else f"train_table_{dataset}"


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _row_label(row: dict) -> str:
    return row["method"] if row.get("stochastic_layers", 1) == 1 else f"{row['method']}, 2 layers"


def _find(rows: list[dict], method: str, layers: int) -> dict | None:
    return next((r for r in rows if r["method"] == method and r.get("stochastic_layers", 1) == layers), None)


def orderings(rows: list[dict]) -> list[dict]:
    """The orderings Burda et al. and Tucker et al. report, checked (not forced) on ``rows``.

    Each entry: the claim, the two values compared and whether it held. For the
    log-likelihood, ``se`` is the standard error of the difference over the test points
    when both runs have one seed (the two estimates are on the same points but with
    independent samples, so the errors add in quadrature; conservative).
    """
    checks = []
    layer_counts = sorted({r.get("stochastic_layers", 1) for r in rows})

    def ll(row):
        runs = row["runs"]
        se = runs[0]["log_likelihood_stderr"] if len(runs) == 1 else row["log_likelihood"]["std"]
        return row["log_likelihood"]["mean"], se

    def compare(claim, a, b, key="log_likelihood"):
        if a is None or b is None:
            return
        if key == "log_likelihood":
            (va, sa), (vb, sb) = ll(a), ll(b)
            se = math.hypot(sa, sb)
        else:
            va, vb, se = a[key]["mean"], b[key]["mean"], None
        checks.append({"claim": claim, "a": va, "b": vb, "difference": va - vb, "se": se,
                       "held": bool(va >= vb) if key == "log_likelihood" else bool(va > vb)})

    for layers in layer_counts:
        tag = f" ({layers} layer{'s' if layers > 1 else ''})"
        compare("IWAE >= VAE in log p(x)" + tag, _find(rows, "IWAE", layers), _find(rows, "VAE (ELBO)", layers))
        compare("IWAE-DReG >= IWAE in log p(x)" + tag, _find(rows, "IWAE-DReG", layers), _find(rows, "IWAE", layers))
        compare("IWAE keeps more active units than the VAE" + tag, _find(rows, "IWAE", layers),
                _find(rows, "VAE (ELBO)", layers), key="active_units")
    if 1 in layer_counts and 2 in layer_counts:
        for method in dict.fromkeys(r["method"] for r in rows):
            compare(f"{method}: 2 layers >= 1 layer in log p(x)", _find(rows, method, 2), _find(rows, method, 1))
    return checks


def markdown(result: dict) -> str:
    s = result["settings"]
    env = result["environment"]
    layers = s.get("stochastic_layers", [1])
    n_eval = result.get("eval_size", result["test_size"])
    epochs = s["steps"] * s["batch_size"] / result["train_size"]
    arch = []
    if 1 in layers:
        arch.append(f"1 stochastic layer: {'-'.join(str(h) for h in s['hidden'])} tanh, {s['latent_dim']} latents")
    if 2 in layers:
        arch.append("2 stochastic layers: q(z1|x) q(z2|z1) with 784-100-100-(100) and 100-50-50-(50) tanh MLPs, "
                    "model mirrored")
    lines = [
        f"# Training table: {s['dataset']}, {s['steps']} steps, batch {s['batch_size']}, "
        f"budget {s['num_samples']} samples/example, {len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''}",
        "",
        f"Burda et al. VAE ({'; '.join(arch)}; Bernoulli decoder, dynamic binarisation), Adam lr "
        f"{s['learning_rate']} (eps 1e-4), {s['steps']} steps of batch {s['batch_size']} "
        f"(~{epochs:.1f} epochs of {result['train_size']} training images). The whole table took "
        f"{result['wall_seconds'] / 60:.0f} minutes on {env['device']['device_kind']} ({env['device']['platform']}), "
        "shared with other jobs, so the bounds are far from converged. Test: "
        f"{'the first ' if n_eval < result['test_size'] else ''}{n_eval} of {result['test_size']} test images, "
        "binarised once with a fixed key; log p(x) by IWAE with K = "
        f"{s['eval_num_samples']} (+- its standard error over the test points"
        f"{'' if len(s['seeds']) == 1 else '; mean +- std over seeds'}). Higher is better for every bound column.",
        "",
        "| method | layers | objective | estimator | " + " | ".join(c for _, c in COLUMNS)
        + " | active units per layer | train s/run | steps/s |",
        "|---|---:|---|---|" + "---:|" * (len(COLUMNS) + 3),
    ]
    for row in result["rows"]:
        cells = []
        for key, _ in COLUMNS:
            m, sd = row[key]["mean"], row[key]["std"]
            if key == "log_likelihood" and len(row["runs"]) == 1:
                sd = row["runs"][0]["log_likelihood_stderr"]
            cells.append(f"{m:.1f}" + (f" +- {sd:.1f}" if len(row["runs"]) > 1 else "") if key == "active_units"
                         else f"{m:.2f} +- {sd:.2f}" if key == "log_likelihood" or len(row["runs"]) > 1
                         else f"{m:.2f}")
        per_layer = " / ".join(str(u) for u in row["runs"][0].get("active_units_per_layer", []))
        lines.append(f"| {row['method']} | {row.get('stochastic_layers', 1)} | {row['objective']} | "
                     f"{row['estimator']} | " + " | ".join(cells)
                     + f" | {per_layer} | {row['train_seconds']['mean']:.0f} | {row['steps_per_second']['mean']:.1f} |")
    checks = orderings(result["rows"])
    if checks:
        lines += ["", "Orderings reported by Burda et al. (2016) and Tucker et al. (2019), checked here (not forced). "
                  "For log p(x): the difference and, as se, the two runs' standard errors over the test points added "
                  "in quadrature: conservative, since both are evaluated on the same points, and blind to "
                  "seed-to-seed variation" + (" (one training seed)." if len(s["seeds"]) == 1 else "."), ""]
        for c in checks:
            se = f" (se {c['se']:.2f})" if c["se"] is not None else ""
            diff = f"{c['difference']:+.2f}{se}" if c["se"] is not None else f"{c['a']:.0f} vs {c['b']:.0f}"
            lines.append(f"- {c['claim']}: {'held' if c['held'] else 'did not hold'}, {diff}")
    lines += ["", f"Device: {env['device']['device_kind']} ({env['device']['platform']}); "
              f"jax {env['versions']['jax']}, flax {env['versions']['flax']}, "
              f"optax {env['versions']['optax']}; "
              f"{env['date']}; total wall time {result['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    """Test log p(x) (with standard errors) and active units per method, one bar per layer count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    layer_counts = sorted({r.get("stochastic_layers", 1) for r in rows})
    width = 0.8 / len(layer_counts)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for j, layers in enumerate(layer_counts):
        xs, ll, se, au = [], [], [], []
        for i, method in enumerate(methods):
            row = _find(rows, method, layers)
            if row is None:
                continue
            xs.append(i + (j - (len(layer_counts) - 1) / 2) * width)
            ll.append(row["log_likelihood"]["mean"])
            se.append(row["runs"][0]["log_likelihood_stderr"] if len(row["runs"]) == 1
                      else row["log_likelihood"]["std"])
            au.append(row["active_units"]["mean"])
        label = f"{layers} stochastic layer{'s' if layers > 1 else ''}"
        axes[0].errorbar(xs, ll, yerr=se, fmt="o", capsize=3, label=label)
        axes[1].bar(xs, au, width=width, label=label)
    for ax, title in zip(axes, ("test log p(x), IWAE K=5000 (+- s.e.)", "active units (all layers)"), strict=True):
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"{s['dataset']} (binarised), {s['steps']} steps of batch {s['batch_size']}, K={s['num_samples']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(per_run: dict, methods, settings: dict, ds_sizes: dict, wall: float, environment: dict) -> dict:
    rows = []
    for layers in settings["stochastic_layers"]:
        for label, objective, estimator, extra in methods:
            runs_m = per_run.get((label, layers))
            if not runs_m:
                continue
            row = {"method": label, "stochastic_layers": layers, "objective": objective, "estimator": estimator,
                   **extra, "runs": runs_m}
            for key in [k for k, _ in COLUMNS] + ["train_seconds", "steps_per_second"]:
                m, sd = mean_std([r[key] for r in runs_m])
                row[key] = {"mean": m, "std": sd}
            rows.append(row)
    return {"settings": settings, **ds_sizes, "rows": rows, "wall_seconds": wall, "environment": environment}


def write(result: dict, out: Path) -> None:
    name = stem(result["settings"]["dataset"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(markdown(result))
    if result["settings"]["dataset"] != "digits" and result["rows"]:
        figure(result, out / f"{name}.png")


def train_together(runs, settings_of, args, cache: dict) -> dict:
    """Every run of the table trained as one program (``train_many``), then each evaluated."""
    import jax

    from jaxelbo.app import data, evaluation, training
    from jaxelbo.app.experiment import as_settings, build_experiment
    from jaxelbo.app.train_many import Run, train_many

    built = []
    for (label, objective, estimator, extra), layers, seed in runs:
        settings = as_settings(settings_of(objective, estimator, extra, layers, seed))
        ds, net, loss_fn, optimizer = build_experiment(settings, cache)
        key = ("step", ds.name, json.dumps(net.config), *settings.compile_key())  # as train_and_evaluate
        if cache.get(key) is None:
            cache[key] = training.make_train_step(loss_fn, optimizer)
        step_fn = cache[key]
        batches = data.BatchIterator(ds.train, settings.batch_size, settings.seed, settings.binarization)
        built.append((label, layers, seed, settings, ds, net,
                      Run(step_fn, net.params, optimizer.init(net.params), batches, settings.seed)))
    t0 = time.perf_counter()
    results = train_many([b[-1] for b in built], num_steps=args.steps, log_every=max(args.steps // 10, 1))
    jax.block_until_ready([r.params for r in results])
    table_seconds = time.perf_counter() - t0
    rates = [h["steps_per_second"] for h in results[0].history[1:] or results[0].history]
    per_run: dict = {}
    for (label, layers, seed, settings, ds, net, _), res in zip(built, results, strict=True):
        t_eval = time.perf_counter()
        x_test = data.evaluation_split(ds, "test", settings.binarization)[:settings.eval_num_points]
        test = evaluation.evaluate(net.model, net.guide, res.params, jax.random.key(settings.seed + 10_000), x_test,
                                   posterior_means=net.posterior_means, num_samples_ll=settings.eval_num_samples,
                                   chunk_size=settings.eval_chunk_size, surgery=settings.surgery, progress=False)
        per_run.setdefault((label, layers), []).append(
            {"seed": seed, **test, "train_seconds": table_seconds / len(runs), "table_train_seconds": table_seconds,
             "evaluate_seconds": time.perf_counter() - t_eval, "steps_per_second": float(np.median(rates)),
             "skipped_steps": res.skipped_steps})
        print(f"{label}, {layers} layer(s), seed {seed}: {json.dumps(per_run[(label, layers)][-1])}", flush=True)
    return per_run


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.markdown_only:
        result = json.loads((out / f"{stem(args.dataset)}.json").read_text())
        write(result, out)
        print(markdown(result))
        return 0
    from tqdm.auto import tqdm

    from jaxelbo.app import data
    from jaxelbo.app.experiment import DEFAULTS, environment, train_and_evaluate

    chosen = args.methods or ([m[0] for m in METHODS] if args.dataset == "digits" else PAPER_METHODS)
    methods = [m for m in METHODS if m[0] in chosen]
    if not methods:
        raise SystemExit(f"no method matches; valid labels: {', '.join(m[0] for m in METHODS)}")
    ds = data.load(args.dataset, args.data_dir)
    ds_sizes = {"train_size": len(ds.train), "test_size": len(ds.test),
                "eval_size": min(len(ds.test), args.eval_num_points or len(ds.test))}
    settings_record = {**{k: DEFAULTS[k] for k in ("hidden", "latent_dim")}, **vars(args)}
    t0 = time.perf_counter()
    cache: dict = {}
    # method by method, both layer counts together, so a partial table already compares them
    runs = [(m, layers, seed) for m in methods for layers in args.stochastic_layers for seed in args.seeds]
    per_run: dict = {}

    def settings_of(objective, estimator, extra, layers, seed):
        return {**DEFAULTS, "dataset": args.dataset, "data_dir": args.data_dir, "objective": objective,
                "estimator": estimator, "num_samples": args.num_samples, "steps": args.steps,
                "batch_size": args.batch_size, "seed": seed, "learning_rate": args.learning_rate,
                "eval_every": 0, "checkpoint_every": 0, "log_every": max(args.steps // 10, 1),
                "eval_num_samples": args.eval_num_samples, "eval_num_points": args.eval_num_points,
                "surgery": False, "stochastic_layers": layers, **extra}

    if args.runs == "together":
        per_run = train_together(runs, settings_of, args, cache)
        write(summarise(per_run, methods, settings_record, ds_sizes, time.perf_counter() - t0, environment()), out)
    for (label, objective, estimator, extra), layers, seed in tqdm(runs if args.runs == "in-turn" else [],
                                                                  disable=args.no_progress, desc="runs"):
        settings = settings_of(objective, estimator, extra, layers, seed)
        summary = train_and_evaluate(settings, None, progress=False, plots=False, cache=cache)
        per_run.setdefault((label, layers), []).append(
            {"seed": seed, **summary["test"], "train_seconds": summary["wall_seconds"]["train"],
             "evaluate_seconds": summary["wall_seconds"]["evaluate"],
             "steps_per_second": summary["steps_per_second"], "skipped_steps": summary["skipped_steps"]})
        print(f"{label}, {layers} layer(s), seed {seed}: {json.dumps(per_run[(label, layers)][-1])}", flush=True)
        write(summarise(per_run, methods, settings_record, ds_sizes, time.perf_counter() - t0, environment()), out)
    result = summarise(per_run, methods, settings_record, ds_sizes, time.perf_counter() - t0, environment())
    write(result, out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
