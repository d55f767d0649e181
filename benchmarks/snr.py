"""Gradient SNR benchmark (Rainforth et al. 2018, arXiv:1802.04537; Tucker et al. 2019,
arXiv:1810.04152) on the linear-Gaussian toy.

Runs ``jaxelbo snr`` (:mod:`jaxelbo.app.rainforth`) with ``--out benchmarks/results/snr``::

    python benchmarks/snr.py             # R = 10,000, K in 1..1000, M in 1..100
    python benchmarks/snr.py --fast      # R = 1,000, K up to 316, M up to 32

Every ``jaxelbo snr`` flag is accepted (a later ``--out`` wins).
"""

from __future__ import annotations

import os
import sys

from jaxelbo.app import cli

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "snr")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return cli.main(["snr", "--out", DEFAULT_OUT, *argv])


if __name__ == "__main__":
    sys.exit(main())
