"""The per-step cost of ``torch.library``'s eager call path for normkit's custom ops (issue 20).

``python benchmarks/eager_ops.py [METHODS] [--shape 8x64x8x8] [--repeats 41]``

Each method's fwd+bwd training step is timed in one process with its custom ops called through
the dispatcher (:func:`normkit.functional._eager_ops.force_ops`: the path compiled and exported
code keeps, and the eager path before issue 20) and through the eager ``autograd.Function``
(:func:`~normkit.functional._eager_ops.eager_op`), interleaved (the order alternates per round),
in thread CPU time. Printed: the medians and the median of the paired differences, with how many
rounds favoured the eager path. ``METHODS``: comma-separated ``name`` or
``name:key=value;key=value`` (integers parsed), e.g. ``dbn:group_size=12`` (a padded last group:
the two-op path). ``mixture_norm`` (whose eager step calls no op) is the noise control. Not a
test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch

import normkit as nk
from normkit.functional._eager_ops import force_ops

DEFAULT = ("group_whitening,instance_whitening,switchable_whitening,"
           "group_whitening:method=cholesky,dbn:group_size=12,mixture_norm")


def _module(spec: str, channels: int) -> torch.nn.Module:
    name, _, rest = spec.partition(":")
    kw = {k: int(v) if v.isdigit() else v
          for k, v in (kv.split("=") for kv in rest.split(";") if kv)}
    return nk.create(name, channels, **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="?", default=DEFAULT)
    parser.add_argument("--shape", default="8x64x8x8")
    parser.add_argument("--repeats", type=int, default=41)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(int(s) for s in args.shape.split("x"))
    x = torch.randn(*shape, requires_grad=True)
    grad = torch.ones(shape)

    def step(m: torch.nn.Module, through_op: bool) -> float:
        with force_ops() if through_op else torch.enable_grad():
            t = time.thread_time()
            m(x).backward(grad)
            return time.thread_time() - t

    for spec in args.methods.split(","):
        m = _module(spec, shape[1])
        for _ in range(2):
            step(m, True)
            step(m, False)
        ops, eager = [], []
        for r in range(args.repeats):
            for through_op in ((True, False) if r % 2 == 0 else (False, True)):
                (ops if through_op else eager).append(step(m, through_op))
        diff = sorted(a - b for a, b in zip(ops, eager, strict=True))
        mid = args.repeats // 2
        a, b, d = sorted(ops)[mid] * 1e3, sorted(eager)[mid] * 1e3, diff[mid] * 1e3
        print(f"{spec:34s} {args.shape:14s} op {a:8.3f} ms  eager {b:8.3f} ms  "
              f"paired {d:+.3f} ms ({d / a * 100:+.1f} %)  eager faster "
              f"{sum(v > 0 for v in diff)}/{args.repeats}", flush=True)


if __name__ == "__main__":
    main()
