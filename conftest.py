"""Collection rules for the whole suite (``pytest`` runs ``tests/`` and the doctests of ``jaxelbo/``).

Modules of optional extras are not imported for their doctests when the extra is missing.
"""

import importlib.util

import pytest

OPTIONAL_MODULES = {"jaxelbo/numpyro.py": "numpyro"}  # module -> the package its extra installs

collect_ignore = [path for path, package in OPTIONAL_MODULES.items() if importlib.util.find_spec(package) is None]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's worker reads the marks
def pytest_collection_modifyitems(config, items):
    """Every test without an ``xdist_group`` mark joins its file's group, so ``--dist loadgroup`` keeps a
    file's tests (and its module-scoped fixtures) on one worker, as ``--dist loadfile`` does, while a
    test marked with its own group (each notebook of ``tests/test_notebooks.py``) goes to any worker.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))
