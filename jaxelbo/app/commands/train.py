"""``jaxelbo train``: train the Burda et al. (2016) VAE with a chosen objective and estimator.

Writes into ``--out``: ``config.json`` (the settings), ``metrics.jsonl`` (training and
validation records), ``checkpoints/`` (orbax), ``summary.json`` (every evaluation
number, settings, device, versions, wall times), ``curves.png``,
``reconstructions.png`` and ``samples.png``. ``--resume`` continues an interrupted run
from its last checkpoint and reaches the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from jaxelbo.app.experiment import (
    DEFAULTS,
    TrainSettings,
    default_out,
    format_summary,
    train_and_evaluate,
    validate,
)

DATASET_CHOICES = ("digits", "mnist", "fashion-mnist", "omniglot")  # = jaxelbo.app.data.DATASETS (no jax import)


def _hidden(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--hidden takes comma-separated widths like 200,200, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"--hidden widths must be positive integers, got {text!r}")
    return widths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``jaxelbo train`` (no heavy imports here)."""
    d = DEFAULTS
    parser.add_argument("--dataset", choices=DATASET_CHOICES, default=d["dataset"],
                        help="data set (digits needs no files; fashion-mnist is read from "
                        "/usr/share/datasets/fashion-mnist after `apt-get install dataset-fashion-mnist`; "
                        "mnist and omniglot read --data-dir)")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the mnist/fashion-mnist/omniglot files")
    parser.add_argument("--objective", default=d["objective"],
                        help="elbo, iwae, miwae, ciwae, piwae, renyi, rws, jvi, tvo or cubo (default iwae); "
                        "an upper bound (cubo, tvo --integration right) is minimised over the guide only")
    parser.add_argument("--estimator", default=d["estimator"],
                        help="reparam, stl, dreg, score, vimco, ovis or ovis-mc; must suit the objective "
                        "(default dreg; tvo: score or reparam; cubo: reparam or dreg)")
    parser.add_argument("--num-samples", type=int, default=d["num_samples"],
                        help="sample budget K per example (miwae/piwae: num_outer x num_inner = K; "
                        "default 64)")
    parser.add_argument("--num-outer", type=int, default=None,
                        help="M of miwae/piwae; num_inner = num_samples / M (default: the largest divisor "
                        "of K that is at most sqrt(K), e.g. 512 = 16 x 32)")
    parser.add_argument("--beta", type=float, default=d["beta"], help="ciwae mixing weight (default 0.5)")
    parser.add_argument("--alpha", type=float, default=d["alpha"],
                        help="renyi: the order alpha (default 0.5); rws: DReG(alpha), the wake-phi share "
                        "of the guide's update in [0, 1] (default 1.0; 0 is IWAE-DReG)")
    parser.add_argument("--n", type=float, default=d["n"], help="cubo: the order n >= 1 of CUBO_n (default 2)")
    parser.add_argument("--num-partitions", type=int, default=d["num_partitions"],
                        help="tvo: intervals S of the partition (default 10)")
    parser.add_argument("--log-beta-min", type=float, default=d["log_beta_min"],
                        help="tvo: log10 of beta_1 of the log-uniform partition (default -1.09)")
    parser.add_argument("--integration", choices=("left", "right"), default=d["integration"],
                        help="tvo: left Riemann sum (a lower bound, default) or right (an upper bound)")
    parser.add_argument("--partition", default=d["partition"],
                        help="tvo: 'moments' (the moment-spacing schedule, recomputed each step) or explicit "
                        "comma-separated betas 0,...,1 (default: log-uniform)")
    parser.add_argument("--steps", type=int, default=d["steps"], help="optimisation steps (default 3000)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"],
                        help="examples per step (default 64)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="seed of init, batches and samples")
    parser.add_argument("--out", default=None, help="output directory (default runs/<dataset>-<objective>-"
                        "<estimator>-k<K>-s<seed>)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out that holds another run's files (they are deleted)")
    parser.add_argument("--learning-rate", type=float, default=d["learning_rate"], help="Adam step size")
    parser.add_argument("--guide-learning-rate", type=float, default=None,
                        help="encoder (phi) step size if different from --learning-rate")
    parser.add_argument("--hidden", type=_hidden, default=d["hidden"],
                        help="encoder hidden widths, decoder mirrored (default 200,200)")
    parser.add_argument("--latent-dim", type=int, default=d["latent_dim"], help="latent size (default 50)")
    parser.add_argument("--stochastic-layers", type=int, choices=(1, 2), default=d["stochastic_layers"],
                        help="1 (default; --hidden, --latent-dim) or 2: Burda et al.'s q(z1|x) q(z2|z1) with "
                        "MLPs 784-100-100-(100) and 100-50-50-(50), model mirrored")
    parser.add_argument("--binarization", choices=("dynamic", "static", "none"), default=d["binarization"],
                        help="dynamic: fresh Bernoulli draw each epoch (default)")
    parser.add_argument("--validation-size", type=int, default=None, help="rows held out from training")
    parser.add_argument("--eval-every", type=int, default=d["eval_every"], help="steps between validations")
    parser.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"],
                        help="steps between checkpoints")
    parser.add_argument("--log-every", type=int, default=d["log_every"], help="steps between metric records")
    parser.add_argument("--eval-num-samples", type=int, default=d["eval_num_samples"],
                        help="K of the test log-likelihood estimate (default 5000; 0 skips it)")
    parser.add_argument("--eval-chunk-size", type=int, default=d["eval_chunk_size"],
                        help="samples per chunk of the log-likelihood estimate (default 0: chosen from "
                             "the machine's cache and XLA's memory analysis)")
    parser.add_argument("--eval-num-points", type=int, default=None,
                        help="evaluate on the first N test images (default: all)")
    parser.add_argument("--no-surgery", dest="surgery", action="store_false", help="skip ELBO surgery")
    parser.add_argument("--max-nonfinite-steps", type=int, default=d["max_nonfinite_steps"],
                        help="stop (status diverged) after this many non-finite steps in a row (default 100)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host runs)")
    parser.add_argument("--num-processes", type=int, default=None, help="processes in a multi-host run")
    parser.add_argument("--process-id", type=int, default=None, help="rank of this process")
    parser.add_argument("--startup-timeout", type=int, default=None,
                        help="seconds a multi-host run waits for every process to join (default 300)")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The run's :class:`~jaxelbo.app.experiment.TrainSettings` from parsed flags."""
    return TrainSettings(**{k: getattr(args, k, v) for k, v in DEFAULTS.items()})


