"""The ``jaxelbo`` command line, as :mod:`jaxelbo_cli` (outside this package, so that
``jaxelbo --help`` imports no JAX); re-exported here for ``python -m jaxelbo`` and for tests."""

from jaxelbo_cli import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
