"""Synchronized statistics across processes (gloo on CPU, ``file://`` rendezvous).

Each test starts ``world`` processes; each trains the method wrapped in DDP on its slice of the
same global batches (equal, unequal, one-sample and empty slices) and saves what it saw. The
parent trains one process on the whole batches and compares: outputs, input gradients,
parameters after every SGD step, running statistics — float64, 1e-9 (the same sums merged in a
different order: ~1e-15 relative per step, far below). A hung collective fails the test at its
timeout instead of hanging the suite.

Nothing here initializes a process group in the pytest process: every test that communicates runs
its ranks in spawned processes (:func:`_spawn`, killed at a deadline), and every rank tears down in
one safe order (:func:`_process_group`) — a gloo group whose last reference is dropped by a destructor
that holds the GIL (DDP's reducer, a module's ``process_group``) can deadlock against gloo's own
threads, or abort at interpreter exit.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normkit as nk

C, STEPS, TIMEOUT_S = 4, 3, 120
METHODS = {
    "bn": {},
    "batch_group_norm": {"num_groups": 2},
    "iternorm": {"group_size": 2, "iterations": 5},
    "dbn": {"group_size": 4},
    "batch_renorm": {"warmup_steps": 0, "r_max_steps": 2, "d_max_steps": 2},
    "switchable_norm": {},
    "bin": {},
}
SPLITS = {  # rows per rank of a global batch
    "equal_2": [6, 6],
    "unequal_3": [2, 3, 4],  # rank + 2
    "one_sample_2": [1, 7],
    "empty_rank_3": [5, 0, 4],
}


def _module(method: str) -> nn.Module:
    torch.manual_seed(0)
    m = nk.create(method, C, dtype=torch.float64, **METHODS[method])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    return m


def _batches(total: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(total, C, 5, generator=g, dtype=torch.float64) * 2 + 1
        out.append((x, torch.randn(total, C, 5, generator=g, dtype=torch.float64)))
    return out


def _train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], total: int,
           scale: float, opt: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """SGD on ``Σ y·target / total`` (times ``scale``: DDP averages over ``world`` ranks)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if opt is None else opt
    record: dict[str, Any] = {"y": [], "grad": [], "params": []}
    for x, target in batches:
        x = x.clone().requires_grad_()
        y = model(x)
        loss = (y * target).sum() * (scale / total)
        opt.zero_grad()
        loss.backward()
        opt.step()
        record["y"].append(y.detach())
        record["grad"].append(x.grad.detach())
        record["params"].append([p.detach().clone() for p in model.parameters()])
    record["buffers"] = {k.removeprefix("module."): v.clone()  # DDP's prefix
                         for k, v in model.state_dict().items() if "running" in k}
    return record


