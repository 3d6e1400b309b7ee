"""Whitening under ``torch.compile(fullgraph=True)``, ``torch.export``, in-place ops and autocast,
and the custom ops of :mod:`normkit.functional.whiten_ops` (normkit issue 18).

One row per whitening method (the first row of ``tests/cases.py`` for it). Numerics behind the
tolerances:

* compile: ``backend="aot_eager"`` traces through AOTAutograd (fake kernels, functionalization,
  the custom ops' registered backward) and runs the same aten kernels in the same order, so
  results agree to float32 reassociation noise (measured: bit-identical); checked to 1e-5
  relative. Inductor (≈ 50 s per method on one CPU core) is compared in
  ``benchmarks/compile_whitening.py``.
* autocast: the layer whitens the bf16/fp16 conv output with float32 statistics; the reference is
  the float32 module on the same (upcast) values, so the only differences are the roundings of
  the output and of the input gradient to half precision: relative 2⁻⁸ (bf16) / 2⁻¹¹ (fp16) of
  values that are O(1) here (whitened), plus a few roundings — checked to 2e-2 / 4e-3 of the
  largest magnitude.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor
from torch.autograd import gradcheck
from torch.testing import assert_close

import normkit as nk
from cases import CASES, Case
from generic_util import assert_buffers_close, assert_same_run, build, fwd_bwd, gen, layout_x
from normkit.functional import whiten as W
from normkit.functional import whiten_ops as WO
from normkit.functional.partition import matrix_view

F32, F64 = torch.float32, torch.float64
METHODS = ("dbn", "pca_bw", "cd_bw", "iternorm", "group_whitening", "instance_whitening",
           "switchable_whitening")
ROWS = [next(c for c in CASES if c.name == name) for name in METHODS]
FUSED = {"dbn", "pca_bw", "cd_bw", "iternorm", "group_whitening", "instance_whitening"}
# the custom ops each fused row's training step is made of (per-sample ZCA: functional.fused_whiten,
# and batch whitening in place: functional.fused_batch_whiten, whose statistics ops run
# under no_grad: a nested graph of the exported program)
FUSED_OPS = {name: ({"normkit.whiten_sample_apply.default"}
                    if name in ("group_whitening", "instance_whitening") else
                    {"normkit.whiten_batch_apply.default"})
             for name in FUSED}
EXACT = {"rtol": 1e-10, "atol": 1e-10}  # float64, same formula: a few roundings of O(10) values
SAME_OPS = {"rtol": 1e-5, "atol": 1e-6}  # float32, same kernels (see the module docstring)
rows = pytest.mark.parametrize("case", ROWS, ids=METHODS)
modes = pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])


def _trained(case: Case, dtype: torch.dtype = F32, **overrides) -> nk.Normalization:
    """The case's module after one training step (running buffers away from their init)."""
    m = build(case, dtype=dtype, **overrides)
    with torch.no_grad():
        m(layout_x(case, case.shapes[-1], seed=5, dtype=dtype))
    return m


def _x(case: Case, seed: int = 0, dtype: torch.dtype = F32) -> Tensor:
    return layout_x(case, case.shapes[-1], seed=seed, dtype=dtype)


# ------------------------------------------------------------------------ in-place after
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@modes
@rows
def test_inplace_op_after_the_layer(case: Case, train: bool, affine: bool) -> None:
    """``ReLU(inplace=True)`` after the layer (every ResNet), forward and backward: the same
    output and gradients as the out-of-place ReLU. The output is never a view of a custom op's
    output, with or without a recovery (group whitening's γ is applied after the op)."""
    m = _trained(case, F64, affine=affine).train(train)
    ref = copy.deepcopy(m)
    x = _x(case, seed=1, dtype=F64)
    for grad_mode in (True, False):
        xa, xb = (x.clone().requires_grad_(grad_mode) for _ in range(2))
        with torch.set_grad_enabled(grad_mode):
            ya = torch.nn.ReLU(inplace=True)(m(xa))
            yb = torch.relu(ref(xb))
        assert_close(ya, yb, **EXACT)
        if grad_mode:
            cot = torch.randn(ya.shape, generator=gen(2), dtype=F64)
            ga = torch.autograd.grad(ya, [xa, *m.parameters()], cot)
            gb = torch.autograd.grad(yb, [xb, *ref.parameters()], cot)
            for a, b in zip(ga, gb, strict=True):
                assert_close(a, b, **EXACT)
        assert_buffers_close(m, ref, **EXACT)


