"""NumPyro's own models through the bridge, against NumPyro's SVI on the same model (issue 22, item 7).

Three models as NumPyro's repository writes them (our own versions):

- the VAE of ``examples/vae.py`` (stax networks through ``numpyro.module``, a ``"batch"`` plate) on the
  bundled sklearn digits, binarised at 0.5: jaxelbo IWAE-DReG (``from_numpyro(data_plate="batch")``)
  against SVI with ``RenyiELBO(alpha=0)`` (the same IWAE bound, the plain gradient) and ``Trace_ELBO``;
  scored by ``je.log_likelihood`` (K = 1000) on held-out digits;
- a Gaussian mixture with Bayesian globals (Dirichlet weights, Normal means in a ``"components"``
  plate, Categorical assignments in a ``"data"`` plate, as ``test/contrib/test_funsor.py``): jaxelbo
  ``global_local_iwae`` (an ELBO over the globals, a K-sample IWAE bound per point with VIMCO for the
  assignments) against ``TraceEnum_ELBO`` (the assignments enumerated; needs funsor, else skipped),
  ``Trace_ELBO`` on the same model with the assignments marginalised by hand (``MixtureSameFamily``:
  the same objective as enumeration) and ``TraceGraph_ELBO`` with jaxelbo's guide; every trained global
  guide scored by the same evaluation: the assignments summed exactly, the globals by S draws of q;
- eight schools from NumPyro's README, centred and non-centred (``TransformReparam``), with
  ``AutoNormal``: IWAE-DReG on the data set as one example against ``Trace_ELBO`` and
  ``RenyiELBO(alpha=0)``, scored against the exact log evidence (quadrature over tau).

Every contender trains from the same initial parameters with the same optimiser, the same batches and
the same number of steps, in blocks interleaved in one process (the order rotates every round); the
step time is the median over blocks. "User lines" counts the non-blank lines a user writes beyond the
NumPyro model and guide to get a training step (the bridge and the loss, or the SVI object).

    python benchmarks/numpyro_models.py --out benchmarks/results   # numpyro_models.{json,md}
    python benchmarks/numpyro_models.py --fast                      # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax.example_libraries import stax
from numpyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceGraph_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.reparam import TransformReparam

import jaxelbo as je
from jaxelbo.numpyro import constrained_params, from_numpyro, global_local_iwae, unconstrained_params

positive = dist.constraints.positive


# --------------------------------------------------------------------------------------
# Interleaved training: every contender's steps in timed blocks, round-robin
# --------------------------------------------------------------------------------------


def interleaved(contenders: dict[str, tuple[Callable, object]], num_steps: int, block: int) -> tuple[dict, dict]:
    """Trains each ``name: (step(state, i) -> state, state0)`` for ``num_steps`` steps, in blocks of
    ``block`` steps taken in turn (the order rotates each round; the first block of each is warm-up and
    compiles). Returns the final states and the median seconds per step over the timed blocks."""
    names = list(contenders)
    states = {n: contenders[n][1] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r, start in enumerate(range(0, num_steps, block)):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            step = contenders[n][0]
            t0 = time.perf_counter()
            state = states[n]
            for i in range(start, min(start + block, num_steps)):
                state = step(state, i)
            states[n] = jax.block_until_ready(state)
            if r > 0:
                times[n].append((time.perf_counter() - t0) / (min(start + block, num_steps) - start))
    return states, {n: float(np.median(t)) if t else float("nan") for n, t in times.items()}


def user_lines(*fns: Callable) -> int:
    """Non-blank, non-comment lines of the functions' bodies (docstrings and ``def`` lines excluded)."""
    total = 0
    for fn in fns:
        lines = inspect.getsource(fn).splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("def ")) + 1
        body = [ln.strip() for ln in lines[start:] if ln.strip() and not ln.strip().startswith("#")]
        if body and body[0].startswith('"""'):
            end = next(i for i, ln in enumerate(body) if ln.endswith('"""') and (i > 0 or ln.count('"""') == 2))
            body = body[end + 1:]
        total += len(body)
    return total


