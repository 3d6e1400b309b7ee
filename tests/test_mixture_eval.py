"""Mixture normalization's evaluation (``normkit.functional.mixture_eval``) against the plain
composition's (``native=False``: ``gmm_posterior`` then ``mixture_output``, γ, β).

The fast form must give the composition's output (float64, tight) for one, two (the sigmoid
path) and three components, with and without γ/β, per-value γ/β, channels-last input, odd
spatial sizes, a collapsed running channel and values far from every component (posteriors
underflowing: no NaN); the same gradients in eval mode (input, γ, β; ``gradcheck`` through the
running mixture too; ``torch.func``); and its in-place form (no gradient asked for) must equal
its autograd form.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.testing import assert_close

import normkit as nk
from mixture_util import EPS, F64, TIGHT, rand, running_mixture, two_modes
from normkit.functional import mixture_eval as mixture_eval_module
from normkit.functional.mixture import gmm_posterior, mixture_output
from normkit.functional.mixture_eval import mixture_eval
from normkit.functional.standardize import affine_transform

C = 3


def _pair(k: int, affine: bool = True, seed: int = 0) -> tuple[nk.Normalization, nk.Normalization]:
    """A fused module in eval mode with a trained-looking running mixture (channel 0 collapsed)
    and random γ, β, and its ``native=False`` twin with the same state."""
    fused = nk.create("mixture_norm", C, num_components=k, affine=affine).to(F64)
    plain = nk.create("mixture_norm", C, num_components=k, affine=affine, native=False).to(F64)
    mean, var, log_prior = running_mixture(k, C, seed=seed).unbind(0)
    with torch.no_grad():
        fused.running_mean.copy_(mean)
        fused.running_var.copy_(var)
        fused.running_log_prior.copy_(log_prior + 0.7)  # unnormalized: a softmax at use
        if affine:
            fused.weight.copy_(rand(C, seed=seed + 1, grad=False) + 1.5)
            fused.bias.copy_(rand(C, seed=seed + 2, grad=False))
    plain.load_state_dict(fused.state_dict())
    return fused.eval(), plain.eval()


def _reference(v: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, log_prior: torch.Tensor,
               w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    x = v.reshape(v.shape[0], v.shape[1], v.shape[3])
    post = gmm_posterior(x, mean, var, log_prior, EPS)
    out = mixture_output(x, mean, var, post, EPS).reshape(v.shape)
    return affine_transform(out, None, None, w, b)


def _grads(y: torch.Tensor, tensors: list[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(y, tensors, rand(*y.shape, seed=seed, grad=False))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_equals_the_composition(k: int, affine: bool) -> None:
    fused, plain = _pair(k, affine)
    x = two_modes(5, C, 21, seed=4).reshape(5, C, 3, 7)  # odd spatial sizes
    with torch.no_grad():  # the in-place form
        assert_close(fused(x), plain(x), **TIGHT)
    xg = x.clone().requires_grad_()
    y, ref = fused(xg), plain(xg)  # the autograd form: gradients in eval mode
    assert_close(y, ref, **TIGHT)
    params = [xg, *([fused.weight, fused.bias] if affine else [])]
    params_ref = [xg, *([plain.weight, plain.bias] if affine else [])]
    for u, r in zip(_grads(y, params, 5), _grads(ref, params_ref, 5), strict=True):
        assert_close(u, r, **TIGHT)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_channels_last_and_far_values(k: int) -> None:
    fused, plain = _pair(k, seed=6)
    x = two_modes(4, C, 15, seed=7).reshape(4, C, 3, 5).contiguous(
        memory_format=torch.channels_last)
    far = x.clone()
    far[0] = 1e4  # the posteriors of every component underflow
    far[1] = -3e5
    for t in (x, far):
        with torch.no_grad():
            y = fused(t)
        assert not y.isnan().any()
        assert_close(y, plain(t), **TIGHT)
    tg = far.clone().requires_grad_()
    (g,), (g_ref,) = _grads(fused(tg), [tg], 8), _grads(plain(tg), [tg], 8)
    assert not g.isnan().any()
    assert_close(g[:, 1:], g_ref[:, 1:], **TIGHT)
    # channel 0 is collapsed: its posteriors are constants (1/K) and its gradient γ r_0·cot
    # exactly; the softmax's backward there cancels terms of size |x̂|·|∂a/∂x| ~ |x|²/s, so
    # both forms carry that rounding (~ε·|x|²)
    exact = rand(*g.shape, seed=8, grad=False)[:, 0] * fused.weight[0].detach() / (1 + EPS) ** 0.5
    tol = 4 * torch.finfo(F64).eps * far.abs().max().item() ** 2
    for grad in (g, g_ref):
        assert_close(grad[:, 0], exact, rtol=0, atol=tol)


@pytest.mark.parametrize("k", [2, 3])
def test_collapsed_mixture_is_bn(k: int) -> None:
    """A fresh module's running components all coincide (mean 0, variance 1): every posterior is
    1/K and evaluation is BN's with those statistics, as the composition's."""
    fused = nk.create("mixture_norm", C, num_components=k).to(F64).eval()
    plain = nk.create("mixture_norm", C, num_components=k, native=False).to(F64).eval()
    x = rand(4, C, 9, seed=9, grad=False) * 3
    with torch.no_grad():
        y = fused(x)
    assert_close(y, plain(x), **TIGHT)
    assert_close(y, x / (1 + EPS) ** 0.5, **TIGHT)


@pytest.mark.parametrize("k", [2, 3])
def test_per_value_affine(k: int) -> None:
    mean, var, log_prior = running_mixture(k, C, seed=10).unbind(0)
    log_prior = torch.log_softmax(log_prior, 0)
    v = two_modes(3, C, 8, seed=11).reshape(3, C, 1, 8)
    w, b = rand(1, C, 1, 8, seed=12), rand(1, C, 1, 8, seed=13)
    with torch.no_grad():
        assert_close(mixture_eval(v, mean, var, log_prior, w, b, eps=EPS),
                     _reference(v, mean, var, log_prior, w, b), **TIGHT)
    vg = v.clone().requires_grad_()
    y = mixture_eval(vg, mean, var, log_prior, w, b, eps=EPS)
    ref = _reference(vg, mean, var, log_prior, w, b)
    for u, r in zip(_grads(y, [vg, w, b], 14), _grads(ref, [vg, w, b], 14), strict=True):
        assert_close(u, r, **TIGHT)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradcheck_through_the_mixture(k: int) -> None:
    """Every input differentiable: values, the running mixture, γ, β (float64, tiny)."""
    mean, var, log_prior = (t.clone().requires_grad_()
                            for t in running_mixture(k, 2, seed=15).unbind(0))
    v = rand(2, 2, 1, 3, seed=16, scale=2.0)
    w, b = rand(2, seed=17), rand(2, seed=18)

    def f(v: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, lp: torch.Tensor,
          w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mixture_eval(v, mean, var, torch.log_softmax(lp, 0), w, b, eps=EPS)

    assert gradcheck(f, (v, mean, var, log_prior, w, b))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_torch_func_in_eval(k: int) -> None:
    """``torch.func.grad`` (through ``functional_call``), ``vmap`` over samples and ``jacrev``
    of the evaluation give the composition's."""
    fused, plain = _pair(k, seed=19)
    x = two_modes(3, C, 6, seed=20)
    cot = rand(3, C, 6, seed=21, grad=False)

    def loss(m: nk.Normalization):  # type: ignore[no-untyped-def]
        return lambda t: (torch.func.functional_call(m, dict(m.named_parameters()), (t,)) * cot).sum()

    assert_close(torch.func.grad(loss(fused))(x), torch.func.grad(loss(plain))(x), **TIGHT)

    def per_sample(m: nk.Normalization):  # type: ignore[no-untyped-def]
        return torch.func.vmap(lambda t: m(t.unsqueeze(0)).squeeze(0))

    assert_close(per_sample(fused)(x), per_sample(plain)(x), **TIGHT)
    assert_close(torch.func.jacrev(fused)(x[:1]), torch.func.jacrev(plain)(x[:1]), **TIGHT)


