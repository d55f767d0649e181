"""Execute every notebook in notebooks/ in fast mode (JAXELBO_FAST=1) and fail on any error.

Each notebook runs in a fresh python3 kernel with ``notebooks/`` as the working directory and
matplotlib's inline backend (figures become PNG outputs); ``JAXELBO_SAVE_FIGURES`` is removed so
nothing is written into the tree. The
execution is the documentation site's (``executed_notebook`` of ``docs/hooks.py``): its result is
cached under ``.cache/notebooks`` by the hash of the notebook and of ``jaxelbo/``, and the site renders
that copy, so a CI run executes each notebook once. The fast mode of all seven notebooks together takes
about two to three minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
COLAB_URL = "https://colab.research.google.com/github/jaxelbo/jaxelbo/blob/main/notebooks/{}"


def test_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    for prefix in ("00_", "01_", "02_", "03_", "04_", "05_", "06_", "07_", "08_"):
        assert any(n.startswith(prefix) for n in names), f"no notebook {prefix}*.ipynb in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_conventions(path: Path):
    """Colab badge first, Colab-only install second, outputs stripped, FAST knob read from the environment."""
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown"
    assert COLAB_URL.format(path.name) in "".join(cells[0]["source"])
    install = "".join(cells[1]["source"])
    assert cells[1]["cell_type"] == "code" and '"google.colab" in sys.modules' in install
    assert "git+https://github.com/jaxelbo/jaxelbo" in install
    for cell in cells:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "outputs must be stripped in git"
    source = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert 'os.environ.get("JAXELBO_FAST") == "1"' in source
    assert "JAXELBO_SAVE_FIGURES" in source


def _docs_hooks():
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("jaxelbo_docs_hooks", NOTEBOOK_DIR.parent / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~10-45 s each in fast mode; CI runs them (pytest -m slow)
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.xdist_group(f"notebook-{p.stem}"))
                                  for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path):
    """Runs the notebook top to bottom in fast mode; any cell error fails the test."""
    hooks = _docs_hooks()
    assert hooks.NOTEBOOK_ENV["JAXELBO_FAST"] == "1" and hooks.CELL_TIMEOUT_S == CELL_TIMEOUT_S
    executed = hooks.executed_notebook(path)  # raises CellExecutionError naming the cell and the traceback
    nb = nbformat.read(executed, as_version=4)
    assert [c.source for c in nb.cells] == [c.source for c in nbformat.read(path, as_version=4).cells]
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code" and c.source.strip())
