"""Verified checkpoints: orbax arrays plus a manifest of checksums, with fallback.

A checkpoint of step ``s`` is the folder ``DIR/<s>/``: the orbax arrays of
``{"params", "opt_state"}`` and ``checksums.json``, which holds the dtype, shape and
SHA-256 of every array saved (params and optimiser state). :func:`save`

1. refuses a state that is not all finite (:class:`NonFiniteStateError`),
2. writes the arrays into a temporary folder with orbax and waits for them,
3. reads them back and compares them with the checksums of the state in memory,
4. writes ``checksums.json`` (temporary file + ``os.replace``), then renames the
   folder to ``DIR/<s>`` (atomic), and only then
5. deletes older checkpoints beyond ``keep`` (retention is managed here, not by
   orbax's ``max_to_keep``), so the newest verified checkpoint is never deleted
   before a newer one has verified.

A ``DIR/<s>`` folder therefore always held a verified checkpoint when it appeared; a
SIGKILL at any moment leaves at most a temporary folder, which the next save removes.
:func:`restore` verifies what it reads against the manifest. On a mismatch or a read
error it reports one line naming the bad checkpoint and falls back to the newest
checkpoint that verifies; with an explicit ``step`` it refuses instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxelbo.app import rundir

MANIFEST = "checksums.json"
_FORMAT = 1
_TMP_PREFIX = "tmp-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, unreadable or of another model)."""


class NonFiniteStateError(CheckpointError):
    """A state with a NaN or Inf, which is never written as a checkpoint."""


class Restored(NamedTuple):
    """What :func:`restore` returns: the step, the arrays, and the ``meta`` saved with them."""

    step: int
    params: Any
    opt_state: Any
    meta: dict


def _warn(message: str) -> None:
    print(f"jaxelbo: {message}", file=sys.stderr, flush=True)


def _host(a) -> np.ndarray:
    """A leaf as a host numpy array (a replicated multi-host array: the local copy)."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        a = a.addressable_data(0)
    return np.asarray(a)


def _leaves(state: Any) -> list[tuple[str, np.ndarray]]:
    return [(jax.tree_util.keystr(path), _host(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]


def checksums(state: Any) -> dict[str, dict]:
    """``{key path: {"dtype", "shape", "sha256"}}`` of every array in ``state``.

    The hash covers the dtype, the shape and the bytes (C order) of each array.
    """
    out = {}
    for key, a in _leaves(state):
        a = np.asarray(a, order="C")  # (ascontiguousarray would make a scalar 1-d)
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[key] = {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": h.hexdigest()}
    return out


def non_finite(state: Any) -> list[str]:
    """Key paths of the floating-point arrays of ``state`` that hold a NaN or an Inf."""
    return [key for key, a in _leaves(state)
            if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a))]


def steps(directory: str | Path) -> list[int]:
    """The steps of the checkpoint folders in ``directory``, ascending (verified or not)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def latest_step(directory: str | Path) -> int | None:
    """The newest checkpoint folder's step (None if there is none); not verified."""
    found = steps(directory)
    return found[-1] if found else None


def _state(params: Any, opt_state: Any) -> dict:
    return {"params": params, "opt_state": opt_state}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _compare(expected: dict, found: dict) -> str | None:
    """The first difference between two checksum tables (None if equal)."""
    for key in expected:
        if key not in found:
            return f"{key} missing"
        e, f = expected[key], found[key]
        if e["dtype"] != f["dtype"] or e["shape"] != f["shape"]:
            return f"{key} is {f['dtype']}{tuple(f['shape'])}, expected {e['dtype']}{tuple(e['shape'])}"
        if e["sha256"] != f["sha256"]:
            return f"checksum mismatch in {key}"
    extra = [k for k in found if k not in expected]
    return f"unexpected array {extra[0]}" if extra else None


def _quiet_unraisable(unraisable) -> None:
    """Drops the echoes of a failed orbax read (its pending reads end on a closed event loop)."""
    exc, obj = unraisable.exc_value, repr(unraisable.object)
    if (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)) or "_read_array" in obj:
        return
    _default_unraisable(unraisable)


_default_unraisable = sys.unraisablehook


