"""The gradient with respect to the data ``x`` of every objective x estimator, against finite differences.

Run from a source checkout::

    python benchmarks/x_gradient.py --out benchmarks/results            # the code on PYTHONPATH
    python benchmarks/x_gradient.py --compare before.json after.json --out benchmarks/results

For every registered pair, on the linear-Gaussian toy (``D = 2``, a batch of ``B = 2``,
parameters off the optimum, ``K = 4`` draws per example, ``M x K/M = 2 x 2`` for the
nested objectives, the registry's default extra keywords), in float64 on one key:

* ``jax.grad`` of ``x -> loss_fn(params, rng, x)[0]``;
* the central finite difference of the same loss value on the same key, step ``1e-5``
  per element of ``x``.

Because the key is fixed, the loss is a smooth function of ``x`` (``z = A x + b + s eps``)
and the finite difference is the derivative of the Monte Carlo value that every input but
``params["guide"]`` must receive. The table reports ``max |grad - fd| / max |fd|``.
``--compare`` writes ``x_gradient.md`` from two such records (the code before and after a
change), one row per pair.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxelbo as je  # noqa: E402
from jaxelbo import registry  # noqa: E402

STEP = 1e-5


def problem():
    lg = je.models.linear_gaussian
    mu = jnp.array([0.3, -0.5], jnp.float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), lg.optimal_params(mu))
    params["guide"]["b"] = params["guide"]["b"] + 0.4
    params["guide"]["A"] = params["guide"]["A"] + 0.1
    params["model"]["mu"] = params["model"]["mu"] - 0.3
    x = jnp.array([[1.0, 0.5], [-0.4, 2.0]], jnp.float64)
    return lg.model(), lg.guide(), params, x


def check_pair(objective: str, estimator: str, model, guide, params, x, rng) -> dict:
    loss_fn = registry.make(objective, model, guide, estimator=estimator, num_samples=4)
    value = jax.jit(lambda x_: loss_fn(params, rng, x_)[0])
    grad = np.asarray(jax.jit(jax.grad(lambda x_: loss_fn(params, rng, x_)[0]))(x))
    fd = np.zeros(x.size)
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = STEP
        e = jnp.asarray(e.reshape(x.shape))
        fd[i] = (float(value(x + e)) - float(value(x - e))) / (2 * STEP)
    fd = fd.reshape(x.shape)
    scale = float(np.max(np.abs(fd)))
    err = float(np.max(np.abs(grad - fd)))
    return {"objective": objective, "estimator": estimator, "max_abs_fd": scale,
            "max_abs_grad": float(np.max(np.abs(grad))), "max_abs_error": err,
            "relative_error": err / scale if scale > 0 else None, "grad_is_zero": bool(np.all(grad == 0))}


def run(label: str) -> dict:
    model, guide, params, x = problem()
    rng = jax.random.key(3)
    rows = []
    for objective, estimator in registry.pairs():
        try:
            rows.append(check_pair(objective, estimator, model, guide, params, x, rng))
        except Exception as e:  # a pair that fails to differentiate is reported, not hidden
            rows.append({"objective": objective, "estimator": estimator, "error": f"{type(e).__name__}: {e}"[:200]})
        print(rows[-1], flush=True)
    dev = jax.devices()[0]
    return {"label": label, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": f"{dev.platform} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "versions": {"jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version()},
            "problem": "linear-Gaussian D=2, B=2, K=4 (nested 2x2), float64, one key; central FD step 1e-5",
            "rows": rows}


def _cell(row: dict | None) -> str:
    if row is None:
        return "not registered"
    if "error" in row:
        return f"error: {row['error'][:60]}"
    if row["grad_is_zero"]:
        return f"**exactly 0** (FD {row['max_abs_fd']:.3g})"
    return f"{row['relative_error']:.1e}"


def compare(before: dict, after: dict) -> str:
    key = lambda r: (r["objective"], r["estimator"])
    b, a = {key(r): r for r in before["rows"]}, {key(r): r for r in after["rows"]}
    order = list(a) + [k for k in b if k not in a]
    lines = ["# The gradient with respect to x, before and after", "",
             f"{after['problem']}. Cell: `max |grad_x - FD| / max |FD|` (float64 rounding is about 1e-10; "
             "an O(1) value is a wrong gradient).  ",
             f"Before: {before['label']} ({before['date']}); after: {after['label']} ({after['date']}); "
             f"device {after['device']}; jax {after['versions']['jax']}.", "",
             "| objective | estimator | max abs FD | before | after |", "|---|---|---:|---:|---:|"]
    for k in order:
        ref = a.get(k) or b.get(k)
        fd = "" if ref is None or "max_abs_fd" not in ref else f"{ref['max_abs_fd']:.3g}"
        lines.append(f"| {k[0]} | {k[1]} | {fd} | {_cell(b.get(k))} | {_cell(a.get(k))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / "x_gradient")
    parser.add_argument("--label", default="this code")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        (args.out / "x_gradient.json").write_text(json.dumps({"before": before, "after": after}, indent=1))
        (args.out / "x_gradient.md").write_text(compare(before, after))
        print(compare(before, after))
        return 0
    result = run(args.label)
    name = "x_gradient-" + "".join(c if c.isalnum() else "-" for c in args.label) + ".json"
    (args.out / name).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
