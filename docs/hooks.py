"""mkdocs hooks: pages and figures from outside docs/ (the notebooks, the benchmark figures), and a
MathJax served from the site itself (the pages render math with no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parent.parent
EXTERNAL = ("notebooks/*.ipynb", "notebooks/images/*.png", "benchmarks/results/snr/*.png")


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns the notebooks into pages
def on_files(files: Files, config) -> Files:
    for pattern in EXTERNAL:
        for path in sorted(REPO.glob(pattern)):
            rel = path.relative_to(REPO).as_posix()
            if files.get_file_from_path(rel) is None:
                files.append(File(rel, str(REPO), config.site_dir, config.use_directory_urls))
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


def on_page_markdown(markdown: str, page, config, files) -> str:
    """The API page covers every name of ``jaxelbo.__all__``: any not listed above is appended."""
    if page.file.src_uri != "api.md":
        return markdown
    import jaxelbo

    missing = [n for n in jaxelbo.__all__ if f"::: jaxelbo.{n}\n" not in markdown]
    if missing:
        markdown += "\n## Other names\n\n" + "\n".join(f"::: jaxelbo.{n}\n" for n in missing)
    return markdown
