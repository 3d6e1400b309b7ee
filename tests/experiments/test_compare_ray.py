"""The Ray backend: a local Ray instance of 2 workers gives the same records as local processes.

Skipped only where Ray is not installed, unless ``NORMKIT_REQUIRE_RAY`` is set (as ``.ci/run``
does after installing the ``ray`` extra), which makes a missing Ray a failure.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest

import normkit  # noqa: F401  (registers the methods)
from normkit.experiments import sweep
from normkit.experiments.runner import CompareConfig

HAVE_RAY = importlib.util.find_spec("ray") is not None
pytestmark = pytest.mark.skipif(not HAVE_RAY and not os.environ.get("NORMKIT_REQUIRE_RAY"),
                                reason="ray not installed (pip install 'normkit[ray]')")
TIMING = ("wall_s", "time_per_step_ms")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray instance with 2 CPUs (no dashboard, localhost only), shut down afterwards."""
    assert HAVE_RAY, "NORMKIT_REQUIRE_RAY is set (CI): pip install 'normkit[ray]'"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.timeout(600)
def test_ray_backend_gives_the_records_of_the_local_backend(local_ray, tmp_path):
    cfg = CompareConfig(methods=["bn", "none"], dataset="gaussian", subset=96, batch_sizes=[16],
                        seeds=[0, 1], epochs=1, lrs=[0.03, 0.3], tune_seeds=None)
    local = sweep.run_sweep(cfg, tmp_path / "local", show_progress=False)
    remote = sweep.run_sweep(cfg, tmp_path / "ray", show_progress=False, backend="ray")

    def strip(records):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in records]

    assert len(remote) == 2 * 2 * 2 + 2 * 2
    assert strip(remote) == strip(local)
    # the driver appended every record to the same resumable store
    assert len((tmp_path / "ray" / "results.jsonl").read_text().splitlines()) == 12
    again = sweep.run_sweep(cfg, tmp_path / "ray", show_progress=False, backend="ray")
    assert strip(again) == strip(local)
