"""``jaxelbo evaluate DIR``: re-evaluate a run saved by ``jaxelbo train``.

Rebuilds the VAE from ``DIR/config.json``, restores the last (or ``--step``) orbax
checkpoint and writes ``DIR/evaluation.json``: test log-likelihood (IWAE with K = 5000),
IWAE-64, ELBO, active units and the ELBO-surgery terms, with device, versions and time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="DIR", help="output directory of a jaxelbo train run")
    parser.add_argument("--split", choices=("test", "validation"), default="test", help="set to evaluate on")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--eval-num-samples", type=int, default=5000,
                        help="K of the log-likelihood estimate (default 5000; 0 skips it)")
    parser.add_argument("--eval-chunk-size", type=int, default=500, help="samples per chunk")
    parser.add_argument("--eval-num-points", type=int, default=None,
                        help="evaluate on the first N images of the split (default: all)")
    parser.add_argument("--no-surgery", dest="surgery", action="store_false", help="skip ELBO surgery")
    parser.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's)")
    parser.add_argument("--data-dir", default=None, help="override the run's --data-dir")
    parser.add_argument("--out", default=None, help="JSON file to write (default DIR/evaluation.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read_config(cfg_path: Path):
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
            settings[key]  # noqa: B018 - a KeyError names what is missing
        net = vae.rebuild(cfg["vae"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise ValueError(f"{cfg_path} is not a valid jaxelbo run configuration ({what})") from None
    return cfg, settings, net


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        print(f"jaxelbo evaluate: error: {cfg_path} not found (is {run_dir} a jaxelbo train output?)",
              file=sys.stderr)
        return 2
    if args.eval_chunk_size < 1:
        print(f"jaxelbo evaluate: error: --eval-chunk-size must be a positive integer, got {args.eval_chunk_size}",
              file=sys.stderr)
        return 2
    if args.eval_num_points is not None and args.eval_num_points < 1:
        print(f"jaxelbo evaluate: error: --eval-num-points must be a positive integer, got {args.eval_num_points}",
              file=sys.stderr)
        return 2
    if args.eval_num_samples < 0 or (args.seed is not None and args.seed < 0):
        flag, value = ("--eval-num-samples", args.eval_num_samples) if args.eval_num_samples < 0 else \
            ("--seed", args.seed)
        print(f"jaxelbo evaluate: error: {flag} must be >= 0, got {value}", file=sys.stderr)
        return 2
    import jax

    from jaxelbo.app import checkpoint, data, evaluation, training
    from jaxelbo.app.experiment import environment

    try:
        cfg, settings, net = _read_config(cfg_path)
        ds = data.load(settings["dataset"], args.data_dir or settings["data_dir"],
                       validation_size=settings["validation_size"])
        if ds.data_dim != net.config.get("data_dim", ds.data_dim):
            raise ValueError(f"{cfg_path} describes a model of {net.config['data_dim']} pixels but "
                             f"{ds.name} has {ds.data_dim}")
        optimizer = training.make_optimizer(settings["learning_rate"],
                                            guide_learning_rate=settings["guide_learning_rate"])
        step, params, _, _ = checkpoint.restore(run_dir / "checkpoints", net.params, optimizer.init(net.params),
                                                step=args.step if args.step is not None else
                                                checkpoint.latest_step(run_dir / "checkpoints"))
        if not len(getattr(ds, args.split)):
            raise ValueError(f"the {args.split} split of {run_dir} is empty (validation_size "
                             f"{settings['validation_size']}); nothing to evaluate")
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxelbo evaluate: error: {e}", file=sys.stderr)
        return 2
    seed = settings["seed"] if args.seed is None else args.seed
    t0 = time.perf_counter()
    x = data.evaluation_split(ds, args.split, settings["binarization"])[:args.eval_num_points]
    result = evaluation.evaluate(net.model, net.guide, params, jax.random.key(seed + 10_000), x,
                                 posterior_means=net.posterior_means, num_samples_ll=args.eval_num_samples,
                                 chunk_size=args.eval_chunk_size, surgery=args.surgery,
                                 progress=not args.no_progress)
    record = {"run_dir": str(run_dir), "step": step, "split": args.split, args.split: result,
              "wall_seconds": time.perf_counter() - t0, **environment()}
    out = Path(args.out) if args.out else run_dir / "evaluation.json"
    out.write_text(json.dumps(record, indent=1))
    parts = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()]
    print(f"{run_dir} step {step} ({args.split}): " + ", ".join(parts))
    return 0