def optax_step(loss_fn: Callable, optimizer, batch: Callable) -> Callable:
    @jax.jit
    def step(state, i, x):
        params, opt_state = state
        grads = jax.grad(lambda p: loss_fn(p, jax.random.fold_in(jax.random.key(17), i), x)[0])(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    return lambda state, i: step(state, i, batch(i))


def same_init(params: dict) -> dict:
    """jaxelbo's initial parameters as the flat unconstrained dict of SVI's optimiser state (the same
    ``biject_to`` maps both), so that every contender starts from the same point."""
    return {**params["model"], **params["guide"]}


def svi_step(svi: SVI, batch: Callable) -> Callable:
    update = jax.jit(svi.update)
    return lambda state, i: update(state, batch(i))[0]


# --------------------------------------------------------------------------------------
# 1. The VAE of NumPyro's examples/vae.py on sklearn digits
# --------------------------------------------------------------------------------------


def encoder(hidden_dim, z_dim):
    return stax.serial(stax.Dense(hidden_dim, W_init=stax.randn()), stax.Softplus, stax.FanOut(2),
                       stax.parallel(stax.Dense(z_dim, W_init=stax.randn()),
                                     stax.serial(stax.Dense(z_dim, W_init=stax.randn()), stax.Exp)))


def decoder(hidden_dim, out_dim):
    return stax.serial(stax.Dense(hidden_dim, W_init=stax.randn()), stax.Softplus,
                       stax.Dense(out_dim, W_init=stax.randn()), stax.Sigmoid)


def vae_model(batch, hidden_dim=128, z_dim=8):
    batch = jnp.reshape(batch, (batch.shape[0], -1))
    batch_dim, out_dim = jnp.shape(batch)
    decode = numpyro.module("decoder", decoder(hidden_dim, out_dim), (batch_dim, z_dim))
    with numpyro.plate("batch", batch_dim):
        z = numpyro.sample("z", dist.Normal(0, 1).expand([z_dim]).to_event(1))
        return numpyro.sample("obs", dist.Bernoulli(decode(z)).to_event(1), obs=batch)


def vae_guide(batch, hidden_dim=128, z_dim=8):
    batch = jnp.reshape(batch, (batch.shape[0], -1))
    batch_dim, out_dim = jnp.shape(batch)
    encode = numpyro.module("encoder", encoder(hidden_dim, z_dim), (batch_dim, out_dim))
    z_loc, z_std = encode(batch)
    with numpyro.plate("batch", batch_dim):
        return numpyro.sample("z", dist.Normal(z_loc, z_std).to_event(1))


def vae_jaxelbo(x_train, num_samples, optimizer, batch):
    """What a user writes for a jaxelbo IWAE-DReG step on NumPyro's VAE."""
    model, guide, params = from_numpyro(vae_model, vae_guide, jax.random.key(0), x_train, data_plate="batch")
    loss_fn = je.iwae(model, guide, num_samples=num_samples, estimator="dreg")
    return optax_step(loss_fn, optimizer, batch), (params, optimizer.init(params)), (model, guide)


def vae_svi(elbo, optimizer, batch, x0):
    """What a user writes for NumPyro's SVI step on the same VAE."""
    svi = SVI(vae_model, vae_guide, optimizer, elbo)
    return svi_step(svi, batch), svi.init(jax.random.key(0), x0), svi


def digits_binary():
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0 > 0.5).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    return jnp.asarray(x[order[:1500]]), jnp.asarray(x[order[1500:]])


