"""The core install is torch alone: ``import normkit`` and the layers work without the ``compare``
extra (numpy included: torch does not require it), the declared metadata says so, and the
``normkit`` command names the extra it needs instead of failing with a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What `pip install normkit` must not bring: the compare extra's packages and scikit-learn.
HEAVY = ("numpy", "scipy", "matplotlib", "rich", "sklearn", "mnist1d")


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter on this checkout's ``src``, with the modules named in
    ``args`` made absent (``sys.modules[name] = None``: an import raises ModuleNotFoundError and
    ``importlib.util.find_spec`` answers None, as when the package is not installed)."""
    prelude = f"import sys\nfor _n in {args!r}:\n    sys.modules[_n] = None\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-W", "ignore", "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.timeout(300)
def test_import_normkit_loads_no_heavy_dependency() -> None:
    # numpy is left importable here (torch imports it when present); the others must stay unloaded
    r = _run(f"""
        import json, sys
        import normkit
        print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))
    """)
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout.strip().splitlines()[-1]))
    assert loaded <= {"numpy"}, f"import normkit loaded {sorted(loaded)}"


@pytest.mark.timeout(300)
def test_layers_work_without_numpy_and_the_extras() -> None:
    r = _run("""
        import torch
        import normkit as nk
        x = torch.randn(4, 32, 3, 3, requires_grad=True)
        for name in ("bn", "ln", "gn", "rms_norm", "dbn", "iternorm", "kalman_norm"):
            m = nk.create(name, 32)
            m(x).square().sum().backward()
            m.eval()
            assert torch.isfinite(m(x)).all(), name
        conv = nk.weight.apply(torch.nn.Conv2d(32, 8, 3), "weight_norm")
        conv(x).sum().backward()
        print("ok")
    """, *HEAVY)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


@pytest.mark.timeout(300)
def test_cli_without_the_extra(tmp_path: Path) -> None:
    """``compare`` / ``list`` name the extra in one line and exit 2; ``bench`` and ``--version``
    need torch alone (one interpreter for all four: each start imports torch)."""
    out = tmp_path / "b.json"
    r = _run(f"""
        import contextlib, io, json
        from normkit.cli import main
        got = {{}}
        for argv in (["compare"], ["list"], ["--version"],
                     ["bench", "--shapes", "4x8x2x2", "--methods", "bn", "--repeats", "1",
                      "--no-compile", "--plain", "--threads", "1", "--json", {str(out)!r}]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(argv)
            got[argv[0]] = [rc, err.getvalue()]
        print(json.dumps(got))
    """, *HEAVY)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for command in ("compare", "list"):
        rc, err = got[command]
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"normkit {command} needs the compare extra: "
                              "pip install 'normkit[compare]'"), err
    assert got["--version"][0] == 0
    assert got["bench"][0] == 0, got["bench"][1]
    assert json.loads(out.read_text())["cells"]


@pytest.mark.timeout(300)
def test_version_and_python_m() -> None:
    import normkit

    r = subprocess.run([sys.executable, "-m", "normkit", "-V"], capture_output=True, text=True,
                       timeout=240, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["normkit", normkit.__version__]


def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]


def test_declared_dependencies_are_torch_alone() -> None:
    core, extras = _requirements()
    assert core == ["torch>=2.13"]
    from normkit.cli import COMPARE_EXTRA

    names = {r.split(">")[0].split("=")[0].replace("-", "_") for r in extras["compare"]}
    assert names == set(COMPARE_EXTRA)  # what the CLI checks is what the extra installs
    assert "normkit[compare]" in extras["test"]
    assert {"docs", "ray"} <= set(extras)
    build = (ROOT / "pyproject.toml").read_text()
    assert 'requires = ["setuptools>=77"]' in build  # license = "MIT" (PEP 639) needs 77


def test_installed_metadata_is_torch_alone() -> None:
    """An editable install of this checkout (CI's `pip install -e ".[test]"`) declares torch
    alone outside the extras; a different or stale install of normkit is not judged."""
    # every normkit metadata on sys.path: the installed dist-info, and the src/normkit.egg-info
    # an editable build leaves beside the sources (no direct_url.json), which may come first
    urls = {json.loads(d.read_text("direct_url.json") or "{}").get("url", "").rstrip("/"): d
            for d in metadata.distributions(name="normkit")}
    dist = urls.get(ROOT.as_uri())
    if dist is None:
        pytest.skip(f"no install of this checkout among the installed normkit ({sorted(urls)})")
    core = [r for r in dist.requires or [] if "extra ==" not in r]
    assert [r.replace(" ", "") for r in core] == ["torch>=2.13"], (
        f"installed metadata requires {core}: if pyproject.toml changed since this checkout was "
        f"installed, reinstall it (pip install -e .)")
