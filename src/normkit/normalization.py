"""The one composition module: ``Normalization(num_features, nap=..., nop=..., nrr=...)``.

It owns the state — recovery parameters, running statistics, momentum, train/eval — and runs the
pure math of :mod:`normkit.functional`. Every named method of :mod:`normkit.methods` is a preset of
this class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import _call_cache as CC
from . import _eval_kernel as EK
from . import _pipeline as P
from . import nap as nap_
from . import nop as nop_
from . import nrr as nrr_
from ._forward_copy import copied, forward_copy
from .errors import ConfigError
from .functional import statistics as S
from .functional.kernels import block_affine, kernel_accepts, run_kernel
from .functional.normalize import check_eps, default_eps
from .functional.partition import check_input, pad_channels
from .functional.snapshot import snapshot

__all__ = ["Normalization"]

_AFFINE = nrr_.Affine()  # frozen dataclass: a safe shared default

Native = nop_.Kernel  # the torch kernels an operation may declare (kept for older imports)


class Normalization(nn.Module):
    r"""Normalization composed from an area partition, an operation and a recovery.

    .. math::
        y = \mathrm{NRR}\big(\mathrm{NOP}(x;\ \text{statistics over } \mathrm{NAP}(x))\big)

    e.g. BN is ``nap=Batch(), nop=Standardize(), nrr=Affine()``:
    :math:`y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta`.

    Training fits statistics on the batch (biased variance) and, when ``track_running_stats``,
    updates running estimates ``running_<stat>`` (the variance unbiased) with
    ``running ← (1 − momentum)·running + momentum·batch`` (``momentum=None``: cumulative average).
    Evaluation uses the running estimates when they exist, batch statistics otherwise — torch's
    rule, including when ``track_running_stats`` is toggled after construction. Where the
    composition equals a torch kernel (BN, batch-group via BN, IN, GN, LN, LRN; RMSNorm off CPU,
    where torch's composite is slower) it dispatches to it; the generic path gives the same
    numbers. Running buffers are updated with whatever the batch holds: a NaN
    input propagates into them, as in torch; :meth:`reset_running_stats` recovers.

    Args:
        num_features: number of channels ``C``.
        nap: area partition (:mod:`normkit.nap`).
        nop: normalization operation (:mod:`normkit.nop`), default :class:`~normkit.nop.Standardize`.
        nrr: representation recovery (:mod:`normkit.nrr`), default :class:`~normkit.nrr.Affine`;
            ``None`` for none.
        eps: stability constant (inside the square root). Default ``1e-5``; ``None`` uses the
            machine epsilon of the computation type, as ``torch.nn.RMSNorm``:
            ``torch.finfo(torch.float32).eps`` for float16/bfloat16/float32 inputs, float64's
            for float64 (:func:`~normkit.functional.normalize.default_eps`).
        momentum: weight of the new batch in running estimates, in ``[0, 1]``; ``None`` for a
            cumulative moving average. Default ``0.1``.
        track_running_stats: keep running estimates for evaluation. ``None`` (default) tracks
            them iff the partition is batch-dependent.
        channel_axis: ``1`` for ``(N, C, *spatial)``, ``-1`` for channels-last ``(N, *spatial, C)``
            and transformer ``(B, T, D)`` inputs.
        native: dispatch to torch's kernel where one computes the same thing, and use fused
            autograd Functions (batch whitening) and a cached evaluation fold (whitening without
            gradients: one block-diagonal matmul) — default ``True``; ``False`` runs the plain
            autograd composition of the formula.
        process_group: a ``torch.distributed`` group: training statistics are then merged over
            its ranks (:mod:`normkit.distributed`, :func:`normkit.sync`); ``None``: local.
        device, dtype: factory arguments for parameters and buffers.

    Shape:
        - Input: ``(N, C, *)`` with ``channel_axis=1`` or ``(N, *, C)`` with ``channel_axis=-1``.
        - Output: same shape and dtype as the input — also under ``torch.autocast``, as torch's
          BatchNorm / GroupNorm / LayerNorm do: the statistics are fitted and applied with
          autocast off, in at least float32; a conditional recovery's layers run under it.
          Integer and bool inputs raise :class:`~normkit.DTypeError`.

    Example:
        >>> import torch, normkit as nk
        >>> gn = nk.Normalization(6, nap=nk.nap.Group(num_groups=1), nop=nk.nop.Standardize())
        >>> x = torch.randn(4, 6, 5, 5)
        >>> torch.allclose(gn(x), torch.nn.functional.layer_norm(x, x.shape[1:]), atol=1e-5)
        True
    """

    _version = 2  # torch's BatchNorm version: state_dicts carry num_batches_tracked

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # its own code object for dynamo's per-code recompile limit (normkit._forward_copy);
        # from the MRO, so a mixin's own forward (TrailingDims) is kept
        inherited = cls.forward
        if inherited is Normalization.forward or copied(inherited):
            cls.forward = forward_copy(Normalization.forward, cls)  # type: ignore[method-assign]

    def __init__(
        self,
        num_features: int,
        *,
        nap: nap_.Partition,
        nop: nop_.Operation | None = None,
        nrr: nrr_.Recovery | None = _AFFINE,
        eps: float | None = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool | None = None,
        channel_axis: int = 1,
        native: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        nop = nop_.Standardize() if nop is None else nop
        nrr = nrr_.Identity() if nrr is None else nrr
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
            raise ConfigError(f"num_features must be a positive int, got {num_features!r}")
        for what, obj, base in (("nap", nap, nap_.Partition), ("nop", nop, nop_.Operation),
                                ("nrr", nrr, nrr_.Recovery)):
            if not isinstance(obj, base):
                raise ConfigError(f"{what} must be a normkit.{what}.{base.__name__}, got {obj!r}")
        if eps is not None:  # None: default_eps(input dtype) at run time (torch's RMSNorm)
            check_eps(eps, nop)
        if momentum is not None and not (0.0 <= momentum <= 1.0):
            raise ConfigError(
                f"momentum must be in [0, 1] (weight of the new batch) or None for a cumulative "
                f"average, got {momentum!r}"
            )
        if channel_axis not in (1, -1):
            raise ConfigError(f"channel_axis must be 1 or -1, got {channel_axis!r}")
        self.num_features = num_features
        self.groups = nap.groups(num_features)  # validates the grouping at construction
        nop = nop.bind(nap, num_features)  # refuses, or knows, a smaller last group
        self.nap, self.nop, self.nrr = nap, (nop if native else nop.unfused()), nrr
        # channels zero-padded to whole groups when the last group is smaller (whitening)
        self._num_padded = self.groups[0] * self.groups[1] - num_features
        self.eps = eps
        self.momentum = momentum
        self.channel_axis = channel_axis
        self.native = native
        # training statistics over the ranks of this torch.distributed group (normkit.sync)
        self.process_group = process_group
        if process_group is not None and not nap.batch_dependent:
            raise ConfigError(f"{nap!r} is per sample: there is nothing to synchronize")
        if track_running_stats is None:
            track_running_stats = nap.batch_dependent
        self.track_running_stats = track_running_stats
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        created = nrr.create(num_features, factory)
        self._nrr_names = tuple(created)
        for name, p in created.items():
            if isinstance(p, nn.Module):  # e.g. SPADE's small conv net
                self.add_module(name, p)
            else:
                self.register_parameter(name, p)
        if nrr.conditional and self.groups[0] * self.groups[1] != num_features:
            raise ConfigError("a conditional recovery needs group sizes that divide num_features")
        nop_params = nop.create_parameters(num_features, nap, factory)
        self._nop_param_names = tuple(nop_params)
        for name, p in nop_params.items():
            self.register_parameter(name, p)
        if track_running_stats:
            if nap.roles[3] != "M":
                raise ConfigError(
                    f"{nap!r} keeps separate statistics per position, which vary with the input "
                    f"size and cannot be tracked; pass track_running_stats=False"
                )
            self._buffer_init = nop.buffers(nap, num_features)
            for stat, (shape, _) in self._buffer_init.items():
                self.register_buffer(f"running_{stat}", torch.empty(shape, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self._buffer_init = {}
            for stat in nop.stat_names:
                self.register_buffer(f"running_{stat}", None)
            self.register_buffer("num_batches_tracked", None)
        # the operation's own state buffers (reads_state operations), beside the running ones
        spec = nop.state_buffers(nap, num_features) if track_running_stats else {}
        self._state_init = {name: init for name, (_, init) in spec.items()}
        for name, (shape, init) in spec.items():
            self.register_buffer(name, torch.full(shape, init, **factory))
        # the torch kernel computing this composition, where one does (the operation says)
        self._native: Native | None = self.nop.native_kernel(self._layout()) if native else None
        self._eval_kernel = EK.applies(self)  # evaluation: one BN kernel call (_eval_kernel.py)
        self.reset_parameters()

    # ------------------------------------------------------------------ state
    @property
    def affine(self) -> bool:
        """Whether the module has learnable recovery parameters (torch's ``affine``)."""
        return not isinstance(self.nrr, nrr_.Identity)

    def _recovery_params(self) -> dict[str, Any]:
        return CC.members(self, ("weight", "bias", *self._nrr_names), strict=False)

    def _recovery_views(self, x: Tensor | None = None, condition: Any = None,
                        params: dict[str, Any] | None = None
                        ) -> tuple[Tensor | None, Tensor | None]:
        """The recovery's ``(γ, β)`` against the canonical view (per-channel parameters padded
        with ``γ = 1, β = 0`` for the zero channels of a smaller last group); conditional
        recoveries compute them from the input ``x`` and the ``condition``. ``params``: the
        :meth:`_recovery_params` of this call, if already read."""
        if params is None:
            params = self._recovery_params()
        if self.nrr.conditional:
            return self.nrr.conditional_views(params, self.groups, x=x, condition=condition,
                                              channel_axis=self.channel_axis)
        if self._num_padded:
            params = {k: pad_channels(t, self._num_padded, 0, 1.0 if k == "weight" else 0.0)
                      if t is not None and t.numel() == self.num_features else t
                      for k, t in params.items()}
        return self.nrr.views(params, self.groups)

    def _running(self) -> dict[str, Tensor] | None:
        return CC.running_buffers(self, self.nop.stat_names)

    def _state_buffers(self) -> dict[str, Tensor]:
        """The operation's own state buffers (:meth:`~normkit.nop.Operation.state_buffers`)."""
        return CC.members(self, getattr(self, "_state_init", ()))  # (older pickles lack it)

    def reset_running_stats(self) -> None:
        """Reset running estimates to mean 0, variance/scale 1, the batch counter to 0 and the
        operation's state buffers to their initial values."""
        for name, buf in self._state_buffers().items():
            buf.fill_(self._state_init[name])
        running = self._running()
        if running is None:
            return
        for stat, buf in running.items():
            init = self._buffer_init[stat][1]
            if init == "eye":
                buf.copy_(torch.eye(buf.shape[-1], dtype=buf.dtype, device=buf.device).expand_as(buf))
            else:
                buf.fill_(float(init))
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics and re-initialize the recovery parameters."""
        self.reset_running_stats()
        self.nrr.reset(self._recovery_params(), self.num_features)
        self.nop.reset_parameters(self._nop_params())

    def _nop_params(self) -> dict[str, Tensor]:
        return CC.members(self, self._nop_param_names)

    def folded(self) -> tuple[Tensor, Tensor]:
        """The evaluation transform as one affine map, for folding into a neighbouring layer.

        Standardization-family methods give per-channel ``(a, b)``, each ``(C,)``, with
        ``y = a ⊙ x + b``; whitening gives ``(M, b)`` with ``M`` of shape ``(C/d, d, d)`` (one block
        of a block-diagonal matrix per group) and ``b`` of shape ``(C,)``, with ``y = M x + b``
        per group (with a smaller last group of ``r`` channels, its block is ``r × r`` in the
        top-left corner of the last ``d × d`` one: the block-diagonal matrix cut to ``C × C``).
        Uses the running statistics.

        Raises:
            ConfigError: when there are no running statistics (nothing fixed to fold).

        Example:
            >>> import torch, normkit as nk
            >>> bn = nk.BatchNorm(4).eval()
            >>> a, b = bn.folded()
            >>> x = torch.randn(2, 4, 3)
            >>> torch.allclose(bn(x), x * a[:, None] + b[:, None], atol=1e-6)
            True
        """
        running = self._running()
        if running is None:
            raise ConfigError(
                f"{type(self).__name__} has no running statistics to fold (statistics depend on "
                f"each input); only methods with track_running_stats fold"
            )
        if self.nrr.conditional:
            raise ConfigError(f"{type(self).__name__}'s γ, β depend on each input or condition; "
                              f"there is nothing fixed to fold")
        stats = self.nop.from_running(running, self.nap, self.num_features)
        w, b = self._recovery_views()
        eps = self.eps if self.eps is not None else default_eps(stats["mean"].dtype)
        a, shift = self.nop.fold(stats, nap=self.nap, eps=eps, weight=w, bias=b)
        return self.nrr.compose((a, shift[: self.num_features]), self._recovery_params())

    def extra_repr(self) -> str:
        s = f"{self.num_features}, nap={self.nap!r}, nop={self.nop!r}, nrr={self.nrr!r}, eps={self.eps}"
        s += f", momentum={self.momentum}, track_running_stats={self.track_running_stats}"
        return s + (f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else "")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kw):  # type: ignore[no-untyped-def]
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.num_batches_tracked is not None:
            # torch BN checkpoints before version 2 have no counter; start it at 0 like torch.
            state_dict.setdefault(key, torch.tensor(0, dtype=torch.long))
        for name, buf in self._state_buffers().items():  # a BN state_dict loads (strictly) into
            # a stateful preset: its extra buffers start as after a reset
            state_dict.setdefault(prefix + name, torch.full_like(buf, self._state_init[name]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kw)

    # ---------------------------------------------------------------- forward
    def _layout(self) -> nop_.Layout:
        nrr = self.nrr
        recovery: Any = "other"
        if isinstance(nrr, nrr_.Identity):
            recovery = "none"
        elif type(nrr) is nrr_.Affine and nrr.shape is None and nrr.weight:
            recovery = "affine" if nrr.bias else "weight"
        return nop_.Layout(nap=self.nap, groups=self.groups, channel_axis=self.channel_axis,
                           tracking=self.track_running_stats, recovery=recovery)

    def _factor(self) -> float | Tensor:
        """Weight of the new batch: ``momentum``, or ``1/n`` after ``n`` batches (cumulative
        average) — a float64 0-d tensor under ``torch.compile`` / ``torch.export``, where
        ``float()`` of a buffer would be a data-dependent value and break the graph."""
        if self.momentum is None:
            if torch.compiler.is_compiling():
                return self.num_batches_tracked.double().reciprocal()
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, x: Tensor, condition: Any = None) -> Tensor:
        """Normalize ``x`` (see the class docstring for shapes); ``condition`` is the second input
        of conditional recoveries (a class index, an embedding, a style tensor, a map ...).

        Raises:
            ShapeError: on an input of the wrong rank or channel count.
            ConfigError: when a conditional recovery gets no condition, or another gets one.
        """
        return self._run(x, condition)

    def _run(self, x: Tensor, condition: Any = None, *, use_batch: bool | None = None,
             update: bool | None = None, steps: int = 1, generic: bool = False,
             extra: dict[str, Any] | None = None) -> Tensor:
        """The pipeline of one call (:mod:`normkit._pipeline`). Presets change a call through the
        keywords — ``use_batch``/``update`` (default torch's rule from the mode and the running
        estimates), ``steps`` added to ``num_batches_tracked`` by an updating call, ``generic``
        (no torch kernel, no evaluation fold), ``extra`` (their own inputs, on
        :attr:`Call.extra`) — and through the hooks :meth:`_statistics` and :meth:`_transform`.
        """
        check_input(x, self.num_features, self.channel_axis)
        self.nrr.check_condition(condition, x)
        shape = tuple(x.shape)
        vector = x.dim() == 1  # a single (C,) vector with channel_axis=-1: one sample
        if vector:
            x = x.unsqueeze(0)
        running = self._running()
        if use_batch is None:
            use_batch = self.training or running is None
        if update is None:
            update = self.training and self.track_running_stats and running is not None
        nap = self._training_nap()
        empty = x.numel() == 0
        if empty and nap is self.nap:  # defined result: empty output, buffers untouched
            update = False
        elif use_batch:  # before any state changes; also in eval without running stats (torch)
            if nap is self.nap:
                CC.check_batch_once(self, x, shape)
            else:  # synchronized: the count is global (a collective), every call
                P.check_batch(x, self.groups, self.channel_axis, self._num_padded, nap, self.nop,
                              shape)
        if update:
            self.num_batches_tracked.add_(steps)
        kind = None if generic or nap is not self.nap else self._native
        if nap is not self.nap or generic:  # synchronized: the statistics' collectives run on
            # every rank, a rank with an empty batch included (it contributes nothing but must
            # take part)
            y = self._forward_generic(x, running, use_batch, update, condition, nap, extra)
        elif not (use_batch or update) and running is not None and not empty and (
                ev := EK.evaluate(self, x, running)) is not None:
            y = ev
        elif not use_batch and condition is None and (fold := EK.block_fold(self, x)) is not None:
            y = block_affine(x, *fold)
        elif kind is not None and not empty and self._native_ok(x, use_batch):
            y = self._forward_native(x, running, use_batch, update)
        else:
            y = self._forward_generic(x, running, use_batch, update, condition, nap, extra)
        return y.squeeze(0) if vector else y

    def _native_ok(self, x: Tensor, use_batch: bool | None = None, kind: str | None = None
                   ) -> bool:
        """Whether this call runs torch's ``kind`` kernel (default: the module's own;
        :func:`~normkit.functional.kernels.kernel_accepts`)."""
        kind = self._native if kind is None else kind
        if kind is None:
            return False
        if use_batch is None:
            use_batch = self.training or self._running() is None
        if (self.momentum is None and self.training and self.track_running_stats
                and torch.compiler.is_compiling()):
            return False  # torch's kernels take the 1/n of a cumulative average as a Python float
        if not self.nop.native_applies(use_batch):
            return False
        if kind == "layer_norm" and self.channel_axis == 1 and torch.compiler.is_compiling():
            return False  # inductor: the composition beats LN over moved channels (2x, bench)
        return kernel_accepts(kind, x, CC.member(self, "weight"), use_batch=use_batch)

    def _training_nap(self) -> nap_.Partition:
        """The partition statistics are fitted over: synchronized over ``process_group`` in
        training (evaluation never communicates)."""
        if self.process_group is None or not self.training:
            return self.nap
        return nap_.Synced(inner=self.nap, group=self.process_group)

    def _forward_generic(
        self, x: Tensor, running: dict[str, Tensor] | None, use_batch: bool, update: bool,
        condition: Any = None, nap: nap_.Partition | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Tensor:
        nap = self.nap if nap is None else nap
        eps = self.eps if self.eps is not None else default_eps(x.dtype)
        xp, v = P.view_of(x, self.groups, self.channel_axis, self._num_padded)
        params = self._recovery_params()  # read once: the views and the post step
        w, b = self._recovery_views(xp, condition, params)
        if x.numel() == 0 and nap is self.nap:
            y = P.empty_output(v, xp, self.num_features, self.channel_axis, w, b,
                               list(self._nop_params().values()))
            return self.nrr.post(y, params, self.channel_axis)
        spatial = P.spatial_of(xp, self.channel_axis)
        call = P.Call(x=xp, v=v, spatial=spatial, m=nap.count(v, spatial), eps=eps, nap=nap,
                      use_batch=use_batch, update=update, running=running,
                      extra={} if extra is None else extra)
        with S.autocast_off(x):  # statistics in float32 (the recovery above runs under autocast)
            call.stats = self._statistics(call)
            out = self._transform(call, call.stats, w, b)
        y = P.finish(out, xp, self.num_features, self.channel_axis)
        return self.nrr.post(y, params, self.channel_axis)

    def _statistics(self, call: P.Call) -> nop_.Stats:
        """Hook: the statistics ``call`` normalizes with — fitted on the batch (and the running
        estimates updated) or, for evaluation, from the running estimates."""
        params = self._nop_params()
        if call.use_batch:
            stats = self.nop.fit(call.v, call.nap, call.spatial, eps=call.eps, params=params,
                                 **({"state": self._op_state(call)} if self.nop.reads_state else {}))
            if call.update and call.running is not None:
                self._update_running(call.running, stats, call.m)
            return stats
        assert call.running is not None
        return self.nop.eval_stats(call.v, call.running, nap=self.nap, spatial=call.spatial,
                                   num_features=self.num_features, eps=call.eps, params=params)

    def _transform(self, call: P.Call, stats: nop_.Stats, weight: Tensor | None,
                   bias: Tensor | None) -> Tensor:
        """Hook: the output on the canonical view — the operation's transform with the
        recovery's ``γ, β``."""
        return P.transform(call, stats, self.nop, weight, bias)

    def _op_state(self, call: P.Call) -> nop_.State | None:
        """The operation's :class:`~normkit.nop.State` for this call: the running estimates, the
        counter and its state buffers, when the module tracks them (torch's rule: with the
        tracking off, training uses the batch alone). Read as they are before this step updates
        them, compiled backward included (:func:`~normkit.functional.snapshot.snapshot`); the
        buffers the backward reads and records when it runs stay live."""
        if not self.track_running_stats or call.running is None:
            return None
        live = self.nop.backward_state
        return nop_.State(
            running={k: snapshot(t) for k, t in call.running.items()},
            step=snapshot(self.num_batches_tracked),
            buffers={k: t if k in live else snapshot(t) for k, t in self._state_buffers().items()},
        )

    @S.no_grad
    def _update_running(self, running: dict[str, Tensor], stats: dict[str, Tensor], m: int) -> None:
        factor = self._factor()
        for k, t in self.nop.running(stats, m).items():
            S.ema_update(running[k], t, factor)
        self.nop.update_state(self._state_buffers(), stats)

    def _forward_native(
        self, x: Tensor, running: dict[str, Tensor] | None, use_batch: bool, update: bool
    ) -> Tensor:
        kind = self._native
        assert kind is not None
        keep = running is not None and (update or not use_batch)
        lrn = None
        if kind == "local_response_norm":
            nop: Any = self.nop
            lrn = (self.nap.channel_window, nop.alpha, nop.beta, nop.k)  # type: ignore[attr-defined]
        return run_kernel(
            kind, x, weight=CC.member(self, "weight"), bias=CC.member(self, "bias"),
            running=(running["mean"], running["var"]) if keep else None,  # type: ignore[index]
            use_batch=use_batch, factor=self._factor() if update else 0.0,
            eps=self.eps if self.eps is not None else default_eps(x.dtype),
            groups=self.groups, channel_axis=self.channel_axis, lrn=lrn,
        )
