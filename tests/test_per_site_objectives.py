"""Per-site estimators beyond ``iwae``: which objectives take one, and exact checks of each.

The mixed guide and the enumeration x quadrature of ``tests/test_per_site.py`` (d in {0, 1, 2}
first, c | d reparameterised): an estimator's expectation is the sum over the 3^K discrete
states and the Gauss-Hermite nodes of eps of its gradient at each node, the loss evaluated at
exactly that node by a guide that reads its noise from a table. Unbiased estimators must match
the gradient of the expected bound to quadrature precision; ``stl`` (biased for K > 1) is the
negative control, and so is TVO's reference without its 1/K self-normalisation term.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo.objectives import jvi_bound
from jaxelbo.weights import log_mean_exp
from tests.test_per_site import GUIDE, MODEL, RNG, X, log_weights_at, params64, q_logits, table_guide

K, NODES = 2, 10
GH_EPS, GH_W = np.polynomial.hermite_e.hermegauss(NODES)
GH_W = GH_W / np.sqrt(2 * np.pi)


def ps(continuous, discrete):
    return {"continuous": continuous, "discrete": discrete}


# --------------------------------------------------------------------------------------
# The table: every public objective x per-site estimator (fast: construction only)
# --------------------------------------------------------------------------------------

SLEEPY = MODEL._replace(sample=lambda th, rng: ({"c": jnp.zeros(()), "d": jnp.zeros((), jnp.int32)}, jnp.zeros(1)))

BUILD = {
    "elbo": lambda e: je.elbo(MODEL, GUIDE, num_samples=2, estimator=e),
    "iwae": lambda e: je.iwae(MODEL, GUIDE, num_samples=2, estimator=e),
    "miwae": lambda e: je.miwae(MODEL, GUIDE, num_outer=2, num_inner=2, estimator=e),
    "ciwae": lambda e: je.ciwae(MODEL, GUIDE, num_samples=2, estimator=e),
    "piwae": lambda e: je.piwae(MODEL, GUIDE, num_outer=2, num_inner=2, estimator=e),
    "renyi": lambda e: je.renyi(MODEL, GUIDE, num_samples=2, estimator=e),
    "rws": lambda e: je.rws(MODEL, GUIDE, num_samples=2, estimator=e),
    "rws-sleep": lambda e: je.rws(SLEEPY, GUIDE, num_samples=2, insomnia=0.5, estimator=e),
    "jvi": lambda e: je.jvi(MODEL, GUIDE, num_samples=2, estimator=e),
    "tvo": lambda e: je.tvo(MODEL, GUIDE, num_samples=2, num_partitions=2, estimator=e),
    "cubo": lambda e: je.cubo(MODEL, GUIDE, num_samples=2, estimator=e),
}

#: per objective: (pathwise choices, score choices) a per-site estimator may pair
SUPPORTED = {
    "elbo": (("reparam", "stl"), ("score",)),
    "iwae": (("reparam", "stl", "dreg"), ("score", "vimco")),
    "miwae": (("reparam", "stl", "dreg"), ("score", "vimco")),
    "ciwae": (("reparam", "stl", "dreg"), ("score", "vimco")),
    "piwae": (("reparam", "dreg"), ("score", "vimco")),
    "renyi": (("reparam", "stl", "dreg"), ("score", "vimco")),
    "rws": (("dreg",), ("score",)),
    "rws-sleep": (("dreg",), ("score",)),
    "jvi": (("reparam", "dreg"), ("score",)),
    "tvo": (("reparam",), ("score",)),
    "cubo": (("reparam", "dreg"), ("score", "vimco")),
}


@pytest.mark.parametrize("name", list(BUILD))
def test_per_site_table(name):
    """Each supported pair builds; each other pair raises at construction, naming what is supported."""
    pathwise, score = SUPPORTED[name]
    for p, s in itertools.product(("reparam", "stl", "dreg"), ("score", "vimco")):
        if p in pathwise and s in score:
            loss_fn = BUILD[name](ps(p, s))
            assert f"{p}+{s}" in loss_fn.__name__
            continue
        with pytest.raises(ValueError) as info:
            BUILD[name](ps(p, s))
        msg = str(info.value)
        if p not in pathwise:
            assert f"'continuous': {p!r} is not supported; valid choices: {', '.join(pathwise)}" in msg, msg
        else:
            assert f"'discrete': {s!r} is not supported; valid choices: {', '.join(score)}" in msg, msg


def test_rws_defensive_refuses_per_site():
    with pytest.raises(ValueError, match="needs estimator 'score'"):
        je.rws(SLEEPY, GUIDE, num_samples=2, defensive=0.1, estimator=ps("dreg", "score"))


@pytest.mark.slow
def test_rws_per_site_runs_with_sleep_phi():
    loss_fn = je.rws(SLEEPY, GUIDE, num_samples=2, insomnia=0.5, estimator=ps("dreg", "score"))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params64())
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, RNG, jnp.asarray(X, jnp.float32)[None])[0]))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    assert loss_fn.__name__ == "rws_dreg+score_insomnia_loss"


def test_cli_names_why_it_takes_no_per_site_estimator():
    pytest.importorskip("flax")
    from jaxelbo.app.experiment import validate

    with pytest.raises(ValueError, match="per-site estimators are for guides with discrete sites"):
        validate({"objective": "iwae", "estimator": "continuous=dreg,discrete=vimco"})


# --------------------------------------------------------------------------------------
# Exact: enumeration over d x Gauss-Hermite quadrature over eps, float64
# --------------------------------------------------------------------------------------


def node_table():
    """Every (d-state, eps-node) combination for K samples: noise (N, K, 2), states (N, K), eps weights (N,)."""
    rows, states, weights = [], [], []
    for ds in itertools.product(range(3), repeat=K):
        for idx in itertools.product(range(NODES), repeat=K):
            rows.append([[d, GH_EPS[i]] for d, i in zip(ds, idx, strict=True)])
            states.append(ds)
            weights.append(np.prod(GH_W[list(idx)]))
    return np.array(rows), np.array(states), np.array(weights)


def expectation(fn, params, noise, states, eps_weights):
    """E_q[fn(log w~)] over the node table, differentiable in both params (q(d) included)."""
    log_qd = jax.nn.log_softmax(q_logits(params["guide"], X))
    prob = jnp.exp(jnp.sum(log_qd[states], axis=-1)) * eps_weights
    return jnp.sum(prob * jax.vmap(lambda nz: fn(log_weights_at(params, X, nz)))(noise))


def renyi_bound(alpha):
    return lambda lw: log_mean_exp((1.0 - alpha) * lw) / (1.0 - alpha)


def ciwae_bound(beta):
    return lambda lw: beta * jnp.mean(lw) + (1.0 - beta) * log_mean_exp(lw)


#: label -> (loss factory of a guide, the bound F whose expected gradient it estimates, sign of the loss)
CASES = {
    "elbo reparam+score": (lambda g: je.elbo(MODEL, g, num_samples=K, estimator=ps("reparam", "score")), jnp.mean),
    "miwae dreg+vimco": (lambda g: je.miwae(MODEL, g, num_outer=2, num_inner=1, estimator=ps("dreg", "vimco")),
                         jnp.mean),
    "ciwae dreg+vimco": (lambda g: je.ciwae(MODEL, g, num_samples=K, beta=0.3, estimator=ps("dreg", "vimco")),
                         ciwae_bound(0.3)),
    "ciwae reparam+score": (lambda g: je.ciwae(MODEL, g, num_samples=K, beta=0.3,
                                               estimator=ps("reparam", "score")), ciwae_bound(0.3)),
    "renyi dreg+score": (lambda g: je.renyi(MODEL, g, num_samples=K, alpha=0.5, estimator=ps("dreg", "score")),
                         renyi_bound(0.5)),
    "renyi reparam+vimco": (lambda g: je.renyi(MODEL, g, num_samples=K, alpha=0.5,
                                               estimator=ps("reparam", "vimco")), renyi_bound(0.5)),
    "renyi stl+vimco": (lambda g: je.renyi(MODEL, g, num_samples=K, alpha=0.5, estimator=ps("stl", "vimco")),
                        renyi_bound(0.5)),
    "jvi dreg+score": (lambda g: je.jvi(MODEL, g, num_samples=K, estimator=ps("dreg", "score")), jvi_bound),
    "cubo dreg+vimco": (lambda g: je.cubo(MODEL, g, num_samples=K, n=2.0, estimator=ps("dreg", "vimco")),
                        renyi_bound(-1.0)),
    "piwae dreg+vimco": (lambda g: je.piwae(MODEL, g, num_outer=2, num_inner=1, estimator=ps("dreg", "vimco")),
                         log_mean_exp),
    "piwae reparam+score": (lambda g: je.piwae(MODEL, g, num_outer=2, num_inner=1,
                                               estimator=ps("reparam", "score")), log_mean_exp),
    "rws dreg+score": (lambda g: je.rws(MODEL, g, num_samples=K, estimator=ps("dreg", "score")), None),
    "rws(0.5) dreg+score": (lambda g: je.rws(MODEL, g, num_samples=K, alpha=0.5, estimator=ps("dreg", "score")),
                            None),
    "rws score": (lambda g: je.rws(MODEL, g, num_samples=K, estimator="score"), None),
    "tvo reparam+score": (lambda g: je.tvo(MODEL, g, num_samples=K, partition=[0.0, 1.0],
                                           estimator=ps("reparam", "score")), None),
}


@pytest.fixture(scope="module")
def exact():
    """Each case's expected gradient (params and x) by enumeration, and the exact targets."""
    with jax.enable_x64(True):
        params = params64()
        noise, states, eps_weights = (jnp.asarray(a) for a in node_table())
        log_qd = jax.nn.log_softmax(q_logits(params["guide"], X))
        prob = jnp.exp(jnp.sum(log_qd[states], axis=-1)) * eps_weights
        x = jnp.asarray(X)[None]

        def grads(nz):
            out = {}
            for label, (make, _) in CASES.items():
                loss_fn = make(table_guide(nz))
                (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, RNG, x)
                out[label] = (loss, g)
            return out

        per_node = jax.jit(jax.vmap(grads))(noise)
        means = {label: jax.tree_util.tree_map(lambda g: jnp.tensordot(prob, g, axes=1), g)
                 for label, (_, g) in per_node.items()}
        targets = {label: jax.grad(lambda p, f=f: expectation(f, p, noise, states, eps_weights))(params)
                   for label, (_, f) in CASES.items() if f is not None}
        targets["iwae"] = jax.grad(lambda p: expectation(log_mean_exp, p, noise, states, eps_weights))(params)
        targets["elbo"] = jax.grad(lambda p: expectation(jnp.mean, p, noise, states, eps_weights))(params)
        targets["tvo"] = tvo_reference(params)
        lw = jax.vmap(lambda nz: log_weights_at(params, X, nz))(noise)
        value_errors = {label: max_error(loss, -jax.vmap(CASES[label][1])(lw))
                        for label, (loss, _) in per_node.items() if CASES[label][1] is not None}
        return means, targets, value_errors


