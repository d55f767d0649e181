"""One training experiment of ``jaxelbo train``: settings in, a trained and evaluated VAE out.

* :class:`TrainSettings`: every setting of a run (the ``jaxelbo train`` flags, as fields),
  frozen; which of them a resume must keep and which change the compiled step is read
  from the fields' metadata. :data:`DEFAULTS` is its defaults as a dict.
* :func:`validate` checks them (one line naming the valid choices) before anything runs;
  :func:`objective_kwargs` / :func:`objective_record` resolve the objective's budget split
  and extra keywords through :mod:`jaxelbo.registry`.
* :func:`build_experiment`: the data set, the VAE, the loss and the optimiser.
* :func:`train_and_evaluate`: trains, evaluates on the test set and writes every output
  (``config.json``, ``metrics.jsonl``, checkpoints, ``summary.json``, figures) into ``out``.

* :func:`evaluate_run`: re-evaluates a saved run's checkpoint (``jaxelbo evaluate``).

``jaxelbo train`` (:mod:`jaxelbo.app.commands.train`) parses flags and calls these;
``jaxelbo evaluate`` and ``benchmarks/train_table.py`` use them too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

_RESUME = {"resume": True}  # must match when a run is resumed
_COMPILE = {"resume": True, "compile": True}  # also part of the compiled step's cache key


def _setting(default, meta: dict | None = None):
    return dataclasses.field(default=default, metadata=meta or {})


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Every setting of a ``jaxelbo train`` run (its flags, by name), frozen.

    Each field's metadata says what it is part of: ``resume`` (a resumed run must be
    given the saved value, see :meth:`resume_mismatches`) and ``compile`` (it changes the
    compiled step, see :meth:`compile_key`); the rest (steps, logging, evaluation sizes)
    may change between the sessions of a run.

    Example:
      >>> s = TrainSettings(num_samples=8)
      >>> s.resume_mismatches(s.replace(steps=10)), s.resume_mismatches(s.replace(seed=1))
      ([], ['seed'])
    """

    dataset: str = _setting("digits", _RESUME)
    data_dir: str | None = _setting(None)
    objective: str = _setting("iwae", _COMPILE)
    estimator: str = _setting("dreg", _COMPILE)
    num_samples: int = _setting(64, _COMPILE)
    num_outer: int | None = _setting(None, _COMPILE)
    beta: float | None = _setting(None, _COMPILE)
    alpha: float | None = _setting(None, _COMPILE)
    n: float | None = _setting(None, _COMPILE)
    num_partitions: int | None = _setting(None, _COMPILE)
    log_beta_min: float | None = _setting(None, _COMPILE)
    integration: str | None = _setting(None, _COMPILE)
    partition: str | None = _setting(None, _COMPILE)
    steps: int = _setting(3000)
    batch_size: int = _setting(64, _RESUME)
    seed: int = _setting(0, _RESUME)
    learning_rate: float = _setting(1e-3, _COMPILE)
    guide_learning_rate: float | None = _setting(None, _COMPILE)
    hidden: tuple[int, ...] = _setting((200, 200), _RESUME)
    latent_dim: int = _setting(50, _RESUME)
    binarization: str = _setting("dynamic", _RESUME)
    validation_size: int | None = _setting(None, _RESUME)
    eval_every: int = _setting(500)
    checkpoint_every: int = _setting(500)
    log_every: int = _setting(50)
    eval_num_samples: int = _setting(5000)
    eval_chunk_size: int = _setting(0)  # 0: chosen from the machine (je.log_likelihood's "auto")
    surgery: bool = _setting(True)
    max_nonfinite_steps: int = _setting(100)
    stochastic_layers: int = _setting(1, _RESUME)
    eval_num_points: int | None = _setting(None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))

    @classmethod
    def from_dict(cls, values: dict) -> TrainSettings:
        """From a dict of settings (e.g. config.json's); missing keys take their default, unknown ones are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        """The settings as config.json and summary.json record them (``hidden`` as a list)."""
        return {**dataclasses.asdict(self), "hidden": list(self.hidden)}

    def replace(self, **changes) -> TrainSettings:
        return dataclasses.replace(self, **changes)

    def _marked(self, what: str) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.metadata.get(what)]

    def resume_mismatches(self, saved: TrainSettings) -> list[str]:
        """The names of the settings that a resume of ``saved`` must keep but that differ here."""
        return [k for k in self._marked("resume") if getattr(saved, k) != getattr(self, k)]

    def compile_key(self) -> tuple:
        """The values of the settings that change the compiled training step."""
        return tuple(getattr(self, k) for k in self._marked("compile"))


DEFAULTS = TrainSettings().to_dict()  # every setting's default, by name


def as_settings(settings: TrainSettings | dict) -> TrainSettings:
    """``settings`` as :class:`TrainSettings` (a dict: missing keys take their default)."""
    return settings if isinstance(settings, TrainSettings) else TrainSettings.from_dict(settings)


def default_out(settings: TrainSettings | dict) -> str:
    s = as_settings(settings)
    return f"runs/{s.dataset}-{s.objective}-{s.estimator}-k{s.num_samples}-s{s.seed}"


def environment() -> dict:
    """Device, versions and date, as every jaxelbo output records them."""
    from jaxelbo.app.environment import describe

    return describe()


def validate(settings: TrainSettings | dict) -> None:
    """Raises ValueError (one line, naming the valid choices) before any training."""
    from jaxelbo import registry

    settings = as_settings(settings)
    if isinstance(settings.estimator, str) and ("continuous" in settings.estimator or "=" in settings.estimator):
        raise ValueError(f"--estimator {settings.estimator!r}: per-site estimators are for guides with discrete "
                         "sites (Python API: estimator={'continuous': 'dreg', 'discrete': 'vimco'}); the VAE's "
                         "latents are all reparameterised, so 'dreg' already gives each its pathwise gradient")
    registry.check_estimator(settings.objective, settings.estimator)
    objective_kwargs(settings)  # the budget splits and the extra keywords belong to the objective
    for key in ("num_samples", "steps", "batch_size", "latent_dim", "log_every", "max_nonfinite_steps"):
        if int(getattr(settings, key)) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(settings, key)}")
    for key in ("eval_every", "checkpoint_every", "eval_num_samples", "eval_chunk_size", "seed"):
        if int(getattr(settings, key)) < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(settings, key)}")
    if settings.seed >= 2**31 - 10_000:  # the evaluation draws with seed + 10_000; the loop needs int32
        raise ValueError(f"--seed must be < {2**31 - 10_000}, got {settings.seed}")
    if settings.eval_num_points is not None and int(settings.eval_num_points) < 1:
        raise ValueError(f"--eval-num-points must be a positive integer, got {settings.eval_num_points}")
    for key in ("learning_rate", "guide_learning_rate"):
        rate = getattr(settings, key)
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"--{key.replace('_', '-')} must be finite and > 0, got {rate}")
    for key in ("beta", "alpha", "n", "log_beta_min"):
        if getattr(settings, key) is not None and not math.isfinite(getattr(settings, key)):
            raise ValueError(f"--{key.replace('_', '-')} must be finite, got {getattr(settings, key)}")
    if settings.n is not None and settings.n < 1:
        raise ValueError(f"--n, the order of CUBO_n, must be >= 1 (an upper bound), got {settings.n}")
    if settings.num_partitions is not None and int(settings.num_partitions) < 1:
        raise ValueError(f"--num-partitions must be a positive integer, got {settings.num_partitions}")
    if settings.log_beta_min is not None and settings.log_beta_min >= 0:
        raise ValueError(f"--log-beta-min must be < 0 (beta_1 = 10^log_beta_min < 1), got {settings.log_beta_min}")
    if settings.integration is not None and settings.integration not in ("left", "right"):
        raise ValueError(f"--integration must be left or right, got {settings.integration!r}")
    if settings.partition is not None:
        from jaxelbo.thermodynamic import _check_partition

        partition = parse_partition(settings.partition)
        if not isinstance(partition, str):
            _check_partition(partition)
    layers = settings.stochastic_layers
    if layers not in (1, 2):
        raise ValueError(f"--stochastic-layers must be 1 or 2, got {layers}")
    if layers == 2 and (list(settings.hidden) != DEFAULTS["hidden"]
                        or settings.latent_dim != DEFAULTS["latent_dim"]):
        raise ValueError("--hidden and --latent-dim size the one-layer VAE; --stochastic-layers 2 uses "
                         "Burda et al.'s two-layer sizes (100-100-(100), 50-50-(50))")


def check_data(settings: TrainSettings, ds) -> None:
    """Raises ValueError (one line naming the flag) if the data cannot feed the run."""
    if len(ds.train) < int(settings.batch_size):
        raise ValueError(f"--batch-size {settings.batch_size} is larger than the {len(ds.train)} "
                         f"training images of {ds.name}")
    if len(ds.test) == 0:
        raise ValueError(f"{ds.name} has no test images")


def parse_partition(text: str | None) -> str | list[float] | None:
    """``--partition``: ``"moments"`` (the adaptive schedule of :func:`jaxelbo.thermodynamic.moment_partition`)
    or comma-separated betas ``0,...,1``, as :func:`jaxelbo.tvo` takes it.

    Example:
      >>> parse_partition("0, 0.1, 1"), parse_partition("moments")
      ([0.0, 0.1, 1.0], 'moments')
    """
    if text is None or text == "moments":
        return text
    try:
        return [float(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--partition takes 'moments' or comma-separated betas like 0,0.1,1, got {text!r}") from None


# TrainSettings fields passed to the registry as the objective's extra keywords (None: the default,
# or not a setting of this objective).
_OBJECTIVE_KEYWORDS = ("beta", "alpha", "n", "num_partitions", "log_beta_min", "integration", "partition")


def objective_kwargs(settings: TrainSettings | dict) -> dict:
    """The objective's constructor keywords for ``settings``: ``num_samples``, or
    ``num_outer`` x ``num_inner`` for miwae/piwae, and its extra keywords (``beta``, ``alpha``,
    CUBO's ``n``, TVO's ``num_partitions``, ``log_beta_min``, ``integration``, ``partition``),
    given or default."""
    from jaxelbo import registry

    settings = as_settings(settings)
    given = {k: getattr(settings, k) for k in _OBJECTIVE_KEYWORDS}
    given["partition"] = parse_partition(settings.partition)
    return registry.objective_kwargs(settings.objective, num_samples=settings.num_samples,
                                     num_outer=settings.num_outer, **given)


def objective_record(settings: TrainSettings | dict) -> dict:
    """``{"name", "estimator", **objective_kwargs, "direction", "trains"}``: what config.json and
    summary.json record, e.g. ``{"name": "miwae", "estimator": "dreg", "num_outer": 16, "num_inner": 32,
    "direction": "lower", "trains": "model and guide"}``.

    ``direction`` says which side of ``log p(x)`` the bound (the metrics' ``bound``) lies on:
    ``"lower"`` (maximised, ``loss = -bound``) or ``"upper"`` (CUBO, TVO's right sum: minimised,
    ``loss = +bound``). An upper bound trains the guide only (``"trains": "guide"``).
    """
    from jaxelbo import registry

    settings = as_settings(settings)
    kwargs = objective_kwargs(settings)
    side = registry.direction(settings.objective, kwargs)
    return {"name": settings.objective, "estimator": settings.estimator, **kwargs, "direction": side,
            "trains": "model and guide" if side == "lower" else "guide"}


def build_experiment(settings: TrainSettings | dict, cache: dict | None = None):
    """``(dataset, vae, loss_fn, optimizer)`` for ``settings`` (validated first).

    With a ``cache`` dict, runs of the same architecture share the VAE's functions
    (only the parameters differ), so compiled steps and evaluations are reused.
    """
    import jax

    from jaxelbo import registry
    from jaxelbo.app import data, training
    from jaxelbo.models import vae

    settings = as_settings(settings)
    validate(settings)
    ds = data.load(settings.dataset, settings.data_dir, validation_size=settings.validation_size)
    check_data(settings, ds)
    net = vae.build(jax.random.key(settings.seed), ds.data_dim, hidden=tuple(settings.hidden),
                    latent_dim=settings.latent_dim, output_bias=vae.data_mean_logits(ds.train),
                    stochastic_layers=settings.stochastic_layers)
    if cache is not None:
        arch = ("vae", ds.name, json.dumps(net.config))
        net = cache.setdefault(arch, net)._replace(params=net.params)
    kwargs = objective_kwargs(settings)
    loss_fn = registry.get(settings.objective).constructor(net.model, net.guide, estimator=settings.estimator,
                                                           **kwargs)
    if registry.direction(settings.objective, kwargs) == "upper":
        loss_fn = training.guide_only(loss_fn)  # lowering an upper bound over theta would lower log p(x)
    optimizer = training.make_optimizer(settings.learning_rate,
                                        guide_learning_rate=settings.guide_learning_rate)
    return ds, net, loss_fn, optimizer


def _check_resume(cfg_path: Path, settings: TrainSettings) -> None:
    """Raises ValueError (one line) if the saved run's settings differ from ``settings``."""
    try:
        saved = json.loads(cfg_path.read_text())["settings"]
        if not isinstance(saved, dict):
            raise TypeError("settings is not an object")
        saved_settings = TrainSettings.from_dict(saved)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path} is not a jaxelbo run configuration ({type(e).__name__}: {e})") from None
    diff = settings.resume_mismatches(saved_settings)
    if diff:
        raise ValueError("--resume with settings that differ from the saved run: "
                         + ", ".join(f"{k} (saved {_shown(getattr(saved_settings, k))!r}, "
                                     f"given {_shown(getattr(settings, k))!r})" for k in diff))


