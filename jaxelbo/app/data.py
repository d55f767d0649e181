"""Data sets for the VAE experiments and a seeded, resumable batch iterator.

``load(name)`` returns flat images in [0, 1] split into train / validation / test:

=================  ====================================================================
``digits``         scikit-learn's bundled 8x8 digits (1797 images, 16 grey levels,
                   scaled to [0, 1]); no download. Default.
``mnist``          LeCun et al.'s MNIST, 28x28, from IDX files or an ``.npz``.
``fashion-mnist``  Xiao et al.'s Fashion-MNIST, same file formats as MNIST.
``omniglot``       Burda et al.'s 28x28 Omniglot (``chardata.mat``) or an ``.npz``.
=================  ====================================================================

Files are never downloaded: put them in a directory and pass ``data_dir``; a missing
file raises an error that names the files and where they go. Fashion-MNIST needs no
``data_dir`` once Debian's package is installed (``apt-get install dataset-fashion-mnist``
puts the IDX files in ``/usr/share/datasets/fashion-mnist``). The binary likelihood of
the VAE is trained with *dynamic binarisation* (Salakhutdinov & Murray 2008; Burda et
al. 2016): every epoch each grey value is replaced by a fresh Bernoulli draw. The
validation and test sets are binarised once with a fixed key so that every evaluation
sees the same binary images.

Batches are a pure function of ``(seed, step)``: epoch ``e = step // steps_per_epoch``
uses the permutation drawn from ``(seed, e)`` and step ``s`` the binarisation drawn from
``(seed, s)``, both with ``jax.random`` so that the training loop computes them inside
its compiled step from the training set held on the device; a resumed run sees exactly
the batches an uninterrupted run would.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DATASETS = ("digits", "mnist", "fashion-mnist", "omniglot")
BINARIZE = ("dynamic", "static", "none")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_MNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
# Where a distribution package installs a data set's files, read when no data_dir is given
# (Debian: ``apt-get install dataset-fashion-mnist``), and the package's name.
SYSTEM_DATA_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
SYSTEM_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
# Fixed key for the one-off binarisation of the validation and test sets.
EVAL_BINARIZATION_SEED = 1234


class Dataset(NamedTuple):
    """Flat images in [0, 1] (float32 numpy arrays, shape ``(N, D)``).

    Attributes:
      name: the data set's name.
      train, validation, test: the splits (validation may have 0 rows).
      image_shape: ``(height, width)`` for plots; ``height * width == D``.
      binary: whether the pixels are already exactly 0/1.
    """

    name: str
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    image_shape: tuple[int, int]
    binary: bool

    @property
    def data_dim(self) -> int:
        return int(self.train.shape[1])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (LeCun's MNIST format), gzipped or not, into a numpy array.

    The header is two zero bytes, a dtype code, the number of dimensions ``n``, then
    ``n`` big-endian int32 sizes; the data follow in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # truncated or not gzip at all
        raise ValueError(f"{path} is not a complete gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code {code:#04x}")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header is cut short")
    shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    if any(d < 0 for d in shape):
        raise ValueError(f"{path} is not a valid IDX file: its header gives the negative shape {tuple(shape)}")
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(shape)  # Python ints: an absurd header cannot wrap around
    if len(raw) - 4 - 4 * ndim < count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: its header promises shape {tuple(shape)} "
                         f"({count * dtype.itemsize} bytes of data), the file holds {len(raw) - 4 - 4 * ndim}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=4 + 4 * ndim)
    return data.reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX file (``.gz`` suffix: gzipped). Used by tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x_train, x_test)`` in [0, 1] from an ``.npz`` archive.

    Raises ``ValueError`` naming the file for a file that is not a zip archive or is cut
    short, an archive without ``x_train`` or ``x_test``, and object (pickled) arrays, which
    are never loaded.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not a zip, truncated, pickled data
        raise ValueError(f"{path} is not a readable .npz archive ({_short(e)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not an .npz archive with x_train and x_test")
    with archive:
        out = []
        for key in ("x_train", "x_test"):
            if key not in archive.files:
                raise ValueError(f"{path} has no array {key} (it holds: {', '.join(archive.files) or 'nothing'})")
            try:
                array = archive[key]
            except ValueError as e:  # object dtype: would need pickle
                raise ValueError(f"{path}[{key}] cannot be read without pickle ({_short(e)}); save the images "
                                 "as a uint8 or float array") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise ValueError(f"{path}[{key}] is damaged or cut short ({_short(e)})") from None
            out.append(_to_unit(array, f"{path}[{key}]"))
    return out[0], out[1]


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _to_unit(x: np.ndarray, source: str | os.PathLike = "data") -> np.ndarray:
    """Flattens images to ``(N, D)`` float32 in [0, 1] (uint8 / 255; floats kept).

    Raises ``ValueError`` naming ``source`` (the file) for an array that is not a set of
    images (fewer than 2 dimensions, e.g. a labels file), for NaN or Inf values, and for
    values outside [0, 1].
    """
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"{source} holds an array of dtype {x.dtype}, not numbers (save the images as uint8 "
                         "or float)")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{source} holds an array of shape {x.shape}, not images (N, H, W) or (N, D)"
                         + (" (a labels file?)" if x.ndim == 1 else ""))
    x = x.reshape(x.shape[0], -1)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise ValueError(f"{source}: {bad} pixel values are NaN or Inf")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"{source}: pixel values must lie in [0, 1] (or be uint8), got range "
                         f"[{x.min()}, {x.max()}]")
    return x


def _search_dirs(name: str, data_dir: str | os.PathLike) -> list[Path]:
    root = Path(data_dir).expanduser()
    return list(dict.fromkeys([root / name, root / name.replace("-", "_"), root]))  # no repeats


def _find(name: str, data_dir, candidates: list[str]) -> Path | None:
    for d in _search_dirs(name, data_dir):
        for c in candidates:
            if (d / c).is_file():
                return d / c
    return None


def _missing(name: str, data_dir, expected: str) -> FileNotFoundError:
    where = " or ".join(str(d) for d in _search_dirs(name, data_dir)) if data_dir else "--data-dir PATH"
    return FileNotFoundError(
        f"{name}: data files not found; put {expected} in {where} (files are never downloaded)")


def _load_mnist_like(name: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    stem = name.replace("-", "_")
    expected = (f"{_MNIST_FILES['train']}[.gz] and {_MNIST_FILES['test']}[.gz] (IDX), "
                f"or {' / '.join(dict.fromkeys([f'{name}.npz', f'{stem}.npz']))} with arrays x_train and x_test")
    if data_dir is None and name in SYSTEM_DATA_DIRS:
        return _load_system(name, expected)
    if data_dir is None:
        raise _missing(name, data_dir, expected)
    npz = _find(name, data_dir, [f"{name}.npz", f"{stem}.npz"])
    if npz is not None:
        return _read_npz(npz)
    splits = []
    for split in ("train", "test"):
        base = _MNIST_FILES[split]
        path = _find(name, data_dir, [base + ".gz", base, base.replace("-idx", ".idx")])
        if path is None:
            raise _missing(name, data_dir, expected)
        splits.append((path, _to_unit(read_idx(path), path)))
    (train_path, x_train), (test_path, x_test) = splits
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"{train_path} has images of {x_train.shape[1]} pixels but {test_path} "
                         f"of {x_test.shape[1]}")
    return x_train, x_test


def _load_system(name: str, expected: str) -> tuple[np.ndarray, np.ndarray]:
    """``name``'s files from where its distribution package installs them (:data:`SYSTEM_DATA_DIRS`)."""
    directory = SYSTEM_DATA_DIRS[name]
    try:
        return _load_mnist_like(name, directory)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{name}: data files not found in {directory}; install them with "
            f"`apt-get install {SYSTEM_PACKAGES[name]}`, or pass --data-dir DIR holding {expected}") from None


