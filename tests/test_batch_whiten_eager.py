"""Eager training applies ``normkit::whiten_batch_apply`` through a plain ``autograd.Function``
(``_eager_ops.eager_op``: ``fused_batch_whiten._apply_call``) instead of the op's
``torch.library`` autograd: the same setup and backward, so the same values — checked here against the op's registered autograd,
first and second derivatives, float64 (identical operations: ``torch.equal``)."""

from __future__ import annotations

import pytest
import torch

from normkit.functional.fused_batch_whiten import batch_whiten_apply, batch_whiten_fit

F64 = torch.float64


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky", "newton"])
def test_eager_function_is_the_ops_autograd(method: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 3, 4, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(1, 2, 3, 1, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(1, 2, 3, 1, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(5, 2, 3, 4, generator=gen, dtype=F64)
    mu, cov, f, u, wm = batch_whiten_fit(x.detach(), method, 1e-3)  # type: ignore[arg-type]

    def eager_apply() -> torch.Tensor:
        return batch_whiten_apply(x, (mu, cov, u, f, wm), method=method,  # type: ignore[arg-type]
                                  eps=1e-3, weight=w, bias=b)

    def op_apply() -> torch.Tensor:
        return torch.ops.normkit.whiten_batch_apply(x, mu, cov, u, f, wm, w, b, method, 1e-3, 5,
                                                    F64)

    eager, op = eager_apply(), op_apply()
    assert type(eager.grad_fn).__name__ == "Eager_normkit_whiten_batch_applyBackward"
    assert "whiten_batch_apply" in type(op.grad_fn).__name__
    assert torch.equal(eager, op)
    for a, c in zip(torch.autograd.grad(eager, (x, w, b), g),
                    torch.autograd.grad(op, (x, w, b), g), strict=True):
        assert torch.equal(a, c)
    if method != "zca":  # ZCA's backward is first order (test_fused_batch_whiten)
        firsts = [torch.autograd.grad(y, x, g, create_graph=True)[0].square().sum()
                  for y in (eager_apply(), op_apply())]
        seconds = [torch.autograd.grad(s, (x, w)) for s in firsts]
        for a, c in zip(*seconds, strict=True):
            assert torch.equal(a, c)

