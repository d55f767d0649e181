"""``python -m jaxelbo`` runs the command line."""

from jaxelbo_cli import entry

entry()
