"""Sequential bounds on real series: the Nile (local level, exact Kalman) and S&P 500 stochastic volatility.

1. **Nile** (``statsmodels.datasets.nile``, annual flow 1871-1970, T = 100; Durbin & Koopman
   2012, ch. 2): local level ``z_t = z_{t-1} + N(0, s_eta^2)``, ``x_t = z_t + N(0, s_eps^2)``,
   ``z_0 ~ N(m0, P0)`` with ``P0`` fixed (1e4 in flow units; the data are divided by 100).
   The maximum-likelihood parameters come from the Kalman filter; statsmodels'
   ``UnobservedComponents("llevel")`` (diffuse start) is reported beside it. Then three
   (model, proposal) pairs are trained at an equal budget of 16 particles: ELBO (16 single
   particles), IWAE over trajectories (K = 16, never resampling) and FIVO (K = 16, resampling
   always), each with the learned proposal ``N(z_{t-1} + k1 (x_t - z_{t-1}) + k2 (x_{t+1} -
   z_{t-1}), s^2)``, and compared with the Kalman log-likelihood at the MLE.
2. **Stochastic volatility** on the monthly S&P 500 log-returns shipped with statsmodels'
   test data (Schwert's series, ``statsmodels/tsa/tests/results/SP500.csv``, T = 467, in
   percent): ``z_t = mu + phi (z_{t-1} - mu) + sigma eta``, ``x_t ~ N(0, exp(z_t))``; no closed
   form; ``log p(x)`` is estimated by FIVO with K = 4096 at each trained model.

Needs statsmodels and optax (the ``dev`` extra; ``pip install jaxelbo[data]`` for statsmodels).
Nothing is downloaded. Writes ``benchmarks/results/smc_real.json``, ``.md`` and ``.png`` (the
training curves).
``--steps`` and ``--num-replicates`` size the run (defaults: about 5 minutes on a loaded 2-core CPU).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxelbo as je

RESULTS = Path(__file__).resolve().parent / "results"
LOG_2PI = math.log(2 * math.pi)


def normal_logpdf(v, mean, log_var):
    return -0.5 * (LOG_2PI + log_var + (v - mean) ** 2 * jnp.exp(-log_var))


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


def gaussian_proposal(moments) -> je.Proposal:
    """A Gaussian proposal ``N(mean, exp(log_var))`` from ``moments(phi, t, z_prev, x) -> (mean, log_var)``."""

    def sample(phi, rng, t, z_prev, x):
        mean, log_var = moments(phi, t, z_prev, x)
        return mean + jnp.exp(0.5 * log_var) * jax.random.normal(rng, jnp.shape(mean))

    def log_prob(phi, t, z_prev, x, z):
        mean, log_var = moments(phi, t, z_prev, x)
        return normal_logpdf(z, mean, log_var)

    return je.Proposal(sample=sample, log_prob=log_prob)


def nile() -> np.ndarray:
    from statsmodels.datasets import nile as nile_data

    return np.asarray(nile_data.load_pandas().data["volume"], np.float64)


def sp500_returns() -> np.ndarray:
    text = (importlib.resources.files("statsmodels") / "tsa/tests/results/SP500.csv").read_text()
    level = np.array([float(v) for v in text.split()[1:]])
    return 100.0 * np.diff(np.log(level))


# --------------------------------------------------------------------------------------
# models and proposals
# --------------------------------------------------------------------------------------

NILE_SCALE = 100.0
NILE_LOG_P0 = math.log(1e4 / NILE_SCALE**2)


def local_level() -> je.StateSpaceModel:
    return je.StateSpaceModel(
        log_initial=lambda th, z0: normal_logpdf(z0, th["m0"], NILE_LOG_P0),
        log_transition=lambda th, t, zp, z: normal_logpdf(z, zp, th["log_q"]),
        log_emission=lambda th, t, z, xt: normal_logpdf(xt, z, th["log_r"]),
    )


def local_level_kalman(theta, x) -> jax.Array:
    """Kalman ``log p(x)`` of the local-level model for one series ``(T,)`` (in scaled units)."""
    ssm = je.models.linear_gaussian_ssm
    full = {
        "A": jnp.eye(1),
        "C": jnp.eye(1),
        "log_q": theta["log_q"][None],
        "log_r": theta["log_r"][None],
        "m0": theta["m0"][None],
        "log_p0": jnp.full((1,), NILE_LOG_P0),
    }
    return ssm.kalman_log_marginal(full, x[None, :, None])[0]


def lookahead_proposal(prior_mean) -> je.Proposal:
    """``N(m + k1 (x_t - m) + k2 (x_{t+1} - m), s_t^2)`` with ``m`` the prior mean; ``t = 0`` has its own scale."""

    def moments(phi, t, z_prev, x):
        m = prior_mean(phi, z_prev)
        x_next = x[jnp.minimum(t + 1, x.shape[0] - 1)]
        mean = m + phi["k1"] * (x[t] - m) + phi["k2"] * (x_next - m)
        log_s = jnp.where(t == 0, phi["log_s0"], phi["log_s"])
        return mean, 2.0 * log_s

    return gaussian_proposal(moments)


def stochastic_volatility() -> je.StateSpaceModel:
    def ar(th):
        return jnp.tanh(th["atanh_phi"])

    def log_initial(th, z0):
        return normal_logpdf(z0, th["mu"], 2 * th["log_sigma"] - jnp.log1p(-(ar(th) ** 2)))

    return je.StateSpaceModel(
        log_initial=log_initial,
        log_transition=lambda th, t, zp, z: normal_logpdf(z, th["mu"] + ar(th) * (zp - th["mu"]), 2 * th["log_sigma"]),
        log_emission=lambda th, t, z, xt: normal_logpdf(xt, 0.0, z),
    )


def sv_proposal() -> je.Proposal:
    """``N(m + k1 (y_t - m) + k2 (y_{t+1} - m), s^2)`` on ``y_t = log(x_t^2 + c)``, ``m = b + a z_{t-1}``."""

    def moments(phi, t, z_prev, x):
        y = jnp.log(x**2 + 0.1)
        m = phi["b0"] if z_prev is None else phi["b"] + phi["a"] * z_prev
        y_next = y[jnp.minimum(t + 1, x.shape[0] - 1)]
        mean = m + phi["k1"] * (y[t] - m) + phi["k2"] * (y_next - m)
        return mean, 2.0 * phi["log_s"]

    return gaussian_proposal(moments)


# --------------------------------------------------------------------------------------
# bounds at an equal budget, training, evaluation
# --------------------------------------------------------------------------------------

BUDGET = 16


def bounds(model, proposal):
    """ELBO (16 single particles), IWAE-16 over trajectories, FIVO-16: ``(params, rng, x (T,)) -> (loss, bound)``."""
    elbo = je.smc_bound(model, proposal, num_particles=1)
    iwae = je.smc_bound(model, proposal, num_particles=BUDGET, resample_when="never")
    fivo = je.smc_bound(model, proposal, num_particles=BUDGET, resample_when="always")

    def wrap(fn, copies):
        def loss(params, rng, x):
            value, aux = fn(params, rng, jnp.broadcast_to(x[None], (copies,) + x.shape))
            return value, aux["bound"].mean()

        return loss

    return {"ELBO": wrap(elbo, BUDGET), "IWAE": wrap(iwae, 1), "FIVO": wrap(fivo, 1)}


def train(loss, params, x, *, steps: int, learning_rate: float, seed: int):
    import optax

    opt = optax.adam(learning_rate)

    @jax.jit
    def step(carry, key):
        p, state = carry
        (value, _), g = jax.value_and_grad(loss, has_aux=True)(p, key, x)
        updates, state = opt.update(g, state, p)
        return (optax.apply_updates(p, updates), state), value

    (params, _), values = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(jax.random.key(seed), steps))
    return params, np.asarray(values)


def evaluate(fns, params, x, num_replicates: int, seed: int) -> dict:
    keys = jax.random.split(jax.random.key(seed), num_replicates)
    out = {}
    for name, fn in fns.items():
        vals = np.asarray(jax.jit(jax.vmap(lambda k, f=fn: f(params, k, x)[1]))(keys), np.float64)
        out[name] = {"mean": float(vals.mean()), "stderr": float(vals.std(ddof=1) / math.sqrt(vals.size))}
    return out


def thin(curve: np.ndarray, points: int = 100) -> list[float]:
    """A training curve averaged over ``points`` equal windows (for the JSON and the figure)."""
    return [float(c.mean()) for c in np.array_split(np.asarray(curve, np.float64), min(points, curve.size))]


def to_float(tree) -> dict:
    return {k: float(v) for k, v in tree.items()}


# --------------------------------------------------------------------------------------
# experiments
# --------------------------------------------------------------------------------------


def run_nile(steps: int, num_replicates: int) -> dict:
    import scipy.optimize
    import statsmodels.api as sm

    raw = nile()
    x = jnp.asarray(raw / NILE_SCALE, jnp.float32)
    shift = raw.size * math.log(NILE_SCALE)  # log p(raw) = log p(scaled) - T log 100

    # Kalman MLE (float64 for the optimiser)
    x64 = np.asarray(raw / NILE_SCALE)

    def neg(v):
        th = {"log_q": jnp.asarray(v[0]), "log_r": jnp.asarray(v[1]), "m0": jnp.asarray(v[2])}
        return -local_level_kalman(th, jnp.asarray(x64, jnp.float32))

    f = jax.jit(jax.value_and_grad(neg))
    res = scipy.optimize.minimize(
        lambda v: tuple(np.asarray(a, np.float64) for a in f(jnp.asarray(v, jnp.float32))),
        np.array([0.0, 0.0, x64[0]]),
        jac=True,
        method="L-BFGS-B",
    )
    mle = {"log_q": float(res.x[0]), "log_r": float(res.x[1]), "m0": float(res.x[2])}
    kalman_mle = float(-res.fun) - shift
    uc = sm.tsa.UnobservedComponents(raw, "llevel").fit(disp=False)

    model = local_level()
    proposal = lookahead_proposal(lambda phi, zp: phi["m0"] if zp is None else zp)
    fns = bounds(model, proposal)
    theta0 = {"log_q": jnp.asarray(0.0), "log_r": jnp.asarray(0.0), "m0": jnp.asarray(float(x[0]))}
    phi0 = {
        "k1": jnp.asarray(0.5),
        "k2": jnp.asarray(0.0),
        "log_s": jnp.asarray(0.0),
        "log_s0": jnp.asarray(0.0),
        "m0": jnp.asarray(float(x[0])),
    }
    trained = {}
    for i, (name, fn) in enumerate(fns.items()):
        t0 = time.perf_counter()
        params, curve = train(fn, {"model": theta0, "guide": phi0}, x, steps=steps, learning_rate=0.02, seed=i)
        kal = float(local_level_kalman(params["model"], x)) - shift
        ev = evaluate(fns, params, x, num_replicates, seed=100 + i)
        trained[name] = {
            "theta": to_float(params["model"]),
            "phi": to_float(params["guide"]),
            "kalman_log_likelihood": kal,
            "bounds": {k: {"mean": v["mean"] - shift, "stderr": v["stderr"]} for k, v in ev.items()},
            "final_train_loss": float(curve[-50:].mean()) + shift,
            "curve_bound": [-v - shift for v in thin(curve)],
            "seconds": time.perf_counter() - t0,
        }
    # the bounds at the MLE model with the FIVO-trained proposal
    at_mle = evaluate(
        fns,
        {
            "model": {k: jnp.asarray(v, jnp.float32) for k, v in mle.items()},
            "guide": {k: jnp.asarray(v) for k, v in trained["FIVO"]["phi"].items()},
        },
        x,
        num_replicates,
        seed=7,
    )
    return {
        "T": int(raw.size),
        "kalman_mle": {
            "params": mle,
            "log_likelihood": kalman_mle,
            "sigma2_eta": math.exp(mle["log_q"]) * NILE_SCALE**2,
            "sigma2_eps": math.exp(mle["log_r"]) * NILE_SCALE**2,
        },
        "statsmodels_diffuse": {"log_likelihood": float(uc.llf), "params": [float(p) for p in uc.params]},
        "trained": trained,
        "bounds_at_mle_with_fivo_proposal": {
            k: {"mean": v["mean"] - shift, "stderr": v["stderr"]} for k, v in at_mle.items()
        },
    }


def run_sv(steps: int, num_replicates: int) -> dict:
    r = sp500_returns()
    x = jnp.asarray(r - r.mean(), jnp.float32)
    model, proposal = stochastic_volatility(), sv_proposal()
    fns = bounds(model, proposal)
    big = je.smc_bound(model, proposal, num_particles=4096, resampling="systematic", resample_when=0.5)
    theta0 = {"mu": jnp.asarray(float(np.log(r.var()))), "atanh_phi": jnp.asarray(1.5), "log_sigma": jnp.asarray(-1.0)}
    phi0 = {
        "a": jnp.asarray(0.9),
        "b": jnp.asarray(0.1 * float(np.log(r.var()))),
        "b0": theta0["mu"],
        "k1": jnp.asarray(0.1),
        "k2": jnp.asarray(0.0),
        "log_s": jnp.asarray(-1.0),
    }
    trained = {}
    for i, (name, fn) in enumerate(fns.items()):
        t0 = time.perf_counter()
        params, curve = train(fn, {"model": theta0, "guide": phi0}, x, steps=steps, learning_rate=0.01, seed=10 + i)
        ev = evaluate(fns, params, x, num_replicates, seed=200 + i)
        keys = jax.random.split(jax.random.key(300 + i), 8)
        ref = np.asarray(jax.jit(jax.vmap(lambda k, p=params: big(p, k, x[None])[1]["bound"][0]))(keys), np.float64)
        trained[name] = {
            "theta": to_float(params["model"]),
            "phi": to_float(params["guide"]),
            "phi_ar": float(np.tanh(params["model"]["atanh_phi"])),
            "bounds": ev,
            "log_likelihood_fivo4096": {
                "mean": float(ref.mean()),
                "stderr": float(ref.std(ddof=1) / math.sqrt(ref.size)),
            },
            "curve_bound": [-v for v in thin(curve)],
            "seconds": time.perf_counter() - t0,
        }
    return {"T": int(x.size), "series": "S&P 500 monthly log-returns (Schwert), percent, demeaned", "trained": trained}


def to_markdown(result: dict) -> str:
    env = result["environment"]
    dev = env["device"]
    lines = [
        f"# Sequential bounds on real series ({dev['platform']}, {dev.get('cpu')}, {dev.get('cpu_count')} cores)",
        "",
        f"Date {env['date']}, wall {result['wall_seconds']:.0f} s, {result['config']}.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".",
        "",
    ]
    n = result["nile"]
    lines += [
        "## Nile, local level (T = 100, flow units)",
        "",
        f"Kalman MLE (P0 = 1e4 start): log p(x) = **{n['kalman_mle']['log_likelihood']:.2f}**, "
        f"sigma2_eta = {n['kalman_mle']['sigma2_eta']:.0f}, sigma2_eps = {n['kalman_mle']['sigma2_eps']:.0f}. "
        f"statsmodels UnobservedComponents (diffuse start): {n['statsmodels_diffuse']['log_likelihood']:.2f}, "
        f"params {[round(p) for p in n['statsmodels_diffuse']['params']]}.",
        "",
        "| trained with | sigma2_eta | sigma2_eps | Kalman log p at its theta | ELBO | IWAE-16 | FIVO-16 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in n["trained"].items():
        b = t["bounds"]
        lines.append(
            f"| {name} | {math.exp(t['theta']['log_q']) * NILE_SCALE**2:.0f} | "
            f"{math.exp(t['theta']['log_r']) * NILE_SCALE**2:.0f} | {t['kalman_log_likelihood']:.2f} | "
            + " | ".join(f"{b[k]['mean']:.2f} ± {b[k]['stderr']:.2f}" for k in ("ELBO", "IWAE", "FIVO"))
            + " |"
        )
    m = n["bounds_at_mle_with_fivo_proposal"]
    lines += [
        "",
        "At the MLE theta with the FIVO-trained proposal: "
        + ", ".join(f"{k} {v['mean']:.2f} ± {v['stderr']:.2f}" for k, v in m.items())
        + f" (Kalman {n['kalman_mle']['log_likelihood']:.2f}).",
        "",
    ]
    s = result["sv"]
    lines += [
        f"## Stochastic volatility, {s['series']} (T = {s['T']})",
        "",
        "| trained with | mu | phi | sigma | ELBO | IWAE-16 | FIVO-16 | log p (FIVO-4096) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in s["trained"].items():
        b = t["bounds"]
        ll = t["log_likelihood_fivo4096"]
        lines.append(
            f"| {name} | {t['theta']['mu']:.2f} | {t['phi_ar']:.3f} | {math.exp(t['theta']['log_sigma']):.3f} | "
            + " | ".join(f"{b[k]['mean']:.2f} ± {b[k]['stderr']:.2f}" for k in ("ELBO", "IWAE", "FIVO"))
            + f" | {ll['mean']:.2f} ± {ll['stderr']:.2f} |"
        )
    lines += [
        "",
        "Bounds: mean ± standard error over replicates at the trained parameters; equal budget of 16 "
        "particles (ELBO: the mean of 16 single-particle bounds).",
        "",
    ]
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    """Training curves (the training bound, window means) of the three fits, Nile and SV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = int(result["config"].split()[0])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (key, title) in zip(axes, (("nile", "Nile, local level"), ("sv", "S&P 500, stochastic volatility")),
                                strict=True):
        for name, t in result[key]["trained"].items():
            curve = np.asarray(t["curve_bound"])
            ax.plot(np.linspace(0, steps, curve.size), curve, label=f"trained with {name}")
        if key == "nile":
            ll = result["nile"]["kalman_mle"]["log_likelihood"]
            ax.axhline(ll, color="k", ls="--", lw=1, label=f"Kalman MLE {ll:.2f}")
        else:
            best = max(t["log_likelihood_fivo4096"]["mean"] for t in result["sv"]["trained"].values())
            ax.axhline(best, color="k", ls="--", lw=1, label=f"best log p (FIVO-4096) {best:.2f}")
        lo = min(min(t["curve_bound"][len(t["curve_bound"]) // 5:]) for t in result[key]["trained"].values())
        top = ax.get_ylim()[1]
        ax.set_ylim(lo - 0.1 * (top - lo), top)
        ax.set(title=title, xlabel="Adam step", ylabel="training bound (16 particles)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--num-replicates", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from jaxelbo.app.environment import describe

    t0 = time.perf_counter()
    result = {
        "environment": describe(extra_packages=("statsmodels", "scipy")),
        "config": f"{args.steps} Adam steps per fit, {args.num_replicates} evaluation replicates",
        "nile": run_nile(args.steps, args.num_replicates),
        "sv": run_sv(args.steps, args.num_replicates),
    }
    result["wall_seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smc_real.json").write_text(json.dumps(result, indent=1))
    (args.out / "smc_real.md").write_text(to_markdown(result))
    figure(result, args.out / "smc_real.png")
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
