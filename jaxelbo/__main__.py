"""``python -m jaxelbo`` runs the command line."""

import sys

from jaxelbo.cli import main

sys.exit(main())
