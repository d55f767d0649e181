"""Bias and SNR of ``je.smc_bound``'s two gradients against K, on a linear-Gaussian SSM (Kalman exact).

Estimators, on the same random keys (``jaxelbo.snr.sweep``, paired replicates):

- ``reparam``: the resampling score terms dropped (FIVO / AESMC practice): biased, low variance;
- ``score-resampling``: with them, ``log Z_hat - log Z_hat_{<t}`` as the baseline: unbiased for
  ``grad E[log Z_hat]``.

Problem: ``jaxelbo.models.linear_gaussian_ssm`` with ``dim_z = 2``, ``dim_x = 1``, T = 6 steps
simulated with key 3 (the problem of ``tests/test_smc.py``), the bootstrap proposal,
multinomial resampling at every step. Two proposals: ``phi = theta`` (the test's
``test_reparam_bias_shrinks_with_the_number_of_particles``) and a shifted one (``m0 + 0.5``,
``log_q + 0.3``, ``log_p0 + 0.3``, the test's ``shifted_guide``).

Reported for every K, for the gradient of the bound ``E[log Z_hat]`` (minus the loss's):

- ``theta`` bias against the Kalman gradient ``grad_theta log p(x)``: ``|E[g] - g_Kalman|`` (2-norm
  over the 12 elements of theta) with its noise floor ``sqrt(sum Var[g] / R)``. For
  ``score-resampling`` it is the bias of the bound's own gradient (``grad E[log Z_hat] -
  grad log p``, which vanishes as K grows); for ``reparam`` it adds the dropped score terms.
- the paired difference ``reparam - score-resampling``: its 2-norm per group and the largest
  |paired t| (the dropped terms' mean, tested on the same noise).
- the SNR ``|E[g]| / sd[g]``, element-wise, averaged over each group (theta, phi).

Sizing: ``--num-replicates 2000`` over K in {2, 4, 8, 16, 32, 64}: two compilations per K
and proposal (reused from the persistent cache for the second proposal), about 5 minutes on a
loaded 2-core CPU.

Run: ``python benchmarks/smc_snr.py`` (writes ``benchmarks/results/smc_snr.{json,md,png}``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import jaxelbo as je
from jaxelbo import snr

ssm = je.models.linear_gaussian_ssm
RESULTS = Path(__file__).resolve().parent / "results"
ESTIMATORS = ("reparam", "score-resampling")


def problem():
    """The LG-SSM problem of tests/test_smc.py: params (phi = theta) and one sequence ``(1, 6, 1)``."""
    params = ssm.default_params(dim_z=2, dim_x=1)
    _, x = ssm.model().sample(params["model"], jax.random.key(3), 6)
    return params, x[None]


def shifted(params):
    phi = params["guide"]
    return {"model": params["model"],
            "guide": dict(phi, m0=phi["m0"] + 0.5, log_q=phi["log_q"] + 0.3, log_p0=phi["log_p0"] + 0.3)}


def kalman_target(params, x) -> np.ndarray:
    """``grad log p(x)`` in the flat order of ``params``: Kalman for theta, 0 for phi (its K -> inf limit)."""
    g_theta = jax.grad(lambda th: ssm.kalman_log_marginal(th, x)[0])(params["model"])
    flat, _ = ravel_pytree({"model": g_theta, "guide": jax.tree.map(jnp.zeros_like, params["guide"])})
    return np.asarray(flat, np.float64)


def make_losses(num_particles: int) -> dict:
    model, proposal = ssm.model(), ssm.bootstrap_proposal()
    return {e: je.smc_bound(model, proposal, num_particles=num_particles, estimator=e) for e in ESTIMATORS}


def study(params, x, grid, num_replicates: int, seed: int) -> list[dict]:
    layout = snr.param_layout(params)
    target = kalman_target(params, x)
    theta = layout.groups["theta"]
    points = snr.sweep(make_losses, params, jax.random.key(seed), x, grid=grid, num_replicates=num_replicates,
                       pairs=[("reparam", "score-resampling")])
    rows = []
    for p in points:
        row: dict = {"K": int(p.setting), "seconds": p.seconds}
        for e in ESTIMATORS:
            m = p.moments[e]
            mean, var = -m.mean, m.variance  # the loss is -bound
            row[e] = {
                "theta_bias_vs_kalman": float(np.linalg.norm(mean[theta] - target[theta])),
                "theta_noise_floor": float(np.sqrt(np.sum(var[theta]) / m.count)),
                "snr": {g: snr.summarize(snr.signal_to_noise(mean, var), layout)[g]["mean"] for g in ("theta", "phi")},
                "sd": {g: float(np.sqrt(np.mean(var[layout.groups[g]]))) for g in ("theta", "phi")},
            }
        d = p.moments["reparam-score-resampling"]
        t = snr.paired_t(d)
        row["dropped_terms"] = {g: {"norm": float(np.linalg.norm(d.mean[layout.groups[g]])),
                                    "noise_floor": float(np.sqrt(np.sum(d.variance[layout.groups[g]]) / d.count)),
                                    "max_abs_paired_t": float(np.max(np.abs(t[layout.groups[g]])))}
                                for g in ("theta", "phi")}
        rows.append(row)
    return rows


def to_markdown(result: dict) -> str:
    env = result["environment"]
    dev = env["device"]
    lines = [
        f"# Bias and SNR of `smc_bound`'s gradients against K ({dev['platform']}, {dev.get('cpu')}, "
        f"{dev.get('cpu_count')} cores)",
        "",
        f"Date {env['date']}, wall {result['wall_seconds']:.0f} s, R = {result['num_replicates']} paired "
        "replicates per K.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".  ",
        "Linear-Gaussian SSM (dim_z = 2, dim_x = 1, T = 6, the problem of `tests/test_smc.py`), bootstrap "
        "proposal, multinomial resampling at every step. Gradients of the bound `E[log Z_hat]`. "
        "`|bias|`: 2-norm of `E[g] - grad log p(x)` (Kalman) over theta's 12 elements, ± its noise floor "
        "`sqrt(sum Var / R)`. `dropped`: 2-norm of the paired mean of `reparam - score-resampling` "
        "(the score terms reparam drops), ± its noise floor, and its largest |paired t| over the group's "
        "elements. SNR: `|E[g]| / sd[g]` averaged over "
        "the elements of a group.",
        "",
    ]
    for name, rows in result["studies"].items():
        lines += [f"## proposal: {name}", "",
                  "| K | reparam theta \\|bias\\| | score-resampling theta \\|bias\\| | dropped theta (max \\|t\\|) "
                  "| dropped phi (max \\|t\\|) | reparam SNR theta / phi | score-resampling SNR theta / phi |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            a, b, d = r["reparam"], r["score-resampling"], r["dropped_terms"]
            lines.append(
                f"| {r['K']} | {a['theta_bias_vs_kalman']:.2f} ± {a['theta_noise_floor']:.2f} | "
                f"{b['theta_bias_vs_kalman']:.2f} ± {b['theta_noise_floor']:.2f} | "
                f"{d['theta']['norm']:.2f} ± {d['theta']['noise_floor']:.2f} ({d['theta']['max_abs_paired_t']:.1f}) | "
                f"{d['phi']['norm']:.2f} ± {d['phi']['noise_floor']:.2f} ({d['phi']['max_abs_paired_t']:.1f}) | "
                f"{a['snr']['theta']:.2f} / {a['snr']['phi']:.2f} | {b['snr']['theta']:.2f} / {b['snr']['phi']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = result["studies"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    styles = {"reparam": "-o", "score-resampling": "-s"}
    for name, rows in studies.items():
        ks = np.array([r["K"] for r in rows])
        ls = "" if name == "phi = theta" else " (shifted phi)"
        for e in ESTIMATORS:
            bias = np.array([r[e]["theta_bias_vs_kalman"] for r in rows])
            axes[0].loglog(ks, bias, styles[e], label=f"{e}{ls}", alpha=1.0 if not ls else 0.6)
            for ax, g in ((axes[1], "theta"), (axes[2], "phi")):
                ax.loglog(ks, [r[e]["snr"][g] for r in rows], styles[e], label=f"{e}{ls}",
                          alpha=1.0 if not ls else 0.6)
        floor = np.array([r["score-resampling"]["theta_noise_floor"] for r in rows])
        axes[0].loglog(ks, floor, ":", color="gray", label=f"noise floor{ls}")
    axes[0].set(title="theta: |E[g] - Kalman gradient|", xlabel="K particles")
    axes[1].set(title="theta: mean element-wise SNR", xlabel="K particles")
    axes[2].set(title="phi: mean element-wise SNR", xlabel="K particles")
    ks = [r["K"] for r in next(iter(studies.values()))]
    for ax in axes:
        ax.minorticks_off()
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--num-replicates", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from jaxelbo.app.environment import describe

    t0 = time.perf_counter()
    params, x = problem()
    studies = {"phi = theta": study(params, x, args.particles, args.num_replicates, seed=0),
               "shifted phi": study(shifted(params), x, args.particles, args.num_replicates, seed=1)}
    result = {"environment": describe(), "num_replicates": args.num_replicates,
              "log_p_kalman": float(ssm.kalman_log_marginal(params["model"], x)[0]),
              "studies": studies, "wall_seconds": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smc_snr.json").write_text(json.dumps(result, indent=1))
    (args.out / "smc_snr.md").write_text(to_markdown(result))
    figure(result, args.out / "smc_snr.png")
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
