"""Pathwise estimators refuse, at trace time, a z that carries no derivative with respect to phi."""

import jax
import jax.numpy as jnp
import pytest

import jaxelbo as je

lg = je.models.linear_gaussian
D = 20
X = jnp.ones((2, D))


def float_bernoulli_guide():  # a discrete sample cast to float: its derivative wrt phi is zero by construction
    def sample(phi, rng, x):
        return {"loc": phi["m"] + jax.random.normal(rng, (D,)),
                "c": jax.random.bernoulli(rng, jax.nn.sigmoid(phi["l"]), (D,)).astype(jnp.float32)}

    def log_prob(phi, x, z):
        normal = -0.5 * jnp.sum((z["loc"] - phi["m"]) ** 2)
        return normal + jnp.sum(z["c"] * jax.nn.log_sigmoid(phi["l"]) + (1 - z["c"]) * jax.nn.log_sigmoid(-phi["l"]))

    return je.Guide(sample, log_prob)


def model_of_two():
    base = lg.model()
    return je.Model(log_prior=lambda t, z: base.log_prior(t, z["loc"]) - jnp.sum(z["c"]),
                    log_likelihood=lambda t, x, z: base.log_likelihood(t, x, z["loc"] + z["c"]))


PARAMS = {"model": lg.optimal_params(jnp.zeros(D))["model"], "guide": {"m": jnp.zeros(D), "l": jnp.array(0.0)}}


@pytest.mark.parametrize("estimator", ["reparam", "stl", "dreg"])
def test_a_float_discrete_sample_is_refused_by_pathwise_estimators(estimator):
    loss_fn = je.iwae(model_of_two(), float_bernoulli_guide(), num_samples=3, estimator=estimator)
    with pytest.raises(TypeError, match=r"z \['c'\] from guide.sample carries no derivative with respect to phi.*"
                                        r"'score' or 'vimco'"):
        jax.eval_shape(loss_fn, PARAMS, jax.random.key(0), X)


def test_score_estimators_and_a_reparameterised_guide_pass():
    jax.eval_shape(je.iwae(model_of_two(), float_bernoulli_guide(), num_samples=3, estimator="vimco"),
                   PARAMS, jax.random.key(0), X)
    jax.eval_shape(je.iwae(lg.model(), lg.guide(), num_samples=3, estimator="dreg"),   # control: accepted
                   lg.optimal_params(jnp.zeros(D)), jax.random.key(0), X)


def test_a_stop_gradient_sample_is_refused():
    base = lg.guide()
    guide = je.Guide(lambda p, r, x: jax.lax.stop_gradient(base.sample(p, r, x)), base.log_prob)
    with pytest.raises(TypeError, match="carries no derivative with respect to phi"):
        jax.eval_shape(je.elbo(lg.model(), guide, num_samples=2), lg.optimal_params(jnp.zeros(D)),
                       jax.random.key(0), X)
