"""train_many: R runs as one vmapped program equal the runs trained alone, each with its own streams."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxelbo import registry
from jaxelbo.app import data, train_many, training
from jaxelbo.models import vae

NUM_STEPS, LOG_EVERY, RTOL = 12, 4, 1e-5

pytestmark = pytest.mark.slow  # three compiled loops (~25 s idle)


def _nan_sometimes(loss_fn):
    """The loss times NaN on about a third of the steps (keyed by the step's rng): skipped steps."""

    def loss(params, rng, x):
        value, aux = loss_fn(params, rng, x)
        bad = jax.random.uniform(jax.random.fold_in(rng, 7)) < 0.35
        return value * jnp.where(bad, jnp.nan, 1.0), aux

    return loss


@pytest.fixture(scope="module")
def table():
    x = np.asarray(jax.random.bernoulli(jax.random.key(3), 0.4, (48, 6)), np.float32)
    net = vae.build(jax.random.key(0), 6, hidden=(5,), latent_dim=2)
    opt = training.make_optimizer(1e-2)
    dreg = training.make_train_step(registry.make("iwae", net.model, net.guide, estimator="dreg", num_samples=3), opt)
    elbo = registry.make("elbo", net.model, net.guide, estimator="reparam", num_samples=2)
    flaky = training.make_train_step(_nan_sometimes(elbo), opt)
    runs = []
    for step_fn, seed in ((dreg, 0), (flaky, 0), (dreg, 1), (flaky, 5)):
        params = vae.build(jax.random.key(10 + seed), 6, hidden=(5,), latent_dim=2).params
        runs.append(train_many.Run(step_fn, params, opt.init(params), data.BatchIterator(x, 8, seed + 2), seed))
    many = train_many.train_many(runs, num_steps=NUM_STEPS, log_every=LOG_EVERY)
    alone = [training.train(r.step_fn, r.params, r.opt_state, r.batches, num_steps=NUM_STEPS, seed=r.seed,
                            log_every=LOG_EVERY, progress=False, write_metrics=False) for r in runs]
    return runs, many, alone


def _max_rel(a, b):
    errs = jax.tree.map(lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))
                                           / max(float(np.max(np.abs(np.asarray(v, np.float64)))), 1e-30)), a, b)
    return max(jax.tree.leaves(errs))


def test_params_equal_runs_trained_alone(table):
    runs, many, alone = table
    for m, a in zip(many, alone, strict=True):
        assert _max_rel(m.params, a.params) <= RTOL
        assert _max_rel(m.opt_state, a.opt_state) <= RTOL
    # negative control: the comparison tells runs apart (seeds, objectives differ)
    assert _max_rel(many[0].params, alone[2].params) > 1e-2
    assert _max_rel(many[1].params, alone[3].params) > 1e-2


def test_metrics_and_skipped_steps_are_per_run(table):
    runs, many, alone = table
    skipped = [m.skipped_steps for m in many]
    assert skipped == [int(training.skipped_steps(a.opt_state)) for a in alone]
    assert skipped[0] == skipped[2] == 0 and skipped[1] > 0 and skipped[3] > 0
    assert skipped[1] != skipped[3]  # the flaky runs draw their NaNs from their own loss streams
    for m, a in zip(many, alone, strict=True):
        assert [r["step"] for r in m.history] == [r["step"] for r in a.history] == [4, 8, 12]
        for rm, ra in zip(m.history, a.history, strict=True):
            assert rm["skipped_steps"] == ra["skipped_steps"]
            assert rm["non_finite_steps"] == ra["non_finite_steps"]
            np.testing.assert_allclose(rm["bound"], ra["bound"], rtol=1e-4)


def test_refuses_mismatched_runs(table):
    runs, _, _ = table
    other = runs[0]._replace(batches=data.BatchIterator(runs[0].batches.x, 4, 0))
    with pytest.raises(ValueError, match="same batch size"):
        train_many.train_many([runs[0], other], num_steps=2)
    with pytest.raises(ValueError, match="at least one run"):
        train_many.train_many([], num_steps=2)


def _bitwise_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_checkpoints_per_run_and_bitwise_resume(table, tmp_path):
    from jaxelbo.app import checkpoint

    runs, many, _ = table
    straight = [tmp_path / f"straight{i}" for i in range(len(runs))]
    full = train_many.train_many(runs, num_steps=NUM_STEPS, log_every=LOG_EVERY, out_dirs=straight,
                                 checkpoint_every=8)
    assert all(_bitwise_equal(f.params, m.params) for f, m in zip(full, many, strict=True))
    for i, d in enumerate(straight):  # each run has its own checkpoints and records
        assert checkpoint.steps(d / "checkpoints") == [8, 12]
        saved = checkpoint.restore(d / "checkpoints", runs[i].params, runs[i].opt_state)
        assert saved.step == 12 and _bitwise_equal(saved.params, full[i].params)
        assert [r["step"] for r in training.read_metrics(d / "metrics.jsonl")] == [4, 8, 12]
    # interrupted after 8 steps, then resumed: bitwise the uninterrupted table
    cut = [tmp_path / f"cut{i}" for i in range(len(runs))]
    train_many.train_many(runs, num_steps=8, log_every=LOG_EVERY, out_dirs=cut, checkpoint_every=8)
    resumed = train_many.train_many(runs, num_steps=NUM_STEPS, log_every=LOG_EVERY, out_dirs=cut,
                                    checkpoint_every=8, resume=True)
    for r, f in zip(resumed, full, strict=True):
        assert _bitwise_equal(r.params, f.params) and _bitwise_equal(r.opt_state, f.opt_state)
        assert [h["step"] for h in r.history] == [12] and r.skipped_steps == f.skipped_steps
    assert [r["step"] for r in training.read_metrics(cut[1] / "metrics.jsonl")] == [4, 8, 12]
    # negative control: the 8-step state trained 4 more steps from step 0 (not resumed) differs
    at8 = [checkpoint.restore(d / "checkpoints", r.params, r.opt_state, step=8) for d, r in zip(cut, runs, strict=True)]
    restarted = train_many.train_many([r._replace(params=a.params, opt_state=a.opt_state)
                                       for r, a in zip(runs, at8, strict=True)], num_steps=4, log_every=LOG_EVERY)
    assert not _bitwise_equal(restarted[0].params, full[0].params)
    # runs saved at different steps are refused
    checkpoint.save(cut[0] / "checkpoints", 13, full[0].params, full[0].opt_state)
    with pytest.raises(ValueError, match="same step"):
        train_many.train_many(runs, num_steps=14, out_dirs=cut, resume=True)