# ------------------------------------------------------------------------------ compile
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning")
@rows
def test_compile_fullgraph_matches_eager(case: Case, dynamo_reset: None) -> None:
    """``torch.compile(fullgraph=True)`` (no graph break) gives the eager outputs, input and
    parameter gradients and running buffers, two steps in training then two in eval."""
    eager = _trained(case)
    target = copy.deepcopy(eager)
    compiled = torch.compile(target, backend="aot_eager", fullgraph=True)
    for train in (True, False):
        eager.train(train)
        target.train(train)
        for step in range(2):
            x = _x(case, seed=10 + step)
            assert_same_run(fwd_bwd(compiled, x), fwd_bwd(eager, x), **SAME_OPS)
            assert_buffers_close(target, eager, **SAME_OPS)
        if not train:  # no-grad evaluation: eager takes the cached fold, compile the generic path
            with torch.no_grad():
                assert_close(compiled(x), eager(x), **SAME_OPS)
    if case.running:
        assert int(target.num_batches_tracked) == int(eager.num_batches_tracked)


def _ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


@modes
@rows
def test_export_matches_eager(case: Case, train: bool) -> None:
    """``torch.export.export`` in training (the fused ops are single nodes, the running buffers
    are updated like eager, gradients flow) and in evaluation (the graph reads the running
    buffers: no cached fold is baked in)."""
    eager = _trained(case).train(train)
    x = _x(case, seed=20)
    with torch.set_grad_enabled(train):
        program = torch.export.export(copy.deepcopy(eager), (x,))
    exported = program.module()
    ops = _ops(program)
    if train and case.name in FUSED:
        assert FUSED_OPS[case.name] <= ops
    assert_same_run(fwd_bwd(exported, x), fwd_bwd(eager, x), **SAME_OPS)
    assert_buffers_close(exported, eager, **SAME_OPS)
    if not train and case.running:
        with torch.no_grad():  # change the state after export: the program must follow it
            for m in (eager, exported):
                m.running_mean.add_(0.25)
            assert_close(exported(x), eager(x), **SAME_OPS)


# ----------------------------------------------------------------------------- autocast
HALF = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", list(HALF), ids=["bf16", "fp16"])
@modes
@rows
def test_autocast_after_a_half_precision_conv(case: Case, train: bool, dtype: torch.dtype) -> None:
    """Under ``torch.autocast("cpu")`` a conv hands the layer a half-precision tensor: the
    layer's output and input gradient have that dtype (torch's batch norm's rule), its
    statistics and buffers stay float32, and it equals the float32 module on the same values."""
    m = _trained(case).train(train)
    ref = copy.deepcopy(m)
    conv = torch.nn.Conv2d(case.num_features, case.num_features, 1)
    torch.nn.init.orthogonal_(conv.weight)
    x = layout_x(case, next(s for s in case.shapes if len(s) == 4), seed=30, dtype=F32)
    with torch.autocast("cpu", dtype=dtype):
        h = conv(x)
        h.retain_grad()
        y = m(h)
    assert h.dtype == dtype and y.dtype == dtype
    href = h.detach().float().requires_grad_()
    yref = ref(href)
    cot = torch.randn(y.shape, generator=gen(31)).to(dtype)
    params, ref_params = list(m.parameters()), list(ref.parameters())
    got = torch.autograd.grad(y, [h, *params], cot)
    want = torch.autograd.grad(yref, [href, *ref_params], cot.float())
    assert got[0].dtype == dtype and all(g.dtype == F32 for g in got[1:])
    tol = HALF[dtype]
    for a, b in zip((y, *got), (yref, *want), strict=True):
        assert torch.isfinite(a).all()
        assert_close(a.float(), b, rtol=tol, atol=tol * float(b.detach().abs().max()))
    for name, buf in m.named_buffers():
        assert buf.dtype == dict(ref.named_buffers())[name].dtype
    assert_buffers_close(m, ref, **SAME_OPS)


