"""Fault injection: damaged checkpoints, bad data files and flags, shared output folders,
divergence, signals and kills. Each test replays a fault and asserts what the user sees
(one line naming the file or flag) and what survives (nothing lost, or at most the steps
since the last checkpoint).

The slow tests run the ``jaxelbo`` command in subprocesses on the digits data with a
tiny VAE; the others call the library or ``jaxelbo.app.cli.main`` in process.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxelbo.app import checkpoint, data, rundir, training
from jaxelbo.app.cli import main
from jaxelbo.models import vae

# --------------------------------------------------------------------------- helpers

TINY = ["--hidden", "8", "--latent-dim", "2", "--num-samples", "2", "--batch-size", "16",
        "--eval-num-samples", "20", "--eval-chunk-size", "10", "--no-surgery", "--no-progress"]


def _one_line_error(capsys, *needles: str) -> str:
    """The captured stderr, asserted to be one line holding every needle."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _snapshot(folder: Path) -> dict:
    """``{relative path: (size, mtime_ns, bytes hash)}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hash(p.read_bytes()))
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def state():
    """Params and optimiser state of a tiny VAE (the structure every checkpoint here has)."""
    net = vae.build(jax.random.key(0), 64, hidden=(8,), latent_dim=2)
    opt = training.make_optimizer(1e-3)
    return net.params, opt.init(net.params)


def _shifted(tree, by: float):
    return jax.tree.map(lambda a: a + by if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# --------------------------------------------------------------------------- checkpoints


def _damage(path: Path, mode: str, rng: random.Random) -> None:
    raw = bytearray(path.read_bytes())
    if mode == "scribble":  # 64 random bytes at a random place
        i = rng.randrange(len(raw))
        raw[i:i + 64] = rng.randbytes(min(64, len(raw) - i))
    elif mode == "truncate":
        del raw[len(raw) // 2:]
    elif mode == "bitflip":
        i = rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(raw))


def _scribble_biggest(folder: Path) -> None:
    """4096 random bytes over the start of the largest file of a checkpoint (its biggest array)."""
    biggest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(biggest.read_bytes())
    raw[:4096] = random.Random(0).randbytes(min(4096, len(raw)))
    biggest.write_bytes(bytes(raw))


def test_checkpoint_manifest_holds_a_checksum_of_every_array(state, tmp_path):
    params, opt_state = state
    folder = checkpoint.save(tmp_path, 5, params, opt_state, meta={"train_seconds": 1.5})
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    n = len(jax.tree.leaves({"params": params, "opt_state": opt_state}))
    assert manifest["step"] == 5 and len(manifest["arrays"]) == n
    assert any(k.startswith("['opt_state']") for k in manifest["arrays"])
    restored = checkpoint.restore(tmp_path, params, opt_state)
    assert restored.step == 5 and restored.meta == {"train_seconds": 1.5}
    assert _equal(restored.params, params) and _equal(restored.opt_state, opt_state)
    assert not [p for p in tmp_path.iterdir() if p.name != "5"]  # no temporary folder left


@pytest.mark.parametrize("mode", ["scribble", "truncate", "bitflip"])
def test_damaged_checkpoint_is_never_loaded_and_falls_back(state, tmp_path, mode):
    """Each file of the newest checkpoint damaged in turn: what restore returns is always
    exactly what was saved (the newest, if the damage did not touch its arrays, or the
    previous one, with one line naming the damaged checkpoint)."""
    params, opt_state = state
    saved = {s: _shifted(params, s) for s in (1, 2, 3)}
    for s in saved:
        checkpoint.save(tmp_path, s, saved[s], opt_state)
    assert checkpoint.steps(tmp_path) == [2, 3]  # keep=2
    rng = random.Random(mode)
    fell_back = 0
    for f in sorted(p for p in (tmp_path / "3").rglob("*") if p.is_file()):
        original = f.read_bytes()
        _damage(f, mode, rng)
        lines = []
        restored = checkpoint.restore(tmp_path, params, opt_state, warn=lines.append)
        assert _equal(restored.params, saved[restored.step]), f
        if restored.step == 2:
            fell_back += 1
            assert len(lines) == 1 and str(tmp_path / "3") in lines[0] and "\n" not in lines[0], lines
        else:
            assert restored.step == 3 and not lines
        f.write_bytes(original)
    assert fell_back >= 3, fell_back


def test_scribbled_array_file_is_refused_by_evaluate_and_skipped_by_resume(state, tmp_path):
    """4096 random bytes over the largest array file (the probe read 5 NaNs from it)."""
    params, opt_state = state
    checkpoint.save(tmp_path, 200, params, opt_state)
    checkpoint.save(tmp_path, 250, _shifted(params, 1.0), opt_state)
    _scribble_biggest(tmp_path / "250")
    with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path / "250")):
        checkpoint.restore(tmp_path, params, opt_state, step=250)
    lines = []
    restored = checkpoint.restore(tmp_path, params, opt_state, warn=lines.append)
    assert restored.step == 200 and _equal(restored.params, params) and len(lines) == 1


def test_non_finite_state_is_never_written(state, tmp_path):
    params, opt_state = state
    checkpoint.save(tmp_path, 1, params, opt_state)
    bad = jax.tree.map(lambda a: a.at[0].set(jnp.nan) if a.ndim else a, params)
    with pytest.raises(checkpoint.NonFiniteStateError, match="not finite"):
        checkpoint.save(tmp_path, 2, bad, opt_state)
    assert checkpoint.steps(tmp_path) == [1]


def test_newest_good_checkpoint_survives_until_a_newer_one_verified(state, tmp_path, monkeypatch):
    """A save whose read-back differs (a disk that corrupts writes) deletes nothing."""
    params, opt_state = state
    checkpoint.save(tmp_path, 1, params, opt_state)
    checkpoint.save(tmp_path, 2, params, opt_state)
    real = checkpoint._read
    monkeypatch.setattr(checkpoint, "_read", lambda path, target: _shifted(real(path, target), 1e-3))
    with pytest.raises(checkpoint.CheckpointError, match="did not read back"):
        checkpoint.save(tmp_path, 3, params, opt_state)
    monkeypatch.setattr(checkpoint, "_read", real)
    assert checkpoint.steps(tmp_path) == [1, 2]
    assert checkpoint.restore(tmp_path, params, opt_state).step == 2


def test_checkpoint_of_another_model_is_refused_in_one_line(state, tmp_path):
    params, opt_state = state
    checkpoint.save(tmp_path, 1, params, opt_state)
    other = vae.build(jax.random.key(0), 64, hidden=(8,), latent_dim=3).params
    with pytest.raises(checkpoint.CheckpointError, match="another model"):
        checkpoint.restore(tmp_path, other, training.make_optimizer().init(other), step=1)


def test_a_manifest_whose_step_differs_from_its_folder_is_refused(state, tmp_path):
    params, opt_state = state
    checkpoint.save(tmp_path, 4, params, opt_state)
    checkpoint.save(tmp_path, 8, _shifted(params, 1.0), opt_state)
    manifest = tmp_path / "8" / checkpoint.MANIFEST
    manifest.write_text(manifest.read_text().replace('"step": 8', '"step": 12'))
    with pytest.raises(checkpoint.CheckpointError, match=r"manifest says step 12, its folder 8"):
        checkpoint.restore(tmp_path, params, opt_state, step=8)
    lines = []
    restored = checkpoint.restore(tmp_path, params, opt_state, warn=lines.append)  # --resume falls back
    assert restored.step == 4 and _equal(restored.params, params) and len(lines) == 1


_SAVER = textwrap.dedent("""
    import sys
    import jax
    from jaxelbo.app import checkpoint, training
    from jaxelbo.models import vae
    params = vae.build(jax.random.key(0), 64, hidden=(8,), latent_dim=2).params
    opt_state = training.make_optimizer().init(params)
    step = checkpoint.latest_step(sys.argv[1]) or 0
    while True:
        step += 1
        checkpoint.save(sys.argv[1], step, jax.tree.map(lambda a: a + step, params), opt_state)
        print("saved", step, flush=True)
