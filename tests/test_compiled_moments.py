"""The compiled moments of standardization over several axes (Batch, Group, Layer): under
``torch.compile`` :class:`normkit.nop.Standardize` fits them through the moments Function
(:func:`normkit.functional.fused_robust.moments`), whose compiled forward is one ``var_mean``
per row of positions, pooled over the rows. Compiled (fullgraph) training steps match eager in
float64: outputs, gradients of the input and every parameter, running estimates."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.testing import assert_close

import normkit as nk
from generic_util import assert_same_step
from normkit.functional.fused_robust import moments, moments_plain

_INDUCTOR = pytest.mark.filterwarnings(  # torch's own: inductor imports torch.utils.mkldnn
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")


@pytest.mark.parametrize("dims", [(2, 3), (1, 2, 3), (0, 3)], ids=["group", "layer", "batch"])
def test_compiled_moments_match_eager(dims: tuple[int, ...]) -> None:
    """The pooled-rows form (compiled) against the eager two-pass form: values with a large
    offset (no cancellation) and the one-pass backward."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64) * 3 + 1e4

    def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return moments(x, dims)

    torch._dynamo.reset()
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    mc, vc = torch.compile(f, backend="aot_eager", fullgraph=True)(xc)
    me, ve = moments_plain(xe, dims)
    assert_close(mc, me)
    assert_close(vc, ve)
    ga, gb = (torch.randn(me.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    assert_close(torch.autograd.grad((mc, vc), xc, (ga, gb))[0],
                 torch.autograd.grad((me, ve), xe, (ga, gb))[0])
    torch._dynamo.reset()


# case -> (method, constructor arguments, the condition of a batch of 3 where one is needed,
# backend: inductor for two cases, AOTAutograd's partitioner without code generation otherwise)
_CASES: dict[str, tuple[str, dict[str, Any], Any, str]] = {
    "dynamic_ln": ("dynamic_ln", {}, None, "inductor"),
    "dynamic_ln_tracked": ("dynamic_ln", {"track_running_stats": True}, None,
                           "aot_eager_decomp_partition"),
    "ilm": ("ilm", {"num_groups": 2}, None, "aot_eager_decomp_partition"),
    "cbn": ("cbn", {"num_classes": 3}, torch.tensor([2, 0, 2]), "inductor"),  # tracked
}


@_INDUCTOR
@pytest.mark.parametrize("case", list(_CASES))
def test_compiled_conditional_standardization_matches_eager(case: str) -> None:
    method, kwargs, cond, backend = _CASES[case]
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    m = nk.create(method, 4, **kwargs).double()
    with torch.no_grad():  # γ, β depend on the input: the predictors away from their zero init
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + p)
    c = copy.deepcopy(m)
    compiled = torch.compile(c, backend=backend, fullgraph=True)
    for step in range(2):
        x = torch.randn(3, 4, 3, 2, generator=gen, dtype=torch.float64) * 2 + 1
        assert_same_step(m, compiled, x, seed=step, cond=cond)
    torch._dynamo.reset()
