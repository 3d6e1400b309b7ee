"""Reference tests: every registered preset against a float64 formula written here from the math.

The formulas come from METHODS.md and the class docstrings, not from normkit's internals. All
computations are float64, so the only differences are reduction-order round-off (~1e-15 relative);
``TOL`` leaves a wide margin while still catching any real formula error (a wrong ε placement, a
biased/unbiased mix-up or a wrong area changes the output by ≥ 1e-6).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import normkit as nk

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
EPS = 1e-3  # larger than the default so that a misplaced ε is visible at TOL


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, seed=0, loc=0.7, scale=2.3):
    return torch.randn(*shape, generator=_gen(seed), dtype=DT) * scale + loc


def _randomize(m: torch.nn.Module, seed: int = 123) -> None:
    g = _gen(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _bc(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel (C,) tensor broadcast against (N, C, *spatial)."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _affine(y, m, x):
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    if w is not None:
        y = y * (_bc(w, x) if w.numel() > 1 else w)
    if b is not None:
        y = y + _bc(b, x)
    return y


def _sp(x):
    return tuple(range(2, x.dim()))


# --------------------------------------------------------------------------- batch-dependent
BATCH_SHAPES = [(8, 6), (4, 6, 7), (4, 6, 5, 3), (2, 6, 3, 4, 2)]


def _bn_stats(x):
    d = (0, *_sp(x))
    return x.mean(d), x.var(d, unbiased=False), x.var(d, unbiased=True)


def _bgn_stats(x, g):
    n, c = x.shape[:2]
    v = x.reshape(n, g, c // g, -1)
    return v.mean((0, 2, 3)), v.var((0, 2, 3), unbiased=False), v.var((0, 2, 3), unbiased=True)


def _expand_groups(t, c):  # (g,) -> (C,) with consecutive channel groups
    return t.repeat_interleave(c // t.numel())


@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_bn_train_eval_running(shape):
    m = nk.BatchNorm(6, eps=EPS, dtype=DT)
    _randomize(m)
    xs = [_x(shape, s) for s in (1, 2)]
    rm, rv = torch.zeros(6, dtype=DT), torch.ones(6, dtype=DT)
    for x in xs:
        mu, var, uvar = _bn_stats(x)
        ref = _affine((x - _bc(mu, x)) / torch.sqrt(_bc(var, x) + EPS), m, x)
        torch.testing.assert_close(m(x), ref, **TOL)
        rm, rv = 0.9 * rm + 0.1 * mu, 0.9 * rv + 0.1 * uvar
    torch.testing.assert_close(m.running_mean, rm, **TOL)
    torch.testing.assert_close(m.running_var, rv, **TOL)
    assert int(m.num_batches_tracked) == 2
    m.eval()
    x = _x(shape, 3)
    ref = _affine((x - _bc(rm, x)) / torch.sqrt(_bc(rv, x) + EPS), m, x)
    torch.testing.assert_close(m(x), ref, **TOL)


@pytest.mark.parametrize("shape", BATCH_SHAPES[1:])
def test_batch_group_norm_train_eval_running(shape):
    g = 3
    m = nk.BatchGroupNorm(6, num_groups=g, eps=EPS, dtype=DT)
    _randomize(m)
    rm, rv = torch.zeros(g, dtype=DT), torch.ones(g, dtype=DT)
    for s in (1, 2):
        x = _x(shape, s)
        mu, var, uvar = _bgn_stats(x, g)
        ref = (x - _bc(_expand_groups(mu, 6), x)) / torch.sqrt(_bc(_expand_groups(var, 6), x) + EPS)
        torch.testing.assert_close(m(x), _affine(ref, m, x), **TOL)
        rm, rv = 0.9 * rm + 0.1 * mu, 0.9 * rv + 0.1 * uvar
    assert m.running_mean.shape == (g,)
    torch.testing.assert_close(m.running_mean, rm, **TOL)
    torch.testing.assert_close(m.running_var, rv, **TOL)
    m.eval()
    x = _x(shape, 3)
    ref = (x - _bc(_expand_groups(rm, 6), x)) / torch.sqrt(_bc(_expand_groups(rv, 6), x) + EPS)
    torch.testing.assert_close(m(x), _affine(ref, m, x), **TOL)


@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_mean_only_bn_train_eval_running(shape):
    m = nk.MeanOnlyBatchNorm(6, dtype=DT)
    _randomize(m)
    assert m.weight is None and m.bias is not None
    rm = torch.zeros(6, dtype=DT)
    for s in (1, 2):
        x = _x(shape, s)
        mu = _bn_stats(x)[0]
        torch.testing.assert_close(m(x), x - _bc(mu, x) + _bc(m.bias, x), **TOL)
        rm = 0.9 * rm + 0.1 * mu
    torch.testing.assert_close(m.running_mean, rm, **TOL)
    m.eval()
    x = _x(shape, 3)
    torch.testing.assert_close(m(x), x - _bc(rm, x) + _bc(m.bias, x), **TOL)


@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_l1_bn_train_eval_running(shape):
    m = nk.L1BatchNorm(6, eps=EPS, dtype=DT)
    _randomize(m)
    rm, rs = torch.zeros(6, dtype=DT), torch.ones(6, dtype=DT)
    d = (0, *_sp(_x(shape)))
    for s in (1, 2):
        x = _x(shape, s)
        mu = x.mean(d)
        scale = math.sqrt(math.pi / 2) * (x - _bc(mu, x)).abs().mean(d)
        ref = (x - _bc(mu, x)) / (_bc(scale, x) + EPS)
        torch.testing.assert_close(m(x), _affine(ref, m, x), **TOL)
        rm, rs = 0.9 * rm + 0.1 * mu, 0.9 * rs + 0.1 * scale
    torch.testing.assert_close(m.running_mean, rm, **TOL)
    torch.testing.assert_close(m.running_scale, rs, **TOL)
    m.eval()
    x = _x(shape, 3)
    ref = (x - _bc(rm, x)) / (_bc(rs, x) + EPS)
    torch.testing.assert_close(m(x), _affine(ref, m, x), **TOL)


@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_range_bn_train_eval_running(shape):
    m = nk.RangeBatchNorm(6, eps=EPS, dtype=DT)
    _randomize(m)
    rm, rs = torch.zeros(6, dtype=DT), torch.ones(6, dtype=DT)
    d = (0, *_sp(_x(shape)))
    count = math.prod(shape) // 6
    cm = 1 / math.sqrt(2 * math.log(count))
    for s in (1, 2):
        x = _x(shape, s)
        mu = x.mean(d)
        scale = (x.amax(d) - x.amin(d)) * cm
        ref = (x - _bc(mu, x)) / (_bc(scale, x) + EPS)
        torch.testing.assert_close(m(x), _affine(ref, m, x), **TOL)
        rm, rs = 0.9 * rm + 0.1 * mu, 0.9 * rs + 0.1 * scale
    torch.testing.assert_close(m.running_mean, rm, **TOL)
    torch.testing.assert_close(m.running_scale, rs, **TOL)
    m.eval()
    x = _x(shape, 3)
    ref = (x - _bc(rm, x)) / (_bc(rs, x) + EPS)
    torch.testing.assert_close(m(x), _affine(ref, m, x), **TOL)


# --------------------------------------------------------------------------- per sample
SAMPLE_SHAPES = [(4, 6, 7), (3, 6, 5, 3), (2, 6, 3, 4, 2)]


def _standardize(x, dims):
    return (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + EPS)


@pytest.mark.parametrize("shape", [(8, 6), *SAMPLE_SHAPES])
def test_ln_over_all(shape):
    m = nk.LayerNorm(6, eps=EPS, dtype=DT)
    _randomize(m)
    for mode in ("train", "eval"):
        m.train(mode == "train")
        x = _x(shape, 1)
        ref = _standardize(x, tuple(range(1, x.dim())))
        torch.testing.assert_close(m(x), _affine(ref, m, x), **TOL)


@pytest.mark.parametrize("shape", SAMPLE_SHAPES)
def test_ln_over_channels_channels_first(shape):
    m = nk.LayerNorm(6, over="channels", eps=EPS, dtype=DT)
    _randomize(m)
    x = _x(shape, 1)
    torch.testing.assert_close(m(x), _affine(_standardize(x, (1,)), m, x), **TOL)


def test_ln_channels_last_transformer_layout():
    m = nk.LayerNorm(6, channel_axis=-1, eps=EPS, dtype=DT)
    _randomize(m)
    x = _x((3, 5, 6), 1)
    ref = _standardize(x, (-1,)) * m.weight + m.bias
    torch.testing.assert_close(m(x), ref, **TOL)


@pytest.mark.parametrize("shape", SAMPLE_SHAPES)
@pytest.mark.parametrize("train", [True, False])
def test_in(shape, train):
    m = nk.InstanceNorm(6, affine=True, eps=EPS, dtype=DT).train(train)
    _randomize(m)
    x = _x(shape, 1)
    torch.testing.assert_close(m(x), _affine(_standardize(x, _sp(x)), m, x), **TOL)


@pytest.mark.parametrize(
    "shape,groups",
    # (8, 6) with 6 groups has one value per group: a training error, not a reference case
    [(s, g) for s in [(8, 6), *SAMPLE_SHAPES] for g in (1, 2, 3, 6) if not (g == 6 and len(s) == 2)],
)
def test_gn(shape, groups):
    m = nk.GroupNorm(6, num_groups=groups, eps=EPS, dtype=DT)
    _randomize(m)
    x = _x(shape, 1)
    v = x.reshape(x.shape[0], groups, -1)
    ref = _standardize(v, (2,)).reshape(x.shape)
    torch.testing.assert_close(m(x), _affine(ref, m, x), **TOL)


@pytest.mark.parametrize("shape", SAMPLE_SHAPES)
def test_pn(shape):
    m = nk.PositionalNorm(6, affine=True, eps=EPS, dtype=DT)
    _randomize(m)
    x = _x(shape, 1)
    torch.testing.assert_close(m(x), _affine(_standardize(x, (1,)), m, x), **TOL)
    plain = nk.PositionalNorm(6, eps=EPS, dtype=DT)
    assert plain.weight is None and plain.bias is None
    torch.testing.assert_close(plain(x), _standardize(x, (1,)), **TOL)


@pytest.mark.parametrize("shape", [(8, 6), *SAMPLE_SHAPES])
def test_rms_norm_over_all(shape):
    m = nk.RMSNorm(6, eps=EPS, dtype=DT)
    _randomize(m)
    assert m.bias is None
    x = _x(shape, 1)
    d = tuple(range(1, x.dim()))
    ref = x / torch.sqrt(x.pow(2).mean(d, keepdim=True) + EPS) * _bc(m.weight, x)
    torch.testing.assert_close(m(x), ref, **TOL)


def test_rms_norm_channels_last():
    m = nk.RMSNorm(6, channel_axis=-1, eps=EPS, dtype=DT)
    _randomize(m)
    x = _x((3, 5, 6), 1)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * m.weight
    torch.testing.assert_close(m(x), ref, **TOL)


@pytest.mark.parametrize("shape", [(8, 6), *SAMPLE_SHAPES])
def test_scale_norm(shape):
    m = nk.ScaleNorm(6, eps=EPS, dtype=DT)
    assert m.weight.shape == (1,)
    torch.testing.assert_close(m.weight, torch.tensor([math.sqrt(6)], dtype=DT))
    _randomize(m)
    x = _x(shape, 1)
    d = tuple(range(1, x.dim()))
    ref = m.weight * x / torch.sqrt(x.pow(2).sum(d, keepdim=True) + EPS)
    torch.testing.assert_close(m(x), ref, **TOL)


def test_rms_norm_over_channels_channels_first():
    m = nk.RMSNorm(6, over="channels", eps=EPS, dtype=DT)
    _randomize(m)
    x = _x((2, 6, 3, 4), 1)
    ref = x / torch.sqrt(x.pow(2).mean(1, keepdim=True) + EPS) * _bc(m.weight, x)
    torch.testing.assert_close(m(x), ref, **TOL)


def test_scale_norm_channels_last():
    m = nk.ScaleNorm(6, channel_axis=-1, init=2.5, eps=EPS, dtype=DT)
    x = _x((3, 5, 6), 1)
    ref = 2.5 * x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + EPS)
    torch.testing.assert_close(m(x), ref, **TOL)


# --------------------------------------------------------------------------- local windows
def _window(i: int, w: int, n: int) -> range:
    """Centred window of size w around i (w//2 before, (w-1)//2 after), clipped to [0, n)."""
    return range(max(0, i - w // 2), min(n, i + (w - 1) // 2 + 1))


def _brute_local(x, chan_sets, windows, fn):
    """y[n, c, p] = fn(x[n, c, p], values in chan_sets(c) x windows around p)."""
    n_, c_, *sp = x.shape
    y = torch.empty_like(x)
    for n in range(n_):
        for c in range(c_):
            for p in itertools.product(*(range(s) for s in sp)):
                ranges = [_window(i, w, s) for i, w, s in zip(p, windows, sp, strict=True)]
                idx = list(itertools.product(chan_sets(c), *ranges))
                vals = torch.stack([x[(n, *q)] for q in idx])
                y[(n, c, *p)] = fn(x[(n, c, *p)], vals)
    return y


def _std_fn(v, vals):
    return (v - vals.mean()) / torch.sqrt(vals.var(unbiased=False) + EPS)


@pytest.mark.parametrize(
    "shape,groups,window",
    [((2, 4, 5, 6), 2, 3), ((2, 4, 9), 1, 5), ((1, 4, 5, 6), 4, (3, 5)), ((1, 2, 4, 5), 1, 2)],
)
def test_lcn_brute_force(shape, groups, window):
    m = nk.LocalContextNorm(shape[1], num_groups=groups, window=window, eps=EPS, dtype=DT)
    _randomize(m)
    x = _x(shape, 1)
    c = shape[1]
    size = c // groups
    wins = window if isinstance(window, tuple) else (window,) * (x.dim() - 2)
    ref = _brute_local(x, lambda ch: range(ch // size * size, ch // size * size + size), wins, _std_fn)
    torch.testing.assert_close(m(x), _affine(ref, m, x), **TOL)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("shape", [(2, 6, 7), (2, 6, 3, 4)])
def test_lrn_vs_torch(size, shape):
    x = _x(shape, 1)
    kw = dict(alpha=0.3, beta=0.75, k=2.0)
    ours = nk.LocalResponseNorm(6, size=size, **kw, dtype=DT)
    assert list(ours.parameters()) == []
    torch.testing.assert_close(ours(x), torch.nn.LocalResponseNorm(size, **kw)(x), **TOL)


@pytest.mark.parametrize("size", [2, 3])
def test_lrn_brute_force(size):
    x = _x((2, 5, 4), 1)
    alpha, beta, k = 0.3, 0.75, 2.0
    m = nk.LocalResponseNorm(5, size=size, alpha=alpha, beta=beta, k=k, dtype=DT)
    ref = torch.empty_like(x)
    for c in range(5):
        # zero-padded window of `size` channels: the sum over existing channels, divided by size
        near = _window(c, size, 5)
        ref[:, c] = x[:, c] / (k + alpha / size * x[:, list(near)].pow(2).sum(1)) ** beta
    torch.testing.assert_close(m(x), ref, **TOL)


@pytest.mark.parametrize(
    "shape,cw,window,sigma", [((2, 5, 4, 6), 3, 3, 0.5), ((2, 4, 9), 1, 3, 1.0), ((1, 3, 4, 5), 2, (3, 1), 2.0)]
)
def test_divisive_norm_brute_force(shape, cw, window, sigma):
    c = shape[1]
    m = nk.DivisiveNorm(c, channel_window=cw, window=window, sigma=sigma, dtype=DT)
    _randomize(m)
    x = _x(shape, 1)
    wins = window if isinstance(window, tuple) else (window,) * (x.dim() - 2)

    def fn(v, vals):
        return (v - vals.mean()) / torch.sqrt(sigma**2 + vals.var(unbiased=False))

    ref = _brute_local(x, lambda ch: _window(ch, cw, c), wins, fn)
    torch.testing.assert_close(m(x), _affine(ref, m, x), **TOL)


def test_every_preset_has_a_reference_here():
    covered = {"bn", "ln", "in", "gn", "pn", "batch_group_norm", "lcn", "lrn", "divisive_norm",
               "rms_norm", "scale_norm", "mean_only_bn", "l1_bn", "range_bn"}
    # whitening references (ZCA/PCA/Cholesky/Newton–Schulz formulas) live in test_whitening.py,
    # those of the ch. 4.3-6 families in test_conditional / test_combination / test_multimode /
    # test_robust / test_online / test_power
    elsewhere = {"whitening", "conditional", "combination", "multimode", "robust"}
    own = set(nk.list_methods()) - {m for f in elsewhere for m in nk.list_methods(family=f)}
    assert own == covered