""")


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_leaves_a_verified_checkpoint(state, tmp_path):
    params, opt_state = state
    rng = random.Random(1)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().startswith("saved")
        time.sleep(rng.uniform(0.0, 0.5))  # a save takes about 0.2 s: the kill lands anywhere in one
        proc.kill()
        proc.wait()
        proc.stdout.close()
        lines = []
        restored = checkpoint.restore(tmp_path, params, opt_state, warn=lines.append)
        assert not lines and _equal(restored.params, _shifted(params, restored.step))
    checkpoint.save(tmp_path, 10_000, params, opt_state)  # the next save clears what a kill left
    assert [p.name for p in tmp_path.iterdir() if not p.name.isdigit()] == []


# --------------------------------------------------------------------------- data files


def _mnist_dir(directory: Path, train=None, test=None) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    train = rng.integers(0, 256, (40, 4, 4), dtype=np.uint8) if train is None else train
    test = rng.integers(0, 256, (10, 4, 4), dtype=np.uint8) if test is None else test
    data.write_idx(directory / "train-images-idx3-ubyte.gz", train)
    data.write_idx(directory / "t10k-images-idx3-ubyte.gz", test)
    return directory / "train-images-idx3-ubyte.gz"


def _gz_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-20])


def _not_gzip(path: Path) -> None:
    path.write_bytes(b"this is not gzip data at all")


def _payload_cut_short(path: Path) -> None:
    with gzip.open(path) as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-7])


def _labels_as_images(path: Path) -> None:
    labels = np.arange(40, dtype=np.uint8) % 10
    data.write_idx(path, labels)


@pytest.mark.parametrize("damage,needle", [(_gz_truncated, "gzip"), (_not_gzip, "gzip"),
                                           (_payload_cut_short, "truncated"),
                                           (_labels_as_images, "labels file")])
def test_bad_data_file_is_named_in_one_line(tmp_path, capsys, damage, needle):
    path = _mnist_dir(tmp_path / "data")
    damage(path)
    with pytest.raises(ValueError, match=needle) as e:
        data.load("mnist", tmp_path / "data", validation_size=5)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--validation-size", "5",
                 "--out", str(out), *TINY]) == 2
    _one_line_error(capsys, str(path), needle)
    assert not out.exists()


def test_nan_pixel_is_rejected_at_load_naming_the_file(tmp_path):
    x = np.random.default_rng(0).random((30, 16), dtype=np.float32)
    x[3, 5] = np.nan
    np.savez(tmp_path / "mnist.npz", x_train=x, x_test=x[:5] * 0)
    with pytest.raises(ValueError, match=r"mnist\.npz\[x_train\]: 1 pixel values are NaN"):
        data.load("mnist", tmp_path, validation_size=5)


def test_train_and_test_of_different_sizes_fail_at_load(tmp_path):
    _mnist_dir(tmp_path, test=np.zeros((10, 5, 5), np.uint8))
    with pytest.raises(ValueError, match="16 pixels but .*t10k.* of 25"):
        data.load("mnist", tmp_path, validation_size=5)


# --------------------------------------------------------------------------- flags and folders at the door


@pytest.mark.parametrize("flags,needle", [
    (["--learning-rate", "-1"], "--learning-rate must be finite and > 0, got -1.0"),
    (["--learning-rate", "nan"], "--learning-rate must be finite and > 0, got nan"),
    (["--learning-rate", "inf"], "--learning-rate must be finite and > 0"),
    (["--guide-learning-rate", "0"], "--guide-learning-rate must be finite and > 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--eval-chunk-size", "-1"], "--eval-chunk-size must be >= 0, got -1"),
    (["--batch-size", "5000"], "--batch-size 5000 is larger than the 1197 training images"),
    (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be a positive integer"),
])
def test_bad_flag_fails_at_the_door_in_one_line_leaving_no_folder(tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    assert main(["train", "--steps", "5", "--out", str(out), *TINY, *flags]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_out_that_is_a_file_or_unwritable_fails_in_one_line(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert main(["train", "--steps", "5", "--out", str(target), *TINY]) == 2
    _one_line_error(capsys, str(target), "is a file")
    assert target.read_text() == "keep me"
    assert main(["train", "--steps", "5", "--out", str(target / "sub"), *TINY]) == 2
    _one_line_error(capsys, "is a file")
    if os.geteuid() == 0:  # root writes through permissions: use a read-only mount instead
        locked = Path("/sys/jaxelbo-out")
        if os.access("/sys", os.W_OK) and not Path("/sys").is_mount():
            pytest.skip("no read-only folder to test with")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        locked = tmp_path / "ro" / "run"
    assert main(["train", "--steps", "5", "--out", str(locked), *TINY]) == 2
    _one_line_error(capsys, str(locked), "not writable")
    assert not locked.exists()


def test_second_run_on_a_locked_folder_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 50, "split": "train"}\n' * 9)
    (out / "config.json").write_text(json.dumps({"settings": {"seed": 0}}))
    with rundir.RunLock(out):  # what a running `jaxelbo train --out run` holds
        before = _snapshot(out)
        for extra in ([], ["--resume"], ["--overwrite"], ["--seed", "1"]):
            assert main(["train", "--steps", "5", "--out", str(out), *TINY, *extra]) == 2
            _one_line_error(capsys, str(out), "in use by another jaxelbo run")
            assert _snapshot(out) == before


def test_fresh_run_into_another_runs_folder_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 50}\n')
    assert main(["train", "--steps", "5", "--out", str(out), *TINY]) == 2
    _one_line_error(capsys, "holds another run's files (metrics.jsonl)", "--overwrite")
    assert (out / "metrics.jsonl").read_text() == '{"step": 50}\n'


def test_overwrite_deletes_only_what_a_run_wrote_and_foreign_folders_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "40").mkdir(parents=True)
    (out / "checkpoints" / "40" / checkpoint.MANIFEST).write_text("{}")
    (out / "checkpoints" / "model_epoch_90.pt").write_text("not jaxelbo's")
    (out / "notes.txt").write_text("mine")
    (out / "metrics.jsonl").write_text('{"step": 50}\n')
    rundir.prepare(out, resume=False, overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "checkpoints", "checkpoints/model_epoch_90.pt", "notes.txt"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_text("x")
    assert main(["train", "--steps", "5", "--out", str(foreign), "--overwrite", *TINY]) == 2
    _one_line_error(capsys, str(foreign), "not a jaxelbo run's (a.jpg)")
    assert sorted(p.name for p in foreign.iterdir() if p.name != ".lock") == ["a.jpg"]
    for special, needle in (("/", "the filesystem root"), (str(Path.home()), "the home folder")):
        assert main(["train", "--steps", "5", "--out", special, *TINY]) == 2
        _one_line_error(capsys, needle)


def test_resume_without_config_json_is_refused(state, tmp_path, capsys):
    """Without config.json the checkpoints' settings cannot be checked against the flags."""
    params, opt_state = state
    out = tmp_path / "run"
    checkpoint.save(out / "checkpoints", 3, params, opt_state)
    assert main(["train", "--steps", "5", "--seed", "1", "--resume", "--out", str(out), *TINY]) == 2
    _one_line_error(capsys, str(out / "config.json"), "is missing", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints"]


@pytest.mark.parametrize("config,needle", [
    ("{not json", "is not a valid jaxelbo run configuration"),
    ('{"settings": {}}', "is not a valid jaxelbo run configuration (missing 'dataset')"),
    ('[1, 2]', "is not a valid jaxelbo run configuration"),
])
def test_broken_config_json_in_evaluate_is_one_line(tmp_path, capsys, config, needle):
    (tmp_path / "config.json").write_text(config)
    assert main(["evaluate", str(tmp_path), "--eval-num-samples", "10"]) == 2
    _one_line_error(capsys, str(tmp_path / "config.json"), needle)


def test_evaluate_refuses_a_mismatched_or_damaged_checkpoint_in_one_line(state, tmp_path, capsys):
    params, opt_state = state
    settings = {"dataset": "digits", "data_dir": None, "validation_size": None, "learning_rate": 1e-3,
                "guide_learning_rate": None, "seed": 0, "binarization": "dynamic"}
    config = {"settings": settings, "vae": {"data_dim": 64, "hidden": [8], "latent_dim": 3}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    checkpoint.save(tmp_path / "checkpoints", 5, params, opt_state)
    checkpoint.save(tmp_path / "checkpoints", 7, params, opt_state)
    assert main(["evaluate", str(tmp_path), "--eval-num-samples", "10", "--no-surgery"]) == 2
    _one_line_error(capsys, str(tmp_path / "checkpoints" / "7"), "another model")
    config["vae"]["latent_dim"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    _scribble_biggest(tmp_path / "checkpoints" / "7")
    assert main(["evaluate", str(tmp_path), "--eval-num-samples", "10", "--no-surgery"]) == 2
    _one_line_error(capsys, str(tmp_path / "checkpoints" / "7"), "other checkpoints: steps 5 (pass --step)")
    assert not (tmp_path / "evaluation.json").exists()


# --------------------------------------------------------------------------- divergence


def _toy_loss(p, rng, x):
    """A loss whose value and gradient are NaN when the batch holds a NaN."""
    b = jnp.sum(p["model"]["w"] * x[:, :3], -1) + jnp.sum(p["guide"]["v"] ** 2)
    return -jnp.mean(b), {"bound": b, "ess": jnp.ones_like(b)}


_TOY = {"model": {"w": jnp.ones(3)}, "guide": {"v": jnp.ones(2)}}


def test_non_finite_steps_never_reach_params_however_many_in_a_row():
    """1500 NaN steps in a row (optax.apply_if_finite gives up after 1000 and applies the NaN)."""
    opt = training.make_optimizer(0.1)
    step = training.make_train_step(_toy_loss, opt, jit=False)
    bad = jnp.full((2, 3), jnp.nan)

    @jax.jit
    def many(params, opt_state):
        return jax.lax.fori_loop(0, 1500, lambda i, c: step(*c, jax.random.key(0), bad)[:2], (params, opt_state))

    params, opt_state = many(_TOY, opt.init(_TOY))
    assert _equal(params, _TOY) and not checkpoint.non_finite(opt_state)
    assert int(training.skipped_steps(opt_state)) == 1500
    assert int(training.consecutive_non_finite(opt_state)) == 1500
    params, opt_state, _ = step(params, opt_state, jax.random.key(0), jnp.ones((2, 3)))  # a finite step applies
    assert not np.allclose(params["model"]["w"], 1.0) and int(training.consecutive_non_finite(opt_state)) == 0


def test_an_update_that_would_overflow_the_params_is_skipped():
    opt = training.make_optimizer(3e38)  # finite gradient, finite update, params + update = inf
    step = training.make_train_step(_toy_loss, opt)
    params = {"model": {"w": jnp.full(3, 3e38)}, "guide": {"v": jnp.ones(2)}}
    new, opt_state, _ = step(params, opt.init(params), jax.random.key(0), jnp.ones((2, 3)))  # w grows
    assert _equal(new, params) and int(training.skipped_steps(opt_state)) == 1


def test_diverging_run_stops_after_max_nonfinite_steps_keeping_finite_params(tmp_path):
    x = np.full((8, 3), 0.5, np.float32)
    x[2:] = np.nan
    it = data.BatchIterator(x, 8, seed=1, binarization="none")  # one batch per epoch, all of x: every step NaN
    x_good = np.full((8, 3), 0.5, np.float32)
    opt = training.make_optimizer(0.1)
    step = training.make_train_step(_toy_loss, opt)
    good = training.train(step, _TOY, opt.init(_TOY), data.BatchIterator(x_good, 8, seed=1, binarization="none"),
                          num_steps=4, seed=0, log_every=2, progress=False, out_dir=tmp_path / "good",
                          checkpoint_every=2)
    result = training.train(step, good.params, good.opt_state, it, num_steps=1000, seed=0, log_every=3,
                            progress=False, max_nonfinite_steps=7)
    assert result.status == "diverged" and result.step == 9 and result.non_finite_run == 9
    assert _equal(result.params, good.params)  # no non-finite step reached them
    assert [r["step"] for r in result.history] == [3, 6, 9]
    assert all(r["non_finite_steps"] == 3 for r in result.history)


def test_a_finite_gradient_that_overflows_adams_state_is_a_skipped_step(tmp_path):
    """A gradient of 1e20 is finite, its square (Adam's nu) is not: such a step is skipped and
    counted, so a checkpoint is never refused and the run ends as diverged."""

    def loss(p, rng, x):
        b = 1e20 * jnp.sum(p["model"]["w"] * x[:, :3], -1) + jnp.sum(p["guide"]["v"] ** 2)
        return -jnp.mean(b), {"bound": b, "ess": jnp.ones_like(b)}

    opt = training.make_optimizer(0.1)
    step = training.make_train_step(loss, opt)
    batches = data.BatchIterator(np.full((8, 3), 0.5, np.float32), 8, seed=1, binarization="none")
    result = training.train(step, _TOY, opt.init(_TOY), batches, num_steps=20, seed=0, log_every=2,
                            checkpoint_every=2, out_dir=tmp_path, progress=False, max_nonfinite_steps=4)
    assert result.status == "diverged" and result.step == 4 and result.non_finite_run == 4
    assert not checkpoint.non_finite(result.opt_state) and _equal(result.params, _TOY)
    assert int(training.skipped_steps(result.opt_state)) == 4 and checkpoint.steps(tmp_path / "checkpoints") == [2]


def test_plots_skip_non_finite_points(tmp_path):
    from jaxelbo.app import plotting

    records = [{"step": s, "split": "train", "bound": b} for s, b in ((1, -90.0), (2, float("nan")),
                                                                      (3, float("inf")), (4, -80.0))]
    records.append({"step": 4, "split": "validation", "iwae_64": float("nan"), "elbo": -85.0})
    plotting.plot_curves(records, tmp_path / "curves.png")
    plotting.plot_curves([{"step": 1, "split": "train", "bound": float("nan")}], tmp_path / "nan.png")
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "nan.png").stat().st_size > 0


# --------------------------------------------------------------------------- signals and metrics


@pytest.fixture(scope="module")
def loop():
    """A compiled chunk of a tiny IWAE-DReG VAE on digits, shared by the loop tests."""
    from jaxelbo import registry

    net = vae.build(jax.random.key(0), 64, hidden=(8,), latent_dim=2)
    opt = training.make_optimizer(3e-3)
    step = training.make_train_step(registry.make("iwae", net.model, net.guide, estimator="dreg", num_samples=2),
                                    opt)
    chunk = training.make_train_chunk(step, data.BatchIterator(data.load().train, 16, seed=0), seed=0)
    return net, opt, chunk


def _steps(path: Path, split: str = "train") -> list[int]:
    return [r["step"] for r in training.read_metrics(path) if r["split"] == split]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_a_chunk_boundary_saving_the_step_and_resume_is_exact(loop, tmp_path, signum):
    net, opt, chunk = loop
    kw = dict(num_steps=12, log_every=1, checkpoint_every=8, progress=False)
    straight = training.train_loop(chunk, net.params, opt.init(net.params), out_dir=tmp_path / "a", **kw)
    calls, handler = [], signal.getsignal(signum)

    def signalled(params, opt_state, start, stop):
        calls.append(start)
        if len(calls) == 5:
            os.kill(os.getpid(), signum)  # arrives while the chunk [4, 5) runs
        return chunk(params, opt_state, start, stop)

    first = training.train_loop(signalled, net.params, opt.init(net.params), out_dir=tmp_path / "b",
                                handle_signals=True, **kw)
    assert first.status == "interrupted" and first.signum == signum and first.step == 5
    assert first.checkpoint_step == 5 and checkpoint.steps(tmp_path / "b" / "checkpoints") == [5]
    assert _steps(tmp_path / "b" / "metrics.jsonl") == [1, 2, 3, 4, 5]
    assert signal.getsignal(signum) is handler  # the handlers before the loop are back
    resumed = training.train_loop(chunk, net.params, opt.init(net.params), out_dir=tmp_path / "b", resume=True,
                                  handle_signals=True, **kw)
    assert resumed.status == "completed" and resumed.step == 12
    assert _equal(resumed.params, straight.params) and _equal(resumed.opt_state, straight.opt_state)
    a, b = (training.read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 13))
    assert [r["bound"] for r in b] == [r["bound"] for r in a]


def test_torn_last_metrics_line_is_dropped_on_resume_with_a_note(loop, tmp_path, capsys):
    net, opt, chunk = loop
    kw = dict(log_every=2, checkpoint_every=4, progress=False, out_dir=tmp_path)
    training.train_loop(chunk, net.params, opt.init(net.params), num_steps=4, **kw)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "split": "tra')  # a write cut short by a kill
    capsys.readouterr()
    training.train_loop(chunk, net.params, opt.init(net.params), num_steps=8, resume=True, **kw)
    _one_line_error(capsys, str(tmp_path / "metrics.jsonl"), "torn last line")
    assert _steps(tmp_path / "metrics.jsonl") == [2, 4, 6, 8]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("garbage\n")
        f.write('{"step": 9}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 5 is not a JSON record"):
        training.train_loop(chunk, net.params, opt.init(net.params), num_steps=10, resume=True, **kw)


def test_a_metrics_file_deleted_mid_run_is_written_again(loop, tmp_path, capsys):
    net, opt, chunk = loop
    calls = []

    def deleting(params, opt_state, start, stop):
        calls.append(start)
        if len(calls) == 3:
            (tmp_path / "metrics.jsonl").unlink()
        return chunk(params, opt_state, start, stop)

    capsys.readouterr()
    training.train_loop(deleting, net.params, opt.init(net.params), num_steps=6, log_every=1, progress=False,
                        out_dir=tmp_path)
    _one_line_error(capsys, str(tmp_path / "metrics.jsonl"), "deleted during the run")
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]


def test_resume_falls_back_past_a_damaged_checkpoint_to_the_same_params(loop, tmp_path, capsys):
    net, opt, chunk = loop
    kw = dict(log_every=2, checkpoint_every=4, progress=False)
    straight = training.train_loop(chunk, net.params, opt.init(net.params), num_steps=12,
                                   out_dir=tmp_path / "a", **kw)
    training.train_loop(chunk, net.params, opt.init(net.params), num_steps=8, out_dir=tmp_path / "b", **kw)
    _scribble_biggest(tmp_path / "b" / "checkpoints" / "8")
    capsys.readouterr()
    resumed = training.train_loop(chunk, net.params, opt.init(net.params), num_steps=12, resume=True,
                                  out_dir=tmp_path / "b", **kw)
    _one_line_error(capsys, str(tmp_path / "b" / "checkpoints" / "8"), "using step 4")
    assert _equal(resumed.params, straight.params)
    assert _steps(tmp_path / "b" / "metrics.jsonl") == [2, 4, 6, 8, 10, 12]
    assert checkpoint.steps(tmp_path / "b" / "checkpoints") == [8, 12]  # the damaged 8 rewritten, 4 pruned


# --------------------------------------------------------------------------- the command under kills and signals

RUN = ["--steps", "40", "--log-every", "5", "--checkpoint-every", "10", "--eval-every", "0", "--hidden", "8",
       "--latent-dim", "2", "--num-samples", "2", "--batch-size", "16", "--eval-num-samples", "0", "--no-surgery",
       "--no-progress"]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxelbo", "train", *RUN, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def _records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "steps_per_second"}
            for r in training.read_metrics(out / "metrics.jsonl")]


