"""Many training runs as one compiled program: ``vmap`` over runs of the device-resident loop.

A results table trains R models that differ only in their seeds and in the objective x
estimator (each pair its own compiled step, all on one architecture). :func:`train_many`
runs them together: the runs of one step function are stacked and the loop of
:func:`jaxelbo.app.training.make_train_chunk` (data on the device, one ``fori_loop`` per
chunk of steps) is ``vmap``-ed over them; every group of runs goes into the same jitted
program, so one dispatch advances every run of the table by a chunk of steps.

Each run keeps what it has when trained alone:

- its RNG streams: the loss key ``fold_in(fold_in(key(seed), 0), step)`` and the data
  seed of its :class:`~jaxelbo.app.data.BatchIterator` (batch order, binarisation);
- its optimiser state, hence its own skipped-step counters (``skip_non_finite``);
- its metrics, one record per ``log_every`` steps, as :func:`jaxelbo.app.training.train`
  writes them;
- optionally its own folder (``out_dirs``): checkpoints in ``<dir>/checkpoints`` (as
  ``jaxelbo train`` writes them, :func:`jaxelbo.app.checkpoint.save`) every
  ``checkpoint_every`` steps and at the end, and its records in ``<dir>/metrics.jsonl``.
  ``resume=True`` restores every run from its newest checkpoint (all runs at the same
  step) and carries on: the parameters equal those of the uninterrupted table bitwise
  (the loss key and the batch of a step depend only on the seeds and the step).

Its parameters equal those of the run trained alone up to float rounding (a vmapped
matrix product may be summed in another order; tested to ``1e-5`` relative).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxelbo.app import training


class Run(NamedTuple):
    """One run of the table: its step, initial state, data and loss seed.

    Attributes:
      step_fn: the step of :func:`jaxelbo.app.training.make_train_step`; runs that share
        the same object are stacked into one ``vmap`` (reuse it across seeds).
      params: initial parameters.
      opt_state: initial optimiser state.
      batches: a :class:`jaxelbo.app.data.BatchIterator` (its ``seed`` is the data seed).
      seed: seed of the loss's samples, as for :func:`jaxelbo.app.training.train`.
    """

    step_fn: Callable
    params: dict
    opt_state: Any
    batches: Any
    seed: int


class RunResult(NamedTuple):
    """One run's result: final params and optimiser state, its per-log records, skipped steps."""

    params: dict
    opt_state: Any
    history: list
    skipped_steps: int


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(a) for a in leaves]), *trees)


def _unstack(tree: Any, n: int) -> list:
    return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n)]


