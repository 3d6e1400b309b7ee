"""torch signature parity: the arguments users type for torch's norm modules (``bias=False``,
``elementwise_affine``, a list ``normalized_shape``) give torch's module — same outputs and
gradients, same state_dict keys and shapes, strict loads both ways.

float64; after a strict load both modules hold the same tensors, so outputs and gradients agree to
float64 round-off (TOL), far below any real difference (a missing β or a wrong reduction axis
changes outputs by O(1)). Each case runs through the native kernel and the generic composition.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.errors import ConfigError, ShapeError

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
FLAGS = [dict(affine=a, bias=b) for a, b in itertools.product((True, False), repeat=2)]


def _x(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=DT) * 1.7 + 0.3).requires_grad_()


# name -> (ours(affine, bias, native), torch's(affine, bias), input shape)
PAIRS = {
    "bn2d": (lambda a, b, n: nk.BatchNorm(4, affine=a, bias=b, native=n, dtype=DT),
             lambda a, b: nn.BatchNorm2d(4, affine=a, bias=b, dtype=DT), (5, 4, 3, 2)),
    "bn1d_flat": (lambda a, b, n: nk.BatchNorm(3, affine=a, bias=b, native=n, dtype=DT),
                  lambda a, b: nn.BatchNorm1d(3, affine=a, bias=b, dtype=DT), (6, 3)),
    "gn": (lambda a, b, n: nk.GroupNorm(6, num_groups=3, affine=a, bias=b, native=n, dtype=DT),
           lambda a, b: nn.GroupNorm(3, 6, affine=a, bias=b, dtype=DT), (2, 6, 5)),
    "in": (lambda a, b, n: nk.InstanceNorm(4, affine=a, bias=b, track_running_stats=True,
                                           native=n, dtype=DT),
           lambda a, b: nn.InstanceNorm2d(4, affine=a, bias=b, track_running_stats=True,
                                          dtype=DT), (3, 4, 3, 3)),
    "ln_int": (lambda a, b, n: nk.LayerNorm(6, elementwise_affine=a, bias=b, native=n, dtype=DT),
               lambda a, b: nn.LayerNorm(6, elementwise_affine=a, bias=b, dtype=DT), (3, 2, 6)),
    "ln_list1": (lambda a, b, n: nk.LayerNorm([6], elementwise_affine=a, bias=b, native=n,
                                              dtype=DT),
                 lambda a, b: nn.LayerNorm([6], elementwise_affine=a, bias=b, dtype=DT), (4, 6)),
    "ln_chw": (lambda a, b, n: nk.LayerNorm([4, 3, 2], elementwise_affine=a, bias=b, native=n,
                                            dtype=DT),
               lambda a, b: nn.LayerNorm([4, 3, 2], elementwise_affine=a, bias=b, dtype=DT),
               (2, 4, 3, 2)),
    "ln_hw": (lambda a, b, n: nk.LayerNorm((3, 2), affine=a, bias=b, native=n, dtype=DT),
              lambda a, b: nn.LayerNorm((3, 2), elementwise_affine=a, bias=b, dtype=DT),
              (2, 5, 3, 2)),
}


def _randomize(m: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _keys_and_shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: f"affine={f['affine']}-bias={f['bias']}")
@pytest.mark.parametrize("case", list(PAIRS))
def test_matches_torch_module(case, flags, native):
    make_ours, make_ref, shape = PAIRS[case]
    affine, bias = flags["affine"], flags["bias"]
    _assert_parity(lambda: make_ours(affine, bias, native), lambda: make_ref(affine, bias), shape)


def _assert_parity(make_ours, make_ref, shape) -> None:
    """Same keys and shapes; after a strict torch → ours load, same outputs and gradients in train
    and eval; then a strict ours → torch load gives back every tensor."""
    ours, ref = make_ours(), make_ref()
    assert _keys_and_shapes(ours) == _keys_and_shapes(ref)
    assert (getattr(ours, "bias", None) is None) == (getattr(ref, "bias", None) is None)
    assert (ours.weight is None) == (ref.weight is None)
    _randomize(ref, 1)
    assert not ours.load_state_dict(ref.state_dict(), strict=True).missing_keys
    for mode in (True, False):  # train (batch statistics, buffer updates), then eval
        ours.train(mode), ref.train(mode)
        x = _x(shape, 10 + mode)
        y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref, **TOL)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *ours.parameters()], gy)
        want = torch.autograd.grad(y_ref, [x, *ref.parameters()], gy)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)
    back = make_ref()  # ours -> torch, strict, after training updated our buffers
    assert not back.load_state_dict(ours.state_dict(), strict=True).unexpected_keys
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True): input shape, kwargs
RMS_CASES = {
    "int": (6, (3, 2, 6), {}),
    "list1": ([6], (4, 6), {}),
    "chw": ([4, 3, 2], (2, 4, 3, 2), {}),
    "tc_eps": ((3, 2), (2, 5, 3, 2), dict(eps=1e-3)),
    "no_batch_dim": ([3, 2], (3, 2), {}),
}


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("case", list(RMS_CASES))
def test_rms_norm_matches_torch_module(case, affine, native):
    """``nk.RMSNorm`` in torch's form (``elementwise_affine=`` given) is ``torch.nn.RMSNorm``: eps
    ``None`` means the computation type's machine epsilon in both; γ of shape
    ``normalized_shape``."""
    shape_arg, shape, kw = RMS_CASES[case]
    _assert_parity(
        lambda: nk.RMSNorm(shape_arg, elementwise_affine=affine, native=native, dtype=DT, **kw),
        lambda: nn.RMSNorm(shape_arg, elementwise_affine=affine, dtype=DT, **kw), shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape_arg", [16, [3, 16]], ids=["int", "list"])
def test_rms_norm_default_eps_in_half_precision(shape_arg, dtype):
    """torch's ``eps=None`` is the machine epsilon of the computation type: float32's for half
    inputs, not ``finfo(float16).eps`` (~1e-3), which changes the output by O(1) for inputs of
    RMS ~1e-3. Compared at the dtype's default tolerance."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 16, generator=g) * 1e-3).to(dtype)
    ours = nk.RMSNorm(shape_arg, elementwise_affine=True, dtype=dtype)
    torch.testing.assert_close(ours(x), nn.RMSNorm(shape_arg, dtype=dtype)(x))


