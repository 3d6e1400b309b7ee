"""LARS / LAMB parity with timm's ``Lars`` / ``Lamb``: with the same hyper-parameters (timm's option
names), normkit's optimizers follow the same parameter trajectory.

timm has no ``exclude_1d`` rule, so normkit runs with ``exclude_1d=False``; everything else is the
option itself. float64, a small model and a few steps: both libraries compute the same formulas in
a different operation order (timm divides ``√v`` and ``m`` by the corrections separately, uses
foreach kernels), so they agree to float64 round-off amplified by a few steps (1e-10 relative);
a wrong option (a missing dampening, Nesterov term, clip or decay order) moves parameters by far
more (> 1e-9; global gradient clipping moves LAMB least, ~1e-7, as its trust ratio undoes most of
a gradient rescaling), which each case checks by running without the option too.
"""

from __future__ import annotations

import pytest
import torch

import normkit.gradient as G

timm_optim = pytest.importorskip("timm.optim")

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def _net(scale: float = 1.0) -> torch.nn.Module:
    """``scale`` > 1 makes ``‖w‖`` exceed LAMB's ``‖r‖ ≈ √numel``, so LAMBC's cap bites."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def _trajectory(net: torch.nn.Module, opt: torch.optim.Optimizer,
                steps: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        (net(x) - y).square().sum().backward()
        opt.step()
        out.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    return out


def _groups(net: torch.nn.Module, split: bool, wd: float) -> list[dict]:
    if not split:
        return [{"params": list(net.parameters())}]
    ps = list(net.parameters())  # timm's usual recipe: no decay on biases
    return [{"params": [p for p in ps if p.dim() > 1]},
            {"params": [p for p in ps if p.dim() <= 1], "weight_decay": 0.0}]


LARS_CASES = {  # timm option names; trust_coeff is normkit's trust_coefficient
    "timm_defaults_decay": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "nesterov_always": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                            always_adapt=True),
    "dampening_larc": dict(lr=0.05, momentum=0.8, dampening=0.3, trust_clip=True,
                           weight_decay=1e-2, trust_coeff=0.2),
    "larc_no_momentum": dict(lr=0.02, momentum=0.0, trust_clip=True, always_adapt=True,
                             trust_coeff=0.5),
    "no_decay_split": dict(lr=0.1, momentum=0.9, weight_decay=5e-3, split=True),
}


def _run_lars(options: dict, lib: str) -> list[torch.Tensor]:
    kw = dict(options)
    split = kw.pop("split", False)
    net = _net(kw.pop("scale", 1.0))
    groups = _groups(net, split, kw.get("weight_decay", 0.0))
    if lib == "timm":
        return _trajectory(net, timm_optim.Lars(groups, **kw))
    kw["trust_coefficient"] = kw.pop("trust_coeff", 0.001)
    kw.setdefault("momentum", 0.0)
    kw.setdefault("always_adapt", False)  # timm's default
    return _trajectory(net, G.LARS(groups, exclude_1d=False, **kw))


@pytest.mark.parametrize("case", list(LARS_CASES))
def test_lars_matches_timm(case: str) -> None:
    ours, theirs = _run_lars(LARS_CASES[case], "normkit"), _run_lars(LARS_CASES[case], "timm")
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    # the case's distinguishing option matters: dropping it changes the trajectory
    key = next(k for k in ("trust_clip", "nesterov", "dampening", "always_adapt", "split",
                           "weight_decay") if k in LARS_CASES[case])
    other = {k: v for k, v in LARS_CASES[case].items() if k != key}
    assert (_run_lars(other, "normkit")[-1] - ours[-1]).abs().max() > 1e-9


LAMB_CASES = {  # timm option names
    "timm_defaults": dict(weight_decay=0.01, max_grad_norm=1.0),
    "no_corrections": dict(lr=0.01, bias_correction=False, grad_averaging=False,
                           max_grad_norm=None, always_adapt=True),
    "decoupled_lambc": dict(lr=0.02, weight_decay=0.1, decoupled_decay=True, trust_clip=True,
                            max_grad_norm=0.5),
    "lambc_always": dict(lr=0.01, weight_decay=0.01, trust_clip=True, always_adapt=True,
                         max_grad_norm=None, scale=8.0),
    "grad_clip_split": dict(lr=0.01, weight_decay=0.05, max_grad_norm=0.3, split=True),
}


def _run_lamb(options: dict, lib: str) -> list[torch.Tensor]:
    kw = dict(options)
    split = kw.pop("split", False)
    net = _net(kw.pop("scale", 1.0))
    groups = _groups(net, split, kw.get("weight_decay", 0.0))
    if lib == "timm":
        return _trajectory(net, timm_optim.Lamb(groups, **kw))
    for name, timm_default in (("weight_decay", 0.01), ("max_grad_norm", 1.0),
                               ("always_adapt", False)):
        kw.setdefault(name, timm_default)
    return _trajectory(net, G.LAMB(groups, exclude_1d=False, **kw))


@pytest.mark.parametrize("case", list(LAMB_CASES))
def test_lamb_matches_timm(case: str) -> None:
    ours, theirs = _run_lamb(LAMB_CASES[case], "normkit"), _run_lamb(LAMB_CASES[case], "timm")
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    key = next(k for k in ("decoupled_decay", "trust_clip", "bias_correction", "split",
                           "max_grad_norm") if k in LAMB_CASES[case])
    other = {k: v for k, v in LAMB_CASES[case].items() if k != key}
    if key == "max_grad_norm":
        other[key] = None  # (dropping it would restore timm's default 1.0)
    assert (_run_lamb(other, "normkit")[-1] - ours[-1]).abs().max() > 1e-9