# ---------------------------------------------------- half-precision modules, covariance
HALF_COV = [(c, e) for c in ROWS[:4] for e in ("covariance", "matrix")]


@pytest.mark.parametrize("dtype", list(HALF), ids=["bf16", "fp16"])
@pytest.mark.parametrize(("case", "estimate"), HALF_COV,
                         ids=[f"{c.name}-{e}" for c, e in HALF_COV])
def test_half_module_eval_and_fold(case: Case, estimate: str, dtype: torch.dtype) -> None:
    """A bf16/fp16 module (``dtype=``) evaluates and folds with either running estimate: the
    whitening matrix of the half-precision running covariance is computed in float32. Its eval
    output equals the float32 module with the same (upcast) state, and ``nk.fold`` into a
    preceding conv gives the unfolded model's output."""
    m = _trained(case, F32, estimate=estimate).to(dtype).eval()
    ref = copy.deepcopy(m).float()
    x = layout_x(case, next(s for s in case.shapes if len(s) == 4), seed=40, dtype=dtype)
    tol = HALF[dtype]
    with torch.no_grad():
        y, yref = m(x), ref(x.float())
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert_close(y.float(), yref, rtol=tol, atol=tol * float(yref.abs().max()))
        conv = torch.nn.Conv2d(case.num_features, case.num_features, 1)
        torch.nn.init.orthogonal_(conv.weight)
        conv = conv.to(dtype)
        net = torch.nn.Sequential(conv, m).eval()
        folded = nk.fold(copy.deepcopy(net))
        assert folded.fold_report.folded == ["1"]
        want = net(x).float()
        assert_close(folded(x).float(), want, rtol=tol, atol=2 * tol * float(want.abs().max()))


# -------------------------------------------------------------------------- custom ops
# (N, A, B, S) shapes and the layouts the module uses: batch whitening on the canonical view
# itself (S ≥ d), batch whitening on the matrix view (S < d), group / instance whitening.
LAYOUTS = {
    "batch_in_place": ((5, 2, 2, 3), True, None),
    "batch_matrix": ((6, 2, 3, 1), False, ("M", "G", "D", "M")),
    "group": ((2, 3, 2, 2), False, ("G", "D", "M", "M")),
    "instance": ((2, 2, 2, 4), False, ("G", "G", "D", "M")),
}
layouts = pytest.mark.parametrize("layout", list(LAYOUTS))


def _plain(x: Tensor, weight: Tensor, bias: Tensor, shared: bool, roles, method: str) -> Tensor:
    """The plain autograd composition ``γ ⊙ W(Σ)(x − μ) + β`` (what ``native=False`` runs)."""
    mean, cov, centered = W.batch_moments(x if roles is None else matrix_view(x, roles), shared)
    w = W.whitening_matrix(cov.flatten(0, 1), method, eps=1e-3).reshape(cov.shape)
    return w * weight @ centered + bias


def _fused(x: Tensor, weight: Tensor, bias: Tensor, shared: bool, roles, method: str) -> Tensor:
    _, cov, centered = WO.whiten_moments(x, shared=shared, roles=roles)
    w = W.whitening_matrix(cov.flatten(0, 1), method, eps=1e-3).reshape(cov.shape)
    return WO.whiten_with_gradient(x, centered, w, shared=shared, roles=roles, weight=weight,
                                   bias=bias)


def _inputs(layout: str) -> tuple[Tensor, Tensor, Tensor, bool, tuple | None]:
    shape, shared, roles = LAYOUTS[layout]
    x = torch.randn(shape, generator=gen(50), dtype=F64) + 0.5
    rows = matrix_view(torch.empty(shape), roles) if roles else torch.empty(shape)
    g, d = rows.shape[1:3]
    weight = (torch.rand(1, g, d, 1, generator=gen(51), dtype=F64) + 0.5).requires_grad_()
    bias = torch.randn(1, g, d, 1, generator=gen(52), dtype=F64).requires_grad_()
    return x.requires_grad_(), weight, bias, shared, roles


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky", "newton"])
@layouts
def test_custom_ops_gradcheck_and_equal_plain_autograd(layout: str, method: str) -> None:
    """float64 gradcheck of the fused ops (moments, W(Σ), apply) w.r.t. the input, γ and β, and
    the same values and gradients as the plain autograd composition."""
    x, weight, bias, shared, roles = _inputs(layout)
    assert gradcheck(lambda *a: _fused(*a, shared, roles, method), (x, weight, bias))
    got = _fused(x, weight, bias, shared, roles, method)
    want = _plain(x, weight, bias, shared, roles, method)
    assert not got._is_view()
    assert_close(got, want, **EXACT)
    cot = torch.randn(got.shape, generator=gen(53), dtype=F64)
    for a, b in zip(torch.autograd.grad(got, (x, weight, bias), cot),
                    torch.autograd.grad(want, (x, weight, bias), cot), strict=True):
        assert_close(a, b, **EXACT)


