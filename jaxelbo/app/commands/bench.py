"""``jaxelbo bench``: throughput of every objective x estimator on the Burda VAE.

Parses the flags of :func:`jaxelbo.app.bench.add_arguments`, refuses unsupported pairs as
``jaxelbo train`` does (:func:`jaxelbo.registry.pairs`), and runs ``benchmarks/throughput.py``
of a source checkout (:func:`jaxelbo.app.bench.load_throughput_module`), which writes under
``runs/bench`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys

from jaxelbo.app.bench import add_arguments

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from jaxelbo import registry
    from jaxelbo.app import bench

    try:
        registry.pairs(args.objective, args.estimator)
        bench.output_dir(args.out)
        throughput = bench.load_throughput_module()
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxelbo bench: error: {e}", file=sys.stderr)
        return 2
    return throughput.run(args)
