"""``jaxelbo evaluate DIR``: re-evaluate a run saved by ``jaxelbo train``.

Checks the flags and calls :func:`jaxelbo.app.experiment.evaluate_run`, which rebuilds the VAE
from ``DIR/config.json``, restores the last (or ``--step``) orbax checkpoint and evaluates it;
writes ``DIR/evaluation.json``: test log-likelihood (IWAE with K = 5000), IWAE-64, ELBO, CUBO_2
(from the same 5000 draws) and the sandwich ``ELBO <= IWAE-64 <= log p(x) <= CUBO_2`` with its
width, active units and the ELBO-surgery terms, with device, versions and time. ``--method ais`` replaces the
IWAE estimate by annealed importance sampling; ``--method all`` reports both, their paired
difference, the amortisation gap and (``--bdmc N``) the BDMC gap on N simulated points.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="DIR", help="output directory of a jaxelbo train run")
    parser.add_argument("--split", choices=("test", "validation"), default="test", help="set to evaluate on")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--eval-num-samples", type=int, default=5000,
                        help="K of the log-likelihood and CUBO_2 estimates (default 5000; 0 skips them)")
    parser.add_argument("--eval-chunk-size", type=int, default=0,
                        help="samples per chunk (default 0: chosen from the machine's cache and XLA's "
                             "memory analysis)")
    parser.add_argument("--eval-num-points", type=int, default=None,
                        help="evaluate on the first N images of the split (default: all)")
    parser.add_argument("--method", choices=("iwae", "ais", "all"), default="iwae",
                        help="log p(x) by IWAE-K (default), by AIS, or all: both, their difference, the "
                             "amortisation gap and, with --bdmc, the BDMC gap")
    parser.add_argument("--ais-steps", type=int, default=1000, help="AIS temperatures (default 1000)")
    parser.add_argument("--ais-chains", type=int, default=16, help="AIS chains per point (default 16)")
    parser.add_argument("--bdmc", type=int, default=0, metavar="N",
                        help="with --method all: BDMC gap on N points simulated from the model (default 0: off)")
    parser.add_argument("--amortisation-steps", type=int, default=300,
                        help="with --method all: Adam steps of each local Gaussian of the amortisation gap "
                             "(default 300; 0 skips it)")
    parser.add_argument("--no-surgery", dest="surgery", action="store_false", help="skip ELBO surgery")
    parser.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's)")
    parser.add_argument("--data-dir", default=None, help="override the run's --data-dir")
    parser.add_argument("--out", default=None, help="JSON file to write (default DIR/evaluation.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        print(f"jaxelbo evaluate: error: {cfg_path} not found (is {run_dir} a jaxelbo train output?)",
              file=sys.stderr)
        return 2
    if args.eval_chunk_size < 0:
        print(f"jaxelbo evaluate: error: --eval-chunk-size must be >= 0 (0: chosen from the machine), "
              f"got {args.eval_chunk_size}",
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
    for flag, value, low in (("--ais-steps", args.ais_steps, 1), ("--ais-chains", args.ais_chains, 1),
                             ("--bdmc", args.bdmc, 0), ("--amortisation-steps", args.amortisation_steps, 0)):
        if value < low:
            print(f"jaxelbo evaluate: error: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    if args.method != "iwae":
        try:
            import blackjax  # noqa: F401
        except ImportError:
            print("jaxelbo evaluate: error: --method ais/all needs BlackJAX: pip install 'jaxelbo[ais]'",
                  file=sys.stderr)
            return 2
    from jaxelbo.app import rundir

    out = Path(args.out) if args.out else run_dir / "evaluation.json"
    try:  # before the evaluation, not after it
        rundir.check_output_file(out, "--out" if args.out else "DIR")
    except ValueError as e:
        print(f"jaxelbo evaluate: error: {e}", file=sys.stderr)
        return 2
    from jaxelbo.app import experiment
    from jaxelbo.app.commands.train import _raise_interrupted  # SIGTERM raised like Ctrl-C

    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        record = experiment.evaluate_run(run_dir, split=args.split, step=args.step, data_dir=args.data_dir,
                                         seed=args.seed, num_samples=args.eval_num_samples,
                                         chunk_size=args.eval_chunk_size, num_points=args.eval_num_points,
                                         surgery=args.surgery, progress=not args.no_progress,
                                         method=args.method, ais_steps=args.ais_steps, ais_chains=args.ais_chains,
                                         bdmc_points=args.bdmc, amortisation_steps=args.amortisation_steps)
        rundir.write_json_atomic(out, record)
    except (ValueError, OSError) as e:
        print(f"jaxelbo evaluate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM as _raise_interrupted raises it
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"jaxelbo evaluate: {run_dir}: interrupted by {signal.Signals(signum).name}; nothing written to {out}",
              file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = record[args.split]
    parts = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()]
    print(f"{run_dir} step {record['step']} ({args.split}): " + ", ".join(parts))
    if "sandwich_width" in result:
        r = result
        print(f"sandwich: ELBO {r['elbo']:.3f} <= IWAE-64 {r['iwae_64']:.3f} <= log p(x) "
              f"{r['sandwich_log_likelihood']:.3f} ({r['sandwich_log_likelihood_method']}) "
              f"<= CUBO_2 {r['cubo_2']:.3f}; "
              f"width {r['sandwich_width']:.3f} nats" + ("" if r["sandwich_ordered"] else " (NOT in order)"))
    from jaxelbo.app.evaluation import khat_warning

    warning = khat_warning(result)
    if warning:
        print(f"jaxelbo evaluate: {warning}", file=sys.stderr)
    return 0