def test_rms_norm_torch_form_attributes_and_errors():
    rms = nk.RMSNorm([4, 3])
    assert rms.normalized_shape == (4, 3) and rms.num_features == 12 and rms.channel_axis == -1
    assert rms.weight.shape == (4, 3) and rms.bias is None and rms.eps is None
    assert rms.elementwise_affine and not nk.RMSNorm(5, elementwise_affine=False).affine
    assert nk.RMSNorm(16, channel_axis=-1).normalized_shape == (16,)
    assert nk.RMSNorm(8).normalized_shape is None  # normkit's form: RMS over (C, *) per sample
    assert rms._native is None  # γ of shape (4, 3): never torch's one-axis kernel path
    with pytest.raises(ConfigError, match=r"normalized_shape=\[4, 3\] .*torch's RMSNorm.*"
                                          r"channel_axis=1"):
        nk.RMSNorm([4, 3], channel_axis=1)
    with pytest.raises(ConfigError, match=r"affine=False and elementwise_affine=True disagree"):
        nk.RMSNorm(4, affine=False, elementwise_affine=True)
    with pytest.raises(ShapeError, match=r"last 2 dimensions are normalized_shape=\[4, 3\]"):
        rms(torch.randn(2, 3, 4))


def test_bias_false_keeps_gamma_only():
    """``bias=False`` with ``affine``: γ learned (init 1), β absent and ``None`` as in torch; the
    native kernel is used (not the slower generic path)."""
    for m in (nk.BatchNorm(4, bias=False), nk.GroupNorm(4, num_groups=2, bias=False),
              nk.InstanceNorm(4, affine=True, bias=False), nk.LayerNorm([4], bias=False)):
        assert m.bias is None and "bias" not in m.state_dict()
        assert torch.equal(m.weight.detach(), torch.ones(4))
        assert m._native is not None, type(m).__name__


def test_batch_group_norm_bias_false_matches_generic():
    """Batch-group norm's kernel path applies β itself: without β it takes the generic path and
    still equals the composition's formula."""
    m = nk.Normalization(6, nap=nk.nap.BatchGroup(num_groups=2), nrr=nk.nrr.Affine(bias=False),
                         dtype=DT)
    ref = nk.Normalization(6, nap=nk.nap.BatchGroup(num_groups=2),
                           nrr=nk.nrr.Affine(bias=False), native=False, dtype=DT)
    x = _x((4, 6, 3), 0)
    torch.testing.assert_close(m(x), ref(x), **TOL)


def test_layer_norm_torch_form_attributes():
    ln = nk.LayerNorm([4, 3], elementwise_affine=False)
    assert ln.normalized_shape == (4, 3) and ln.num_features == 12
    assert not ln.elementwise_affine and not ln.affine and ln.channel_axis == -1
    assert nk.LayerNorm(768, elementwise_affine=False, bias=False).normalized_shape == (768,)
    assert nk.LayerNorm(8).normalized_shape is None  # normkit's form: the book's LN over (C, *)
    # torch's name for affine with an explicit channels-first layout keeps normkit's partition
    assert nk.LayerNorm(8, elementwise_affine=True, channel_axis=1).normalized_shape is None
    ln = nk.LayerNorm([4, 3], bias=False)
    assert ln.weight.shape == (4, 3) and ln.bias is None
    # the documented alias of affine gives the same module either way
    assert nk.LayerNorm(5, elementwise_affine=True, affine=True).affine


