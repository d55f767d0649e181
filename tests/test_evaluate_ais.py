"""`jaxelbo evaluate --method ais|all`: AIS, its difference to IWAE, the amortisation and BDMC gaps."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("blackjax")


@pytest.mark.slow
def test_cli_evaluate_method_all(tmp_path, capsys):
    from jaxelbo.app.cli import main

    out = tmp_path / "run"
    assert main(["train", "--steps", "4", "--batch-size", "16", "--num-samples", "4", "--hidden", "16",
                 "--latent-dim", "3", "--eval-num-samples", "20", "--eval-num-points", "8", "--no-progress",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--method", "all", "--eval-num-samples", "200", "--eval-num-points", "6",
                 "--ais-steps", "20", "--ais-chains", "4", "--bdmc", "4", "--amortisation-steps", "20",
                 "--no-surgery"]) == 0
    assert "AIS, T=20" in capsys.readouterr().err  # the progress bar over the AIS steps
    test = json.loads((out / "evaluation.json").read_text())["test"]
    assert test["method"] == "all" and test["num_points"] == 6
    for key in ("log_likelihood", "log_likelihood_stderr", "ais_log_likelihood", "ais_log_likelihood_stderr",
                "ais_minus_iwae", "khat_above_0.7", "amortisation_gap", "approximation_gap", "bdmc_gap",
                "ais_seconds_per_1000_points", "log_likelihood_seconds_per_1000_points"):
        assert np.isfinite(test[key]), key
    # a 3-latent VAE after 4 steps: AIS with 20 temperatures and 4 chains is within a few nats of IWAE-200
    assert abs(test["ais_minus_iwae"]) < 5.0
    assert 0.0 < test["ais_acceptance"] <= 1.0
    assert main(["evaluate", str(out), "--method", "ais", "--ais-steps", "0"]) == 2
    assert "--ais-steps must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("layers", [1, 2])
def test_vae_sample_is_the_model(layers):
    """VAE.model.sample draws (z, x) with x binary and z shaped as the guide's z; its log p(x, z) is finite
    and the decoder's Bernoulli means match the frequency of ones (one latent, many x)."""
    import jax
    import jax.numpy as jnp

    from jaxelbo.models import vae

    net = (vae.build(jax.random.key(0), 6, hidden=(8,), latent_dim=2) if layers == 1 else
           vae.build_two_layer(jax.random.key(0), 6, hidden=((8,), (8,)), latent_dims=(3, 2)))
    theta, phi = net.params["model"], net.params["guide"]
    z, x = jax.vmap(lambda k: net.model.sample(theta, k))(jax.random.split(jax.random.key(1), 1000))
    z_guide = net.guide.sample(phi, jax.random.key(2), x[0])
    assert jax.tree.map(lambda a: a.shape[1:], z) == jax.tree.map(jnp.shape, z_guide)
    assert set(np.unique(np.asarray(x)).tolist()) <= {0.0, 1.0}
    z0 = jax.tree.map(lambda a: a[0], z)
    assert np.isfinite(float(net.model.log_prior(theta, z0) + net.model.log_likelihood(theta, x[0], z0)))
    # marginal frequency of ones equals E_z[sigmoid(decoder(z))] (Monte Carlo over the same z)
    z1 = z if layers == 1 else z[0]
    means = np.asarray(jax.vmap(lambda a: net.decode(theta, a))(z1))
    np.testing.assert_allclose(np.asarray(x).mean(0), means.mean(0), atol=4 * 0.5 / np.sqrt(1000))
