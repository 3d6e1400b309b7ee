"""What the compiled (``torch.compile`` / ``torch.export``) forward traces where it differs from
eager: the moments as one ``var_mean`` (inductor's Welford reduction) and no layer-norm kernel
over moved channels (inductor reduces the composition faster). Both must give eager's numbers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

import normkit as nk
from normkit.functional import statistics as S


def test_compiled_moments_are_eagers() -> None:
    x = torch.randn(6, 5, 7, dtype=torch.float64) * 3 + 1e4  # a large offset: no cancellation

    def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return S.moments(x, (0, 2))

    torch._dynamo.reset()
    graphs: list[str] = []

    def backend(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        graphs.append(gm.code)
        return gm

    mean, var = torch.compile(f, backend=backend, fullgraph=True)(x)
    assert any("var_mean" in g for g in graphs)
    ref_mean, ref_var = f(x)
    assert_close(mean, ref_mean)
    assert_close(var, ref_var)
    assert_close(var, x.var(dim=(0, 2), keepdim=True, correction=0))
    torch._dynamo.reset()


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_compiled_positional_norm_skips_moved_layer_norm(channel_axis: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    m = nk.create("pn", 6, affine=True, channel_axis=channel_axis).double()
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    x = x if channel_axis == 1 else x.movedim(1, -1)
    ref = m(x)
    calls: list[int] = []
    orig = torch.nn.functional.layer_norm

    def spy(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return orig(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", spy)
    torch._dynamo.reset()
    xg = x.clone().requires_grad_()
    y = torch.compile(m, backend="aot_eager", fullgraph=True)(xg)
    assert bool(calls) == (channel_axis == -1)  # channels last: torch's kernel, as eager
    assert_close(y, ref)
    g = torch.randn_like(y)
    xr = x.clone().requires_grad_()
    assert_close(torch.autograd.grad(y, xg, g)[0], torch.autograd.grad(m(xr), xr, g)[0])
    torch._dynamo.reset()


def test_presets_compiled_one_by_one_do_not_share_a_recompile_limit() -> None:
    """Each preset has its own ``forward`` code object (dynamo caches and counts recompiles per
    code object): compiling more different presets than the recompile limit, each on its own
    with ``fullgraph=True``, must not raise ``FailOnRecompileLimitHit``, as for torch's layers."""
    names = ["bn", "ghost_bn", "frn", "rms_norm", "scale_norm"]
    codes = {id(type(nk.create(n, 4)).forward.__code__) for n in names}  # equal, not the same
    assert len(codes) == len(names)
    assert id(nk.Normalization.forward.__code__) not in codes
    x = torch.randn(3, 4, 5, 5)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        for n in names:
            layer = nk.create(n, 4)
            y = torch.compile(layer, backend="eager", fullgraph=True)(x)
            assert_close(y, layer(x))
    torch._dynamo.reset()


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_each_preset_runs_the_forward_its_classes_define() -> None:
    """The per-class copy replaces only the base ``forward``: a preset whose mixin or parent
    defines its own (LayerNorm's trailing-dims form, Kalman, online) runs that one."""
    import normkit.methods  # noqa: F401 - every preset class defined

    classes = _subclasses(nk.Normalization)
    assert len(classes) > 40
    base = nk.Normalization.forward.__code__

    def where(f: Any) -> tuple[str, int]:
        return f.__code__.co_filename, f.__code__.co_firstlineno

    for cls in classes:  # the first forward in the MRO that is not a copy of the base one
        defined = next(k.__dict__["forward"] for k in cls.__mro__ if "forward" in k.__dict__
                       and (k is nk.Normalization or where(k.__dict__["forward"])
                            != (base.co_filename, base.co_firstlineno)))
        assert where(cls.forward) == where(defined), cls
