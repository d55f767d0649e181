"""Training: optax optimisers, a pure step, and a loop.

Losses come from :func:`jaxelbo.registry.make` (an objective and an estimator by name, at a
sample budget).

* :func:`jaxelbo.app.optim.make_optimizer` (also named here) builds the optimiser, whose
  :func:`~jaxelbo.app.optim.skip_non_finite` guard never lets a non-finite step reach the
  parameters, however many come in a row.
* :func:`make_train_step` returns the pure, jit-compiled
  ``(params, opt_state, rng, x) -> (params, opt_state, metrics)``.
* :func:`make_train_chunk` runs many steps in one compiled dispatch: the training set
  lives on the device(s), and each step draws its batch indices, dynamic binarisation
  and loss samples with ``jax.random`` from ``(seed, step)`` inside the loop; metrics are
  reduced on the device and fetched once per chunk.
* :func:`train_loop` is the host loop over chunks (to each log / validation / checkpoint
  step); after each chunk it runs small boundary actions (:func:`log_record`,
  :func:`divergence_stop`, :func:`validation`, :func:`periodic_checkpoint`,
  :func:`signal_stop`) over a :class:`LoopState`, with a :class:`MetricsWriter` for the
  JSON-lines records: a tqdm progress bar, periodic validation, verified checkpoints
  (:mod:`jaxelbo.app.checkpoint`) and exact resume (a run resumed from any checkpoint reaches bitwise the
  parameters of an uninterrupted one). :func:`train` is both in one call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxelbo.app.optim import consecutive_non_finite, make_optimizer, skipped_steps
from jaxelbo.types import LossFn

# make_optimizer, skipped_steps and consecutive_non_finite live in jaxelbo.app.optim; they are
# named here too because every training script builds its optimiser next to its step.
__all__ = ["ChunkFn", "StepFn", "TrainResult", "consecutive_non_finite", "guide_only", "make_optimizer",
           "make_train_chunk",
           "make_train_step", "next_boundary", "read_metrics", "skipped_steps", "step_key", "train",
           "train_loop"]

StepFn = Callable[[dict, Any, jax.Array, jax.Array], tuple[dict, Any, dict]]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, jit: bool = True,
                    donate: bool = False) -> StepFn:
    """The pure step ``(params, opt_state, rng, x) -> (params, opt_state, metrics)``.

    ``metrics``: ``loss`` (the surrogate's value: minus the mean bound for a lower bound, plus
    it for an upper one, :func:`jaxelbo.registry.direction`), ``bound`` (mean
    over the batch), ``ess`` (mean effective sample size), ``grad_norm`` (global norm of
    the estimator) and ``skipped_steps`` (total non-finite steps so far).
    """

    def step(params, opt_state, rng, x):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rng, x)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "bound": jnp.mean(aux["bound"]), "ess": jnp.mean(aux["ess"]),
                   "grad_norm": optax.tree.norm(grads), "skipped_steps": skipped_steps(opt_state)}
        return params, opt_state, metrics

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def guide_only(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` with ``params["model"]`` held constant: only the guide gets a gradient.

    What ``jaxelbo train`` does with an upper bound (CUBO, TVO's right sum): minimising it over
    the guide tightens it, but minimising it over theta would push ``log p(x)`` itself down.
    The value, aux and the guide's gradient are ``loss_fn``'s; the model's gradient is zero (so
    Adam leaves the model where it is).

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> loss_fn = guide_only(je.cubo(lg.model(), lg.guide(), num_samples=4))
      >>> g = jax.grad(lambda p: loss_fn(p, jax.random.key(0), jnp.ones((3, 2)) + 1)[0])(params)
      >>> float(jnp.abs(g["model"]["mu"]).sum())
      0.0
    """

    def wrapped(params, rng, x):
        frozen = {**params, "model": jax.lax.stop_gradient(params["model"])}
        return loss_fn(frozen, rng, x)

    wrapped.__name__ = f"guide_only_{getattr(loss_fn, '__name__', 'loss')}"
    wrapped.__doc__ = loss_fn.__doc__
    return wrapped


