"""Le et al. (2019)'s Gaussian-mixture study of reweighted wake-sleep, through je.*.

Setup (from the paper and its code, tuananhle7/rrws gmm/): C = 20 clusters, ``x | c ~
N(10 c, 5^2)``, true mixture weights ``∝ c + 5``; the model learns the mixture logits
(probabilities ``softmax(0.5 * logits)``, initialised at ``reversed(2 * arange(20))``); the
inference network ``q(c | x)`` is a 1-16-16-20 tanh MLP fed the raw x; batches of 100
fresh draws from the true model. Metrics, over training: the L2 error of the learned
mixture weights, and the mean over 100 fixed test points of the L2 distance between
``q(c | x)`` and the true model's posterior.

Deviations (said in the results too): one combined step on ``params = {model, guide}`` per
iteration instead of separate theta and phi steps; Adam with ``--lr`` (default 1e-2)
for ``--steps`` iterations (default 2000) instead of 1e-3 for 100k, to fit a loaded
2-core CPU. Seeds are vmapped, so one configuration (method, K) is one compiled program.

Run: ``python benchmarks/rws_gmm.py --steps 2000 --seeds 4`` (writes
``benchmarks/results/rws_gmm.{json,md,png}``); ``--merge`` adds configurations (e.g. more K)
to the results already there.

References:
  Le, Kosiorek, Siddharth, Teh & Wood (2019). Revisiting reweighted wake-sleep for models
  with stochastic control flow. UAI. arXiv:1805.10469.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxelbo as je

C = 20
LOCS = 10.0 * jnp.arange(C, dtype=jnp.float32)
SCALE = 5.0
MULT = 0.5
TRUE_LOGITS = jnp.log((jnp.arange(C) + 5.0) / jnp.sum(jnp.arange(C) + 5.0)) / MULT
INIT_LOGITS = jnp.asarray(2.0 * np.arange(C)[::-1], jnp.float32)
METHODS = ("vimco", "rws-wake", "rws-sleep", "rws-defensive", "ovis", "iwae-score", "tvo")
RESULTS = Path(__file__).resolve().parent / "results"


def log_normal(x, loc):
    return -0.5 * ((x - loc) / SCALE) ** 2 - math.log(SCALE) - 0.5 * math.log(2 * math.pi)


def sample(theta, rng):
    k_c, k_x = jax.random.split(rng)
    c = jax.random.categorical(k_c, MULT * theta["logits"])
    return c, jnp.reshape(LOCS[c] + SCALE * jax.random.normal(k_x), (1,))


MODEL = je.Model(log_prior=lambda th, c: jax.nn.log_softmax(MULT * th["logits"])[c],
                 log_likelihood=lambda th, x, c: log_normal(x[0], LOCS[c]), sample=sample)


def mlp(phi, x):
    h = jnp.tanh(x @ phi["w1"] + phi["b1"])
    h = jnp.tanh(h @ phi["w2"] + phi["b2"])
    return jax.nn.log_softmax(h @ phi["w3"] + phi["b3"])


GUIDE = je.Guide(sample=lambda phi, rng, x: jax.random.categorical(rng, mlp(phi, x)),
                 log_prob=lambda phi, x, c: mlp(phi, x)[c])


def init_params(rng):
    """PyTorch's default Linear init (uniform in +-1/sqrt(fan_in))."""
    def linear(key, n_in, n_out):
        kw, kb = jax.random.split(key)
        bound = 1.0 / math.sqrt(n_in)
        return (jax.random.uniform(kw, (n_in, n_out), minval=-bound, maxval=bound),
                jax.random.uniform(kb, (n_out,), minval=-bound, maxval=bound))
    k1, k2, k3 = jax.random.split(rng, 3)
    (w1, b1), (w2, b2), (w3, b3) = linear(k1, 1, 16), linear(k2, 16, 16), linear(k3, 16, C)
    return {"model": {"logits": INIT_LOGITS},
            "guide": {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3}}


