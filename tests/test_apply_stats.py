"""Tests of ``normkit.apply``'s statistics utilities: ``recalibrate`` (precise BN), ``freeze`` /
``unfreeze`` and the ``batch_statistics`` context, on models mixing normkit and torch modules.

References are float64 formulas over the inputs each normalization module actually received
(captured by forward hooks), so they do not depend on normkit's reductions. ``TIGHT`` (1e-10):
float64 sums of a few hundred O(10) values in different orders differ by ~1e-13.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import normkit as nk
from normkit.apply import batch_statistics, freeze, recalibrate, statistics_modules, unfreeze

DT = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, seed=0, loc=1.0, scale=2.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=DT) * scale + loc


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nk.BatchNorm(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
        nk.DecorrelatedBatchNorm(4, group_size=2, estimate="covariance"),
        nk.DecorrelatedBatchNorm(4, group_size=2),  # running whitening matrix: no exact merge
    ).to(DT)


def _capture(model):
    """Inputs of every statistics module, per call."""
    seen: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in statistics_modules(model)}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen[mod].append(args[0].detach().clone()))
             for m in seen]
    return seen, hooks


def _pooled(inputs):
    """Float64 mean and unbiased variance per channel over every value of every input."""
    vals = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in inputs], 1)
    return vals.mean(1), vals.var(1, correction=1)


def _pooled_cov(inputs, d):
    vals = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in inputs], 1)
    c, m = vals.shape
    xc = (vals - vals.mean(1, keepdim=True)).reshape(c // d, d, m)
    return xc @ xc.transpose(1, 2) / (m - 1)


@pytest.mark.parametrize("sizes", [(4, 4, 4), (5, 2, 7)], ids=["equal", "unequal"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_recalibrate_is_exact_over_the_concatenated_batches(sizes, mode):
    model = _model().train(mode == "train")
    for i in range(2):  # training leaves EMA statistics behind
        model.train()(_x((6, 4, 3, 3), 90 + i))
    model.train(mode == "train")
    batches = [_x((n, 4, 3, 3), i, loc=0.5 * i) for i, n in enumerate(sizes)]
    seen, hooks = _capture(model)
    out = recalibrate(model, batches)
    for h in hooks:
        h.remove()
    assert out is model and model.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in model.modules())
    bn, tbn, dbn_cov, dbn_mat = model[0], model[2], model[5], model[6]
    for m in (bn, tbn, dbn_cov):
        mean, var = _pooled(seen[m])
        assert_close(m.running_mean, mean, **TIGHT)
        if m is dbn_cov:
            assert_close(m.running_cov, _pooled_cov(seen[m], 2), **TIGHT)
        else:
            assert_close(m.running_var, var, **TIGHT)
        assert int(m.num_batches_tracked) == len(sizes)
        assert m.momentum == 0.1  # restored
    # The whitening matrix has no exact merge: the batch-size-weighted average of the per-batch
    # matrices (each computed the way training computes it), the mean exact.
    assert_close(dbn_mat.running_mean, _pooled(seen[dbn_mat])[0], **TIGHT)
    mats = []
    for t in seen[dbn_mat]:
        probe = nk.DecorrelatedBatchNorm(4, group_size=2, momentum=1.0, dtype=DT)
        probe(t)
        mats.append(probe.running_matrix * t.shape[0])
    assert_close(dbn_mat.running_matrix, sum(mats) / sum(sizes), **TIGHT)


def test_recalibrate_equal_batches_is_the_cumulative_average_of_the_means():
    # For equal batch sizes the mean is the momentum=None average of the batch means, and the
    # variance additionally counts the spread of the batch means (which a plain cumulative
    # average of batch variances misses): check against both formulas.
    bn = nk.BatchNorm(3, dtype=DT)
    batches = [_x((4, 3, 5), i, loc=float(i)) for i in range(3)]
    recalibrate(bn, batches)
    cma = nk.BatchNorm(3, momentum=None, dtype=DT)
    for b in batches:
        cma(b)
    assert_close(bn.running_mean, cma.running_mean, **TIGHT)
    assert (bn.running_var > cma.running_var + 0.1).all()  # batch means 0, 1, 2 apart
    assert_close(bn.running_var, _pooled(batches)[1], **TIGHT)


def test_recalibrate_batch_forms_limits_and_online_norm():
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nk.create("online_norm", 3, momentum=0.01),
                          nk.InstanceNorm(3, track_running_stats=True)).to(DT)
    xs = [_x((2, 2, 4), i) for i in range(4)]
    seen, hooks = _capture(model)
    with torch.no_grad():
        model[1].running_grad_mean.fill_(0.25)  # the control state is kept
    recalibrate(model, [(xs[0], "label"), {"input": xs[1]}, xs[2], xs[3]], num_batches=3)
    for h in hooks:
        h.remove()
    on, inorm = model[1], model[2]
    vals = torch.cat([t.transpose(0, 1).reshape(3, -1) for t in seen[on]], 1)
    assert len(seen[on]) == 3
    assert_close(on.running_mean, vals.mean(1), **TIGHT)  # the stream's pooled moments
    assert_close(on.running_var, vals.var(1, correction=0), **TIGHT)
    assert int(on.num_batches_tracked) == 6 and on.momentum == 0.01
    assert torch.equal(on.running_grad_mean, torch.full((3,), 0.25, dtype=DT))
    per_batch = [t.reshape(t.shape[0], 3, -1).var(2, correction=1).mean(0) for t in seen[inorm]]
    assert_close(inorm.running_var, sum(per_batch) / 3, **TIGHT)  # cumulative average


def test_recalibrate_restores_everything_on_failure_and_rejects_bad_input():
    model = _model()
    model(_x((4, 4, 3, 3), 1))
    model.eval()
    before = copy.deepcopy(model.state_dict())

    def bad():
        yield _x((4, 4, 3, 3), 2)
        yield _x((4, 5, 3, 3), 3)  # wrong channel count: the forward raises

    with pytest.raises(nk.ShapeError, match="expected 4 channels"):
        recalibrate(model, bad())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m.training for m in model.modules())
    assert model[0].momentum == 0.1 and model[2].momentum == 0.1
    with pytest.raises(nk.ConfigError, match="recalibrate got no batches"):
        recalibrate(model, [])
    with pytest.raises(nk.ConfigError, match=r"num_batches must be a positive int or None, got 0"):
        recalibrate(model, [_x((4, 4, 3, 3), 1)], num_batches=0)
    with pytest.raises(nk.ConfigError, match=r"batches that are tensors.*got int"):
        recalibrate(model, [3])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class _TwoBranch(nn.Module):
    """Only the branch chosen by ``self.use`` runs: the other BN sees no batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(3), nk.create("in", 3, track_running_stats=True)
        self.use = "a"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x.mean(-1)) if self.use == "a" else self.b(x).mean(-1)