# Stream of key(seed) that draws the loss's samples (streams 1 and 2, batch order and
# binarisation, are jaxelbo.app.data's).
LOSS_STREAM = 0


def step_key(seed: int, step: int) -> jax.Array:
    """The loss's PRNG key at global step ``step``: ``fold_in(fold_in(key(seed), LOSS_STREAM), step)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), LOSS_STREAM), step)


# --------------------------------------------------------------------------- loop
#
# Two layers, so that whoever wraps the loop (divergence checks, signals) has one place
# to do it: ``make_train_chunk`` returns a function that runs the steps [start, stop) in
# one compiled dispatch and returns their reduced metrics; ``train_loop`` is the host loop
# over such chunks that logs, validates, checkpoints and resumes.

ChunkFn = Callable[[dict, Any, int, int], tuple[dict, Any, dict]]


class TrainResult(NamedTuple):
    """What :func:`train` returns: final params and optimiser state, the step reached,
    the per-log metrics and validation records, and wall seconds spent training.

    Also: ``status`` (``"completed"``, ``"diverged"`` or ``"interrupted"``), ``signum``
    (a signal that asked the run to stop, else 0; it may have come during the last
    chunk, after which the status is still ``"completed"``), ``checkpoint_step`` (the newest
    checkpoint written or resumed from, else None), ``non_finite_run`` (non-finite steps
    in a row at the end) and ``prior_seconds`` (training seconds of the sessions before
    a resume, from the checkpoint).
    """

    params: dict
    opt_state: Any
    step: int
    history: list
    wall_seconds: float
    status: str = "completed"
    signum: int = 0
    checkpoint_step: int | None = None
    non_finite_run: int = 0
    prior_seconds: float = 0.0


def _non_finite(metrics: dict, skipped_before: jax.Array) -> jax.Array:
    """Whether a step was skipped by :func:`~jaxelbo.app.optim.skip_non_finite` or gave a non-finite loss/norm."""
    bad = metrics["skipped_steps"] > skipped_before
    for name in ("loss", "grad_norm"):
        if name in metrics:
            bad = bad | ~jnp.isfinite(metrics[name])
    return bad


@functools.lru_cache(maxsize=64)
def _compiled_chunk(step_fn: StepFn, batch_size: int, num_rows: int, dynamic: bool, mesh) -> Callable:
    """The jit-compiled ``(params, opt_state, x, data_seed, seed, start, stop) -> ...`` of one chunk.

    One executable serves every chunk length (the step range is a traced argument), so
    a run's parameters do not depend on where its chunks begin and end.
    """
    from jaxelbo.app import data, sharding

    steps_per_epoch = num_rows // batch_size
    batch_sharding = None if mesh is None else sharding.batch_sharding(mesh)

    def run(params, opt_state, x, data_seed, seed, start, stop):
        data_rng = jax.random.key(data_seed)
        loss_rng = jax.random.fold_in(jax.random.key(seed), LOSS_STREAM)

        def one_step(perm, step, carry):
            params, opt_state, sums, count, non_finite = carry
            xb = data.batch_from_permutation(x, perm, data_rng, step, batch_size=batch_size, dynamic=dynamic)
            if batch_sharding is not None:
                xb = jax.lax.with_sharding_constraint(xb, batch_sharding)
            before = skipped_steps(opt_state)
            params, opt_state, metrics = step_fn(params, opt_state, jax.random.fold_in(loss_rng, step), xb)
            bad = _non_finite(metrics, before)
            sums = {k: s + jnp.where(bad, 0.0, metrics[k]) for k, s in sums.items()}
            return params, opt_state, sums, count + jnp.where(bad, 0, 1), non_finite + bad.astype(jnp.int32)

        def one_epoch(epoch, carry):
            perm = data.epoch_permutation(data_rng, epoch, num_rows)
            lo = jnp.maximum(start, epoch * steps_per_epoch)
            hi = jnp.minimum(stop, (epoch + 1) * steps_per_epoch)
            return jax.lax.fori_loop(lo, hi, functools.partial(one_step, perm), carry)

        shapes = jax.eval_shape(step_fn, params, opt_state, loss_rng, jax.ShapeDtypeStruct(
            (batch_size, x.shape[1]), x.dtype))[2]
        sums = {k: jnp.zeros((), jnp.float32) for k in shapes if k != "skipped_steps"}
        init = (params, opt_state, sums, jnp.int32(0), jnp.int32(0))
        params, opt_state, sums, count, non_finite = jax.lax.fori_loop(
            start // steps_per_epoch, (stop - 1) // steps_per_epoch + 1, one_epoch, init)
        metrics = {k: jnp.where(count > 0, s / jnp.maximum(count, 1), jnp.nan) for k, s in sums.items()}
        metrics["skipped_steps"] = skipped_steps(opt_state)
        metrics["non_finite_steps"] = non_finite
        metrics["consecutive_non_finite"] = consecutive_non_finite(opt_state)
        return params, opt_state, metrics

    return jax.jit(run)


def make_train_chunk(step_fn: StepFn, batches, *, seed: int, mesh=None) -> ChunkFn:
    """``chunk(params, opt_state, start, stop) -> (params, opt_state, metrics)``: steps [start, stop).

    The training set is placed on the device(s) once (rows split over the mesh's
    ``"data"`` axis when ``mesh`` is given; params and optimiser state are then expected
    replicated, see :func:`jaxelbo.app.sharding.replicate`). One call runs every step
    of the range in one compiled ``fori_loop``: step ``s`` draws its batch with
    :func:`jaxelbo.app.data.batch_from_permutation` (indices and dynamic binarisation
    from ``(batches.seed, s)``) and its loss key ``fold_in(loss stream of key(seed), s)``
    inside the loop, so nothing goes to or from the host between steps, and the result
    is a function of ``(seed, start, stop, params, opt_state)`` alone: bitwise the same
    however a run is cut into chunks or resumed.

    Args:
      step_fn: the pure step ``(params, opt_state, rng, x) -> (params, opt_state, metrics)``
        of :func:`make_train_step` (its metrics must hold ``skipped_steps``).
      batches: a :class:`jaxelbo.app.data.BatchIterator` (the training set, batch size,
        data seed and binarisation).
      seed: seed of the loss's samples.
      mesh: optional one-axis ``("data",)`` mesh (:func:`jaxelbo.app.sharding.data_mesh`).

    Returns:
      The chunk function. Its ``metrics`` are means over the chunk's finite steps of the
      step's metrics (``loss``, ``bound``, ``ess``, ``grad_norm``), ``skipped_steps``
      (total so far, from :func:`~jaxelbo.app.optim.skip_non_finite`) and ``non_finite_steps`` (steps of
      this chunk with a non-finite gradient or loss; their updates never reached params).
    """
    for name, value in (("seed", seed), ("batches.seed", batches.seed)):
        if not 0 <= int(value) < 2**31:
            raise ValueError(f"{name} must be in [0, 2**31), got {value}")
    run = _compiled_chunk(step_fn, batches.batch_size, batches.num_rows, batches.dynamic, mesh)
    x = batches.device_array(mesh)
    data_seed, loss_seed = np.int32(batches.seed), np.int32(seed)

    def chunk(params, opt_state, start: int, stop: int):
        if not 0 <= start < stop < 2**31:
            raise ValueError(f"a chunk needs 0 <= start < stop, got start={start}, stop={stop}")
        return run(params, opt_state, x, data_seed, loss_seed, np.int32(start), np.int32(stop))

    return chunk


def _to_python(tree) -> Any:
    return jax.tree.map(lambda a: np.asarray(a).item() if np.ndim(a) == 0 else np.asarray(a).tolist(), tree)


def _metrics_lines(path: Path) -> list[tuple[int, str, dict | None, str]]:
    """``(line number, text, record or None, why not a record)`` of each non-blank line of ``path``."""
    out: list[tuple[int, str, dict | None, str]] = []
    for i, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((i, raw.decode("utf-8", "replace"), None, f"not UTF-8 (byte {e.start})"))
            continue
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except ValueError:
            out.append((i, text, None, "not a JSON record"))
            continue
        out.append((i, text, rec, "") if _is_record(rec) else (i, text, None, f"not a metrics record ({text[:40]!r})"))
    return out


def _is_record(rec: Any) -> bool:
    """A training or validation record as :class:`MetricsWriter` writes them."""
    if not isinstance(rec, dict) or rec.get("split") not in ("train", "validation"):
        return False
    step = rec.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return False
    return rec["split"] != "train" or all(k in rec for k in ("loss", "bound", "steps_per_second"))


def _truncate_jsonl(path: Path, last_step: int, warn: Callable[[str], None] | None = None) -> None:
    """Drops records after ``last_step`` (written by a run that was then interrupted).

    A torn last line (a write cut short by a kill) is dropped too, with one line to
    ``warn``; a line elsewhere that is not a record (not UTF-8, not JSON, or JSON that is
    not a metrics record) raises ``ValueError`` naming the file and line.
    """
    if not path.exists():
        return
    lines = _metrics_lines(path)
    keep = []
    for n, (i, text, rec, why) in enumerate(lines):
        if rec is None:
            if n < len(lines) - 1:
                raise ValueError(f"{path}: line {i} is {why}; repair or remove that line, or start afresh "
                                 "with --overwrite")
            (warn or _note)(f"{path}: dropped a torn last line (a write cut short): {text[:40]!r}")
            continue
        if rec["step"] <= last_step:
            keep.append(text)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _note(message: str) -> None:
    print(f"jaxelbo: {message}", file=sys.stderr, flush=True)


class _StopFlag:
    """SIGINT / SIGTERM handlers that ask the loop to stop at the next chunk boundary.

    A second SIGINT raises ``KeyboardInterrupt`` at once (the previous handlers come back
    after the first signal).
    """

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def next_boundary(step: int, num_steps: int, *every: int) -> int:
    """The first step after ``step`` that is a multiple of a nonzero ``every``, or ``num_steps``."""
    return min([num_steps] + [(step // e + 1) * e for e in every if e])


def _combine(chunks: list[tuple[int, dict]]) -> dict:
    """One record from the host copies of several chunks' metrics: ``(num steps, metrics)``."""
    last = chunks[-1][1]
    non_finite = sum(int(m["non_finite_steps"]) for _, m in chunks)
    finite = [(n - int(m["non_finite_steps"]), m) for n, m in chunks]
    total = sum(w for w, _ in finite)
    out = {}
    for k in last:
        if k in ("skipped_steps", "non_finite_steps", "consecutive_non_finite"):
            continue
        out[k] = sum(w * m[k] for w, m in finite if w) / total if total else float("nan")
    return {**out, "skipped_steps": last["skipped_steps"], "non_finite_steps": non_finite}