def tvo_reference(params):
    """TVO with one interval: grad ELBO - (1/K) E[log w~ grad log q_D(d)] (the covariance's 1/K), by quadrature."""
    def one_sample(p, stop):
        log_qd = jax.nn.log_softmax(q_logits(p["guide"], X))
        total = 0.0
        for d in range(3):
            lw = log_weights_at(p, X, jnp.stack([jnp.full(NODES, d), jnp.asarray(GH_EPS)], axis=-1))
            e_lw = jnp.sum(jnp.asarray(GH_W) * lw)
            total = total + jnp.exp(log_qd[d]) * (jax.lax.stop_gradient(e_lw) if stop else e_lw)
        return total

    elbo = jax.grad(lambda p: one_sample(p, False))(params)
    score = jax.grad(lambda p: one_sample(p, True))(params)            # E[log w~ grad log q_D(d)]
    return elbo, score


def max_error(a, b):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def neg(tree):
    return jax.tree_util.tree_map(lambda t: -t, tree)


UNBIASED = ["elbo reparam+score", "miwae dreg+vimco", "ciwae dreg+vimco", "ciwae reparam+score",
            "renyi dreg+score", "renyi reparam+vimco", "jvi dreg+score"]
TOL = 2e-4   # quadrature error of the reparameterisation identity with 10 nodes (measured: <= 8e-5)


