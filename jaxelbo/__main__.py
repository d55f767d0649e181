"""``python -m jaxelbo`` runs the command line."""

import sys

from jaxelbo.app.cli import main

sys.exit(main())
