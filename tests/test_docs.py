"""The documentation site: `mkdocs build --strict`, an API page covering every public name, and the
built pages opened in headless Chromium (the API page shows `iwae`'s signature, the math renders, a
notebook page shows its figure).

The build executes the notebooks in fast mode (docs/hooks.py, cached under .cache/notebooks and shared
with tests/test_notebooks.py), so their pages carry their outputs.

The build needs the `docs` extra; the browser test needs Debian's `chromium` (CI installs it when it
runs as root with apt) and skips with the reason otherwise. Set JAXELBO_SCREENSHOT_DIR to keep the
screenshots.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import jaxelbo as je

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("JAXELBO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.slow  # the build takes ~10 s (plus the notebooks' fast mode unless cached)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter", "mathjax"):
        pytest.importorskip(module, reason="the docs extra is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_strict_build_writes_every_page(site):
    for page in ("index.html", "getting-started/index.html", "concepts/index.html", "objectives/index.html",
                 "estimators/index.html", "numpyro/index.html", "benchmarks/index.html", "api/index.html",
                 "training/index.html", "reliability/index.html", "snr/index.html", "performance/index.html",
                 "cli/index.html", "development/index.html", "notebooks/index.html",
                 "assets/mathjax/tex-mml-chtml.js"):
        assert (site / page).is_file(), page
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    for name in notebooks:
        assert (site / "notebooks" / name / "index.html").is_file(), name
    # the stored notebooks have no outputs; their pages show the outputs of a fast-mode run, figures included
    for name in notebooks:
        html = (site / "notebooks" / name / "index.html").read_text()
        assert "jp-CodeCell" in html and re.search(r'class="[^"]*jp-OutputArea-output', html), name
        assert re.search(r'<img [^>]*src="data:image/png;base64,', html), f"{name}: no figure on its page"
    # every flag of jaxelbo train, from its parser, on the CLI page; the contributing guide on Development
    cli = (site / "cli" / "index.html").read_text()
    for flag in ("--objective", "--max-nonfinite-steps", "--eval-num-points", "--resume"):
        assert flag in cli, flag
    assert "Z_MAX" in (site / "development" / "index.html").read_text()


def test_api_page_covers_every_public_name(site):
    html = (site / "api" / "index.html").read_text()
    ids = set(re.findall(r'id="(jaxelbo\.[\w.]+)"', html))
    missing = [n for n in je.__all__ if f"jaxelbo.{n}" not in ids]
    assert not missing, f"API page lacks {missing}"
    for name in ("jaxelbo.numpyro.from_numpyro", "jaxelbo.numpyro.constrained_params",
                 "jaxelbo.models.linear_gaussian", "jaxelbo.snr.sweep", "jaxelbo.registry"):
        assert name in ids, name
    # reStructuredText math became TeX for MathJax
    assert ".. math::" not in html and "\\log \\frac{1}{K}" in html


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(site):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_browser_shows_the_iwae_signature_and_rendered_math(server, tmp_path):
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the docs extra)")
    shots = Path(os.environ.get("JAXELBO_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto(f"{server}/api/", wait_until="load")
        iwae = page.locator('[id="jaxelbo.iwae"]')
        iwae.wait_for()
        section = page.locator("div.doc-object", has=page.locator('[id="jaxelbo.iwae"]')).first
        signature = section.locator(".doc-signature").first.inner_text()
        assert re.search(r"iwae\(\s*model: Model,\s*guide: Guide,\s*\*,\s*num_samples: int", signature), signature
        # the estimator is a name, or per-site names for a mixed guide; its default is reparam
        assert re.search(r"estimator: str( \| Mapping\[str, str\])? = ['\"]reparam['\"]", signature), signature
        # MathJax typesets the TeX of iwae's docstring into <mjx-container> elements
        page.wait_for_function("() => document.querySelectorAll('mjx-container').length >= 5", timeout=30_000)
        math_in_iwae = section.locator("mjx-container").count()
        assert math_in_iwae >= 1, "no rendered math in iwae's docstring"
        assert "\\frac" not in section.inner_text(), "raw TeX left in iwae's section"
        iwae.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "api-iwae.png"))

        page.goto(f"{server}/objectives/", wait_until="load")
        page.wait_for_function("() => document.querySelectorAll('mjx-container[display=\"true\"]').length >= 5",
                               timeout=30_000)
        assert "\\sum" not in page.locator("article").inner_text()
        page.screenshot(path=str(shots / "objectives.png"))

        page.goto(f"{server}/notebooks/05_dreg/", wait_until="load")
        page.wait_for_function("() => document.querySelectorAll('mjx-container').length >= 3", timeout=30_000)
        figure = page.locator(".jp-OutputArea-output img").first
        figure.scroll_into_view_if_needed()
        assert figure.is_visible(), "no visible figure on notebook 05's page"
        width, height = figure.evaluate("img => [img.naturalWidth, img.clientHeight]")
        assert width > 100 and height > 100, (width, height)
        page.screenshot(path=str(shots / "notebook-05.png"))
        browser.close()
    assert not errors, errors
