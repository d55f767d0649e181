"""The ``jaxelbo`` command line: ``jaxelbo {train,evaluate,snr} ...``.

Each sub-command lives in its own module under :mod:`jaxelbo.app.commands` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this module only dispatches. It lives outside
the ``jaxelbo`` package, whose ``__init__`` imports JAX, so that ``jaxelbo --help`` and
``jaxelbo --version`` import nothing heavy; a command's module (and so JAX) is imported only when
that command is named.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "train": ("jaxelbo.app.commands.train", "train a VAE with a chosen objective and estimator"),
    "evaluate": ("jaxelbo.app.commands.evaluate", "re-evaluate a saved training run"),
    "snr": ("jaxelbo.app.commands.snr", "gradient signal-to-noise sweep over K and M (Rainforth et al. 2018)"),
}


def _version() -> str:
    """The installed distribution's version (pyproject.toml is its one source)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxelbo")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


class _OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags end with one line naming the problem (and the valid choices)."""

    def error(self, message: str):  # argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that command's module is imported (``""``: none)."""
    parser = _OneLineErrorParser(
        prog="jaxelbo",
        description="Variational bounds and their gradient estimators in JAX: "
                    "jaxelbo {" + ",".join(COMMANDS) + "} ... (jaxelbo COMMAND --help for each command's flags).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}",
                                parser_class=_OneLineErrorParser)
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    named = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(named if named in COMMANDS else "").parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


def entry(argv: list[str] | None = None) -> None:
    """The process entry point (the ``jaxelbo`` script and ``python -m jaxelbo``): :func:`main`, then exit.

    A command stopped by a signal returns ``128 + signum`` after it has written its summary and
    its one line. Device work it had dispatched may still be running on XLA's threads then
    (a log-likelihood chunk cut short by SIGTERM), and the interpreter's teardown would destroy
    the runtime under it: a segmentation fault about one time in ten. Such an exit therefore
    flushes the standard streams and leaves with ``os._exit``, skipping the teardown; every
    other exit is the normal ``sys.exit``.
    """
    code = main(argv)
    if code >= 128:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
