"""Orthogonality regularizers (soft, SRIP, Parseval) and projection-based weight normalization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

from normkit.errors import ConfigError
from normkit.weight import projection as P
from normkit.weight import regularizers as R

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orth(rows: int, cols: int) -> torch.Tensor:
    a = torch.randn(max(rows, cols), min(rows, cols), dtype=F64, generator=_gen())
    q = torch.linalg.qr(a).Q
    return q if rows >= cols else q.T


def _small_gram_minus_eye(w: torch.Tensor) -> torch.Tensor:
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return g - torch.eye(g.shape[0], dtype=w.dtype)


def _dense(weight: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
    """Dense block-diagonal (out, fan) matrix of a grouped Conv / ConvTranspose weight."""
    blocks = R._blocks(weight, dim, groups)
    return torch.block_diag(*blocks)


# ---------------------------------------------------------------- layout


def test_weight_matrix_layouts() -> None:
    conv = nn.Conv2d(3, 8, 5)
    convt = nn.ConvTranspose2d(3, 8, 5)
    assert R.weight_matrix(conv.weight).shape == (8, 75)
    assert R.weight_matrix(convt.weight, 1).shape == (8, 75)
    assert torch.equal(R.weight_matrix(convt.weight, -3), R.weight_matrix(convt.weight, 1))
    assert torch.equal(R.weight_matrix(convt.weight, 1)[2], convt.weight[:, 2].flatten())


@pytest.mark.parametrize(("shape", "dim", "groups"), [((6, 2, 3), 0, 3), ((6, 2, 3, 2), 1, 3),
                                                      ((4, 5), 1, 2), ((4, 5, 2), 2, 1)])
def test_blocks_round_trip(shape: tuple[int, ...], dim: int, groups: int) -> None:
    w = torch.randn(shape, dtype=F64)
    assert torch.equal(R._unblocks(R._blocks(w, dim, groups), w.shape, dim, groups), w)


# ---------------------------------------------------------------- soft orthogonality / SRIP


@pytest.mark.parametrize(("rows", "cols"), [(3, 7), (5, 5), (7, 3)])
def test_orthogonal_weight_gives_zero_loss(rows: int, cols: int) -> None:
    q = _orth(rows, cols)
    assert R.soft_orthogonality(q) < 1e-12
    assert R.srip(q, iterations=5) < 1e-12


@pytest.mark.parametrize(("rows", "cols"), [(3, 7), (7, 3)])
def test_soft_orthogonality_reference(rows: int, cols: int) -> None:
    w = torch.randn(rows, cols, dtype=F64)
    ref = torch.linalg.matrix_norm(_small_gram_minus_eye(w)) ** 2
    torch.testing.assert_close(R.soft_orthogonality(w), ref)
    # ConvTranspose layout: rows are dim 1.
    torch.testing.assert_close(R.soft_orthogonality(w.T.unsqueeze(-1), dim=1), ref)


@pytest.mark.parametrize(("rows", "cols"), [(4, 9), (9, 4), (5, 5)])
def test_srip_many_iterations_is_spectral_norm(rows: int, cols: int) -> None:
    w = torch.randn(rows, cols, dtype=F64, generator=_gen(1))
    ref = torch.linalg.matrix_norm(_small_gram_minus_eye(w), 2)
    torch.testing.assert_close(R.srip(w, iterations=500), ref, rtol=1e-9, atol=1e-12)


def test_srip_two_iterations_is_the_paper_estimate_and_rises_with_iterations() -> None:
    w = torch.randn(4, 9, dtype=F64)
    a = _small_gram_minus_eye(w)
    v = torch.randn(4, generator=_gen(3), dtype=F64)
    paper = (a @ (a @ v)).norm() / (a @ v).norm()
    torch.testing.assert_close(R.srip(w, generator=_gen(3)), paper)
    sig = [float(R.srip(w, iterations=t)) for t in (1, 2, 4, 8, 16)]
    assert all(x <= y + 1e-12 for x, y in zip(sig, sig[1:], strict=False))


def test_srip_default_start_is_deterministic() -> None:
    w = torch.randn(6, 8)
    torch.manual_seed(1)
    first = R.srip(w, iterations=1)
    torch.manual_seed(2)
    assert torch.equal(R.srip(w, iterations=1), first)
    assert not torch.equal(R.srip(w, iterations=1, generator=_gen(5)), first)


@pytest.mark.parametrize(("shape", "dim", "groups"), [((6, 2, 3), 0, 3), ((4, 3, 2), 1, 2)])
def test_grouped_penalties_equal_dense_block_diagonal(shape: tuple[int, ...], dim: int,
                                                      groups: int) -> None:
    w = torch.randn(shape, dtype=F64)
    dense = _dense(w, dim, groups)
    torch.testing.assert_close(R.soft_orthogonality(w, dim=dim, groups=groups),
                               R.soft_orthogonality(dense))
    ref = torch.linalg.matrix_norm(_small_gram_minus_eye(dense), 2)
    torch.testing.assert_close(R.srip(w, dim=dim, groups=groups, iterations=400), ref)


@pytest.mark.parametrize(("shape", "dim", "groups"), [((3, 5), 0, 1), ((5, 3), 0, 1),
                                                      ((4, 3, 2), 1, 2)])
def test_gradcheck(shape: tuple[int, ...], dim: int, groups: int) -> None:
    w = torch.randn(shape, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: R.soft_orthogonality(x, dim=dim, groups=groups), (w,))
    assert torch.autograd.gradcheck(
        lambda x: R.srip(x, dim=dim, groups=groups, iterations=3), (w,))


@pytest.mark.parametrize("fill", ["zero", "identity"])
@pytest.mark.parametrize("fn", [R.soft_orthogonality, R.srip])
def test_zero_and_exactly_orthogonal_weight_finite(fill: str, fn: object) -> None:
    w = (torch.zeros(3, 4) if fill == "zero" else torch.eye(3, 4)).requires_grad_()
    loss = fn(w)  # type: ignore[operator]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all()
    expected = 0.0 if fill == "identity" else 3.0 if fn is R.soft_orthogonality else 1.0
    assert float(loss.detach()) == expected


def test_half_weight_computed_in_float32() -> None:
    w = torch.randn(4, 6)
    out = R.soft_orthogonality(w.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, R.soft_orthogonality(w.bfloat16().float()))


# ---------------------------------------------------------------- Parseval


@pytest.mark.parametrize(("rows", "cols", "beta"), [(4, 9, 0.1), (6, 6, 0.1), (9, 4, 0.1)])
def test_parseval_retraction_drives_singular_values_to_one(rows: int, cols: int,
                                                           beta: float) -> None:
    w = torch.randn(rows, cols, dtype=F64, generator=_gen(2)) / cols**0.5
    for _ in range(400):
        R.parseval_retraction_(w, beta)
    torch.testing.assert_close(torch.linalg.svdvals(w), torch.ones(min(rows, cols), dtype=F64))


def test_parseval_one_step_formula_and_zero_weight() -> None:
    w = torch.randn(3, 2, 2, dtype=F64)  # ConvTranspose layout (in, out, k)
    m = R.weight_matrix(w, 1)
    expected = 1.1 * m - 0.1 * m @ m.T @ m
    R.parseval_retraction_(w, 0.1, dim=1)
    torch.testing.assert_close(R.weight_matrix(w, 1), expected)
    z = torch.zeros(3, 4)
    R.parseval_retraction_(z, 0.5)
    assert torch.equal(z, torch.zeros(3, 4))


def test_parseval_step_on_model() -> None:
    net = nn.Sequential(nn.Linear(12, 4), nn.Conv2d(2, 4, 2), nn.ConvTranspose2d(4, 6, 2, groups=2))
    net.double()
    for _ in range(300):
        R.parseval_step_(net, beta=0.2)
    for mod, dim in ((net[0], 0), (net[1], 0)):
        torch.testing.assert_close(torch.linalg.svdvals(R.weight_matrix(mod.weight, dim)),
                                   torch.ones(4, dtype=F64))
    for block in R._blocks(net[2].weight, 1, 2):  # per-group blocks (3, 8)
        torch.testing.assert_close(torch.linalg.svdvals(block), torch.ones(3, dtype=F64))


# ---------------------------------------------------------------- model-level penalty


@pytest.mark.parametrize("kind", ["soft", "srip"])
def test_orthogonality_penalty_sums_layers(kind: str) -> None:
    net = nn.Sequential(nn.Linear(5, 3), nn.Conv2d(3, 4, 2, groups=1), nn.BatchNorm2d(4),
                        nn.ConvTranspose1d(4, 6, 3, groups=2))
    fn = R.soft_orthogonality if kind == "soft" else R.srip
    ref = fn(net[0].weight) + fn(net[1].weight) + fn(net[3].weight, dim=1, groups=2)
    loss = R.orthogonality_penalty(net, kind)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert net[0].weight.grad is not None and net[2].weight.grad is None
    assert float(R.orthogonality_penalty(nn.Sequential(nn.ReLU()))) == 0.0
    only_linear = R.orthogonality_penalty(net, kind, types=(nn.Linear,))
    torch.testing.assert_close(only_linear, fn(net[0].weight))


# ---------------------------------------------------------------- projection (PBWN)


def _unit_norms(weight: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return R.weight_matrix(weight, dim).norm(dim=1)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_project_unit_norm_after_each_step(opt_cls: type[torch.optim.Optimizer]) -> None:
    torch.manual_seed(0)
    lin, conv = nn.Linear(6, 4).double(), nn.Conv2d(2, 3, 3).double()
    with torch.no_grad():
        lin.weight[0] = 0  # its output is unused below, so its gradient stays zero
    opt = opt_cls([*lin.parameters(), *conv.parameters()], lr=0.1)
    handle = P.project_unit_norm(opt, [lin, conv.weight], scale=2.0)
    expected_lin = torch.tensor([0.0, 2.0, 2.0, 2.0], dtype=F64)
    for _ in range(3):
        opt.zero_grad()
        loss = lin(torch.randn(5, 6, dtype=F64))[:, 1:].pow(2).sum()
        loss = loss + conv(torch.randn(2, 2, 5, 5, dtype=F64)).pow(2).sum()
        loss.backward()
        opt.step()
        torch.testing.assert_close(_unit_norms(lin.weight), expected_lin, rtol=0, atol=1e-12)
        torch.testing.assert_close(_unit_norms(conv.weight), torch.full((3,), 2.0, dtype=F64),
                                   rtol=0, atol=1e-12)
    handle.remove()
    opt.zero_grad()
    conv(torch.randn(2, 2, 5, 5, dtype=F64)).pow(2).sum().backward()
    opt.step()
    assert (_unit_norms(conv.weight) - 2.0).abs().max() > 1e-6


def test_project_unit_norm_grouped_conv_transpose() -> None:
    net = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, groups=2))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    P.project_unit_norm(opt, net)
    net(torch.randn(1, 4, 3, 3)).sum().backward()
    opt.step()
    per_unit = torch.stack([b.norm(dim=1) for b in R._blocks(net[0].weight, 1, 2)])
    torch.testing.assert_close(per_unit, torch.ones(2, 3))


@settings(deadline=None, derandomize=True, max_examples=25)
@given(st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4), st.integers(0, 2**16))
def test_renormalize_invariant_to_row_scale(scales: list[float], seed: int) -> None:
    w = torch.randn(4, 3, 2, dtype=F64, generator=_gen(seed))
    c = torch.tensor(scales, dtype=F64).view(4, 1, 1)
    a = P.renormalize_(w.clone(), scale=0.5)
    b = P.renormalize_(w * c, scale=0.5)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_unit_norms(a), torch.full((4,), 0.5, dtype=F64))


def test_renormalize_zero_row_and_dtypes() -> None:
    w = torch.randn(3, 5, dtype=torch.bfloat16)
    w[2] = 0
    out = P.renormalize_(w, dim=0)
    assert out is w and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(_unit_norms(out.float()), torch.tensor([1.0, 1.0, 0.0]),
                               rtol=0, atol=1e-2)
    convt = torch.randn(3, 4, 2, dtype=F64)
    P.renormalize_(convt, dim=1)
    torch.testing.assert_close(_unit_norms(convt, 1), torch.ones(4, dtype=F64))


# ---------------------------------------------------------------- errors


def test_bad_input_raises_config_error() -> None:
    w = torch.randn(3, 4)
    opt = torch.optim.SGD([w], lr=0.1)
    cases = [
        (lambda: R.parseval_retraction_(w, -0.1), r"beta must be .* >= 0.*-0\.1"),
        (lambda: R.parseval_step_(nn.Linear(2, 2), beta=float("nan")), r"beta must be .*nan"),
        (lambda: R.srip(w, iterations=0), r"iterations must be an int >= 1, got 0"),
        (lambda: R.srip(w, iterations=-2), r"got -2"),
        (lambda: R.soft_orthogonality(torch.randn(4)), r"ndim >= 2.*\(4,\)"),
        (lambda: R.srip(torch.randn(4)), r"ndim >= 2"),
        (lambda: R.parseval_retraction_(torch.randn(4)), r"ndim >= 2"),
        (lambda: R.weight_matrix(torch.tensor(1.0)), r"ndim >= 2"),
        (lambda: R.weight_matrix(w, 2), r"dim must be an int in \[-2, 2\), got 2"),
        (lambda: R.soft_orthogonality(w, groups=2, dim=1), r"groups must .*shape\[0\]=3.*got 2"),
        (lambda: R.orthogonality_penalty(nn.Linear(2, 2), "frobenius"),
         r"kind must be 'soft' or 'srip', got 'frobenius'"),
        (lambda: R.orthogonality_penalty(nn.Linear(2, 2), types=nn.Linear), r"tuple of module"),
        (lambda: P.renormalize_(w, scale=0.0), r"scale must be .* > 0.*got 0\.0"),
        (lambda: P.renormalize_(w, scale=-1), r"scale must be .*got -1"),
        (lambda: P.renormalize_(w, eps=0.0), r"eps must be .* > 0"),
        (lambda: P.renormalize_(torch.randn(3)), r"ndim >= 2"),
        (lambda: P.project_unit_norm(opt, w, scale=-2.0), r"scale must be .*got -2\.0"),
        (lambda: P.project_unit_norm(opt, nn.Linear(2, 2).bias), r"ndim >= 2.*\(2,\)"),
        (lambda: P.project_unit_norm(opt, nn.ReLU()), r"found no weight to project"),
        (lambda: P.project_unit_norm(opt, ["w"]), r"modules or weight tensors, got str"),
    ]
    for fn, match in cases:
        with pytest.raises(ConfigError, match=match):
            fn()


def test_in_place_functions_reject_parametrized_layers() -> None:
    net = nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 3)))
    with pytest.raises(ConfigError, match=r"Linear.weight is parametrized"):
        R.parseval_step_(net)
    with pytest.raises(ConfigError, match=r"parametrized"):
        P.project_unit_norm(torch.optim.SGD(net.parameters(), lr=0.1), net)
    assert torch.isfinite(R.orthogonality_penalty(net))  # penalties read the computed weight