def tolerance(label):
    """``reparam`` on the continuous site needs no identity: exact at every node (measured 1e-15)."""
    return 1e-12 if "reparam" in label else TOL


@pytest.mark.slow
@pytest.mark.parametrize("label", UNBIASED)
def test_per_site_gradient_is_exact_by_enumeration(exact, label):
    means, targets, value_errors = exact
    assert value_errors[label] < 1e-10                                 # the value is the bound at every node
    assert max_error(means[label]["model"], neg(targets[label]["model"])) < 1e-10
    err = max_error(means[label]["guide"], neg(targets[label]["guide"]))
    assert err < tolerance(label), err


@pytest.mark.slow
@pytest.mark.parametrize("label", ["piwae dreg+vimco", "piwae reparam+score"])
def test_per_site_piwae_phi_ascends_miwae_theta_iwae(exact, label):
    """M = 2 groups of K = 1: theta's bound is IWAE_2, phi's MIWAE_{2,1} = ELBO_2; the loss is IWAE_2."""
    means, targets, value_errors = exact
    assert value_errors[label] < 1e-10
    assert max_error(means[label]["model"], neg(targets["iwae"]["model"])) < 1e-10
    assert max_error(means[label]["guide"], neg(targets["elbo"]["guide"])) < tolerance(label)
    assert max_error(means[label]["guide"], neg(targets["iwae"]["guide"])) > 1e-2   # and it can tell them apart


