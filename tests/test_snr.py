"""Tests of the SNR engine (jaxelbo.snr: streaming moments, chunking and sharding invariance,
log-log fits) and of the experiment built on it (jaxelbo.app.rainforth: a reduced Rainforth
et al. (2018) / Tucker et al. (2019) SNR experiment whose slopes a wrong estimator would fail,
its records, tables, figures and command)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo import snr
from jaxelbo.app import rainforth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _noisy_quadratic(p, rng, x):
    """loss = sum (p - eps)^2 with eps ~ N(0, I): gradient 2 (p - eps), mean 2p, variance 4."""
    eps = jax.random.normal(rng, p.shape, p.dtype)
    return jnp.sum((p - eps) ** 2), None


# ----------------------------------------------------------------------------- moments


def test_moments_merge_matches_numpy():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(103, 4))
    total = snr.Moments(0, np.zeros(0), np.zeros(0))
    for chunk in np.array_split(data, [10, 11, 60]):
        total = total.merge(snr.Moments(len(chunk), chunk.mean(0), ((chunk - chunk.mean(0)) ** 2).sum(0)))
    assert total.count == 103
    np.testing.assert_allclose(total.mean, data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(total.variance, data.var(0, ddof=1), rtol=1e-12)


def test_gradient_moments_known_gradient():
    r = 4000
    p = jnp.array([0.5, -1.0, 2.0])
    m = snr.gradient_moments(_noisy_quadratic, p, jax.random.key(0), None, num_replicates=r)["loss"]
    assert m.count == r and m.mean.dtype == np.float64
    # mean 2p with standard error 2 / sqrt(R); variance 4 with standard error 4 sqrt(2 / R)
    np.testing.assert_allclose(m.mean, 2 * np.asarray(p), atol=5 * 2 / math.sqrt(r))
    np.testing.assert_allclose(m.variance, 4.0, atol=5 * 4 * math.sqrt(2 / r))
    np.testing.assert_allclose(snr.signal_to_noise(m.mean, m.variance), np.abs(np.asarray(p)),
                               atol=5 * math.sqrt(1.5 / r))


def test_matches_je_gradient_replicates():
    """Same key convention as je.gradient_replicates (replicate r uses split(rng, R)[r])."""
    params = {"model": jnp.array([0.5, -1.0]), "guide": jnp.array([[2.0, 0.1], [0.0, 1.0]])}

    def loss_fn(p, rng, x):
        k1, k2 = jax.random.split(rng)
        value = (jnp.sum(jnp.sin(p["model"] * jax.random.normal(k1, (2,))))
                 + jnp.sum(jnp.sin(p["guide"] * jax.random.normal(k2, (2, 2)))))
        return value, None

    rng = jax.random.key(4)
    reps = je.gradient_replicates(loss_fn, params, rng, None, num_replicates=64)
    flat = np.asarray(jax.vmap(lambda g: jax.flatten_util.ravel_pytree(g)[0])(reps), np.float64)
    m = snr.gradient_moments(loss_fn, params, rng, None, num_replicates=64, chunk_size=24)["loss"]
    np.testing.assert_allclose(m.mean, flat.mean(0), rtol=1e-4, atol=1e-6 * np.abs(flat).max())
    np.testing.assert_allclose(m.variance, flat.var(0, ddof=1), rtol=1e-4)


def test_chunking_does_not_change_the_result():
    p = jnp.arange(3.0)
    rng = jax.random.key(1)
    whole = snr.gradient_moments(_noisy_quadratic, p, rng, None, num_replicates=50)["loss"]
    for chunk in (7, 64):  # 7: a padded, masked last chunk; 64: one chunk larger than R
        parts = snr.gradient_moments(_noisy_quadratic, p, rng, None, num_replicates=50,
                                     chunk_size=chunk)["loss"]
        assert parts.count == 50
        np.testing.assert_allclose(parts.mean, whole.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(parts.variance, whole.variance, rtol=1e-5)


def test_memory_budget_forces_smaller_chunks():
    p = jnp.zeros(2000)
    rng = jax.random.key(2)
    kw = dict(num_replicates=300)
    small = snr.gradient_moments(_noisy_quadratic, p, rng, None, memory_budget_bytes=2**16, **kw)
    big = snr.gradient_moments(_noisy_quadratic, p, rng, None, **kw)
    np.testing.assert_allclose(small["loss"].mean, big["loss"].mean, rtol=1e-5, atol=1e-6)
    assert snr._balanced_chunk(8, 300, 1) == 8 and snr._balanced_chunk(2048, 10_000, 8) == 2000


def test_paired_difference_and_t_statistic():
    shifted = lambda p, rng, x: (_noisy_quadratic(p, rng, x)[0] + 0.3 * jnp.sum(p), None)
    fns = {"a": _noisy_quadratic, "b": shifted, "a2": _noisy_quadratic}
    m = snr.gradient_moments(fns, jnp.ones(2), jax.random.key(3), None, num_replicates=200,
                             pairs=[("b", "a"), ("a2", "a")])
    # b - a = 0.3 exactly on every replicate (same noise): zero variance, infinite t
    np.testing.assert_allclose(m["b-a"].mean, 0.3, rtol=1e-5)
    assert np.all(m["b-a"].variance < 1e-10)
    # identical estimators: difference exactly 0, t defined as 0
    assert np.all(m["a2-a"].mean == 0) and np.all(m["a2-a"].m2 == 0)
    np.testing.assert_array_equal(snr.paired_t(m["a2-a"]), 0.0)
    t = snr.paired_t(snr.Moments(100, np.array([1.0, -1.0]), np.array([99.0, 99.0])))
    np.testing.assert_allclose(t, [10.0, -10.0])


def test_bad_input_raises():
    with pytest.raises(ValueError, match="num_replicates"):
        snr.gradient_moments(_noisy_quadratic, jnp.ones(2), jax.random.key(0), None, num_replicates=1)
    with pytest.raises(ValueError, match="not one of"):
        snr.gradient_moments(_noisy_quadratic, jnp.ones(2), jax.random.key(0), None, num_replicates=4,
                             pairs=[("loss", "nope")])
    with pytest.raises(ValueError, match="chunk_size"):
        snr.gradient_moments(_noisy_quadratic, jnp.ones(2), jax.random.key(0), None, num_replicates=4,
                             chunk_size=0)
    with pytest.raises(ValueError, match="mean_reference"):
        snr.sweep(lambda k: {"a": _noisy_quadratic}, jnp.ones(2), jax.random.key(0), None, grid=[1],
                  num_replicates=4, mean_reference={"a": "b"})
    with pytest.raises(ValueError, match="valid choices: reparam, stl, dreg"):
        rainforth.rainforth_experiment(estimators=("score",))


# ----------------------------------------------------------------------------- layout, fits


def test_param_layout_groups():
    params = je.models.linear_gaussian.optimal_params(jnp.zeros(3), scale=0.8)
    layout = snr.param_layout(params)
    flat = jax.flatten_util.ravel_pytree(params)[0]
    assert layout.size == flat.size == 3 + 9 + 3
    assert layout.groups["theta"].size == 3 and layout.groups["phi"].size == 12
    assert set(layout.leaves) == {"model/mu", "guide/A", "guide/b"}
    np.testing.assert_array_equal(np.sort(np.concatenate([layout.groups["theta"], layout.groups["phi"]])),
                                  np.arange(15))


def test_fit_and_its_t_interval():
    k = np.array([1, 10, 100, 1000])
    exact = snr.fit_loglog(k, 3.0 * k**-0.5)
    assert exact.slope == pytest.approx(-0.5) and exact.stderr == pytest.approx(0.0, abs=1e-12)
    assert exact.intercept == pytest.approx(math.log(3.0)) and exact.dof == 2
    noisy = snr.fit_loglog(k, k**0.5 * np.array([1.05, 0.95, 1.02, 0.99]))
    low, high = rainforth.confidence_interval(noisy)
    assert low < 0.5 < high and noisy.num_points == 4
    # the 95% interval is slope -+ t_{0.975, dof} stderr (t = 4.303 for 2 dof)
    assert high - noisy.slope == pytest.approx(4.3027 * noisy.stderr, rel=1e-4)
    assert noisy.interval(1.0) == pytest.approx((noisy.slope - noisy.stderr, noisy.slope + noisy.stderr))
    # two points: a slope, but no stderr and no interval; non-positive points are left out
    two = snr.fit_loglog([1, 10, 100], [1.0, 0.0, 10.0])
    assert two.slope == pytest.approx(0.5) and two.num_points == 2 and two.stderr is None
    assert rainforth.confidence_interval(two) is None and two.interval(2.0) is None
    with pytest.raises(ValueError, match="at least 2 positive points"):
        snr.fit_loglog([1, 10], [1.0, 0.0])
    assert snr.geometric_grid(1000)[:4] == [1, 2, 3, 6] and snr.geometric_grid(1000)[-1] == 1000


@pytest.mark.slow  # 25 s in the cold gated CI of 2026-12-02 (load 4-7)
def test_gradient_snr_and_moments_agree_on_ddof():
    """je.gradient_snr and snr.gradient_moments use the same keys and the same ddof = 1."""
    lg = je.models.linear_gaussian
    params = lg.optimal_params(jnp.array([0.3, -0.2]))
    params["guide"]["b"] = params["guide"]["b"] + 0.4
    x = jnp.ones((2, 2))
    loss_fn = je.iwae(lg.model(), lg.guide(), num_samples=4, estimator="reparam")
    got = je.gradient_snr(loss_fn, params, jax.random.key(3), x, num_replicates=40)
    m = snr.gradient_moments(loss_fn, params, jax.random.key(3), x, num_replicates=40)["loss"]
    want = snr.signal_to_noise(m.mean, m.variance)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(got)[0], want, rtol=1e-3)


def test_sweep_accepts_keyword_grid_and_any_loss():
    def make(scale):
        return lambda p, rng, x: (scale * _noisy_quadratic(p, rng, x)[0], None)

    points = snr.sweep(make, jnp.ones(2), jax.random.key(0), None, grid=[{"scale": 1.0}, {"scale": 2.0}],
                       num_replicates=64)
    assert [p.setting for p in points] == [{"scale": 1.0}, {"scale": 2.0}]
    # scaling a loss scales mean and std alike, so the SNR stays |p| = 1 (up to noise)
    for p in points:
        assert np.all(np.abs(p.snr["loss"] - 1.0) < 5 * math.sqrt(1.5 / 64))


# ----------------------------------------------------------------------------- the experiment


@pytest.fixture(scope="module")
def reduced_experiment():
    """K in {8, 512}, R = 400, D = 10: two compiled programs; slopes within about 0.03 of theory.

    Compilation dominates (the run itself takes milliseconds). The non-partitionable threefry
    compiles vmapped per-sample keys about twice as fast on CPU; it changes which random
    numbers are drawn, not their distribution (the default is exercised by the other tests).
    """
    with jax.threefry_partitionable(False):
        return rainforth.rainforth_experiment(seed=0, num_replicates=400, k_grid=(8, 512), m_grid=(), dim=10,
                                              num_points=256, fit_min=8)


def test_reduced_experiment_slopes(reduced_experiment):
    slopes = reduced_experiment.slopes["num_samples"]
    tol = 0.15  # a wrong estimator is off by ~1.0 in the phi slopes (see below)
    assert slopes["reparam"]["theta"].slope == pytest.approx(0.5, abs=tol)
    assert slopes["reparam"]["phi"].slope == pytest.approx(-0.5, abs=tol)
    assert slopes["dreg"]["phi"].slope == pytest.approx(0.5, abs=tol)
    assert slopes["dreg"]["phi"].expected == 0.5 and slopes["stl"]["phi"].expected is None
    # the same checks would catch a swapped estimator: STL's phi slope is positive, so
    # passing it off as reparam fails, and reparam passed off as DReG fails as well
    assert abs(slopes["stl"]["phi"].slope - (-0.5)) > 3 * tol
    assert abs(slopes["reparam"]["phi"].slope - 0.5) > 3 * tol
    # the theta gradient is the same estimator for all three (paired on the same keys)
    for e in ("stl", "dreg"):
        assert slopes[e]["theta"].slope == pytest.approx(slopes["reparam"]["theta"].slope, abs=1e-6)
    # two K values: slopes without an interval, and a note that says so
    assert slopes["dreg"]["phi"].ci_low is None and slopes["dreg"]["phi"].num_points == 2
    assert any("without a confidence interval" in note for note in reduced_experiment.notes)


def test_reduced_experiment_variance_and_bias(reduced_experiment):
    checks = reduced_experiment.checks
    assert checks.phi_variance_ordering.holds
    # STL - DReG: biased for K > 1, so the paired t grows with K; a biased "DReG" would show
    # up in DReG - IWAE instead, whose rms t is ~1 (5 is far above its sampling spread)
    for row in checks.stl_dreg.per_k:
        assert row.rms_t > 5
    for row in checks.dreg_reparam.per_k:
        assert row.rms_t < 2
    record = reduced_experiment.k_sweep[-1]
    assert record.num_samples == 512 and record.estimators["reparam"].mean_from == "dreg"


def test_result_round_trips_through_json(reduced_experiment):
    data = json.loads(json.dumps(reduced_experiment.to_json()))
    assert rainforth.Result.from_json(data) == reduced_experiment
    assert set(data["checks"]) == {"phi_variance_ordering", "stl-dreg", "dreg-reparam"}
    assert data["slopes"]["num_samples"]["dreg"]["phi"]["fit_range"] == [8, 512]


def test_committed_results_still_load():
    """benchmarks/results/snr/snr.json (written before the typed records) loads and renders."""
    result = rainforth.load_result(os.path.join(ROOT, "benchmarks", "results", "snr"))
    assert result.settings.num_replicates == 10_000 and len(result.k_sweep) == 13
    assert result.slopes["num_samples"]["dreg"]["phi"].slope == pytest.approx(0.5, abs=0.05)
    assert "| K | DReG | phi |" in rainforth.markdown(result)


def _records(axis, grid, phi_snr):
    """Synthetic sweep records whose element-mean SNR is the given phi series (theta = 1)."""
    def est(v):
        summary = {g: rainforth.GroupSummary(v if g == "phi" else 1.0, 0, 0, 0) for g in ("theta", "phi")}
        return rainforth.EstimatorRecord(summary, summary, "dreg", {"theta": 1.0, "phi": 1.0})

    return [rainforth.PointRecord(seconds=0.0, estimators={"dreg": est(v)}, pairs={}, **{axis: x})
            for x, v in zip(grid, phi_snr, strict=True)]


def test_small_grids_fit_what_they_can_and_say_why():
    """--k-grid 1,10,100 --m-grid 1,10: no K >= 100 pair, two M values, one K value."""
    notes = []
    k = rainforth.fit_slopes(_records("num_samples", [1, 10, 100], [1.0, 3.0, 10.0]), "num_samples",
                             ["dreg"], 100, notes)
    assert k["dreg"]["phi"].slope == pytest.approx(0.5, abs=0.03) and k["dreg"]["phi"].fit_range == [1, 100]
    assert k["dreg"]["phi"].ci_low is not None  # three points: an interval
    assert "fitted on the whole grid (K = 1..100)" in notes[0]
    m = rainforth.fit_slopes(_records("num_outer", [1, 10], [1.0, 3.16]), "num_outer", ["dreg"], 1, notes)
    assert m["dreg"]["phi"].ci_low is None and "M sweep: 2 settings" in notes[1]
    assert rainforth.format_slope(m["dreg"]["phi"]) == "+0.500 [no interval: 2 points]"
    assert rainforth.fit_slopes(_records("num_samples", [4], [1.0]), "num_samples", ["dreg"], 1, notes) == {}
    assert "no K slope" in notes[2]
    zero = rainforth.fit_slopes(_records("num_samples", [1, 10, 100], [1.0, 0.0, 10.0]), "num_samples",
                                ["dreg"], 1, notes)
    assert zero["dreg"]["phi"].num_points == 2 and "SNR 0 at K = 10, left out of the fit" in notes[-1]


def test_writers_and_replot(reduced_experiment, tmp_path):
    from jaxelbo.app.cli import build_parser
    from jaxelbo.app.commands import snr as cmd

    result = dataclasses.replace(reduced_experiment, wall_seconds=1.0, environment=cmd.environment())
    rainforth.write_csv(result, tmp_path / "snr.csv")
    rows = [r.split(",") for r in (tmp_path / "snr.csv").read_text().splitlines()]
    # K x estimators x (theta, phi, and the leaves model/mu, guide/A, guide/b)
    assert len(rows) == 1 + 2 * 3 * 5
    assert sum(r[5] in ("theta", "phi") for r in rows) == 2 * 3 * 2
    table = rainforth.markdown(result)
    assert "| K | DReG | phi |" in table and "Wall time" in table and "nan" not in table
    rainforth.plot(result, tmp_path / "snr.png")
    assert (tmp_path / "snr.png").stat().st_size > 10_000
    # --replot re-renders everything from snr.json without sweeping
    paths = rainforth.write_outputs(result, str(tmp_path / "out"))
    assert "snr_m.png" not in paths  # no M sweep, no M figure
    (tmp_path / "out" / "snr.md").unlink()
    assert cmd.run(build_parser().parse_args(["snr", "--out", str(tmp_path / "out"), "--replot"])) == 0
    assert (tmp_path / "out" / "snr.md").read_text() == table
    assert cmd.run(build_parser().parse_args(["snr", "--out", str(tmp_path / "empty"), "--replot"])) == 2


def test_command_flags():
    from jaxelbo.app.cli import build_parser
    from jaxelbo.app.commands import snr as cmd

    args = build_parser().parse_args(["snr", "--fast", "--max-num-samples", "100", "--estimator", "dreg"])
    settings = cmd.resolve_settings(args)
    assert settings["num_replicates"] == 1000 and settings["k_grid"][-1] == 100
    assert settings["m_grid"][-1] == 32 and settings["estimators"] == ("dreg",)
    args = build_parser().parse_args(["snr", "--k-grid", "1,10", "--max-num-samples", "5"])
    with pytest.raises(ValueError, match="not both"):
        cmd.resolve_settings(args)
    assert cmd.run(args) == 2


def test_estimators_are_spelled_as_train_spells_them(capsys):
    from jaxelbo.app.cli import build_parser
    from jaxelbo.app.commands import snr as cmd

    def estimators(*flags):
        return cmd.resolve_settings(build_parser().parse_args(["snr", *flags]))["estimators"]

    assert estimators() == ("reparam", "stl", "dreg")
    assert estimators("--objective", "iwae", "--estimator", "stl") == ("stl",)
    assert estimators("--objective", "jvi", "--estimator", "dreg") == estimators("--objective", "jvi") == ("jvi-dreg",)
    assert estimators("--objective", "rws", "--estimator", "dreg") == ("dreg-alpha",)
    assert capsys.readouterr().err == ""
    # the old spelling still works, with a note naming the new one
    assert estimators("--estimator", "jvi-dreg", "--estimator", "dreg") == ("jvi-dreg", "dreg")
    assert "use --objective jvi --estimator dreg" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--objective jvi does not support --estimator stl"):
        estimators("--objective", "jvi", "--estimator", "stl")


@pytest.mark.slow
def test_m_slopes_and_cli_end_to_end(tmp_path):
    """MIWAE: every estimator's SNR grows as sqrt(M) at fixed K; the command writes its files."""
    from jaxelbo.app.cli import main

    out = tmp_path / "snr"
    assert main(["snr", "--out", str(out), "--num-replicates", "400", "--k-grid", "4",
                 "--m-grid", "1,4,16", "--num-inner", "4", "--dim", "10", "--num-points", "64",
                 "--fit-min", "1", "--no-progress"]) == 0
    result = json.loads((out / "snr.json").read_text())
    for e in ("reparam", "stl", "dreg"):
        for g in ("theta", "phi"):
            assert result["slopes"]["num_outer"][e][g]["slope"] == pytest.approx(0.5, abs=0.12)
    for name in ("snr.csv", "snr.md", "snr.png", "snr_m.png"):
        assert (out / name).exists()
    assert result["environment"]["versions"]["jaxelbo"] == je.__version__


