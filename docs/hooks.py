"""MkDocs hooks: the pages generated from the code at build time.

* ``on_config`` expands the ``Methods`` and ``API reference`` entries of the nav into one page per
  registered family (``normkit.registry.list_families()``) and one page per public module of
  ``normkit`` (every module found by ``pkgutil.walk_packages``, private ``_x`` ones left out), so a
  new family or module appears without touching ``mkdocs.yml``;
* ``on_files`` adds those pages;
* ``on_page_markdown`` replaces ``<!-- normkit:NAME -->`` markers in hand-written pages with
  generated content (the application modules, the examples, the committed ``normkit compare`` run,
  the benchmark tables).

``python docs/hooks.py refresh-benchmarks`` copies a summary of ``benchmarks/results/*.json``
(git-ignored) into ``docs/data/benchmarks.json`` (committed), which the benchmarks page reads.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS))
from griffe_rst import rst_to_markdown  # noqa: E402

METHODS_NAV = "methods/index.md"
REFERENCE_NAV = "reference/index.md"
BENCH_DATA = DOCS / "data" / "benchmarks.json"
COMPARE_DIR = DOCS / "compare-run"
PROBE_CHANNELS = 64  # channel count used to show each preset's composition


# --------------------------------------------------------------------------- helpers


def _family_title(family: str) -> str:
    return family.replace("_", " ").capitalize()


def _public_modules() -> list[str]:
    import normkit

    names = ["normkit"]
    deprecated = {"normkit.benchmarking", "normkit.bench_weight"}  # aliases of normkit._bench
    for mod in pkgutil.walk_packages(normkit.__path__, "normkit."):
        if not any(part.startswith("_") for part in mod.name.split(".")) and mod.name not in deprecated:
            names.append(mod.name)
    return sorted(names)


def _module_summary(name: str) -> str:
    doc = inspect.getdoc(importlib.import_module(name)) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- method pages


def _equivalence_tests() -> dict[str, list[str]]:
    """Test functions named ``test_<method>_..._equals_...`` / ``_vs_...`` per file."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                if "_equals_" in node.name or "_vs_" in node.name or "_equal_" in node.name:
                    found.setdefault(node.name[5:], []).append(f"tests/{path.name}::{node.name}")
    return found


def _composition(name: str) -> str:
    import normkit as nk

    try:
        module = nk.create(name, PROBE_CHANNELS)
    except Exception as err:  # noqa: BLE001 — shown to the reader: what the preset needs
        return f"needs arguments: {_md_cell(str(err))}"
    parts = [(p, getattr(module, p, None)) for p in ("nap", "nop", "nrr")]
    if any(v is None for _, v in parts):
        return f"`{type(module).__name__}` (not a NAP × NOP × NRR composition)"
    return " × ".join(f"{p.upper()} `{_md_cell(repr(v))}`" for p, v in parts)


def _example_equivalences(doc: str) -> list[str]:
    lines = []
    for line in doc.splitlines():
        code = line.strip().removeprefix(">>> ").strip()
        if line.strip().startswith(">>>") and re.search(r"torch\.(allclose|equal)\(", code):
            lines.append(code)
    return lines


def _method_section(name: str, tests: dict[str, list[str]]) -> str:
    from normkit import registry

    meta = registry.info(name)
    cls = meta.cls
    doc = inspect.getdoc(cls) or ""
    path = f"{cls.__module__}.{cls.__qualname__}"
    aliases = ", ".join(f"`{a}`" for a in meta.aliases) or "—"
    paper = rst_to_markdown(meta.paper) if meta.paper else "—"
    rows = [
        ("registry name", f"`{name}`"),
        ("aliases", aliases),
        ("class", f"`{path}`"),
        ("paper", paper),
        ("composition (defaults, C = 64)", _composition(name)),
        ("use", f'`nk.create("{name}", C, ...)`, `norm_layer=nk.partial("{name}", ...)`'),
    ]
    out = [f"## `{name}` — {cls.__name__} {{#{name.replace('_', '-')}}}", ""]
    out += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    out += [f"::: {path}", "    options:", "      show_root_heading: false",
            "      show_root_toc_entry: false", "      members: false", "      heading_level: 3", ""]
    eq_example = _example_equivalences(doc)
    eq_tests = [t for key, ts in sorted(tests.items()) if key.startswith(name + "_") for t in ts]
    out += ["**Equivalences.**", ""]
    if eq_example:
        out += ["Asserted by the example above:", ""]
        out += [f"- `{_md_cell(e)}`" for e in eq_example] + [""]
    if eq_tests:
        out += ["Tested:", ""] + [f"- `{t}`" for t in eq_tests] + [""]
    if not eq_example and not eq_tests:
        out += ["None stated beyond the formula above.", ""]
    return "\n".join(out)