def _final_arrays(out: Path, step: int = 40) -> dict:
    """The checksums of every array of the checkpoint of ``step`` (equal: bitwise the same state)."""
    return json.loads((out / "checkpoints" / str(step) / checkpoint.MANIFEST).read_text())["arrays"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the command, which the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, _, err = _finish(_start(out))
    assert code == 0, err
    return out


@pytest.mark.slow
def test_sigkill_and_sigint_at_random_moments_lose_nothing(reference, tmp_path):
    out = tmp_path / "run"
    proc = _start(out)  # killed while a checkpoint is being written
    _wait_for(lambda: any(p.name.startswith("tmp-") for p in (out / "checkpoints").glob("*")), proc)
    proc.kill()
    _finish(proc)
    for signum in (signal.SIGINT, signal.SIGKILL):  # mid-run: once the resumed loop has saved a new checkpoint
        resumed_from = checkpoint.latest_step(out / "checkpoints") or 0
        proc = _start(out, "--resume")
        _wait_for(lambda c=resumed_from: (checkpoint.latest_step(out / "checkpoints") or 0) > c, proc)
        proc.send_signal(signum)
        code, _, err = _finish(proc)
        if signum == signal.SIGINT:  # Ctrl-C: the reached step saved, one line, no traceback
            assert code == 130 and err.count("\n") == 1 and "interrupted by SIGINT" in err, (code, err)
    code, _, err = _finish(_start(out, "--resume"))
    assert code == 0, err
    assert _final_arrays(out) == _final_arrays(reference)
    assert _records(out) == _records(reference)  # no gap, no duplicate, the same numbers


@pytest.mark.slow
def test_sigterm_saves_the_step_refuses_a_second_run_and_resumes_exactly(reference, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert err.count("\n") == 1 and "interrupted by SIGTERM at step" in err and "Traceback" not in err, err
    summary = json.loads((out / "summary.json").read_text())
    step = summary["steps"]
    assert summary["status"] == "interrupted" and summary["last_checkpoint"] == step < 40
    assert checkpoint.latest_step(out / "checkpoints") == step  # the reached step, not the last multiple of 10
    assert _records(out) == _records(reference)[:len(_records(out))] and _records(out)[-1]["step"] == step
    proc = _start(out, "--resume")
    _wait_for(lambda: (out / ".lock").exists() and (out / ".lock").read_text() == str(proc.pid), proc)
    config = (out / "config.json").read_bytes()
    capsys.readouterr()
    assert main(["train", *RUN, "--out", str(out), "--overwrite"]) == 2  # a second run while it holds the lock
    _one_line_error(capsys, "in use by another jaxelbo run", f"(pid {proc.pid})")
    assert (out / "config.json").read_bytes() == config
    code, _, err = _finish(proc)
    assert code == 0, err
    assert _final_arrays(out) == _final_arrays(reference) and _records(out) == _records(reference)
    done = json.loads((out / "summary.json").read_text())
    # a resume of the finished run: trains nothing and reports the run's real numbers
    code, printed, err = _finish(_start(out, "--resume"))
    assert code == 0, err
    again = json.loads((out / "summary.json").read_text())
    assert again["status"] == "completed" and again["steps"] == 40 and again["skipped_steps"] == 0
    for key in ("final_train", "steps_per_second", "test"):
        assert again[key] == done[key] and again[key] is not None, key
    assert again["wall_seconds"]["train"] == pytest.approx(done["wall_seconds"]["train"], rel=0.2)
    assert again["wall_seconds"]["train"] > 0.5 and "train 0.0 s" not in printed


@pytest.mark.slow
def test_diverging_command_ends_cleanly_with_a_summary(tmp_path):
    out = tmp_path / "run"
    code, _, err = _finish(_start(out, "--learning-rate", "1e6", "--max-nonfinite-steps", "8"))
    assert code == 1, err
    assert err.count("\n") == 1 and "diverged" in err and "last finite checkpoint" in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["non_finite_in_a_row"] >= 8
    assert summary["skipped_steps"] >= 8 and summary["steps"] < 40
    assert (out / "curves.png").is_file()
    for step in checkpoint.steps(out / "checkpoints"):
        restored = json.loads((out / "checkpoints" / str(step) / checkpoint.MANIFEST).read_text())
        assert restored["step"] == step  # only verified (hence finite) checkpoints exist


def test_evaluate_of_an_empty_split_is_one_line(state, tmp_path, capsys):
    params, opt_state = state
    settings = {"dataset": "digits", "data_dir": None, "validation_size": 0, "learning_rate": 1e-3,
                "guide_learning_rate": None, "seed": 0, "binarization": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(
        {"settings": settings, "vae": {"data_dim": 64, "hidden": [8], "latent_dim": 2}}))
    checkpoint.save(tmp_path / "checkpoints", 3, params, opt_state)
    assert main(["evaluate", str(tmp_path), "--split", "validation", "--eval-num-samples", "10"]) == 2
    _one_line_error(capsys, "validation split", "is empty")


@pytest.mark.slow
def test_interrupt_during_the_final_evaluation_still_writes_the_summary(tmp_path, capsys, monkeypatch):
    from jaxelbo.app import evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate", interrupted)
    out = tmp_path / "run"
    assert main(["train", *RUN, "--steps", "4", "--out", str(out)]) == 130
    _one_line_error(capsys, "interrupted by SIGINT at step 4; last checkpoint: step 4")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["test"] is None and summary["steps"] == 4


def test_empty_batch_is_one_line_naming_x():
    import jaxelbo as je

    net = vae.build(jax.random.key(0), 64, hidden=(8,), latent_dim=2)
    for objective in (je.iwae, je.elbo):
        with pytest.raises(ValueError, match=r"x is an empty batch \(leading axis B = 0\)"):
            objective(net.model, net.guide, num_samples=2)(net.params, jax.random.key(0), jnp.zeros((0, 64)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step run of the command (in process), copied by the tests that resume it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *RUN, "--steps", "4", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_an_interrupt_while_plotting_keeps_the_summary(finished, tmp_path, monkeypatch):
    import shutil

    from jaxelbo.app import plotting

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "summary.json").unlink()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plotting, "plot_run", interrupted)
    assert main(["train", *RUN, "--steps", "4", "--out", str(out), "--resume"]) == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test"] is not None and summary["steps"] == 4


@pytest.mark.slow
def test_a_resume_killed_midway_leaves_no_summary_of_the_shorter_run(finished, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)

    def killed(*args, **kwargs):  # the process dies while the resumed session trains
        raise SystemExit(137)

    monkeypatch.setattr(training, "train", killed)
    with pytest.raises(SystemExit):
        main(["train", *RUN, "--steps", "8", "--out", str(out), "--resume"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "running" and summary["previous"]["steps"] == 4


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_exits_143_in_one_line(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "--steps", "10", "--eval-num-samples", "20000", "--eval-chunk-size", "500")
    _wait_for(lambda: (out / "checkpoints" / "10").is_dir(), proc, timeout=300)
    time.sleep(1.0)  # the evaluation of 20000 samples per image takes far longer
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == 128 + signal.SIGTERM, (code, err)
    assert err.count("\n") == 1 and "interrupted by SIGTERM" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- jaxelbo snr


def _snr_args(*flags: str):
    from jaxelbo.app.cli import build_parser

    return build_parser().parse_args(["snr", *flags])


def test_snr_zero_replicates_and_an_out_that_is_a_file_fail_before_the_sweep(tmp_path, capsys):
    from jaxelbo.app.commands import snr as cmd

    with pytest.raises(ValueError, match="--num-replicates must be >= 2, got 0"):
        cmd.resolve_settings(_snr_args("--num-replicates", "0"))
    target = tmp_path / "file"
    target.write_text("keep me")
    assert cmd.run(_snr_args("--fast", "--out", str(target), "--no-progress")) == 2
    _one_line_error(capsys, str(target), "is a file")
    assert target.read_text() == "keep me"


def test_snr_outputs_are_atomic_and_a_stale_m_figure_goes(tmp_path, capsys):
    import dataclasses

    from jaxelbo.app import rainforth
    from jaxelbo.app.commands import snr as cmd

    out = tmp_path / "out"
    out.mkdir()
    (out / "snr.json").write_text("")  # what a kill during an in-place write left
    assert cmd.run(_snr_args("--out", str(out), "--replot")) == 2
    _one_line_error(capsys, str(out / "snr.json"), "is not a jaxelbo snr result")
    committed = rainforth.load_result(Path(__file__).parents[1] / "benchmarks" / "results" / "snr")
    (out / "snr_m.png").write_bytes(b"an earlier run's M sweep")
    paths = rainforth.write_outputs(dataclasses.replace(committed, m_sweep=[]), out)
    assert "snr_m.png" not in paths and not (out / "snr_m.png").exists()
    assert rainforth.load_result(out).k_sweep == committed.k_sweep
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


SMALL_SNR = ("--num-replicates", "4", "--dim", "2", "--num-points", "8", "--estimator", "dreg", "--no-progress")


@pytest.mark.slow
def test_snr_signal_mid_sweep_keeps_the_finished_settings_and_replot_draws_them(tmp_path, capsys, monkeypatch):
    from jaxelbo.app import rainforth
    from jaxelbo.app.commands import snr as cmd

    out = tmp_path / "out"
    out.mkdir()
    (out / "snr_m.png").write_bytes(b"an earlier run's M sweep")
    experiment = rainforth.rainforth_experiment

    def signalled(on_partial, **kwargs):
        def save_then_signal(result):
            on_partial(result)
            if len(result.k_sweep) == 1:
                signal.raise_signal(signal.SIGTERM)  # what a scheduler sends, mid-sweep

        return experiment(on_partial=save_then_signal, **kwargs)

    monkeypatch.setattr(rainforth, "rainforth_experiment", signalled)
    capsys.readouterr()
    assert cmd.run(_snr_args("--k-grid", "1,2", "--m-grid", "1", "--out", str(out), *SMALL_SNR)) == 143
    err = _one_line_error(capsys, "interrupted by SIGTERM during the sweep", "the 1 finished setting(s)",
                          str(out / "snr.json"), "partial")
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    partial = rainforth.load_result(out)
    assert partial.partial and [r.num_samples for r in partial.k_sweep] == [1] and not partial.m_sweep
    assert partial.notes[0].startswith("partial: 1 of 3 settings finished")
    assert sorted(p.name for p in out.iterdir()) == ["snr.json"]  # the stale M figure went
    monkeypatch.undo()
    assert cmd.run(_snr_args("--out", str(out), "--replot")) == 0
    assert "holds a partial sweep" in capsys.readouterr().err
    assert (out / "snr.png").is_file() and not (out / "snr_m.png").exists()
    assert "partial: 1 of 3 settings" in (out / "snr.md").read_text()


@pytest.mark.slow
def test_snr_sigint_mid_sweep_is_one_line_in_a_subprocess(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "jaxelbo", "snr", "--k-grid", "1,2,3,4,5,6,7,8,9,10",
                             "--m-grid", "1", "--out", str(out), *SMALL_SNR],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "snr.json").exists(), proc)  # the first finished setting is saved
    proc.send_signal(signal.SIGINT)
    code, _, err = _finish(proc)
    assert code == 130 and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    assert "interrupted by SIGINT during the sweep" in err and "marked partial" in err, err
    saved = json.loads((out / "snr.json").read_text())
    assert saved["partial"] is True and 1 <= len(saved["k_sweep"]) < 10


# --------------------------------------------------------------------------- multi-process start-up


@pytest.mark.multidevice
@pytest.mark.slow
def test_processes_given_different_flags_are_refused_at_start_up_in_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "jaxelbo", "train", *RUN, "--num-samples", k, "--seed", seed,
                               "--out", str(tmp_path / "run"), "--coordinator", coordinator, "--num-processes", "2",
                               "--process-id", str(pid), "--startup-timeout", "60"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid, k, seed in ((0, "2", "0"), (1, "4", "1"))]
    for proc in procs:
        code, _, err = _finish(proc, timeout=240)
        assert code == 2 and err.strip().count("\n") == 0, (code, err[-2000:])
        assert "--num-samples differs between processes" in err and "checksum" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_seed_too_large_fails_at_the_door_leaving_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "5", "--out", str(out), "--seed", str(2**63), *TINY]) == 2
    _one_line_error(capsys, "--seed must be <", str(2**63))
    assert not out.exists()


