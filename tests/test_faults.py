"""Fault tests: hostile inputs for every registered method (TESTING.md "Bad input" table).

Constant input, a mean offset of 1e4 in float32, huge and tiny scales, NaN, half/bfloat16 input
and zero-size batches. Each test states its tolerance from the float32 / bfloat16 numerics.
"""

from __future__ import annotations

import math

import pytest
import torch

import normkit as nk

# Whitening has its own fault suite (tests/test_whitening.py: rank-deficient, repeated
# eigenvalues, offsets, NaN); its error bounds grow with the group size. Conditional methods are
# BN / IN / LN (covered here) with a per-sample recovery, tested in tests/test_conditional.py.
METHODS = sorted(set(nk.list_methods()) - set(nk.list_methods(family="whitening"))
                 - set(nk.list_methods(family="conditional")))
NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
C = 16
CENTERED = {"bn", "ln", "in", "gn", "pn", "batch_group_norm", "lcn", "divisive_norm",
            "mean_only_bn", "l1_bn", "range_bn",
            # ch. 5-6 families: standardizations with mixed or robust statistics
            "switchable_norm", "bin", "ibn", "bcn", "mode_norm", "mixture_norm", "task_norm",
            "batch_renorm", "ghost_bn", "momentum_bn", "cross_iteration_bn", "mabn",
            "eval_norm", "kalman_norm"}
BATCH_DEPENDENT = {"bn", "batch_group_norm", "mean_only_bn", "l1_bn", "range_bn",
                   "switchable_norm", "bin", "ibn", "evonorm_b0", "bcn", "mode_norm", "mixture_norm",
                   "task_norm", "batch_renorm", "ghost_bn", "momentum_bn", "cross_iteration_bn",
                   "mabn", "eval_norm", "kalman_norm", "power_norm"}
STREAMING = {"online_norm"}  # sample t is normalized with estimates left by the samples before it


def make(name, *, native=True, dtype=None, **kw):
    if name in ("gn", "batch_group_norm"):
        kw.setdefault("num_groups", 4)
    if name == "lcn":
        kw.setdefault("num_groups", 2)
        kw.setdefault("window", 5)
    if name == "divisive_norm":
        kw.setdefault("channel_window", 3)
    if name == "rms_norm":  # its default eps=None resolves per dtype (as torch): pin it so the
        kw.setdefault("eps", 1e-6)  # float32 and float64 modules compute the same function
    return nk.create(name, C, native=native, dtype=dtype, **kw)


def _has_native(name) -> bool:
    return make(name)._native is not None


# (name, native): the generic path separately only where a native kernel exists
CASES = [pytest.param(n, nat, id=f"{n}-{'native' if nat else 'generic'}")
         for n in METHODS for nat in ((True, False) if _has_native(n) else (True,))]


def _x(shape, seed, loc=0.0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)


def _amplification(name, m) -> float:
    """How much the normalization can amplify an absolute error of x - mean on constant input."""
    if name in ("l1_bn", "range_bn"):
        return 1 / m.eps  # (x − μ)/(s + ε) with s = 0
    if name == "divisive_norm":
        return 1 / math.sqrt(m.nop.k)  # (x − μ)/√(σ² + Var)
    if name == "mean_only_bn":
        return 1.0
    if name in CENTERED:
        return 1 / math.sqrt(m.eps)  # (x − μ)/√(0 + ε)
    return 1.0