# Exit statuses besides 0 (done) and 2 (bad input): a diverged run, and 128 + signal
# for a run stopped by SIGINT (130) or SIGTERM (143), as shells report them.
EXIT_DIVERGED = 1


class _Interrupted(KeyboardInterrupt):
    """SIGTERM outside the training loop (which handles it itself), raised like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Frames where an exception raised by a signal handler is swallowed ("Exception ignored in")
# or unwinds through C++: the signal is then delivered again a moment later.
_UNSAFE_FRAMES = ("_xla_gc_callback", "__del__")


def _raise_interrupted(signum, frame) -> None:
    f = frame
    while f is not None:
        if f.f_code.co_name in _UNSAFE_FRAMES:
            timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
            timer.daemon = True
            timer.start()
            return
        f = f.f_back
    raise _Interrupted(signum)


def _stopped_line(out, summary: dict) -> tuple[str, int]:
    """The one line (and exit status) of a run that did not complete."""
    checkpoint = summary.get("last_checkpoint")
    kept = f"last checkpoint: step {checkpoint}" if checkpoint is not None else "no checkpoint yet"
    if summary["status"] == "diverged":
        run_of_bad, step = summary["non_finite_in_a_row"], summary["steps"]
        return (f"jaxelbo train: {out}: diverged: {run_of_bad} non-finite steps in a row up to step {step} "
                f"(none reached the params, which are those of step {step - run_of_bad}); stopped; "
                f"last finite checkpoint: {kept.removeprefix('last checkpoint: ')}", EXIT_DIVERGED)
    signum = signal.Signals[summary["signal"]]
    return (f"jaxelbo train: {out}: interrupted by {signum.name} at step {summary['steps']}; {kept}; "
            "continue with --resume", 128 + signum)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    out = args.out or default_out(settings)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)  # until the training loop takes over
    try:
        from jaxelbo.app import sharding

        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                        timeout=args.startup_timeout)
        validate(settings)
        # (data_dir may be each host's own copy of the files)
        sharding.check_same_settings({**settings.to_dict(), "data_dir": None, "resume": args.resume})
        summary = train_and_evaluate(settings, out, resume=args.resume, progress=not args.no_progress,
                                     overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # bad input, and the disk (full, unwritable) during the run
        print(f"jaxelbo train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM before or after the training loop
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"jaxelbo train: {out}: interrupted by {signal.Signals(signum).name} outside training; "
              "checkpoints already written are kept (continue with --resume)", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    import jax

    if jax.process_index() != 0:
        return 0
    if summary["status"] != "completed":
        line, code = _stopped_line(out, summary)
        if summary["test"] is not None:
            print(f"{out}: {format_summary(summary)}")
        print(line, file=sys.stderr)
        return code
    print(f"{out}: {format_summary(summary)}")
    return 0
