"""Multimode family (see ``tests/test_multimode.py`` for the tolerances): mixture normalization's
warm start of EM from the running estimates (gradients, compile, a dead component, evaluation),
TaskNorm's context recipe and running size, the compositional and functional forms, folding
refused, and the registry. Helpers: ``tests/multimode_util.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import normkit as nk
from cases import CASES  # first: cases.py imports cases_multimode at its end
from cases_multimode import _gmm_post, generic_params
from multimode_util import (
    F64,
    TIGHT,
    _sigmoid,
    _x,
)
from normkit import ConfigError
from normkit.methods.multimode import MixtureNorm, ModeNorm, TaskNorm
from normkit.nop._multimode import (
    MixtureStandardize,
    ModeStandardize,
    TaskStandardize,
    gmm_posterior,
)


# ============================================================ mixture: the running warm start
def _em_reference(x, start, iterations, eps):
    """Float64 EM from an explicit start ``(mean, var, prior)``, each ``(K, C)``, with plain
    densities channel by channel: returns the output and the running values of the batch."""
    xc = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean, var, prior = (t.clone() for t in start)
    outs = []
    for c, row in enumerate(xc):
        mu, v, p = mean[:, c], var[:, c], prior[:, c]
        for _ in range(iterations):
            post = _gmm_post(row, mu, v, p, eps)
            count = post.sum(1)
            mu = (post * row).sum(1) / count
            v = (post * (row - mu[:, None]) ** 2).sum(1) / count
            p = count / row.numel()
        post = _gmm_post(row, mu, v, p, eps)
        outs.append((post * (row - mu[:, None]) / torch.sqrt(v[:, None] + eps)).sum(0))
        mean[:, c], var[:, c], prior[:, c] = mu, v, p
    y = torch.stack(outs).reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)
    m = xc.shape[1]
    return y, {"mean": mean, "var": var * m / (m - 1), "log_prior": torch.log(prior)}


def test_mixture_warm_start_from_running_estimates():
    """The first batch (equal running components) starts from the batch, exactly as
    ``init="batch"``; later batches start EM from the running mixture (reference EM from that
    explicit start), and the running estimates average the fitted mixtures."""
    mom, eps = 0.5, 1e-5
    warm = MixtureNorm(3, num_components=2, iterations=2, affine=False, momentum=mom, dtype=F64)
    cold = MixtureNorm(3, num_components=2, iterations=2, init="batch", affine=False,
                       momentum=mom, dtype=F64)
    x1 = torch.cat([_x((4, 3, 5), 1) - 2, _x((4, 3, 5), 2) + 2])
    assert_close(warm(x1), cold(x1), **TIGHT)
    for step in (2, 3):
        x = torch.cat([_x((3, 3, 4), 10 * step) - 2.5, _x((5, 3, 4), 10 * step + 1) + 1.5])
        start = (warm.running_mean.clone(), warm.running_var.clone(),
                 torch.softmax(warm.running_log_prior, 0))
        before = {k: getattr(warm, f"running_{k}").clone() for k in ("mean", "var", "log_prior")}
        y_ref, batch = _em_reference(x, start, 2, eps)
        y = warm(x)
        assert_close(y, y_ref, **TIGHT)
        for k, b in batch.items():
            assert_close(getattr(warm, f"running_{k}"), (1 - mom) * before[k] + mom * b, **TIGHT)
        assert (y - cold(x)).abs().max() > 1e-6, "the warm start made no difference"


def test_mixture_warm_start_falls_back_to_the_batch():
    """After ``reset_running_stats()``, with ``track_running_stats=False`` (from construction or
    toggled) and in eval without running estimates, EM starts from the batch."""
    x = torch.cat([_x((4, 3, 5), 1) - 2, _x((4, 3, 5), 2) + 2])
    cold = MixtureNorm(3, init="batch", dtype=F64)
    ref = cold(x)
    m = MixtureNorm(3, dtype=F64)
    m(x * 2 + 1)
    m.reset_running_stats()
    assert_close(m(x), ref, **TIGHT)
    m(x * 2 + 1)
    m.track_running_stats = False
    assert_close(m(x), ref, **TIGHT)
    untracked = MixtureNorm(3, track_running_stats=False, dtype=F64)
    assert_close(untracked(x), ref, **TIGHT)
    assert_close(untracked.eval()(x), ref, **TIGHT)


def test_mixture_warm_start_gradients_and_two_forwards():
    """The running start is a constant: float64 gradcheck (and gradgradcheck) of the warm-started
    training function; a backward through two training forwards survives the in-place buffer
    update between them."""
    m = MixtureNorm(2, num_components=2, iterations=2, dtype=F64)
    m(_x((4, 2, 3), 0, scale=2.0))
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    frozen = copy.deepcopy(m)
    frozen.momentum = 0.0  # gradcheck calls the function many times: keep the start fixed

    def f(x, *ps):
        return torch.func.functional_call(frozen, dict(zip(names, ps, strict=True)), (x,))

    x = _x((3, 2, 3), 1).requires_grad_()
    assert gradcheck(f, (x, *params))
    assert gradgradcheck(f, (x, *params))
    x1, x2 = _x((3, 2, 3), 2).requires_grad_(), _x((4, 2, 2), 3).requires_grad_()
    loss = (m(x1) * _x(x1.shape, 4)).sum() + (m(x2) * _x(x2.shape, 5)).sum()
    loss.backward()
    assert torch.isfinite(x1.grad).all() and torch.isfinite(x2.grad).all()


def test_mixture_warm_start_compiles(dynamo_reset):
    eager = MixtureNorm(3, iterations=2)
    target = copy.deepcopy(eager)
    compiled = torch.compile(target, backend="eager")
    for train in (True, True, False):
        eager.train(train)
        compiled.train(train)
        x = _x((4, 3, 5), 7).float()
        # backend="eager" runs the same aten ops: only op-order noise of float32 (eps ≈ 1.2e-7)
        assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)
        for (k, a), (_, b) in zip(target.named_buffers(), eager.named_buffers(), strict=True):
            assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda e, k=k: f"{k}: {e}")


def test_mixture_dead_component_stays_finite():
    """A running component far from the data gets no posterior weight (its count underflows to
    0): outputs, gradients and running estimates stay finite, the other component takes all."""
    m = MixtureNorm(2, num_components=2, iterations=2, dtype=F64)
    with torch.no_grad():
        m.running_mean[1].fill_(1e6)
        m.running_var[1].fill_(1e-3)
    x = _x((4, 2, 5), 0).requires_grad_()
    y = m(x)
    y.backward(_x(y.shape, 1))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(b).all() for b in m.buffers())
    bn = nk.BatchNorm(2, dtype=F64)
    assert_close(y, bn(x), **TIGHT)  # one live component: BN


def test_mixture_eval_uses_posteriors_of_the_running_mixture():
    m = MixtureNorm(2, num_components=3, dtype=F64)
    m(_x((6, 2, 4), 0, scale=2.0))
    m.eval()
    x = _x((3, 2, 4), 1)
    z = x.reshape(3, 2, 4)
    post = gmm_posterior(z, m.running_mean, m.running_var,
                         torch.log_softmax(m.running_log_prior, 0), m.eps)
    y = (post * (z - m.running_mean[:, None, :, None])
         / torch.sqrt(m.running_var[:, None, :, None] + m.eps)).sum(0)
    assert_close(m(x), y * m.weight[:, None] + m.bias[:, None], **TIGHT)


# ====================================================================== task norm: context
def test_task_norm_context_target_recipe():
    """Meta-test usage: ``momentum=1`` and a training forward on the context set store its
    moments and size; eval on the targets blends them with each target's own moments."""
    ctx, tgt = _x((5, 3, 4), 0, loc=1.0, scale=2.0), _x((2, 3, 4), 1)
    m = TaskNorm(3, momentum=1.0, affine=False, dtype=F64)
    with torch.no_grad():
        m.alpha_scale.fill_(0.3)
        m.alpha_offset.fill_(-0.5)
    m(ctx)
    m.eval()
    alpha = _sigmoid(0.3 * 5 - 0.5)
    per = ctx.transpose(0, 1).reshape(3, -1)
    mu_c = per.mean(1).view(1, 3, 1)
    var_c = per.var(1, correction=1).view(1, 3, 1)  # running estimates are unbiased
    mu_t, var_t = tgt.mean(-1, keepdim=True), tgt.var(-1, correction=0, keepdim=True)
    mu = alpha * mu_c + (1 - alpha) * mu_t
    var = alpha * (var_c + (mu_c - mu) ** 2) + (1 - alpha) * (var_t + (mu_t - mu) ** 2)
    assert_close(m(tgt), (tgt - mu) / torch.sqrt(var + m.eps), **TIGHT)