def train(step_fn: StepFn, params: dict, opt_state: Any, batches, *, num_steps: int, seed: int,
          mesh=None, **loop_kwargs) -> TrainResult:
    """Trains ``num_steps`` steps (total, counting those of a resumed run) on ``batches``.

    :func:`make_train_chunk` then :func:`train_loop`; see them for the arguments.

    Example:
      >>> import jax, numpy as np
      >>> from jaxelbo import registry
      >>> from jaxelbo.app import data, training
      >>> from jaxelbo.models import vae
      >>> net = vae.build(jax.random.key(0), 4, hidden=(8,), latent_dim=2)
      >>> loss_fn = registry.make("iwae", net.model, net.guide, estimator="dreg", num_samples=4)
      >>> opt = training.make_optimizer(1e-3)
      >>> step = training.make_train_step(loss_fn, opt)
      >>> batches = data.BatchIterator(np.full((32, 4), 0.5, np.float32), batch_size=8, seed=0)
      >>> result = training.train(step, net.params, opt.init(net.params), batches, num_steps=10, seed=0,
      ...                         log_every=5, progress=False)
      >>> [r["step"] for r in result.history]
      [5, 10]
    """
    chunk = make_train_chunk(step_fn, batches, seed=seed, mesh=mesh)
    return train_loop(chunk, params, opt_state, num_steps=num_steps, **loop_kwargs)


