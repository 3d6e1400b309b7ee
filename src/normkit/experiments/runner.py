"""One training run: the unit ``normkit compare`` sweeps over (its configuration,
:class:`~normkit.experiments.config.CompareConfig`, is re-exported here).

A run trains one model (one normalization method, batch size and seed) with the configured
optimizer (Adam by default; SGD + momentum, AdamW, LARS, LAMB) and a cosine learning-rate decay
after an optional linear warmup (:func:`lr_schedule`), evaluates the test set after every epoch and
returns a JSON-able record.
A run never raises for a training failure: a non-finite loss gives ``status="diverged"``, an
exception ``status="failed"`` with the error text. Example::

    >>> from normkit.experiments.data import load_dataset
    >>> from normkit.experiments.runner import CompareConfig, train_run
    >>> cfg = CompareConfig(methods=["none"], dataset="gaussian", epochs=1)
    >>> data = load_dataset("gaussian", subset=256)
    >>> record = train_run(data, cfg, "none", batch_size=32, seed=0)
    >>> record["status"], record["steps"]
    ('ok', 8)
"""

from __future__ import annotations

import copy
import gc
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import gradient as nk_gradient
from .. import weight as nk_weight
from ..errors import ConfigError
from ..registry import parse_spec
from . import torchrun
from .config import DEFAULT_METHODS as DEFAULT_METHODS
from .config import GRADIENT_METHODS as GRADIENT_METHODS
from .config import CompareConfig as CompareConfig
from .config import canonical_method as canonical_method
from .data import Dataset
from .models import build_model
from .scoring import evaluate as evaluate
from .tuning import to_validation, validation_split

__all__ = ["DEFAULT_METHODS", "GRADIENT_METHODS", "CompareConfig", "canonical_method",
           "validate_methods", "train_run", "evaluate", "lr_schedule"]

def validate_methods(dataset: Dataset, cfg: CompareConfig) -> dict[str, int]:
    """Build the model with every method and run one training step on two examples.

    Catches what would otherwise fail mid-sweep: arguments a method rejects (e.g. groups that do
    not divide the channels), methods that cannot take the model's shapes (e.g. a spatial method
    on an MLP's ``(N, C)`` activations), batch sizes larger than the training set.

    Returns:
        Number of parameters of the model for each method.

    Raises:
        ConfigError: naming the method, the model, the input shape and the underlying error,
            or saying which models fit the data.
    """
    n_train = len(dataset.x_train)
    if max(cfg.batch_sizes) > n_train:
        raise ConfigError(f"batch size {max(cfg.batch_sizes)} exceeds the {n_train} training "
                          "examples; lower --batch-sizes or raise --subset")
    if cfg.lrs is not None:  # the validation runs train on the rest of the training set
        n_train -= round(cfg.val_fraction * n_train)
        if max(cfg.batch_sizes) > n_train:
            raise ConfigError(f"batch size {max(cfg.batch_sizes)} exceeds the {n_train} training "
                              f"examples left beside the validation split; lower --batch-sizes, "
                              f"--val-fraction, or raise --subset")
    build_model(cfg.model, dataset.input_shape, dataset.num_classes, "none",
                **_model_kw(cfg))  # model vs data
    sizes = {}
    x, y = dataset.x_train[:2], dataset.y_train[:2]
    for method in cfg.methods:
        try:
            model = build_model(cfg.model, dataset.input_shape, dataset.num_classes, method,
                                **_model_kw(cfg))
            F.cross_entropy(model.train()(x), y).backward()
            with torch.no_grad():
                model.eval()(x)
        except Exception as err:  # any failure here is a configuration the user must change
            raise ConfigError(
                f"method {method!r} does not work in model {cfg.model!r} on {dataset.name} "
                f"inputs of shape {dataset.input_shape}: {_one_line(err)}; change its arguments, "
                "the --model or drop it from --methods"
            ) from err
        sizes[method] = sum(p.numel() for p in model.parameters())
    return sizes


def _model_kw(cfg: CompareConfig) -> dict[str, Any]:
    return {"convert": True} if cfg.convert else {}