def _load_omniglot(data_dir) -> tuple[np.ndarray, np.ndarray]:
    expected = ("omniglot.npz with arrays x_train and x_test, or Burda et al.'s chardata.mat "
                "(keys data and testdata)")
    if data_dir is None:
        raise _missing("omniglot", data_dir, expected)
    npz = _find("omniglot", data_dir, ["omniglot.npz"])
    if npz is not None:
        return _read_npz(npz)
    mat = _find("omniglot", data_dir, ["chardata.mat"])
    if mat is None:
        raise _missing("omniglot", data_dir, expected)
    from scipy.io import loadmat  # only needed for this format

    raw = loadmat(mat)

    def images(a):  # stored (784, N) with column-major 28x28 images
        return a.T.reshape((-1, 28, 28), order="F").reshape(-1, 784)

    return _to_unit(images(raw["data"]), f"{mat}[data]"), _to_unit(images(raw["testdata"]), f"{mat}[testdata]")


def _split_validation(x_train: np.ndarray, validation_size: int, seed: int):
    if not 0 <= validation_size < len(x_train):
        raise ValueError(f"validation_size must be in [0, {len(x_train)}), got {validation_size}")
    perm = np.random.default_rng(seed).permutation(len(x_train))
    val = perm[:validation_size]
    return x_train[np.sort(perm[validation_size:])], x_train[np.sort(val)]