class _Clock:
    """Training seconds since the last record; validation and checkpoints are kept off it."""

    def __init__(self) -> None:
        self.mark = time.perf_counter()
        self.seconds = 0.0

    def pause(self) -> None:
        now = time.perf_counter()
        self.seconds += now - self.mark
        self.mark = now

    def restart(self) -> None:
        self.mark = time.perf_counter()

    def take(self) -> float:
        """The seconds counted since the last ``take`` (and starts counting afresh)."""
        self.pause()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class MetricsWriter:
    """Training records: the chunks since the last record, combined and written one chunk late.

    :meth:`add` collects a chunk's device metrics; :meth:`close_record` makes the chunks
    collected so far one record at a step; :meth:`flush` writes it (waiting for those
    chunks only), so the host writes while the next chunk runs on the device.

    Args:
      path: the ``metrics.jsonl`` to append to (None: records stay in :attr:`history`).
      bar: a tqdm bar to advance (or None).
      clock: the training clock the records' ``steps_per_second`` come from.
    """

    def __init__(self, path: Path | None, bar=None, clock: _Clock | None = None):
        self.history: list[dict] = []
        self.unlogged: list[tuple[int, Any]] = []  # (num steps, device metrics) since the last record
        self.ready: tuple[int, list] | None = None  # a record to write once its chunks are done
        self.bar = bar
        self.path = path
        self.clock = clock or _Clock()
        self._file: Any = open(path, "a") if path is not None else None  # closed by close()

    def write(self, record: dict) -> None:
        self.history.append(record)
        if self._file is not None:
            if os.fstat(self._file.fileno()).st_nlink == 0:  # deleted under us: write it again
                self._rewrite()
                return
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def _rewrite(self) -> None:
        assert self._file is not None and self.path is not None
        self._file.close()
        file = open(self.path, "w")  # closed by close()
        file.write("".join(json.dumps(r) + "\n" for r in self.history))
        file.flush()
        self._file = file
        _note(f"{self.path} was deleted during the run; wrote this session's {len(self.history)} records again")

    def add(self, steps: int, metrics: Any) -> None:
        self.unlogged.append((steps, metrics))

    def close_record(self, at: int) -> None:
        """The chunks collected so far become the record of step ``at`` (none: nothing)."""
        if self.unlogged:
            self.ready, self.unlogged = (at, self.unlogged), []

    def flush(self) -> None:
        """Writes the record made by :meth:`close_record`, if any."""
        if self.ready is None:
            return
        done, chunks = self.ready
        self.ready = None
        values = _combine([(n, _to_python(m)) for n, m in chunks])  # waits for those chunks
        rate = sum(n for n, _ in chunks) / max(self.clock.take(), 1e-9)
        shown = {"step": done, "split": "train", **values, "steps_per_second": rate}
        self.write(shown)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{shown['loss']:.3f}", bound=f"{shown['bound']:.3f}",
                                 steps_s=f"{rate:.1f}", refresh=False)
        self.show(done)

    def show(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclasses.dataclass
class LoopState:
    """What the host loop carries from chunk to chunk; the boundary actions read and update it.

    Attributes:
      params, opt_state, step: the state reached (``step`` steps done).
      num_steps: the global step the run stops at.
      writer: the run's :class:`MetricsWriter`.
      ckpt_dir: the checkpoints folder (None: no checkpoints).
      saved: the newest step checkpointed or resumed from (the start step if none).
      last_checkpoint: the newest checkpoint written or resumed from (None if none).
      prior_seconds: training seconds of the sessions before a resume.
      run_of_bad: non-finite steps in a row at the last check.
    """

    params: Any
    opt_state: Any
    step: int
    num_steps: int
    writer: MetricsWriter
    ckpt_dir: Path | None = None
    saved: int = 0
    last_checkpoint: int | None = None
    prior_seconds: float = 0.0
    run_of_bad: int = 0
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def save(self) -> None:
        """Checkpoints the state reached (:func:`jaxelbo.app.checkpoint.save`)."""
        from jaxelbo.app import checkpoint, rundir

        assert self.ckpt_dir is not None, "a run without out_dir has no checkpoints"
        # the chunks since the last record, so that a resume from here writes the same records
        pending = [[n, _to_python(m)] for n, m in self.writer.unlogged]
        # a signal during the write (a second Ctrl-C) comes after it: never a half-written checkpoint
        # whose orbax threads still write while the interrupt unwinds
        with rundir.signals_deferred():
            checkpoint.save(self.ckpt_dir, self.step, self.params, self.opt_state,
                            meta={"train_seconds": self.prior_seconds + time.perf_counter() - self.t0,
                                  **({"pending_chunks": pending} if pending else {})})
            self.saved = self.last_checkpoint = self.step


# A boundary action runs after each chunk: ``action(loop, metrics) -> None`` to go on, or a
# status (``"diverged"``, ``"interrupted"``) that ends the run there.
BoundaryAction = Callable[[LoopState, Any], "str | None"]


@contextlib.contextmanager
def _off_the_clock(loop: LoopState, metrics: Any):
    """Validation and checkpoints: records written, the chunk done, its time not counted."""
    loop.writer.flush()
    jax.block_until_ready(metrics)
    loop.writer.clock.pause()
    loop.writer.show(loop.step)
    yield
    loop.writer.clock.restart()


def log_record(log_every: int) -> BoundaryAction:
    """Makes a training record at every multiple of ``log_every`` and at the last step."""

    def action(loop: LoopState, metrics: Any) -> None:
        if loop.step % log_every == 0 or loop.step == loop.num_steps:
            loop.writer.close_record(loop.step)

    return action


def divergence_stop(max_nonfinite_steps: int) -> BoundaryAction:
    """Stops with ``"diverged"`` once ``max_nonfinite_steps`` steps in a row were non-finite.

    The steps since the last record become one record at the step reached.
    """

    def action(loop: LoopState, metrics: Any) -> str | None:
        if "consecutive_non_finite" not in metrics:
            return None
        loop.run_of_bad = int(metrics["consecutive_non_finite"])  # waits for this chunk
        if loop.run_of_bad < max_nonfinite_steps:
            return None
        loop.writer.close_record(loop.step)
        loop.writer.flush()
        return "diverged"

    return action


def validation(eval_fn: Callable[[dict], dict], eval_every: int) -> BoundaryAction:
    """Writes ``eval_fn(params)`` as a validation record every ``eval_every`` steps and at the end."""

    def action(loop: LoopState, metrics: Any) -> None:
        if (eval_every and loop.step % eval_every == 0) or loop.step == loop.num_steps:
            with _off_the_clock(loop, metrics):
                loop.writer.write({"step": loop.step, "split": "validation", **_to_python(eval_fn(loop.params))})

    return action


def periodic_checkpoint(checkpoint_every: int) -> BoundaryAction:
    """Checkpoints every ``checkpoint_every`` steps (0: never) and at the end."""

    def action(loop: LoopState, metrics: Any) -> None:
        if (checkpoint_every and loop.step % checkpoint_every == 0) or loop.step == loop.num_steps:
            with _off_the_clock(loop, metrics):
                loop.save()

    return action


def signal_stop(flag: _StopFlag) -> BoundaryAction:
    """Stops with ``"interrupted"`` before the last step once ``flag`` caught a signal.

    The steps since the last record become one record at the step reached, which is
    checkpointed (if not already), so a resume has no gap.
    """

    def action(loop: LoopState, metrics: Any) -> str | None:
        if not flag.signum or loop.step >= loop.num_steps:
            return None
        loop.writer.close_record(loop.step)
        loop.writer.flush()
        if loop.ckpt_dir is not None and loop.step > loop.saved:
            loop.save()
        return "interrupted"

    return action


def _open_run(out: Path | None, metrics_path: Path | None, resume: bool, params: dict,
              opt_state: Any) -> tuple[int, dict, Any, float, list]:
    """``(start, params, opt_state, prior_seconds, pending)``: resumed from ``out``'s newest good
    checkpoint (``pending``: the metrics of its chunks since the last record), or a fresh run
    (an old ``metrics.jsonl`` removed)."""
    from jaxelbo.app import checkpoint

    ckpt_dir = out / "checkpoints" if out is not None else None
    if resume and ckpt_dir is not None and checkpoint.latest_step(ckpt_dir) is not None:
        restored = checkpoint.restore(ckpt_dir, params, opt_state)
        if metrics_path is not None and not metrics_path.exists():
            _note(f"{metrics_path} is missing: the records up to step {restored.step} are lost; "
                  "the resumed run writes those after it")
        if metrics_path is not None:
            _truncate_jsonl(metrics_path, restored.step)
        pending = [(int(n), m) for n, m in restored.meta.get("pending_chunks", [])]
        return (restored.step, restored.params, restored.opt_state,
                float(restored.meta.get("train_seconds", 0.0)), pending)
    if out is not None:  # a fresh run (or a resume with nothing saved yet)
        out.mkdir(parents=True, exist_ok=True)
        if metrics_path is not None and metrics_path.exists():
            metrics_path.unlink()
    return 0, params, opt_state, 0.0, []


def train_loop(chunk_fn: ChunkFn, params: dict, opt_state: Any, *, num_steps: int,
               out_dir: str | Path | None = None, resume: bool = False,
               eval_fn: Callable[[dict], dict] | None = None, eval_every: int = 0, log_every: int = 50,
               checkpoint_every: int = 0, progress: bool = True, write_metrics: bool = True,
               max_nonfinite_steps: int | None = None, handle_signals: bool = False) -> TrainResult:
    """The host loop: chunks up to each log / validation / checkpoint step, records, resume.

    Each chunk runs to the next step that is a multiple of ``log_every``,
    ``eval_every`` (with an ``eval_fn``) or ``checkpoint_every`` (with an ``out_dir``),
    or ``num_steps``. While a chunk runs on the device the host writes the record of the
    previous one, so the device is not left waiting on logging. After each chunk the
    boundary actions run in turn (:func:`log_record`, :func:`divergence_stop`,
    :func:`validation`, :func:`periodic_checkpoint`, :func:`signal_stop`); the first that
    returns a status ends the run.

    Args:
      chunk_fn: from :func:`make_train_chunk`.
      params, opt_state: initial state (also the structure a checkpoint restores into).
      num_steps: global step to stop at.
      out_dir: where ``metrics.jsonl`` and ``checkpoints/`` go (None: nothing written).
      resume: continue from the latest checkpoint in ``out_dir/checkpoints`` (an
        interrupted run, Ctrl-C included: the last completed chunk is saved on
        ``KeyboardInterrupt``). Any checkpoint step works, chunk boundary or not.
      eval_fn: ``params -> dict of numbers``, run every ``eval_every`` steps and at the
        end; records go to ``metrics.jsonl`` with ``"split": "validation"``.
      log_every: steps between training records (``"split": "train"``: the chunk
        metrics averaged over the finite steps since the previous record,
        ``skipped_steps`` so far, ``non_finite_steps`` since the previous record and
        ``steps_per_second``, validation and checkpoint time excluded).
      checkpoint_every: steps between checkpoints (0: only at the end).
      progress: show a tqdm bar (steps/s, loss, bound).
      write_metrics: write ``metrics.jsonl`` (in multi-host runs only process 0 does;
        every process takes part in the orbax checkpoints).
      max_nonfinite_steps: stop with status ``"diverged"`` once this many steps in a row
        were non-finite (checked at chunk boundaries; None: never). Params and
        optimiser state stay those of the last finite step.
      handle_signals: SIGINT and SIGTERM stop the run at the next chunk boundary: the
        pending records are written, the reached step is checkpointed, and the result
        has status ``"interrupted"`` and the signal (single-process runs only).

    Returns:
      A :class:`TrainResult`.
    """
    from tqdm.auto import tqdm

    if int(log_every) < 1:
        raise ValueError(f"log_every must be a positive integer, got {log_every}")
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs out_dir")
    ckpt_dir = out / "checkpoints" if out is not None else None
    metrics_path = out / "metrics.jsonl" if out is not None and write_metrics else None
    start, params, opt_state, prior_seconds, pending = _open_run(out, metrics_path, resume, params, opt_state)
    bar = tqdm(total=num_steps, initial=start, disable=not progress, dynamic_ncols=True, mininterval=0.5)
    loop = LoopState(params, opt_state, start, num_steps, MetricsWriter(metrics_path, bar), ckpt_dir=ckpt_dir,
                     saved=start, last_checkpoint=start or None,
                     prior_seconds=prior_seconds)
    loop.writer.unlogged = pending  # a checkpoint between log steps: its record goes on from there
    stop_flag = _StopFlag().install() if handle_signals else None
    actions = [log_record(log_every)]
    actions += [divergence_stop(max_nonfinite_steps)] if max_nonfinite_steps else []
    actions += [validation(eval_fn, eval_every)] if eval_fn is not None else []
    actions += [periodic_checkpoint(checkpoint_every)] if ckpt_dir is not None else []
    actions += [signal_stop(stop_flag)] if stop_flag is not None else []
    every = (log_every, eval_every if eval_fn is not None else 0, checkpoint_every if ckpt_dir is not None else 0)
    status = "completed"
    try:
        while loop.step < num_steps:
            stop = next_boundary(loop.step, num_steps, *every)
            new_params, new_opt_state, metrics = chunk_fn(loop.params, loop.opt_state, loop.step, stop)
            done, loop.params, loop.opt_state, loop.step = stop - loop.step, new_params, new_opt_state, stop
            loop.writer.flush()  # the previous record, while this chunk runs
            loop.writer.add(done, metrics)
            ended = next((s for s in (action(loop, metrics) for action in actions) if s), None)
            if ended:
                status = ended
                break
        loop.writer.flush()
    except KeyboardInterrupt:
        # Ctrl-C: keep the last completed chunk so that --resume loses nothing.
        if ckpt_dir is not None and loop.step > loop.saved and jax.process_count() == 1:
            loop.writer.flush()
            loop.save()
        if stop_flag is None or not stop_flag.signum:
            raise
        status = "interrupted"  # a second signal while the run was stopping on the first: it stops now
    finally:
        if stop_flag is not None:
            stop_flag.restore()
        bar.close()
        loop.writer.close()
    jax.block_until_ready(loop.params)
    return TrainResult(loop.params, loop.opt_state, loop.step, loop.writer.history, time.perf_counter() - loop.t0,
                       status=status, signum=stop_flag.signum if stop_flag is not None else 0,
                       checkpoint_step=loop.last_checkpoint, non_finite_run=loop.run_of_bad,
                       prior_seconds=prior_seconds)


def read_metrics(path: str | Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The records of a ``metrics.jsonl`` file.

    Lines that are not records (not UTF-8, not JSON, or JSON that is not a training or
    validation record) are skipped, with one line to ``warn`` naming the file, how many
    and the first of them.
    """
    path = Path(path)
    lines = _metrics_lines(path)
    bad = [(i, why) for i, _, rec, why in lines if rec is None]
    if bad:
        (warn or _note)(f"{path}: skipped {len(bad)} line(s) that are not metrics records (line {bad[0][0]}: "
                        f"{bad[0][1]})")
    return [rec for _, _, rec, _ in lines if rec is not None]
