"""The public API contract: names, signatures, keyword names and shapes that other code calls.

Correctness is for the other test files; this one fails when the contract drifts: a renamed
keyword, a changed shape of ``aux``, a missing public name, an error that stops being raised.
"""

import jax
import jax.numpy as jnp
import pytest

import jaxelbo as je

D, B = 3, 4


def normal_logpdf(v, mean, var):
    return -0.5 * jnp.sum(jnp.log(2 * jnp.pi * var) + (v - mean) ** 2 / var)


MODEL = je.Model(log_prior=lambda th, z: normal_logpdf(z, th["mu"], 1.0),
                 log_likelihood=lambda th, x, z: normal_logpdf(x, z, 1.0))
GUIDE = je.Guide(sample=lambda ph, rng, x: ph["A"] @ x + ph["b"] + 0.8 * jax.random.normal(rng, x.shape),
                 log_prob=lambda ph, x, z: normal_logpdf(z, ph["A"] @ x + ph["b"], 0.64))
PARAMS = {"model": {"mu": jnp.zeros(D)}, "guide": {"A": 0.5 * jnp.eye(D), "b": jnp.zeros(D)}}
X = jnp.arange(B * D, dtype=jnp.float32).reshape(B, D) / 10
RNG = jax.random.PRNGKey(0)

# The documented constructor calls (keyword names included), the estimators each must accept,
# and the shape of aux["log_weights"].
FACTORIES = {
    "elbo": (lambda est: je.elbo(MODEL, GUIDE, num_samples=3, estimator=est), ["reparam", "stl", "score"], (B, 3)),
    "iwae": (lambda est: je.iwae(MODEL, GUIDE, num_samples=3, estimator=est),
             ["reparam", "stl", "dreg", "score", "vimco"], (B, 3)),
    "miwae": (lambda est: je.miwae(MODEL, GUIDE, num_outer=2, num_inner=3, estimator=est),
              ["reparam", "stl", "dreg"], (B, 2, 3)),
    "ciwae": (lambda est: je.ciwae(MODEL, GUIDE, num_samples=3, beta=0.5, estimator=est),
              ["reparam", "stl", "dreg"], (B, 3)),
    "piwae": (lambda est: je.piwae(MODEL, GUIDE, num_outer=2, num_inner=3, estimator=est),
              ["reparam", "dreg"], (B, 2, 3)),
    "renyi": (lambda est: je.renyi(MODEL, GUIDE, num_samples=3, alpha=0.5, estimator=est),
              ["reparam", "stl", "dreg"], (B, 3)),
    "rws": (lambda est: je.rws(MODEL, GUIDE, num_samples=3, estimator=est), ["score", "dreg"], (B, 3)),
    "jvi": (lambda est: je.jvi(MODEL, GUIDE, num_samples=3, estimator=est), ["reparam", "dreg"], (B, 3)),
    "cubo": (lambda est: je.cubo(MODEL, GUIDE, num_samples=3, n=2.0, estimator=est), ["reparam", "dreg"], (B, 3)),
    "tvo": (lambda est: je.tvo(MODEL, GUIDE, num_samples=3, num_partitions=4, estimator=est), ["score", "reparam"],
            (B, 3)),
}
CASES = [(o, e) for o, (_, ests, _) in FACTORIES.items() for e in ests]


def test_public_names():
    for name in ["Model", "Guide", "log_joint", "log_weights", "normalized_weights", "effective_sample_size",
                 "ESTIMATORS", "OBJECTIVES", *FACTORIES, "gradient_replicates", "gradient_snr", "log_likelihood",
                 "importance_resample", "elbo_surgery", "ElboSurgery", "models"]:
        assert hasattr(je, name), name
    for name in je.__all__:
        assert hasattr(je, name), name
    assert hasattr(je.models, "linear_gaussian")
    assert je.ESTIMATORS[:5] == ("reparam", "stl", "dreg", "score", "vimco")


