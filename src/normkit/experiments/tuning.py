"""Learning-rate tuning for ``normkit compare``: a validation split and the choice of the lr.

Methods differ most in which learning rates they allow (the book's ch. 9), so a fair comparison
tunes the lr of every method. A tuned sweep runs in two phases:

1. **validation**: every (method, batch size, lr of ``cfg.lrs``, tuning seed — the first
   ``cfg.tune_seeds`` seeds, :meth:`~normkit.experiments.config.CompareConfig.tuning_seeds`)
   trains on the training set minus a validation split (``val_fraction`` of it, drawn with
   ``data_seed``) and is evaluated on that split only; the test set is not read;
2. **test**: for each (method, batch size) the lr of lowest mean validation error over those seeds
   (a run that diverged or failed counts as 100 %) is chosen, and every seed is trained at it on
   the whole training set and evaluated on the test set: the headline.

Example::

    >>> from normkit.experiments.data import load_dataset
    >>> from normkit.experiments.tuning import validation_split
    >>> ds = load_dataset("gaussian", subset=100)
    >>> fit = validation_split(ds, 0.2, seed=0)
    >>> len(fit.x_train), len(fit.x_test)
    (80, 20)
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import torch

from ..errors import ConfigError
from .data import Dataset

__all__ = ["DEFAULT_LRS", "Phase", "Run", "run_key", "record_key", "validation_split",
           "to_validation", "select_lrs"]

DEFAULT_LRS = (0.01, 0.03)
"""The default lr grid at the base batch size (32), for the default Adam on the default 4-layer
1-D CNN with a 10 % warmup: over 0.03, 0.1 every method chose 0.03 at every batch size (0.1 made
`none` diverge to 35–46 % and LN to 24 % at batch size 16), so the grid moved down a step; two
values keep the sweep within 5 minutes on 2 cores."""

Phase = Literal["val", "test"]


class Run(NamedTuple):
    """One run of a sweep. ``lr`` is the lr at the base batch size (``None``: the config's single
    ``lr``, untuned); ``phase`` ``"val"`` (validation split) or ``"test"`` (the headline)."""

    method: str
    batch_size: int
    seed: int
    lr: float | None = None
    phase: Phase = "test"


def run_key(method: str, batch_size: int, seed: int, config_hash: str, *,
            lr: float | None = None, phase: str = "test") -> str:
    """Identity of one run: ``"<hash>/<method>/bs=<batch_size>/seed=<seed>"`` for an untuned run,
    ``"<hash>/<method>/bs=<b>/lr=<lr>/seed=<s>/<phase>"`` for a run of a tuned sweep."""
    if lr is None and phase == "test":
        return f"{config_hash}/{method}/bs={batch_size}/seed={seed}"
    return f"{config_hash}/{method}/bs={batch_size}/lr={lr!r}/seed={seed}/{phase}"


def record_key(record: dict[str, Any]) -> str:
    """:func:`run_key` of a finished run's record."""
    return run_key(record["method"], record["batch_size"], record["seed"], record["config_hash"],
                   lr=record.get("base_lr"), phase=record.get("phase", "test"))


def validation_split(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """The training set split in two: ``x_train`` keeps ``1 - fraction`` of it, ``x_test`` holds
    the other ``fraction`` (at least one example each), drawn by a permutation seeded with
    ``seed``; the original test set is not part of the result.

    Raises:
        ConfigError: when ``fraction`` is not in (0, 1) or leaves a side empty.
    """
    n = len(ds.x_train)
    k = round(fraction * n)
    if not 0 < fraction < 1 or not 0 < k < n:
        raise ConfigError(f"the validation fraction {fraction} of {n} training examples leaves "
                          f"{k} for validation and {n - k} for training; choose --val-fraction in "
                          f"(0, 1) so both get at least one")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, fit = perm[:k].sort().values, perm[k:].sort().values
    return Dataset(name=ds.name, x_train=ds.x_train[fit], y_train=ds.y_train[fit],
                   x_test=ds.x_train[val], y_test=ds.y_train[val], num_classes=ds.num_classes,
                   source=f"{ds.source}, validation split {k} of {n} (seed {seed})")


def to_validation(record: dict[str, Any]) -> dict[str, Any]:
    """Rename a run's ``test_*`` results to ``val_*`` (the run was evaluated on the validation
    split); ``test_*`` become ``None``."""
    for key in ("loss", "acc", "error"):
        record[f"val_{key}"] = record.get(f"test_{key}")
        record[f"test_{key}"] = None
    for epoch in record.get("history", []):
        for key in ("loss", "acc"):
            if f"test_{key}" in epoch:
                epoch[f"val_{key}"] = epoch.pop(f"test_{key}")
    return record


def select_lrs(records: Iterable[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """For each (method, batch size), the lr of lowest mean validation error over seeds.

    Only validation-phase records are read (their ``val_error``; a run not ``ok`` counts as
    100 %), so the test set cannot influence the choice. Ties go to the smaller lr.

    Returns:
        ``{(method, batch_size): lr}`` with the lr at the base batch size.
    """
    errors: dict[tuple[str, int], dict[float, list[float]]] = {}
    for r in records:
        if r.get("phase") != "val":
            continue
        err = r["val_error"] if r.get("status") == "ok" and r.get("val_error") is not None \
            else 100.0
        errors.setdefault((r["method"], r["batch_size"]), {}).setdefault(r["base_lr"],
                                                                         []).append(err)
    return {key: min(by_lr, key=lambda lr: (statistics.fmean(by_lr[lr]), lr))
            for key, by_lr in errors.items()}
