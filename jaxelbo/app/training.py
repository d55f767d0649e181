"""Training: optax optimisers, a pure step, and a loop.

Losses come from :func:`jaxelbo.registry.make` (an objective and an estimator by name, at a
sample budget).

* :func:`make_optimizer` builds separate optimisers for the decoder (theta,
  ``params["model"]``) and the encoder (phi, ``params["guide"]``) with
  :func:`optax.partition`, wrapped in :func:`optax.apply_if_finite` so that a step with
  a non-finite gradient never reaches the parameters.
* :func:`make_train_step` returns the pure, jit-compiled
  ``(params, opt_state, rng, x) -> (params, opt_state, metrics)``.
* :func:`train` runs the loop: a tqdm progress bar, metrics as JSON lines, periodic
  validation, orbax checkpoints, and exact resume (the step's key is
  ``fold_in(key(seed), step)`` and the batch a function of ``(seed, step)``, so a run
  resumed from a checkpoint reaches the same parameters as an uninterrupted one).
"""

from __future__ import annotations

import json
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


def make_optimizer(learning_rate: float = 1e-3, *, guide_learning_rate: float | None = None,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-4,
                   max_consecutive_errors: int = 1000) -> optax.GradientTransformation:
    """Adam for theta and phi separately (Burda et al. 2016: beta1 0.9, beta2 0.999, eps 1e-4).

    ``optax.partition`` routes ``params["model"]`` and ``params["guide"]`` to their own
    Adam (``guide_learning_rate`` defaults to ``learning_rate``); the whole is wrapped in
    ``optax.apply_if_finite``: a step whose gradient has a NaN or Inf leaves params and
    moments untouched and is counted (see :func:`skipped_steps`).
    """
    guide_learning_rate = learning_rate if guide_learning_rate is None else guide_learning_rate
    inner = optax.partition(
        {"model": optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
         "guide": optax.adam(guide_learning_rate, b1=b1, b2=b2, eps=eps)},
        param_labels)
    return optax.apply_if_finite(inner, max_consecutive_errors=max_consecutive_errors)


def skipped_steps(opt_state: Any) -> jax.Array:
    """Total steps skipped by ``optax.apply_if_finite`` (0 if the state has none)."""
    def has(s):
        return hasattr(s, "total_notfinite")

    for s in [opt_state, *jax.tree.leaves(opt_state, is_leaf=has)]:
        if has(s):
            return jnp.asarray(s.total_notfinite)
    return jnp.zeros((), jnp.int32)


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


def step_key(seed: int, step: int) -> jax.Array:
    """The PRNG key of global step ``step``: ``fold_in(key(seed), step)``."""
    return jax.random.fold_in(jax.random.key(seed), step)


# --------------------------------------------------------------------------- checkpoints


