"""``jaxelbo snr``: the gradient SNR sweep of Rainforth et al. (2018) and Tucker et al. (2019).

Sweeps ``K`` (IWAE with the reparam, STL and DReG estimators) and ``M`` (MIWAE at fixed
``K``) on the linear-Gaussian toy and writes ``snr.json``, ``snr.csv``, ``snr.md``,
``snr.png`` (SNR against K) and ``snr_m.png`` (SNR against M) to ``--out``. The
experiment is :mod:`jaxelbo.app.rainforth`, its engine :mod:`jaxelbo.snr`; this module only
turns flags into its arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import time
from typing import Any

from jaxelbo.app import rainforth


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``jaxelbo snr``."""
    fast = rainforth.FAST
    parser.add_argument("--num-replicates", type=int, default=None,
                        help=f"R, gradient replicates per setting (default {rainforth.DEFAULT_NUM_REPLICATES}; "
                        f"{fast['num_replicates']} with --fast)")
    parser.add_argument("--out", default="runs/snr", help="output folder (default runs/snr)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data, the parameter noise and the keys (default 0)")
    parser.add_argument("--k-grid", type=_int_list, default=None,
                        help="comma-separated K values (default: 1,2,3,6,...,1000, about 4 per decade)")
    parser.add_argument("--max-num-samples", type=int, default=None,
                        help="largest K of a geometric grid from 1 (instead of --k-grid)")
    parser.add_argument("--m-grid", type=_int_list, default=None,
                        help="comma-separated M values for the MIWAE sweep (default 1,2,3,6,...,100)")
    parser.add_argument("--max-num-outer", type=int, default=None,
                        help="largest M of a geometric grid from 1 (instead of --m-grid)")
    parser.add_argument("--num-inner", type=int, default=rainforth.DEFAULT_NUM_INNER,
                        help=f"K held fixed in the M sweep (default {rainforth.DEFAULT_NUM_INNER})")
    parser.add_argument("--objective", choices=tuple(dict.fromkeys(o for o, _ in TRAIN_SPELLING)), default="iwae",
                        help="the bound, as jaxelbo train names it (default iwae); jvi and rws: --estimator dreg "
                        f"only (JVI-DReG; RWS's DReG(alpha = {rainforth.DREG_ALPHA})), K sweep only")
    parser.add_argument("--estimator", action="append", choices=rainforth.SWEEP_ESTIMATORS, default=None,
                        help="estimator to sweep; repeat the flag for several (default: reparam, stl and dreg "
                        "for iwae, dreg for jvi and rws); jvi-dreg and dreg-alpha are deprecated spellings of "
                        "--objective jvi --estimator dreg and --objective rws --estimator dreg")
    parser.add_argument("--dim", type=int, default=20, help="latent and data dimension D (default 20)")
    parser.add_argument("--num-points", type=int, default=1024, help="data set size N (default 1024)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="gradient taken on the first B data points (default 1: one fixed point)")
    parser.add_argument("--fit-min", type=int, default=rainforth.DEFAULT_FIT_MIN,
                        help=f"fit the K slopes on K >= this (default {rainforth.DEFAULT_FIT_MIN}; asymptotic regime); "
                        "with fewer than 2 such K the whole grid is fitted, and the output says so")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="replicates per compiled call (default: largest fitting --memory-mb)")
    parser.add_argument("--memory-mb", type=int, default=512,
                        help="memory budget of one chunk of replicates in MiB (default 512)")
    parser.add_argument("--fast", action="store_true",
                        help=f"quick run: R={fast['num_replicates']}, K up to {fast['max_num_samples']}, M up to "
                        f"{fast['max_num_outer']} (explicit flags still win)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--replot", action="store_true",
                        help="no sweep: rewrite csv, md and png from the snr.json already in --out")


