"""The built documentation site in a real browser (Debian's ``chromium``, headless).

Builds the site with ``mkdocs build --strict`` into a temporary directory (or uses the one
``NORMKIT_DOCS_SITE`` points to, as CI does after building it), serves it on localhost and renders
the index page, a generated method page and the compare page: formulas must be typeset by the
vendored KaTeX (no raw ``\\frac`` or ``$$`` in the visible text), every requested file (fonts,
images) must be served, screenshots must not be blank, and no page may load anything from the
network. Skipped only where Chromium is not installed, unless ``NORMKIT_REQUIRE_BROWSER`` is set
(as ``.ci/run`` does), which makes a missing Chromium a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
import check_browser  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if env := os.environ.get("NORMKIT_DOCS_SITE"):
        return Path(env)
    out = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                    "--site-dir", str(out)], cwd=ROOT, check=True, timeout=300,
                   env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    return out


def test_site_loads_nothing_from_the_network(site: Path) -> None:
    script = re.compile(r"<(?:script|img|iframe)\b[^>]*?src=\"((?:https?:)?//[^\"]*)\"")
    sheet = re.compile(r"<link\b[^>]*?rel=\"(?:stylesheet|preload|modulepreload)\"[^>]*?"
                       r"href=\"((?:https?:)?//[^\"]*)\"")
    offenders = {}
    for page in site.rglob("*.html"):
        text = page.read_text()
        found = script.findall(text) + sheet.findall(text)
        if found:
            offenders[str(page.relative_to(site))] = found
    assert not offenders
    for css in site.rglob("*.css"):
        urls = re.findall(r"url\(\s*['\"]?((?:https?:)?//[^)'\"]+)", css.read_text())
        assert not urls, (css, urls)
    assert "cdn" not in (site / "index.html").read_text().lower()


@pytest.mark.skipif(check_browser.chromium() is None and not os.environ.get("NORMKIT_REQUIRE_BROWSER"),
                    reason="chromium not installed (Debian: apt-get install chromium)")
def test_pages_render_with_typeset_math_and_images(site: Path, tmp_path: Path) -> None:
    assert check_browser.chromium() is not None, "NORMKIT_REQUIRE_BROWSER is set (CI): install chromium"
    shots = Path(os.environ.get("NORMKIT_DOCS_SHOTS", tmp_path))
    results = {r.name: r for r in check_browser.check_site(site, shots)}
    assert {n: r.problems for n, r in results.items() if r.problems} == {}
    assert results["index"].katex_spans >= 1
    assert results["method"].katex_spans >= 6      # one formula per standardization method
    # every committed compare plot is on the page (and served: no problems above)
    committed = {p.name for p in (Path(__file__).parents[1] / "docs" / "compare-run").glob("*.png")}
    assert committed and {Path(i).name for i in results["choosing"].images} == committed
