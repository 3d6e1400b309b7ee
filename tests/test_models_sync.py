"""The sync column of the model table: ``nk.sync`` on whole models in 2 gloo processes (CPU,
``file://`` rendezvous, a hard deadline: tests/test_distributed.py's ``_run_ranks``).

Each rank trains the synced model in DDP on its half of one global batch; one process trains the
unsynced model on the whole batch. Batch-dependent statistics and DDP's gradient average make
the two the same computation: outputs, parameters and running statistics agree step by step
(float64, 1e-9: the same sums in a different order), and the loss falls.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import models_table as mt
import normkit as nk
from models_util import import_or_fail
from test_distributed import _process_group, _run_ranks  # deadline, safe gloo teardown

WORLD, STEPS, TOL = 2, 3, 1e-9
ROWS = [  # (family, convert spec or None): torch BN → synced normkit BN; whitening; norm+act
    ("tv_resnet18", "dbn:group_size=8"),
    ("timm_regnetx_002", None),
]


def _model(family: str, spec: str | None) -> nn.Module:
    """float64: the synced and the one-process runs sum in different orders, and whitening's
    eigendecompositions through 20 layers amplify float32's rounding to ~1e-4."""
    model = mt.base(family).train().double()
    return model if spec is None else nk.convert(model, to=spec)


def _batch(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = mt.batch(mt.FAMILIES[family], seed=3)
    return x.double(), y


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec: dict[str, Any] = {"out": [], "loss": []}
    for _ in range(STEPS):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec["out"].append(out.detach())
        rec["loss"].append(loss.item())
    inner = getattr(model, "module", model)
    # in module order (a norm+act layer's norm.weight is where the BatchNormAct2d's weight was)
    rec["state"] = [t.detach().clone() for t in (*inner.parameters(), *inner.buffers())
                    if t.is_floating_point()]
    return rec


def _worker(rank: int, world: int, init: str, out: str, family: str, spec: str | None,
            start: str) -> None:
    with _process_group(rank, world, init):
        x, y = _batch(family)
        n = x.shape[0] // world
        model = _model(family, spec)
        # the parent's initial weights: a model's random initialization depends on the process's
        # thread pool (OMP_NUM_THREADS), so two processes with one seed need not agree
        model.load_state_dict(torch.load(start, weights_only=True))
        synced = nk.sync(model)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in synced.modules())
        model = nn.parallel.DistributedDataParallel(synced)
        rec = _run(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
        rec["acts"] = mt.act_count(synced)
        torch.save(rec, f"{out}.{rank}")
        del model, synced  # they hold the group: gone before _process_group tears it down


@pytest.mark.parametrize(("family", "spec"), ROWS, ids=[r[0] for r in ROWS])
def test_sync_two_processes_equal_one_on_the_whole_batch(family: str, spec: str | None,
                                                         tmp_path: Any) -> None:
    import_or_fail(mt.FAMILIES[family].requires)
    ref_model = _model(family, spec)
    start = str(tmp_path / "start.pt")
    torch.save(ref_model.state_dict(), start)
    ranks = _run_ranks(_worker, WORLD, tmp_path, family, spec, start)
    x, y = _batch(family)
    ref = _run(ref_model, x, y)
    for r in ranks:
        assert r["acts"] == mt.act_count(ref_model)  # sync kept every activation
    for step in range(STEPS):
        out = torch.cat([r["out"][step] for r in ranks])
        assert mt.rel_diff(out, ref["out"][step]) <= TOL, step
    for r in ranks:
        assert len(r["state"]) == len(ref["state"])
        for i, (a, b) in enumerate(zip(r["state"], ref["state"], strict=True)):
            assert a.shape == b.shape and mt.rel_diff(a, b) <= TOL, (i, mt.rel_diff(a, b))
    losses = [sum(r["loss"][s] for r in ranks) / WORLD for s in range(STEPS)]
    assert losses[-1] < losses[0], losses
