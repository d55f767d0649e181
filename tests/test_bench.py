"""The throughput benchmark's harness (toy sizes), its references' gradients, and
``benchmarks/throughput.py``'s command line: where it writes, what it refuses, and what it says it skipped."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxelbo as je

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput  # noqa: E402  (benchmarks/ is not a package: the benchmark runs from a checkout)
from references import burda  # noqa: E402  (put on sys.path by the throughput module)


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    return parser.parse_args(["--out", str(tmp_path), "--no-progress", *extra])


@pytest.fixture(scope="module")
def vae_setup():
    """The Burda VAE as plain per-example JAX (same network as jaxelbo.models.vae, faster to build)."""
    model, guide = burda.model_and_guide()
    params = burda.init_params(jax.random.key(0))
    x = burda.random_binary_data(jax.random.key(1), 3)
    return model, guide, params, x, jax.random.key(2)


def _read(tmp_path):
    (json_path,) = tmp_path.glob("throughput-*.json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text()


def test_smoke_run_writes_json_and_markdown(tmp_path):
    args = _args(tmp_path, "--model", "plain", "--num-samples", "2", "--batch-size", "2",
                 "--repetitions", "2", "--objective", "iwae", "--estimator", "reparam",
                 "--no-references", "--no-log-likelihood", "--no-snr", "--no-loop")
    assert throughput.run(args) == 0
    result, md = _read(tmp_path)
    assert {r["name"] for r in result["gradient_steps"]} == {"jaxelbo iwae/reparam", "GEMM floor"}
    for row in result["gradient_steps"]:
        assert row["median_ms"] > 0 and np.isfinite(row["ratio_to_iwae"]) and row["floor_multiple"] > 0
    ref = next(r for r in result["gradient_steps"] if r["name"] == "jaxelbo iwae/reparam")
    assert ref["ratio_to_iwae"] == 1.0
    assert result["environment"]["versions"]["jax"] == jax.__version__
    assert "Ratio to plain IWAE" in md and "GEMM floor" in md
    # --no-references: every reference is listed as skipped, with the reason, in the JSON and the markdown
    assert {s["reference"] for s in result["skipped_references"]} == set(throughput.REFERENCE_NAMES)
    assert all(s["why"] == "--no-references" for s in result["skipped_references"])
    assert "References not run" in md and "| PyTorch | --no-references |" in md


@pytest.mark.slow
def test_smoke_run_all_sections(tmp_path):
    args = _args(tmp_path, "--num-samples", "2", "--batch-size", "2", "--repetitions", "2",
                 "--objective", "iwae", "--estimator", "reparam", "dreg",
                 "--ll-num-samples", "12", "--ll-num-points", "4", "--ll-chunk-sizes", "3", "6",
                 "--num-replicates", "3", "--no-loop")
    assert throughput.run(args) == 0
    result, md = _read(tmp_path)
    checks = [r["grad_check"] for r in result["gradient_steps"] if r.get("grad_check")]
    assert checks and all(c["ok"] for c in checks)
    assert {m["chunk_size"] for m in result["log_likelihood"]["memory"]} == {3, 6}
    assert result["snr_sweep"]["replicates_match_loop_max_rel_err"] < 1e-4
    assert {t["target"].split()[0] for t in result["targets"]} >= {"vmapped"}
    assert "Head to head" in md


@pytest.mark.slow
def test_training_loop_section_times_the_same_computation(tmp_path):
    args = _args(tmp_path, "--fast", "--only-loop", "--loop-num-samples", "2", "--batch-size", "8")
    assert throughput.run(args) == 0
    (json_path,) = tmp_path.glob("training-loop-*.json")
    result = json.loads(json_path.read_text())
    (row,) = result["training_loop"]["rows"]
    assert row["num_samples"] == 2 and row["steps"] >= 50
    assert row["tight_steps_per_s"] > 0 and row["loop_steps_per_s"] > 0 and row["ratio"] > 0
    assert row["params_max_rel_diff"] < 1e-5  # the loop trains on the tight loop's batches and keys
    assert result["gradient_steps"] == [] and result["log_likelihood"] is None
    (target,) = result["targets"]
    assert target["met"] == (row["ratio"] >= 0.95)
    md = json_path.with_suffix(".md").read_text()
    assert "Training loop" in md and "cpu (" in md and "Burda VAE" not in md


def test_bad_objective_is_rejected_with_choices(tmp_path, capsys):
    assert throughput.run(_args(tmp_path, "--objective", "iwea")) == 2
    err = capsys.readouterr().err
    assert "iwea" in err and "iwae" in err


def test_unsupported_pair_is_refused_as_train_refuses_it(tmp_path, capsys):
    wording = "objective 'elbo' does not support estimator 'dreg'; valid choices for elbo: reparam, stl, score"
    assert throughput.run(_args(tmp_path, "--objective", "elbo", "--estimator", "dreg")) == 2
    assert wording in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_default_output_is_runs_bench_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert throughput.output_dir(None) == tmp_path / "runs" / "bench"
    assert throughput.output_dir("elsewhere") == Path("elsewhere")
    package = Path(je.__file__).parent
    with pytest.raises(ValueError, match="inside the jaxelbo package"):
        throughput.output_dir(package / "results")


@pytest.mark.slow  # over 5 s (builds every reference contender): the slow gate
def test_skipped_references_say_why(vae_setup):
    model, guide, params, x, rng = vae_setup
    skipped = {}
    throughput.build_contenders(model, guide, params, x, rng, num_samples=2, pairs=[("iwae", "reparam")],
                                references=True, log=lambda msg: None, plain_model_row=False, skipped=skipped)
    assert skipped["hand-batched JAX iwae/dreg"].startswith("needs iwae/dreg among the timed pairs")
    assert "--model plain" in skipped["jaxelbo with a plain-JAX model"]
    assert "iwae/dreg" in skipped["TFP-JAX"] or "tfp-nightly" in skipped["TFP-JAX"]


def test_a_pair_that_refuses_this_k_is_listed_not_timed(vae_setup):
    """The default pairs include leave-one-out estimators (ovis), which need K >= 2: at K = 1
    they are listed with the constructor's reason and the other pairs are still timed."""
    model, guide, params, x, rng = vae_setup
    skipped = {}
    contenders = throughput.build_contenders(model, guide, params, x, rng, num_samples=1,
                                             pairs=[("iwae", "reparam"), ("iwae", "ovis")], references=False,
                                             log=lambda msg: None, plain_model_row=False, skipped=skipped)
    assert [c.name for c in contenders] == ["jaxelbo iwae/reparam", "GEMM floor"]
    assert "num_samples >= 2" in skipped["jaxelbo iwae/ovis at K = 1"]
    with pytest.raises(ValueError, match="num_samples >= 2"):     # the control: the pair itself refuses
        throughput.registry.make("iwae", model, guide, estimator="ovis", num_samples=1)