def bench_vae(cfg: dict, log: Callable) -> dict:
    x_train, x_test = digits_binary()
    num_train = int(cfg.get("vae_train", len(x_train)))
    x_train = x_train[:num_train]
    batch_size, k = cfg["vae_batch"], cfg["vae_k"]
    rng = np.random.default_rng(1)
    perms = np.concatenate([rng.permutation(num_train) for _ in range(cfg["vae_steps"] * batch_size // num_train + 2)])

    def batch(i):
        return x_train[perms[i * batch_size:(i + 1) * batch_size]]

    optimizer = optax.adam(cfg["vae_lr"])
    step_je, state_je, (model, guide) = vae_jaxelbo(x_train, k, optimizer, batch)
    contenders = {f"jaxelbo iwae / dreg, K = {k}": (step_je, state_je)}
    svis = {}
    for name, elbo in ((f"SVI RenyiELBO(alpha=0), K = {k}", RenyiELBO(alpha=0.0, num_particles=k)),
                       ("SVI Trace_ELBO", Trace_ELBO())):
        step, state, svi = vae_svi(elbo, optimizer, batch, batch(0))
        svis[name] = svi
        contenders[name] = (step, state)
    init = same_init(state_je[0])
    for name, svi in svis.items():
        state = contenders[name][1]
        contenders[name] = (contenders[name][0], state._replace(optim_state=svi.optim.init(
            {n: init[n] for n in svi.get_params(state)})))
    states, step_s = interleaved(contenders, cfg["vae_steps"], cfg["block"])
    evaluate = jax.jit(lambda p: jnp.mean(je.log_likelihood(model, guide, p, jax.random.key(5), x_test,
                                                            num_samples=cfg["eval_k"])))
    bound = jax.jit(lambda p: -je.iwae(model, guide, num_samples=k)(p, jax.random.key(6), x_test)[0])
    elbo = jax.jit(lambda p: -je.elbo(model, guide, num_samples=1)(p, jax.random.key(7), x_test)[0])
    base = step_s[f"SVI RenyiELBO(alpha=0), K = {k}"]
    rows = []
    for name, state in states.items():
        if name in svis:
            params = unconstrained_params(svis[name].get_params(state), vae_model, vae_guide, x_train)
            lines = user_lines(vae_svi, svi_step)
        else:
            params, lines = state[0], user_lines(vae_jaxelbo, optax_step)
        rows.append({"contender": name, "test_log_px": float(evaluate(params)), f"test_iwae_{k}": float(bound(params)),
                     "test_elbo": float(elbo(params)), "step_ms": 1e3 * step_s[name],
                     "step_ratio_to_svi_renyi": step_s[name] / base, "user_lines": lines})
        log(f"  vae {rows[-1]}")
    return {"model": "NumPyro examples/vae.py (stax, numpyro.module) on sklearn digits binarised at 0.5",
            "bound": f"IWAE, K = {k}, per digit (a 'batch' plate: one log-weight per digit)",
            "num_train": num_train, "num_test": int(len(x_test)), "batch_size": batch_size,
            "steps": cfg["vae_steps"], "optimizer": f"adam({cfg['vae_lr']})", "hidden_dim": 128, "z_dim": 8,
            "eval": f"je.log_likelihood, K = {cfg['eval_k']}, mean over test digits (nats per digit)",
            "model_guide_lines": user_lines(vae_model) + user_lines(vae_guide) + user_lines(encoder)
            + user_lines(decoder), "rows": rows}


# --------------------------------------------------------------------------------------
# 2. A Gaussian mixture with Bayesian globals
# --------------------------------------------------------------------------------------

NUM_COMPONENTS = 3
TRUE_WEIGHTS = np.array([0.5, 0.3, 0.2])
TRUE_LOCS = np.array([-3.0, 0.0, 2.5])


def gmm(data):
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(NUM_COMPONENTS)))
    with numpyro.plate("components", NUM_COMPONENTS):
        locs = numpyro.sample("locs", dist.Normal(0.0, 5.0))
    with numpyro.plate("data", data.shape[0]):
        assignment = numpyro.sample("assignment", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[assignment], 1.0), obs=data)


def weights_guide(loc, scale):  # a Normal mapped onto the simplex, as AutoNormal guides a Dirichlet site
    return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), dist.transforms.StickBreakingTransform())


