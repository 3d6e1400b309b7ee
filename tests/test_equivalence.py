"""Equivalence tests: our modules against torch.nn built-ins and against each other.

Everything runs in float64. Both sides compute the same math in a different reduction order, so
the differences are float64 round-off: ~1e-16 relative per operation, amplified at most by the
condition of standardization (1/σ with σ ~ 1 here) and by a few SGD steps. ``TOL`` (1e-9 relative,
1e-10 absolute) is far above that round-off and far below any modelling difference (a biased vs
unbiased variance on m = 40 values changes outputs by ~1e-2; ε inside vs outside the root by ~1e-5).

Each comparison runs several training steps (forward, backward with a random upstream gradient,
an SGD update of the parameters of both modules) checking outputs, input gradients, parameter
gradients and every buffer after each step, then the same in eval mode. Our modules are tested with
``native=True`` (dispatch to torch's kernels) and ``native=False`` (normkit's generic path).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit as nk

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])


def _x(shape, seed, loc=0.5, scale=1.7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT) * scale + loc


def _randomize(m: nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        dp = dict(dst.named_parameters())
        sp = dict(src.named_parameters())
        assert set(dp) == set(sp), (set(dp), set(sp))
        for k, p in sp.items():
            dp[k].copy_(p)


def _buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b.clone() for k, b in m.named_buffers()}


def _compare_step(ours, ref, x, seed, skip=()):
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yr = ours(xo), ref(xr)
    torch.testing.assert_close(yo, yr, **TOL)
    gy = _x(yo.shape, seed + 1000, loc=0.0, scale=1.0)
    yo.backward(gy)
    yr.backward(gy)
    torch.testing.assert_close(xo.grad, xr.grad, **TOL)
    po, pr = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert set(po) == set(pr)
    for k in po:
        torch.testing.assert_close(po[k].grad, pr[k].grad, **TOL, msg=lambda m, k=k: f"{k}.grad: {m}")
    bo, br = _buffers(ours), _buffers(ref)
    assert set(bo) == set(br), (set(bo), set(br))
    for k in set(bo) - set(skip):
        torch.testing.assert_close(bo[k], br[k], **TOL, msg=lambda m, k=k: f"buffer {k}: {m}")


def _sgd(*mods, lr=0.1):
    with torch.no_grad():
        for m in mods:
            for p in m.parameters():
                p -= lr * p.grad
                p.grad = None


def run_pair(ours: nn.Module, ref: nn.Module, shape, steps: int = 3, eval_steps: int = 2, skip=()):
    """Train both modules side by side for ``steps`` steps, then evaluate: all must agree.

    ``skip`` names buffers not compared (they must still exist on both sides).
    """
    ours, ref = ours.to(DT), ref.to(DT)
    _randomize(ref)
    _copy_params(ref, ours)
    ours.train(), ref.train()
    for s in range(steps):
        _compare_step(ours, ref, _x(shape, s), s, skip)
        _sgd(ours, ref)
    ours.eval(), ref.eval()
    before = _buffers(ours)
    for s in range(eval_steps):
        _compare_step(ours, ref, _x(shape, 100 + s, loc=-0.3, scale=2.5), 100 + s, skip)
    for k, b in _buffers(ours).items():
        assert torch.equal(b, before[k]), f"eval changed buffer {k}"


# ----------------------------------------------------------------------------- torch.nn
BN_CASES = [
    (nn.BatchNorm1d, (8, 5)),
    (nn.BatchNorm1d, (4, 5, 7)),
    (nn.BatchNorm2d, (4, 5, 3, 4)),
    (nn.BatchNorm3d, (2, 5, 3, 2, 4)),
]


@NATIVE
@pytest.mark.parametrize("torch_cls,shape", BN_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("affine", [True, False])
def test_bn_vs_torch(native, torch_cls, shape, affine):
    run_pair(nk.BatchNorm(5, affine=affine, native=native), torch_cls(5, affine=affine), shape)


@NATIVE
@pytest.mark.parametrize("momentum", [None, 0.0, 0.3, 1.0])
def test_bn_momentum_vs_torch(native, momentum):
    # momentum=None: cumulative moving average (factor 1/num_batches_tracked) in both.
    ours = nk.BatchNorm(5, momentum=momentum, eps=1e-3, native=native)
    ref = nn.BatchNorm2d(5, momentum=momentum, eps=1e-3)
    run_pair(ours, ref, (3, 5, 2, 3), steps=4)


@NATIVE
def test_bn_no_running_stats_vs_torch(native):
    ours = nk.BatchNorm(5, track_running_stats=False, native=native)
    run_pair(ours, nn.BatchNorm1d(5, track_running_stats=False), (6, 5, 3))


@NATIVE
def test_bn_channels_last_axis_vs_torch(native):
    # BN(channel_axis=-1) on (N, L, C) == torch BN on the (N, C, L) transpose.
    class Transposed(nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)

    run_pair(nk.BatchNorm(5, channel_axis=-1, native=native), Transposed(5), (4, 6, 5))


@NATIVE
@pytest.mark.parametrize("shape", [(3, 7, 6), (2, 6)])
@pytest.mark.parametrize("affine", [True, False])
def test_ln_vs_torch(native, shape, affine):
    ours = nk.LayerNorm(6, channel_axis=-1, affine=affine, native=native)
    run_pair(ours, nn.LayerNorm(6, elementwise_affine=affine), shape)


@NATIVE
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(3, 6, 5), (2, 6, 3, 4)])
def test_gn_vs_torch(native, groups, shape):
    run_pair(nk.GroupNorm(6, num_groups=groups, eps=1e-4, native=native),
             nn.GroupNorm(groups, 6, eps=1e-4), shape)


@NATIVE
def test_gn_no_affine_vs_torch(native):
    run_pair(nk.GroupNorm(6, num_groups=2, affine=False, native=native),
             nn.GroupNorm(2, 6, affine=False), (3, 6, 4))


@NATIVE
@pytest.mark.parametrize("torch_cls,shape", [(nn.InstanceNorm1d, (3, 4, 7)), (nn.InstanceNorm2d, (3, 4, 3, 5))],
                         ids=["1d", "2d"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_in_vs_torch(native, torch_cls, shape, affine, track):
    ours = nk.InstanceNorm(4, affine=affine, track_running_stats=track, native=native)
    # torch's InstanceNorm never increments num_batches_tracked (its forward skips the counter and
    # treats momentum=None as 0); normkit counts batches as BN does, which momentum=None needs.
    # running_mean / running_var are compared.
    run_pair(ours, torch_cls(4, affine=affine, track_running_stats=track), shape, steps=3,
             skip=("num_batches_tracked",))
    if track:
        assert int(ours.num_batches_tracked) == 3


@NATIVE
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
@pytest.mark.parametrize("shape", [(3, 5, 8), (4, 8)])
def test_rms_norm_vs_torch(native, eps, shape):
    ours = nk.RMSNorm(8, channel_axis=-1, eps=eps, native=native)
    run_pair(ours, nn.RMSNorm(8, eps=eps), shape)


@NATIVE
def test_rms_norm_no_affine_vs_torch(native):
    ours = nk.RMSNorm(8, channel_axis=-1, affine=False, eps=1e-5, native=native)
    run_pair(ours, nn.RMSNorm(8, eps=1e-5, elementwise_affine=False), (3, 5, 8))


# ------------------------------------------------------------------- normkit vs normkit
class _LayerNorm2d(nn.LayerNorm):
    """ConvNeXt-style channels-first LayerNorm: torch LayerNorm over C of (N, C, H, W)."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