# ----------------------------------------------------------------------------- sharding


SHARDED_SCRIPT = textwrap.dedent("""
    import json, jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    import jaxelbo as je
    from jaxelbo import snr
    assert jax.device_count() == 8
    from jaxelbo.app import rainforth
    problem = rainforth.linear_gaussian_problem(jax.random.key(0), dim=4, num_points=16)
    fns = {e: je.iwae(problem.model, problem.guide, num_samples=16, estimator=e) for e in ("reparam", "dreg")}
    kw = dict(num_replicates=100, pairs=[("dreg", "reparam")])  # 100 is not a multiple of 8: padding
    mesh = snr.replicate_mesh(None)
    one = snr.gradient_moments(fns, problem.params, jax.random.key(1), problem.x, mesh=False, **kw)
    # 5 chunks of 20 replicates, each rounded up to 24 = 3 per device, the padding masked
    many = snr.gradient_moments(fns, problem.params, jax.random.key(1), problem.x, chunk_size=20, **kw)
    # errors relative to each element's scale |mean| + std (float32 sums in another order)
    scale = {k: np.abs(one[k].mean) + np.sqrt(one[k].variance) + 1e-12 for k in one}
    print(json.dumps({
        "mesh_devices": int(mesh.devices.size),
        "max_rel_mean": max(float(np.max(np.abs(many[k].mean - one[k].mean) / scale[k])) for k in one),
        "max_rel_var": max(float(np.max(np.abs(many[k].variance / one[k].variance - 1))) for k in one),
        "counts": [m[k].count for m in (one, many) for k in one],
    }))
""")


@pytest.mark.slow
@pytest.mark.multidevice
def test_sharded_replicates_equal_single_device():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mesh_devices"] == 8
    assert set(out["counts"]) == {100}
    assert out["max_rel_mean"] < 1e-5 and out["max_rel_var"] < 1e-4, out