def _groups(runs: Sequence[Run]) -> list[list[int]]:
    """Indices of the runs, grouped by step function (first appearance order)."""
    groups: dict[int, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(id(run.step_fn), []).append(i)
    return list(groups.values())


def _check(runs: Sequence[Run]) -> None:
    if not runs:
        raise ValueError("train_many needs at least one run")
    first = runs[0].batches
    for i, run in enumerate(runs):
        b = run.batches
        if (b.batch_size, b.num_rows, b.dynamic, b.x.shape) != (first.batch_size, first.num_rows, first.dynamic,
                                                               first.x.shape):
            raise ValueError(f"run {i}: every run needs the same batch size, training-set shape and "
                             f"binarisation; got batch_size={b.batch_size}, x {b.x.shape}, dynamic={b.dynamic} "
                             f"against {first.batch_size}, {first.x.shape}, {first.dynamic}")
        for name, value in (("seed", run.seed), ("batches.seed", b.seed)):
            if not 0 <= int(value) < 2**31:
                raise ValueError(f"run {i}: {name} must be in [0, 2**31), got {value}")


@functools.lru_cache(maxsize=16)
def _program(step_fns: tuple, batch_size: int, num_rows: int, dynamic: bool, shared_x: bool) -> Callable:
    """The jitted program of :func:`make_many_chunk`, cached (one compile per table layout)."""
    compiled: list[Any] = [training._compiled_chunk(f, batch_size, num_rows, dynamic, None) for f in step_fns]
    bodies = [c.__wrapped__ for c in compiled]
    x_axis = None if shared_x else 0

    def program(states, xs, data_seeds, seeds, start, stop):
        out = []
        for body, (params, opt_state), x, ds, s in zip(bodies, states, xs, data_seeds, seeds, strict=True):
            many = jax.vmap(body, in_axes=(0, 0, x_axis, 0, 0, None, None))
            out.append(many(params, opt_state, x, ds, s, start, stop))
        return out

    return jax.jit(program)


def make_many_chunk(runs: Sequence[Run]) -> Callable:
    """``chunk(states, start, stop) -> (states, metrics)``: steps [start, stop) of every run, one dispatch.

    ``states`` is a list, one ``(params, opt_state)`` per group of :func:`_groups` with
    leaves stacked over the group's runs; ``metrics`` likewise (one chunk record per run,
    as :func:`jaxelbo.app.training.make_train_chunk` returns it, stacked).
    """
    _check(runs)
    groups = _groups(runs)
    shared_x = all(np.array_equal(r.batches.x, runs[0].batches.x) for r in runs)
    b = runs[0].batches
    compiled = _program(tuple(runs[g[0]].step_fn for g in groups), b.batch_size, b.num_rows, b.dynamic, shared_x)
    if shared_x:
        x0 = jnp.asarray(runs[0].batches.x)
        xs = [x0 for _ in groups]
    else:
        xs = [jnp.stack([jnp.asarray(runs[i].batches.x) for i in g]) for g in groups]
    data_seeds = [jnp.asarray([runs[i].batches.seed for i in g], jnp.int32) for g in groups]
    seeds = [jnp.asarray([runs[i].seed for i in g], jnp.int32) for g in groups]

    def chunk(states, start: int, stop: int):
        if not 0 <= start < stop < 2**31:
            raise ValueError(f"a chunk needs 0 <= start < stop, got start={start}, stop={stop}")
        out = compiled(states, xs, data_seeds, seeds, np.int32(start), np.int32(stop))
        return [(p, o) for p, o, _ in out], [m for _, _, m in out]

    chunk.groups = groups  # type: ignore[attr-defined]
    return chunk


def _resume_step(dirs: list[Path | None]) -> int:
    """The step every run's folder can resume from (0: nothing saved), or an error naming the runs."""
    from jaxelbo.app import checkpoint

    latest = [None if d is None else checkpoint.latest_step(d / "checkpoints") for d in dirs]
    named = {i: s for i, s in enumerate(latest) if dirs[i] is not None}
    if not named or all(s is None for s in named.values()):
        return 0
    if len(set(named.values())) != 1:
        raise ValueError("train_many resume: every run's newest checkpoint must be of the same step, got "
                         + ", ".join(f"run {i}: {s}" for i, s in named.items()))
    if len(named) != len(dirs):
        raise ValueError("train_many resume: every run needs an out_dir")
    step = next(iter(named.values()))
    assert step is not None  # one common value, and not every value is None
    return int(step)


def train_many(runs: Sequence[Run], *, num_steps: int, log_every: int = 50,
               out_dirs: Sequence[str | Path | None] | None = None, checkpoint_every: int = 0,
               resume: bool = False) -> list[RunResult]:
    """Trains every run for ``num_steps`` steps as one compiled program per chunk of ``log_every`` steps.

    Args:
      runs: the :class:`Run` s; all share the batch size, training-set shape and
        binarisation (their data seeds and loss seeds are their own). Runs with the
        same ``step_fn`` object are ``vmap``-ed together.
      num_steps: steps of every run.
      log_every: steps per chunk (one record per run per chunk).
      out_dirs: optional folder per run (or None): ``checkpoints/`` (every
        ``checkpoint_every`` steps and at the end) and ``metrics.jsonl``.
      checkpoint_every: steps between checkpoints (0: only the final one).
      resume: restore every run from its newest checkpoint in ``out_dirs`` (all at the
        same step; a fresh start when none is saved) and train on to ``num_steps``.

    Returns:
      One :class:`RunResult` per run, in the order of ``runs``: its ``history`` holds
      a record ``{"step", metrics...}`` per chunk (after the resumed step), with the
      chunk's means of ``loss``, ``bound``, ``ess``, ``grad_norm``, the run's
      ``skipped_steps`` so far and its ``non_finite_steps`` in the chunk.

    Example:
      >>> import jax, numpy as np
      >>> from jaxelbo import registry
      >>> from jaxelbo.app import data, training, train_many as tm
      >>> from jaxelbo.models import vae
      >>> net = vae.build(jax.random.key(0), 4, hidden=(8,), latent_dim=2)
      >>> opt = training.make_optimizer(1e-3)
      >>> loss_fn = registry.make("iwae", net.model, net.guide, estimator="reparam", num_samples=4)
      >>> step = training.make_train_step(loss_fn, opt)
      >>> x = np.full((32, 4), 0.5, np.float32)
      >>> runs = [tm.Run(step, net.params, opt.init(net.params), data.BatchIterator(x, 8, s), s) for s in (0, 1)]
      >>> [len(r.history) for r in tm.train_many(runs, num_steps=10, log_every=5)]
      [2, 2]
    """
    from jaxelbo.app import checkpoint

    if num_steps < 1 or log_every < 1 or checkpoint_every < 0:
        raise ValueError(f"num_steps and log_every must be >= 1 and checkpoint_every >= 0, got {num_steps}, "
                         f"{log_every}, {checkpoint_every}")
    if out_dirs is not None and len(out_dirs) != len(runs):
        raise ValueError(f"out_dirs needs one entry per run ({len(runs)}), got {len(out_dirs)}")
    dirs = [None if d is None else Path(d) for d in (out_dirs or [None] * len(runs))]
    if resume and out_dirs is None:
        raise ValueError("train_many resume needs out_dirs")
    start = _resume_step(dirs) if resume else 0
    if start > num_steps:
        raise ValueError(f"train_many resume: the checkpoints are of step {start}, past num_steps={num_steps}")
    runs = list(runs)
    for i, d in enumerate(dirs):
        if d is None:
            continue
        d.mkdir(parents=True, exist_ok=True)
        if start:
            restored = checkpoint.restore(d / "checkpoints", runs[i].params, runs[i].opt_state, step=start)
            runs[i] = runs[i]._replace(params=restored.params, opt_state=restored.opt_state)
            training._truncate_jsonl(d / "metrics.jsonl", start)
        else:
            (d / "metrics.jsonl").unlink(missing_ok=True)
    chunk = make_many_chunk(runs)
    groups = chunk.groups  # type: ignore[attr-defined]
    states = [(_stack([runs[i].params for i in g]), _stack([runs[i].opt_state for i in g])) for g in groups]
    histories: list[list[dict]] = [[] for _ in runs]

    def save(step: int) -> None:
        for g, (params, opt_state) in zip(groups, states, strict=True):
            for j, (p, o) in enumerate(zip(_unstack(params, len(g)), _unstack(opt_state, len(g)), strict=True)):
                if dirs[g[j]] is not None:
                    checkpoint.save(dirs[g[j]] / "checkpoints", step, p, o)

    step = start
    while step < num_steps:
        stop = min(step + log_every, num_steps, training.next_boundary(step, num_steps, checkpoint_every))
        t0 = time.perf_counter()
        states, metrics = chunk(states, step, stop)
        metrics = jax.device_get(metrics)
        seconds = time.perf_counter() - t0
        for g, m in zip(groups, metrics, strict=True):
            for j, i in enumerate(g):
                rec = {k: np.asarray(v[j]).item() for k, v in m.items()}
                histories[i].append({"step": stop, "split": "train", **rec,
                                     "steps_per_second": (stop - step) / seconds})
                d = dirs[i]
                if d is not None:
                    with open(d / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(histories[i][-1]) + "\n")
        step = stop
        if any(d is not None for d in dirs) and (step == num_steps or (checkpoint_every and
                                                                      step % checkpoint_every == 0)):
            save(step)
    results: list[RunResult | None] = [None] * len(runs)
    for g, (params, opt_state) in zip(groups, states, strict=True):
        for j, (p, o) in enumerate(zip(_unstack(params, len(g)), _unstack(opt_state, len(g)), strict=True)):
            results[g[j]] = RunResult(p, o, histories[g[j]], int(training.skipped_steps(o)))
    return [r for r in results if r is not None]