def test_records_are_bitwise_after_a_kill_when_checkpoints_fall_between_log_steps(loop, tmp_path):
    net, opt, chunk = loop
    kw = dict(num_steps=8, log_every=4, checkpoint_every=3, progress=False)
    training.train_loop(chunk, net.params, opt.init(net.params), out_dir=tmp_path / "a", **kw)

    def killed(params, opt_state, start, stop):
        if start >= 4:  # after the checkpoint of step 3 and the record of step 4
            raise RuntimeError("SIGKILL")
        return chunk(params, opt_state, start, stop)

    with pytest.raises(RuntimeError):
        training.train_loop(killed, net.params, opt.init(net.params), out_dir=tmp_path / "b", **kw)
    assert checkpoint.latest_step(tmp_path / "b" / "checkpoints") == 3
    training.train_loop(chunk, net.params, opt.init(net.params), out_dir=tmp_path / "b", resume=True, **kw)
    a, b = (_records(tmp_path / d) for d in "ab")
    assert [r["step"] for r in a] == [4, 8] and a == b  # the record of step 4 from the chunks [0, 3) and [3, 4)


# --------------------------------------------------------------------------- one line, before the work


def _run_folder(state, folder: Path) -> Path:
    """A run folder ``jaxelbo evaluate`` accepts: config.json and one checkpoint of ``state``."""
    params, opt_state = state
    settings = {"dataset": "digits", "data_dir": None, "validation_size": None, "learning_rate": 1e-3,
                "guide_learning_rate": None, "seed": 0, "binarization": "dynamic"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(
        {"settings": settings, "vae": {"data_dim": 64, "hidden": [8], "latent_dim": 2}}))
    checkpoint.save(folder / "checkpoints", 3, params, opt_state)
    return folder