def gmm_global_guide(data):
    w_loc = numpyro.param("weights_loc", jnp.zeros(NUM_COMPONENTS - 1))
    w_scale = numpyro.param("weights_scale", jnp.full(NUM_COMPONENTS - 1, 0.3), constraint=positive)
    numpyro.sample("weights", weights_guide(w_loc, w_scale))
    loc = numpyro.param("locs_loc", jnp.array([-1.0, 0.0, 1.0]))
    scale = numpyro.param("locs_scale", jnp.full(NUM_COMPONENTS, 0.3), constraint=positive)
    with numpyro.plate("components", NUM_COMPONENTS):
        numpyro.sample("locs", dist.Normal(loc, scale))


def gmm_guide(data):  # the globals as above, an amortised classifier q(c_n | x_n) for the assignments
    gmm_global_guide(data)
    a = numpyro.param("a", jnp.zeros(NUM_COMPONENTS))
    b = numpyro.param("b", jnp.zeros(NUM_COMPONENTS))
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("assignment", dist.Categorical(logits=data[:, None] * a + b))


def gmm_marginal(data):  # the same model with the assignments summed out by hand
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(NUM_COMPONENTS)))
    with numpyro.plate("components", NUM_COMPONENTS):
        locs = numpyro.sample("locs", dist.Normal(0.0, 5.0))
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("obs", dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(locs, 1.0)), obs=data)


def gmm_jaxelbo(data, num_samples, optimizer):
    """What a user writes for a jaxelbo step on the mixture: global_local_iwae, VIMCO for the assignments."""
    loss_fn, params = global_local_iwae(gmm, gmm_guide, jax.random.key(0), data, data_plate="data",
                                        num_samples=num_samples, estimator="vimco")
    return optax_step(loss_fn, optimizer, lambda i: data), (params, optimizer.init(params)), loss_fn


def gmm_svi(model, guide, elbo, optimizer, data):
    """What a user writes for NumPyro's SVI step on the mixture."""
    svi = SVI(model, guide, optimizer, elbo)
    return svi_step(svi, lambda i: data), svi.init(jax.random.key(0), data), svi