@layouts
def test_custom_ops_are_first_order_only(layout: str) -> None:
    """A second derivative through the hand-derived backward raises instead of being wrong
    (Newton–Schulz: ``W(Σ)`` itself is twice differentiable, so the raise is the ops')."""
    x, weight, bias, shared, roles = _inputs(layout)
    y = _fused(x, weight, bias, shared, roles, "newton")
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("layout", ["batch_in_place", "batch_matrix"])
def test_custom_ops_opcheck(layout: str) -> None:
    """``torch.library.opcheck``: schema (no mutation, no aliasing), fake kernels against the
    real ones, the autograd registration and AOT dispatch with dynamic shapes — for the two ops
    and their backward ops."""
    x, weight, bias, shared, roles = _inputs(layout)
    key = "" if roles is None else "".join(roles)
    ops = torch.ops.normkit
    mean, cov, centered = ops.whiten_moments(x, shared, key)
    mat = torch.randn(cov.shape, generator=gen(54), dtype=F64, requires_grad=True)
    shift = torch.randn(mean.shape, generator=gen(55), dtype=F64, requires_grad=True)
    grad = torch.randn(centered.shape, generator=gen(56), dtype=F64)
    calls = [
        (ops.whiten_moments.default, (x, shared, key)),
        (ops.whiten_apply.default, (x, centered, mat, shift, shared, key)),
        (ops.whiten_apply.default, (x, centered, mat, None, shared, key)),
        (ops.whiten_apply_backward.default,
         (grad, centered, mat.detach(), shared, key, list(x.shape), F64)),
        (ops.whiten_moments_backward.default,
         (cov.detach(), centered, shared, key, list(x.shape), F64)),
    ]
    for op, args in calls:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_moments_op_keeps_float32_under_autocast() -> None:
    """The ops' kernels run with autocast off: a bf16 input gets float32 statistics equal to
    those of its upcast values (autocast would otherwise run their matmuls in bf16)."""
    x = torch.randn(16, 2, 4, 3, generator=gen(57)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, cov, centered = WO.whiten_moments(x, shared=True)
    ref = W.batch_moments(x.float(), shared=True)
    for a, b in zip((mean, cov, centered), ref, strict=True):
        assert a.dtype == F32
        assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- torch.func
@pytest.mark.parametrize("method", ["zca", "pca", "cholesky", "newton"])
def test_functional_form_under_torch_func(method: str) -> None:
    """``nk.normalize`` with whitening under ``torch.func``: ``vmap`` equals a loop;
    ``grad`` equals autograd (custom ops do not support the transforms, so the plain composition
    runs under them), except ZCA, whose divided-difference backward is first order and says so
    (``torch.func.grad`` differentiates with a graph)."""
    nap, nop = nk.nap.Batch(group_size=2), nk.nop.Whiten(method)
    xs = torch.randn(2, 6, 4, 3, generator=gen(60), dtype=F64)

    def f(x: Tensor) -> Tensor:
        return nk.normalize(x, nap=nap, nop=nop)

    assert_close(torch.func.vmap(f)(xs), torch.stack([f(x) for x in xs]), **EXACT)
    loss = lambda x: f(x).sin().sum()  # noqa: E731
    if method == "zca":
        with pytest.raises(RuntimeError, match="first-order only"):
            torch.func.grad(loss)(xs[0])
        return
    x = xs[0].clone().requires_grad_()
    assert_close(torch.func.grad(loss)(xs[0]), torch.autograd.grad(loss(x), x)[0], **EXACT)