@pytest.mark.parametrize("momentum,expected", [(0.1, 4 * (1 - 0.9**3)), (None, 4.0)])
def test_task_norm_running_size(momentum, expected):
    m = TaskNorm(2, momentum=momentum)
    for step in range(3):
        m(_x((4, 2, 3), step).float())
    assert_close(m.running_size, torch.tensor([expected]), rtol=1e-6, atol=0)


# ============================================================== composition and functional
@pytest.mark.parametrize("op", [ModeStandardize(), MixtureStandardize(), TaskStandardize()],
                         ids=repr)
def test_operations_need_the_batch_partition(op):
    with pytest.raises(ConfigError, match=r"use nap=normkit.nap.Batch\(\).*got Group\(num_groups=2\)"):
        nk.Normalization(4, nap=nk.nap.Group(num_groups=2), nop=op)
    with pytest.raises(ConfigError, match=r"got Batch\(group_size=2\)"):
        nk.Normalization(4, nap=nk.nap.Batch(group_size=2), nop=op)


def test_composition_equals_presets():
    x = _x((4, 3, 5), 0)
    for preset, op in ((ModeNorm(3, dtype=F64), ModeStandardize()),
                       (MixtureNorm(3, init="batch", dtype=F64), MixtureStandardize(init="batch")),
                       (TaskNorm(3, dtype=F64), TaskStandardize())):
        composed = nk.Normalization(3, nap=nk.nap.Batch(), nop=op, dtype=F64)
        composed.load_state_dict(preset.state_dict())
        assert_close(composed(x), preset(x), **TIGHT)