@NATIVE
def test_ln_channels_first_equals_permuted_torch_ln(native):
    ours = nk.LayerNorm(6, over="channels", channel_axis=1, native=native)
    run_pair(ours, _LayerNorm2d(6), (2, 6, 3, 4))


@NATIVE
def test_pn_affine_equals_ln_over_channels(native):
    run_pair(nk.PositionalNorm(6, affine=True, native=native), _LayerNorm2d(6), (2, 6, 3, 4))


@NATIVE
@pytest.mark.parametrize("shape", [(3, 6, 5), (2, 6, 3, 4)])
def test_gn_one_group_equals_ln_over_all(native, shape):
    run_pair(nk.GroupNorm(6, num_groups=1, native=native), nk.LayerNorm(6, over="all", native=not native),
             shape)


@NATIVE
def test_gn_one_group_equals_torch_layer_norm_over_chw(native):
    x = _x((3, 6, 4, 5), 0)
    y = nk.GroupNorm(6, num_groups=1, affine=False, native=native, dtype=DT)(x)
    torch.testing.assert_close(y, nn.functional.layer_norm(x, x.shape[1:]), **TOL)
    y = nk.LayerNorm(6, affine=False, native=native, dtype=DT)(x)
    torch.testing.assert_close(y, nn.functional.layer_norm(x, x.shape[1:]), **TOL)


@NATIVE
def test_gn_c_groups_equals_in(native):
    run_pair(nk.GroupNorm(6, num_groups=6, native=native),
             nk.InstanceNorm(6, affine=True, native=not native), (3, 6, 3, 4))


@NATIVE
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_group_norm_group_size_one_equals_bn(native, momentum):
    ours = nk.BatchGroupNorm(5, group_size=1, momentum=momentum)
    run_pair(ours, nk.BatchNorm(5, momentum=momentum, native=native), (4, 5, 3, 2), steps=4)


@NATIVE
def test_batch_group_norm_group_size_one_equals_torch_bn(native):
    run_pair(nk.BatchGroupNorm(5, group_size=1), nn.BatchNorm2d(5), (4, 5, 3, 2))


@NATIVE
@pytest.mark.parametrize("shape,window", [((2, 4, 5, 6), 11), ((2, 4, 5, 6), (9, 11)), ((3, 4, 7), 13)])
def test_lcn_covering_window_equals_gn(native, shape, window):
    # A window of size w around p reaches w//2 before and (w-1)//2 after: w >= 2*S - 1 covers
    # every position from every position, so the local statistics are the group statistics.
    ours = nk.LocalContextNorm(4, num_groups=2, window=window)
    run_pair(ours, nk.GroupNorm(4, num_groups=2, native=native), shape, steps=2, eval_steps=1)


def test_mean_only_bn_is_x_minus_batch_mean():
    m = nk.MeanOnlyBatchNorm(5, affine=False, dtype=DT)
    for s in range(3):
        x = _x((4, 5, 3, 2), s)
        torch.testing.assert_close(m(x), x - x.mean((0, 2, 3), keepdim=True), **TOL)
    x = _x((6, 5), 9)
    torch.testing.assert_close(m(x), x - x.mean(0, keepdim=True), **TOL)


def test_mean_only_bn_equals_bn_centering_part():
    # Same running_mean as BN; with affine=False its output times BN's 1/sqrt(var+eps) is BN's.
    mo, bn = nk.MeanOnlyBatchNorm(5, affine=False, dtype=DT), nk.BatchNorm(5, affine=False, dtype=DT)
    for s in range(3):
        x = _x((4, 5, 6), s)
        var = x.var((0, 2), unbiased=False, keepdim=True)
        torch.testing.assert_close(mo(x) / torch.sqrt(var + bn.eps), bn(x), **TOL)
    torch.testing.assert_close(mo.running_mean, bn.running_mean, **TOL)
    assert int(mo.num_batches_tracked) == int(bn.num_batches_tracked) == 3
