"""``normkit::snapshot`` — the opaque copy of module state read by a compiled forward that then
updates it (normkit.functional.snapshot): a well-formed op (schema, fake kernel, dispatch), and
compiled training steps of stateful methods (inductor for one) matching eager's in float64."""

from __future__ import annotations

import copy

import pytest
import torch

import normkit as nk
from generic_util import assert_same_step
from normkit.functional.snapshot import snapshot


@pytest.mark.parametrize("t", [torch.randn(5), torch.tensor(7), torch.randn(2, 3, dtype=torch.float64)],
                         ids=["vector", "int64 scalar", "float64 matrix"])
def test_snapshot_op_is_well_formed(t: torch.Tensor) -> None:
    """opcheck: schema, fake kernel against the real one, dispatch (and AOTAutograd)."""
    torch.library.opcheck(torch.ops.normkit.snapshot.default, (t,))
    out = torch.ops.normkit.snapshot.default(t)
    assert torch.equal(out, t) and out.dtype == t.dtype
    assert out.data_ptr() != t.data_ptr()  # a copy: later in-place updates of t do not show


def test_snapshot_is_the_tensor_in_eager_mode() -> None:
    buf = torch.zeros(3)
    assert snapshot(buf) is buf
    w = torch.ones(3, requires_grad=True)
    assert snapshot(w) is w


_STATEFUL = {  # method -> (constructor arguments, backend); inductor for the case that needs
    # the snapshot (AOTAutograd's partitioner without code generation for the other)
    "batch_renorm": ({"r_max": 3.0, "d_max": 5.0, "warmup_steps": 0, "r_max_steps": 0,
                      "d_max_steps": 0}, "aot_eager_decomp_partition"),
    "momentum_bn": ({"lambda_": 0.6}, "inductor"),
}


@pytest.mark.filterwarnings(  # torch's own: inductor imports torch.utils.mkldnn
    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("method", list(_STATEFUL))
def test_compiled_stateful_steps_match_eager(method: str) -> None:
    """Batch renormalization reads the running estimates and the step counter (for r, d, which
    γ's gradient needs), momentum BN its momentum statistics (blended into the statistics the
    backward differentiates); both update that state in the same forward. Three
    compiled training steps give eager's outputs, gradients and buffers: the backward
    used the values the forward read, not the updated buffers (momentum BN's gradients differ
    without the snapshot)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    kwargs, backend = _STATEFUL[method]
    m = nk.create(method, 3, **kwargs).double()
    with torch.no_grad():  # running estimates off the batch's: r, d away from 1, 0
        m.running_mean.copy_(torch.tensor([0.5, -0.3, 0.1]))
        m.running_var.copy_(torch.tensor([2.0, 0.7, 1.3]))
        m.weight.copy_(torch.tensor([1.5, 0.8, -1.1]))
        m.bias.copy_(torch.tensor([0.2, -0.1, 0.3]))
    c = copy.deepcopy(m)
    compiled = torch.compile(c, backend=backend, fullgraph=True)
    for step in range(3):
        x = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64) * 2 + 0.5
        assert_same_step(m, compiled, x, seed=step)
    assert int(m.num_batches_tracked) == 3
    torch._dynamo.reset()