def test_evaluate_out_that_cannot_be_written_is_refused_before_the_evaluation(state, tmp_path, capsys,
                                                                              monkeypatch):
    from jaxelbo.app import experiment

    run = _run_folder(state, tmp_path / "run")

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran before --out was checked")

    monkeypatch.setattr(experiment, "evaluate_run", never)
    cases = [(tmp_path, "is a folder"), (tmp_path / "missing" / "e.json", "does not exist")]
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o500)
        cases.append((tmp_path / "ro" / "e.json", "not writable"))
    elif not (os.access("/sys", os.W_OK) and not Path("/sys").is_mount()):  # root: a read-only mount
        cases.append((Path("/sys/jaxelbo-evaluation.json"), "not writable"))
    for out, needle in cases:
        assert main(["evaluate", str(run), "--out", str(out), "--eval-num-samples", "10"]) == 2
        _one_line_error(capsys, "--out", str(out), needle)


def test_evaluate_interrupted_is_one_line_exit_130(state, tmp_path, capsys, monkeypatch):
    from jaxelbo.app import evaluation

    run = _run_folder(state, tmp_path / "run")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate", interrupted)
    assert main(["evaluate", str(run), "--eval-num-samples", "10", "--no-surgery", "--no-progress"]) == 130
    _one_line_error(capsys, "interrupted by SIGINT", str(run / "evaluation.json"))
    assert not (run / "evaluation.json").exists()


