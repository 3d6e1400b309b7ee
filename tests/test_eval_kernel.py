"""Evaluation through BN's kernel (normkit/_eval_kernel.py): one ``torch.batch_norm`` call on the
running estimates where an operation declares ``eval_moments``. Each test fails if the fast path
changes a result or misses a state change: equality to the plain composition (``native=False``)
in float64, the kernel actually called, the cached moments following in-place edits,
``load_state_dict``, ``.to()``, ``eps`` and eval → train → eval, channels-last, mixed precision,
gradients (gradcheck, gradgradcheck), hooks, compile (fullgraph) and export.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

import normkit as nk
import normkit._eval_kernel as EK
from normkit.errors import ShapeError

F64 = torch.float64
C = 8
# method -> constructor arguments: every method whose evaluation runs BN's kernel
METHODS: dict[str, dict[str, Any]] = {
    "bn": {}, "batch_renorm": {}, "ghost_bn": {"virtual_batch_size": 2}, "l1_bn": {},
    "range_bn": {}, "mabn": {}, "momentum_bn": {}, "online_norm": {}, "power_norm": {},
    "cross_iteration_bn": {}, "kalman_norm": {}, "mean_only_bn": {},
    "batch_group_norm": {"num_groups": 4}, "gn": {"num_groups": 2, "track_running_stats": True},
}


def trained(method: str, native: bool = True, dtype: torch.dtype = F64, seed: int = 0,
            steps: int = 3) -> nk.Normalization:
    """``method`` after ``steps`` training calls, with random ``γ, β``, in eval mode."""
    torch.manual_seed(seed)
    m = nk.create(method, C, native=native, **METHODS[method]).to(dtype)
    for _ in range(steps):
        m(torch.randn(4, C, 3, 3, dtype=dtype) * 2 + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m.eval()


def plain_twin(m: nk.Normalization, method: str) -> nk.Normalization:
    """The ``native=False`` composition of ``m``'s method with ``m``'s state."""
    dtype = next(b for b in m.buffers() if b.is_floating_point()).dtype
    twin = nk.create(method, C, native=False, **METHODS[method]).to(dtype)
    twin.load_state_dict(m.state_dict())
    twin.eps = m.eps
    return twin.eval()


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kernels the fast path runs, recorded."""
    calls: list[str] = []
    orig = EK.run_kernel

    def spy(kind: str, *args: Any, **kw: Any) -> Any:
        calls.append(kind)
        return orig(kind, *args, **kw)

    monkeypatch.setattr(EK, "run_kernel", spy)
    return calls


@pytest.mark.parametrize("method", sorted(METHODS))
def test_eval_is_one_bn_call_equal_to_composition(method: str, kernel_calls: list[str]) -> None:
    m = trained(method)
    x = torch.randn(3, C, 4, 5, dtype=F64) * 3 - 1
    y = m(x)
    assert kernel_calls == ["batch_norm"]
    assert_close(y, plain_twin(m, method)(x))
    assert_close(m(x[:, :, 0]), plain_twin(m, method)(x[:, :, 0]))  # (N, C, L)


@pytest.mark.parametrize("method", ["l1_bn", "batch_group_norm", "power_norm", "bn"])
def test_cached_moments_follow_state_changes(method: str) -> None:
    m = trained(method)
    x = torch.randn(3, C, 4, dtype=F64)

    def check() -> None:
        assert_close(m(x), plain_twin(m, method)(x))

    check()
    with torch.no_grad():  # in-place edits of the running buffers
        for name, buf in m.named_buffers():
            if name.startswith("running_") and buf.is_floating_point():
                buf.mul_(1.5).add_(0.25)
    check()
    m.load_state_dict(trained(method, seed=1).state_dict())  # copies in place
    check()
    m.eps = 1e-2
    check()
    m.train()(torch.randn(4, C, 4, dtype=F64))  # a training step updates the estimates
    m.eval()
    check()
    m.float()  # .to(): new buffers
    xf = x.float()
    assert_close(m(xf), plain_twin(m, method)(xf))
    name, buf = next((n, b) for n, b in m.named_buffers() if n.startswith("running_"))
    setattr(m, name, buf.clone() + 1)  # a new buffer tensor
    assert_close(m(xf), plain_twin(m, method)(xf))


