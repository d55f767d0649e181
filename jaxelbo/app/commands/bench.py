"""``jaxelbo bench``: throughput of every objective x estimator on the Burda VAE.

Runs ``benchmarks/throughput.py`` of a source checkout (the benchmark and its PyTorch /
TFP references live outside the package); the flags are defined here so that
``python benchmarks/throughput.py`` and ``jaxelbo bench`` take the same ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


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
                        help="estimators to time (default: every one each objective supports)")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the hand-batched JAX, PyTorch and TFP references")
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
                        help="directory for throughput-<device>.{json,md} "
                             "(default benchmarks/results; --fast: runs/bench)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def find_throughput_module(start: Path | None = None) -> Path:
    """``benchmarks/throughput.py`` of the checkout this package lives in (or the cwd's)."""
    candidates = [Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py",
                  Path.cwd() / "benchmarks" / "throughput.py"]
    if start is not None:
        candidates.insert(0, start / "benchmarks" / "throughput.py")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "jaxelbo bench needs a source checkout: benchmarks/throughput.py was not found in "
        + ", ".join(str(c.parent.parent) for c in candidates))


def load_throughput_module():
    """Import ``benchmarks/throughput.py`` by path (it is not part of the installed package)."""
    path = find_throughput_module()
    name = "jaxelbo_benchmarks_throughput"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    try:
        throughput = load_throughput_module()
    except FileNotFoundError as e:
        print(f"jaxelbo bench: {e}", file=sys.stderr)
        return 2
    return throughput.run(args)
