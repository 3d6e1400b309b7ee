"""The combination family's kernel paths and fused Function (``normkit.functional.
fused_combination``) against their plain compositions (``native=False``).

Batch-channel normalization trains through torch's BN kernel and GN kernel by default: output,
every gradient and the running estimates must equal the plain composition's (float64, tight),
gradcheck and gradgradcheck must pass through the module, and a synchronized partition (whose
moments the kernel could not merge) or a per-sample recovery must still give the composition.
Standardization with a per-sample affine (IEBN, attentive normalization, ILM) runs one Function
with a hand-derived backward on ``fit``'s own moments: the same checks, and the composition
wherever a caller replaced those moments. The switchable and batch-instance mixtures run their
instance moments and their per-sample affine as one Function each: equal to the composition.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk
from normkit.functional.fused_combination import (
    batch_standardize,
    group_standardize,
    row_affine,
    row_moments,
    standardize_affine,
    standardize_affine_plain,
)
from normkit.nap import Batch

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


def rand(*shape: int, seed: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale
    return t.requires_grad_(grad)


def _randomized(m: torch.nn.Module, seed: int) -> torch.nn.Module:
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(rand(*p.shape, seed=seed + i, grad=False) * 0.5 + (1.0 if p.dim() else 0.0))
    return m


def _pair(**kw: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    fused = _randomized(nk.create("bcn", 6, dtype=F64, **kw), 10)
    plain = nk.create("bcn", 6, dtype=F64, native=False, **kw)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _nodes(y: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``y`` depends on."""
    seen, todo = {}, [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and id(fn) not in seen:
            seen[id(fn)] = type(fn).__name__
            todo.extend(f for f, _ in fn.next_functions)
    return set(seen.values())


def _assert_steps_equal(fused: torch.nn.Module, plain: torch.nn.Module, x: torch.Tensor,
                        seed: int, present: tuple[str, ...]) -> None:
    """Two training steps: the fused module's graph holds the ``present`` nodes and the
    composition's holds none of them; outputs, the input's and every parameter's gradient are the
    composition's; then every buffer is."""
    for step in range(2):
        y, ref = fused(x), plain(x)
        assert set(present) <= _nodes(y) and not set(present) & _nodes(ref)
        assert_close(y, ref, **TIGHT)
        cot = rand(*y.shape, seed=seed + step, grad=False)
        grads = torch.autograd.grad(y, [x, *fused.parameters()], cot)
        refs = torch.autograd.grad(ref, [x, *plain.parameters()], cot)
        for a, b in zip(grads, refs, strict=True):
            assert_close(a, b, **TIGHT)
    for name, buf in fused.named_buffers():
        assert_close(buf, dict(plain.named_buffers())[name], **TIGHT)


@pytest.mark.parametrize("kw", [{"num_groups": 2}, {"group_size": 1}, {"num_groups": 1},
                                {"num_groups": 3, "bn_affine": False},
                                {"num_groups": 2, "affine": False}],
                         ids=["g2", "in", "ln", "no_bn_affine", "no_affine"])
def test_bcn_kernels_equal_the_composition(kw: dict[str, Any]) -> None:
    fused, plain = _pair(**kw)
    assert fused.nop.fused and not plain.nop.fused
    x = (rand(5, 6, 3, 4, seed=0) * 2 + 1).detach().requires_grad_()
    # the running estimates after two updates, then evaluation
    _assert_steps_equal(fused, plain, x, 20, ("NativeBatchNormBackward0",))
    fused.eval(), plain.eval()
    assert_close(fused(x), plain(x), **TIGHT)


def test_bcn_gradcheck_and_second_derivatives() -> None:
    m = _randomized(nk.create("bcn", 4, num_groups=2, dtype=F64), 3)
    x = rand(3, 4, 2, 3, seed=1)
    params = tuple(m.parameters())

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(m, dict(zip(dict(m.named_parameters()), ps,
                                                       strict=True)), (x,))

    assert gradcheck(f, (x, *params))
    assert gradgradcheck(f, (x, *params))


def test_bcn_channels_last_and_half_input() -> None:
    fused, plain = _pair(num_groups=2, channel_axis=-1)
    x = rand(4, 3, 3, 6, seed=2)
    assert_close(fused(x), plain(x), **TIGHT)
    f32 = nk.create("bcn", 6, num_groups=2)
    x16 = torch.randn(4, 6, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    y = f32(x16)
    assert y.dtype == torch.bfloat16
    ref = nk.create("bcn", 6, num_groups=2, native=False)(x16)
    assert_close(y, ref)
    (g,) = torch.autograd.grad(y.float().sum(), x16)
    assert g.dtype == torch.bfloat16


def test_bcn_per_sample_recovery_and_synced_partition_use_the_composition() -> None:
    """Kernels take γ, β per channel: a per-sample recovery is applied after GN's kernel; a
    partition merging moments over ranks never reaches BN's kernel (``type(nap) is Batch``)."""
    op = nk.nop.BatchChannelStandardize(num_groups=2)
    v = rand(4, 6, 1, 5, seed=3)
    stats = op.fit(v, Batch(), (5,), eps=1e-5)
    w, b = rand(4, 6, 1, 1, seed=4), rand(4, 6, 1, 1, seed=5)
    y = op.transform(v, stats, nap=Batch(), eps=1e-5, m=20, weight=w, bias=b)
    plain = op.unfused()
    ps = plain.fit(v, Batch(), (5,), eps=1e-5)
    assert "batch_h" in stats and "batch_h" not in ps
    assert_close(y, plain.transform(v, ps, nap=Batch(), eps=1e-5, m=20, weight=w, bias=b),
                 **TIGHT)
    for k in ("mean", "var"):
        assert_close(stats[k], ps[k], **TIGHT)


def test_batch_and_group_standardize_against_formulas() -> None:
    x = rand(4, 3, 1, 5, seed=6, scale=3.0)
    w, b = rand(1, 3, 1, 1, seed=7), rand(1, 3, 1, 1, seed=8)
    h, mean, var = batch_standardize(x, w, b, 1e-5)
    assert_close(mean, x.mean((0, 3), keepdim=True), **TIGHT)
    assert_close(var, x.var((0, 3), correction=0, keepdim=True), **TIGHT)
    assert_close(h, (x - mean) / (var + 1e-5).sqrt() * w + b, **TIGHT)
    assert not mean.requires_grad and not var.requires_grad
    y = group_standardize(h, 3, w, b, 1e-5)
    assert_close(y, torch.nn.functional.instance_norm(h.reshape(4, 3, 5), weight=w.reshape(3),
                                                      bias=b.reshape(3)).reshape(h.shape),
                 **TIGHT)


# ------------------------------------------------------- standardization, per-sample affine
def _sa_args(dims: tuple[int, ...], shape: tuple[int, ...], affine: str) -> list[Any]:
    n, a, b = shape[0], shape[1], shape[2]
    lead = n if affine == "sample" else 1
    x = (rand(*shape, seed=0) * 2 + 0.5).detach().requires_grad_()
    w = rand(lead, a, b, 1, seed=1) if affine != "none" else None
    bias = rand(lead, a, b, 1, seed=2) if affine != "none" else None
    return [x, w, bias]


SA_CASES = {
    "batch_per_sample": ((0, 3), (4, 3, 1, 5), "sample"),
    "batch_per_channel": ((0, 3), (4, 3, 1, 5), "channel"),
    "batch_no_affine": ((0, 3), (4, 3, 1, 5), "none"),
    "group_per_sample": ((2, 3), (3, 2, 3, 4), "sample"),
    "layer_per_sample": ((1, 2, 3), (3, 1, 4, 5), "sample"),
    "instance_per_sample": ((3,), (3, 4, 1, 6), "sample"),
}


@pytest.mark.parametrize("name", list(SA_CASES))
def test_standardize_affine_equals_the_composition(name: str) -> None:
    dims, shape, affine = SA_CASES[name]
    args = _sa_args(dims, shape, affine)
    y = standardize_affine(args[0], dims, weight=args[1], bias=args[2], eps=1e-5)
    ref = standardize_affine_plain(args[0], args[1], args[2], 1e-5, dims)
    assert_close(y, ref, **TIGHT)
    tensors = [t for t in args if t is not None]
    cot = rand(*y.shape, seed=9, grad=False)
    for a, b in zip(torch.autograd.grad(y, tensors, cot), torch.autograd.grad(ref, tensors, cot),
                    strict=True):
        assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("name", ["batch_per_sample", "group_per_sample", "batch_no_affine"])
def test_standardize_affine_gradcheck_and_second_derivatives(name: str) -> None:
    dims, shape, affine = SA_CASES[name]

    def f(x: torch.Tensor, w: Any, b: Any) -> torch.Tensor:
        return standardize_affine(x, dims, weight=w, bias=b, eps=1e-5)

    args = tuple(_sa_args(dims, shape, affine))
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


def test_standardize_affine_half_input_and_inplace_after() -> None:
    x = torch.randn(4, 3, 1, 5, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(4, 3, 1, 1)
    y = standardize_affine(x, (0, 3), weight=w, bias=None, eps=1e-5)
    assert y.dtype == torch.float32
    assert_close(y, standardize_affine_plain(x, w, None, 1e-5, (0, 3)))
    (g,) = torch.autograd.grad(y.relu_().sum(), x)
    assert g.dtype == torch.bfloat16
    (ref,) = torch.autograd.grad(standardize_affine_plain(x, w, None, 1e-5, (0, 3)).relu().sum(), x)
    assert_close(g, ref, atol=1e-2, rtol=1e-2)  # bfloat16 gradients: 8 bits of mantissa


def test_standardize_uses_the_function_only_on_its_own_moments() -> None:
    """``fit``'s moments mark themselves; a caller that replaces them (another mean, the running
    estimates) gets the composition, differentiated through what it passed."""
    op = nk.nop.Standardize()
    v = rand(4, 3, 1, 5, seed=3)
    w = rand(4, 3, 1, 1, seed=4)
    stats = op.fit(v, Batch(), (5,))
    y = op.transform(v, stats, nap=Batch(), eps=1e-5, m=20, weight=w, bias=None)
    assert type(y.grad_fn).__name__ == "_StandardizeAffineBackward"
    moved = dict(stats, mean=stats["mean"] + 1)
    y2 = op.transform(v, moved, nap=Batch(), eps=1e-5, m=20, weight=w, bias=None)
    assert type(y2.grad_fn).__name__ != "_StandardizeAffineBackward"
    assert_close(y2, (v - stats["mean"] - 1) * torch.rsqrt(stats["var"] + 1e-5) * w, **TIGHT)
    stats["var"] = stats["var"] * 2  # replaced in place of the dict: no longer its own
    y3 = op.transform(v, stats, nap=Batch(), eps=1e-5, m=20, weight=w, bias=None)
    assert type(y3.grad_fn).__name__ != "_StandardizeAffineBackward"
    plain = op.unfused().fit(v, Batch(), (5,))
    assert type(plain) is dict


@pytest.mark.parametrize("method, kw", [("iebn", {}), ("attentive_norm", {"num_affines": 3}),
                                        ("ilm", {"num_groups": 2}), ("ilm", {"num_groups": 6})])
def test_conditional_presets_equal_the_composition(method: str, kw: dict[str, Any]) -> None:
    fused = _randomized(nk.create(method, 6, dtype=F64, **kw), 30)
    plain = nk.create(method, 6, dtype=F64, native=False, **kw)
    plain.load_state_dict(fused.state_dict())
    x = (rand(5, 6, 3, 4, seed=0) * 2 + 1).detach().requires_grad_()
    _assert_steps_equal(fused, plain, x, 40, ("_StandardizeAffineBackward",))
    fused.eval(), plain.eval()
    assert_close(fused(x), plain(x), **TIGHT)


def test_conditional_preset_gradcheck_and_second_derivatives() -> None:
    m = _randomized(nk.create("iebn", 4, dtype=F64), 5)
    names = [n for n, _ in m.named_parameters()]

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    args = (rand(3, 4, 2, 3, seed=1), *m.parameters())
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


def test_spatially_varying_recovery_uses_the_composition() -> None:
    """SPADE's γ, β vary with position: not the Function's (constant along the positions)."""
    op = nk.nop.Standardize()
    v = rand(2, 3, 1, 4, seed=5)
    w = rand(2, 3, 1, 4, seed=6)
    y = op.transform(v, op.fit(v, Batch(), (4,)), nap=Batch(), eps=1e-5, m=8, weight=w,
                     bias=None)
    assert type(y.grad_fn).__name__ != "_StandardizeAffineBackward"
    ref = (v - v.mean((0, 3), keepdim=True)) * torch.rsqrt(
        v.var((0, 3), correction=0, keepdim=True) + 1e-5) * w
    assert_close(y, ref, **TIGHT)


# ------------------------------------------------- switchable / batch-instance mixtures
def test_row_moments_and_row_affine_equal_the_composition() -> None:
    x = rand(3, 4, 2, 5, seed=11, scale=3.0)
    a, b = rand(3, 4, 2, 1, seed=12), rand(1, 4, 2, 1, seed=13)
    mean, var = row_moments(x)
    assert_close(mean, x.mean(3, keepdim=True), **TIGHT)
    assert_close(var, x.var(3, correction=0, keepdim=True), **TIGHT)
    y = row_affine(x, a, b)
    assert_close(y, x * a + b, **TIGHT)
    out = (y * mean + var.sqrt()).sum()  # both Functions in one graph, every input used
    ref_mean, ref_var = x.mean(3, keepdim=True), x.var(3, correction=0, keepdim=True)
    ref = ((x * a + b) * ref_mean + ref_var.sqrt()).sum()
    for u, w in zip(torch.autograd.grad(out, (x, a, b)), torch.autograd.grad(ref, (x, a, b)),
                    strict=True):
        assert_close(u, w, **TIGHT)


def test_row_functions_gradcheck_and_second_derivatives() -> None:
    x = rand(2, 3, 1, 4, seed=14)
    a, b = rand(2, 3, 1, 1, seed=15), rand(1, 3, 1, 1, seed=16)
    for f, args in ((lambda t: torch.cat(row_moments(t)), (x,)), (row_affine, (x, a, b))):
        assert gradcheck(f, args)
        assert gradgradcheck(f, args)


MIXTURES = [("switchable_norm", {}), ("switchable_norm", {"sparse": True}),
            ("switchable_norm", {"modes": ("in", "ln"), "track_running_stats": False}),
            ("bin", {}), ("ibn", {}), ("ibn", {"ratio": 1.0})]


@pytest.mark.parametrize("method, kw", MIXTURES, ids=lambda p: str(p))
def test_mixtures_equal_the_composition(method: str, kw: dict[str, Any]) -> None:
    fused = _randomized(nk.create(method, 6, dtype=F64, **kw), 50)
    plain = nk.create(method, 6, dtype=F64, native=False, **kw)
    plain.load_state_dict(fused.state_dict())
    assert fused.nop.fused and not plain.nop.fused
    x = (rand(5, 6, 3, 4, seed=0) * 2 + 1).detach().requires_grad_()
    _assert_steps_equal(fused, plain, x, 60, ("_RowAffineBackward", "_RowMomentsBackward"))


def test_adalin_with_per_sample_recovery_equals_the_composition() -> None:
    fused = _randomized(nk.create("adalin", 4, dtype=F64), 70)
    plain = nk.create("adalin", 4, dtype=F64, native=False)
    plain.load_state_dict(fused.state_dict())
    x = rand(3, 4, 3, 3, seed=1)
    cond = (rand(3, 4, seed=2), rand(3, 4, seed=3))
    y, ref = fused(x, cond), plain(x, cond)
    assert "_RowAffineBackward" in _nodes(y)
    assert_close(y, ref, **TIGHT)
    ins = [x, *cond, *fused.parameters()]
    for a, b in zip(torch.autograd.grad(y.sum(), ins),
                    torch.autograd.grad(ref.sum(), [x, *cond, *plain.parameters()]), strict=True):
        assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("method", ["switchable_norm", "bin"])
def test_mixture_gradcheck_and_second_derivatives(method: str) -> None:
    m = _randomized(nk.create(method, 4, dtype=F64), 5)
    names = [n for n, _ in m.named_parameters()]

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    args = (rand(3, 4, 2, 3, seed=1), *m.parameters())
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)
