"""Upper bounds in the app: the sandwich ELBO <= IWAE_K <= log p(x) <= CUBO_2 of the evaluation
(against closed forms on the linear-Gaussian toy), and ``jaxelbo train --objective tvo|cubo``."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo.app import evaluation
from jaxelbo.models import linear_gaussian as lg
from jaxelbo.weights import sample_and_log_weights

D, N = 3, 24
MU = jnp.array([0.3, -0.5, 1.0])
X = np.asarray(lg.sample_data(jax.random.key(7), MU, N))
MODEL, GUIDE = lg.model(), lg.guide()


def near_posterior():
    params = lg.optimal_params(MU)
    g = dict(params["guide"])
    g["b"] = g["b"] + jnp.array([0.3, -0.2, 0.25])
    g["log_scale"] = g["log_scale"] + 0.15  # wider than the posterior: E_q[w~^2] is finite
    return {"model": {"mu": params["model"]["mu"] - 0.1}, "guide": g}


PARAMS = near_posterior()
K = 4000


@pytest.fixture(scope="module")
def result():
    return evaluation.evaluate(MODEL, GUIDE, PARAMS, jax.random.key(0), X, num_samples_ll=K, chunk_size=1000,
                               num_samples_iwae=16, batch_size=N, surgery=False, keep_per_point=True)


def test_the_closed_forms_are_in_order():
    elbo = np.asarray(lg.exact_elbo(PARAMS, jnp.asarray(X)))
    log_px = np.asarray(lg.log_marginal(PARAMS["model"], jnp.asarray(X)))
    cubo = np.asarray(lg.exact_cubo(PARAMS, jnp.asarray(X), 2.0))
    assert np.all(elbo < log_px) and np.all(log_px < cubo)
    assert np.all(cubo - log_px > 0.01)  # a guide away from the posterior: a bracket of some width


def test_evaluate_reports_the_sandwich_in_order_and_near_the_closed_forms(result):
    r = result
    for key in ("elbo", "iwae_16", "log_likelihood", "cubo_2", "cubo_2_stderr", "sandwich_log_likelihood",
                "sandwich_width", "sandwich_width_elbo"):
        assert key in r and np.isfinite(r[key]), key
    assert r["sandwich_log_likelihood_method"] == f"iwae_{K}" and r["cubo_2_num_samples"] == K
    assert r["sandwich_ordered"] is True
    assert r["elbo"] <= r["iwae_16"] <= r["log_likelihood"] <= r["cubo_2"]
    np.testing.assert_allclose(r["sandwich_width"], r["cubo_2"] - r["log_likelihood"], rtol=1e-12)
    np.testing.assert_allclose(r["sandwich_width_elbo"], r["cubo_2"] - r["elbo"], rtol=1e-12)
    x = jnp.asarray(X)
    log_px = float(jnp.mean(lg.log_marginal(PARAMS["model"], x)))
    exact_cubo = float(jnp.mean(lg.exact_cubo(PARAMS, x, 2.0)))
    exact_elbo = float(jnp.mean(lg.exact_elbo(PARAMS, x)))
    # the estimates are those of the closed forms (the CUBO estimate slightly low: biased low)
    assert abs(r["log_likelihood"] - log_px) < 0.01
    assert -0.02 < r["cubo_2"] - exact_cubo < 0.005
    assert abs(r["elbo"] - exact_elbo) < 0.1
    # the bracket's width is the closed form's, CUBO_2 - log p = 1/2 D_2(p || q)
    np.testing.assert_allclose(r["sandwich_width"], exact_cubo - log_px, atol=0.02)


def test_log_likelihood_and_cubo_share_the_draws_of_log_likelihood():
    rng, x = jax.random.key(3), jnp.asarray(X[:5])
    iwae, cubo = jax.jit(lambda p, r, xb: evaluation.log_likelihood_and_cubo(
        MODEL, GUIDE, p, r, xb, num_samples=250, chunk_size=60))(PARAMS, rng, x)
    ref = jax.jit(lambda p, r, xb: je.log_likelihood(MODEL, GUIDE, p, r, xb, num_samples=250, chunk_size=60))
    np.testing.assert_allclose(iwae, ref(PARAMS, rng, x), rtol=1e-6)
    assert np.all(cubo >= iwae)  # the power-mean inequality on the same draws
    _, one = jax.jit(lambda p, r, xb: evaluation.log_likelihood_and_cubo(
        MODEL, GUIDE, p, r, xb, num_samples=250, chunk_size=250))(PARAMS, rng, x)
    # sample k of point b is drawn with fold_in(split(rng, B)[b], k), as in je.log_likelihood
    keys = jax.vmap(lambda key: jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(250)))(
        jax.random.split(rng, len(x)))
    _, log_p, log_q = sample_and_log_weights(MODEL, GUIDE, PARAMS, keys, x)
    want = (jax.nn.logsumexp(2 * (log_p - log_q), -1) - np.log(250)) / 2
    np.testing.assert_allclose(one, want, rtol=1e-5)  # one chunk: the CUBO estimate itself


def test_the_bracket_closes_at_the_exact_posterior():
    opt = lg.optimal_params(MU)
    r = evaluation.evaluate(MODEL, GUIDE, opt, jax.random.key(1), X[:8], num_samples_ll=100, chunk_size=100,
                            num_samples_iwae=16, batch_size=8, surgery=False)
    log_px = float(jnp.mean(lg.log_marginal(opt["model"], jnp.asarray(X[:8]))))
    for key in ("elbo", "iwae_16", "log_likelihood", "cubo_2"):
        np.testing.assert_allclose(r[key], log_px, rtol=0, atol=2e-4)
    assert abs(r["sandwich_width"]) < 2e-4


def test_sandwich_flags_numbers_out_of_order():
    good = {"elbo": -3.0, "iwae_64": -2.5, "log_likelihood": -2.4, "log_likelihood_num_samples": 5000,
            "cubo_2": -2.1}
    assert evaluation.sandwich(good)["sandwich_ordered"] is True
    assert evaluation.sandwich({**good, "cubo_2": -2.45})["sandwich_ordered"] is False  # CUBO estimate too low
    with_ais = evaluation.sandwich({**good, "ais_log_likelihood": -2.3})
    assert with_ais["sandwich_log_likelihood_method"] == "ais"
    np.testing.assert_allclose(with_ais["sandwich_width"], 0.2)
    assert evaluation.sandwich({k: v for k, v in good.items() if k != "cubo_2"}) == {}


# --------------------------------------------------------------------------- jaxelbo train --objective tvo|cubo

COMMON = ["train", "--steps", "3", "--batch-size", "16", "--num-samples", "4", "--hidden", "16",
          "--latent-dim", "3", "--eval-num-samples", "40", "--eval-chunk-size", "20", "--no-surgery",
          "--eval-every", "0", "--checkpoint-every", "3", "--log-every", "1", "--no-progress",
          "--eval-num-points", "20"]


def _train_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"]


def _saved_params(out):
    from jaxelbo.app import checkpoint, experiment, training

    settings = experiment.TrainSettings.from_dict(json.loads((out / "config.json").read_text())["settings"])
    _, net, _, _ = experiment.build_experiment(settings)  # the run's initial parameters (same seed)
    opt = training.make_optimizer(settings.learning_rate)
    _, params, _, _ = checkpoint.restore(out / "checkpoints", net.params, opt.init(net.params))
    return net.params, params


@pytest.mark.slow
def test_cli_trains_cubo_on_the_guide_only_and_evaluates_the_sandwich(tmp_path, capsys):
    from jaxelbo.app.cli import main

    out = tmp_path / "cubo"
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):  # optax is not strict
        assert main([*COMMON, "--objective", "cubo", "--estimator", "dreg", "--n", "2", "--out", str(out)]) == 0
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["objective"] == {"name": "cubo", "estimator": "dreg", "num_samples": 4, "n": 2.0,
                                    "direction": "upper", "trains": "guide"}
        records = _train_records(out)
        assert len(records) == 3
        for r in records:  # an upper bound is minimised: loss = +bound
            np.testing.assert_allclose(r["loss"], r["bound"], rtol=1e-6)
        init, trained = _saved_params(out)
        jax.tree.map(np.testing.assert_array_equal, trained["model"], init["model"])  # the model is held
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), trained["guide"], init["guide"]))
        assert any(moved)
        capsys.readouterr()
        assert main(["evaluate", str(out), "--eval-num-samples", "60", "--eval-chunk-size", "30", "--no-surgery",
                     "--eval-num-points", "12", "--no-progress"]) == 0
        printed = capsys.readouterr().out
        assert "sandwich: ELBO" in printed and "<= CUBO_2" in printed
        test = json.loads((out / "evaluation.json").read_text())["test"]
        for key in ("cubo_2", "sandwich_width", "sandwich_width_elbo", "sandwich_ordered"):
            assert key in test, key
        assert test["cubo_2"] >= test["log_likelihood"]  # same draws: the power-mean inequality
        # an order given to an objective that has none is refused in one line
        assert main([*COMMON, "--objective", "iwae", "--n", "3", "--out", str(tmp_path / "x")]) == 2
        assert "n is not a setting of 'iwae'; it is used by cubo" in capsys.readouterr().err
        assert main([*COMMON, "--objective", "cubo", "--estimator", "reparam", "--n", "0.5",
                     "--out", str(tmp_path / "y")]) == 2
        assert "must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_trains_tvo_with_the_moments_schedule(tmp_path, capsys):
    from jaxelbo.app.cli import main

    out = tmp_path / "tvo"
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        assert main([*COMMON, "--objective", "tvo", "--estimator", "score", "--partition", "moments",
                     "--num-partitions", "3", "--out", str(out)]) == 0
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["objective"]["partition"] == "moments" and cfg["objective"]["num_partitions"] == 3
        assert cfg["objective"]["direction"] == "lower" and cfg["objective"]["trains"] == "model and guide"
        for r in _train_records(out):  # a lower bound is maximised: loss = -bound
            np.testing.assert_allclose(r["loss"], -r["bound"], rtol=1e-6)
        init, trained = _saved_params(out)
        assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), trained["model"], init["model"])))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["objective"]["direction"] == "lower"
        capsys.readouterr()
        assert main([*COMMON, "--objective", "tvo", "--estimator", "score", "--partition", "0,0.5,0.4,1",
                     "--out", str(tmp_path / "bad")]) == 2
        assert "partition must increase strictly" in capsys.readouterr().err