def test_in_place_form_only_without_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``no_grad`` the in-place form runs and nothing is recorded; with a gradient asked
    for only through γ, β it computes ``x̂`` and the output carries γ's graph; through ``x``
    the autograd form runs."""
    calls: list[int] = []
    chunked = mixture_eval_module._chunked
    monkeypatch.setattr(mixture_eval_module, "_chunked",
                        lambda *a: calls.append(1) or chunked(*a))
    fused, plain = _pair(2, seed=22)
    x = two_modes(3, C, 6, seed=23)
    with torch.no_grad():
        assert not fused(x).requires_grad
    assert calls == [1]
    y = fused(x)  # x̂ in place, γ x̂ + β by autograd
    assert y.requires_grad and calls == [1, 1]
    assert_close(y, plain(x), **TIGHT)
    got = _grads(y, [fused.weight, fused.bias], 24)
    for u, r in zip(got, _grads(plain(x), [plain.weight, plain.bias], 24), strict=True):
        assert_close(u, r, **TIGHT)
    fused(x.clone().requires_grad_())
    assert calls == [1, 1]


@pytest.mark.filterwarnings(  # inductor imports torch's own deprecated jit.script_method
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("k", [2, 3])
def test_inductor_eval_equals_the_composition(k: int, dynamo_reset: None) -> None:
    """``torch.compile(fullgraph=True)`` (inductor) of the evaluation: the composition's output
    without a graph and its input gradient with one."""
    fused, plain = _pair(k, seed=25)
    compiled = torch.compile(fused, fullgraph=True)
    x = two_modes(4, C, 12, seed=26).reshape(4, C, 3, 4)
    with torch.no_grad():
        assert_close(compiled(x), plain(x), **TIGHT)
    xg = x.clone().requires_grad_()
    (g,), (g_ref,) = _grads(compiled(xg), [xg], 27), _grads(plain(xg), [xg], 27)
    assert_close(g, g_ref, **TIGHT)


@pytest.mark.parametrize("k", [2, 3])
def test_export_eval_equals_the_composition(k: int) -> None:
    fused, plain = _pair(k, seed=28)
    x = two_modes(4, C, 10, seed=29).reshape(4, C, 2, 5)
    exported = torch.export.export(fused, (x,)).module()
    with torch.no_grad():
        assert_close(exported(x * 1.5), plain(x * 1.5), **TIGHT)


@pytest.mark.parametrize("k", [2, 3])
def test_runs_of_samples(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-place form over several runs of samples, the last one shorter (two samples per
    run of five, float64), contiguous, channels-last (rows of a few pixels) and strided."""
    monkeypatch.setattr(mixture_eval_module, "CHUNK_BYTES", 2 * C * 30 * 8)
    monkeypatch.setattr(mixture_eval_module, "TILE", C * 6)  # channels-last rows of 6 pixels
    fused, plain = _pair(k, seed=30)
    x = two_modes(5, C, 30, seed=31).reshape(5, C, 3, 10)
    for t in (x, x.contiguous(memory_format=torch.channels_last), x[..., ::2],
              x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)[..., 1:]):
        with torch.no_grad():
            assert_close(fused(t), plain(t), **TIGHT)


def test_one_component_is_bn_eval() -> None:
    """``K = 1``: the posterior is 1, and evaluation is torch BN's with the running component
    (one kernel call, gradients included)."""
    fused, plain = _pair(1, seed=32)
    x = two_modes(4, C, 10, seed=33).reshape(4, C, 2, 5).requires_grad_()
    mean, var = fused.running_mean[0], fused.running_var[0]
    ref = torch.nn.functional.batch_norm(x, mean, var, fused.weight, fused.bias, False, 0.0, EPS)
    y = fused(x)
    assert_close(y, ref, **TIGHT)
    assert_close(y, plain(x), **TIGHT)
    params = [x, fused.weight, fused.bias]
    for u, r in zip(_grads(y, params, 34), _grads(ref, params, 34), strict=True):
        assert_close(u, r, **TIGHT)