def _npz(directory: Path, **arrays) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "mnist.npz"
    np.savez(path, **arrays)
    return path


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 4, 4), dtype=np.uint8)


def _truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,needle", [
    (lambda p: p.write_bytes(b"this is not a zip archive"), "is not a readable .npz archive"),
    (_truncate_half, "is not a readable .npz archive"),
    (lambda p: np.savez(p, x_train=_images(40)), "has no array x_test (it holds: x_train)"),
    (lambda p: np.savez(p, x_train=np.array([[1, 2], None], dtype=object), x_test=_images(10)),
     "[x_train] cannot be read without pickle"),
    (lambda p: np.savez(p, x_train=np.full((40, 4), "a"), x_test=_images(10)), "[x_train] holds an array of dtype"),
])
def test_a_bad_npz_is_one_line_naming_the_file(tmp_path, damage, needle):
    path = _npz(tmp_path / "data", x_train=_images(40), x_test=_images(10))
    damage(path)
    with pytest.raises(ValueError) as e:
        data.load("mnist", tmp_path / "data", validation_size=5)
    assert str(path) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("shape,needle", [((-1, 4, 4), "negative shape"),
                                          ((2**31 - 1,) * 3, "is truncated: its header promises shape")])
def test_an_absurd_idx_header_is_one_line_naming_the_file(tmp_path, capsys, shape, needle):
    path = _mnist_dir(tmp_path / "data")
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">3i", *shape) + bytes(64))
    with pytest.raises(ValueError, match=needle) as e:
        data.load("mnist", tmp_path / "data", validation_size=5)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("line,needle", [(b"[1, 2]", "line 2 is not a metrics record"),
                                         (b'{"step": "4", "split": "train"}', "line 2 is not a metrics record"),
                                         (b'{"step": 3, "split": "tr\xff\xfe"}', "line 2 is not UTF-8")])