def _quiet_orbax_echoes() -> None:
    """After a failed orbax read or write: its pending futures' "Event loop is closed" echoes dropped."""
    sys.unraisablehook = _quiet_unraisable
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def _read(path: Path, target: Any) -> Any:
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path.absolute(), abstract)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def save(directory: str | Path, step: int, params: Any, opt_state: Any, *, keep: int = 2,
         meta: dict | None = None) -> Path:
    """Writes a verified checkpoint of ``step`` and prunes older ones beyond ``keep``.

    Args:
      directory: the checkpoints folder (created if needed).
      step: the global step the state belongs to.
      params, opt_state: the arrays to save.
      keep: verified checkpoints to keep (the new one included; at least 1).
      meta: small JSON-able facts stored in the manifest (e.g. wall seconds so far).

    Returns:
      The checkpoint's folder ``directory/<step>``.

    Raises:
      NonFiniteStateError: a params or optimiser-state array holds a NaN or an Inf.
      CheckpointError: what was written does not read back identically.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    state = _state(params, opt_state)
    bad = non_finite(state)
    if bad:
        raise NonFiniteStateError(f"not writing checkpoint {step}: {bad[0]} is not finite"
                                  + (f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""))
    main = jax.process_index() == 0
    expected = checksums(state)
    final = directory / str(int(step))
    tmp = directory / f"{_TMP_PREFIX}{int(step)}"
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        for p in directory.iterdir():  # leftovers of a write that was killed
            if p.name.startswith(_TMP_PREFIX) or ".orbax-checkpoint-tmp" in p.name or p.name.endswith(".old"):
                _remove(p)
    _check_free_space(directory, final, state)
    hook, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable  # a failed write echoes as it unwinds
    try:
        with _orbax_errors_silenced(), ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp.absolute(), state, force=True)
            ckptr.wait_until_finished()
            written = _read(tmp, state)  # every process takes part in a read
        sys.unraisablehook = hook
    except Exception as e:  # a full disk, a file-size limit, an I/O error: orbax/tensorstore raise many types
        if main:
            _remove_partial(directory, step)
        _quiet_orbax_echoes()
        raise CheckpointWriteError(f"could not write checkpoint {final} ({_write_failure(e)}); the older "
                                   "checkpoints are kept") from None
    difference = _compare(expected, checksums(written))
    if difference is not None:
        if main:
            _remove(tmp)
        raise CheckpointError(f"checkpoint {final} did not read back as written ({difference})")
    if not main:
        return final
    manifest = {"format": _FORMAT, "step": int(step), "arrays": expected, "meta": meta or {}}
    rundir.write_json_atomic(tmp / MANIFEST, manifest)
    if final.exists():  # the same step written again: swap, never leaving no copy
        old = directory / f"{int(step)}.old"
        os.rename(final, old)
        os.rename(tmp, final)
        _remove(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(directory)
    _prune(directory, int(step), keep)
    return final


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (a full disk, an I/O error): one line naming it."""


# Room kept free beyond a checkpoint's bytes (orbax metadata, the manifest).
_FREE_SPACE_MARGIN = 4 * 2**20


def _check_free_space(directory: Path, final: Path, state: Any) -> None:
    """Refuses, before orbax writes anything, a checkpoint that cannot fit on the disk."""
    needed = sum(int(getattr(a, "nbytes", np.asarray(a).nbytes)) for a in jax.tree.leaves(state)) + _FREE_SPACE_MARGIN
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < needed:
        raise CheckpointWriteError(f"not writing checkpoint {final}: the disk is full ({free / 2**20:.1f} MiB free "
                                   f"in {directory}, the checkpoint needs about {needed / 2**20:.1f} MiB); the older "
                                   "checkpoints are kept")


def _write_failure(e: BaseException) -> str:
    """What went wrong, in a few words (the OS error when tensorstore names one)."""
    import errno
    import re

    code = getattr(e, "errno", None)
    found = re.search(r"os_error_code='?(\d+)", str(e))
    if code is None and found:
        code = int(found.group(1))
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full: {os.strerror(code)}"
    if code is not None:
        return os.strerror(code)
    return _one_line(e)


def _remove_partial(directory: Path, step: int, patience: float = 2.0) -> None:
    """Removes a failed write's folders; tensorstore's threads may still be finishing files in them
    for a moment (what is left then goes with the next save's clean-up)."""
    import time

    end = time.monotonic() + patience
    while True:
        left = list(directory.glob(f"{_TMP_PREFIX}{int(step)}*"))
        for p in left:
            _remove(p)
        if not left or time.monotonic() > end:
            return
        time.sleep(0.05)


