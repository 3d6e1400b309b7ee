"""The functional layer: ``normalize`` vs the module, ``torch.func`` transforms, ``resolve_groups``,
``box_mean`` and ``moments``.

float64 unless stated; module and function run the same math, so they agree to round-off (1e-10
is far above it). ``box_mean`` is checked against an explicit loop.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import normkit as nk
from normkit import nap, nop, normalize
from normkit.functional import box_mean, moments, resolve_groups

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _x(shape, seed=0, loc=0.3, scale=1.5, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)


COMBOS = {
    "batch-standardize": (nap.Batch(), nop.Standardize()),
    "batch-center": (nap.Batch(), nop.Center()),
    "batch-l1": (nap.Batch(), nop.L1()),
    "batch-range": (nap.Batch(), nop.Range()),
    "batch-rms": (nap.Batch(), nop.Scale("rms")),
    "batchgroup-standardize": (nap.BatchGroup(num_groups=2), nop.Standardize()),
    "batchgroup-l1": (nap.BatchGroup(group_size=3), nop.L1()),
    "layer-standardize": (nap.Layer(), nop.Standardize()),
    "layer-rms": (nap.Layer(), nop.Scale("rms")),
    "layer-l2": (nap.Layer(), nop.Scale("l2")),
    "layer-center": (nap.Layer(), nop.Center()),
    "instance-standardize": (nap.Instance(), nop.Standardize()),
    "instance-range": (nap.Instance(), nop.Range()),
    "group-standardize": (nap.Group(num_groups=3), nop.Standardize()),
    "group-l1": (nap.Group(group_size=2), nop.L1()),
    "group-rms": (nap.Group(num_groups=2), nop.Scale("rms")),
    "position-standardize": (nap.Position(), nop.Standardize()),
    "position-rms": (nap.Position(), nop.Scale("rms")),
    "position-center": (nap.Position(), nop.Center()),
    "local-standardize": (nap.Local(num_groups=2, window=3), nop.Standardize()),
    "local-divisive": (nap.Local(channel_window=3, window=(3, 1)), nop.Divisive(k=0.5, alpha=2.0)),
    "local-lrn": (nap.Local(channel_window=2, include_pad=True), nop.Divisive(center=False)),
}


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_normalize_equals_module_in_train_mode(combo, channel_axis):
    part, op = COMBOS[combo]
    x = _x((4, 6, 5, 3))
    if channel_axis == -1:
        x = x.movedim(1, -1).contiguous()
    eps = 1e-3 if op.uses_eps else 0.0
    kw = dict(nap=part, nop=op, eps=eps, channel_axis=channel_axis)
    m = nk.Normalization(6, **kw, dtype=DT, track_running_stats=False).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.weight.copy_(torch.randn(6, generator=g, dtype=DT))
        m.bias.copy_(torch.randn(6, generator=g, dtype=DT))
    y = normalize(x, weight=m.weight, bias=m.bias, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, m(x), **TOL)
    torch.testing.assert_close(normalize(x, **kw), nk.Normalization(6, nrr=None, **kw, dtype=DT)(x), **TOL)


def test_normalize_matches_torch_kernels():
    x = _x((3, 6, 4, 5))
    torch.testing.assert_close(normalize(x, nap=nap.Group(num_groups=3), nop=nop.Standardize()),
                               torch.nn.functional.group_norm(x, 3), **TOL)
    torch.testing.assert_close(normalize(x, nap=nap.Batch(), nop=nop.Standardize()),
                               torch.nn.functional.batch_norm(x, None, None, training=True), **TOL)
    t = _x((3, 7, 6))
    torch.testing.assert_close(normalize(t, nap=nap.Position(), nop=nop.Scale("rms"), eps=1e-6, channel_axis=-1),
                               torch.nn.functional.rms_norm(t, (6,), eps=1e-6), **TOL)


def test_normalize_zero_size_batch():
    w = torch.full((6,), 2.0, dtype=DT)
    b = torch.full((6,), 0.5, dtype=DT)
    x = torch.empty(0, 6, 3, dtype=DT)
    y = normalize(x, nap=nap.Batch(), nop=nop.Standardize(), weight=w, bias=b)
    assert y.shape == (0, 6, 3)


def test_normalize_validates_like_the_module():
    x = _x((2, 6, 3))
    with pytest.raises(nk.ConfigError, match=r"num_features \(6\).*num_groups \(4\)"):
        normalize(x, nap=nap.Group(num_groups=4), nop=nop.Standardize())
    with pytest.raises(nk.ConfigError, match="eps"):
        normalize(x, nap=nap.Layer(), nop=nop.Standardize(), eps=0.0)
    with pytest.raises(nk.ConfigError, match="eps"):
        normalize(x, nap=nap.Layer(), nop=nop.Standardize(), eps=-1e-5)


def test_normalize_rejects_rank_one_input_channels_first():
    # (C,) has no channel axis 1: a ShapeError (a ValueError) naming the shape, never IndexError
    with pytest.raises(nk.ShapeError, match=r"rank >= 2.*\(6,\)"):
        normalize(torch.randn(6), nap=nap.Layer(), nop=nop.Standardize(), channel_axis=1)


# ------------------------------------------------------------------------------ torch.func
def test_vmap_over_samples_equals_batched_call():
    x = _x((5, 4, 7))
    w, b = _x((4,), 3), _x((4,), 4)

    def per_sample(xi):
        return normalize(xi[None], nap=nap.Layer(), nop=nop.Standardize(), weight=w, bias=b)[0]

    torch.testing.assert_close(torch.func.vmap(per_sample)(x),
                               normalize(x, nap=nap.Layer(), nop=nop.Standardize(), weight=w, bias=b), **TOL)


def test_vmap_over_a_model_batch_dimension():
    # vmap over an extra leading dim: each slice gets its own batch statistics
    xs = _x((3, 4, 5, 2))

    def bn(x):
        return normalize(x, nap=nap.Batch(), nop=nop.Standardize())

    ref = torch.stack([bn(x) for x in xs])
    torch.testing.assert_close(torch.func.vmap(bn)(xs), ref, **TOL)


@pytest.mark.parametrize("part", [nap.Position(), nap.Layer(), nap.Batch()], ids=repr)
def test_func_grad_equals_autograd(part):
    x = _x((3, 5, 6), 2)
    w = _x((6,), 5)
    r = _x((3, 5, 6), 6, loc=0.0)

    def loss(inp):
        y = normalize(inp, nap=part, nop=nop.Standardize(), weight=w, channel_axis=-1)
        return (y * r).pow(2).sum()  # sum of squares of (weighted) LN output

    g_func = torch.func.grad(loss)(x)
    xr = x.clone().requires_grad_()
    loss(xr).backward()
    torch.testing.assert_close(g_func, xr.grad, **TOL)
    assert g_func.abs().max() > 1e-3  # not trivially zero


def test_func_jacrev_of_standardization_has_the_known_null_space():
    # d x̂ / d x annihilates constant shifts: J @ 1 = 0 (output invariant to shifting x)
    x = _x((1, 6), 7)
    jac = torch.func.jacrev(lambda t: normalize(t, nap=nap.Layer(), nop=nop.Standardize()))(x)
    jac = jac.reshape(6, 6)
    torch.testing.assert_close(jac @ torch.ones(6, dtype=DT), torch.zeros(6, dtype=DT), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- resolve_groups
def test_resolve_groups_values():
    assert resolve_groups(64, num_groups=8) == (8, 8)
    assert resolve_groups(64, group_size=16) == (4, 16)
    assert resolve_groups(6, num_groups=6) == (6, 1)
    assert resolve_groups(6, group_size=6) == (1, 6)


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(num_groups=2, group_size=3), r"either num_groups \(2\) or group_size \(3\), not both"),
        (dict(), r"one of num_groups= or group_size="),
        (dict(num_groups=4), r"num_features \(6\) must be divisible by num_groups \(4\).*\[1, 2, 3, 6\]"),
        (dict(group_size=5), r"num_features \(6\) must be divisible by group_size \(5\)"),
        (dict(num_groups=0), r"num_groups must be a positive int, got 0"),
        (dict(group_size=-2), r"group_size must be a positive int, got -2"),
        (dict(num_groups=True), r"num_groups must be a positive int, got True"),
        (dict(group_size=2.0), r"group_size must be a positive int, got 2.0"),
    ],
)
def test_resolve_groups_errors(kw, pattern):
    with pytest.raises(nk.ConfigError, match=pattern):
        resolve_groups(6, **kw)


@pytest.mark.parametrize("cls", [nk.GroupNorm, nk.BatchGroupNorm])
def test_group_errors_at_construction(cls):
    with pytest.raises(nk.ConfigError, match=r"not both"):
        cls(6, num_groups=2, group_size=3)
    with pytest.raises(nk.ConfigError, match=r"divisible by num_groups \(4\)"):
        cls(6, num_groups=4)
    with pytest.raises(ValueError, match=r"positive int, got 0"):
        cls(6, num_groups=0)


# --------------------------------------------------------------------------------- box_mean
def _box_brute(x, dims, windows, include_pad):
    out = torch.empty_like(x)
    sizes = [x.shape[d] for d in dims]
    for idx in itertools.product(*(range(s) for s in x.shape)):
        ranges = []
        count = 1
        for d, w, n in zip(dims, windows, sizes, strict=True):
            lo, hi = idx[d] - w // 2, idx[d] + (w - 1) // 2  # centred, like local_response_norm
            ranges.append(range(max(lo, 0), min(hi, n - 1) + 1))
            count *= w if include_pad else len(ranges[-1])
        total = 0.0
        for pos in itertools.product(*ranges):
            j = list(idx)
            for d, p in zip(dims, pos, strict=True):
                j[d] = p
            total += float(x[tuple(j)])
        out[idx] = total / count
    return out


@pytest.mark.parametrize("include_pad", [False, True])
@pytest.mark.parametrize(
    "shape,dims,windows",
    [((2, 9), (1,), (3,)), ((2, 9), (1,), (4,)), ((1, 5), (1,), (7,)), ((3, 1, 7), (2,), (1,)),
     ((2, 5, 6), (1, 2), (3, 3)), ((1, 4, 7), (1, 2), (2, 5)), ((2, 3, 4), (2, 1), (3, 2))],
)
def test_box_mean_brute_force(shape, dims, windows, include_pad):
    x = _x(shape, 11)
    got = box_mean(x, dims, windows, include_pad)
    assert got.shape == x.shape
    torch.testing.assert_close(got, _box_brute(x, dims, windows, include_pad), **TOL)


def test_box_mean_of_ones_without_pad_is_one():
    x = torch.ones(2, 5, 6, dtype=DT)
    torch.testing.assert_close(box_mean(x, (1, 2), (3, 4), False), x, rtol=0, atol=1e-15)
    padded = box_mean(x, (1, 2), (3, 4), True)
    assert padded[0, 0, 0] < 1 and padded[0, 2, 2] == 1


# ---------------------------------------------------------------------------------- moments
@pytest.mark.parametrize("offset", [0.0, 1e4, -3e4])
def test_moments_non_negative_and_accurate_with_offset(offset):
    x = _x((16, 3, 50), 12, loc=offset, scale=1.0, dtype=torch.float32)
    mean, var = moments(x, (0, 2))
    assert mean.shape == (1, 3, 1) and var.dtype == torch.float32
    assert (var >= 0).all()
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2), correction=0, keepdim=True)
    # float32 at |x| ≲ 3e4: ulp 2^-9; a stable variance of unit noise is good to ~1e-3 relative
    torch.testing.assert_close(var.double(), ref_var, rtol=2e-3, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-4)


def test_moments_constant_is_exactly_zero_variance():
    for c in (0.1, 1e4, -7.3):
        x = torch.full((7, 2, 13), c)
        _, var = moments(x, (0, 2))
        assert (var >= 0).all() and (var < 1e-6 * max(1.0, c * c)).all()


def test_moments_low_precision_accumulates_in_float32():
    x = _x((8, 4, 64), 13, loc=50.0, scale=2.0, dtype=torch.bfloat16)
    mean, var = moments(x, (0, 2))
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    ref_var, ref_mean = torch.var_mean(x.float(), dim=(0, 2), correction=0, keepdim=True)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=0)
