"""Training: optax optimisers, a pure step, and a loop.

Losses come from :func:`jaxelbo.registry.make` (an objective and an estimator by name, at a
sample budget).

* :func:`make_optimizer` builds separate optimisers for the decoder (theta,
  ``params["model"]``) and the encoder (phi, ``params["guide"]``) with
  :func:`optax.partition`, wrapped in :func:`skip_non_finite` so that a step with a
  non-finite gradient or update never reaches the parameters, however many in a row.
* :func:`make_train_step` returns the pure, jit-compiled
  ``(params, opt_state, rng, x) -> (params, opt_state, metrics)``.
* :func:`make_train_chunk` runs many steps in one compiled dispatch: the training set
  lives on the device(s), and each step draws its batch indices, dynamic binarisation
  and loss samples with ``jax.random`` from ``(seed, step)`` inside the loop; metrics are
  reduced on the device and fetched once per chunk.
* :func:`train_loop` is the host loop over chunks (to each log / validation / checkpoint
  step): a tqdm progress bar, metrics as JSON lines, periodic validation, orbax
  checkpoints and exact resume (a run resumed from any checkpoint reaches bitwise the
  parameters of an uninterrupted one). :func:`train` is both in one call.
"""

from __future__ import annotations

import functools
import json
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

from jaxelbo.types import LossFn

StepFn = Callable[[dict, Any, jax.Array, jax.Array], tuple[dict, Any, dict]]