def _manager(directory: Path, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_checkpoint(directory: str | Path, step: int, params: dict, opt_state: Any, *,
                    max_to_keep: int = 2) -> None:
    """Saves ``{"params", "opt_state"}`` at ``step`` with orbax (keeps the last ``max_to_keep``)."""
    import orbax.checkpoint as ocp

    with _manager(Path(directory), max_to_keep) as mngr:
        state = {"params": params, "opt_state": opt_state}
        mngr.save(int(step), args=ocp.args.StandardSave(state), force=True)
        mngr.wait_until_finished()


def latest_step(directory: str | Path) -> int | None:
    """The last saved step in ``directory`` (None if there is no checkpoint)."""
    if not Path(directory).is_dir():
        return None
    with _manager(Path(directory)) as mngr:
        return mngr.latest_step()


def restore_checkpoint(directory: str | Path, params: dict, opt_state: Any,
                       step: int | None = None) -> tuple[int, dict, Any]:
    """Restores ``(step, params, opt_state)``; ``params``/``opt_state`` give the structure.

    Raises:
      FileNotFoundError: no checkpoint in ``directory``.
    """
    import orbax.checkpoint as ocp

    with _manager(Path(directory)) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
    return int(step), restored["params"], restored["opt_state"]


# --------------------------------------------------------------------------- loop


class TrainResult(NamedTuple):
    """What :func:`train` returns: final params and optimiser state, the step reached,
    the per-log metrics and validation records, and wall seconds spent training."""

    params: dict
    opt_state: Any
    step: int
    history: list
    wall_seconds: float


def _to_python(tree) -> Any:
    return jax.tree.map(lambda a: np.asarray(a).item() if np.ndim(a) == 0 else np.asarray(a).tolist(), tree)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drops records after ``last_step`` (written by a run that was then interrupted)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def train(step_fn: StepFn, params: dict, opt_state: Any, batches, *, num_steps: int, seed: int,
          out_dir: str | Path | None = None, resume: bool = False,
          eval_fn: Callable[[dict], dict] | None = None, eval_every: int = 0, log_every: int = 50,
          checkpoint_every: int = 0, progress: bool = True, put_batch: Callable | None = None,
          write_metrics: bool = True) -> TrainResult:
    """Runs ``num_steps`` steps (total, counting those of a resumed run).

    Args:
      step_fn: from :func:`make_train_step`.
      params, opt_state: initial state (also the structure a checkpoint restores into).
      batches: a :class:`jaxelbo.app.data.BatchIterator` (``batches.batch(step)``).
      num_steps: global step to stop at.
      seed: the step key is ``fold_in(key(seed), step)``.
      out_dir: where ``metrics.jsonl`` and ``checkpoints/`` go (None: nothing written).
      resume: continue from the latest checkpoint in ``out_dir/checkpoints`` (an
        interrupted run, Ctrl-C included: the last completed step is saved on
        ``KeyboardInterrupt``).
      eval_fn: ``params -> dict of numbers``, run every ``eval_every`` steps and at the
        end; records go to ``metrics.jsonl`` with ``"split": "validation"``.
      log_every: steps between training-metric records.
      checkpoint_every: steps between checkpoints (0: only at the end).
      progress: show a tqdm bar (steps/s, loss, bound).
      put_batch: ``numpy batch -> device array`` (e.g. a sharded ``device_put``).
      write_metrics: write ``metrics.jsonl`` (in multi-host runs only process 0 does;
        every process takes part in the orbax checkpoints).

    Returns:
      A :class:`TrainResult`.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir) if out_dir is not None else None
    ckpt_dir = out / "checkpoints" if out is not None else None
    metrics_path = out / "metrics.jsonl" if out is not None and write_metrics else None
    start = 0
    if resume and ckpt_dir is None:
        raise ValueError("resume=True needs out_dir")
    if resume and latest_step(ckpt_dir) is not None:
        start, params, opt_state = restore_checkpoint(ckpt_dir, params, opt_state)
        if metrics_path is not None:
            _truncate_jsonl(metrics_path, start)
    elif out is not None:  # a fresh run (or a resume with nothing saved yet)
        out.mkdir(parents=True, exist_ok=True)
        if metrics_path is not None and metrics_path.exists():
            metrics_path.unlink()
    put_batch = put_batch or jnp.asarray
    history: list[dict] = []
    log_file = open(metrics_path, "a") if metrics_path is not None else None  # noqa: SIM115

    def record(rec):
        history.append(rec)
        if log_file is not None:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

    t0 = time.perf_counter()
    bar = tqdm(total=num_steps, initial=start, disable=not progress, dynamic_ncols=True, mininterval=0.5)
    last_log_t, last_log_step = time.perf_counter(), start
    step = start
    state = (params, opt_state, start)  # (params, opt_state, steps done), replaced atomically
    saved = start
    try:
        for step in range(start, num_steps):
            x = put_batch(batches.batch(step))
            new = step_fn(params, opt_state, step_key(seed, step), x)
            state = (new[0], new[1], step + 1)
            params, opt_state, done = state
            metrics = new[2]
            if done % log_every == 0 or done == num_steps:
                now = time.perf_counter()
                rate = (done - last_log_step) / max(now - last_log_t, 1e-9)
                last_log_t, last_log_step = now, done
                shown = {"step": done, "split": "train", **_to_python(metrics), "steps_per_second": rate}
                record(shown)
                bar.set_postfix(loss=f"{shown['loss']:.3f}", bound=f"{shown['bound']:.3f}",
                                steps_s=f"{rate:.1f}", refresh=False)
            if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == num_steps):
                record({"step": done, "split": "validation", **_to_python(eval_fn(params))})
            at_checkpoint = (checkpoint_every and done % checkpoint_every == 0) or done == num_steps
            if ckpt_dir is not None and at_checkpoint:
                save_checkpoint(ckpt_dir, done, params, opt_state)
                saved = done
            bar.update(1)
        step = num_steps
    except KeyboardInterrupt:
        # Ctrl-C: keep the last completed step so that --resume loses nothing.
        if ckpt_dir is not None and state[2] > saved and jax.process_count() == 1:
            save_checkpoint(ckpt_dir, state[2], state[0], state[1])
        raise
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    jax.block_until_ready(params)
    return TrainResult(params, opt_state, max(step, start), history, time.perf_counter() - t0)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