class _DropErrors:
    """A logging filter that drops ERROR records (orbax's threads log each failed write with its traceback)."""

    def filter(self, record) -> bool:
        import logging

        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _orbax_errors_silenced():
    """Orbax's tracebacks of a failed write kept off stderr: :func:`save` reports the failure in one line."""
    import logging

    logger, drop = logging.getLogger("absl"), _DropErrors()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune(directory: Path, newest: int, keep: int) -> None:
    """Deletes checkpoints older than ``newest`` beyond the ``keep`` newest with a manifest."""
    kept = 1
    for s in reversed(steps(directory)):
        if s >= newest:
            continue
        if kept < keep and (directory / str(s) / MANIFEST).is_file():
            kept += 1
        else:
            _remove(directory / str(s))


def read_manifest(path: str | Path) -> dict:
    """The manifest of the checkpoint folder ``path``.

    Raises:
      CheckpointError: it is missing or not a manifest.
    """
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
        if not isinstance(manifest.get("arrays"), dict):
            raise ValueError("no array table")
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{file} is unreadable ({_one_line(e)})") from None
    return manifest


def verify(path: str | Path, params: Any, opt_state: Any) -> Restored:
    """Reads the checkpoint folder ``path`` and checks every array against its manifest.

    Args:
      path: a folder ``DIR/<step>`` written by :func:`save`.
      params, opt_state: arrays (or shape/dtype structs) of the expected structure.

    Returns:
      The verified :class:`Restored` state.

    Raises:
      CheckpointError: one line saying what is wrong (manifest missing or unreadable,
        arrays of another model, a read error, a checksum mismatch).
    """
    path = Path(path)
    manifest = read_manifest(path)
    if path.name.isdigit() and manifest.get("step") != int(path.name):
        raise CheckpointError(f"checkpoint {path} is damaged (its manifest says step {manifest.get('step')!r}, "
                              f"its folder {int(path.name)})")
    target = _state(params, opt_state)
    expected = {key: {"dtype": np.dtype(leaf.dtype).str, "shape": list(leaf.shape)}
                for key, leaf in ((jax.tree_util.keystr(p), leaf)
                                  for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0])}
    saved = manifest["arrays"]
    for key, want in expected.items():
        got = saved.get(key)
        if got is None or got.get("dtype") != want["dtype"] or got.get("shape") != want["shape"]:
            found = "missing" if got is None else f"{got.get('dtype')}{tuple(got.get('shape', ()))}"
            raise CheckpointError(f"checkpoint {path} holds another model: {key} is {found}, "
                                  f"expected {want['dtype']}{tuple(want['shape'])}")
    if len(saved) != len(expected):
        raise CheckpointError(f"checkpoint {path} holds another model ({len(saved)} arrays, "
                              f"expected {len(expected)})")
    try:
        restored = _read(path, target)
    except Exception as e:  # orbax/tensorstore raise many types on damage
        _quiet_orbax_echoes()
        raise CheckpointError(f"checkpoint {path} is unreadable ({_one_line(e)})") from None
    difference = _compare(saved, checksums(restored))
    if difference is not None:
        raise CheckpointError(f"checkpoint {path} is damaged ({difference})")
    return Restored(int(manifest.get("step", path.name)), restored["params"], restored["opt_state"],
                    dict(manifest.get("meta", {})))


def restore(directory: str | Path, params: Any, opt_state: Any, *, step: int | None = None,
            warn: Callable[[str], None] = _warn) -> Restored:
    """The newest checkpoint in ``directory`` that verifies (or exactly ``step``).

    Each checkpoint that fails verification on the way is reported with ``warn`` in
    one line naming it; older ones are then tried.

    Args:
      directory: the checkpoints folder.
      params, opt_state: the structure to restore into.
      step: restore this step only, refusing it if it does not verify.
      warn: receives one line per bad checkpoint skipped.

    Returns:
      A :class:`Restored`.

    Raises:
      FileNotFoundError: no checkpoint (or not ``step``) in ``directory``.
      CheckpointError: ``step`` does not verify, or no checkpoint does.
    """
    directory = Path(directory)
    found = steps(directory)
    if step is not None:
        if int(step) not in found:
            raise FileNotFoundError(f"no checkpoint of step {step} in {directory}"
                                    + (f" (steps: {', '.join(map(str, found))})" if found else ""))
        return verify(directory / str(int(step)), params, opt_state)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    failures = []
    for s in reversed(found):
        try:
            restored = verify(directory / str(s), params, opt_state)
        except CheckpointError as e:
            failures.append(str(e))
            continue
        for reason in failures:
            warn(f"{reason}; using step {restored.step} instead")
        return restored
    raise CheckpointError(f"no checkpoint in {directory} verifies; the newest: {failures[0]}")
