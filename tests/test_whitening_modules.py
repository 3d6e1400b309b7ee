"""Whitening presets of ``normkit.methods.whitening`` (see ``tests/test_whitening.py``):
equivalences (group size 1 = BN, one group = LN, ...), running estimates and eval against their
formulas, buffers, state_dict, folding, gradcheck, errors and a smaller last group.
Helpers, the presets and the numerics behind the tolerances: ``tests/whitening_util.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import normkit as nk
from whitening_util import (
    _REGISTERED,
    DT,
    ESTIMATES,
    EXACT_METHODS,
    PRESETS,
    BatchWhitening,
    CholeskyBatchWhitening,
    DecorrelatedBatchNorm,
    GroupWhitening,
    InstanceWhitening,
    IterNorm,
    PCABatchWhitening,
    _eye,
    _gen,
    batch_groups,
    correlated,
    cov_rows,
    make_preset,
    randomize_affine,
    ref_matrix,
    running_name,
)


# ============================================================================ modules
def test_import_registers_the_presets():
    assert {"dbn", "pca_bw", "cd_bw", "iternorm", "group_whitening", "instance_whitening"} <= _REGISTERED


@pytest.mark.parametrize("name", ["dbn", "pca_bw", "cd_bw"])
def test_batch_whitened_covariance_is_identity(name):
    c, d = 8, 4
    x = correlated(512, c, 14, 2, 2)  # m = 2048 ≫ d per group
    mod = make_preset(name, c, d, eps=1e-9, dtype=DT)
    y = mod(x)
    # λ_min(Σ) ≈ 0.3 here: ε-bias ε/λ_min ≈ 3e-9; float64 round-off ≪ 1e-10
    torch.testing.assert_close(cov_rows(batch_groups(y, d)), _eye(d).expand(c // d, d, d),
                               rtol=0, atol=1e-6)
    if name == "cd_bw":  # the transform itself is lower-triangular: row i uses channels ≤ i
        xg = batch_groups(x, d)
        xc = xg - xg.mean(-1, keepdim=True)
        m = torch.linalg.lstsq(xc.transpose(-1, -2), batch_groups(y, d).transpose(-1, -2)).solution
        torch.testing.assert_close(m.transpose(-1, -2).triu(1), torch.zeros(c // d, d, d, dtype=DT),
                                   rtol=0, atol=1e-8)


def test_iternorm_whitens_with_enough_iterations():
    c, d = 8, 4
    x = correlated(512, c, 15, 2, 2)
    y = IterNorm(c, group_size=d, iterations=40, eps=1e-9, dtype=DT)(x)
    torch.testing.assert_close(cov_rows(batch_groups(y, d)), _eye(d).expand(c // d, d, d),
                               rtol=0, atol=1e-6)
    # and only approximately with few iterations, the error falling with T
    errs = [(cov_rows(batch_groups(IterNorm(c, group_size=d, iterations=t, eps=1e-9, dtype=DT)(x), d))
             - _eye(d)).norm().item() for t in (1, 2, 3, 5, 8)]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[0] > 1e-2


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky", "newton"])
@pytest.mark.parametrize("estimate", ESTIMATES)
def test_group_size_one_equals_batch_norm(method, estimate):
    x = correlated(16, 4, 16, 3, 3)
    wb = BatchWhitening(4, group_size=1, method=method, estimate=estimate, dtype=DT)
    bn = nk.BatchNorm(4, dtype=DT)
    randomize_affine(wb, 17)
    randomize_affine(bn, 17)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = wb(xa), bn(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    g = torch.randn(ya.shape, generator=_gen(18), dtype=DT)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(wb.weight.grad, bn.weight.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(wb.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    if estimate == "covariance":  # running Σ of a 1×1 group is BN's (unbiased) running_var
        assert wb.running_cov.shape == (4, 1, 1)
        torch.testing.assert_close(wb.running_cov.flatten(), bn.running_var, rtol=1e-12, atol=1e-12)
        wb.eval()
        bn.eval()
        torch.testing.assert_close(wb(x), bn(x), rtol=1e-10, atol=1e-10)


def test_group_whitening_one_group_equals_layer_norm():
    x = correlated(3, 8, 19, 4, 4)
    gw = GroupWhitening(8, num_groups=1, affine=False, dtype=DT)
    torch.testing.assert_close(gw(x), nk.LayerNorm(8, affine=False, dtype=DT)(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky", "newton"])
def test_instance_whitening_group_size_one_equals_instance_norm(method):
    x = correlated(3, 4, 20, 5, 5)
    iw = InstanceWhitening(4, group_size=1, method=method, dtype=DT)
    torch.testing.assert_close(iw(x), nk.InstanceNorm(4, dtype=DT)(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_group_whitening_whitens_the_group_vectors_per_sample(method):
    n, c, g = 3, 8, 4
    x = correlated(n, c, 21, 16, 16)  # (C/g)·HW = 512 ≫ g
    y = GroupWhitening(c, num_groups=g, method=method, eps=1e-9, dtype=DT)(x)
    rows = y.reshape(n, g, -1)  # group a = channels a·C/g … (a+1)·C/g − 1, all positions
    torch.testing.assert_close(cov_rows(rows), _eye(g).expand(n, g, g), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_instance_whitening_whitens_each_sample(method):
    n, c, d = 2, 8, 4
    x = correlated(n, c, 22, 16, 16)
    y = InstanceWhitening(c, group_size=d, method=method, eps=1e-9, dtype=DT)(x)
    rows = y.reshape(n, c // d, d, -1)
    torch.testing.assert_close(cov_rows(rows), _eye(d).expand(n, c // d, d, d), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("estimate", ESTIMATES)
def test_running_estimates_and_eval_follow_the_formulas(name, estimate):
    c, d, eps, mom = 6, 3, 1e-3, 0.1
    _, method = PRESETS[name]
    mod = make_preset(name, c, d, estimate=estimate, eps=eps, momentum=mom, dtype=DT)
    randomize_affine(mod, 23)
    x1 = correlated(10, c, 24, 3)
    mod(x1)
    xg = batch_groups(x1, d)
    m = xg.shape[-1]
    sigma_b = cov_rows(xg)
    torch.testing.assert_close(mod.running_mean, mom * x1.mean((0, 2)), rtol=1e-12, atol=1e-12)
    if estimate == "matrix":
        expected = (1 - mom) * _eye(d) + mom * ref_matrix(sigma_b, method, eps)
        torch.testing.assert_close(mod.running_matrix, expected, rtol=1e-9, atol=1e-9)
    else:
        expected = (1 - mom) * _eye(d) + mom * sigma_b * m / (m - 1)  # unbiased, as BN's var
        torch.testing.assert_close(mod.running_cov, expected, rtol=1e-12, atol=1e-12)
    assert int(mod.num_batches_tracked) == 1
    for seed in (25, 26):  # a few more batches
        mod(correlated(10, c, seed, 3))
    mod.eval()
    x = correlated(4, c, 27, 3)
    before = {k: b.clone() for k, b in mod.named_buffers()}
    y = mod(x)
    for k, b in mod.named_buffers():  # eval never updates
        assert torch.equal(b, before[k]), k
    mat = (mod.running_matrix if estimate == "matrix"
           else ref_matrix(mod.running_cov, method, eps))
    mean = mod.running_mean.reshape(c // d, d, 1)
    expected = mat @ (batch_groups(x, d) - mean)  # (C/d, d, N·S)
    expected = expected.reshape(c, x.shape[0], -1).transpose(0, 1).reshape(x.shape)
    expected = expected * mod.weight[:, None] + mod.bias[:, None]
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("estimate", ESTIMATES)
def test_momentum_one_eval_reproduces_train(estimate):
    # momentum 1: the running statistics are the last batch's, so eval repeats the train transform
    # (the covariance estimate is unbiased: Σ·m/(m−1), which changes W unless m is large).
    x = correlated(2000, 4, 28)
    mod = DecorrelatedBatchNorm(4, group_size=4, estimate=estimate, momentum=1.0, eps=1e-9, dtype=DT)
    y_train = mod(x)
    mod.eval()
    scale = 1.0 if estimate == "matrix" else math.sqrt((2000 - 1) / 2000)
    torch.testing.assert_close(mod(x), y_train * scale, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("estimate", ESTIMATES)
def test_buffer_shapes_and_reset(estimate):
    c, d = 12, 4
    mod = DecorrelatedBatchNorm(c, group_size=d, estimate=estimate)
    key = "running_matrix" if estimate == "matrix" else "running_cov"
    bufs = dict(mod.named_buffers())
    assert set(bufs) == {"running_mean", key, "num_batches_tracked"}
    assert bufs["running_mean"].shape == (c,)
    assert bufs[key].shape == (c // d, d, d)
    assert torch.equal(bufs[key], torch.eye(d).expand(c // d, d, d))
    for seed in range(3):
        mod(correlated(8, c, seed, 2, dtype=torch.float32))
    assert not torch.equal(mod.running_mean, torch.zeros(c))
    assert not torch.equal(getattr(mod, key), torch.eye(d).expand(c // d, d, d))
    mod.reset_running_stats()
    assert torch.equal(mod.running_mean, torch.zeros(c))
    assert torch.equal(getattr(mod, key), torch.eye(d).expand(c // d, d, d))
    assert int(mod.num_batches_tracked) == 0


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("estimate", ESTIMATES)
def test_state_dict_round_trip(name, estimate):
    c, d = 8, 4
    a = make_preset(name, c, d, estimate=estimate, dtype=DT)
    randomize_affine(a, 29)
    for seed in range(3):
        a(correlated(6, c, seed, 3))
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "num_batches_tracked",
                       "running_matrix" if estimate == "matrix" else "running_cov"}
    b = make_preset(name, c, d, estimate=estimate, dtype=DT)
    b.load_state_dict(sd)
    for k, v in b.state_dict().items():
        assert torch.equal(v, sd[k]), k
    a.eval()
    b.eval()
    x = correlated(5, c, 30, 3)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    c2 = copy.deepcopy(a)
    torch.testing.assert_close(c2(x), a(x), rtol=0, atol=0)


def test_channels_last_equals_channels_first():
    x = correlated(6, 8, 31, 5)
    a = DecorrelatedBatchNorm(8, group_size=4, dtype=DT)
    b = DecorrelatedBatchNorm(8, group_size=4, channel_axis=-1, dtype=DT)
    torch.testing.assert_close(b(x.movedim(1, -1)), a(x).movedim(1, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.running_matrix, a.running_matrix, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(PRESETS))
def test_folded_matches_eval(name):
    c, d = 8, 4
    mod = make_preset(name, c, d, dtype=DT)
    randomize_affine(mod, 32)
    mod(correlated(16, c, 33, 2))
    mod.eval()
    mat, b = mod.folded()
    assert mat.shape == (c // d, d, d) and b.shape == (c,)
    x = correlated(3, c, 34, 2)
    expected = (mat @ batch_groups(x, d)).reshape(c, 3, -1).transpose(0, 1).reshape(x.shape)
    torch.testing.assert_close(mod(x), expected + b[:, None], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c", [3, 12, 24, 40, 48, 96])
def test_default_group_size_divides_any_channel_count(c):
    # registry contract: every preset is constructible as cls(num_features) (norm_layer=...)
    for cls in (DecorrelatedBatchNorm, PCABatchWhitening, CholeskyBatchWhitening, IterNorm):
        mod = cls(c)
        d = mod.groups[1]
        assert c % d == 0 and d <= 16
        mod(torch.randn(8, c, 4, 4))
    assert c % GroupWhitening(c).groups[0] == 0


# ---------------------------------------------------------------------------- gradcheck
MODULES = {
    "dbn": lambda: DecorrelatedBatchNorm(4, group_size=2, dtype=DT),
    "pca_bw": lambda: PCABatchWhitening(4, group_size=4, dtype=DT),
    "cd_bw": lambda: CholeskyBatchWhitening(4, group_size=4, dtype=DT),
    "iternorm": lambda: IterNorm(4, group_size=2, iterations=3, dtype=DT),
    "dbn_cov": lambda: DecorrelatedBatchNorm(4, group_size=4, estimate="covariance", dtype=DT),
    "group_whitening": lambda: GroupWhitening(4, num_groups=2, affine=True, dtype=DT),
    "instance_whitening": lambda: InstanceWhitening(4, group_size=2, affine=True, dtype=DT),
    "instance_whitening_pca": lambda: InstanceWhitening(4, group_size=2, method="pca", dtype=DT),
}


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_module_gradcheck(name, mode):
    mod = MODULES[name]()
    randomize_affine(mod, 35)
    x = correlated(6, 4, 36, 2)  # (6, 4, 2): 12 samples per batch group, 2 positions per instance
    if mode == "eval":
        if mod.running_mean is not None:  # per-sample methods have no eval state
            for seed in range(2):
                mod(correlated(6, 4, seed, 2))
        mod.eval()
    params = tuple(mod.parameters())

    names = [n for n, _ in mod.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps, strict=True)), (x,))

    inputs = (x.requires_grad_(), *(p.detach().clone().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(f, inputs)


# ---------------------------------------------------------------------------- errors
def test_group_count_must_divide_channels():
    with pytest.raises(nk.ConfigError, match=r"\(6\).*\(4\)"):
        GroupWhitening(6, num_groups=4)
    with pytest.raises(nk.ConfigError, match=r"group_size \(7\) must be at most num_features \(6\)"):
        DecorrelatedBatchNorm(6, group_size=7)
    # standardization has no use for a smaller last group: Batch(group_size) must divide there
    with pytest.raises(nk.ConfigError, match="only whitening allows a smaller last group"):
        nk.Normalization(6, nap=nk.nap.Batch(group_size=4), nop=nk.nop.Standardize())


# ------------------------------------------------------------------ a smaller last group
@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("estimate", ["matrix", "covariance"])
@pytest.mark.parametrize("shape", [(40, 10, 3), (60, 10)], ids=["in_place", "matrix_layout"])
def test_smaller_last_group_equals_a_separate_module(name, estimate, shape):
    """C = 10, d = 4: groups of 4, 4 and 2. Each group, the last included, gives exactly what a
    module over its channels alone gives — train output, running estimates and eval — and the
    padding never shows: output and running mean have C channels, eval folds to C."""
    c, d = 10, 4
    mod = make_preset(name, c, d, estimate=estimate, dtype=DT)
    randomize_affine(mod, 3)
    parts = [make_preset(name, 4, 4, estimate=estimate, dtype=DT) for _ in range(2)]
    parts.append(make_preset(name, 2, 2, estimate=estimate, dtype=DT))
    with torch.no_grad():
        for i, p in enumerate(parts):
            p.weight.copy_(mod.weight[4 * i: 4 * i + p.num_features])
            p.bias.copy_(mod.bias[4 * i: 4 * i + p.num_features])
    spans = [slice(0, 4), slice(4, 8), slice(8, 10)]
    for seed in range(2):
        x = correlated(shape[0], c, 60 + seed, *shape[2:])
        y = mod(x)
        assert y.shape == x.shape and y.is_contiguous()
        for p, sl in zip(parts, spans, strict=True):
            torch.testing.assert_close(y[:, sl], p(x[:, sl]), rtol=1e-9, atol=1e-9)
    assert mod.running_mean.shape == (c,)
    running = getattr(mod, f"running_{'matrix' if estimate == 'matrix' else 'cov'}")
    assert running.shape == (3, d, d)
    torch.testing.assert_close(mod.running_mean[8:], parts[2].running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(running[2, :2, :2], getattr(parts[2], running_name(estimate))[0],
                               rtol=1e-12, atol=1e-12)
    mod.eval()
    for p in parts:
        p.eval()
    x = correlated(7, c, 70, *shape[2:])
    y = mod(x)
    for p, sl in zip(parts, spans, strict=True):
        torch.testing.assert_close(y[:, sl], p(x[:, sl]), rtol=1e-9, atol=1e-9)
    mat, shift = mod.folded()
    assert mat.shape == (3, d, d) and shift.shape == (c,)
    full = torch.block_diag(*mat)[:c, :c]
    xf = x.movedim(1, -1)
    torch.testing.assert_close((xf @ full.T + shift).movedim(-1, 1), y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("native", [True, False], ids=["fused", "composition"])
def test_smaller_last_group_gradcheck(native):
    mod = DecorrelatedBatchNorm(5, group_size=2, dtype=DT, native=native)  # groups 2, 2, 1
    randomize_affine(mod, 4)
    names = [n for n, _ in mod.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in mod.parameters()]

    def f(x, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps, strict=True)), (x,))

    x = correlated(6, 5, 5, 2).requires_grad_()
    assert torch.autograd.gradcheck(f, (x, *params))


def test_smaller_last_group_instance_whitening_and_stateless():
    x = correlated(3, 5, 8, 12)
    y = InstanceWhitening(5, group_size=3, dtype=DT)(x)
    torch.testing.assert_close(y[:, 3:], InstanceWhitening(2, group_size=2, dtype=DT)(x[:, 3:]),
                               rtol=1e-9, atol=1e-9)
    z = nk.normalize(x, nap=nk.nap.Batch(group_size=3), nop=nk.nop.Whiten(), eps=1e-5)
    torch.testing.assert_close(z[:, 3:], nk.normalize(
        x[:, 3:], nap=nk.nap.Batch(group_size=2), nop=nk.nop.Whiten(), eps=1e-5),
        rtol=1e-9, atol=1e-9)


def test_invalid_method_estimate_iterations():
    with pytest.raises(nk.ConfigError, match="'svd'"):
        BatchWhitening(4, group_size=2, method="svd")
    with pytest.raises(nk.ConfigError, match="'svd'"):
        GroupWhitening(4, num_groups=2, method="svd")
    with pytest.raises(nk.ConfigError, match="'svd'"):
        InstanceWhitening(4, method="svd")
    with pytest.raises(nk.ConfigError, match="'running'"):
        DecorrelatedBatchNorm(4, group_size=2, estimate="running")
    with pytest.raises(nk.ConfigError, match="iterations"):
        IterNorm(4, group_size=2, iterations=0)
    with pytest.raises(nk.ConfigError, match="iterations"):
        BatchWhitening(4, group_size=2, method="newton", iterations=65)
    with pytest.raises(nk.ConfigError, match="eps"):
        DecorrelatedBatchNorm(4, group_size=2, eps=0.0)


def test_training_needs_more_than_one_value():
    with pytest.raises(nk.ShapeError, match="more than 1"):
        DecorrelatedBatchNorm(4, group_size=2)(torch.randn(1, 4))


@pytest.mark.parametrize("name", ["dbn", "pca_bw", "cd_bw", "iternorm", "group_whitening",
                                  "instance_whitening", "switchable_whitening"])
@pytest.mark.parametrize("bad", [0, -4, True])
def test_default_grouping_rejects_bad_num_features(name, bad):
    # the default group size / count is derived from C: a bad C must get the usual message,
    # not a failure inside that derivation
    with pytest.raises(nk.ConfigError, match=rf"num_features must be a positive int, got {bad}"):
        nk.create(name, bad)