def param_labels(params: dict) -> dict:
    """``{"model": "model" at every leaf, "guide": "guide" at every leaf}`` for optax.partition."""
    return {name: jax.tree.map(lambda _, n=name: n, params[name]) for name in params}


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_non_finite` (the field names of ``optax.ApplyIfFiniteState``).

    Attributes:
      notfinite_count: non-finite steps in a row, up to now (0 after a finite step).
      last_finite: whether the last step was applied.
      total_notfinite: non-finite steps in all.
      inner_state: the wrapped optimiser's state (untouched by non-finite steps).
    """

    notfinite_count: jax.Array
    last_finite: jax.Array
    total_notfinite: jax.Array
    inner_state: Any


def _all_finite(tree: Any) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def skip_non_finite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that a non-finite step never reaches the parameters.

    A step is applied only if the gradient, ``inner``'s update and (when ``params`` are
    given) the updated parameters are all finite; otherwise the update is zero and
    ``inner``'s state (e.g. Adam's moments) is kept. Unlike ``optax.apply_if_finite``,
    which applies the update anyway after ``max_consecutive_errors`` non-finite steps in
    a row, this never gives up: the caller decides when to stop, from
    :func:`consecutive_non_finite`.

    Args:
      inner: the optimiser to protect.

    Returns:
      The wrapped transformation; its state is a :class:`SkipNonFiniteState`.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return SkipNonFiniteState(jnp.zeros([], jnp.int32), jnp.array(True), jnp.zeros([], jnp.int32),
                                  inner.init(params))

    def update(grads, state, params=None, **extra_args):
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        ok = _all_finite(grads) & _all_finite(updates)
        if params is not None:
            ok = ok & _all_finite(optax.apply_updates(params, updates))
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        inner_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), inner_state, state.inner_state)
        bad = (~ok).astype(jnp.int32)
        return updates, SkipNonFiniteState(notfinite_count=(state.notfinite_count + 1) * bad, last_finite=ok,
                                           total_notfinite=state.total_notfinite + bad, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(learning_rate: float = 1e-3, *, guide_learning_rate: float | None = None,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-4) -> optax.GradientTransformation:
    """Adam for theta and phi separately (Burda et al. 2016: beta1 0.9, beta2 0.999, eps 1e-4).

    ``optax.partition`` routes ``params["model"]`` and ``params["guide"]`` to their own
    Adam (``guide_learning_rate`` defaults to ``learning_rate``); the whole is wrapped in
    :func:`skip_non_finite`: a step whose gradient or update has a NaN or Inf leaves
    params and moments untouched and is counted (see :func:`skipped_steps`).
    """
    guide_learning_rate = learning_rate if guide_learning_rate is None else guide_learning_rate
    inner = optax.partition(
        {"model": optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
         "guide": optax.adam(guide_learning_rate, b1=b1, b2=b2, eps=eps)},
        param_labels)
    return skip_non_finite(inner)


def _count(opt_state: Any, field: str) -> jax.Array:
    def has(s):
        return hasattr(s, field)

    for s in [opt_state, *jax.tree.leaves(opt_state, is_leaf=has)]:
        if has(s):
            return jnp.asarray(getattr(s, field))
    return jnp.zeros((), jnp.int32)


def skipped_steps(opt_state: Any) -> jax.Array:
    """Total non-finite steps skipped (by :func:`skip_non_finite`; 0 if the state has none)."""
    return _count(opt_state, "total_notfinite")


def consecutive_non_finite(opt_state: Any) -> jax.Array:
    """Non-finite steps in a row up to now (0 if the last step was finite or the state has none)."""
    return _count(opt_state, "notfinite_count")


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, jit: bool = True,
                    donate: bool = False) -> StepFn:
    """The pure step ``(params, opt_state, rng, x) -> (params, opt_state, metrics)``.

    ``metrics``: ``loss`` (the surrogate's value, minus the mean bound), ``bound`` (mean
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


# Stream of key(seed) that draws the loss's samples (streams 1 and 2, batch order and
# binarisation, are jaxelbo.app.data's).
LOSS_STREAM = 0


def step_key(seed: int, step: int) -> jax.Array:
    """The loss's PRNG key at global step ``step``: ``fold_in(fold_in(key(seed), LOSS_STREAM), step)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), LOSS_STREAM), step)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: str | Path, step: int, params: dict, opt_state: Any, *,
                    max_to_keep: int = 2, meta: dict | None = None) -> None:
    """Saves a verified checkpoint of ``{"params", "opt_state"}`` at ``step``.

    See :func:`jaxelbo.app.checkpoint.save`: a state that is not all finite is refused,
    and the ``max_to_keep`` newest verified checkpoints are kept.
    """
    from jaxelbo.app import checkpoint

    checkpoint.save(directory, step, params, opt_state, keep=max_to_keep, meta=meta)


def latest_step(directory: str | Path) -> int | None:
    """The last saved step in ``directory`` (None if there is no checkpoint)."""
    from jaxelbo.app import checkpoint

    return checkpoint.latest_step(directory)


def restore_checkpoint(directory: str | Path, params: dict, opt_state: Any,
                       step: int | None = None) -> tuple[int, dict, Any]:
    """Restores ``(step, params, opt_state)``; ``params``/``opt_state`` give the structure.

    The newest checkpoint that verifies against its checksums is used; each damaged one
    skipped on the way is reported in one line (:func:`jaxelbo.app.checkpoint.restore`).

    Raises:
      FileNotFoundError: no checkpoint in ``directory``.
      jaxelbo.app.checkpoint.CheckpointError: ``step`` (or every checkpoint) is damaged.
    """
    from jaxelbo.app import checkpoint

    restored = checkpoint.restore(directory, params, opt_state, step=step)
    return restored.step, restored.params, restored.opt_state


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
    """Whether a step was skipped by ``apply_if_finite`` or produced a non-finite loss/norm."""
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
      (total so far, from ``optax.apply_if_finite``) and ``non_finite_steps`` (steps of
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


def _truncate_jsonl(path: Path, last_step: int, warn: Callable[[str], None] | None = None) -> None:
    """Drops records after ``last_step`` (written by a run that was then interrupted).

    A torn last line (a write cut short by a kill) is dropped too, with one line to
    ``warn``; an unreadable line elsewhere raises ``ValueError`` naming the file and line.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not a JSON record") from None
            (warn or _note)(f"{path}: dropped a torn last line (a write cut short): {line[:40]!r}")
            continue
        if rec.get("step", 0) <= last_step:
            keep.append(line)
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


def train_loop(chunk_fn: ChunkFn, params: dict, opt_state: Any, *, num_steps: int,
               out_dir: str | Path | None = None, resume: bool = False,
               eval_fn: Callable[[dict], dict] | None = None, eval_every: int = 0, log_every: int = 50,
               checkpoint_every: int = 0, progress: bool = True, write_metrics: bool = True,
               max_nonfinite_steps: int | None = None, handle_signals: bool = False) -> TrainResult:
    """The host loop: chunks up to each log / validation / checkpoint step, records, resume.

    Each chunk runs to the next step that is a multiple of ``log_every``,
    ``eval_every`` (with an ``eval_fn``) or ``checkpoint_every`` (with an ``out_dir``),
    or ``num_steps``. While a chunk runs on the device the host writes the record of the
    previous one, so the device is not left waiting on logging.

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
    ckpt_dir = out / "checkpoints" if out is not None else None
    metrics_path = out / "metrics.jsonl" if out is not None and write_metrics else None
    start = 0
    if resume and ckpt_dir is None:
        raise ValueError("resume=True needs out_dir")
    prior_seconds, last_checkpoint = 0.0, None
    if resume and latest_step(ckpt_dir) is not None:
        from jaxelbo.app import checkpoint

        restored = checkpoint.restore(ckpt_dir, params, opt_state)
        start, params, opt_state = restored.step, restored.params, restored.opt_state
        prior_seconds, last_checkpoint = float(restored.meta.get("train_seconds", 0.0)), start
        if metrics_path is not None:
            _truncate_jsonl(metrics_path, start)
    elif out is not None:  # a fresh run (or a resume with nothing saved yet)
        out.mkdir(parents=True, exist_ok=True)
        if metrics_path is not None and metrics_path.exists():
            metrics_path.unlink()
    history: list[dict] = []
    log_file = open(metrics_path, "a") if metrics_path is not None else None

    def record(rec):
        history.append(rec)
        if log_file is not None:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

    t0 = time.perf_counter()
    bar = tqdm(total=num_steps, initial=start, disable=not progress, dynamic_ncols=True, mininterval=0.5)
    clock = {"mark": time.perf_counter(), "seconds": 0.0, "steps": 0}  # training time since the last record
    unlogged: list[tuple[int, dict]] = []  # (num steps, device metrics) of chunks since the last record
    ready: tuple[int, list] | None = None  # a record to write once its chunks are done

    def stop_clock():
        now = time.perf_counter()
        clock["seconds"] += now - clock["mark"]
        clock["mark"] = now

    def write_ready():
        nonlocal ready
        if ready is None:
            return
        done, chunks = ready
        ready = None
        values = _combine([(n, _to_python(m)) for n, m in chunks])  # waits for those chunks
        stop_clock()
        steps = sum(n for n, _ in chunks)
        rate = steps / max(clock["seconds"], 1e-9)
        clock["seconds"] = 0.0
        shown = {"step": done, "split": "train", **values, "steps_per_second": rate}
        record(shown)
        bar.set_postfix(loss=f"{shown['loss']:.3f}", bound=f"{shown['bound']:.3f}", steps_s=f"{rate:.1f}",
                        refresh=False)
        bar.update(done - bar.n)

    step = start
    state = (params, opt_state, start)  # (params, opt_state, steps done), replaced atomically
    saved = start
    status, run_of_bad = "completed", 0
    stop_flag = _StopFlag().install() if handle_signals else None

    def checkpoint_now(at: int) -> None:
        nonlocal saved, last_checkpoint
        save_checkpoint(ckpt_dir, at, state[0], state[1],
                        meta={"train_seconds": prior_seconds + time.perf_counter() - t0})
        saved = last_checkpoint = at

    try:
        while step < num_steps:
            stop = next_boundary(step, num_steps, log_every, eval_every if eval_fn is not None else 0,
                                 checkpoint_every if ckpt_dir is not None else 0)
            params, opt_state, metrics = chunk_fn(params, opt_state, step, stop)
            state = (params, opt_state, stop)
            write_ready()  # the previous record, while this chunk runs
            unlogged.append((stop - step, metrics))
            step = stop
            if stop % log_every == 0 or stop == num_steps:
                ready, unlogged = (stop, unlogged), []
            if max_nonfinite_steps and "consecutive_non_finite" in metrics:
                run_of_bad = int(metrics["consecutive_non_finite"])  # waits for this chunk
                if run_of_bad >= max_nonfinite_steps:
                    if unlogged:  # a record up to here, at a step that is not a log step
                        ready, unlogged = (stop, unlogged), []
                    write_ready()
                    status = "diverged"
                    break
            at_eval = eval_fn is not None and ((eval_every and stop % eval_every == 0) or stop == num_steps)
            at_checkpoint = ckpt_dir is not None and ((checkpoint_every and stop % checkpoint_every == 0)
                                                      or stop == num_steps)
            if at_eval or at_checkpoint:
                write_ready()
                jax.block_until_ready(metrics)
                stop_clock()
                bar.update(stop - bar.n)
                if at_eval:
                    record({"step": stop, "split": "validation", **_to_python(eval_fn(params))})
                if at_checkpoint:
                    checkpoint_now(stop)
                clock["mark"] = time.perf_counter()
            if stop_flag is not None and stop_flag.signum and step < num_steps:
                if unlogged:  # records up to the step saved: a resume then has no gap
                    ready, unlogged = (stop, unlogged), []
                write_ready()
                if ckpt_dir is not None and stop > saved:
                    checkpoint_now(stop)
                status = "interrupted"
                break
        write_ready()
    except KeyboardInterrupt:
        # Ctrl-C: keep the last completed chunk so that --resume loses nothing.
        if ckpt_dir is not None and state[2] > saved and jax.process_count() == 1:
            write_ready()
            checkpoint_now(state[2])
        raise
    finally:
        if stop_flag is not None:
            stop_flag.restore()
        bar.close()
        if log_file is not None:
            log_file.close()
    jax.block_until_ready(params)
    return TrainResult(params, opt_state, max(step, start), history, time.perf_counter() - t0, status=status,
                       signum=stop_flag.signum if stop_flag is not None else 0, checkpoint_step=last_checkpoint,
                       non_finite_run=run_of_bad, prior_seconds=prior_seconds)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