def test_layer_norm_torch_form_no_batch_dim():
    """torch's LayerNorm accepts an input that is just ``normalized_shape``."""
    ours, ref = nk.LayerNorm([3, 2], dtype=DT), nn.LayerNorm([3, 2], dtype=DT)
    _randomize(ref, 3)
    ours.load_state_dict(ref.state_dict())
    x = _x((3, 2), 4)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_features=4, affine=True, elementwise_affine=False),
     r"affine=True and elementwise_affine=False disagree"),
    (dict(num_features=[4, 3], channel_axis=1), r"normalized_shape=\[4, 3\].*channel_axis=-1"),
    (dict(num_features=[4, 3], over="all"), r"over='all'"),
    (dict(num_features=[], ), r"normalized_shape must be .* got \[\]"),
    (dict(num_features=[4, 0]), r"got \[4, 0\]"),
    (dict(num_features=(4, 2.5)), r"got \(4, 2.5\)"),
    (dict(num_features=4, bias="no"), r"bias must be a bool, got 'no'"),
])
def test_layer_norm_bad_arguments(kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(ConfigError, match=message):
        nk.LayerNorm(kwargs.pop("num_features"), **kwargs)


def test_layer_norm_wrong_trailing_shape():
    with pytest.raises(ShapeError, match=r"last 2 dimensions are normalized_shape=\[4, 3\], got "
                                         r"shape \(2, 3, 4\)"):
        nk.LayerNorm([4, 3])(torch.randn(2, 3, 4))


def test_bias_false_in_presets_is_validated():
    with pytest.raises(ConfigError, match=r"bias must be a bool, got 0"):
        nk.BatchNorm(4, bias=0)


# ----------------------------------------------- refusals: arguments that would be ignored


@pytest.mark.parametrize("build", [
    lambda: nk.DecorrelatedBatchNorm(4, iterations=3),
    lambda: nk.PCABatchWhitening(4, iterations=5),  # the default value, but passed explicitly
    lambda: nk.CholeskyBatchWhitening(4, iterations=3),
    lambda: nk.create("dbn", 4, iterations=3),
    lambda: nk.BatchWhitening(4, method="zca", iterations=3),
    lambda: nk.GroupWhitening(4, num_groups=2, method="pca", iterations=3),
    lambda: nk.InstanceWhitening(4, method="cholesky", iterations=3),
    lambda: nk.SwitchableWhitening(4, iterations=3),
], ids=["dbn", "pca_bw", "cd_bw", "create_dbn", "bw_zca", "gw_pca", "iw_cholesky", "sw"])
def test_iterations_with_a_method_that_does_not_iterate_raises(build):
    with pytest.raises(ConfigError, match=r"Whitening|BatchNorm") as info:
        build()
    msg = str(info.value)
    assert "iterations=" in msg and "method='newton'" in msg and "does not iterate" in msg
    assert any(f"method='{m}'" in msg for m in ("zca", "pca", "cholesky")), msg


def test_iterations_defaults_and_newton_are_accepted():
    """Only an explicit ``iterations=`` with a non-iterating method raises: the default does not,
    and Newton–Schulz methods take it."""
    assert nk.DecorrelatedBatchNorm(4).nop.iterations is None  # ZCA: no steps
    assert nk.BatchWhitening(4, method="newton").nop.iterations == 5  # the operation's default
    assert nk.BatchWhitening(4, method="newton", iterations=3).nop.iterations == 3
    assert nk.IterNorm(4, iterations=7).nop.iterations == 7
    assert nk.GroupWhitening(4, num_groups=2, method="newton", iterations=2).nop.iterations == 2
    assert nk.InstanceWhitening(4, method="newton", iterations=4).nop.iterations == 4


def test_layer_norm_multi_dim_uses_the_kernel(monkeypatch):
    """torch's form over several dimensions calls ``F.layer_norm`` with γ of its own shape (the
    composition's kernel path takes one channel axis); ``native=False`` runs the generic path."""
    calls = []
    kernel = torch.nn.functional.layer_norm

    def spy(x, shape, *args, **kw):
        calls.append(tuple(shape))
        return kernel(x, shape, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", spy)
    x = torch.randn(2, 4, 3)
    nk.LayerNorm([4, 3], bias=False)(x)
    assert calls == [(4, 3)]
    nk.LayerNorm([4, 3], native=False)(x)
    assert calls == [(4, 3)]


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky"])
def test_whiten_operation_refuses_iterations_it_would_ignore(method):
    """The operation built directly (``nk.nop.Whiten``) refuses, as the presets do; its default
    ``None`` is 5 Newton–Schulz steps, and the dataclass's ``replace`` (``unfused()``, ``bind``)
    keeps working for every method."""
    with pytest.raises(ConfigError, match=rf"Whiten got iterations=3, but its method='{method}' "
                                          r"does not iterate.*method='newton'"):
        nk.nop.Whiten(method, iterations=3)
    op = nk.nop.Whiten(method)
    assert op.iterations is None and op.unfused().iterations is None
    newton = nk.nop.Whiten("newton")
    assert newton.iterations == 5 and newton.unfused().iterations == 5
    assert nk.nop.Whiten("newton", iterations=2).unfused().iterations == 2
    ragged = nk.Normalization(5, nap=nk.nap.Batch(group_size=2), nop=op)  # bind(): replace()
    assert ragged.nop.last_group == 1 and ragged.nop.iterations is None
    with pytest.raises(ConfigError, match=r"iterations must be an int in \[1, 64\], got 0"):
        nk.nop.Whiten("newton", iterations=0)