@contextlib.contextmanager
def _process_group(rank: int, world: int, init: str) -> Iterator[None]:
    """One rank's gloo group, torn down in a safe order. Inside the block, ``del`` every DDP
    wrapper and synchronized module before it ends: they hold the group (DDP's reducer, each
    module's ``process_group``), and a group whose last reference goes in their destructor,
    under the GIL, can deadlock against gloo's threads or abort at exit. On leaving, collect any
    cycle still holding one, wait until every rank is here (no rank leaves gloo while another is
    in a collective), then destroy the group. On an error: destroy at once (no barrier a peer may
    never reach) and re-raise, so the parent reports the traceback."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank: int, world: int, init: str, out: str, method: str, sizes: list[int]) -> None:
    with _process_group(rank, world, init):
        total = sum(sizes)
        lo = sum(sizes[:rank])
        batches = [(x[lo: lo + sizes[rank]], t[lo: lo + sizes[rank]]) for x, t in _batches(total)]
        model = nn.parallel.DistributedDataParallel(nk.sync(_module(method)))
        torch.save(_train(model, batches, total, scale=world), f"{out}.{rank}")
        del model


def _resume_worker(rank: int, world: int, init: str, out: str, method: str,
                   sizes: list[int]) -> None:
    """Train STEPS steps straight, and again with a save after STEPS − 1 steps and a reload into
    fresh modules (model, optimizer) for the last one; record both last steps."""
    with _process_group(rank, world, init):
        total, lo = sum(sizes), sum(sizes[:rank])
        batches = [(x[lo: lo + sizes[rank]], t[lo: lo + sizes[rank]]) for x, t in _batches(total)]
        straight = nn.parallel.DistributedDataParallel(nk.sync(_module(method)))
        a = _train(straight, batches, total, scale=world)
        first = nn.parallel.DistributedDataParallel(nk.sync(_module(method)))
        opt = torch.optim.SGD(first.parameters(), lr=0.1)
        _train(first, batches[:-1], total, scale=world, opt=opt)
        path = f"{out}.ckpt{rank}"
        torch.save({"model": first.module.state_dict(), "opt": opt.state_dict()}, path)
        ckpt = torch.load(path, weights_only=True)
        resumed = nk.sync(_module(method))
        resumed.load_state_dict(ckpt["model"])
        resumed = nn.parallel.DistributedDataParallel(resumed)
        opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1)
        opt2.load_state_dict(ckpt["opt"])
        b = _train(resumed, batches[-1:], total, scale=world, opt=opt2)
        torch.save({"straight": a, "resumed": b}, f"{out}.{rank}")
        del straight, first, resumed


def _run_ranks(worker: Any, world: int, tmp_path: Any, *args: Any) -> list[Any]:
    """Run ``worker(rank, world, init, out, *args)`` in ``world`` spawned processes and return what
    each rank saved to ``f"{out}.{rank}"``. A rank that raises or dies by a signal fails the test
    with its traceback or signal; ranks still running at the deadline are killed and the test
    fails (a collective or a teardown hung) — the pytest process never joins a group itself."""
    init = f"file://{tmp_path}/rendezvous"
    out = str(tmp_path / "result")
    ctx = mp.start_processes(worker, args=(world, init, out, *args), nprocs=world,
                             join=False, start_method="forkserver")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                pytest.fail(f"ranks {alive} of {world} still running after {TIMEOUT_S} s "
                            f"({worker.__name__}): a collective or the teardown hung; killed")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(10)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]


def _spawn(world: int, tmp_path: Any, method: str, sizes: list[int],
           worker: Any = _worker) -> list[dict[str, Any]]:
    return _run_ranks(worker, world, tmp_path, method, sizes)


# Ranks start from a fork server that has imported torch, normkit and this module once (and run
# no torch op, so no thread pool exists to fork): a fresh process per rank, as with "spawn", but
# without re-importing torch for each — most of these tests' time otherwise.
multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "normkit", __name__])

PAIRS = [(m, s) for m in METHODS for s in SPLITS
         if m in ("bn", "batch_group_norm", "iternorm", "dbn") or s in ("unequal_3", "empty_rank_3")]


@pytest.mark.parametrize(("method", "split"), PAIRS)
def test_ddp_on_slices_equals_one_process_on_the_batch(method, split, tmp_path):
    sizes = SPLITS[split]
    ranks = _spawn(len(sizes), tmp_path, method, sizes)
    total = sum(sizes)
    ref = _train(_module(method), _batches(total), total, scale=1.0)
    tol = {"rtol": 1e-9, "atol": 1e-9}
    for step in range(STEPS):
        y = torch.cat([r["y"][step] for r in ranks])
        # every rank's input gradient is that of Σ_r loss_r = world · (the averaged loss DDP
        # differentiates the parameters by), as with torch's SyncBatchNorm
        g = torch.cat([r["grad"][step] for r in ranks]) / len(sizes)
        torch.testing.assert_close(y, ref["y"][step], **tol, msg=f"output, step {step}")
        torch.testing.assert_close(g, ref["grad"][step], **tol, msg=f"input grad, step {step}")
        for r in ranks:
            for a, b in zip(r["params"][step], ref["params"][step], strict=True):
                torch.testing.assert_close(a, b, **tol, msg=f"parameters, step {step}")
    for r in ranks:
        assert set(r["buffers"]) == set(ref["buffers"])
        for k, v in ref["buffers"].items():
            torch.testing.assert_close(r["buffers"][k], v, **tol, msg=k)


@pytest.mark.parametrize("method", ["bn", "iternorm"])
def test_save_and_reload_mid_run_continues_identically(method, tmp_path):
    for r in _spawn(2, tmp_path, method, [3, 5], worker=_resume_worker):
        torch.testing.assert_close(r["resumed"]["y"][0], r["straight"]["y"][-1], rtol=0, atol=0)
        for a, b in zip(r["resumed"]["params"][0], r["straight"]["params"][-1], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for k, v in r["straight"]["buffers"].items():
            torch.testing.assert_close(r["resumed"]["buffers"][k], v, rtol=0, atol=0, msg=k)


def test_sync_converts_torch_batchnorm_keeping_state_and_refuses_what_it_cannot():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(0.5)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), bn, nk.GroupNorm(3, num_groups=1))
    group = object()  # a stand-in: conversion records the group, no collective runs here
    nk.sync(model, group)
    assert isinstance(model[1], nk.BatchNorm) and model[1].process_group is group
    assert torch.equal(model[1].running_mean, torch.full((3,), 0.5))
    assert model[2].process_group is None  # per-sample: nothing to synchronize
    with pytest.raises(nk.ConfigError, match="cannot be synchronized"):
        nk.sync(nn.Sequential(nk.create("range_bn", 3)), group)
    with pytest.raises(nk.ConfigError, match="nothing to synchronize"):
        nk.Normalization(3, nap=nk.nap.Layer(), process_group=group)


def test_eval_makes_no_collective_call():
    m = nk.create("bn", 3, process_group=object())  # any collective would fail: no group exists
    m.eval()
    y = m(torch.randn(4, 3, 2))
    assert y.shape == (4, 3, 2)


def _world_of_one_worker(rank: int, world: int, init: str, out: str) -> None:
    """The checks of :func:`test_world_of_one_gradcheck_and_equals_local`, in a group of one."""
    from normkit.distributed import _AllReduceSum, synced_covariance, synced_moments
    from normkit.functional import statistics as S
    from normkit.functional import whiten as W

    with _process_group(rank, world, init):
        x = torch.randn(5, 2, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: _AllReduceSum.apply(t, None), (x,))
        assert torch.autograd.gradcheck(lambda t: synced_moments(t, (0, 3)), (x,))
        for a, b in zip(synced_moments(x, (0, 3)), S.moments(x, (0, 3)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda t: synced_covariance(t)[1], (x,))
        for a, b in zip(synced_covariance(x), W.batch_moments(x, shared=True), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        bn = nk.sync(nk.create("bn", 3, dtype=torch.float64))
        with nk.distributed.count_communication() as c:
            bn(torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)).sum().backward()
        torch.save(dict(c), f"{out}.{rank}")
        del bn  # its process_group is the group


def test_world_of_one_gradcheck_and_equals_local(tmp_path):
    """The custom all-reduce Function and the merged moments, gradchecked in a world of one
    (where they must equal the local statistics)."""
    (counts,) = _run_ranks(_world_of_one_worker, 1, tmp_path)
    # communication per step of a synchronized BN over C channels: forward (count, sum) and
    # M2 — 3C values — and the same again in the backward; float64: 2·3C·8 bytes, 4 calls
    assert counts == {"calls": 4, "bytes": 2 * 3 * 3 * 8}