def test_a_metrics_line_that_is_not_a_record_stops_a_resume_in_one_line(loop, tmp_path, line, needle):
    net, opt, chunk = loop
    kw = dict(log_every=2, checkpoint_every=4, progress=False, out_dir=tmp_path)
    training.train_loop(chunk, net.params, opt.init(net.params), num_steps=4, **kw)
    path = tmp_path / "metrics.jsonl"
    first, *rest = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(first + line + b"\n" + b"".join(rest))
    with pytest.raises(ValueError) as e:
        training.train_loop(chunk, net.params, opt.init(net.params), num_steps=6, resume=True, **kw)
    assert str(path) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_metrics_lines_that_are_not_records_are_skipped_with_one_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 2, "split": "train", "loss": 1.0, "bound": -1.0, "steps_per_second": 9.0},
            {"step": 2, "split": "validation", "iwae_64": -1.0}]
    path.write_bytes(b"\n".join([json.dumps(good[0]).encode(), b"[]", b"{}", b"7", b"\xff\xfe garbage",
                                 json.dumps(good[1]).encode(), b'{"step": 4, "split": "train"}', b""]))
    assert training.read_metrics(path) == good
    _one_line_error(capsys, str(path), "skipped 5 line(s) that are not metrics records", "line 2")


@pytest.mark.slow
def test_a_foreign_metrics_line_written_during_training_never_crashes_the_summary(tmp_path, capsys, monkeypatch):
    real = training.train

    def foreign_line(*args, **kwargs):  # something else writes into metrics.jsonl while the run trains
        result = real(*args, **kwargs)
        with open(tmp_path / "run" / "metrics.jsonl", "ab") as f:
            f.write(b'[1, 2]\n{"split": "train"}\n\xff\xfe\n')
        return result

    monkeypatch.setattr(training, "train", foreign_line)
    out = tmp_path / "run"
    assert main(["train", *RUN, "--steps", "4", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out / "metrics.jsonl") in err and "skipped 3 line(s)" in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_train"]["step"] == 4
    assert (out / "curves.png").is_file()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # orbax's echoes reach stderr
def test_a_checkpoint_write_that_fails_on_disk_is_one_line_and_keeps_the_older_ones(state, tmp_path, capfd):
    import resource

    params, opt_state = state
    ckpt = tmp_path / "checkpoints"
    checkpoint.save(ckpt, 1, params, opt_state)
    capfd.readouterr()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))  # files cut at 2 KiB: writes fail as on a full disk
    try:
        with pytest.raises(checkpoint.CheckpointWriteError) as e:
            checkpoint.save(ckpt, 2, _shifted(params, 1.0), opt_state)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    message = str(e.value)
    assert message.startswith(f"could not write checkpoint {ckpt / '2'} (File too large)") and "\n" not in message
    assert isinstance(e.value, OSError)  # the command reports it as a disk error, in one line
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err, err[:2000]
    assert checkpoint.steps(ckpt) == [1] and checkpoint.restore(ckpt, params, opt_state).step == 1
    checkpoint.save(ckpt, 3, params, opt_state)  # the next save goes through and leaves nothing else behind
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "3"]


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_stops_the_run_in_one_line_before_orbax_writes(tmp_path, capfd, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(*real(p)[:2], 2**20) if "checkpoints" in str(p)
                        else real(p))
    out = tmp_path / "run"
    assert main(["train", *RUN, "--steps", "4", "--out", str(out)]) == 2
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err[:2000]
    assert f"not writing checkpoint {out / 'checkpoints' / '4'}: the disk is full (1.0 MiB free" in err, err
    assert not list((out / "checkpoints").iterdir())


