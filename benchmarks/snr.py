"""Gradient SNR benchmark (Rainforth et al. 2018, arXiv:1802.04537; Tucker et al. 2019,
arXiv:1810.04152) on the linear-Gaussian toy.

Runs the same code as ``jaxelbo snr`` and writes to ``benchmarks/results/snr`` by default::

    python benchmarks/snr.py             # R = 10,000, K in 1..1000, M in 1..100
    python benchmarks/snr.py --fast      # R = 1,000, K up to 316, M up to 32

Every ``jaxelbo snr`` flag is accepted.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxelbo.app.commands import snr

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "snr")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/snr.py", description=__doc__.splitlines()[0])
    snr.add_arguments(parser)
    parser.set_defaults(out=DEFAULT_OUT)
    return snr.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
