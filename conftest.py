"""Collection rules for the whole suite (``pytest`` runs ``tests/`` and the doctests of ``jaxelbo/``).

Modules of optional extras are not imported for their doctests when the extra is missing.
"""

import importlib.util

OPTIONAL_MODULES = {"jaxelbo/numpyro.py": "numpyro"}  # module -> the package its extra installs

collect_ignore = [path for path, package in OPTIONAL_MODULES.items() if importlib.util.find_spec(package) is None]
