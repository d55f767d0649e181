"""Tests of jaxelbo.app.training, jaxelbo.app.evaluation and the train/evaluate commands."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo import registry
from jaxelbo.app import checkpoint, data, evaluation, training
from jaxelbo.models import vae

D = 64


@pytest.fixture(scope="module")
def tiny():
    net = vae.build(jax.random.key(0), D, hidden=(16,), latent_dim=3)
    x = data.BatchIterator(data.load().train, 8, seed=0)
    return net, x


@pytest.fixture(scope="module")
def dreg_step(tiny):
    """One compiled IWAE-DReG step shared by the loop tests (compiled once)."""
    net, _ = tiny
    opt = training.make_optimizer(3e-3)
    loss_fn = registry.make("iwae", net.model, net.guide, estimator="dreg", num_samples=4)
    return opt, training.make_train_step(loss_fn, opt)


@pytest.mark.parametrize("objective", list(je.OBJECTIVES))
def test_registry_builds_every_objective_on_the_vae(tiny, objective):
    net, it = tiny
    estimator = je.OBJECTIVES[objective][-1]
    loss_fn = registry.make(objective, net.model, net.guide, estimator=estimator, num_samples=4)
    loss, aux = jax.eval_shape(loss_fn, net.params, jax.random.key(0), jnp.asarray(it.batch(0)))
    chex.assert_shape(loss, ())
    expected = (8, 2, 2) if registry.get(objective).nested else (8, 4)
    chex.assert_shape(aux["log_weights"], expected)


def test_partition_gives_each_part_its_own_optimizer(tiny):
    net, it = tiny
    opt = training.make_optimizer(1e-2, guide_learning_rate=0.0)
    loss_fn = registry.make("iwae", net.model, net.guide, estimator="dreg", num_samples=4)
    step = training.make_train_step(loss_fn, opt)
    params, _, metrics = step(net.params, opt.init(net.params), jax.random.key(0), jnp.asarray(it.batch(0)))
    chex.assert_trees_all_equal(params["guide"], net.params["guide"])
    kernel = params["model"]["net"]["out"]["kernel"]
    assert not np.allclose(kernel, net.params["model"]["net"]["out"]["kernel"])
    assert set(metrics) == {"loss", "bound", "ess", "grad_norm", "skipped_steps"}


def test_non_finite_step_is_skipped_and_counted():
    params = {"model": {"w": jnp.ones(3)}, "guide": {"v": jnp.ones(2)}}

    def loss_fn(p, rng, x):  # NaN gradient when x has a NaN
        b = jnp.sum(p["model"]["w"] * x[:, :3], -1) + jnp.sum(p["guide"]["v"])
        return -jnp.mean(b), {"bound": b, "ess": jnp.ones_like(b)}

    opt = training.make_optimizer(0.1)
    step = training.make_train_step(loss_fn, opt)
    state = opt.init(params)
    bad = jnp.full((2, 3), jnp.nan)
    p1, state, m = step(params, state, jax.random.key(0), bad)
    chex.assert_trees_all_equal(p1, params)
    assert int(m["skipped_steps"]) == 1
    p2, state, m = step(p1, state, jax.random.key(0), jnp.ones((2, 3)))
    assert int(m["skipped_steps"]) == 1 and not np.allclose(p2["model"]["w"], 1.0)


@pytest.mark.slow  # eager DReG steps dispatch op by op
def test_jit_step_equals_eager():
    lg = je.models.linear_gaussian
    params = lg.optimal_params(jnp.zeros(3))
    params["guide"]["A"] = params["guide"]["A"] + 0.1
    opt = training.make_optimizer()
    loss_fn = registry.make("iwae", lg.model(), lg.guide(), estimator="dreg", num_samples=4)
    args = (params, opt.init(params), jax.random.key(1), jnp.ones((5, 3)))
    a = training.make_train_step(loss_fn, opt)(*args)
    b = training.make_train_step(loss_fn, opt, jit=False)(*args)
    chex.assert_trees_all_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(a[2], b[2], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 14 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_interrupted_run_resumes_to_the_same_params(tiny, dreg_step, tmp_path):
    """8 steps straight == Ctrl-C during the third chunk (the second is saved on the interrupt) + resume."""
    net, it = tiny
    opt, step = dreg_step
    kw = dict(log_every=2, checkpoint_every=6, progress=False)
    straight = training.train(step, net.params, opt.init(net.params), it, num_steps=8, seed=3,
                              out_dir=tmp_path / "a", **kw)
    chunk = training.make_train_chunk(step, it, seed=3)
    calls = []

    def interrupted(params, opt_state, start, stop):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((start, stop))
        return chunk(params, opt_state, start, stop)

    with pytest.raises(KeyboardInterrupt):
        training.train_loop(interrupted, net.params, opt.init(net.params), num_steps=8, out_dir=tmp_path / "b",
                            **kw)
    assert calls == [(0, 2), (2, 4)]
    assert checkpoint.latest_step(tmp_path / "b" / "checkpoints") == 4
    # a record written after the last checkpoint by the interrupted run is dropped on resume
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "split": "train", "bound": 0.0}) + "\n")
    resumed = training.train(step, net.params, opt.init(net.params), it, num_steps=8, seed=3,
                             out_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.step == 8 and checkpoint.latest_step(tmp_path / "b" / "checkpoints") == 8
    chex.assert_trees_all_equal(straight.params, resumed.params)
    chex.assert_trees_all_equal(jax.tree.leaves(straight.opt_state), jax.tree.leaves(resumed.opt_state))
    a = training.read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = training.read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 8]
    assert [r["bound"] for r in a] == [r["bound"] for r in b]
    assert all(r["steps_per_second"] > 0 and r["non_finite_steps"] == 0 for r in a)


def test_resume_between_chunk_boundaries_is_bitwise_exact(tiny, dreg_step, tmp_path):
    """Chunks [0, 4), [4, 8) == chunks [0, 4), [4, 5), checkpoint at 5, resume [5, 8); both == step by step."""
    net, it = tiny
    opt, step = dreg_step
    kw = dict(seed=3, log_every=4, progress=False)
    straight = training.train(step, net.params, opt.init(net.params), it, num_steps=8, out_dir=tmp_path / "a",
                              **kw)
    first = training.train(step, net.params, opt.init(net.params), it, num_steps=5, out_dir=tmp_path / "b",
                           **kw)
    assert first.step == 5 and checkpoint.latest_step(tmp_path / "b" / "checkpoints") == 5
    resumed = training.train(step, net.params, opt.init(net.params), it, num_steps=8, out_dir=tmp_path / "b",
                             resume=True, **kw)
    chex.assert_trees_all_equal(straight.params, resumed.params)
    chex.assert_trees_all_equal(jax.tree.leaves(straight.opt_state), jax.tree.leaves(resumed.opt_state))
    b = training.read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == [4, 5, 8]
    assert b[0] == {**straight.history[0], "steps_per_second": b[0]["steps_per_second"]}
    # the loop computes what the iterator and step_key define: the same steps called one by one
    params, opt_state = net.params, opt.init(net.params)
    bounds = []
    for s in range(8):
        params, opt_state, m = step(params, opt_state, training.step_key(3, s), jnp.asarray(it.batch(s)))
        bounds.append(float(m["bound"]))
    chex.assert_trees_all_close(params, straight.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r["bound"] for r in straight.history], [np.mean(bounds[:4]), np.mean(bounds[4:])],
                               rtol=1e-5)


def test_non_finite_steps_inside_the_loop_are_skipped_and_counted():
    """Row 3 is NaN: the one step per epoch that draws it never touches params, and is counted."""
    params = {"model": {"w": jnp.ones(3)}, "guide": {"v": jnp.ones(2)}}

    def loss_fn(p, rng, x):  # NaN loss and gradient when the batch holds the NaN row
        b = jnp.sum(p["model"]["w"] * x[:, :3], -1) + jnp.sum(p["guide"]["v"] ** 2)
        return -jnp.mean(b), {"bound": b, "ess": jnp.ones_like(b)}

    x = np.arange(24, dtype=np.float32).reshape(8, 3) / 24
    x[3] = np.nan
    it = data.BatchIterator(x, 2, seed=1, binarization="none")
    opt = training.make_optimizer(0.1)
    step = training.make_train_step(loss_fn, opt)
    result = training.train(step, params, opt.init(params), it, num_steps=8, seed=0, log_every=4, progress=False)
    bad = [s for s in range(8) if np.isnan(it.batch(s)).any()]
    assert len(bad) == 2  # one step in each epoch of 4
    assert [r["non_finite_steps"] for r in result.history] == [1, 1]
    assert result.history[-1]["skipped_steps"] == 2
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["bound"]) for r in result.history)
    p, s = params, opt.init(params)
    for i in range(8):
        p, s, _ = step(p, s, training.step_key(0, i), jnp.asarray(it.batch(i)))
    chex.assert_tree_all_finite(result.params)
    chex.assert_trees_all_close(result.params, p, rtol=1e-6)
    assert int(training.skipped_steps(result.opt_state)) == 2


def test_loop_arguments_are_checked(tiny, dreg_step):
    net, it = tiny
    opt, step = dreg_step
    with pytest.raises(ValueError, match="seed"):
        training.make_train_chunk(step, it, seed=-1)
    chunk = training.make_train_chunk(step, it, seed=0)
    with pytest.raises(ValueError, match="start < stop"):
        chunk(net.params, opt.init(net.params), 4, 4)
    with pytest.raises(ValueError, match="log_every"):
        training.train_loop(chunk, net.params, opt.init(net.params), num_steps=4, log_every=0)


def test_checkpoint_roundtrip(tmp_path):
    params = {"model": {"w": jnp.arange(3.0)}, "guide": {"v": jnp.ones((2, 2))}}
    opt = training.make_optimizer()
    state = opt.init(params)
    checkpoint.save(tmp_path, 7, params, state)
    step, p, s, _ = checkpoint.restore(tmp_path, jax.tree.map(jnp.zeros_like, params), state)
    assert step == 7
    chex.assert_trees_all_equal(p, params)
    assert jax.tree.structure(s) == jax.tree.structure(state)
    with pytest.raises(FileNotFoundError):
        checkpoint.restore(tmp_path / "none", params, state)


def test_training_improves_the_bound(tiny, dreg_step):
    net, it = tiny
    opt, step = dreg_step
    val = evaluation.validation_fn(net.model, net.guide, data.evaluation_split(data.load(), "validation"),
                                   num_samples=8)
    before = float(val(net.params)["iwae_8"])
    result = training.train(step, net.params, opt.init(net.params), it, num_steps=300, seed=0, progress=False,
                            log_every=100)
    after = float(val(result.params)["iwae_8"])
    assert after > before + 2.0, (before, after)


@pytest.mark.slow  # 16 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_evaluate_reports_every_number(tiny):
    net, _ = tiny
    x = data.evaluation_split(data.load(), "test")[:40]
    out = evaluation.evaluate(net.model, net.guide, net.params, jax.random.key(0), x, encode=net.encode,
                              num_samples_ll=200, chunk_size=50, num_samples_iwae=16, batch_size=16)
    for k in ("log_likelihood", "log_likelihood_stderr", "iwae_16", "elbo", "active_units", "surgery_elbo",
              "surgery_reconstruction", "surgery_index_code_mi", "surgery_marginal_kl", "surgery_avg_kl"):
        assert k in out and np.isfinite(out[k]), k
    assert out["elbo"] <= out["iwae_16"] <= out["log_likelihood"] + 3 * out["log_likelihood_stderr"]
    assert 0 <= out["active_units"] <= 3
    assert out["surgery_index_code_mi"] <= np.log(40) + 1e-3
    mi_plus_kl = out["surgery_index_code_mi"] + out["surgery_marginal_kl"]
    np.testing.assert_allclose(out["surgery_avg_kl"], mi_plus_kl, rtol=1e-4)


def test_active_units_counts_varying_means():
    def encode(phi, x):
        return jnp.stack([x[:, 0], 0.01 * x[:, 0], jnp.zeros_like(x[:, 0])], -1), jnp.ones((x.shape[0], 3))

    x = jnp.linspace(-1, 1, 101)[:, None]
    count, var = evaluation.active_units(encode, None, x)
    assert count == 1 and var.shape == (3,)


def test_cli_rejects_bad_combinations_in_one_line(tmp_path, capsys):
    from jaxelbo.app.cli import main

    assert main(["train", "--objective", "elbo", "--estimator", "dreg", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "valid choices for elbo: reparam, stl, score" in err
    assert main(["train", "--objective", "miwae", "--num-samples", "64", "--num-outer", "5"]) == 2
    assert "divisor" in capsys.readouterr().err
    assert main(["train", "--eval-num-points", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--eval-num-points must be a positive integer" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_train_resume_and_evaluate(tmp_path, capsys):
    from jaxelbo.app.cli import main

    out = tmp_path / "run"
    common = ["train", "--steps", "6", "--batch-size", "16", "--num-samples", "4", "--hidden", "16",
              "--latent-dim", "3", "--eval-num-samples", "50", "--eval-chunk-size", "25", "--eval-every", "3",
              "--checkpoint-every", "3", "--log-every", "3", "--no-progress", "--eval-num-points", "30",
              "--out", str(out)]
    assert main(common) == 0
    for name in ("metrics.jsonl", "summary.json", "config.json", "curves.png", "reconstructions.png",
                 "samples.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and "log_likelihood" in summary["test"]
    assert summary["test"]["num_points"] == 30 and summary["test"]["log_likelihood_seconds"] > 0
    assert summary["device"]["platform"] == "cpu" and summary["versions"]["jax"] == jax.__version__
    assert main([*common, "--resume"]) == 0  # already done: restores step 6, trains nothing
    capsys.readouterr()
    assert main(["evaluate", str(out), "--eval-num-samples", "50", "--no-surgery", "--eval-num-points", "20"]) == 0
    assert "log p(x), K=50" in capsys.readouterr().err  # the progress bar
    again = json.loads((out / "evaluation.json").read_text())
    assert again["step"] == 6 and np.isfinite(again["test"]["log_likelihood"])
    assert again["test"]["num_points"] == 20
    assert main(["evaluate", str(out), "--eval-num-points", "0"]) == 2
    assert "--eval-num-points must be a positive integer" in capsys.readouterr().err
    assert main([*common, "--resume", "--seed", "1"]) == 2
    assert "differ" in capsys.readouterr().err



# --------------------------------------------------------------------------- the loop's parts, one by one


def _loop_state(step, num_steps=10, **kw):
    return training.LoopState({"model": {"w": np.ones(2, np.float32)}}, (), step, num_steps,
                              training.MetricsWriter(None), **kw)


def _chunk_metrics(bound, non_finite=0, run=0):
    return {"loss": np.float32(-bound), "bound": np.float32(bound), "skipped_steps": np.int32(non_finite),
            "non_finite_steps": np.int32(non_finite), "consecutive_non_finite": np.int32(run)}


def test_metrics_writer_weights_chunks_by_their_finite_steps():
    writer = training.MetricsWriter(None)
    writer.add(2, _chunk_metrics(-10.0))
    writer.add(4, _chunk_metrics(-4.0, non_finite=2))  # 2 finite steps of 4
    writer.close_record(6)
    assert writer.history == [] and writer.unlogged == []
    writer.flush()
    (rec,) = writer.history
    assert rec["step"] == 6 and rec["bound"] == -7.0 and rec["non_finite_steps"] == 2 and rec["skipped_steps"] == 2
    writer.close_record(7)  # nothing collected: no record
    writer.flush()
    assert len(writer.history) == 1


def test_log_record_closes_a_record_at_multiples_and_at_the_end():
    action = training.log_record(4)
    for step, closed in ((3, False), (4, True), (10, True)):
        loop = _loop_state(step)
        loop.writer.add(1, _chunk_metrics(-1.0))
        assert action(loop, {}) is None
        assert (loop.writer.ready is not None) == closed, step


def test_divergence_stop_needs_the_run_of_bad_steps():
    action = training.divergence_stop(3)
    loop = _loop_state(5)
    loop.writer.add(5, _chunk_metrics(-1.0, non_finite=2, run=2))
    assert action(loop, _chunk_metrics(-1.0, run=2)) is None and loop.run_of_bad == 2 and not loop.writer.history
    assert action(loop, _chunk_metrics(-1.0, run=3)) == "diverged" and loop.run_of_bad == 3
    assert [r["step"] for r in loop.writer.history] == [5]  # the steps so far written at the step reached


def test_validation_runs_at_its_steps_and_at_the_end():
    seen = []
    action = training.validation(lambda p: seen.append(p) or {"iwae": np.float32(-3.5)}, 4)
    for step in (3, 4, 10):
        loop = _loop_state(step)
        action(loop, {})
        assert [r["step"] for r in loop.writer.history] == ([] if step == 3 else [step])
    assert loop.writer.history == [{"step": 10, "split": "validation", "iwae": -3.5}] and len(seen) == 2


def test_periodic_checkpoint_and_signal_stop_save_the_step_reached(tmp_path):
    for step, saved in ((3, None), (4, 4), (10, 10)):
        loop = _loop_state(step, ckpt_dir=tmp_path / str(step))
        training.periodic_checkpoint(4)(loop, {})
        assert loop.last_checkpoint == saved and checkpoint.latest_step(loop.ckpt_dir) == saved

    class Flag:
        signum = 0

    action = training.signal_stop(Flag)
    loop = _loop_state(3, ckpt_dir=tmp_path / "signal")
    loop.writer.add(3, _chunk_metrics(-1.0))
    assert action(loop, {}) is None
    Flag.signum = 15
    assert action(loop, {}) == "interrupted" and loop.saved == 3 and checkpoint.latest_step(loop.ckpt_dir) == 3
    assert [r["step"] for r in loop.writer.history] == [3]
    assert action(_loop_state(10), {}) is None  # the last step: the run completes


def test_train_settings_resume_and_cache_keys_come_from_the_fields():
    import dataclasses

    from jaxelbo.app.experiment import DEFAULTS, TrainSettings, as_settings

    s = TrainSettings()
    assert DEFAULTS["hidden"] == [200, 200] and as_settings(DEFAULTS) == s
    assert TrainSettings.from_dict(s.to_dict()) == s and json.loads(json.dumps(s.to_dict())) == s.to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1
    resume_keys = {f.name for f in dataclasses.fields(s) if s.resume_mismatches(s.replace(**{
        f.name: (7,) if f.name == "hidden" else "other" if isinstance(f.default, str) else 12345}))}
    assert resume_keys == {"dataset", "objective", "estimator", "num_samples", "num_outer", "beta", "alpha",
                           "batch_size", "seed", "learning_rate", "guide_learning_rate", "hidden", "latent_dim",
                           "binarization", "validation_size", "stochastic_layers",
                           "n", "num_partitions", "log_beta_min", "integration", "partition"}  # cubo/tvo's
    assert s.replace(steps=5).compile_key() == s.compile_key() != s.replace(num_samples=8).compile_key()
    assert s.replace(seed=5).compile_key() == s.compile_key()  # the seed lives in the params, not the step
