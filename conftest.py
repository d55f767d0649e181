"""Collection rules for the whole suite (``pytest`` runs ``tests/`` and the doctests of ``jaxelbo/``).

Modules of optional extras are not imported for their doctests when the extra is missing.
"""

import importlib.util
import os

import pytest

OPTIONAL_MODULES = {"jaxelbo/numpyro.py": "numpyro"}  # module -> the package its extra installs

collect_ignore = [path for path, package in OPTIONAL_MODULES.items() if importlib.util.find_spec(package) is None]

# The tests' programs are small and compiled once each: most of their time is XLA's compilation, about
# half of it LLVM's optimisation of the CPU code. Level 0 keeps XLA's own (HLO) passes and the float
# semantics (no fast math either way) and halves the compile time (tests/test_objectives.py's
# extreme-value and DReG tests: 112 -> 55 CPU s, cold cache). Benchmarks and users keep the default.
# Set before JAX starts its backend, so the CLI subprocesses and notebook kernels inherit it; an
# XLA_FLAGS that already names the option is left as it is.
# Eigen's intra-op threads off as well: the suite runs on two pytest-xdist workers, one per core, and
# its programs are too small to split (the fast suite's CPU time: 564 -> 545 s).
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_multi_thread_eigen=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's worker reads the marks
def pytest_collection_modifyitems(config, items):
    """Every test without an ``xdist_group`` mark joins its file's group, so ``--dist loadgroup`` keeps a
    file's tests (and its module-scoped fixtures) on one worker, as ``--dist loadfile`` does, while a
    test marked with its own group (each notebook of ``tests/test_notebooks.py``) goes to any worker.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))
