"""The README's Python examples run as written (so the first page never drifts from the code).

A block that starts a ``torch.distributed`` process group runs in a fresh ``python`` process with
a deadline, never in the pytest process: a group torn down in the wrong order can hang gloo's
threads or abort the interpreter at exit, and either must fail this test, not stall the suite.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
SUBPROCESS_TIMEOUT_S = 120


def test_readme_has_python_examples():
    assert BLOCKS, "README.md should show at least one Python example"


def _run_in_fresh_python(code: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:  # on timeout, subprocess.run kills the child before raising
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(f"README block did not finish in {SUBPROCESS_TIMEOUT_S} s (killed): a "
                    f"collective or the process-group teardown hung\nstderr:\n{err or ''}")
    assert done.returncode == 0, (f"README block exited with {done.returncode} (negative: killed "
                                  f"by that signal)\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code):
    if "init_process_group" in code:
        _run_in_fresh_python(code)
    else:
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