def _shown(value):
    return list(value) if isinstance(value, tuple) else value


def train_and_evaluate(settings: TrainSettings | dict, out: str | Path | None, *, resume: bool = False,
                       progress: bool = True, plots: bool = True, cache: dict | None = None,
                       overwrite: bool = False) -> dict:
    """Trains, evaluates on the test set and writes every output; returns the summary.

    ``cache`` (a dict kept by the caller) reuses the compiled step of the same
    objective/estimator/architecture across calls, e.g. over the seeds of a benchmark.
    Everything is checked (flags, data, ``out``) before ``out`` is touched; ``out`` is
    then locked for the whole run (a second run on it is refused), and a fresh run into
    a folder holding another run's files is refused unless ``overwrite``.
    """
    import jax

    from jaxelbo.app import checkpoint, rundir

    t_start = time.perf_counter()
    settings = as_settings(settings)
    main_process = jax.process_index() == 0
    out = Path(out) if out is not None else None
    if out is not None:
        rundir.check_writable(out)
    ds, net, loss_fn, optimizer = build_experiment(settings, cache)  # loads and checks the data
    objective = objective_record(settings)
    lock = rundir.RunLock(out) if out is not None and main_process else None
    if lock is not None and out is not None:
        lock.acquire()
        try:
            cfg_path = out / "config.json"
            if resume and cfg_path.exists():
                _check_resume(cfg_path, settings)
            elif resume and checkpoint.steps(out / "checkpoints"):
                raise rundir.RunFolderError(
                    f"--resume: {cfg_path} is missing, so the settings of the checkpoints in {out / 'checkpoints'} "
                    "cannot be checked against the flags given; put the run's config.json back, or start "
                    "afresh with --overwrite")
            rundir.prepare(out, resume=resume, overwrite=overwrite)
        except ValueError:
            lock.discard()
            raise
        rundir.write_json_atomic(out / "config.json", {"settings": settings.to_dict(), "objective": objective,
                                                        "vae": net.config, "image_shape": list(ds.image_shape)})
        _mark_running(out / "summary.json")
    try:
        return _train_and_evaluate(settings, out, ds, net, loss_fn, optimizer, resume=resume, progress=progress,
                                   plots=plots, cache=cache, t_start=t_start)
    finally:
        if lock is not None:
            lock.release()


