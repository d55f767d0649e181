"""Tests of jaxelbo.app.data: loaders (tiny files in tmp_path) and the batch iterator."""

import numpy as np
import pytest

from jaxelbo.app import data


def test_digits_default_split():
    d = data.load()
    assert d.name == "digits" and d.image_shape == (8, 8) and not d.binary
    assert d.train.shape == (1197, 64) and d.validation.shape == (300, 64) and d.test.shape == (300, 64)
    assert d.train.dtype == np.float32 and d.train.min() >= 0 and d.train.max() <= 1
    again = data.load("digits")
    np.testing.assert_array_equal(d.test, again.test)
    other = data.load("digits", split_seed=1)
    assert not np.array_equal(d.test, other.test)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="digits, mnist, fashion-mnist, omniglot"):
        data.load("cifar")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    a = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    path = tmp_path / ("a.idx" + (".gz" if gz else ""))
    data.write_idx(path, a)
    np.testing.assert_array_equal(data.read_idx(path), a)


def test_bad_idx_raises(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        data.read_idx(p)


def _fake_mnist(directory, n_train=30, n_test=10, gz=True):
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    ext = ".gz" if gz else ""
    data.write_idx(directory / f"train-images-idx3-ubyte{ext}", train)
    data.write_idx(directory / f"t10k-images-idx3-ubyte{ext}", test)
    return train, test


@pytest.mark.parametrize("name,sub,gz", [("mnist", "", True), ("fashion-mnist", "fashion-mnist", False)])
def test_mnist_like_from_idx(tmp_path, name, sub, gz):
    train, test = _fake_mnist(tmp_path / sub, gz=gz)
    d = data.load(name, tmp_path, validation_size=5)
    assert d.image_shape == (28, 28) and d.data_dim == 784
    assert d.train.shape == (25, 784) and d.validation.shape == (5, 784)
    np.testing.assert_allclose(d.test, test.reshape(10, -1) / 255.0, rtol=1e-6)
    rows = {r.tobytes() for r in np.concatenate([d.train, d.validation])}
    assert rows == {r.tobytes() for r in (train.reshape(30, -1) / 255.0).astype(np.float32)}


def test_npz_and_omniglot(tmp_path):
    x = (np.random.default_rng(2).random((12, 28, 28)) < 0.3).astype(np.float32)
    np.savez(tmp_path / "omniglot.npz", x_train=x[:8], x_test=x[8:])
    d = data.load("omniglot", tmp_path, validation_size=2)
    assert d.binary and d.train.shape == (6, 784) and d.test.shape == (4, 784)
    u8 = (x * 255).astype(np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=u8[:8], x_test=u8[8:])
    assert data.load("mnist", tmp_path, validation_size=0).train.shape == (8, 784)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "omniglot"])
def test_missing_files_name_what_to_put_where(tmp_path, name, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion-mnist", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match="put .*(idx3-ubyte|omniglot.npz).* in "):
        data.load(name, tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        data.load(name)


def test_fashion_mnist_needs_no_data_dir_where_the_package_installs_it(tmp_path, monkeypatch):
    train, test = _fake_mnist(tmp_path / "usr-share", gz=True)
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion-mnist", tmp_path / "usr-share")
    d = data.load("fashion-mnist", validation_size=5)
    np.testing.assert_allclose(d.test, test.reshape(10, -1) / 255.0, rtol=1e-6)
    assert d.train.shape == (25, 784)
    with pytest.raises(FileNotFoundError, match="--data-dir"):  # MNIST still needs --data-dir
        data.load("mnist")


def test_absent_package_says_in_one_line_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion-mnist", tmp_path / "absent")
    with pytest.raises(FileNotFoundError) as info:
        data.load("fashion-mnist")
    message = str(info.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    assert str(tmp_path / "absent") in message


def test_batches_are_a_function_of_seed_and_step():
    x = np.random.default_rng(0).random((50, 6)).astype(np.float32)
    a = data.BatchIterator(x, 8, seed=3)
    b = data.BatchIterator(x, 8, seed=3)
    assert a.steps_per_epoch == 6
    straight = [xb for _, xb in a(0, 20)]
    resumed = [xb for _, xb in b(0, 7)] + [xb for _, xb in data.BatchIterator(x, 8, seed=3)(7, 13)]
    for s, r in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(s, r)
    assert not np.array_equal(data.BatchIterator(x, 8, seed=4).batch(0), straight[0])


def test_epoch_is_a_permutation_and_binarisation_is_fresh():
    x = np.arange(40, dtype=np.float32)[:, None] / 40 * np.ones((1, 3), np.float32)
    grey = data.BatchIterator(x, 10, seed=0, binarization="none")
    rows = np.concatenate([grey.batch(s) for s in range(4)])
    np.testing.assert_array_equal(np.sort(rows[:, 0]), x[:, 0])
    dyn = data.BatchIterator(np.full((1000, 20), 0.3, np.float32), 1000, seed=0)
    e0, e1 = dyn.batch(0), dyn.batch(1)
    assert set(np.unique(e0)) <= {0.0, 1.0}
    assert not np.array_equal(e0, e1)
    assert abs(e0.mean() - 0.3) < 5 * np.sqrt(0.21 / e0.size)
    static = data.BatchIterator(np.full((100, 20), 0.3, np.float32), 100, seed=0, binarization="static")
    assert set(np.unique(static.x)) <= {0.0, 1.0}
    perm = np.asarray(data.epoch_permutation(static.rng(), 1, 100))
    np.testing.assert_array_equal(static.batch(1), static.x[perm])


def test_evaluation_split_is_fixed_and_binary():
    d = data.load()
    t1, t2 = data.evaluation_split(d, "test"), data.evaluation_split(d, "test")
    np.testing.assert_array_equal(t1, t2)
    assert set(np.unique(t1)) <= {0.0, 1.0}
    np.testing.assert_array_equal(data.evaluation_split(d, "test", "none"), d.test)
    with pytest.raises(ValueError, match="valid choices"):
        data.evaluation_split(d, "test", "sometimes")


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        data.BatchIterator(np.zeros((5, 2), np.float32), 6, seed=0)


_FASHION = data.SYSTEM_DATA_DIRS["fashion-mnist"]


@pytest.mark.slow
@pytest.mark.skipif(not (_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not installed in {_FASHION} (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_trains_from_the_installed_files():
    """300 steps on the real files, no --data-dir; then a 100-point test subset beats the pixel-marginal model."""
    from jaxelbo.app.experiment import DEFAULTS, train_and_evaluate

    ds = data.load("fashion-mnist")
    assert (ds.train.shape, ds.validation.shape, ds.test.shape) == ((55000, 784), (5000, 784), (10000, 784))
    settings = {**DEFAULTS, "dataset": "fashion-mnist", "steps": 300, "batch_size": 32, "num_samples": 4,
                "hidden": [64], "latent_dim": 8, "eval_every": 0, "checkpoint_every": 0, "log_every": 100,
                "eval_num_samples": 100, "eval_num_points": 100, "surgery": False}
    test = train_and_evaluate(settings, None, progress=False, plots=False)["test"]
    assert test["num_points"] == 100
    x = data.evaluation_split(ds, "test")[:100]
    mean = np.clip(ds.train.mean(0), 1e-3, 1 - 1e-3)
    pixel_marginal = float(np.mean(x @ np.log(mean) + (1 - x) @ np.log1p(-mean)))  # ~ -389 nats
    assert test["log_likelihood"] > pixel_marginal + 50
    assert test["elbo"] <= test["iwae_64"] + 0.5 and np.isfinite(test["log_likelihood"])
