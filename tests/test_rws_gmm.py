"""A small version of benchmarks/rws_gmm.py (Le et al. 2019's GMM): it trains, and learns."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rws_gmm


def test_the_true_posterior_is_normalised_and_the_methods_build():
    import jax.numpy as jnp
    post = rws_gmm.true_posterior(jnp.array([[0.0], [95.0]]))
    np.testing.assert_allclose(post.sum(-1), 1.0, rtol=1e-5)
    assert int(post[1].argmax()) in (9, 10)
    for method in rws_gmm.METHODS:
        rws_gmm.make_loss(method, 2)


@pytest.mark.slow
def test_rws_wake_phi_learns_the_posterior_in_a_short_run():
    rec = rws_gmm.run_config("rws-wake", 10, seeds=2, steps=100, log_every=50, lr=1e-2)
    q = np.asarray(rec["q_error"])
    p = np.asarray(rec["p_error"])
    assert q.shape == p.shape == (2, 3) and np.all(np.isfinite(q))
    assert np.all(q[:, -1] < q[:, 0]), q             # the inference network improves
    assert np.all(p[:, -1] < p[:, 0]), p             # and so does the model
