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


# Issue 23 row 11: a z whose shape disagrees with what log_prob and the model expect is refused.
def reshaped_guide(reshape):
    """lg.guide() whose sample returns ``reshape(z)``, while log_prob is left as written for (D,)."""
    base = lg.guide()
    return je.Guide(sample=lambda phi, rng, x: reshape(base.sample(phi, rng, x)), log_prob=base.log_prob)


SHAPE_PARAMS = lg.optimal_params(jnp.zeros(3))
X3 = jnp.ones((2, 3))


@pytest.mark.parametrize("make_loss", [
    lambda m, g: (lambda p, r, x: je.iwae(m, g, num_samples=5)(p, r, x)[0]),
    lambda m, g: (lambda p, r, x: je.log_weights(m, g, p, r, x, num_samples=5))], ids=["iwae", "log_weights"])
def test_a_column_z_is_refused_at_trace_time(make_loss):
    """sample gives (D, 1), log_prob sums over a (D, D) broadcast: IWAE -13.6 against exact -4.5, silently."""
    bad = reshaped_guide(lambda z: z[:, None])
    with pytest.raises(ValueError, match=r"guide.log_prob\(phi, x, z\) broadcasts a z of shape \(3, 1\) from "
                                         r"guide.sample against an array of shape \(1, 3\) into shape \(3, 3\)"):
        jax.eval_shape(make_loss(lg.model(), bad), SHAPE_PARAMS, jax.random.key(0), X3)


def test_a_model_that_expects_a_column_is_refused():
    """The reverse: guide and z agree on (D,), the model's likelihood compares against (D, 1)."""
    base = lg.model()
    model = je.Model(log_prior=base.log_prior,
                     log_likelihood=lambda t, x, z: -0.5 * jnp.sum((x[:, None] - z) ** 2))
    with pytest.raises(ValueError, match=r"model.log_likelihood\(theta, x, z\) broadcasts a z of shape \(3,\)"):
        jax.eval_shape(je.iwae(model, lg.guide(), num_samples=5), SHAPE_PARAMS, jax.random.key(0), X3)


def test_legitimate_broadcasts_of_z_pass():
    """Negative controls: a mixture's components, pairwise terms of z, a 1-D latent against K
    components and a column z against (D, K) stretch z but are not outer broadcasts."""
    means = jnp.arange(12.0).reshape(4, 3)
    guide = lg.guide()

    def mixture_log_prob(phi, x, z):           # z (3,) against (4, 3) means: a Gaussian mixture
        return jax.nn.logsumexp(-0.5 * jnp.sum((z - means) ** 2, axis=-1)) + guide.log_prob(phi, x, z)

    def pairwise_prior(t, z):                  # z_i z_j interactions, (D, 1) against (1, D) of z itself
        return lg.model().log_prior(t, z) - 0.1 * jnp.sum(z[:, None] * z[None, :])

    cases = {
        "mixture": (lg.model(), je.Guide(guide.sample, mixture_log_prob), SHAPE_PARAMS, X3),
        "pairwise": (je.Model(pairwise_prior, lg.model().log_likelihood), guide, SHAPE_PARAMS, X3),
        "column against (D, K)": (
            je.Model(lambda t, z: -0.5 * jnp.sum((z - jnp.ones((3, 4))) ** 2),
                     lambda t, x, z: -0.5 * jnp.sum((x - z[:, 0]) ** 2)),
            je.Guide(lambda phi, rng, x: guide.sample(phi, rng, x)[:, None],
                     lambda phi, x, z: guide.log_prob(phi, x, z[:, 0])),
            {"model": {}, "guide": SHAPE_PARAMS["guide"]}, X3),
        "1-D latent against K components": (
            je.Model(lambda t, z: jax.nn.logsumexp(-0.5 * (z - jnp.arange(4.0)) ** 2),
                     lambda t, x, z: -0.5 * jnp.sum((x - z) ** 2)),
            lg.guide(), lg.optimal_params(jnp.zeros(1)), jnp.ones((2, 1))),
    }
    for name, (model, g, params, x) in cases.items():
        out = jax.eval_shape(je.iwae(model, g, num_samples=5), params, jax.random.key(0), x)
        assert out[0].shape == (), name