@pytest.mark.parametrize("method", ["l1_bn", "batch_group_norm", "ghost_bn"])
def test_channels_last_and_trailing_channels(method: str) -> None:
    m = trained(method)
    twin = plain_twin(m, method)
    x = torch.randn(2, C, 3, 4, dtype=F64).contiguous(memory_format=torch.channels_last)
    y, ref = m(x), twin(x)
    assert_close(y, ref)
    assert y.is_contiguous(memory_format=torch.channels_last)
    rows = nk.create(method, C, channel_axis=-1, **METHODS[method]).to(F64)
    rows.load_state_dict(m.state_dict())
    rows.eval()
    xr = torch.randn(5, 2, C, dtype=F64)
    assert_close(rows(xr), twin(xr.movedim(-1, 1)).movedim(1, -1))


@pytest.mark.parametrize("method", ["range_bn", "batch_group_norm", "power_norm"])
def test_eval_gradients(method: str, kernel_calls: list[str]) -> None:
    m = trained(method)
    x = torch.randn(2, C, 3, dtype=F64, requires_grad=True)
    params = [m.weight, m.bias] if hasattr(m, "weight") else [m.bias]

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return m(x)

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))
    assert "batch_norm" in kernel_calls
    twin = plain_twin(m, method)
    g = torch.randn(2, C, 3, dtype=F64)
    mine = torch.autograd.grad(m(x), (x, *params), g)
    ref = torch.autograd.grad(twin(x), (x, *[getattr(twin, n) for n in ("weight", "bias")
                                             if hasattr(m, n)]), g)
    assert_close(mine, ref)


def test_running_estimates_with_gradients_take_the_generic_path(kernel_calls: list[str]) -> None:
    m = trained("l1_bn")
    m.running_mean.requires_grad_(True)
    x = torch.randn(2, C, 3, dtype=F64)
    assert_close(m(x), plain_twin(m, "l1_bn")(x))
    assert kernel_calls == []
    with torch.no_grad():
        m(torch.randn(2, C, 3, dtype=F64))
    assert kernel_calls == ["batch_norm"]


def test_mixed_precision_and_autocast() -> None:
    m = trained("range_bn", dtype=torch.float32)
    twin = plain_twin(m, "range_bn")
    x = torch.randn(4, C, 5, 5).bfloat16()
    y = m(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, twin(x), atol=2e-2, rtol=2e-2)  # bf16 rounding of the output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xa = torch.randn(4, C, 5, 5)
        assert m(xa).dtype == torch.float32
        assert_close(m(xa), twin(xa))


def test_overridden_hooks_keep_their_evaluation(kernel_calls: list[str]) -> None:
    seen: list[bool] = []

    class Recording(nk.L1BatchNorm):
        def _statistics(self, call: Any) -> Any:
            seen.append(call.use_batch)
            return super()._statistics(call)

    m = Recording(C).double().eval()
    m(torch.randn(2, C, 3, dtype=F64))
    assert seen == [False] and kernel_calls == []
    assert m._eval_kernel is None and nk.L1BatchNorm(C)._eval_kernel == "derived"
    assert nk.create("batch_renorm", C)._eval_kernel == "direct"  # the buffers, read per call
    assert nk.create("bn", C, track_running_stats=False)._eval_kernel is None


def test_errors_and_edge_inputs_in_eval() -> None:
    m = trained("l1_bn")
    with pytest.raises(ShapeError):
        m(torch.randn(2, C + 1, 3, dtype=F64))
    empty = torch.randn(0, C, 3, dtype=F64)
    assert m(empty).shape == empty.shape
    one = torch.randn(1, C, 1, dtype=F64)  # one value per statistic: fine with running stats
    assert_close(m(one), plain_twin(m, "l1_bn")(one))


def test_inference_mode() -> None:
    m = trained("batch_group_norm")
    x = torch.randn(2, C, 3, dtype=F64)
    ref = plain_twin(m, "batch_group_norm")(x)
    with torch.inference_mode():
        assert_close(m(x), ref)
    with torch.inference_mode():  # buffers created as inference tensors: not cached
        inf = trained("batch_group_norm")
        assert_close(inf(x), ref)


@pytest.mark.parametrize("method", ["l1_bn", "batch_group_norm"])
def test_compile_fullgraph_and_export(method: str) -> None:
    m = trained(method, dtype=torch.float32)
    x = torch.randn(2, C, 3, 3)
    ref = plain_twin(m, method)(x)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), ref)
    with torch.no_grad():
        m.running_mean.add_(0.5)  # a buffer change reaches the compiled graph
    ref = plain_twin(m, method)(x)
    assert_close(compiled(x), ref)
    exported = torch.export.export(m, (x,))
    assert_close(exported.module()(x), ref)
    torch._dynamo.reset()