def train_run(dataset: Dataset, cfg: CompareConfig, method: str, batch_size: int, seed: int, *,
              lr: float | None = None, phase: str = "test",
              on_steps: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train and evaluate one model; never raises for a failed or diverged run.

    Args:
        dataset: the data (the same for every run of a sweep).
        cfg: the sweep's settings (``epochs``, ``lr``, ...).
        method: canonical method spec (see :func:`canonical_method`).
        batch_size: training batch size; the last incomplete batch of an epoch is dropped.
        seed: seeds the model initialization and the data order.
        lr: the lr at the base batch size, a value of ``cfg.lrs`` (``None``: ``cfg.lr``).
        phase: ``"test"`` trains on the training set and tests; ``"val"`` trains on the training
            set minus the validation split and is evaluated on that split only
            (:func:`~normkit.experiments.tuning.validation_split`; results named ``val_*``,
            no batch-statistics, shift or analysis evaluation).
        on_steps: called with the number of optimizer steps done since its last call.

    Returns:
        A JSON-able record: ``method``, ``batch_size``, ``seed``, ``config_hash``, ``phase``,
        ``status`` (``ok``/``diverged``/``failed``), ``error``, ``lr`` (of this batch size),
        ``base_lr`` (with ``lr``), ``steps``, ``val_error`` (validation phase), ``test_acc``,
        ``test_error`` (percent), ``test_acc_batch_stats``/``test_error_batch_stats`` (with
        ``cfg.eval_batch_stats``), ``time_per_step_ms``, ``wall_s``, ``history`` (per epoch)
        and, with ``cfg.shift``, ``shift`` (see :func:`normkit.experiments.shift.evaluate_shifts`).
    """
    start = time.perf_counter()
    record: dict[str, Any] = {
        "method": method, "batch_size": batch_size, "seed": seed,
        "config_hash": cfg.config_hash(), "phase": phase, "status": "ok", "error": None,
        "lr": cfg.run_lr(batch_size, lr), "epochs": cfg.epochs, "steps": 0, "history": [],
        "test_loss": None, "test_acc": None, "test_error": None, "time_per_step_ms": None,
    }
    if lr is not None:
        record["base_lr"] = lr
    if phase == "val":  # the test set is not read: the validation split replaces it
        dataset = validation_split(dataset, cfg.val_fraction, cfg.data_seed)
        cfg = replace(cfg, eval_batch_stats=False, shift=None, analyze=False)
    if cfg.eval_batch_stats:
        record |= {"test_acc_batch_stats": None, "test_error_batch_stats": None}
    if cfg.shift is not None:
        record["shift"] = None
    try:
        if cfg.nproc == 1 and torchrun.active():  # every torchrun process trains this run
            import torch.distributed as dist

            _train(dataset, cfg, record, on_steps or (lambda n: None), rank=dist.get_rank(),
                   world=dist.get_world_size())
        elif cfg.nproc > 1:
            record |= _train_parallel(dataset, cfg, record)
            (on_steps or (lambda n: None))(record["steps"])
        else:
            _train(dataset, cfg, record, on_steps or (lambda n: None))
    except Exception as err:  # one broken run must not end the sweep; KeyboardInterrupt does
        record |= {"status": "failed", "error": f"{type(err).__name__}: {_one_line(err)}"}
    record["wall_s"] = round(time.perf_counter() - start, 3)
    return to_validation(record) if phase == "val" else record


def _train(ds: Dataset, cfg: CompareConfig, record: dict[str, Any],
           on_steps: Callable[[int], None], rank: int = 0, world: int = 1) -> None:
    """The training loop of :func:`train_run`; fills ``record`` as it goes. With ``world > 1``
    (inside :func:`_train_parallel`'s processes) each rank trains DDP on its slice of every
    batch, normalizations synchronized; logged values are global."""
    batch_size, seed = record["batch_size"], record["seed"]
    if world > 1:  # data-parallel: the record says over how many processes
        record["world_size"] = world
    device = torch.device(cfg.device)
    ds = ds.to(device)
    torch.manual_seed(seed)  # initialized on the CPU, then moved: the same weights everywhere
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, record["method"],
                        **_model_kw(cfg))
    if cfg.population is not None:
        from .. import population

        population.whiten_layers(model, method=cfg.population)  # type: ignore[arg-type]
    if cfg.input_norm is not None:  # fitted on the training set, the same for every run
        from ..input_norm import InputNormalizer

        model = nn.Sequential(InputNormalizer(method=cfg.input_norm).fit(ds.x_train), model)  # type: ignore[arg-type]
    model.to(device)
    record["num_params"] = sum(p.numel() for p in model.parameters())
    steps_per_epoch = len(ds.x_train) // batch_size
    opt = _optimizer(model, cfg, record["lr"])
    refresher = None
    if cfg.population is not None:
        from ..population import RefreshEvery

        draw = torch.Generator().manual_seed(seed + 1)
        refresher = RefreshEvery(
            model, lambda: [ds.x_train[torch.randint(len(ds.x_train), (256,), generator=draw)]
                            for _ in range(4)], every=cfg.refresh_every, optimizer=opt)
        refresher.refresh()
    if world > 1:
        import torch.distributed as dist

        from .. import distributed

        model = nn.parallel.DistributedDataParallel(distributed.sync(model))
    lo, hi = rank * batch_size // world, (rank + 1) * batch_size // world  # this rank's slice
    previous: dict[str, Tensor] = {}  # --analyze: the output layer's weight at the last epoch
    sched = lr_schedule(opt, cfg.epochs * steps_per_epoch, cfg.warmup)
    order = torch.Generator().manual_seed(seed)
    train_time = 0.0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        tic = time.perf_counter()
        perm = torch.randperm(len(ds.x_train), generator=order)
        loss_sum, correct, pending = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size:(step + 1) * batch_size][lo:hi].to(device)
            logits, target = model(ds.x_train[idx]), ds.y_train[idx]
            # Σ over the slice / global batch, × world: DDP's average is the global mean
            loss = F.cross_entropy(logits, target, reduction="sum") * (world / batch_size)
            hits = (logits.argmax(1) == target).sum()
            if world > 1:  # the same logged values (and divergence decision) on every rank
                totals = torch.stack([loss.detach() / world, hits.to(loss.dtype)])
                dist.all_reduce(totals)
                value, n_hits = totals[0].item(), int(totals[1].item())
            else:
                value, n_hits = loss.item(), int(hits)
            if not math.isfinite(value):
                record |= {"status": "diverged",
                           "error": f"loss became {value} at epoch {epoch}, step {step + 1}"}
                return
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if refresher is not None:
                refresher.step()
            loss_sum += value
            correct += n_hits
            record["steps"] += 1
            pending += 1
            if pending == 100:
                on_steps(pending)
                pending = 0
        on_steps(pending)
        train_time += time.perf_counter() - tic
        model.eval()
        test_loss, test_acc = evaluate(model, ds.x_test, ds.y_test)
        if not math.isfinite(test_loss):  # records stay strict JSON: no NaN in the history
            record |= {"status": "diverged", "error": f"test loss became {test_loss} at epoch "
                                                      f"{epoch}"}
            return
        record["history"].append({
            "epoch": epoch, "train_loss": loss_sum / steps_per_epoch,
            "train_acc": correct / (steps_per_epoch * batch_size),
            "test_loss": test_loss, "test_acc": test_acc,
            **({"analysis": _analysis(model, ds, opt.param_groups[0]["lr"], previous)}
               if cfg.analyze else {}),
        })
    record |= {"test_loss": test_loss, "test_acc": test_acc, "test_error": _percent(test_acc),
               "time_per_step_ms": 1e3 * train_time / max(record["steps"], 1)}
    if cfg.eval_batch_stats:  # a copy, so the model's running statistics stay untouched
        _, acc = evaluate(copy.deepcopy(model).train(), ds.x_test, ds.y_test,
                          batch_size=batch_size)
        record |= {"test_acc_batch_stats": acc, "test_error_batch_stats": _percent(acc)}
    if cfg.shift is not None:  # copies adapt; the model's statistics stay untouched
        from .shift import evaluate_shifts, parse_shifts

        record["shift"] = evaluate_shifts(model, ds.x_test, ds.y_test, parse_shifts(cfg.shift),
                                          seed=cfg.data_seed)


def _parallel_worker(rank: int, world: int, init: str, out: str, ds: Dataset,
                     cfg: CompareConfig, record: dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        _train(ds, cfg, record, lambda n: None, rank=rank, world=world)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(record, f)
        # The DDP model (its reducer and synced modules hold the group) must be gone before the
        # group is destroyed: freed later, under the GIL, gloo's teardown can deadlock.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train_parallel(ds: Dataset, cfg: CompareConfig, record: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`_train` in ``cfg.nproc`` processes (gloo, ``file://`` rendezvous in a
    temporary directory); returns rank 0's record."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/record.json"
        mp.start_processes(_parallel_worker, args=(cfg.nproc, f"file://{tmp}/rendezvous", out, ds,
                                                   cfg, dict(record)),
                           nprocs=cfg.nproc, join=True, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def _analysis(model: nn.Module, ds: Dataset, lr: float, previous: dict[str, Tensor],
              probe: int = 256) -> dict[str, Any]:
    """Conditioning of the output layer (``compare --analyze``): spectra summaries of its input
    second moment and output-gradient covariance on the first ``probe`` training examples, from
    a copy in training mode (the run's running statistics stay untouched), its weight norm ‖W‖,
    effective learning rate η/‖W‖² and the angle W turned through since the previous epoch
    (``previous`` keeps the last weight; the scale-invariance view of ch. 9)."""
    from ..analysis import layer_statistics
    from ..analysis.scale import angle

    copy_ = copy.deepcopy(model).train()
    last = _output_layer(copy_)
    stats = layer_statistics(copy_, ds.x_train[:probe], ds.y_train[:probe], layers=[last],
                             ks=(0.5,), keep_covariances=False)[last].scalars()
    weight = copy_.get_submodule(last).weight
    keep = ("x/lambda_max", "x/cond", "x/kappa_0.5", "delta/lambda_max", "delta/kappa_0.5")
    out = {k.replace("/", "_"): (v if math.isfinite(v) else None)  # strict JSON: no inf
           for k, v in stats.items() if k in keep}
    norm = float(weight.detach().norm())
    w = weight.detach().clone()
    turned = angle(previous["weight"], w) if "weight" in previous else None
    previous["weight"] = w
    return {"layer": last, **out, "weight_norm": norm, "effective_lr": lr / max(norm, 1e-12) ** 2,
            "angular_update": turned}




def _output_layer(model: nn.Module) -> str:
    """Name of the last Linear/Conv layer (the classifier), left out of weight/gradient methods."""
    names = [n for n, m in model.named_modules() if isinstance(m, nk_weight.LAYER_TYPES)]
    return names[-1] if names else ""


def _optimizer(model: nn.Module, cfg: CompareConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (or LARS / LAMB) for ``model``, with ``cfg.weight`` applied to its hidden layers and
    ``cfg.gradient``'s hook installed."""
    last = _output_layer(model)
    if cfg.weight is not None:
        name, kwargs = parse_spec(cfg.weight)
        nk_weight.apply_to_model(model, name, exclude=[last], **kwargs)
    params = list(model.parameters())
    if cfg.gradient == "lars":
        return nk_gradient.LARS(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.gradient == "lamb":
        return nk_gradient.LAMB(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer in ("adam", "adamw"):
        adam = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        # fused: one kernel for all parameters, as cheap per step as SGD on the small models
        opt = adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    if cfg.gradient == "gc":
        nk_gradient.centralize_gradients(opt)
    elif cfg.gradient == "block":
        nk_gradient.normalize_gradients(opt)
    elif cfg.gradient == "agc":
        nk_gradient.clip_gradients_adaptive(opt, exclude=model.get_submodule(last).parameters()
                                            if last else None)
    return opt


def lr_schedule(opt: torch.optim.Optimizer, total: int,
                warmup: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """The lr schedule of a run, stepped once per optimizer step: a linear warmup over the first
    ``w = round(warmup · total)`` steps, then a cosine decay to 0 at step ``total``.

    The lr of step ``t`` (0-based) is ``lr · (t + 1) / w`` for ``t < w``, then
    ``lr · ½ (1 + cos(π (t − w) / (total − w)))``; ``warmup=0`` is torch's
    ``CosineAnnealingLR(T_max=total)``.

    Example::

        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched, lrs = lr_schedule(opt, total=10, warmup=0.2), []
        >>> for _ in range(4):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3)); opt.step(); sched.step()
        >>> lrs
        [0.5, 1.0, 1.0, 0.962]
    """
    w = round(warmup * total)
    if w == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)

    def factor(t: int) -> float:
        if t < w:
            return (t + 1) / w
        return 0.5 * (1 + math.cos(math.pi * (t - w) / max(total - w, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _percent(accuracy: float) -> float:
    """Error rate in percent, rounded to hide float noise (8.999999999999996 -> 9.0)."""
    return round(100 * (1 - accuracy), 6)


def _one_line(err: BaseException) -> str:
    """First line of an exception's message (torch errors can span many lines)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
