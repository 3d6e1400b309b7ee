"""``examples/slimming.py --quick``: trains with the γ-L1 hook, slims, fine-tunes and prints the
table; the slimmed rows have fewer parameters and FLOPs than the full model."""

from __future__ import annotations

import torch

from examples_util import load_example


def test_quick_run() -> None:
    module = load_example("slimming")
    threads = torch.get_num_threads()
    out = module.main(["--quick"])
    assert torch.get_num_threads() == threads  # restored
    rows = out["mnist1d"]
    assert [r["model"] for r in rows] == ["s=0.01 full", "s=0.01 slim 0.5", "s=0 full",
                                          "s=0 slim 0.5"]
    full, small = rows[0], rows[1]
    assert small["params"] < full["params"] and small["mflops"] < full["mflops"]
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("acc", "pruned", "tuned"))
    assert all(r["latency_ms"] > 0 for r in rows)
