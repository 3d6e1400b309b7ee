"""Render pages of the built site in headless Chromium and check what a reader sees.

For each page: the DOM after scripts ran (``--dump-dom``) must contain KaTeX output and no raw
TeX (``\\frac``, ``$$``, ``\\[``, ``\\(``) in its visible text, and every file the browser asked
the local server for (stylesheets, scripts, KaTeX fonts, images) must have been served (no 404).
A screenshot of each page is written and must not be blank. No network is used: the site is
served from ``localhost`` and Chromium runs with background networking off.

    python docs/check_browser.py site /tmp/shots    # after mkdocs build; exit status 1 on failure
"""

from __future__ import annotations

import functools
import html
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

# name: (path, must show typeset math)
PAGES = {"index": ("", True), "method": ("methods/standardization/", True),
         "choosing": ("choosing/", False)}
RAW_TEX = ("\\frac", "$$", "\\[", "\\(", "\\sqrt")
_INVISIBLE = re.compile(
    r"<(script|style|annotation|pre|code|title)\b[^>]*>.*?</\1>", re.S | re.I)


def chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@dataclass
class PageResult:
    name: str
    url: str
    katex_spans: int
    raw_tex: list[str]
    images: list[str]
    screenshot: Path
    problems: list[str] = field(default_factory=list)


class _Handler(http.server.SimpleHTTPRequestHandler):
    log: list[tuple[str, int]]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.log.append((self.path.split("?")[0], int(code) if str(code).isdigit() else 0))

    def log_message(self, *args: object) -> None:  # quiet
        pass


def _visible_text(dom: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", _INVISIBLE.sub(" ", dom)))


def _run(binary: str, url: str, profile: str, *extra: str) -> str:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--hide-scrollbars",
           "--virtual-time-budget=5000", *extra, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def _blank(png: Path) -> bool:
    import matplotlib.image as mpimg

    pixels = mpimg.imread(png)
    return bool(pixels.std() < 0.02)


def check_site(site: Path, shots: Path, pages: dict[str, tuple[str, bool]] = PAGES) -> list[PageResult]:
    """Serve ``site``, render ``pages`` and return what each showed (``problems`` empty = ok)."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium not found (Debian: apt-get install chromium)")
    shots.mkdir(parents=True, exist_ok=True)
    log: list[tuple[str, int]] = []
    handler = type("Handler", (_Handler,), {"log": log})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    results = []
    try:
        for name, (path, math) in pages.items():
            url = f"http://127.0.0.1:{server.server_address[1]}/{path}"
            with tempfile.TemporaryDirectory() as profile:
                del log[:]
                dom = _run(binary, url, profile, "--dump-dom")
                requested = list(log)
            shot = shots / f"{name}.png"
            with tempfile.TemporaryDirectory() as profile:
                _run(binary, url, profile, f"--screenshot={shot}", "--window-size=1280,1600")
            text = _visible_text(dom)
            images = re.findall(r"<img[^>]+src=\"([^\"]+)\"", dom)
            result = PageResult(name, url, dom.count('class="katex"'),
                                [t for t in RAW_TEX if t in text], images, shot)
            if (math or "arithmatex" in dom) and result.katex_spans == 0:
                result.problems.append("no KaTeX output (class=\"katex\") in the rendered DOM")
            if result.raw_tex:
                result.problems.append(f"raw TeX left in the visible text: {result.raw_tex}")
            failed = [(p, c) for p, c in requested if c >= 400]
            if failed:
                result.problems.append(f"requests that failed: {failed}")
            served = {p for p, c in requested if c == 200}
            for src in images:
                if src.startswith(("http:", "https:", "//")):
                    result.problems.append(f"image from the network: {src}")
                elif not any(s.endswith(src.lstrip("./").split("?")[0]) for s in served):
                    result.problems.append(f"image not loaded: {src}")
            if not shot.exists() or _blank(shot):
                result.problems.append(f"screenshot missing or blank: {shot}")
            results.append(result)
    finally:
        server.shutdown()
        server.server_close()
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    site, shots = Path(args[0] if args else "site"), Path(args[1] if len(args) > 1 else "shots")
    ok = True
    for r in check_site(site, shots):
        print(f"{r.name}: {r.katex_spans} KaTeX spans, {len(r.images)} images, "
              f"screenshot {r.screenshot}" + "".join(f"\n  PROBLEM: {p}" for p in r.problems))
        ok = ok and not r.problems
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