def test_the_benchmark_owns_its_flags_and_jaxelbo_has_no_bench_command(tmp_path):
    args = _args(tmp_path, "--fast", "--num-samples", "1", "8")
    assert args.fast and args.num_samples == [1, 8]
    proc = subprocess.run([sys.executable, "-m", "jaxelbo", "bench", "--fast"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'bench'" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_interleaved_times_and_paired_ratio():
    calls = []
    times = throughput.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                         repetitions=4, warmup=1)
    assert calls.count("a") == calls.count("b") == 5
    assert times["a"].shape == (4,)
    assert throughput.paired_ratio(np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 2.0])) == 2.0


def test_gemm_floor_flop_count_matches_xla():
    a = burda.gemm_floor_inputs(jax.random.key(0), 2, 3)
    cost = jax.jit(burda.gemm_floor).lower(a).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    assert cost["flops"] == pytest.approx(burda.gemm_flops(2, 3), rel=1e-6)


@pytest.mark.parametrize("estimator", ["reparam", "dreg"])
def test_hand_batched_matches_jaxelbo(vae_setup, estimator):
    model, guide, params, x, rng = vae_setup
    loss = je.iwae(model, guide, num_samples=4, estimator=estimator)
    want = jax.jit(jax.grad(lambda p: loss(p, rng, x)[0]))(params)
    hand = {"reparam": burda.hand_iwae_loss, "dreg": burda.hand_dreg_loss}[estimator]
    got = jax.jit(jax.grad(lambda p: hand(p, rng, x, num_samples=4)))(params)
    assert throughput.max_relative_error(got, want) < 1e-4


@pytest.mark.parametrize("estimator", ["reparam", "dreg"])
def test_torch_reference_gradients_match_jaxelbo(vae_setup, estimator):
    torch_ref = pytest.importorskip("references.torch_ref", exc_type=ImportError)
    model, guide, params, x, rng = vae_setup
    loss = je.iwae(model, guide, num_samples=5, estimator=estimator)
    want = jax.jit(jax.grad(lambda p: loss(p, rng, x)[0]))(params)
    eps = np.asarray(burda.noise(rng, x.shape[0], 5))
    got = torch_ref.gradients(params, np.asarray(x), eps, estimator)
    assert throughput.max_relative_error(got, want) < 1e-4
    if estimator == "dreg":  # and DReG really differs from IWAE for the guide
        iwae = jax.jit(jax.grad(lambda p: je.iwae(model, guide, num_samples=5)(p, rng, x)[0]))(params)
        assert throughput.max_relative_error(got["guide"], iwae["guide"]) > 1e-2


@pytest.mark.slow  # importing tfp and tracing its distributions takes ~10 s on 2 cores
def test_tfp_reference_guide_matches_and_model_differs(vae_setup):
    from references import tfp_ref

    if tfp_ref.available() is not None:
        pytest.skip("tfp-nightly not installed")
    _, _, params, x, rng = vae_setup
    got = jax.jit(jax.grad(lambda p: tfp_ref.dreg_loss(p, rng, x, num_samples=6)))(params)
    eps = jax.jit(lambda p: tfp_ref.noise(p, rng, x, num_samples=6))(params)
    want = jax.jit(jax.grad(burda.hand_dreg_loss_eps))(params, eps, x)
    assert throughput.max_relative_error(got["guide"], want["guide"]) < 1e-4
    assert throughput.max_relative_error(got["model"], want["model"]) > 1e-2  # w^2 on theta
