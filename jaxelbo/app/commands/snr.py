"""``jaxelbo snr``: the gradient SNR sweep of Rainforth et al. (2018) and Tucker et al. (2019).

Sweeps ``K`` (IWAE with the reparam, STL and DReG estimators) and ``M`` (MIWAE at fixed
``K``) on the linear-Gaussian toy, ``R`` replicates per setting computed by one vmapped,
jit-compiled program (sharded over all devices when there are several), and writes
``snr.json``, ``snr.csv``, ``snr.md``, ``snr.png`` (SNR against K) and ``snr_m.png``
(SNR against M) to ``--out``. The library behind it is :mod:`jaxelbo.snr`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from typing import Any

DEFAULT_K_GRID = (1, 2, 3, 6, 10, 18, 32, 56, 100, 178, 316, 562, 1000)
DEFAULT_M_GRID = (1, 2, 3, 6, 10, 18, 32, 56, 100)
FAST = {"num_replicates": 1000, "max_num_samples": 316, "max_num_outer": 32}
LABELS = {"reparam": "IWAE (reparam)", "stl": "STL", "dreg": "DReG"}
COLORS = {"reparam": "tab:red", "stl": "tab:blue", "dreg": "tab:green"}
MARKERS = {"reparam": "o", "stl": "s", "dreg": "^"}
# the reference lines drawn per (sweep, group); the same numbers as jaxelbo.snr.EXPECTED_SLOPES
EXPECTED_SLOPES_PLOT = {("num_samples", "any", "theta"): 0.5, ("num_samples", "reparam", "phi"): -0.5,
                        ("num_samples", "dreg", "phi"): 0.5, ("num_outer", "any", "theta"): 0.5,
                        ("num_outer", "any", "phi"): 0.5}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``jaxelbo snr``."""
    parser.add_argument("--num-replicates", type=int, default=None,
                        help="R, gradient replicates per setting (default 10000; 1000 with --fast)")
    parser.add_argument("--out", default="runs/snr", help="output folder (default runs/snr)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data, the parameter noise and the keys (default 0)")
    parser.add_argument("--k-grid", type=_int_list, default=None,
                        help="comma-separated K values (default: 1,2,3,6,...,1000, about 4 per decade)")
    parser.add_argument("--max-num-samples", type=int, default=None,
                        help="largest K of a geometric grid from 1 (instead of --k-grid)")
    parser.add_argument("--m-grid", type=_int_list, default=None,
                        help="comma-separated M values for the MIWAE sweep (default 1,2,3,6,...,100)")
    parser.add_argument("--max-num-outer", type=int, default=None,
                        help="largest M of a geometric grid from 1 (instead of --m-grid)")
    parser.add_argument("--num-inner", type=int, default=10, help="K held fixed in the M sweep (default 10)")
    parser.add_argument("--estimator", action="append", choices=("reparam", "stl", "dreg"), default=None,
                        help="estimator to sweep; repeat the flag for several (default: all three)")
    parser.add_argument("--dim", type=int, default=20, help="latent and data dimension D (default 20)")
    parser.add_argument("--num-points", type=int, default=1024, help="data set size N (default 1024)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="gradient taken on the first B data points (default 1: one fixed point)")
    parser.add_argument("--fit-min", type=int, default=100,
                        help="fit the K slopes on K >= this (default 100; asymptotic regime)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="replicates per compiled call (default: largest fitting --memory-mb)")
    parser.add_argument("--memory-mb", type=int, default=512,
                        help="memory budget of one chunk of replicates in MiB (default 512)")
    parser.add_argument("--fast", action="store_true",
                        help="quick run: R=1000, K up to 316, M up to 32 (explicit flags still win)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--replot", action="store_true",
                        help="no sweep: rewrite csv, md and png from the snr.json already in --out")


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Turn the flags into the keyword arguments of :func:`jaxelbo.snr.rainforth_experiment`."""
    from jaxelbo.snr import geometric_grid

    def grid(explicit, maximum, fast_max, default):
        if explicit is not None and maximum is not None:
            raise ValueError("give either an explicit grid or its maximum, not both")
        if explicit is not None:
            return list(explicit)
        if maximum is not None:
            if maximum < 1:
                raise ValueError(f"the grid maximum must be >= 1, got {maximum}")
            return geometric_grid(maximum)
        if args.fast:
            return geometric_grid(fast_max)
        return list(default)

    num_replicates = args.num_replicates or (FAST["num_replicates"] if args.fast else 10_000)
    if num_replicates < 2:
        raise ValueError(f"--num-replicates must be >= 2, got {num_replicates}")
    for flag, value in (("--num-inner", args.num_inner), ("--dim", args.dim),
                        ("--num-points", args.num_points), ("--batch-size", args.batch_size),
                        ("--memory-mb", args.memory_mb)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    return {
        "seed": args.seed,
        "num_replicates": num_replicates,
        "k_grid": grid(args.k_grid, args.max_num_samples, FAST["max_num_samples"], DEFAULT_K_GRID),
        "m_grid": grid(args.m_grid, args.max_num_outer, FAST["max_num_outer"], DEFAULT_M_GRID),
        "num_inner": args.num_inner,
        "estimators": tuple(dict.fromkeys(args.estimator or ("reparam", "stl", "dreg"))),
        "dim": args.dim,
        "num_points": args.num_points,
        "batch_size": args.batch_size,
        "fit_min": args.fit_min,
        "chunk_size": args.chunk_size,
        "memory_budget_bytes": args.memory_mb * 2**20,
    }


def _program_name() -> str:
    prog = sys.argv[0] if sys.argv else "jaxelbo"
    if os.path.basename(prog) in ("__main__.py", "jaxelbo"):
        return "jaxelbo"
    return "python " + os.path.relpath(prog)


def environment() -> dict[str, Any]:
    """Device, library versions, date and command line, recorded with every result."""
    from jaxelbo.app.environment import describe

    return {**describe(), "command": " ".join([_program_name()] + sys.argv[1:])}


def write_csv(result: dict[str, Any], path: str) -> None:
    """One row per sweep x setting x estimator x group."""
    fields = ["sweep", "num_samples", "num_outer", "num_inner", "estimator", "group", "snr_mean",
              "snr_median", "snr_min", "snr_max", "snr_own_mean_mean", "mean_from", "total_variance",
              "seconds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for sweep_name, records in (("K", result["k_sweep"]), ("M", result["m_sweep"])):
            for r in records:
                for e, est in r["estimators"].items():
                    for g, s in est["snr"].items():
                        writer.writerow({
                            "sweep": sweep_name,
                            "num_samples": r.get("num_samples", r.get("num_inner")),
                            "num_outer": r.get("num_outer", 1), "num_inner": r.get("num_inner", ""),
                            "estimator": e, "group": g, "snr_mean": s["mean"], "snr_median": s["median"],
                            "snr_min": s["min"], "snr_max": s["max"],
                            "snr_own_mean_mean": est["snr_own_mean"][g]["mean"],
                            "mean_from": est["mean_from"], "total_variance": est["total_variance"][g],
                            "seconds": r["seconds"]})


def _fmt_slope(fit: dict[str, Any] | None) -> str:
    if not fit:
        return "n/a"
    return f"{fit['slope']:+.3f} [{fit['ci_low']:+.3f}, {fit['ci_high']:+.3f}]"


def _t_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "n/a | n/a"
    if row["identical"] or row["relative_rms_difference"] < 1e-5:
        return f"equal up to rounding (relative rms difference {row['relative_rms_difference']:.0e}) | -"
    return f"{row['rms_t']:.2f} | {row['max_abs_t']:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The slope table, the variance ordering and the paired bias tests as markdown."""
    s = result["settings"]
    lines = [
        f"Gradient SNR on the linear-Gaussian toy (D = {s['dim']}, N = {s['num_points']}, "
        f"gradient on {s['batch_size']} fixed data point(s)), R = {s['num_replicates']} replicates per "
        f"setting; SNR = mean over a group's elements of |E[g]| / std[g]"
        + ("; IWAE (reparam) mean taken from DReG." if s["mean_reference"] else "."),
        "",
        f"Log-log slopes with {int(100 * 0.95)}% t-intervals (K sweep fitted on K >= {s['fit_min']}; "
        f"M sweep with K = {s['num_inner']}, all M):",
        "",
        "| sweep | estimator | group | slope [95% CI] | expected | slope, whole grid |",
        "|---|---|---|---|---|---|",
    ]
    for axis, name in (("num_samples", "K"), ("num_outer", "M")):
        for e, groups in result["slopes"][axis].items():
            for g, fit in groups.items():
                expected = "" if fit["expected"] is None else f"{fit['expected']:+.1f}"
                lines.append(f"| {name} | {LABELS.get(e, e)} | {g} | {_fmt_slope(fit)} | {expected} | "
                             f"{_fmt_slope(fit.get('whole_grid'))} |")
    checks = result["checks"]
    if "phi_variance_ordering" in checks:
        c = checks["phi_variance_ordering"]
        lines += ["", f"Total phi variance (sum over elements); DReG < STL < IWAE for every K > 1: "
                      f"**{c['holds']}**", "", "| K | DReG | STL | IWAE (reparam) |", "|---|---|---|---|"]
        lines += [f"| {row['num_samples']} | {row['dreg']:.3g} | {row['stl']:.3g} | {row['reparam']:.3g} |"
                  for row in c["per_k"]]
    if "stl-dreg" in checks or "dreg-reparam" in checks:
        lines += ["", "Paired t-statistics on the phi gradient (same random keys), per element "
                      "t = mean(d) / (std(d) / sqrt(R)); rms over elements is about 1 without bias:", "",
                  "| K | STL - DReG: rms t | max abs t | DReG - IWAE: rms t | max abs t |",
                  "|---|---|---|---|---|"]
        a = {r["num_samples"]: r for r in checks.get("stl-dreg", {}).get("per_k", [])}
        b = {r["num_samples"]: r for r in checks.get("dreg-reparam", {}).get("per_k", [])}
        for k in sorted(set(a) | set(b)):
            ra, rb = a.get(k), b.get(k)
            lines.append(f"| {k} | {_t_cell(ra)} | {_t_cell(rb)} |")
    env = result.get("environment", {})
    if env:
        lines += ["", f"Wall time {result['wall_seconds']:.0f} s on {env['device']['device_kind']} "
                      f"({env['device']['num_devices']} device(s), {env['device']['cpu_count']} CPU cores), "
                      f"jax {env['versions']['jax']}; command: `{env['command']}`."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str, axis: str = "num_samples") -> None:
    """Two log-log panels (theta, phi): element-mean SNR against K (or M), the fitted slopes
    with their 95% intervals in the legend, dotted reference lines of the slopes theory
    predicts, and the K range used for the fit shaded."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["k_sweep"] if axis == "num_samples" else result["m_sweep"]
    s = result["settings"]
    letter = "K" if axis == "num_samples" else "M"
    xs = [r[axis] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.0), constrained_layout=True)
    panels = (("theta", r"model parameters $\theta$ ($\mu$)"), ("phi", r"guide parameters $\phi$ ($A$, $b$)"))
    for ax, (group, title) in zip(axes, panels, strict=True):
        curves = {e: [r["estimators"][e]["snr"][group]["mean"] for r in records] for e in s["estimators"]}
        # the theta gradient is the same estimator for reparam, stl and dreg (paired keys): one line
        if group == "theta" and len(curves) > 1:
            first = next(iter(curves.values()))
            if all(np.allclose(c, first, rtol=1e-5) for c in curves.values()):
                curves = {next(iter(curves)): first}
        for e, ys in curves.items():
            fit = result["slopes"][axis].get(e, {}).get(group)
            if group == "theta" and len(curves) == 1 and len(s["estimators"]) > 1:
                label = " = ".join(LABELS.get(n, n) for n in s["estimators"]) + " (same gradient)"
            else:
                label = LABELS.get(e, e)
                if e == "reparam" and s["mean_reference"] and group == "phi":
                    label += ", mean from DReG"
            if fit:
                half = fit["ci_high"] - fit["slope"]
                label += f": slope {fit['slope']:+.3f}" + (f" ± {half:.3f}" if math.isfinite(half) else "")
            color = "0.2" if len(curves) == 1 else COLORS.get(e)
            ax.plot(xs, ys, "-", marker=MARKERS.get(e, "o"), color=color, label=label, ms=5, lw=1.6)
            if group == "phi" and e in s["mean_reference"]:
                own = [r["estimators"][e]["snr_own_mean"][group]["mean"] for r in records]
                floor = math.sqrt(2 / (math.pi * s["num_replicates"]))
                ax.plot(xs, own, "--", color=color, alpha=0.45, lw=1.2,
                        label=f"{LABELS.get(e, e)}, its own sample mean (noise floor ≈ {floor:.3f})")
        positive = [y for ys in curves.values() for y in ys if y > 0]
        expected = sorted({v for (a, _, g), v in EXPECTED_SLOPES_PLOT.items() if a == axis and g == group})
        if positive and len(xs) > 1:
            x0, x1 = min(xs), max(xs)
            # through the middle of the data, shifted down so it does not hide a curve of that slope
            mid = 0.5 * math.exp(0.5 * (math.log(min(positive)) + math.log(max(positive))))
            xm = math.sqrt(x0 * x1)
            for slope in expected:
                line = [mid * (x / xm) ** slope for x in (x0, x1)]
                ax.plot([x0, x1], line, ":" if slope > 0 else "-.", color="0.45", lw=1.3,
                        label=f"reference $\\propto {letter}^{{{'+' if slope > 0 else '-'}1/2}}$")
        fit_lo = s["fit_min"] if axis == "num_samples" else 1
        if xs and fit_lo > min(xs):
            ax.axvspan(fit_lo, max(xs), color="0.85", alpha=0.35, lw=0,
                       label=f"slope fitted on {letter} ≥ {fit_lo}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("K, importance samples per IWAE bound" if axis == "num_samples"
                      else f"M, independent IWAE bounds averaged (MIWAE, K = {s['num_inner']})")
        ax.set_ylabel(r"gradient SNR  $|E[\Delta]|\,/\,\mathrm{std}[\Delta]$, mean over elements")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    sweep = "IWAE: SNR against K" if axis == "num_samples" else "MIWAE: SNR against M"
    fig.suptitle(f"{sweep} on the linear-Gaussian toy (D = {s['dim']}, R = {s['num_replicates']:,} "
                 "replicates per point), after Rainforth et al. 2018 and Tucker et al. 2019", fontsize=11)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: str) -> dict[str, str]:
    """Write snr.json, snr.csv, snr.md, snr.png and snr_m.png under ``out``; returns the paths."""
    os.makedirs(out, exist_ok=True)
    names = ("snr.json", "snr.csv", "snr.md", "snr.png", "snr_m.png")
    paths = {name: os.path.join(out, name) for name in names}
    with open(paths["snr.json"], "w") as f:
        json.dump(result, f, indent=1)
    write_csv(result, paths["snr.csv"])
    with open(paths["snr.md"], "w") as f:
        f.write(markdown(result))
    plot(result, paths["snr.png"], "num_samples")
    if result["m_sweep"]:
        plot(result, paths["snr_m.png"], "num_outer")
    else:
        del paths["snr_m.png"]
    return paths


def run(args: argparse.Namespace) -> int:
    """Run the sweep and write the outputs; returns the exit status."""
    if args.replot:
        with open(os.path.join(args.out, "snr.json")) as f:
            paths = write_outputs(json.load(f), args.out)
        print("rewrote " + ", ".join(paths.values()))
        return 0
    try:
        settings = resolve_settings(args)
    except ValueError as e:
        print(f"jaxelbo snr: error: {e}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from jaxelbo.snr import rainforth_experiment

    costs = {("num_samples", k): k for k in settings["k_grid"]}
    costs.update({("num_outer", m): m * settings["num_inner"] for m in settings["m_grid"]})
    bar = tqdm(total=sum(costs.values()), unit="K", desc="snr sweep", disable=args.no_progress,
               dynamic_ncols=True)

    def progress(axis, setting):
        bar.update(costs[(axis, setting)])
        bar.set_postfix_str(f"{'K' if axis == 'num_samples' else 'M'}={setting} done")

    start = time.perf_counter()
    try:
        result = rainforth_experiment(progress=progress, **settings)
    finally:
        bar.close()
    result["wall_seconds"] = time.perf_counter() - start
    result["environment"] = environment()

    paths = write_outputs(result, args.out)
    print(markdown(result))
    print("wrote " + ", ".join(paths.values()))
    return 0
