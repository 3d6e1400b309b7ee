"""Local normalization (LRN, LCN, divisive normalization) compiled by inductor: the window sums
take their compiled form there (:mod:`normkit.functional.shifted`: shifted windows of a
zero-padded copy, which inductor fuses with the work around them) in the forward statistics and
in the Function's backward; the composition (``native=False``) records the ``box_sum`` custom
op. Under ``torch.compile(fullgraph=True)`` the output and every gradient must equal eager's in
float64 — default windows (clipped at the borders of a small input, where the count of each
window varies) and other sizes; and the compiled form of the window sum must be the eager sum,
its gradient the flipped sum. Inductor compiles C++: few, tiny cases."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import gradcheck
from torch.testing import assert_close

import normkit as nk
from generic_util import assert_same_step
from normkit.functional import statistics as S
from normkit.functional.shifted import inlinable, shifted_moment_sums, shifted_sum

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-10)


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


# name -> (method, constructor arguments, input shape, input scale): LRN's window along the
# channels (zeros outside), LCN's and divisive normalization's spatial windows clipped at the
# borders of a 5 x 6 image (LCN's 7 x 7 and the 3 x 5 x 3 window: one padded copy per axis; the
# 3 x 3 default: both axes at once)
CASES: dict[str, tuple[str, dict[str, Any], tuple[int, ...], float]] = {
    "lrn_default": ("lrn", {}, (2, 7, 3, 4), 30.0),  # α = 1e-4: x large enough to matter
    "lrn_size4": ("lrn", {"size": 4, "alpha": 0.5, "beta": 0.6, "k": 2.0}, (2, 6, 3, 4), 1.0),
    # the saved root q of s^(−β) for β = ½ and 1 (the default ¾ above): powers by products
    "lrn_beta_half": ("lrn", {"size": 3, "alpha": 0.5, "beta": 0.5, "k": 1.5}, (2, 5, 3, 4), 1.0),
    "lrn_beta_one": ("lrn", {"size": 6, "alpha": 0.3, "beta": 1.0, "k": 1.0}, (2, 5, 3, 4), 1.0),
    "lcn_default": ("lcn", {}, (2, 4, 5, 6), 1.0),
    "lcn_groups": ("lcn", {"num_groups": 2, "window": (3, 5)}, (2, 4, 5, 6), 1.0),
    "divisive_default": ("divisive_norm", {}, (2, 3, 5, 6), 1.0),
    "divisive_3x5x3": ("divisive_norm", {"window": (5, 3), "channel_window": 3},
                       (2, 4, 5, 6), 1.0),
    "divisive_composition": ("divisive_norm", {"native": False}, (2, 3, 5, 6), 1.0),
}


@pytest.mark.filterwarnings(  # inductor imports torch's own deprecated jit.script_method
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_inductor_equals_eager(case: str, dynamo_reset: None) -> None:
    method, kwargs, shape, scale = CASES[case]
    eager = nk.create(method, shape[1], dtype=F64, **kwargs).train()
    with torch.no_grad():  # parameters away from γ = 1, β = 0
        for i, p in enumerate(eager.parameters()):
            p.add_(0.5 * rand(*p.shape, seed=20 + i))
    target = nk.create(method, shape[1], dtype=F64, **kwargs).train()
    target.load_state_dict(eager.state_dict())
    compiled = torch.compile(target, fullgraph=True)
    x = rand(*shape, seed=1, scale=scale) + 0.5
    assert_same_step(eager, compiled, x, seed=2, **TIGHT)


@pytest.mark.parametrize(("dims", "windows"), [((2,), (4,)), ((2, 3), (3, 3)),
                                               ((1, 2, 3), (3, 5, 2)), ((3,), (9,)), ((2,), (1,))])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("copy", [True, False])
def test_shifted_sum_is_box_sum(dims: tuple[int, ...], windows: tuple[int, ...],
                                flip: bool, copy: bool) -> None:
    """The compiled form (run eagerly) equals the eager window sum — windows longer than the
    axis, one axis and several, at once and axis by axis, from a padded copy or from slices of
    the padding; the sums of ``x`` and ``x²`` from one padded copy — and autograd through its
    windows gives the flipped sum."""
    x = rand(2, 3, 4, 5, seed=3)
    want = S.box_sum(x, dims, windows, flip=flip)
    assert_close(shifted_sum(x, dims, windows, flip, copy), want, **TIGHT)
    if not flip:  # both moments' sums from one padded copy
        s1, s2 = shifted_moment_sums(x, dims, windows)
        assert_close(s1, want, **TIGHT)
        assert_close(s2, S.box_sum(x * x, dims, windows), **TIGHT)
    xg = x.clone().requires_grad_()
    y = shifted_sum(xg, dims, windows, flip, copy)
    assert_close(y, want, **TIGHT)
    g = rand(2, 3, 4, 5, seed=4)
    (gx,) = torch.autograd.grad(y, xg, g)
    assert_close(gx, S.box_sum(g, dims, windows, flip=not flip), **TIGHT)
    assert gradcheck(lambda t: shifted_sum(t, dims, windows, flip, copy),
                     (rand(1, 2, 3, 4, seed=5).requires_grad_(),))


def test_inlinable_leaves_the_innermost_axis() -> None:
    """Windows are summed inline only off the innermost axis and off the axis contiguous in
    memory (one mask per vector); unit windows and windows over an axis of length 1 do not
    count."""
    x = torch.zeros(2, 1, 8, 3, 4)
    assert inlinable(x, (2, 3, 4), (5, 1, 1))  # LRN's channel window
    assert not inlinable(x, (3, 4), (3, 3))  # a spatial window
    assert inlinable(torch.zeros(2, 1, 8, 3, 1), (2, 4), (3, 3))  # the last axis: one value
    cl = torch.zeros(2, 8, 3, 4).to(memory_format=torch.channels_last).unsqueeze(1)
    assert not inlinable(cl, (2,), (5,))  # channels-last: the channels are contiguous