def make_loss(method: str, k: int):
    if method == "vimco":
        return je.iwae(MODEL, GUIDE, num_samples=k, estimator="vimco")
    if method == "iwae-score":
        return je.iwae(MODEL, GUIDE, num_samples=k, estimator="score")
    if method == "ovis":
        return je.iwae(MODEL, GUIDE, num_samples=k, estimator="ovis-mc", num_auxiliary=k)
    if method == "tvo":
        return je.tvo(MODEL, GUIDE, num_samples=k, num_partitions=5, log_beta_min=-1.0)
    if method == "rws-wake":
        return je.rws(MODEL, GUIDE, num_samples=k, estimator="score")
    if method == "rws-sleep":
        return je.rws(MODEL, GUIDE, num_samples=k, estimator="score", insomnia=0.0)
    if method == "rws-defensive":
        return je.rws(MODEL, GUIDE, num_samples=k, estimator="score", defensive=0.2)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def true_posterior(x):
    """p_true(c | x) for x of shape (N, 1): (N, C)."""
    return jax.nn.softmax(jax.nn.log_softmax(MULT * TRUE_LOGITS) + log_normal(x, LOCS), axis=-1)


def errors(params, x_test):
    p_err = jnp.linalg.norm(jax.nn.softmax(MULT * params["model"]["logits"]) - jax.nn.softmax(MULT * TRUE_LOGITS))
    q = jnp.exp(jax.vmap(lambda xi: mlp(params["guide"], xi))(x_test))
    q_err = jnp.mean(jnp.linalg.norm(q - true_posterior(x_test), axis=-1))
    return p_err, q_err


