"""The objective registry: one budget split, one wording for unsupported pairs, je.OBJECTIVES."""

import jax
import jax.numpy as jnp
import pytest

import jaxelbo as je
from jaxelbo import registry
from jaxelbo.models import linear_gaussian as lg


@pytest.mark.parametrize("budget,split", [(1, (1, 1)), (2, (1, 2)), (4, (2, 2)), (8, (2, 4)), (12, (3, 4)),
                                          (64, (8, 8)), (512, (16, 32)), (7, (1, 7)), (1000, (25, 40))])
def test_split_budget_is_the_squarest_divisor(budget, split):
    m, k = registry.split_budget(budget)
    assert (m, k) == split and m * k == budget and m <= k


def test_split_budget_takes_an_explicit_divisor_only():
    assert registry.split_budget(64, 4) == (4, 16)
    with pytest.raises(ValueError, match="divisor"):
        registry.split_budget(64, 5)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        registry.split_budget(0)


def test_nested_objectives_split_512_as_16_by_32():
    for name in registry.names():
        kwargs = registry.objective_kwargs(name, num_samples=512)
        if registry.get(name).nested:
            assert (kwargs["num_outer"], kwargs["num_inner"]) == (16, 32)
        else:
            assert kwargs["num_samples"] == 512


def test_objectives_table_is_read_from_the_registry():
    assert list(je.OBJECTIVES) == list(registry.names())
    for name, spec in ((n, registry.get(n)) for n in registry.names()):
        assert je.OBJECTIVES[name] == spec.estimators
        assert set(spec.estimators) <= set(je.ESTIMATORS)
        assert spec.constructor is getattr(je, name)
    assert dict(je.OBJECTIVES)["iwae"] == ("reparam", "stl", "dreg", "score", "vimco", "ovis", "ovis-mc")


def test_extra_keywords_and_their_defaults():
    assert registry.objective_kwargs("ciwae", num_samples=8) == {"num_samples": 8, "beta": 0.5}
    assert registry.objective_kwargs("ciwae", num_samples=8, beta=0.2)["beta"] == 0.2
    assert registry.objective_kwargs("renyi", num_samples=8, alpha=None)["alpha"] == 0.5
    # keywords of other objectives may be passed as None (a command line passes every flag)
    assert registry.objective_kwargs("iwae", num_samples=8, beta=None, alpha=None) == {"num_samples": 8}
    with pytest.raises(ValueError, match="beta is not a setting of 'iwae'; it is used by ciwae"):
        registry.objective_kwargs("iwae", num_samples=8, beta=0.3)
    with pytest.raises(ValueError, match="only used by miwae, piwae"):
        registry.objective_kwargs("iwae", num_samples=8, num_outer=2)


def test_one_wording_for_bad_names_and_unsupported_pairs():
    model, guide = lg.model(), lg.guide()
    with pytest.raises(ValueError, match="unknown objective 'vae'; valid choices: elbo, iwae"):
        registry.make("vae", model, guide, estimator="dreg", num_samples=4)
    with pytest.raises(ValueError, match="unknown estimator 'nope'; valid choices: reparam, stl, dreg"):
        registry.make("iwae", model, guide, estimator="nope", num_samples=4)
    wording = "objective 'elbo' does not support estimator 'dreg'; valid choices for elbo: reparam, stl, score"
    for call in (lambda: registry.make("elbo", model, guide, estimator="dreg", num_samples=4),
                 lambda: je.elbo(model, guide, num_samples=4, estimator="dreg"),
                 lambda: registry.pairs(["elbo"], ["dreg"])):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == wording
    with pytest.raises(TypeError, match="estimator must be a string"):
        je.iwae(model, guide, num_samples=4, estimator=None)


def test_pairs_filters_without_dropping_what_was_named():
    assert registry.pairs(["iwae", "rws"], ["dreg"]) == [("iwae", "dreg"), ("rws", "dreg")]
    assert registry.pairs(None, ["vimco"]) == [("iwae", "vimco")]
    assert registry.pairs(["elbo", "iwae"], ["reparam", "dreg"]) == [
        ("elbo", "reparam"), ("iwae", "reparam"), ("iwae", "dreg")]
    assert len(registry.pairs()) == sum(len(v) for v in je.OBJECTIVES.values())
    with pytest.raises(ValueError, match="does not support estimator 'vimco'"):
        registry.pairs(["elbo", "miwae"], ["reparam", "vimco"])


def test_make_builds_the_registered_constructor_with_the_split():
    params = lg.optimal_params(jnp.zeros(2))
    loss_fn = registry.make("piwae", lg.model(), lg.guide(), estimator="dreg", num_samples=12)
    _, aux = loss_fn(params, jax.random.key(0), jnp.ones((2, 2)))
    assert aux["log_weights"].shape == (2, 3, 4)


def test_register_refuses_duplicates_and_unknown_estimators():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("iwae", je.iwae, estimators=("reparam",))
    with pytest.raises(ValueError, match="subset of"):
        registry.register("not_an_objective", je.iwae, estimators=("magic",))
    assert "not_an_objective" not in je.OBJECTIVES