def test_no_public_name_shadows_a_submodule():
    """``import jaxelbo.<module> as m`` gives the module: no function of ``je`` shares a submodule's name."""
    import importlib
    import pkgutil
    import types

    names = {m.name for m in pkgutil.iter_modules(je.__path__)}
    assert "weights" in names and "log_weights" not in names  # je.log_weights is the function only
    assert callable(je.log_weights) and not isinstance(je.log_weights, types.ModuleType)
    import jaxelbo.weights as lw

    assert isinstance(lw, types.ModuleType) and lw.log_weights is je.log_weights
    for name in sorted(names - {"numpyro", "app", "__main__"}):  # the extras and the CLI are imported on use
        module = importlib.import_module(f"jaxelbo.{name}")
        assert getattr(je, name) is module, f"jaxelbo.{name} is rebound to {getattr(je, name)!r}"
        exec(f"import jaxelbo.{name} as m; assert isinstance(m, types.ModuleType)", {"types": types})
    for name in je.__all__:
        assert name not in names or isinstance(getattr(je, name), types.ModuleType), name


def test_every_registered_objective_has_a_row_here():
    missing = sorted(set(je.OBJECTIVES) - set(FACTORIES))
    assert not missing, f"add {missing} to FACTORIES (documented call, estimators, log_weights shape)"


@pytest.mark.parametrize("objective", [o for o in FACTORIES if o in je.OBJECTIVES])
def test_objectives_table_lists_every_documented_estimator(objective):
    assert set(FACTORIES[objective][1]) <= set(je.OBJECTIVES[objective])


@pytest.mark.parametrize("objective,estimator", CASES)
def test_loss_and_aux_shapes(objective, estimator):
    make, _, lw_shape = FACTORIES[objective]
    loss_fn = make(estimator)
    loss, aux = loss_fn(PARAMS, RNG, X)
    assert jnp.shape(loss) == ()
    assert aux["bound"].shape == (B,)
    assert aux["log_weights"].shape == lw_shape
    assert aux["ess"].shape == (B,)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, RNG, X)[0]))(PARAMS)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(PARAMS)


@pytest.mark.slow  # 12 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_gradient_replicates_has_a_leading_replicate_axis():
    reps = je.gradient_replicates(je.iwae(MODEL, GUIDE, num_samples=3, estimator="dreg"), PARAMS, RNG, X,
                                  num_replicates=5)
    assert reps["guide"]["A"].shape == (5, D, D) and reps["model"]["mu"].shape == (5, D)


def test_gradient_snr_is_shaped_like_params():
    snr = je.gradient_snr(je.iwae(MODEL, GUIDE, num_samples=3, estimator="dreg"), PARAMS, RNG, X, num_replicates=5)
    assert snr["guide"]["A"].shape == (D, D) and snr["model"]["mu"].shape == (D,)


def test_log_likelihood_is_one_value_per_example():
    ll = je.log_likelihood(MODEL, GUIDE, PARAMS, RNG, X, num_samples=100, chunk_size=30)
    assert ll.shape == (B,)


def test_importance_resample_of_one_example():
    z = je.importance_resample(MODEL, GUIDE, PARAMS, RNG, X[0], num_samples=10, num_draws=7)
    assert z.shape == (7, D)


def test_elbo_surgery_fields():
    s = je.elbo_surgery(MODEL, GUIDE, PARAMS, RNG, X)
    assert isinstance(s, je.ElboSurgery)
    for field in ["elbo", "reconstruction", "index_code_mi", "marginal_kl", "avg_kl"]:
        assert jnp.shape(getattr(s, field)) == (), field


@pytest.mark.parametrize("bad", [
    lambda: je.iwae(MODEL, GUIDE, num_samples=0, estimator="dreg")(PARAMS, RNG, X),
    lambda: je.iwae(MODEL, GUIDE, num_samples=3, estimator="nope")(PARAMS, RNG, X),
    lambda: je.elbo(MODEL, GUIDE, num_samples=3, estimator="vimco")(PARAMS, RNG, X),
    lambda: je.ciwae(MODEL, GUIDE, num_samples=3, beta=2.0, estimator="reparam")(PARAMS, RNG, X),
], ids=["zero_samples", "unknown_estimator", "unsupported_pair", "beta_out_of_range"])
def test_bad_configurations_raise(bad):
    with pytest.raises((ValueError, TypeError)):
        bad()


def test_linear_gaussian_toy_is_importable():
    import jaxelbo.models.linear_gaussian as lg

    assert callable(lg.model) and callable(lg.guide) and callable(lg.optimal_params)
