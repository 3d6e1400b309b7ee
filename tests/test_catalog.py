"""The catalog is derived from the registry or checked against it: adding a method is a preset
class with ``@register`` plus a row in the case table, and these tests fail when anything that
lists methods (exports, the README's table, the docs, ``normkit list``'s summaries, ``normkit.nop``)
disagrees with the registry."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import warnings
from pathlib import Path

import pytest

import normkit as nk
from normkit import registry

ROOT = Path(__file__).resolve().parent.parent
METHODS = nk.list_methods()


def _hooks():
    spec = importlib.util.spec_from_file_location("normkit_docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


@pytest.mark.parametrize("name", METHODS)
def test_registered_class_is_exported(name: str) -> None:
    cls = nk.info(name).cls
    hint = (f"list {cls.__name__} in the __all__ of {cls.__module__} (a new family module: "
            "star-import it in normkit/methods/__init__.py)")
    assert getattr(nk.methods, cls.__name__, None) is cls and cls.__name__ in nk.methods.__all__, hint
    assert getattr(nk, cls.__name__, None) is cls, hint


# --------------------------------------------------------------------------- summaries


@pytest.mark.parametrize("name", METHODS)
def test_summary_is_whole_sentences_without_raw_rst(name: str) -> None:
    summary = nk.info(name).summary
    assert re.search(r"[.!?]\)?$", summary), f"{name}: summary stops mid-sentence: {summary!r}"
    assert "``" not in summary and not re.search(r":[a-z]+:`", summary), summary
    assert "\n" not in summary and summary.count("`") % 2 == 0, summary
    # the whole first paragraph of the docstring: its last words end the summary
    first = inspect.cleandoc(nk.info(name).cls.__doc__).split("\n\n")[0]
    assert re.findall(r"\w+", summary)[-1] == re.findall(r"\w+", first)[-1], (summary, first)


def test_summary_of_joins_the_paragraph_and_converts_rst() -> None:
    doc = """Adaptive instance normalization: ``y = σ(s)·x̂ + μ(s)`` with the statistics of
    a style input (:class:`~normkit.nrr.Affine`, :func:`normkit.create`).

    More text.
    """
    assert registry.summary_of(doc) == (
        "Adaptive instance normalization: `y = σ(s)·x̂ + μ(s)` with the statistics of a style "
        "input (`Affine`, `create`).")
    assert registry.summary_of(None) == ""


# --------------------------------------------------------------------------- README table


def _readme_method_table() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "README.md: no method table under '## Methods'"
    return [re.findall(r"`([^`]+)`", row.split("|")[1]) for row in rows]


def _table_problems(rows: list[list[str]]) -> list[str]:
    """What is wrong with a method table's first column against the registry."""
    problems, listed = [], {}
    for names in rows:
        for n in names:
            try:
                listed[n] = nk.info(n).name
            except nk.UnknownMethodError:
                problems.append(f"lists {n!r}, which is not registered")
    missing = sorted(set(METHODS) - set(listed.values()))
    if missing:
        problems.append(f"misses the registered methods {missing}")
    # an alias is shown next to its method's canonical name, not instead of it
    problems += [f"shows the alias {n!r} without {c!r}" for n, c in listed.items()
                 if n != c and c not in listed]
    return problems


def test_readme_method_table_matches_the_registry() -> None:
    problems = _table_problems(_readme_method_table())
    assert not problems, f"README.md's method table (under '## Methods'): {problems}"


def test_table_check_fails_on_a_stale_table() -> None:
    rows = [r for r in _readme_method_table() if "gn" not in r] + [["not_a_method"], ["center_norm"]]
    problems = _table_problems(rows)
    assert "lists 'not_a_method', which is not registered" in problems
    assert any(p.startswith("misses the registered methods") and "'gn'" in p for p in problems)
    assert "shows the alias 'center_norm' without 'mean_only_bn'" not in problems  # row kept
    no_mean_only = [r for r in rows if "mean_only_bn" not in r] + [["center_norm"]]
    assert "shows the alias 'center_norm' without 'mean_only_bn'" in _table_problems(no_mean_only)


# --------------------------------------------------------------------------- docs


def test_every_method_has_its_docs_entry() -> None:
    hooks = _hooks()
    pages = hooks._generated_pages()
    index = pages["methods/index.md"]
    for name in METHODS:
        meta = nk.info(name)
        page = pages[f"methods/{meta.family}.md"]
        anchor = name.replace("_", "-")
        assert f"[`{name}`]({meta.family}.md#{anchor})" in index, name
        assert f"## `{name}` — {meta.cls.__name__} {{#{anchor}}}" in page, name
        assert hooks._md_cell(hooks.rst_to_markdown(meta.summary)) in page, name


def test_api_reference_lists_only_public_modules() -> None:
    modules = _hooks()._public_modules()
    private = [m for m in modules if re.search(r"\.(_|cli\b|experiments\b|bench)", m)]
    assert not private, f"internal modules in the API reference: {private}"
    for public in ("normkit", "normkit.registry", "normkit.nop", "normkit.methods.standard",
                   "normkit.apply.fold", "normkit.functional.statistics"):
        assert public in modules


# --------------------------------------------------------------------------- operations


def _operations_defined_in_nop() -> list[type]:
    found = set()
    for mod in pkgutil.iter_modules(nk.nop.__path__, "normkit.nop."):
        module = importlib.import_module(mod.name)
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, nk.nop.Operation)
                    and obj.__module__ == mod.name and not obj.__name__.startswith("_")):
                found.add(obj)
    return sorted(found, key=lambda c: c.__name__)


def test_every_operation_is_exported_from_nop() -> None:
    ops = _operations_defined_in_nop()
    assert len(ops) >= 28
    missing = [c.__name__ for c in ops if getattr(nk.nop, c.__name__, None) is not c
               or c.__name__ not in nk.nop.__all__]
    assert not missing, f"operations not exported from normkit.nop: {missing}"


def test_every_preset_operation_lives_in_nop() -> None:
    for name in METHODS:
        try:
            module = nk.create(name, 8)
        except (TypeError, ValueError):  # needs options: checked through the case table
            continue
        op = getattr(module, "nop", None)
        if op is not None:
            assert type(op).__module__.startswith("normkit.nop."), (name, type(op))


def test_moved_operation_keeps_a_deprecated_alias() -> None:
    import normkit.methods.ibn as ibn

    with pytest.warns(DeprecationWarning, match="normkit.nop.InstanceBatchStandardize"):
        alias = ibn.InstanceBatchStandardize
    assert alias is nk.nop.InstanceBatchStandardize
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(nk.IBN(4).nop) is nk.nop.InstanceBatchStandardize
    with pytest.raises(AttributeError):
        ibn.NotAnOperation  # noqa: B018


def test_normkit_list_prints_each_summary_whole(capsys, monkeypatch) -> None:
    pytest.importorskip("rich")
    from normkit import cli

    monkeypatch.setenv("COLUMNS", "1000")  # one line per row: the summaries are not wrapped
    assert cli.main(["list"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in METHODS:
        summary = nk.info(name).summary
        assert " ".join(summary.replace("`", "").split()) in out, name  # `code` styled, not shown
    assert "``" not in out
