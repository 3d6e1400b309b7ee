"""The per-call shortcuts of the eager path (issue 20): each gives what the call it replaces gives.

``as_dtype`` (a ``.to(dtype)`` without the no-op call), ``apply_bound`` (``Function.apply``
without the per-call signature binding), ``statistics.no_grad`` (``@torch.no_grad()`` without a
context object when gradients are already off) and ``Partition.dims`` (computed once per roles
tuple). The methods' results are covered by the generic tables; these check the helpers' own
contracts, including the paths they hand back to torch (compile, ``torch.func``).
"""

from __future__ import annotations

import pytest
import torch

import normkit as nk
from normkit.functional._apply import apply_bound
from normkit.functional.partition import as_dtype, reduce_dims
from normkit.functional.statistics import no_grad
from normkit.functional.whiten import pca_matrix, zca_matrix


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_as_dtype_is_to(dtype: torch.dtype) -> None:
    t = torch.randn(3, requires_grad=True)
    out, ref = as_dtype(t, dtype), t.to(dtype)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert (out is t) == (ref is t)  # `to` returns the tensor itself for its own dtype
    assert out.requires_grad and (out.grad_fn is None) == (ref.grad_fn is None)


class _Scale(torch.autograd.Function):
    """``y = a·x`` with ``setup_context`` (the kind whose ``apply`` binds its signature)."""

    @staticmethod
    def forward(x: torch.Tensor, a: float = 2.0) -> torch.Tensor:  # type: ignore[override]
        return x * a

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def,override]
        ctx.a = inputs[1]

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g * ctx.a, None

    @staticmethod
    def vmap(info, in_dims, x, a):  # type: ignore[no-untyped-def,override]
        return x * a, in_dims[0]


def test_apply_bound_matches_apply() -> None:
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = apply_bound(_Scale, x, 3.0)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y, _Scale.apply(x, 3.0)) and torch.equal(g, torch.full_like(x, 3.0))
    assert type(y.grad_fn).__name__ == type(_Scale.apply(x, 3.0).grad_fn).__name__
    # a default left out: torch's own apply binds it
    assert torch.equal(apply_bound(_Scale, x), x * 2.0)


def test_apply_bound_under_torch_func() -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    out = torch.func.vmap(lambda r: apply_bound(_Scale, r, 3.0))(x)
    assert torch.equal(out, 3.0 * x)


def test_eigh_functions_through_apply_bound() -> None:
    """The whitening matrices keep their values and (divided-difference) gradients (checked
    through symmetric covariances ``a aᵀ/m``: the backward is the symmetric one)."""
    a = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)

    def cov(t: torch.Tensor) -> torch.Tensor:
        return t @ t.transpose(-1, -2) / 8

    w = zca_matrix(cov(a), eps=1e-3)
    eye = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    assert torch.allclose(w @ (cov(a) + 1e-3 * eye) @ w, eye, atol=1e-10)
    assert torch.autograd.gradcheck(lambda t: zca_matrix(cov(t), eps=1e-3), (a,))
    assert torch.autograd.gradcheck(lambda t: pca_matrix(cov(t), eps=1e-3), (a,))


def test_no_grad_helper() -> None:
    seen: list[bool] = []

    @no_grad
    def record(t: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        return t * 2

    t = torch.ones(2, requires_grad=True)
    assert not record(t).requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        record(t)
    assert seen == [False, False] and torch.is_grad_enabled()

    @no_grad
    def fail() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        fail()
    assert torch.is_grad_enabled()  # restored after an error


def test_partition_dims_cached_equal() -> None:
    for nap in (nk.nap.Batch(), nk.nap.Group(num_groups=2), nk.nap.Instance(), nk.nap.Layer()):
        assert nap.dims == reduce_dims(nap.roles)
        assert nap.dims is nap.dims  # the remembered tuple


def test_frn_compiles_fullgraph_with_the_shortcuts() -> None:
    """The traced graph of the shared path with ``as_dtype`` / ``Partition.dims`` has no break
    (``fullgraph=True``) and gives the eager result."""
    m = nk.create("frn", 4).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), m(x))
