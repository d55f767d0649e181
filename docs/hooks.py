"""mkdocs hooks: pages and figures from outside docs/ (the notebooks, the benchmark figures), and a
MathJax served from the site itself (the pages render math with no network)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parent.parent
EXTERNAL = ("notebooks/*.ipynb", "notebooks/images/*.png", "benchmarks/results/snr/*.png",
            "benchmarks/results/smc*.png")


NOTEBOOK_CACHE = REPO / ".cache" / "notebooks"  # gitignored
# fast mode, figures as inline PNG outputs (no display needed), and no JAXELBO_SAVE_FIGURES: nothing written
NOTEBOOK_ENV = {"JAXELBO_FAST": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
CELL_TIMEOUT_S = 300


def _source_digest(path: Path) -> str:
    """Hash of the notebook and of the library it runs: a cached execution is reused only for both."""
    digest = hashlib.sha256(path.read_bytes())
    for source in sorted((REPO / "jaxelbo").rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def executed_notebook(path: Path) -> Path:
    """``path`` executed top to bottom in fast mode (``JAXELBO_FAST=1``), in a fresh python3 kernel with
    ``notebooks/`` as the working directory; cached under ``.cache/notebooks`` by :func:`_source_digest`.

    The site renders these copies, so its notebook pages show their outputs, while the notebooks in git
    stay stripped; ``tests/test_notebooks.py`` runs the notebooks through this same function, so a CI run
    executes each notebook once. Raises nbclient's ``CellExecutionError`` (naming the cell) on any error.
    """
    out = NOTEBOOK_CACHE / f"{path.stem}-{_source_digest(path)}" / path.relative_to(REPO)
    if out.exists():
        return out
    import nbclient
    import nbformat

    saved = {k: os.environ.get(k) for k in (*NOTEBOOK_ENV, "JAXELBO_SAVE_FIGURES")}
    os.environ.update(NOTEBOOK_ENV)
    os.environ.pop("JAXELBO_SAVE_FIGURES", None)
    try:
        nb = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    nbformat.write(nb, tmp)
    os.replace(tmp, out)
    return out


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns the notebooks into pages
def on_files(files: Files, config) -> Files:
    execute = os.environ.get("JAXELBO_DOCS_EXECUTE", "1") != "0"
    for pattern in EXTERNAL:
        for path in sorted(REPO.glob(pattern)):
            rel = path.relative_to(REPO).as_posix()
            if files.get_file_from_path(rel) is None:
                src_dir = REPO
                if execute and path.suffix == ".ipynb":  # the page renders the executed copy, outputs and all
                    src_dir = Path(str(executed_notebook(path))[: -len(rel) - 1])
                files.append(File(rel, str(src_dir), config.site_dir, config.use_directory_urls))
    return files


def _mathjax_es5() -> Path:
    try:
        import mathjax  # the django-static-mathjax distribution: MathJax 3 as package data
    except ImportError as e:
        raise RuntimeError("the docs need MathJax from the docs extra: pip install -e '.[docs]'") from e
    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def on_config(config):
    _mathjax_es5()  # fail before building, with the install hint
    return config


def on_post_build(config) -> None:
    es5, out = _mathjax_es5(), Path(config.site_dir) / "assets" / "mathjax"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(es5 / "tex-mml-chtml.js", out / "tex-mml-chtml.js")
    shutil.copytree(es5 / "output" / "chtml" / "fonts" / "woff-v2", out / "output" / "chtml" / "fonts" / "woff-v2",
                    dirs_exist_ok=True)


def _cli_reference() -> str:
    """``--help`` of ``jaxelbo`` and of each command, from the parsers themselves (never out of date)."""
    import os

    import jaxelbo_cli

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = jaxelbo_cli.build_parser()
        blocks = [f"## `jaxelbo`\n\n```text\n{parser.format_help()}```\n"]
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        for name, command in sub.choices.items():
            blocks.append(f"## `jaxelbo {name}`\n\n```text\n{command.format_help()}```\n")
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(blocks)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """The CLI page gets every command's ``--help``; the API page covers every name of
    ``jaxelbo.__all__`` (any not listed there is appended)."""
    if page.file.src_uri == "cli.md":
        return markdown.replace("<!-- cli-help -->", _cli_reference())
    if page.file.src_uri != "api.md":
        return markdown
    import jaxelbo

    missing = [n for n in jaxelbo.__all__ if f"::: jaxelbo.{n}\n" not in markdown]
    if missing:
        markdown += "\n## Other names\n\n" + "\n".join(f"::: jaxelbo.{n}\n" for n in missing)
    return markdown