def test_functional_forms():
    """Operations without learned parameters work in ``nk.normalize``; mode
    normalization needs its gate and says so."""
    x = _x((4, 3, 5), 0)
    y = nk.normalize(x, nap=nk.nap.Batch(), nop=MixtureStandardize(init="batch"))
    assert_close(y, MixtureNorm(3, init="batch", dtype=F64)(x), **TIGHT)
    y = nk.normalize(x, nap=nk.nap.Batch(), nop=TaskStandardize())
    assert_close(y, TaskNorm(3, dtype=F64)(x), **TIGHT)  # a = b = 0: α = ½
    with pytest.raises(ConfigError, match="gate parameters"):
        nk.normalize(x, nap=nk.nap.Batch(), nop=ModeStandardize())


@pytest.mark.parametrize("name", ["mode_norm", "mixture_norm", "task_norm"])
def test_refuses_to_fold(name):
    m = nk.create(name, 3)
    m(_x((4, 3, 5), 0).float())
    with pytest.raises(ConfigError, match="nothing fixed to fold"):
        m.eval().folded()


def test_generic_params_mirror_the_generic_build():
    """``cases_multimode.generic_params`` (the gate of mode_norm's reference statistics) must
    stay in step with ``generic_util.build``."""
    from generic_util import build

    case = next(c for c in CASES if c.name == "mode_norm")
    m = build(case, dtype=F64)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    for n, p in generic_params(shapes).items():
        assert torch.equal(getattr(m, n).detach(), p), n


def test_registry_family():
    assert {"mode_norm", "mixture_norm", "task_norm"} <= set(nk.list_methods(family="multimode"))
    assert nk.get("Mode-Normalization") is ModeNorm
    assert nk.info("task_norm").paper.endswith("arXiv:2003.03284")