def _family_page(family: str) -> str:
    from normkit import registry

    names = registry.list_methods(family)
    modules = sorted({registry.info(n).cls.__module__ for n in names})
    tests = _equivalence_tests()
    out = [f"# {_family_title(family)}", ""]
    out += [f"*Generated from `normkit.registry` at build time: {len(names)} methods.*", ""]
    for mod in modules:
        out += [rst_to_markdown(_module_summary(mod)) + f" (`{mod}`)", ""]
    out += ["| name | class | aliases | summary |", "|---|---|---|---|"]
    for n in names:
        m = registry.info(n)
        anchor = n.replace("_", "-")
        out.append(f"| [`{n}`](#{anchor}) | `{m.cls.__name__}` | "
                   f"{', '.join(f'`{a}`' for a in m.aliases) or '—'} | "
                   f"{_md_cell(rst_to_markdown(m.summary))} |")
    out.append("")
    for n in names:
        out.append(_method_section(n, tests))
    return "\n".join(out)


def _methods_index() -> str:
    from normkit import registry

    out = ["# Methods", ""]
    out += [f"*Generated from `normkit.registry`: {len(registry.list_methods())} methods in "
            f"{len(registry.list_families())} families.* Every one is a class built as "
            "`nk.create(name, C, **kw)`, usable as a model library's `norm_layer=`; each entry "
            "gives the formula, the paper, the arguments, the shape, an example that runs (a "
            "doctest of the test suite) and the equivalences that are tested.", ""]
    out += ["| name | family | aliases | paper |", "|---|---|---|---|"]
    for n in registry.list_methods():
        m = registry.info(n)
        link = f"{m.family}.md#{n.replace('_', '-')}"
        out.append(f"| [`{n}`]({link}) | [{_family_title(m.family)}]({m.family}.md) | "
                   f"{', '.join(f'`{a}`' for a in m.aliases) or '—'} | "
                   f"{_md_cell(rst_to_markdown(m.paper))} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- API reference


def _reference_page(module: str) -> str:
    return (f"# `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n"
            "      show_submodules: false\n")


def _reference_index(modules: list[str]) -> str:
    out = ["# API reference", "", "*Generated from the package: one page per public module.*", "",
           "| module | summary |", "|---|---|"]
    for mod in modules:
        out.append(f"| [`{mod}`]({mod}.md) | {_md_cell(rst_to_markdown(_module_summary(mod)))} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- markers


def _apply_modules() -> str:
    import normkit.apply as apply

    out = []
    for mod in sorted(m.name for m in pkgutil.iter_modules(apply.__path__)):
        if mod.startswith("_"):
            continue
        full = f"normkit.apply.{mod}"
        doc = inspect.getdoc(importlib.import_module(full)) or ""
        doc = rst_to_markdown(re.split(r"^[A-Z]\w*( \w+)?:$", doc, maxsplit=1, flags=re.M)[0])
        out += [f"## `{full}`", "", doc, "",
                f"Functions and classes: [API reference](reference/{full}.md).", ""]
    return "\n".join(out)


def _examples() -> str:
    out = ["| script | what |", "|---|---|"]
    for path in sorted((ROOT / "examples").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = doc.strip().split("\n\n")[0].replace("\n", " ")
        out.append(f"| `examples/{path.name}` | {_md_cell(rst_to_markdown(first))} |")
    return "\n".join(out) + "\n"


def _compare_tables() -> str:
    """The committed run's recommendation, test-error table and lr table: the sections of the
    ``report.md`` that ``normkit compare`` wrote there (images re-pointed into ``compare-run/``),
    and its settings from ``config.json``."""
    config = json.loads((COMPARE_DIR / "config.json").read_text())
    sections = re.split(r"^## ", (COMPARE_DIR / "report.md").read_text(), flags=re.M)
    keep = ("Recommendation", "Test error (%)", "Learning rate")
    out = []
    for section in sections[1:]:
        title, _, body = section.partition("\n")
        if title.startswith(keep):
            body = re.sub(r"!\[([^]]*)\]\(([^)/]+)\)", r"![\1](compare-run/\2)", body)
            out.append(f"**{title}**\n{body}")
    rows = sum(1 for line in (COMPARE_DIR / "results.jsonl").read_text().splitlines() if line)
    s, grid, ds = config["settings"], config["grid"], config.get("dataset", {})
    out.append(f"Settings: dataset `{s['dataset']}` ({ds.get('train', '?')} train / "
               f"{ds.get('test', '?')} test examples), model `{s['model']}`, {s['epochs']} "
               f"epochs, batch sizes {', '.join(map(str, grid['batch_sizes']))}, seeds "
               f"{', '.join(map(str, grid['seeds']))}; {rows} runs.")
    return "\n".join(out) + "\n"


def _machine(m: dict[str, Any]) -> str:
    return (f"{m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('cpu_capability')}), "
            f"torch {m.get('torch')}, Python {m.get('python')}, normkit {m.get('normkit')}, "
            f"{m.get('threads')} thread(s), run {m.get('time')}")


def _bench_main(data: dict[str, Any]) -> str:
    main = data["main"]
    out = [f"**Machine:** {_machine(main['machine'])}. Copy bandwidth "
           f"{main['copy_bandwidth_gbs']:.1f} GB/s; run took {main['elapsed_s']:.0f} s; "
           f"targets met {main['targets']['met']} of {main['targets']['judged']}.", ""]
    shapes = list(dict.fromkeys(f"{c['shape']} ({c['layout']})" for c in main["cells"]))
    for shape in shapes:
        cells = [c for c in main["cells"] if f"{c['shape']} ({c['layout']})" == shape]
        out += [f"### `{shape}`", "",
                "| method | ref | fb-train ms (ours) | × ref fwd-train | × ref fwd-eval | "
                "× ref fb-train | × ref fb-eval |", "|---|---|---|---|---|---|---|"]
        for method in dict.fromkeys(c["method"] for c in cells):
            by_mode = {c["mode"]: c for c in cells if c["method"] == method}
            ref = next(iter(by_mode.values()))["ref"]
            fb = by_mode.get("fb-train", {}).get("medians_ms", {}).get("ours")

            def ratio(mode: str, ref: str = ref, by_mode: dict = by_mode) -> str:
                r = by_mode.get(mode, {}).get("ours_over", {}).get(ref)
                return "—" if r is None else f"{r:.2f}"

            out.append(f"| `{method}` | {ref} | {'—' if fb is None else f'{fb:.2f}'} | "
                       + " | ".join(ratio(m) for m in
                                    ("fwd-train", "fwd-eval", "fb-train", "fb-eval")) + " |")
        out.append("")
    return "\n".join(out)


def _bench_whitening(data: dict[str, Any]) -> str:
    w = data["whitening"]
    out = [f"**Machine:** {_machine(w['machine'])}.", "",
           "| method | d | shape | fb-train ms ours / papers' / BN | ours/BN | papers'/BN | "
           "eval/blockmm | saved/in |", "|---|---|---|---|---|---|---|---|"]
    for r in w["rows"]:
        fb = r["medians_ms"]["fb-train"]
        q = r["ratios"]
        out.append(f"| `{r['method']}` | {r['group_size']} | `{r['shape']}` | "
                   f"{fb['ours']:.2f} / {fb['plain']:.2f} / {fb['bn_torch']:.2f} | "
                   f"{q['ours/BN']:.2f} | {q['plain/BN']:.2f} | {q.get('eval/mm', 0):.2f} | "
                   f"{q['saved/in']:.2f} |")
    return "\n".join(out) + "\n"


def _bench_weights(data: dict[str, Any]) -> str:
    w = data["weights"]
    out = [f"**Machine:** {_machine(w['machine'])}.", "",
           "| parametrization | fwd+bwd ms | × plain layer |", "|---|---|---|"]
    out += [f"| `{r['impl']}` | {r['median_ms']:.2f} | {r['ratio_plain']:.2f} |"
            for r in w["layer"]]
    if w.get("orthogonal"):
        out += ["", "| method | weight | fwd+bwd ms | ‖WWᵀ − I‖_F |", "|---|---|---|---|"]
        out += [f"| `{r['impl']}` | `{r['shape']}` | {r['median_ms']:.2f} | "
                f"{r['orthogonality_error']:.3g} |" for r in w["orthogonal"]]
    return "\n".join(out) + "\n"


def _bench_fold(data: dict[str, Any]) -> str:
    f = data["fold"]
    out = [f"**Machine:** {_machine(f['machine'])}; input `{f['input']}`, {f['repeats']} "
           "repeats.", "", "| normalization | original ms | folded ms | speed-up | max rel. diff |",
           "|---|---|---|---|---|"]
    out += [f"| `{r['norm']}` | {r['median_ms_original']:.2f} | {r['median_ms_folded']:.2f} | "
            f"{r['speedup']:.2f}× | {r['max_rel_diff']:.1e} |" for r in f["rows"]]
    return "\n".join(out) + "\n"


def _bench(part: str) -> str:
    data = json.loads(BENCH_DATA.read_text())
    if part not in data:
        return f"*No `{part}` results in `docs/data/benchmarks.json`.*\n"
    return {"main": _bench_main, "whitening": _bench_whitening, "weights": _bench_weights,
            "fold": _bench_fold}[part](data)


MARKERS = {
    "apply-modules": _apply_modules,
    "examples": _examples,
    "compare-table": _compare_tables,
    "bench-main": lambda: _bench("main"),
    "bench-whitening": lambda: _bench("whitening"),
    "bench-weights": lambda: _bench("weights"),
    "bench-fold": lambda: _bench("fold"),
}
_MARKER = re.compile(r"<!-- normkit:([a-z-]+) -->")


# --------------------------------------------------------------------------- mkdocs events


def _generated_pages() -> dict[str, str]:
    from normkit import registry

    pages = {METHODS_NAV: _methods_index()}
    for family in registry.list_families():
        pages[f"methods/{family}.md"] = _family_page(family)
    modules = _public_modules()
    pages[REFERENCE_NAV] = _reference_index(modules)
    for mod in modules:
        pages[f"reference/{mod}.md"] = _reference_page(mod)
    return pages


def on_config(config: Any) -> Any:
    from normkit import registry

    methods = [METHODS_NAV] + [{_family_title(f): f"methods/{f}.md"}
                               for f in registry.list_families()]
    reference = [REFERENCE_NAV] + [{m: f"reference/{m}.md"} for m in _public_modules()]
    for entry in config["nav"] or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if value == METHODS_NAV:
                    entry[key] = methods
                elif value == REFERENCE_NAV:
                    entry[key] = reference
    return config


def on_files(files: Files, config: Any) -> Files:
    for uri, content in _generated_pages().items():
        files.append(File.generated(config, uri, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in MARKERS:
            raise ValueError(f"{page.file.src_uri}: unknown marker {name!r}; known: {list(MARKERS)}")
        return MARKERS[name]()

    return _MARKER.sub(replace, markdown)


# --------------------------------------------------------------------------- benchmark snapshot


def _round(obj: Any) -> Any:
    """Floats to 4 significant digits (timings are not more precise than that)."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    return obj


def refresh_benchmarks(results: Path = ROOT / "benchmarks" / "results") -> dict[str, Any]:
    """Summarize ``benchmarks/results/*.json`` into ``docs/data/benchmarks.json``."""
    data: dict[str, Any] = {}
    main_path = results / "final.json"
    if main_path.exists():
        d = json.loads(main_path.read_text())
        keep = ("method", "shape", "layout", "mode", "native", "ref", "medians_ms", "ours_over",
                "target", "target_met")
        data["main"] = {
            "source": "benchmarks/results/final.json (python benchmarks/run.py)",
            "machine": d["machine"], "config": d["config"],
            "copy_bandwidth_gbs": d["copy_bandwidth_gbs"], "elapsed_s": d["elapsed_s"],
            "targets": {k: d["targets"][k] for k in ("judged", "met")},
            "cells": [{k: c[k] for k in keep if k in c} for c in d["cells"]],
        }
    if (results / "whitening.json").exists():
        d = json.loads((results / "whitening.json").read_text())
        data["whitening"] = {"source": "python benchmarks/run.py --whitening",
                             "machine": d["machine"], **{k: d["whitening"][k]
                                                        for k in ("config", "rows", "targets")}}
    if (results / "weights.json").exists():
        d = json.loads((results / "weights.json").read_text())["weights"]
        data["weights"] = {"source": "python benchmarks/run.py --weights", **d}
    if (results / "fold.json").exists():
        d = json.loads((results / "fold.json").read_text())
        rows = [{k: v for k, v in r.items() if k != "samples_s"} for r in d["rows"]]
        data["fold"] = {"source": "python benchmarks/fold.py", **d, "rows": rows}
    BENCH_DATA.parent.mkdir(parents=True, exist_ok=True)
    BENCH_DATA.write_text(json.dumps(_round(data), indent=1) + "\n")
    return data


if __name__ == "__main__":
    if sys.argv[1:] == ["refresh-benchmarks"]:
        print(f"wrote {BENCH_DATA}: {sorted(refresh_benchmarks())}")
    else:
        sys.exit("usage: python docs/hooks.py refresh-benchmarks")