def test_recalibrate_keeps_the_statistics_of_modules_the_batches_never_reach():
    torch.manual_seed(0)
    model = _TwoBranch()
    for m in (model.a, model.b):  # non-default statistics, that a reset would wipe
        m.running_mean.fill_(3.0)
        m.running_var.fill_(5.0)
        m.num_batches_tracked.fill_(7)
    kept = {k: v.clone() for k, v in model.b.state_dict().items()}
    data = [torch.randn(8, 3, 4) for _ in range(3)]
    recalibrate(model, data)
    for k, v in model.b.state_dict().items():  # the unreached instance-type module is untouched
        assert torch.equal(v, kept[k]), k
    assert_close(model.a.running_mean, torch.cat(data).mean(-1).mean(0))
    assert int(model.a.num_batches_tracked) == 3
    model.use = "b"
    kept = {k: v.clone() for k, v in model.a.state_dict().items()}
    recalibrate(model, data)
    for k, v in model.a.state_dict().items():  # and the unreached exact-pooled one
        assert torch.equal(v, kept[k]), k
    assert int(model.b.num_batches_tracked) == 3


def test_freeze_survives_train_and_unfreeze_restores():
    model = _model()
    model.train()(_x((4, 4, 3, 3), 1))
    model[0].bias.requires_grad_(False)  # a flag set before freeze() is kept by unfreeze()
    freeze(model)
    freeze(model)  # idempotent
    model.train()
    norms = statistics_modules(model)
    assert len(norms) == 4
    for m in norms:
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())
    assert model[1].training and model[1].weight.requires_grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x((3, 4, 3, 3), 2)
    y = model(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} updated while frozen"
    ref = copy.deepcopy(model)
    unfreeze(ref)
    for m in statistics_modules(ref):
        m.eval()
    assert_close(y, ref(x), **TIGHT)  # running statistics, as in evaluation
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        assert not any(m.training for m in statistics_modules(clone))
        assert torch.equal(clone(x), y)
    unfreeze(model)
    assert all(m.training for m in model.modules())
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad
    assert model[2].weight.requires_grad and model[6].bias.requires_grad
    model(x)
    assert int(model[0].num_batches_tracked) == 2  # updates again
    model.eval()
    unfreeze(model)  # nothing frozen: a no-op
    assert not model[0].training


def test_batch_statistics_context():
    model = _model()
    for i in range(2):
        model.train()(_x((6, 4, 3, 3), i))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x((5, 4, 3, 3), 7, loc=3.0)
    train_copy = copy.deepcopy(model)
    for m in statistics_modules(train_copy):
        m.train()
        m.track_running_stats = False
    with batch_statistics(model) as same:
        assert same is model
        y = model(x)
    assert_close(y, train_copy(x), **TIGHT)  # batch statistics everywhere
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m.training for m in model.modules())
    assert all(m.track_running_stats for m in statistics_modules(model))
    assert not torch.allclose(model(x), y)  # running statistics again
    with pytest.raises(ZeroDivisionError), batch_statistics(model):
        raise ZeroDivisionError
    assert not any(m.training for m in model.modules())
    assert all(m.track_running_stats for m in statistics_modules(model))


def test_batch_statistics_with_frozen_modules_and_eval_norm():
    model = nn.Sequential(nk.create("eval_norm", 3, alpha=0.5), nn.BatchNorm1d(3)).to(DT)
    model(_x((6, 3, 4), 1))
    freeze(model)
    x = _x((4, 3, 4), 2)
    with batch_statistics(model):
        y = model(x)
    bn = nk.BatchNorm(3, dtype=DT)
    bn.load_state_dict(model[0].state_dict())
    ref = nn.BatchNorm1d(3, dtype=DT)
    ref.load_state_dict(model[1].state_dict())
    assert_close(y, ref.train()(bn.train()(x)), **TIGHT)
    assert not model[0].training and not model[1].training
    model.train()
    assert not model[0].training  # still frozen