#: ``jaxelbo train``'s vocabulary (``--objective O --estimator E``) -> the sweep's estimator names
TRAIN_SPELLING = {**{("iwae", e): e for e in rainforth.ESTIMATORS},
                  ("jvi", "dreg"): "jvi-dreg", ("rws", "dreg"): "dreg-alpha"}


def sweep_estimators(objective: str, estimators: list[str] | None) -> tuple[str, ...]:
    """The sweep's estimator names for ``--objective`` and the ``--estimator`` flags (train's spelling).

    The old names ``jvi-dreg`` and ``dreg-alpha`` are still taken (deprecated), with a note on stderr.
    """
    chosen = []
    for e in estimators or ([e for o, e in TRAIN_SPELLING if o == objective]):
        if e in rainforth.FRONTIER_ESTIMATORS:
            new = next(f"--objective {o} --estimator {f}" for (o, f), name in TRAIN_SPELLING.items() if name == e)
            print(f"jaxelbo snr: note: --estimator {e} is deprecated; use {new}", file=sys.stderr)
            chosen.append(e)
        elif (objective, e) in TRAIN_SPELLING:
            chosen.append(TRAIN_SPELLING[(objective, e)])
        else:
            valid = ", ".join(f for o, f in TRAIN_SPELLING if o == objective)
            raise ValueError(f"--objective {objective} does not support --estimator {e} in the sweep; valid: {valid}")
    return tuple(dict.fromkeys(chosen))


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Turn the flags into the keyword arguments of :func:`jaxelbo.app.rainforth.rainforth_experiment`."""
    from jaxelbo.snr import geometric_grid

    def grid(explicit, maximum, fast_max, default):
        if explicit is not None and maximum is not None:
            raise ValueError("give either an explicit grid or its maximum, not both")
        if explicit is not None:
            return list(explicit)
        if maximum is not None:
            if maximum < 1:
                raise ValueError(f"the grid maximum must be >= 1, got {maximum}")
            return geometric_grid(maximum)
        if args.fast:
            return geometric_grid(fast_max)
        return list(default)

    fast = rainforth.FAST
    num_replicates = args.num_replicates
    if num_replicates is None:
        num_replicates = fast["num_replicates"] if args.fast else rainforth.DEFAULT_NUM_REPLICATES
    if num_replicates < 2:
        raise ValueError(f"--num-replicates must be >= 2, got {num_replicates}")
    for flag, value in (("--num-inner", args.num_inner), ("--dim", args.dim), ("--fit-min", args.fit_min),
                        ("--num-points", args.num_points), ("--batch-size", args.batch_size),
                        ("--memory-mb", args.memory_mb)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    return {
        "seed": args.seed,
        "num_replicates": num_replicates,
        "k_grid": grid(args.k_grid, args.max_num_samples, fast["max_num_samples"], rainforth.DEFAULT_K_GRID),
        "m_grid": grid(args.m_grid, args.max_num_outer, fast["max_num_outer"], rainforth.DEFAULT_M_GRID),
        "num_inner": args.num_inner,
        "estimators": sweep_estimators(getattr(args, "objective", "iwae"), args.estimator),
        "dim": args.dim,
        "num_points": args.num_points,
        "batch_size": args.batch_size,
        "fit_min": args.fit_min,
        "chunk_size": args.chunk_size,
        "memory_budget_bytes": args.memory_mb * 2**20,
    }


def _program_name() -> str:
    prog = sys.argv[0] if sys.argv else "jaxelbo"
    if os.path.basename(prog) in ("__main__.py", "jaxelbo"):
        return "jaxelbo"
    return "python " + os.path.relpath(prog)


def environment() -> dict[str, Any]:
    """Device, library versions, date and command line, recorded with every result."""
    from jaxelbo.app.environment import describe

    return {**describe(), "command": " ".join([_program_name()] + sys.argv[1:])}


def _interrupted_line(signum: int, out: str, saved: int, during: str = "the sweep") -> str:
    name = signal.Signals(signum).name
    if during != "the sweep":
        return (f"jaxelbo snr: interrupted by {name} during {during}; {os.path.join(out, 'snr.json')} is complete "
                f"(draw the rest with jaxelbo snr --replot --out {out})")
    if not saved:
        return (f"jaxelbo snr: interrupted by {name} during the sweep before a setting finished; nothing written "
                f"to {out}")
    return (f"jaxelbo snr: interrupted by {name} during the sweep; the {saved} finished setting(s) are in "
            f"{os.path.join(out, 'snr.json')}, marked partial (draw them with jaxelbo snr --replot --out {out})")


def run(args: argparse.Namespace) -> int:
    """Run the sweep and write the outputs; returns the exit status.

    SIGINT and SIGTERM end it in one line (exit 130 or 143); the settings finished by then
    are in ``snr.json`` (written atomically after each one, marked ``partial``).
    """
    from jaxelbo.app.commands.train import _raise_interrupted  # SIGTERM raised like Ctrl-C

    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    saved = [0]
    during = ["the sweep"]
    try:
        return _run(args, saved, during)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(_interrupted_line(signum, args.out, saved[0], during[0]), file=sys.stderr)
        return 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run(args: argparse.Namespace, saved: list[int], during: list[str]) -> int:
    if args.replot:
        during[0] = "the replot"
        try:
            result = rainforth.load_result(args.out)
        except FileNotFoundError as e:
            print(f"jaxelbo snr: error: --replot needs a previous run's snr.json ({e})", file=sys.stderr)
            return 2
        except ValueError as e:
            print(f"jaxelbo snr: error: {e}", file=sys.stderr)
            return 2
        paths = rainforth.write_outputs(result, args.out)
        if result.partial:
            print(f"jaxelbo snr: note: {os.path.join(args.out, 'snr.json')} holds a partial sweep "
                  f"({result.notes[0] if result.notes else 'interrupted'})", file=sys.stderr)
        print("rewrote " + ", ".join(paths.values()))
        return 0
    try:
        settings = resolve_settings(args)
        from jaxelbo.app import rundir

        rundir.check_writable(args.out)  # before the sweep, not after it
    except ValueError as e:
        print(f"jaxelbo snr: error: {e}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    costs = {("num_samples", k): k for k in settings["k_grid"]}
    costs.update({("num_outer", m): m * settings["num_inner"] for m in settings["m_grid"]})
    bar = tqdm(total=sum(costs.values()), unit="K", desc="snr sweep", disable=args.no_progress,
               dynamic_ncols=True)

    def progress(axis, setting):
        bar.update(costs[(axis, setting)])
        bar.set_postfix_str(f"{rainforth.AXES[axis]}={setting} done")

    start = time.perf_counter()
    env = environment()

    def save_partial(result):  # the finished settings, so that a signal or a kill keeps them
        result = dataclasses.replace(result, wall_seconds=time.perf_counter() - start, environment=env)
        with rundir.signals_deferred():
            if not saved[0]:
                os.makedirs(args.out, exist_ok=True)
                for name in rainforth.OUTPUT_NAMES[1:]:  # an earlier run's tables and figures
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(args.out, name))
            rundir.write_json_atomic(os.path.join(args.out, "snr.json"), result.to_json())
            saved[0] = len(result.k_sweep) + len(result.m_sweep)

    try:
        result = rainforth.rainforth_experiment(progress=progress, on_partial=save_partial, **settings)
    finally:
        bar.close()
    result = dataclasses.replace(result, wall_seconds=time.perf_counter() - start, environment=env)
    with rundir.signals_deferred():
        rundir.write_json_atomic(os.path.join(args.out, "snr.json"), result.to_json())
    during[0] = "the tables and figures"
    paths = rainforth.write_outputs(result, args.out)
    print(rainforth.markdown(result))
    for note in result.notes:
        print(f"jaxelbo snr: note: {note}", file=sys.stderr)
    print("wrote " + ", ".join(paths.values()))
    return 0