def gmm_data(num: int, seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    c = rng.choice(NUM_COMPONENTS, size=num, p=TRUE_WEIGHTS)
    return jnp.asarray(TRUE_LOCS[c] + rng.normal(size=num), jnp.float32)


def gmm_log_lik(weights, locs, x):
    """log p(x_n | weights, locs) for each n, the assignment summed exactly."""
    return jax.nn.logsumexp(jnp.log(weights) + dist.Normal(locs, 1.0).log_prob(x[:, None]), axis=-1)


def gmm_evaluate(values: dict, train: jax.Array, test: jax.Array, num_draws: int) -> dict:
    """The trained global guide q(beta), assignments summed exactly, globals by ``num_draws`` draws of q."""
    k1, k2 = jax.random.split(jax.random.key(11))
    q_w = weights_guide(values["weights_loc"], values["weights_scale"])
    q_l = dist.Normal(values["locs_loc"], values["locs_scale"]).to_event(1)
    w, locs = q_w.sample(k1, (num_draws,)), q_l.sample(k2, (num_draws,))
    log_prior = dist.Dirichlet(jnp.ones(NUM_COMPONENTS)).log_prob(w) + dist.Normal(0.0, 5.0).log_prob(locs).sum(-1)
    log_q = q_w.log_prob(w) + q_l.log_prob(locs)
    train_ll = jax.vmap(lambda w, m: gmm_log_lik(w, m, train).sum())(w, locs)
    log_ratio = log_prior - log_q + train_ll
    test_ll = jax.vmap(lambda w, m: gmm_log_lik(w, m, test))(w, locs)          # (S, N_test)
    predictive = jax.nn.logsumexp(test_ll, axis=0) - math.log(num_draws)
    return {"train_elbo_collapsed": float(jnp.mean(log_ratio)),
            "train_log_evidence_is": float(jax.nn.logsumexp(log_ratio) - math.log(num_draws)),
            "khat_is": float(je.psis_khat(log_ratio)),
            "test_log_predictive_per_point": float(jnp.mean(predictive)),
            "weights_mean": [float(v) for v in w.mean(0)], "locs_mean": [float(v) for v in values["locs_loc"]]}


def bench_gmm(cfg: dict, log: Callable) -> dict:
    train, test = gmm_data(cfg["gmm_train"], 0), gmm_data(2000, 1)
    k = cfg["gmm_k"]
    optimizer = optax.adam(cfg["gmm_lr"])
    step_je, state_je, loss_fn = gmm_jaxelbo(train, k, optimizer)
    contenders = {f"jaxelbo global_local_iwae / vimco, K = {k}": (step_je, state_je)}
    svis = {}
    variants = [("SVI Trace_ELBO, assignments marginalised (MixtureSameFamily)", gmm_marginal, gmm_global_guide,
                 Trace_ELBO()),
                ("SVI TraceGraph_ELBO, jaxelbo's guide", gmm, gmm_guide, TraceGraph_ELBO())]
    try:
        import funsor  # noqa: F401
        from numpyro.contrib.funsor import config_enumerate
        from numpyro.infer import TraceEnum_ELBO

        variants.insert(0, ("SVI TraceEnum_ELBO, assignments enumerated", config_enumerate(gmm), gmm_global_guide,
                            TraceEnum_ELBO()))
    except ImportError:
        log("  funsor is not installed: no TraceEnum_ELBO row")
    init = same_init(state_je[0])
    for name, model, guide, elbo in variants:
        step, state, svi = gmm_svi(model, guide, elbo, optimizer, train)
        svis[name] = svi
        state = state._replace(optim_state=svi.optim.init(
            {n: init[n] for n in svi.get_params(state)}))   # the same initial parameters
        contenders[name] = (step, state)
    states, step_s = interleaved(contenders, cfg["gmm_steps"], cfg["block"])
    bound = jax.jit(lambda p, key: len(train) * jnp.mean(loss_fn(p, key, train)[1]["bound"]))
    base_name = next(iter(svis))
    rows = []
    true_test = float(jnp.mean(gmm_log_lik(jnp.asarray(TRUE_WEIGHTS), jnp.asarray(TRUE_LOCS), test)))
    for name, state in states.items():
        if name in svis:
            values = svis[name].get_params(state)
            lines = user_lines(gmm_svi, svi_step)
        else:
            values = constrained_params(state[0], gmm, gmm_guide, train)
            lines = user_lines(gmm_jaxelbo, optax_step)
        row = {"contender": name, **gmm_evaluate(values, train, test, cfg["eval_draws"]),
               "step_ms": 1e3 * step_s[name], "step_ratio_to_first_svi": step_s[name] / step_s[base_name],
               "user_lines": lines}
        if name not in svis:
            row[f"train_bound_k{k}"] = float(np.mean([bound(state[0], jax.random.key(100 + s)) for s in range(20)]))
        rows.append(row)
        log(f"  gmm {row}")
    return {"model": "Gaussian mixture, 3 components in 1D: Dirichlet(1) weights, Normal(0, 5) means, "
                     "Categorical assignments in a 'data' plate, unit noise",
            "bound": f"ELBO over the globals (1 draw) + IWAE_{k} per point over the assignment (VIMCO)",
            "guide": "weights: a Normal through StickBreakingTransform (as AutoNormal); means: Normal; "
                     "assignments: an amortised softmax classifier, logits a * x + b",
            "num_train": int(len(train)), "num_test": int(len(test)), "steps": cfg["gmm_steps"],
            "batch": "full data set", "optimizer": f"adam({cfg['gmm_lr']})",
            "eval": f"assignments summed exactly, globals by {cfg['eval_draws']} draws of q: the collapsed ELBO, "
                    "an importance-sampled log p(x_1:N) with its k-hat, the held-out log predictive per point",
            "true_params_test_log_lik_per_point": true_test,
            "model_guide_lines": user_lines(gmm) + user_lines(gmm_guide) + user_lines(gmm_global_guide),
            "step_ratio_baseline": base_name, "rows": rows}


# --------------------------------------------------------------------------------------
# 3. Eight schools, centred and non-centred
# --------------------------------------------------------------------------------------

J = 8
Y_SCHOOLS = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA_SCHOOLS = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(J, sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("J", J):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(J, sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("J", J):
        with numpyro.handlers.reparam(config={"theta": TransformReparam()}):
            theta = numpyro.sample("theta", dist.TransformedDistribution(
                dist.Normal(0.0, 1.0), dist.transforms.AffineTransform(mu, tau)))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def exact_log_evidence(y, sigma, num_nodes=20_000):
    """log p(y): theta and mu in closed form, tau = 5 tan(u) on a midpoint grid of u in (0, pi/2)."""
    y, sigma = np.asarray(y, np.float64), np.asarray(sigma, np.float64)
    tau = 5 * np.tan((np.arange(num_nodes) + 0.5) / num_nodes * np.pi / 2)[:, None]
    v = sigma**2 + tau**2
    prec, b = 1 / 25 + np.sum(1 / v, -1), np.sum(y / v, -1)
    log_f = (-0.5 * np.sum(np.log(2 * np.pi * v), -1) - 0.5 * np.sum(y**2 / v, -1)
             - 0.5 * np.log(2 * np.pi * 25) + 0.5 * np.log(2 * np.pi / prec) + 0.5 * b**2 / prec)
    return float(log_f.max() + np.log(np.mean(np.exp(log_f - log_f.max()))))


def schools_jaxelbo(school_model, auto, optimizer):
    """What a user writes for a jaxelbo IWAE-DReG step on eight schools (the data set is one example)."""
    model, guide, params = from_numpyro(school_model, auto, jax.random.key(0), Y_SCHOOLS)
    loss_fn = je.iwae(model, guide, num_samples=16, estimator="dreg")
    return optax_step(loss_fn, optimizer, lambda i: Y_SCHOOLS[None]), (params, optimizer.init(params)), (model, guide)


def schools_svi(school_model, auto, elbo, optimizer):
    """What a user writes for NumPyro's SVI step on eight schools."""
    svi = SVI(school_model, auto, optimizer, elbo)
    return svi_step(svi, lambda i: Y_SCHOOLS), svi.init(jax.random.key(0), Y_SCHOOLS), svi


def bench_schools(cfg: dict, log: Callable) -> dict:
    exact = exact_log_evidence(Y_SCHOOLS, SIGMA_SCHOOLS)
    out = {"model": "eight schools (NumPyro's README), AutoNormal guides", "exact_log_evidence": exact,
           "bound": "IWAE, K = 16, the data set as one example", "steps": cfg["school_steps"],
           "optimizer": "adam(0.01)", "eval": f"je.log_likelihood, K = {cfg['eval_k_schools']}, with k-hat",
           "variants": {}}
    for label, fn in (("centred", eight_schools), ("non-centred", eight_schools_noncentered)):
        def school_model(y, fn=fn):
            fn(J, SIGMA_SCHOOLS, y)

        auto = AutoNormal(school_model)
        optimizer = optax.adam(0.01)
        step_je, state_je, (model, guide) = schools_jaxelbo(school_model, auto, optimizer)
        contenders = {"jaxelbo iwae / dreg, K = 16": (step_je, state_je)}
        svis = {}
        init = same_init(state_je[0])
        for name, elbo in (("SVI Trace_ELBO", Trace_ELBO()),
                           ("SVI RenyiELBO(alpha=0), K = 16", RenyiELBO(alpha=0.0, num_particles=16))):
            step, state, svi = schools_svi(school_model, auto, elbo, optimizer)
            state = state._replace(optim_state=svi.optim.init({n: init[n] for n in svi.get_params(state)}))
            svis[name] = svi
            contenders[name] = (step, state)
        states, step_s = interleaved(contenders, cfg["school_steps"], cfg["block"])
        evidence = jax.jit(lambda p, model=model, guide=guide: je.log_likelihood(
            model, guide, p, jax.random.key(4), Y_SCHOOLS[None], num_samples=cfg["eval_k_schools"], chunk_size=None,
            return_khat=True))
        elbo = jax.jit(lambda p, model=model, guide=guide: -je.elbo(model, guide, num_samples=cfg["eval_k_schools"])(
            p, jax.random.key(5), Y_SCHOOLS[None])[0])
        rows = []
        for name, state in states.items():
            if name in svis:
                params = unconstrained_params(svis[name].get_params(state), school_model, auto, Y_SCHOOLS)
                lines = user_lines(schools_svi, svi_step)
            else:
                params, lines = state[0], user_lines(schools_jaxelbo, optax_step)
            ll, khat = evidence(params)
            rows.append({"contender": name, "elbo": float(elbo(params)), "log_evidence": float(ll[0]),
                         "minus_exact": float(ll[0]) - exact, "khat": float(khat[0]), "step_ms": 1e3 * step_s[name],
                         "step_ratio_to_svi_trace_elbo": step_s[name] / step_s["SVI Trace_ELBO"],
                         "user_lines": lines})
            log(f"  schools {label} {rows[-1]}")
        out["variants"][label] = rows
    return out


# --------------------------------------------------------------------------------------


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# NumPyro's own models: jaxelbo through the bridge against NumPyro's SVI", "",
             f"{meta['date']}, device: {meta['device']}, load average at start {meta['load_start']}, "
             f"at end {meta['load_end']}; jax {meta['jax']}, numpyro {meta['numpyro']}, "
             f"jaxelbo {meta['jaxelbo']}, python {meta['python']}. Written by `benchmarks/numpyro_models.py`.", "",
             *[f"Section {k[5:]} rerun {v}, load average at start {meta.get('load_start_' + k[5:])}, at end "
               f"{meta.get('load_end_' + k[5:])}." for k, v in meta.items() if k.startswith("date_")], "",
             "Step times are medians over blocks interleaved in one process, the same batches for every "
             "contender; \"user lines\" counts what a user writes beyond the NumPyro model and guide.", ""]
    v = result["vae"]
    lines += ["## 1. VAE (NumPyro's examples/vae.py)", "",
              f"{v['model']}; {v['num_train']} training and {v['num_test']} test digits, batch {v['batch_size']}, "
              f"{v['steps']} steps of {v['optimizer']}, hidden {v['hidden_dim']}, latent {v['z_dim']}. Bound: "
              f"{v['bound']}. Evaluation: {v['eval']}. Model and guide: {v['model_guide_lines']} lines.", "",
              "| contender | test log p(x) | test IWAE | test ELBO | ms / step | step / RenyiELBO's | user lines |",
              "|---|---|---|---|---|---|---|"]
    for r in v["rows"]:
        iw = next(val for key, val in r.items() if key.startswith("test_iwae"))
        lines.append(f"| {r['contender']} | {r['test_log_px']:.2f} | {iw:.2f} | {r['test_elbo']:.2f} | "
                     f"{r['step_ms']:.2f} | {r['step_ratio_to_svi_renyi']:.2f} | {r['user_lines']} |")
    g = result["gmm"]
    lines += ["", "## 2. Gaussian mixture with Bayesian globals", "",
              f"{g['model']}; {g['num_train']} training points, {g['num_test']} held out; {g['steps']} steps of "
              f"{g['optimizer']}, {g['batch']}. Bound: {g['bound']}. Evaluation: {g['eval']}. The true "
              f"parameters' held-out log-likelihood: {g['true_params_test_log_lik_per_point']:.4f} per point. "
              f"Model and guide: {g['model_guide_lines']} lines. Step ratio against: {g['step_ratio_baseline']}.",
              "", "| contender | own bound | collapsed ELBO | IS log p(x_1:N) | k-hat | held-out log pred. / point "
              "| E_q weights | ms / step | step ratio | user lines |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in g["rows"]:
        own = next((f"{val:.2f}" for key, val in r.items() if key.startswith("train_bound")), "")
        w = ", ".join(f"{x:.2f}" for x in r["weights_mean"])
        lines.append(f"| {r['contender']} | {own} | {r['train_elbo_collapsed']:.2f} | {r['train_log_evidence_is']:.2f} "
                     f"| {r['khat_is']:.2f} | {r['test_log_predictive_per_point']:.4f} | {w} | {r['step_ms']:.2f} | "
                     f"{r['step_ratio_to_first_svi']:.2f} | {r['user_lines']} |")
    s = result["schools"]
    lines += ["", "## 3. Eight schools", "",
              f"{s['model']}; {s['steps']} steps of {s['optimizer']}; bound: {s['bound']}; evaluation: {s['eval']}. "
              f"Exact log p(y) = {s['exact_log_evidence']:.3f}.", "",
              "| model | contender | ELBO | log p(y) est. | minus exact | k-hat | ms / step | step / Trace_ELBO's "
              "| user lines |", "|---|---|---|---|---|---|---|---|---|"]
    for label, rows in s["variants"].items():
        for r in rows:
            lines.append(f"| {label} | {r['contender']} | {r['elbo']:.2f} | {r['log_evidence']:.2f} | "
                         f"{r['minus_exact']:+.2f} | {r['khat']:.2f} | {r['step_ms']:.3f} | "
                         f"{r['step_ratio_to_svi_trace_elbo']:.2f} | {r['user_lines']} |")
    return "\n".join(lines) + "\n"


FULL = {"vae_steps": 3000, "vae_batch": 128, "vae_k": 16, "vae_lr": 1e-3, "eval_k": 1000,
        "gmm_train": 600, "gmm_k": 8, "gmm_steps": 2000, "gmm_lr": 0.02, "eval_draws": 4000,
        "school_steps": 2000, "eval_k_schools": 5000, "block": 100}
FAST = {"vae_steps": 60, "vae_batch": 32, "vae_k": 4, "vae_lr": 1e-3, "eval_k": 50, "vae_train": 256,
        "gmm_train": 100, "gmm_k": 4, "gmm_steps": 60, "gmm_lr": 0.02, "eval_draws": 200,
        "school_steps": 60, "eval_k_schools": 200, "block": 20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--fast", action="store_true", help="a smoke run with small sizes")
    p.add_argument("--only", nargs="+", choices=["vae", "gmm", "schools"], default=["vae", "gmm", "schools"])
    args = p.parse_args(argv)
    cfg = FAST if args.fast else FULL
    load_start = [round(v, 2) for v in os.getloadavg()]
    result: dict = {"config": cfg}
    runners = {"vae": bench_vae, "gmm": bench_gmm, "schools": bench_schools}
    for name in args.only:
        print(f"{name} ...", flush=True)
        t0 = time.perf_counter()
        result[name] = runners[name](cfg, print)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    result["meta"] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "device": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
                                f"jax backend {jax.default_backend()}",
                      "load_start": load_start, "load_end": [round(v, 2) for v in os.getloadavg()],
                      "jax": jax.__version__, "numpyro": numpyro.__version__, "jaxelbo": je.__version__,
                      "optax": optax.__version__, "python": platform.python_version(), "fast": args.fast}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "numpyro_models" + ("-fast" if args.fast else "")
    previous = out / f"{stem}.json"
    if set(args.only) != set(runners) and previous.exists():   # a partial rerun: keep the other sections
        kept = json.loads(previous.read_text())
        result = {**kept, **result, "meta": {**kept["meta"], **{f"{k}_{'+'.join(args.only)}": v for k, v in
                                                                 result["meta"].items()}}}
        args.only = list(runners)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    if set(args.only) == {"vae", "gmm", "schools"}:
        (out / f"{stem}.md").write_text(to_markdown(result))
    print(f"wrote {out / stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
