"""Inference-network gradient SNR of OVIS against VIMCO as K grows (Liévin et al. 2020).

On the Gaussian-mixture model of :mod:`benchmarks.rws_gmm` (C = 20, the MLP guide at its
initial parameters, the model at the true weights), the SNR ``|E g| / sd(g)`` of every
guide parameter over R replicates (``jaxelbo.snr.sweep``), averaged over the guide's
parameters, for K in a grid; ``jaxelbo.snr.fit_loglog`` fits the slope of log SNR in log K.

Run: ``python benchmarks/ovis_snr.py --num-replicates 2000`` (writes
``benchmarks/results/ovis_snr.{json,md}``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

import jaxelbo as je
from jaxelbo import snr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rws_gmm

ESTIMATORS = ("vimco", "ovis", "ovis-mc", "score")


def make_losses(num_samples: int) -> dict:
    out = {}
    for estimator in ESTIMATORS:
        kwargs = {"num_auxiliary": num_samples} if estimator == "ovis-mc" else {}
        out[estimator] = je.iwae(rws_gmm.MODEL, rws_gmm.GUIDE, num_samples=num_samples, estimator=estimator,
                                 **kwargs)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-replicates", type=int, default=2000)
    parser.add_argument("--grid", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--out", type=Path, default=rws_gmm.RESULTS)
    args = parser.parse_args(argv)
    params = rws_gmm.init_params(jax.random.key(0))
    params["model"]["logits"] = rws_gmm.TRUE_LOGITS
    x = jax.vmap(lambda r: rws_gmm.sample(params["model"], r)[1])(jax.random.split(jax.random.key(1), 8))
    n_guide = ravel_pytree(params["guide"])[0].size            # "guide" sorts first in the ravel order
    points = snr.sweep(make_losses, params, jax.random.key(2), x, grid=args.grid,
                       num_replicates=args.num_replicates)
    table = {e: [float(np.mean(p.snr[e][:n_guide])) for p in points] for e in ESTIMATORS}
    slopes = {e: snr.fit_loglog(args.grid, table[e])._asdict() for e in ESTIMATORS}
    meta = {"date": datetime.date.today().isoformat(), "device": f"{jax.devices()[0].device_kind} "
            f"({platform.processor() or platform.machine()})", "jax": jax.__version__,
            "num_replicates": args.num_replicates, "grid": args.grid}
    result = {"meta": meta, "mean_guide_snr": table, "slopes": slopes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ovis_snr.json").write_text(json.dumps(result, indent=1))
    lines = ["# Guide-gradient SNR on the GMM (mean over the MLP's parameters)", "",
             f"{meta['date']}, {meta['device']}, jax {meta['jax']}; R = {args.num_replicates} replicates.", "",
             "| estimator | " + " | ".join(f"K={k}" for k in args.grid) + " | slope of log SNR in log K |",
             "|---|" + "---|" * (len(args.grid) + 1)]
    for e in ESTIMATORS:
        s = slopes[e]
        err = f" ± {s['stderr']:.2f}" if s["stderr"] is not None else ""
        lines.append(f"| {e} | " + " | ".join(f"{v:.3f}" for v in table[e]) + f" | {s['slope']:+.2f}{err} |")
    (args.out / "ovis_snr.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
