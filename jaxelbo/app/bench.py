"""The throughput benchmark's plumbing: its flags, where it writes, and where its code lives.

The benchmark itself (``benchmarks/throughput.py`` and its PyTorch / TFP references) lives in
a source checkout, outside the installed package. ``jaxelbo bench`` and
``python benchmarks/throughput.py`` both take the flags of :func:`add_arguments` and write
where :func:`output_dir` says: ``runs/bench`` under the current directory unless ``--out``
says otherwise, never inside the installed package. :func:`load_throughput_module` finds the
benchmark in a checkout or raises a one-line ``FileNotFoundError`` that says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

#: where results go unless ``--out`` is given (relative to the current directory)
DEFAULT_OUT = Path("runs") / "bench"
_PACKAGE = Path(__file__).resolve().parents[1]  # the installed jaxelbo package


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags (no heavy imports: the CLI builds every parser at start)."""
    parser.add_argument("--num-samples", type=int, nargs="+", default=None, metavar="K",
                        help="numbers of importance samples K (default 1 8 64 512; --fast: 1 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step B (default 64)")
    parser.add_argument("--repetitions", type=int, default=None,
                        help="timed repetitions per contender, interleaved (default 20; --fast: 3)")
    parser.add_argument("--objective", nargs="+", default=None,
                        help="objectives to time (default: all of je.OBJECTIVES)")
    parser.add_argument("--estimator", nargs="+", default=None,
                        help="estimators to time (default: every one each objective supports); every "
                             "supported objective x estimator pair of the two lists is timed, and an "
                             "objective or estimator that forms no supported pair is refused, as by train")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the hand-batched JAX, PyTorch and TFP references (the output lists what "
                             "was skipped and why)")
    parser.add_argument("--no-steps", action="store_true",
                        help="skip the gradient-step timings (sections log_likelihood and SNR only)")
    parser.add_argument("--no-log-likelihood", action="store_true", help="skip the log_likelihood timing")
    parser.add_argument("--no-snr", action="store_true", help="skip the vmapped-vs-loop SNR sweep")
    parser.add_argument("--no-loop", action="store_true",
                        help="skip the training-loop section (jaxelbo train's loop vs a tight loop)")
    parser.add_argument("--only-loop", action="store_true",
                        help="run the training-loop section alone; writes training-loop-<device>.{json,md}")
    parser.add_argument("--loop-num-samples", type=int, nargs="+", default=None, metavar="K",
                        help="K of the training-loop section (default 1 8 64; --fast: 1 8)")
    parser.add_argument("--ll-num-samples", type=int, default=None,
                        help="K of the log_likelihood benchmark (default 5000; --fast: 500)")
    parser.add_argument("--ll-num-points", type=int, default=None,
                        help="test points of the log_likelihood benchmark (default 1000; --fast: 100)")
    parser.add_argument("--ll-chunk-sizes", type=int, nargs="+", default=None,
                        help="chunk sizes compared by the log_likelihood benchmark (default 50 500)")
    parser.add_argument("--num-replicates", type=int, default=None,
                        help="R of the SNR sweep (default 1000; --fast: 100)")
    parser.add_argument("--model", choices=("flax", "plain"), default="flax",
                        help="the VAE under test: jaxelbo.models.vae (flax NNX, default) or the same "
                             "network as plain per-example JAX functions")
    parser.add_argument("--fast", action="store_true", help="smoke run: small sizes, few repetitions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default=None,
                        help="directory for throughput-<device>.{json,md} (default runs/bench under the "
                             "current directory; pass --out benchmarks/results to refresh the committed results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_dir(out: str | Path | None) -> Path:
    """The directory results are written to: ``out``, or ``runs/bench`` under the current directory.

    Raises:
      ValueError: ``out`` lies inside the installed jaxelbo package.
    """
    path = Path(out) if out else Path.cwd() / DEFAULT_OUT
    resolved = path.resolve()
    if resolved == _PACKAGE or _PACKAGE in resolved.parents:
        raise ValueError(f"--out {path} is inside the jaxelbo package ({_PACKAGE}); write results elsewhere "
                         f"(default: {DEFAULT_OUT} under the current directory)")
    return path


def find_throughput_module(start: Path | None = None) -> Path:
    """``benchmarks/throughput.py`` of the checkout this package lives in, or of ``start`` or the cwd."""
    candidates = [_PACKAGE.parent / "benchmarks" / "throughput.py", Path.cwd() / "benchmarks" / "throughput.py"]
    if start is not None:
        candidates.insert(0, Path(start) / "benchmarks" / "throughput.py")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "jaxelbo bench needs a source checkout (benchmarks/throughput.py is not part of the installed "
        "package): run it from a clone of jaxelbo; looked in " + ", ".join(str(c.parent.parent) for c in candidates))


def load_throughput_module(start: Path | None = None):
    """Import ``benchmarks/throughput.py`` by path (see :func:`find_throughput_module`)."""
    name = "jaxelbo_benchmarks_throughput"
    if name in sys.modules:
        return sys.modules[name]
    path = find_throughput_module(start)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
