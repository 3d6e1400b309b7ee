"""Docstring dialect → Markdown, for the documentation site.

normkit's docstrings are Google-style (``Args:``, ``Shape:``, ``Example:``) with a few
reStructuredText constructs kept so they read well under ``help()``: ``.. math::`` blocks,
``::`` literal blocks and ``:class:`...``` roles. mkdocstrings renders docstrings as Markdown, so
this module rewrites those constructs before griffe parses the sections:

* ``.. math::`` + indented block → ``$$ … $$`` (typeset by KaTeX through pymdownx.arithmatex);
  ``:math:`x``` → ``$x$``;
* a paragraph ending in ``::`` + indented block → a fenced code block (``pycon`` when it holds
  ``>>>`` lines, ``text`` otherwise);
* ``:class:`~a.b.C``` and the other Python roles → ```C``` (plain code: targets may be private);
* ``arXiv:1502.03167`` → a link to the abstract.

It is a griffe extension (``extensions: [docs/griffe_rst.py]`` in ``mkdocs.yml``) and a plain
function, :func:`rst_to_markdown`, that ``docs/hooks.py`` uses for the generated method pages.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

__all__ = ["RstToMarkdown", "rst_to_markdown"]

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const|ref):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_ARXIV = re.compile(r"(?<![\w/\[])arXiv:(\d{4}\.\d{4,5})")
_TABLE_RULE = re.compile(r"^\s*=+(\s+=+)+\s*$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _take_block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The indented block starting at ``lines[start]`` (blank lines allowed inside), more
    indented than ``base``; returns the dedented block and the index after it."""
    j = start
    block: list[str] = []
    while j < len(lines) and (not lines[j].strip() or _indent_of(lines[j]) > base):
        block.append(lines[j])
        j += 1
    while block and not block[-1].strip():  # trailing blank lines belong to what follows
        block.pop()
        j -= 1
    while block and not block[0].strip():
        block.pop(0)
    return textwrap.dedent("\n".join(block)).splitlines(), j


def _role_name(match: re.Match[str]) -> str:
    target = match.group(1)
    if "<" in target:  # :class:`text <target>`
        target = target.split("<", 1)[0].strip()
    return f"`{target.rsplit('.', 1)[-1] if '.' in target else target}`"


def _inline(line: str) -> str:
    line = re.sub(r"^(\s*)Paper:", r"\1**Paper:**", line)
    line = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", line)
    line = _ROLE.sub(_role_name, line)
    return _ARXIV.sub(lambda m: f"[arXiv:{m.group(1)}](https://arxiv.org/abs/{m.group(1)})", line)


def _simple_table(lines: list[str], start: int) -> tuple[list[str], int]:
    """A reST simple table (``===  ===`` rules) at ``lines[start]`` as Markdown table lines."""
    rule = lines[start]
    indent = " " * _indent_of(rule)
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", rule)]
    rows: list[list[str]] = []
    rules = 0
    j = start
    while j < len(lines) and rules < 3:
        line = lines[j]
        if _TABLE_RULE.match(line):
            rules += 1
        elif line.strip():
            bounds = [s for s, _ in spans[1:]] + [None]
            if any(b <= len(line) and line[b - 1] != " " for b in bounds[:-1]):  # overflowing
                cells = re.split(r"\s{2,}", line.strip(), maxsplit=len(spans) - 1)
                cells += [""] * (len(spans) - len(cells))
            else:
                cells = [line[s:e].strip() if e else line[s:].strip()
                         for (s, _), e in zip(spans, bounds, strict=True)]
            if rows and rules >= 2 and (not cells[0] or not any(cells[1:])):  # continuation
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
            else:
                rows.append(cells)
        j += 1
    if rules < 3 or not rows:
        return [], start
    cell = lambda c: _inline(c).replace("|", "\\|")  # noqa: E731
    out = [indent + "| " + " | ".join(cell(c) for c in rows[0]) + " |",
           indent + "|" + "---|" * len(spans)]
    out += [indent + "| " + " | ".join(cell(c) for c in r) + " |" for r in rows[1:]]
    return ["", *out, ""], j


def rst_to_markdown(doc: str) -> str:
    """Rewrite the reST constructs of a (dedented) docstring as Markdown; see the module doc."""
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = " " * _indent_of(line)
        if stripped.startswith("```"):
            in_fence = not in_fence
            out.append(line)
            i += 1
            continue
        if in_fence or stripped.startswith(">>>") or stripped.startswith("..."):
            out.append(line)
            i += 1
            continue
        if _TABLE_RULE.match(line):
            table, j = _simple_table(lines, i)
            if table:
                out += table
                i = j
                continue
        if stripped.startswith(".. math::"):
            inline = stripped[len(".. math::"):].strip()
            block, i = _take_block(lines, i + 1, _indent_of(line))
            body = ([inline] if inline else []) + block
            out += ["", indent + "$$", *(indent + b for b in body), indent + "$$", ""]
            continue
        if stripped.endswith("::") and i + 1 < len(lines) and not stripped.startswith(".."):
            block, j = _take_block(lines, i + 1, _indent_of(line))
            if block:
                lang = "pycon" if any(b.lstrip().startswith(">>>") for b in block) else "text"
                head = stripped[:-2].rstrip()
                if head:
                    out.append(indent + _inline(head) + ":")
                out += ["", indent + "```" + lang, *(indent + b for b in block), indent + "```", ""]
                i = j
                continue
        if stripped == "Example:":  # griffe's Google parser knows only the plural section
            line = line.replace("Example:", "Examples:")
        out.append(_inline(line))
        i += 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """griffe extension applying :func:`rst_to_markdown` to every docstring it loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