def load(name: str = "digits", data_dir: str | os.PathLike | None = None, *,
         validation_size: int | None = None, split_seed: int = 0) -> Dataset:
    """Loads a data set as flat float32 images in [0, 1].

    Args:
      name: one of :data:`DATASETS`.
      data_dir: directory holding the files of ``mnist``, ``fashion-mnist`` and
        ``omniglot`` (searched in ``data_dir/<name>/`` then ``data_dir/``). Unused
        for ``digits``. When None, ``fashion-mnist`` is read from where Debian's
        ``dataset-fashion-mnist`` package installs it (:data:`SYSTEM_DATA_DIRS`).
      validation_size: rows of the training file held out for validation (default:
        300 of digits' 1497 non-test images, 5000 for the others); 0 for none.
      split_seed: seed of the fixed split (digits: train / validation / test; others:
        train / validation, the test file is the test set).

    Returns:
      A :class:`Dataset`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    if name == "digits":
        from sklearn.datasets import load_digits

        x = load_digits().images.reshape(-1, 64).astype(np.float32) / 16.0
        perm = np.random.default_rng(split_seed).permutation(len(x))
        test_size = 300
        x_test = x[np.sort(perm[:test_size])]
        x_rest = x[np.sort(perm[test_size:])]
        x_train, x_val = _split_validation(x_rest, 300 if validation_size is None else validation_size,
                                           split_seed + 1)
        return Dataset("digits", x_train, x_val, x_test, (8, 8), False)
    if name == "omniglot":
        x_train, x_test = _load_omniglot(data_dir)
    else:
        x_train, x_test = _load_mnist_like(name, data_dir)
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"{name}: training images have {x_train.shape[1]} pixels but test images "
                         f"{x_test.shape[1]} (files in {data_dir})")
    x_train, x_val = _split_validation(x_train, 5000 if validation_size is None else validation_size,
                                       split_seed)
    side = int(round(np.sqrt(x_train.shape[1])))
    shape = (side, side) if side * side == x_train.shape[1] else (1, x_train.shape[1])
    binary = bool(np.all((x_train == 0) | (x_train == 1)))
    return Dataset(name, x_train, x_val, x_test, shape, binary)


def binarize(x: np.ndarray, seed: int | tuple[int, ...]) -> np.ndarray:
    """One Bernoulli draw per pixel: ``x_bin = (u < x)`` with ``u ~ U[0, 1)`` from ``seed``."""
    u = np.random.default_rng(seed).random(x.shape, dtype=np.float32)
    return (u < x).astype(x.dtype)


def evaluation_split(data: Dataset, split: str, binarization: str = "dynamic") -> np.ndarray:
    """The ``validation`` or ``test`` split as the model sees it at evaluation.

    With ``binarization`` ``dynamic`` or ``static`` the grey values are binarised once
    with the fixed key :data:`EVAL_BINARIZATION_SEED` (and the split's name), so every
    evaluation of every run uses the same binary images.
    """
    if split not in ("validation", "test", "train"):
        raise ValueError(f"unknown split {split!r}; valid choices: train, validation, test")
    _check_binarization(binarization)
    x = getattr(data, split)
    if binarization == "none" or data.binary:
        return x
    return binarize(x, (EVAL_BINARIZATION_SEED, ("train", "validation", "test").index(split)))


def _check_binarization(binarization: str) -> None:
    if binarization not in BINARIZE:
        raise ValueError(f"unknown binarization {binarization!r}; valid choices: {', '.join(BINARIZE)}")


# --------------------------------------------------------------------------- training batches
#
# Every random choice of training is a function of ``(seed, step)`` through three streams of
# ``key(seed)``: stream 0 draws the loss's samples (``jaxelbo.app.training.step_key``),
# stream 1 the order of each epoch and stream 2 the dynamic binarisation of each step.
ORDER_STREAM = 1
BINARIZE_STREAM = 2


def epoch_permutation(rng: jax.Array, epoch: jax.Array | int, num_rows: int) -> jax.Array:
    """The row order of ``epoch``: a permutation of ``num_rows`` drawn from ``(rng, epoch)``.

    Args:
      rng: the data key, ``jax.random.key(seed)``.
      epoch: epoch index (traceable).
      num_rows: rows of the training set.

    Returns:
      ``(num_rows,)`` int32 permutation.
    """
    key = jax.random.fold_in(jax.random.fold_in(rng, ORDER_STREAM), epoch)
    return jax.random.permutation(key, num_rows)


def batch_from_permutation(x: jax.Array, perm: jax.Array, rng: jax.Array, step: jax.Array | int, *,
                           batch_size: int, dynamic: bool) -> jax.Array:
    """The batch of global step ``step``, given the permutation of its epoch.

    Rows ``perm[i * B:(i + 1) * B]`` of ``x`` with ``i = step mod (num_rows // B)``
    (the last incomplete batch of an epoch is dropped); with ``dynamic`` each pixel is
    replaced by a Bernoulli draw keyed by ``(rng, step)``, so each image gets a fresh
    binarisation every epoch. Pure and traceable: the training loop calls it inside
    its compiled step.

    Args:
      x: ``(N', D)`` training set on the device (rows past ``len(perm)`` are padding).
      perm: :func:`epoch_permutation` of the step's epoch.
      rng: the data key, ``jax.random.key(seed)``.
      step: global step (traceable).
      batch_size: rows per batch ``B``.
      dynamic: binarise dynamically.

    Returns:
      ``(B, D)`` batch of ``x``'s dtype.
    """
    steps_per_epoch = perm.shape[0] // batch_size
    i = jnp.asarray(step) % steps_per_epoch
    idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
    xb = jnp.take(x, idx, axis=0, mode="clip")
    if dynamic:
        key = jax.random.fold_in(jax.random.fold_in(rng, BINARIZE_STREAM), step)
        xb = (jax.random.uniform(key, xb.shape, xb.dtype) < xb).astype(xb.dtype)
    return xb


@functools.partial(jax.jit, static_argnames=("batch_size", "num_rows", "dynamic"))
def _batch_at(x, rng, step, *, batch_size: int, num_rows: int, dynamic: bool):
    perm = epoch_permutation(rng, step // (num_rows // batch_size), num_rows)
    return batch_from_permutation(x, perm, rng, step, batch_size=batch_size, dynamic=dynamic)


class BatchIterator:
    """Seeded, resumable mini-batches of one array: the training set of the loop.

    ``batch(step)`` is a pure function of ``(seed, step)``: epoch
    ``e = step // steps_per_epoch`` visits the rows in the order of
    :func:`epoch_permutation` ``(key(seed), e)`` and drops the last incomplete batch;
    with ``binarization="dynamic"`` each batch is binarised with a fresh draw keyed by
    ``(seed, step)``, so each image gets a new binarisation every epoch; ``"static"``
    binarises the whole array once (from ``seed``); ``"none"`` keeps grey values.
    The functions are ``jax.random`` ones, so that :func:`jaxelbo.app.training.train`
    computes the same batches inside its compiled loop, on the device, from
    :meth:`device_array` (the set placed there once); ``batch(step)`` is the host view
    of the same batch.

    Example:
      >>> it = BatchIterator(np.full((10, 4), 0.5, np.float32), batch_size=4, seed=0)
      >>> it.steps_per_epoch, it.batch(3).shape
      (2, (4, 4))
    """

    def __init__(self, x: np.ndarray, batch_size: int, seed: int, binarization: str = "dynamic"):
        _check_binarization(binarization)
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"x must be a (rows, features) array, got shape {x.shape}")
        if not 1 <= batch_size <= len(x):
            raise ValueError(f"batch_size must be in [1, {len(x)}] (the number of rows), got {batch_size}")
        self.x = x
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.binarization = binarization
        self.num_rows = len(x)
        self.steps_per_epoch = len(x) // self.batch_size
        if binarization == "static":
            self.x = binarize(x, (self.seed, 2**31 - 1))
        self._device_x: jax.Array | None = None

    @property
    def dynamic(self) -> bool:
        """Whether each batch is binarised afresh (``binarization == "dynamic"``)."""
        return self.binarization == "dynamic"

    def rng(self) -> jax.Array:
        """The data key ``jax.random.key(seed)``."""
        return jax.random.key(self.seed)

    def device_array(self, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        """The training set on the device(s), placed once.

        With a ``mesh`` the rows are split over its ``"data"`` axis
        (:func:`jaxelbo.app.sharding.shard_rows`), zero-padded to a multiple of the
        number of devices; padding rows are never drawn.
        """
        if mesh is not None:
            from jaxelbo.app import sharding

            return sharding.shard_rows(mesh, self.x)
        if self._device_x is None:
            self._device_x = jnp.asarray(self.x)
        return self._device_x

    def batch(self, step: int) -> np.ndarray:
        """The batch of global step ``step`` (0-based), shape ``(batch_size, D)``."""
        return np.asarray(_batch_at(self.device_array(), self.rng(), jnp.int32(step), batch_size=self.batch_size,
                                    num_rows=self.num_rows, dynamic=self.dynamic))

    def __call__(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(step, batch)`` from ``start_step`` (forever if ``num_steps`` is None)."""
        step = int(start_step)
        end = None if num_steps is None else step + int(num_steps)
        while end is None or step < end:
            yield step, self.batch(step)
            step += 1
