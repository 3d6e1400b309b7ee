"""Whitening (see ``tests/test_whitening.py``): coloring recovery (``affine="coloring"``) and the
cached evaluation fold of the batch-whitening presets.
Helpers, the presets and the numerics behind the tolerances: ``tests/whitening_util.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import normkit as nk
from normkit.functional import whiten as W
from whitening_util import (
    DT,
    PRESETS,
    DecorrelatedBatchNorm,
    correlated,
    make_preset,
    randomize_affine,
)


# ---------------------------------------------------------------------------- coloring recovery
def test_coloring_gives_back_the_covariance_gamma_gamma_t():
    """Whitened then colored: cov(y) = Γ (W Σ Wᵀ) Γᵀ = Γ Γᵀ − ε Γ W Wᵀ Γᵀ; with ε = 1e-9 and
    λ_min(Σ) ≳ 0.05 the ε-term is ≲ 1e-7 relative, checked at 1e-6."""
    mod = DecorrelatedBatchNorm(6, group_size=3, affine="coloring", eps=1e-9, dtype=DT)
    randomize_affine(mod, 11)
    y = mod(correlated(400, 6, 12, 3))
    groups = y.transpose(0, 1).reshape(2, 3, -1)
    cov = W.covariance(groups - groups.mean(-1, keepdim=True))
    gamma = mod.weight.detach()
    torch.testing.assert_close(cov, gamma @ gamma.transpose(-1, -2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(groups.mean(-1), mod.bias.detach().reshape(2, 3), rtol=0, atol=1e-9)


def test_coloring_with_diagonal_gamma_is_the_affine_recovery():
    x = correlated(20, 4, 13, 5)
    affine = DecorrelatedBatchNorm(4, group_size=2, dtype=DT)
    colored = DecorrelatedBatchNorm(4, group_size=2, affine="coloring", dtype=DT)
    randomize_affine(affine, 14)
    with torch.no_grad():
        colored.weight.copy_(torch.diag_embed(affine.weight.reshape(2, 2)))
        colored.bias.copy_(affine.bias)
    for train in (True, False):
        affine.train(train)
        colored.train(train)
        torch.testing.assert_close(colored(x), affine(x), rtol=1e-12, atol=1e-12)


def test_coloring_after_batch_norm_folds():
    """Coloring composes with a per-channel operation's fold: M = Γ diag(a), b' = Γ b + β."""
    mod = nk.Normalization(4, nap=nk.nap.Batch(), nop=nk.nop.Standardize(),
                           nrr=nk.nrr.Coloring(group_size=2), dtype=DT)
    randomize_affine(mod, 15)
    mod(correlated(16, 4, 16, 3))
    mod.eval()
    x = correlated(5, 4, 17, 3)
    mat, shift = mod.folded()
    y = torch.einsum("ij,njs->nis", torch.block_diag(*mat), x) + shift[:, None]
    torch.testing.assert_close(y, mod(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(nk.ConfigError, match="cannot fold Coloring"):
        nk.Normalization(4, nap=nk.nap.Batch(group_size=4), nop=nk.nop.Whiten(),
                         nrr=nk.nrr.Coloring(group_size=2)).eval().folded()


# ------------------------------------------------------------- cached evaluation fold
def _trained(name: str, c: int = 8, d: int = 4) -> nk.Normalization:
    mod = make_preset(name, c, d, dtype=DT)
    randomize_affine(mod, 35)
    mod(correlated(16, c, 36, 2))
    return mod.eval()


def _count_folds(monkeypatch: pytest.MonkeyPatch, mod: nk.Normalization) -> list[int]:
    calls = [0]
    original = type(mod).folded

    def counting(self):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return original(self)
    monkeypatch.setattr(type(mod), "folded", counting)
    return calls


@pytest.mark.parametrize("name", list(PRESETS))
def test_eval_fold_is_cached_until_state_changes(name, monkeypatch):
    """Evaluation without gradients folds once and reuses (M, b) until a parameter or buffer
    changes in place or is replaced; every output equals the plain composition's."""
    mod = _trained(name)
    plain = copy.deepcopy(mod)
    plain.native = False  # the generic path: recomputes W(Σ) and the fold on every call
    calls = _count_folds(monkeypatch, mod)
    x = correlated(3, 8, 37, 2)

    def check() -> None:
        with torch.no_grad():
            plain.load_state_dict(mod.state_dict())
            torch.testing.assert_close(mod(x), plain(x), rtol=1e-10, atol=1e-10)

    check()
    check()
    assert calls[0] == 1
    with torch.no_grad():
        mod.weight.mul_(1.5)  # in place: the version counter moves
    check()
    assert calls[0] == 2
    mod.running_mean.add_(0.25)
    check()
    assert calls[0] == 3
    mod.bias = torch.nn.Parameter(torch.randn(8, dtype=DT))  # a new tensor object
    check()
    assert calls[0] == 4
    state = {k: v + 0.1 if v.is_floating_point() else v for k, v in mod.state_dict().items()}
    mod.load_state_dict(state)
    check()
    assert calls[0] == 5


@pytest.mark.parametrize("spatial", [(), (1,), (3,), (9,), (3, 5)])
def test_eval_fold_matches_the_plain_composition_for_every_layout(spatial):
    """Both layouts of the folded product (per-position matmul when positions outnumber the
    group size d = 4, one (G, d, N·S) product otherwise) give the generic path's output."""
    mod = _trained("dbn")
    plain = copy.deepcopy(mod)
    plain.native = False
    x = correlated(5, 8, 40, *spatial)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), plain(x), rtol=1e-10, atol=1e-10)


def test_eval_fold_is_not_used_when_a_gradient_is_needed(monkeypatch):
    mod = _trained("dbn")
    calls = _count_folds(monkeypatch, mod)
    x = correlated(3, 8, 38, 2)
    y = mod(x)  # γ, β require grad: the generic path, differentiable
    assert y.grad_fn is not None and calls[0] == 0
    y.sum().backward()
    assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0
    with torch.inference_mode():
        z = mod(x)
    assert calls[0] == 1
    torch.testing.assert_close(z, y.detach(), rtol=1e-10, atol=1e-10)


def test_eval_fold_cache_survives_pickle_and_deepcopy(tmp_path):
    mod = _trained("iternorm")
    x = correlated(3, 8, 39, 2)
    with torch.no_grad():
        y = mod(x)
    twin = copy.deepcopy(mod)
    torch.save(mod, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        twin.weight.mul_(2.0)  # the copy's fold must not come from the original's cache
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
        torch.testing.assert_close(mod(x), y, rtol=0, atol=0)
        assert not torch.allclose(twin(x), y)