# ------------------------------------------------------------------------------ constant input
@pytest.mark.parametrize("name,native", CASES)
@pytest.mark.parametrize("c", [0.0, 0.1, -1234.5])
def test_constant_input_finite_output_and_gradients(name, native, c):
    m32 = make(name, native=native)
    x = torch.full((4, C, 5, 5), c, requires_grad=True)
    y = m32(x)
    assert torch.isfinite(y).all()
    (y * _x(y.shape, 1)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in m32.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    y64 = make(name, native=native, dtype=torch.float64)(x.detach().double())
    amp = _amplification(name, m32)
    if name in CENTERED:
        # exactly 0 in exact arithmetic: float64 only shows its own round-off of the same kind
        assert (y64.abs() <= 4 * 2.0**-53 * abs(c) * amp + 1e-12).all()
    # float32: the mean is within a few ulp of c and the folded shift −μ·s is rounded once,
    # so |y − y64| ≤ a few · 2⁻²⁴·|c| times the amplification of x − μ (1/√ε, or 1/ε for L1/range)
    bound = 4 * 2.0**-24 * abs(c) * amp + 1e-6 * (1 + y64.abs())
    assert ((y.double() - y64).abs() <= bound).all(), (y.double() - y64).abs().max()


# ------------------------------------------------------------------------- mean offset 1e4
@pytest.mark.parametrize("name,native", CASES)
def test_mean_offset_1e4_float32(name, native):
    # Unit-variance noise on a 1e4 offset. The reference is the float64 module on the *same*
    # float32 values (so the quantization of the input is not an error). Float32 has ulp(1e4) =
    # 2^-10 ≈ 1e-3: the mean and the folded shift −μ·s are each within ~1 ulp of 1e4, so a correct
    # two-pass / Welford variance leaves |Δy| ≲ 2·2^-10/σ ≈ 2e-3 for σ ≈ 1 (groups of ≥ 64
    # values). The naive E[x²] − E[x]² loses everything: E[x²] ≈ 1e8 has ulp 8, so σ² would be
    # off by O(1) or negative.
    m32, m64 = make(name, native=native), make(name, native=native, dtype=torch.float64)
    x = _x((8, C, 6, 6), 0, loc=1e4)
    y32, y64 = m32(x), m64(x.double())
    err = (y32.double() - y64).abs().max().item()
    # + 4e-6·max|y| for layers that do not centre: EvoNorm-S0's output keeps the 1e4 offset
    # (|y| ≈ 1.6e4), so its float32 relative error — the group variance accumulated over 144
    # values of ~1e4 in float32 (≈ 144·2⁻²⁴/2 ≈ 4e-6 worst case) — shows as ~0.02 absolute.
    assert err < 4e-3 + 4e-6 * y64.abs().max().item(), err
    for (k, b32), (_, b64) in zip(m32.named_buffers(), m64.named_buffers(), strict=True):
        if k.startswith("running_var") or k.startswith("running_scale"):
            # unbiased variance of ~N(0, 1) noise ≈ 0.9·1 + 0.1·1: a relative error of 1e-3 is
            # the same ulp(1e4) argument; a naive variance would be off by orders of magnitude
            torch.testing.assert_close(b32.double(), b64, rtol=1e-3, atol=1e-3)
        elif k.startswith("running_mean"):
            torch.testing.assert_close(b32.double(), b64, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["bn", "gn", "ln", "in"])
def test_mean_offset_1e4_variance_is_right(name):
    # The normalized output of unit-variance noise must have unit variance, not 0 or NaN.
    x = _x((8, C, 6, 6), 3, loc=1e4)
    y = make(name)(x)
    var = y.double().var(unbiased=False).item()
    assert abs(var - 1.0) < 1e-2, var


# ---------------------------------------------------------------------- huge and tiny scales
@pytest.mark.parametrize("name,native", CASES)
@pytest.mark.parametrize("scale", [1e6, 1e-6])
def test_huge_and_tiny_scales_are_finite(name, native, scale):
    m = make(name, native=native)
    x = _x((4, C, 5, 5), 2, loc=0.5 * scale, scale=scale).requires_grad_()
    y = m(x)
    assert torch.isfinite(y).all()
    (y * _x(y.shape, 4)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    if name in ("bn", "gn", "ln", "in", "pn") and scale > 1:
        # σ² ≫ ε: a plain standardization, unit variance per group
        assert abs(y.double().var(unbiased=False).item() - 1) < 1e-2


# ----------------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("name,native", CASES)
def test_nan_propagates_to_the_output(name, native):
    m = make(name, native=native)
    x = _x((4, C, 5, 5), 5)
    x[1, 3, 2, 2] = float("nan")
    y = m(x)
    assert torch.isnan(y[1, 3, 2, 2])
    if name in BATCH_DEPENDENT:
        # The NaN is part of the batch statistics of its channel: the whole channel is NaN.
        assert torch.isnan(y[:, 3]).all()
    if name in STREAMING:
        # The NaN enters the estimates after its sample: the samples before it are untouched, the
        # later samples' channel 3 is NaN, their other channels finite (documented).
        assert torch.isfinite(y[0]).all() and torch.isnan(y[2:, 3]).all()
        assert torch.isfinite(y[2:, :3]).all() and torch.isfinite(y[2:, 4:]).all()
    # Other samples of per-sample methods are untouched.
    elif name not in BATCH_DEPENDENT:
        assert torch.isfinite(y[0]).all() and torch.isfinite(y[2:]).all()


@NATIVE
def test_nan_enters_running_buffers_like_torch_bn(native):
    # Documented behaviour (Normalization docstring): running buffers are updated with whatever the
    # batch holds, so a NaN input poisons the running statistics of its channel exactly as in
    # torch.nn.BatchNorm; reset_running_stats() recovers.
    ours, ref = nk.BatchNorm(C, native=native), torch.nn.BatchNorm2d(C)
    x = _x((4, C, 3, 3), 6)
    x[0, 2, 0, 0] = float("nan")
    ours(x), ref(x)
    for k in ("running_mean", "running_var"):
        a, b = getattr(ours, k), getattr(ref, k)
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.isnan(a[2]) and torch.isfinite(a[torch.arange(C) != 2]).all()
    ours.reset_running_stats()
    assert torch.isfinite(ours.running_mean).all() and torch.isfinite(ours.running_var).all()


@pytest.mark.parametrize("name,native", CASES)
def test_inf_input_gives_nan_or_inf_not_silence(name, native):
    # An Inf in a group has an undefined mean/variance: the output there must not look finite.
    m = make(name, native=native)
    x = _x((4, C, 5, 5), 5)
    x[1, 3, 2, 2] = float("inf")
    y = m(x)
    assert not torch.isfinite(y[1, 3, 2, 2])


# ---------------------------------------------------------------------- half / bfloat16
LOW = [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)]


WITH_AFFINE_SWITCH = CENTERED | {"rms_norm"}
LOW_CASES = [pytest.param(n, nat, a, id=f"{n}-{'native' if nat else 'generic'}-{a}")
             for n in METHODS for nat in ((True, False) if _has_native(n) else (True,))
             for a in ((True, False) if n in WITH_AFFINE_SWITCH else (None,))]


@pytest.mark.parametrize("name,native,affine", LOW_CASES)
@pytest.mark.parametrize("dtype,ulp", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", [(8, C, 6, 6), (1, C, 9)], ids=["2d", "1d_batch1"])
def test_low_precision_statistics_in_float32(name, native, affine, dtype, ulp, shape):
    # Input with a mean offset of 50 (bf16 spacing there is 0.25): statistics accumulated in the
    # input dtype would shift the mean by ≳ 0.1, i.e. several output ulps. The reference is the
    # float32 module on the upcast input; the only allowed difference is the final rounding of
    # the output to the low dtype: one ulp of the output, i.e. |Δ| ≤ ulp·|ref| (+ a tiny atol for
    # outputs near 0 where the float32 pre-rounding values may differ by reduction order).
    kw = {} if affine is None else {"affine": affine}
    low = make(name, native=native, **kw)
    ref = make(name, native=native, **kw)
    x = _x(shape, 8, loc=50.0, scale=2.0, dtype=dtype)
    y = low(x)
    assert y.dtype == dtype
    expected = ref(x.float())
    torch.testing.assert_close(y.float(), expected.to(dtype).float(), rtol=ulp, atol=1e-5)
    for (k, b_low), (_, b_ref) in zip(low.named_buffers(), ref.named_buffers(), strict=True):
        assert b_low.dtype == b_ref.dtype, k  # buffers stay float32 (long for the counter)
        torch.testing.assert_close(b_low, b_ref, rtol=1e-5, atol=1e-6, msg=lambda s, k=k: f"{k}: {s}")


LOW_CONFIGS = {
    "bn_plain_untracked": ("bn", dict(affine=False, track_running_stats=False)),
    "bn_untracked": ("bn", dict(track_running_stats=False)),
    "bn_channels_last": ("bn", dict(channel_axis=-1)),
    "in_tracked": ("in", dict(track_running_stats=True)),
    "in_affine_tracked": ("in", dict(affine=True, track_running_stats=True)),
    "ln_channels_last": ("ln", dict(channel_axis=-1)),
    "rms_channels_last": ("rms_norm", dict(channel_axis=-1)),
}


@NATIVE
@pytest.mark.parametrize("config", list(LOW_CONFIGS))
@pytest.mark.parametrize("dtype,ulp", LOW, ids=["bf16", "f16"])
def test_low_precision_statistics_in_float32_configs(config, native, dtype, ulp):
    # Same criterion as above for the configurations that dispatch to other torch kernels; also
    # in eval after two training steps (the running buffers must have been fed float32 stats).
    name, kw = LOW_CONFIGS[config]
    low, ref = make(name, native=native, **kw), make(name, native=native, **kw)
    last = kw.get("channel_axis", 1) == -1
    for step in range(3):
        if step == 2:
            low.eval(), ref.eval()
        x = _x((8, C, 6, 6), 20 + step, loc=50.0, scale=2.0, dtype=dtype)
        x = x.movedim(1, -1) if last else x
        y = low(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref(x.float()).to(dtype).float(), rtol=ulp, atol=1e-5,
                                   msg=lambda s, step=step: f"step {step}: {s}")


# --------------------------------------------------------------------------- zero-size batch
@pytest.mark.parametrize("name,native", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_zero_size_batch(name, native, train):
    m = make(name, native=native)
    m(_x((4, C, 3, 3), 9))  # non-trivial buffers first
    m.train(train)
    before = {k: b.clone() for k, b in m.named_buffers()}
    x = torch.empty(0, C, 3, 3, requires_grad=True)
    y = m(x)
    assert y.shape == (0, C, 3, 3) and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    after = dict(m.named_buffers())
    assert set(before) == set(after)
    for k, b in before.items():
        assert torch.equal(b, after[k]), f"{k} changed on an empty batch"


@NATIVE
@pytest.mark.parametrize("name", ["bn", "ln", "rms_norm"])
def test_zero_size_batch_channels_last(name, native):
    m = make(name, native=native, channel_axis=-1)
    y = m(torch.empty(0, 5, C))
    assert y.shape == (0, 5, C)