def _mark_running(path: Path) -> None:
    """An earlier session's summary becomes ``{"status": "running", "previous": it}`` until this one ends,
    so a run killed now never leaves a summary that claims the earlier, shorter run."""
    from jaxelbo.app import rundir

    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = None
    rundir.write_json_atomic(path, {"status": "running", "previous": previous})


def _train_and_evaluate(settings: TrainSettings, out, ds, net, loss_fn, optimizer, *, resume, progress, plots, cache,
                        t_start) -> dict:
    import jax
    import numpy as np

    from jaxelbo.app import data, evaluation, sharding, training

    main_process = jax.process_index() == 0
    params = net.params
    key = ("step", ds.name, json.dumps(net.config), *settings.compile_key())
    if cache is not None and key in cache:
        step_fn = cache[key]  # same functions, this seed's params
    else:
        step_fn = training.make_train_step(loss_fn, optimizer)
        if cache is not None:
            cache[key] = step_fn
    opt_state = optimizer.init(params)

    mesh = None
    if jax.device_count() > 1:
        mesh = sharding.data_mesh()
        params, opt_state = sharding.replicate(mesh, (params, opt_state))

    batches = data.BatchIterator(ds.train, settings.batch_size, settings.seed, settings.binarization)
    x_val = data.evaluation_split(ds, "validation", settings.binarization) if len(ds.validation) else None
    eval_fn = None
    if x_val is not None and settings.eval_every:
        val = evaluation.validation_fn(net.model, net.guide, x_val, seed=settings.seed)
        eval_fn = (lambda p: jax.tree.map(float, val(p)))
    result = training.train(step_fn, params, opt_state, batches, num_steps=settings.steps,
                            seed=settings.seed, out_dir=out, write_metrics=main_process, resume=resume,
                            eval_fn=eval_fn, eval_every=settings.eval_every,
                            log_every=settings.log_every, checkpoint_every=settings.checkpoint_every,
                            progress=progress and main_process, mesh=mesh,
                            max_nonfinite_steps=settings.max_nonfinite_steps, handle_signals=out is not None)
    train_seconds = result.prior_seconds + result.wall_seconds  # all sessions of a resumed run
    status = "interrupted" if result.signum else result.status  # a signal in the last chunk: no evaluation
    signum = result.signum
    params = sharding.gather(result.params) if mesh is not None else result.params
    params = jax.tree.map(jax.numpy.asarray, params)

    t_eval = time.perf_counter()
    x_test = data.evaluation_split(ds, "test", settings.binarization)[:settings.eval_num_points]
    test = None
    if status != "interrupted":
        try:
            test = evaluation.evaluate(net.model, net.guide, params, jax.random.key(settings.seed + 10_000),
                                       x_test, posterior_means=net.posterior_means,
                                       num_samples_ll=settings.eval_num_samples,
                                       chunk_size=settings.eval_chunk_size, surgery=settings.surgery,
                                       progress=progress and main_process)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM as the command raises it, during the evaluation
            if out is None:
                raise
            status, signum = "interrupted", getattr(e, "signum", signal.SIGINT)
    eval_seconds = time.perf_counter() - t_eval
    metrics_path = out / "metrics.jsonl" if out is not None else None
    # the whole run's records (a resumed run's history holds only this session's)
    records = training.read_metrics(metrics_path) if main_process and metrics_path and metrics_path.exists() \
        else result.history
    train_records = [r for r in records if r["split"] == "train"]
    val_records = [r for r in records if r["split"] == "validation"]
    rates = [r["steps_per_second"] for r in (train_records[1:] or train_records)]
    summary = {
        "settings": settings.to_dict(),
        "objective": objective_record(settings),
        "status": status,
        "test": test,
        "validation": val_records[-1] if val_records else None,
        "final_train": train_records[-1] if train_records else None,
        "steps": result.step,
        "skipped_steps": int(training.skipped_steps(result.opt_state)),
        "non_finite_in_a_row": result.non_finite_run,
        "last_checkpoint": result.checkpoint_step,
        "signal": signal.Signals(signum).name if signum else None,
        "num_params": int(sum(np.size(a) for a in jax.tree.leaves(params))),
        "steps_per_second": float(np.median(rates)) if rates else None,
        "train_data": {"name": ds.name, "train": len(ds.train), "validation": len(ds.validation),
                       "test": len(ds.test), "data_dim": ds.data_dim},
        "wall_seconds": {"train": train_seconds, "evaluate": eval_seconds,
                         "total": time.perf_counter() - t_start},
        **environment(),
    }
    if out is not None and main_process:
        from jaxelbo.app import rundir

        rundir.write_json_atomic(out / "summary.json", summary)  # before the figures: an interrupt there keeps it
        if plots and status != "interrupted":
            from jaxelbo.app import plotting

            t0 = time.perf_counter()
            plotting.plot_run(out, records, net.encode, net.decode, params, x_test, ds.image_shape,
                                    settings.latent_dim, seed=settings.seed, generate=net.generate,
                                    title=f"{ds.name}: {settings.objective}-{settings.estimator}, "
                                          f"K={settings.num_samples}"
                                          + (" (upper bound, guide only)" if objective_record(settings)["direction"]
                                             == "upper" else ""))
            summary["wall_seconds"]["plots"] = time.perf_counter() - t0
            rundir.write_json_atomic(out / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    t = summary["test"] or {}
    parts = [f"test log p(x) ~ {t['log_likelihood']:.3f} +- {t['log_likelihood_stderr']:.3f}"
             if "log_likelihood" in t else None,
             f"IWAE-64 {t['iwae_64']:.3f}" if "iwae_64" in t else None,
             f"ELBO {t['elbo']:.3f}" if "elbo" in t else None,
             f"active units {t['active_units']}" if "active_units" in t else None,
             f"k-hat > 0.7 on {100 * t['khat_above_0.7']:.0f}% of points" if "khat_above_0.7" in t else None,
             f"skipped steps {summary.get('skipped_steps', 0)}",
             f"train {summary['wall_seconds']['train']:.1f} s"]
    return ", ".join(p for p in parts if p)



def read_run_config(cfg_path: Path):
    """``(config, settings, vae)`` from a run's ``config.json``.

    Raises:
      ValueError: one line naming the file if it is not JSON or not a run's configuration.
    """
    from jaxelbo.models import vae

    try:
        cfg = json.loads(cfg_path.read_text())
        settings = cfg["settings"]
        for key in ("dataset", "data_dir", "validation_size", "learning_rate", "guide_learning_rate", "seed",
                    "binarization"):
            settings[key]  # a KeyError names what is missing
        net = vae.rebuild(cfg["vae"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise ValueError(f"{cfg_path} is not a valid jaxelbo run configuration ({what})") from None
    return cfg, settings, net


def evaluate_run(run_dir: str | Path, *, split: str = "test", step: int | None = None,
                 data_dir: str | None = None, seed: int | None = None, num_samples: int = 5000,
                 chunk_size: int = 0, num_points: int | None = None, surgery: bool = True,
                 progress: bool = True, **evaluate_kwargs) -> dict:
    """Re-evaluate the checkpoint of a ``jaxelbo train`` run: what ``jaxelbo evaluate`` writes.

    Rebuilds the VAE from ``run_dir/config.json``, restores checkpoint ``step`` (default: the
    last) and evaluates it on ``split`` (the first ``num_points`` images) with
    :func:`jaxelbo.app.evaluation.evaluate` (``evaluate_kwargs``, e.g. ``method``,
    ``ais_steps``, ``ais_chains``, ``bdmc_points``, go to it).

    Returns:
      ``{"run_dir", "step", "split", <split>: results, "wall_seconds", **environment()}``.

    Raises:
      FileNotFoundError, ValueError: one line naming the file or setting at fault.
    """
    import jax

    from jaxelbo.app import checkpoint, data, evaluation, training

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found (is {run_dir} a jaxelbo train output?)")
    cfg, settings, net = read_run_config(cfg_path)
    ds = data.load(settings["dataset"], data_dir or settings["data_dir"], validation_size=settings["validation_size"])
    if ds.data_dim != net.config.get("data_dim", ds.data_dim):
        raise ValueError(f"{cfg_path} describes a model of {net.config['data_dim']} pixels but "
                         f"{ds.name} has {ds.data_dim}")
    optimizer = training.make_optimizer(settings["learning_rate"], guide_learning_rate=settings["guide_learning_rate"])
    ckpt_dir = run_dir / "checkpoints"
    chosen = step if step is not None else checkpoint.latest_step(ckpt_dir)
    try:
        step, params, _, _ = checkpoint.restore(ckpt_dir, net.params, optimizer.init(net.params), step=chosen)
    except checkpoint.CheckpointError as e:  # refused, never a silent fallback: name the alternatives
        others = [s for s in checkpoint.steps(ckpt_dir) if s != chosen]
        raise checkpoint.CheckpointError(
            f"{e}" + (f"; other checkpoints: steps {', '.join(map(str, others))} (pass --step)" if others else "")
        ) from None
    if not len(getattr(ds, split)):
        raise ValueError(f"the {split} split of {run_dir} is empty (validation_size "
                         f"{settings['validation_size']}); nothing to evaluate")
    seed = settings["seed"] if seed is None else seed
    t0 = time.perf_counter()
    x = data.evaluation_split(ds, split, settings["binarization"])[:num_points]
    result = evaluation.evaluate(net.model, net.guide, params, jax.random.key(seed + 10_000), x,
                                 posterior_means=net.posterior_means, num_samples_ll=num_samples,
                                 chunk_size=chunk_size, surgery=surgery, progress=progress, **evaluate_kwargs)
    return {"run_dir": str(run_dir), "step": step, "split": split, split: result,
            "wall_seconds": time.perf_counter() - t0, **environment()}