@pytest.mark.slow
def test_per_site_cubo_is_exact_and_minimised(exact):
    means, targets, _ = exact
    label = "cubo dreg+vimco"     # an upper bound: the loss is +bound, its gradient +grad
    # w~^2 is a rougher integrand: quadrature error 9e-4, 2e-4, 5e-6 with 10, 16, 24 nodes
    assert max_error(means[label]["guide"], targets[label]["guide"]) < 2e-3


@pytest.mark.slow
def test_per_site_renyi_stl_is_biased_negative_control(exact):
    means, targets, _ = exact
    err = max_error(means["renyi stl+vimco"]["guide"], neg(targets["renyi stl+vimco"]["guide"]))
    assert err > 1e-2, err


@pytest.mark.slow
def test_per_site_rws_matches_wake_phi(exact):
    """alpha = 1: per-site RWS (DReG on c, wake-phi score on d) has wake-phi's expectation exactly;
    alpha = 0.5 mixes in the IWAE gradient by half. theta gets IWAE's gradient either way."""
    means, targets, _ = exact
    wake = means["rws score"]
    assert max_error(means["rws dreg+score"]["guide"], wake["guide"]) < TOL
    assert max_error(means["rws dreg+score"]["model"], neg(targets["iwae"]["model"])) < 1e-10
    mixed = jax.tree_util.tree_map(lambda a, b: 0.5 * a - 0.5 * b, wake["guide"], targets["iwae"]["guide"])
    assert max_error(means["rws(0.5) dreg+score"]["guide"], mixed) < TOL
    # and it can fail: wake-phi is not IWAE's gradient here
    assert max_error(wake["guide"], neg(targets["iwae"]["guide"])) > 1e-2


@pytest.mark.slow
def test_per_site_tvo_one_interval_is_the_elbo_with_the_covariance_bias(exact):
    means, targets, _ = exact
    elbo, score = targets["tvo"]
    ref = jax.tree_util.tree_map(lambda e, s: -(e - s / K), elbo["guide"], score["guide"])
    assert max_error(means["tvo reparam+score"]["guide"], ref) < 1e-7      # measured 1e-8
    assert max_error(means["tvo reparam+score"]["model"], neg(elbo["model"])) < 1e-10
    # negative control: without the covariance's 1/K term the reference is off
    assert max_error(means["tvo reparam+score"]["guide"], neg(elbo["guide"])) > 1e-2



# --------------------------------------------------------------------------------------
# Paired, on random noise (float32, K = 4): RWS per site against RWS score
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rws_paired():
    from tests.test_per_site import XB, params32

    params = params32()
    mixed = je.rws(MODEL, GUIDE, num_samples=4, estimator=ps("dreg", "score"))
    score = je.rws(MODEL, GUIDE, num_samples=4, estimator="score")
    iwae = je.iwae(MODEL, GUIDE, num_samples=4, estimator=ps("dreg", "vimco"))
    same = je.paired_bias_test(mixed, score, params, jax.random.key(1), XB, num_replicates=1000)
    other = je.paired_bias_test(mixed, iwae, params, jax.random.key(1), XB, num_replicates=1000)
    var = {name: jnp.var(je.gradient_replicates(loss, params, jax.random.key(2), XB, num_replicates=250)["guide"]["m"],
                         axis=0) for name, loss in (("mixed", mixed), ("score", score))}
    return same, other, var


@pytest.mark.slow
def test_rws_per_site_agrees_with_rws_score_paired(rws_paired):
    same, other, _ = rws_paired
    assert same.max_abs_t < 5.0, same        # measured 1.9 (R = 2000)
    assert other.max_abs_t > 6.0, other      # negative control: IWAE's gradient is another direction (66)


@pytest.mark.slow
def test_rws_per_site_has_lower_variance_on_the_continuous_site(rws_paired):
    _, _, var = rws_paired
    assert bool(jnp.all(var["mixed"] < 0.5 * var["score"])), var    # measured 4-77x lower (R = 500)