def run_config(method: str, k: int, *, seeds: int, steps: int, log_every: int, lr: float,
               batch_size: int = 100) -> dict:
    """Train ``seeds`` runs (vmapped) of one (method, K); errors every ``log_every`` steps."""
    import optax

    loss_fn = make_loss(method, k)
    opt = optax.adam(lr)
    x_test = jax.vmap(lambda r: sample({"logits": TRUE_LOGITS}, r)[1])(jax.random.split(jax.random.key(123), 100))

    def one_seed(seed_key):
        params = init_params(jax.random.fold_in(seed_key, 0))
        state = opt.init(params)

        def step(carry, key):
            params, state = carry
            k_data, k_loss = jax.random.split(key)
            x = jax.vmap(lambda r: sample({"logits": TRUE_LOGITS}, r)[1])(jax.random.split(k_data, batch_size))
            grads = jax.grad(lambda p: loss_fn(p, k_loss, x)[0])(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        def block(carry, key):
            carry, _ = jax.lax.scan(step, carry, jax.random.split(key, log_every))
            return carry, errors(carry[0], x_test)

        blocks = jax.random.split(jax.random.fold_in(seed_key, 1), steps // log_every)
        _, (p_err, q_err) = jax.lax.scan(block, (params, state), blocks)
        p0, q0 = errors(params, x_test)
        return jnp.concatenate([p0[None], p_err]), jnp.concatenate([q0[None], q_err])

    keys = jax.random.split(jax.random.key(0), seeds)
    start = time.perf_counter()
    p_err, q_err = jax.jit(jax.vmap(one_seed))(keys)
    p_err.block_until_ready()
    seconds = time.perf_counter() - start
    return {"method": method, "num_samples": k, "iterations": list(range(0, steps + 1, log_every)),
            "p_error": np.asarray(p_err).tolist(), "q_error": np.asarray(q_err).tolist(), "seconds": seconds}


def findings(records: list[dict], ks: list[int]) -> dict:
    """The paper's two claims, checked on the final errors (mean over seeds)."""
    final = {(r["method"], r["num_samples"]): (float(np.mean(np.asarray(r["p_error"])[:, -1])),
                                               float(np.mean(np.asarray(r["q_error"])[:, -1]))) for r in records}
    out = {}
    if all(("rws-wake", k) in final and ("vimco", k) in final for k in ks) and len(ks) > 1:
        rq = [final["rws-wake", k][1] for k in ks]
        vq = [final["vimco", k][1] for k in ks]
        out["rws_q_improves_with_K"] = bool(rq[-1] < rq[0])
        out["vimco_q_does_not_improve_with_K"] = bool(vq[-1] >= vq[0])
        out["rws_p_at_least_as_good_as_vimco"] = {k: bool(final["rws-wake", k][0] <= final["vimco", k][0])
                                                  for k in ks}
    return out


def write_outputs(records: list[dict], args: argparse.Namespace, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    ks = sorted({r["num_samples"] for r in records})
    meta = {"date": datetime.date.today().isoformat(), "device": f"{jax.devices()[0].device_kind} "
            f"({platform.processor() or platform.machine()}, {jax.device_count()} device)",
            "jax": jax.__version__, "jaxelbo": je.__version__, "steps": args.steps, "seeds": args.seeds,
            "lr": args.lr, "log_every": args.log_every}
    result = {"meta": meta, "findings": findings(records, ks), "records": records}
    (out_dir / "rws_gmm.json").write_text(json.dumps(result, indent=1))
    lines = ["# Le et al. (2019) GMM: final errors (mean ± sd over seeds)", "",
             f"{meta['date']}, {meta['device']}, jax {meta['jax']}, jaxelbo {meta['jaxelbo']}; "
             f"{args.steps} Adam steps at lr {args.lr}, {args.seeds} seeds, batch 100 (the paper: 100k at 1e-3).",
             "", "| method | K | mixture-weight L2 error | q(z\\|x) L2 error | seconds |", "|---|---|---|---|---|"]
    for r in records:
        p, q = np.asarray(r["p_error"])[:, -1], np.asarray(r["q_error"])[:, -1]
        lines.append(f"| {r['method']} | {r['num_samples']} | {p.mean():.3f} ± {p.std():.3f} | "
                     f"{q.mean():.3f} ± {q.std():.3f} | {r['seconds']:.0f} |")
    ran = {(r["method"], r["num_samples"]) for r in records}
    missing = [f"{m} at K = {k}" for k in ks for m in METHODS if (m, k) not in ran]
    if missing:
        lines += ["", "Not run: " + ", ".join(missing) + "."]
    lines += ["", "Findings (checked on these numbers, not forced): " + json.dumps(result["findings"])]
    (out_dir / "rws_gmm.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(2, len(ks), figsize=(3.2 * len(ks), 5.5), sharey="row", squeeze=False)
    for j, k in enumerate(ks):
        for r in (r for r in records if r["num_samples"] == k):
            for i, name in enumerate(("p_error", "q_error")):
                v = np.asarray(r[name])
                axes[i, j].plot(r["iterations"], v.mean(0), label=r["method"],
                                color=f"C{METHODS.index(r['method'])}")  # one colour per method in every panel
        axes[0, j].set_title(f"K = {k}")
        axes[1, j].set_xlabel("iteration")
    axes[0, 0].set_ylabel("||p_theta(z) - p_true(z)||")
    axes[1, 0].set_ylabel("E_x ||q(z|x) - p_true(z|x)||")
    for ax in axes.ravel():
        ax.set_yscale("log")
    from matplotlib.lines import Line2D

    shown = [m for m in METHODS if any(r["method"] == m for r in records)]
    axes[0, -1].legend([Line2D([], [], color=f"C{METHODS.index(m)}") for m in shown], shown, fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "rws_gmm.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--num-samples", type=int, action="append", default=None, help="K (repeatable)")
    parser.add_argument("--method", action="append", choices=METHODS, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true",
                        help="add to (or replace configurations of) the records already in --out/rws_gmm.json; "
                        "they must have the same --steps, --seeds, --lr and --log-every")
    args = parser.parse_args(argv)
    if args.steps % args.log_every:
        parser.error("--steps must be a multiple of --log-every")
    records = []
    if args.merge and (args.out / "rws_gmm.json").is_file():
        saved = json.loads((args.out / "rws_gmm.json").read_text())
        same = {key: saved["meta"][key] == getattr(args, key) for key in ("steps", "seeds", "lr", "log_every")}
        if not all(same.values()):
            other = ", ".join(f"{k} {saved['meta'][k]}" for k, ok in same.items() if not ok)
            parser.error(f"--merge: {args.out / 'rws_gmm.json'} was run with other settings ({other})")
        chosen = {(m, k) for m in args.method or METHODS for k in args.num_samples or [2, 5, 10, 20]}
        records = [r for r in saved["records"] if (r["method"], r["num_samples"]) not in chosen]
    for method in args.method or METHODS:
        for k in args.num_samples or [2, 5, 10, 20]:
            rec = run_config(method, k, seeds=args.seeds, steps=args.steps, log_every=args.log_every, lr=args.lr)
            print(f"{method:14s} K={k:3d} p_err={np.mean(np.asarray(rec['p_error'])[:, -1]):.3f} "
                  f"q_err={np.mean(np.asarray(rec['q_error'])[:, -1]):.3f} ({rec['seconds']:.0f} s)", flush=True)
            records.append(rec)
            records.sort(key=lambda r: (METHODS.index(r["method"]), r["num_samples"]))
            write_outputs(records, args, args.out)   # after every configuration: a cut-short run keeps its results


if __name__ == "__main__":
    main()
