"""The configuration of a comparison sweep: :class:`CompareConfig` and method specs.

Example::

    >>> from normkit.experiments.config import CompareConfig
    >>> cfg = CompareConfig(methods=["GN: num_groups=8", "none"], lrs=None)
    >>> cfg.validate()
    >>> cfg.methods, cfg.run_lr(8)
    (['gn:num_groups=8', 'none'], 0.015)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import registry
from .. import weight as nk_weight
from .._device import check_device as check_device
from ..errors import ConfigError
from ..registry import parse_spec
from .data import DATASETS, IDX_DATASETS
from .models import MODELS
from .tuning import DEFAULT_LRS

__all__ = ["DEFAULT_METHODS", "GRADIENT_METHODS", "OPTIMIZERS", "LR_SCALINGS", "CompareConfig",
           "canonical_method", "check_device"]

DEFAULT_METHODS = ("bn", "gn:num_groups=8", "ln", "none")
GRADIENT_METHODS = ("gc", "block", "agc", "lars", "lamb")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCALINGS = (True, False, "linear", "sqrt")


@dataclass
class CompareConfig:
    """Everything that defines a comparison sweep.

    The grid (``methods`` × ``batch_sizes`` × ``seeds``) says which runs to do; every other field
    is a *setting* that changes what a run computes and is hashed into :meth:`config_hash`, so
    results of different settings are never mixed.

    Attributes:
        methods: normalization specs (``"bn"``, ``"gn:num_groups=8"``, ``"none"``, ...).
        dataset: a name of :data:`normkit.experiments.data.DATASETS`.
        data_dir: directory of IDX files (``mnist``, ``fashion-mnist``); not a setting.
        model: a name of :data:`normkit.experiments.models.MODELS`.
        batch_sizes: training batch sizes.
        seeds: run seeds (model initialization and data order).
        epochs: passes over the training set, the same for every batch size.
        lr: learning rate at ``base_batch_size`` of an untuned sweep (``lrs=None``).
        lrs: the grid of learning rates at ``base_batch_size`` to tune over: each method's lr is
            chosen per batch size on a validation split of the training set, and only the
            chosen one is trained on the whole training set and tested
            (:mod:`normkit.experiments.tuning`); ``None``: no tuning, ``lr`` for every method.
        val_fraction: share of the training set held out for validation when tuning.
        tune_seeds: how many of ``seeds`` (the first ones) run the validation grid when tuning:
            the lr is chosen on their mean validation error, and every seed is then trained and
            tested at it. The default 1 chooses on the first seed (the usual protocol: tune on
            one seed, report over all) and costs ``len(lrs) - 1`` runs less per seed left out;
            ``None``: every seed (a choice averaged over seeds).
        convert: the model (a ``module:function`` spec) is a stock model whose normalization
            layers :func:`normkit.convert` replaces by each method.
        base_batch_size: batch size at which ``lr`` applies when ``lr_scaling`` is on.
        lr_scaling: scale the learning rate with the batch size ``B``: ``True`` or ``"linear"``
            (``lr · B / base``, SGD's rule), ``"sqrt"`` (``lr · √(B / base)``, Adam's usual
            rule), ``False`` (the same lr at every batch size).
        optimizer: ``"sgd"`` (SGD with ``momentum``), ``"adam"`` or ``"adamw"`` (β = (0.9,
            0.999), fused; ``weight_decay`` is Adam's L2 term or AdamW's decoupled decay). Adam's
            usual lr is ~1e-3, but the default 1-D CNN with a warmup wants 0.03–0.1; SGD's ~0.1.
        warmup: share of the training steps over which the lr rises linearly from
            ``lr / warmup_steps`` to ``lr`` before the cosine decay to 0 (0: no warmup).
        momentum: SGD momentum.
        weight_decay: weight decay of the optimizer.
        subset: keep at most this many training and test examples (``None``: all).
        data_seed: seed of the dataset (generation, split and subset), shared by all runs.
        eval_batch_stats: also measure test accuracy with batch statistics (train mode).
        weight: a :mod:`normkit.weight` method applied to every Linear/Conv layer but the output
            layer (``"ws"``, ``"oni:iterations=5"``, ...; ``None``: none).
        gradient: a :mod:`normkit.gradient` method: ``"gc"`` (centralization), ``"block"``
            (block-normalized), ``"agc"`` (adaptive clipping, output layer excluded) as hooks on
            SGD, or ``"lars"`` / ``"lamb"`` replacing SGD (``lr`` is then theirs: LARS steps by
            ``lr·η·‖w‖`` with η = 1e-3, so its ``lr`` is ~100× SGD's; LAMB's is Adam's, ~1e-3);
            ``None``: SGD.
        nproc: data-parallel processes per run (DDP over gloo, every batch-dependent
            normalization synchronized with :func:`normkit.sync`, so the global batch is
            ``batch_size``); 1: one process.
        analyze: after every epoch, record the conditioning of the output layer's input and
            output gradient (:func:`normkit.analysis.layer_statistics` on a copy of the model in
            training mode, 256 training examples), its weight norm and effective learning rate
            η/‖W‖² in the history.
        shift: comma-separated covariate shifts of the test set (``"noise,contrast"``,
            ``"noise:0.5"``; :mod:`normkit.experiments.shift`): after training, each run is
            evaluated on every shifted test set as is, with AdaBN, with prediction-time BN and
            with TENT (``record["shift"]``); ``None``: none.
        input_norm: an :class:`normkit.InputNormalizer` method (``"center"``, ``"standardize"``,
            ``"zca"``, ``"cholesky"``; ``"pca"`` with the ``mlp``) fitted on the training set and
            put in front of the model; ``None``: the inputs as loaded.
        population: ``"pca"``, ``"zca"`` or ``"cholesky"``: every Linear / Conv2d becomes a
            population-whitened layer (:func:`normkit.population.whiten_layers`, Natural Neural
            Networks), refreshed before training and every ``refresh_every`` steps on 4 random
            batches of 256 training examples (:class:`normkit.population.RefreshEvery`, SGD
            momentum transformed); ``None``: plain layers.
        refresh_every: steps between population refreshes (with ``population``).
        device: where every run trains and is evaluated: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or
            ``"mps"``. The dataset is generated, split and shuffled on the CPU (the same batches
            on every device), and the model initialized on the CPU from the run's seed, then
            moved. A setting (results on another device differ in rounding): ``"cpu"`` is not
            hashed, so earlier results keep their hash.
    """

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    dataset: str = "mnist1d"
    data_dir: str | None = None
    model: str = "cnn1d"
    batch_sizes: list[int] = field(default_factory=lambda: [2, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 5
    lr: float = 0.03
    lrs: list[float] | None = field(default_factory=lambda: list(DEFAULT_LRS))
    val_fraction: float = 0.2
    tune_seeds: int | None = 1
    base_batch_size: int = 32
    lr_scaling: bool | str = "sqrt"
    optimizer: str = "adam"
    warmup: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    subset: int | None = 4000
    data_seed: int = 0
    eval_batch_stats: bool = False
    weight: str | None = None
    gradient: str | None = None
    nproc: int = 1
    analyze: bool = False
    shift: str | None = None
    input_norm: str | None = None
    population: str | None = None
    refresh_every: int = 100
    convert: bool = False
    device: str = "cpu"

    _GRID = ("methods", "batch_sizes", "seeds", "data_dir", "lrs", "tune_seeds")

    def settings(self) -> dict[str, Any]:
        """The fields that change what a run computes (all but the grid and ``data_dir``;
        ``weight`` / ``gradient`` only when set, so older results keep their hash). A tuned
        sweep has ``tuned`` and ``val_fraction`` instead of ``lr`` (its lrs are part of the grid:
        adding one resumes)."""
        values = asdict(self)
        values = {k: v for k, v in values.items() if k not in self._GRID} | {"schedule": "cosine"}
        if values["lr_scaling"] == "linear":  # the same runs as True: keep older hashes
            values["lr_scaling"] = True
        if self.lrs is not None:
            values = {k: v for k, v in values.items() if k != "lr"} | {"tuned": True}
        else:
            del values["val_fraction"]
        optional = {"weight": None, "gradient": None, "nproc": 1, "analyze": False,
                    "shift": None, "input_norm": None, "population": None, "refresh_every": 100,
                    "convert": False, "optimizer": "sgd", "warmup": 0.0, "device": "cpu"}
        return {k: v for k, v in values.items() if k not in optional or v != optional[k]}

    def tuning_seeds(self) -> list[int]:
        """The seeds that run the validation grid of a tuned sweep: the first ``tune_seeds`` of
        ``seeds`` (all of them when ``tune_seeds`` is ``None`` or larger)."""
        return list(self.seeds if self.tune_seeds is None else self.seeds[:self.tune_seeds])

    def config_hash(self) -> str:
        """Short stable hash of :meth:`settings`; part of every result's key."""
        text = json.dumps(self.settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def validate(self) -> None:
        """Check every value; canonicalize method specs in place.

        Raises:
            ConfigError: naming the option, the value received and what is allowed.
            UnknownMethodError: for an unknown method name.
        """
        from .user import is_spec

        if self.dataset not in DATASETS and not is_spec(self.dataset):
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of "
                              f"{', '.join(DATASETS)} or give module:function")
        if self.data_dir is not None and self.dataset not in IDX_DATASETS:
            raise ConfigError(f"--data-dir is only read by mnist and fashion-mnist, but the "
                              f"dataset is {self.dataset!r}; drop --data-dir or change --dataset")
        if self.model not in MODELS and not is_spec(self.model):
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)} "
                              "or give module:function")
        if self.convert and not is_spec(self.model):
            raise ConfigError(f"--convert replaces the norms of a user model (--model "
                              f"module:function), not of the built-in {self.model!r}; drop "
                              "--convert")
        if self.lrs is not None:
            if any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
                raise ConfigError(f"learning rates must be > 0, got {self.lrs}")
            if not 0 < self.val_fraction < 1:
                raise ConfigError(f"the validation fraction must be in (0, 1), got "
                                  f"{self.val_fraction}")
            if self.tune_seeds is not None and self.tune_seeds < 1:
                raise ConfigError(f"--tune-seeds must be >= 1 (or 'all'), got {self.tune_seeds}")
        for name, values in (("methods", self.methods), ("batch sizes", self.batch_sizes),
                             ("seeds", self.seeds), ("learning rates", self.lrs or [1])):
            if not values:
                raise ConfigError(f"the list of {name} is empty; give at least one")
            if len(set(values)) != len(values):
                raise ConfigError(f"the list of {name} has duplicates: {values}")
        if any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes must be ≥ 1, got {self.batch_sizes}")
        checks = [("epochs", self.epochs, self.epochs >= 1, "≥ 1"),
                  ("lr", self.lr, self.lr > 0 and math.isfinite(self.lr), "> 0"),
                  ("base batch size", self.base_batch_size, self.base_batch_size >= 1, "≥ 1"),
                  ("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
                  ("weight decay", self.weight_decay, self.weight_decay >= 0, "≥ 0")]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{name} must be {allowed}, got {value}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of "
                              f"{', '.join(OPTIMIZERS)}")
        if self.optimizer != "sgd" and self.gradient in ("lars", "lamb"):
            raise ConfigError(f"--gradient {self.gradient} replaces the optimizer, so the "
                              f"optimizer must be 'sgd', got {self.optimizer!r}; pass "
                              f"--optimizer sgd (optimizer='sgd' from Python)")
        if self.optimizer != "sgd" and self.momentum != 0.9:
            raise ConfigError(f"momentum {self.momentum} is SGD's, but the optimizer is "
                              f"{self.optimizer!r} (its betas are fixed at 0.9, 0.999); pass "
                              f"--optimizer sgd or drop --momentum")
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f"lr_scaling must be one of True, False, 'linear', 'sqrt', got "
                              f"{self.lr_scaling!r}")
        if not (isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 1):
            raise ConfigError(f"warmup must be a share of the training steps in [0, 1), got "
                              f"{self.warmup!r}")
        if self.subset is not None and self.subset < 2:
            raise ConfigError(f"subset must be ≥ 2 examples, got {self.subset}")
        if self.weight is not None:
            name, kwargs = parse_spec(self.weight)
            nk_weight.parametrization(name, torch.zeros(2, 2), **kwargs)  # raises on a bad spec
        if not isinstance(self.nproc, int) or self.nproc < 1:
            raise ConfigError(f"nproc must be an int ≥ 1, got {self.nproc!r}")
        if self.nproc > 1 and min(self.batch_sizes) < self.nproc:
            raise ConfigError(f"every batch size must be ≥ nproc ({self.nproc}) so each process "
                              f"gets a sample, got {self.batch_sizes}")
        if self.analyze and self.nproc > 1:
            raise ConfigError("--analyze runs in one process; drop --nproc or --analyze")
        if self.shift is not None:
            from .shift import parse_shifts, shift_label

            if self.nproc > 1:
                raise ConfigError("--shift evaluates in one process; drop --nproc or --shift")
            self.shift = ",".join(shift_label(*s) for s in parse_shifts(self.shift))
        if self.input_norm is not None:
            from ..input_norm import _METHODS as input_methods

            if self.input_norm not in input_methods:
                raise ConfigError(f"unknown input normalization {self.input_norm!r}; choose one "
                                  f"of {', '.join(input_methods)}")
            if self.input_norm == "pca" and self.model != "mlp":
                raise ConfigError(f"--input-norm pca gives flat (N, k) inputs, which only the mlp "
                                  f"takes; use zca (same whitening, input shape kept) with "
                                  f"--model {self.model}")
        if self.population is not None:
            if self.population not in ("pca", "zca", "cholesky"):
                raise ConfigError(f"unknown population whitening {self.population!r}; choose one "
                                  f"of pca, zca, cholesky")
            if self.weight is not None or self.nproc > 1:
                raise ConfigError("--population replaces the Linear/Conv layers and refreshes them "
                                  "in one process: drop --weight and --nproc")
        if not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise ConfigError(f"refresh_every must be an int ≥ 1, got {self.refresh_every!r}")
        if self.refresh_every != 100 and self.population is None:
            raise ConfigError("--refresh-every applies to --population layers; add --population")
        if self.gradient is not None and self.gradient not in GRADIENT_METHODS:
            raise ConfigError(f"unknown gradient method {self.gradient!r}; choose one of "
                              f"{', '.join(GRADIENT_METHODS)}")
        check_device(self.device, here=False)  # where it runs: backends.check_backend
        if self.device != "cpu" and self.nproc > 1:
            raise ConfigError(f"--nproc runs data-parallel processes on the CPU (gloo), but the "
                              f"device is {self.device!r}; drop --nproc or use --device cpu")
        self.methods = [canonical_method(m) for m in self.methods]
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"the list of methods names one method twice: {self.methods}")

    def run_lr(self, batch_size: int, lr: float | None = None) -> float:
        """Learning rate of a run (``lr``: a value of the tuning grid; default ``self.lr``):
        ``lr · B / base`` with linear scaling, ``lr · √(B / base)`` with ``"sqrt"``, ``lr``
        without scaling (``B = batch_size``, ``base = base_batch_size``)."""
        lr = self.lr if lr is None else lr
        if self.lr_scaling == "sqrt":
            return lr * math.sqrt(batch_size / self.base_batch_size)
        return lr * batch_size / self.base_batch_size if self.lr_scaling else lr


def canonical_method(spec: str) -> str:
    """Canonical form of a method spec: registry name, sorted ``key=value`` arguments.

    Example: ``canonical_method("GroupNorm: num_groups=8")`` == ``"gn:num_groups=8"`` (if
    ``groupnorm`` is an alias of ``gn``); ``canonical_method("none")`` == ``"none"``.

    Raises:
        UnknownMethodError: for an unknown name, listing close matches.
        ConfigError: for a malformed spec or arguments given to ``none``.
    """
    name, kwargs = registry.parse_spec(spec)
    if name.lower() == "none":
        if kwargs:
            raise ConfigError(f"method 'none' takes no arguments, got {spec!r}")
        return "none"
    canon = registry.info(name).name
    args = ",".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
    return f"{canon}:{args}" if args else canon