def test_a_second_signal_during_the_checkpoint_write_waits_for_it_and_stops_cleanly(loop, tmp_path, monkeypatch):
    net, opt, chunk = loop
    kw = dict(num_steps=8, log_every=2, checkpoint_every=4, progress=False, out_dir=tmp_path, handle_signals=True)
    real_save = checkpoint.save

    def signalled(params, opt_state, start, stop):
        if start == 2:
            signal.raise_signal(signal.SIGTERM)  # the first: stop at the next boundary
        return chunk(params, opt_state, start, stop)

    def save_under_a_second_signal(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # 50 ms later, while the reached step is being written
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save_under_a_second_signal)
    # the handler to restore: Python's default_int_handler, or SIG_IGN in a process started in the
    # background by a non-interactive shell
    before = signal.getsignal(signal.SIGINT)
    try:
        result = training.train_loop(signalled, net.params, opt.init(net.params), **kw)
    except KeyboardInterrupt:
        pytest.fail("the second signal cut the checkpoint write short")
    monkeypatch.undo()
    assert result.status == "interrupted" and result.signum == signal.SIGTERM and result.step == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]  # whole, no tmp- folder
    assert checkpoint.restore(tmp_path / "checkpoints", net.params, opt.init(net.params)).step == 4
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_a_double_sigterm_50_ms_apart_exits_143_in_one_line(tmp_path):
    signum = signal.SIGTERM
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text(), proc)
    proc.send_signal(signum)
    time.sleep(0.05)
    proc.send_signal(signum)
    code, _, err = _finish(proc)
    assert code == 128 + signum and err.count("\n") == 1, (code, err[-3000:])
    assert f"interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err, err
    assert not [p.name for p in (out / "checkpoints").iterdir() if not p.name.isdigit()]
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"


def test_an_improper_prior_the_guide_does_not_cover_is_one_line_naming_the_site():
    numpyro = pytest.importorskip("numpyro")
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    from jaxelbo.numpyro import from_numpyro

    def model(x):
        z = numpyro.sample("z", dist.ImproperUniform(constraints.real, (), (2,)))
        numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide_without_z(x):
        numpyro.sample("w", dist.Normal(numpyro.param("loc", jnp.zeros(2)), 1.0).to_event(1))

    def improper_guide(x):
        numpyro.sample("z", dist.ImproperUniform(constraints.real, (), (2,)))

    for guide in (guide_without_z, improper_guide):
        with pytest.raises(ValueError, match=r"sample site 'z' \(ImproperUniform\) cannot be sampled") as e:
            from_numpyro(model, guide, jax.random.key(0), jnp.ones(2))
        assert "\n" not in str(e.value)

    def guide(x):  # a proper guide for the improper prior: fine, the prior is only evaluated
        numpyro.sample("z", dist.Normal(numpyro.param("loc", jnp.zeros(2)), 1.0).to_event(1))

    from_numpyro(model, guide, jax.random.key(0), jnp.ones(2))
