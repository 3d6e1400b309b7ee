"""The documentation: every Python example in docs/*.md runs, every registered method has a
docstring with a formula, a paper and a Shape section, and the generated pages cover every method.

The docstring examples themselves run as doctests (``--doctest-modules``); the site is built by
``mkdocs build --strict`` in CI and rendered in Chromium by ``tests/test_docs_browser.py``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path

import pytest

import normkit as nk
from normkit import registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
from griffe_rst import rst_to_markdown  # noqa: E402

_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    out = []
    for path in sorted(DOCS.rglob("*.md")):
        if "compare-run" in path.parts:
            continue
        for i, code in enumerate(_FENCE.findall(path.read_text())):
            out.append((f"{path.relative_to(DOCS)}#{i}", code))
    return out


BLOCKS = _blocks()


def test_docs_have_examples() -> None:
    assert len(BLOCKS) >= 8, [b[0] for b in BLOCKS]


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[n for n, _ in BLOCKS])
def test_markdown_python_block_runs(code: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # an example may register a method: give the registry back as it was
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_KEYS", dict(registry._KEYS))
    exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs__"})


def _missing_sections(cls: type) -> list[str]:
    doc = inspect.getdoc(cls) or ""
    missing = []
    if ".. math::" not in doc and "$$" not in doc:
        missing.append("formula (.. math::)")
    if not re.search(r"^Paper:", doc, re.M):
        missing.append("Paper:")
    if not re.search(r"^Shape:\s*$", doc, re.M):
        missing.append("Shape:")
    if not re.search(r"^Examples?:\s*$", doc, re.M) or ">>>" not in doc:
        missing.append("Example: with >>> lines")
    return missing


def test_every_method_docstring_has_formula_paper_shape_example() -> None:
    bad = {n: m for n in nk.list_methods() if (m := _missing_sections(registry.info(n).cls))}
    assert not bad, f"methods whose docstring lacks sections: {bad}"


def test_missing_sections_detects_a_bare_docstring() -> None:
    class Bare:
        """Only a summary."""

    assert _missing_sections(Bare) == ["formula (.. math::)", "Paper:", "Shape:",
                                       "Example: with >>> lines"]


def test_rst_to_markdown() -> None:
    doc = "\n".join([
        "Summary, see :class:`~normkit.methods.standard.BatchNorm` and arXiv:1502.03167.",
        "",
        ".. math::",
        "    y = \\frac{x}{2}",
        "",
        "Use it so::",
        "",
        "    >>> 1 + 1",
        "    2",
        "",
        "====  =====",
        "name  what",
        "====  =====",
        "bn    batch",
        "ln    layer",
        "====  =====",
        "",
        "Example:",
        "    >>> 2",
        "    2",
    ])
    md = rst_to_markdown(doc)
    assert "`BatchNorm`" in md and ":class:" not in md
    assert "[arXiv:1502.03167](https://arxiv.org/abs/1502.03167)" in md
    assert "$$\ny = \\frac{x}{2}\n$$" in md and ".. math::" not in md
    assert "Use it so:\n\n```pycon\n>>> 1 + 1\n2\n```" in md
    assert "| name | what |\n|---|---|\n| bn | batch |\n| ln | layer |" in md
    assert "Examples:\n    >>> 2" in md  # griffe's Google parser knows only the plural


def test_getting_started_commands_are_the_readmes() -> None:
    readme = (ROOT / "README.md").read_text()
    page = (DOCS / "getting-started.md").read_text()
    for cmd in ('pip install torch==2.13.0 -e ".[compare]" && normkit compare',
                'pip install torch==2.13.0 -e ".[test]" && pytest'):
        assert cmd in readme and cmd in page


def test_framework_page_quotes_the_real_batchnorm() -> None:
    source = (ROOT / "src" / "normkit" / "methods" / "standard.py").read_text()
    page = (DOCS / "framework.md").read_text()
    line = ("super().__init__(num_features, nap=nap.Batch(), nrr=affine_recovery(affine, "
            "bias=bias), **kw)")
    assert line in page and line in source


def test_compare_page_states_its_command_and_data_exist() -> None:
    page = (DOCS / "choosing.md").read_text()
    assert "normkit compare --out docs/compare-run" in page
    for name in ("config.json", "results.jsonl", "error_vs_batch_size.png", "training_curves.png"):
        assert (DOCS / "compare-run" / name).stat().st_size > 0, name


def test_no_network_sources_in_docs_config() -> None:
    text = (ROOT / "mkdocs.yml").read_text() + (DOCS / "assets" / "katex.js").read_text()
    assert "http" not in text and "cdn" not in text.lower()


def test_generated_pages_cover_every_method_and_module() -> None:
    spec = importlib.util.spec_from_file_location("normkit_docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    pages = hooks._generated_pages()
    for family in nk.list_families():
        page = pages[f"methods/{family}.md"]
        for name in nk.list_methods(family):
            cls = registry.info(name).cls
            assert f"## `{name}` — {cls.__name__}" in page
            assert f"::: {cls.__module__}.{cls.__qualname__}" in page
    assert "[`bn`](standardization.md#bn)" in pages["methods/index.md"]
    assert "tests/test_equivalence.py::test_gn_one_group_equals_ln_over_all" in \
        pages["methods/standardization.md"]
    for mod in ("normkit", "normkit.registry", "normkit.apply.fold", "normkit.weight"):
        assert f"reference/{mod}.md" in pages
    # the benchmarks are a tool, not API: neither normkit._bench nor its deprecated aliases
    assert not [p for p in pages if "bench" in p and p.startswith("reference/")]
    assert os.environ.get("MPLBACKEND", "Agg")  # pages import nothing that needs a display
