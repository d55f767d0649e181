"""The ``jaxelbo`` command line: ``jaxelbo {train,evaluate,snr,bench} ...``.

Each sub-command lives in its own module under :mod:`jaxelbo.app.commands` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches, and
imports a command's module (and so JAX) only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("jaxelbo.app.commands.train", "train a VAE with a chosen objective and estimator"),
    "evaluate": ("jaxelbo.app.commands.evaluate", "re-evaluate a saved training run"),
    "snr": ("jaxelbo.app.commands.snr", "gradient signal-to-noise sweep over K and M (Rainforth et al. 2018)"),
    "bench": ("jaxelbo.app.commands.bench", "throughput of every objective x estimator on the Burda VAE"),
}


def _version() -> str:
    """The installed distribution's version (the package's own when run from a source tree)."""
    try:
        from importlib.metadata import version

        return version("jaxelbo")
    except Exception:  # not installed: fall back to the package attribute
        from jaxelbo import __version__

        return __version__


class _OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags end with one line naming the problem (and the valid choices)."""

    def error(self, message: str):  # argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="jaxelbo",
        description="Variational bounds and their gradient estimators in JAX: "
                    "jaxelbo {train,evaluate,snr,bench} ... (jaxelbo COMMAND --help for each command's flags).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}",
                                parser_class=_OneLineErrorParser)
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
