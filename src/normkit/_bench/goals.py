"""The speed goals of ``normkit bench --goals`` (normkit issue 20) as data, and their verdicts.

Every goal is one row of :data:`GOALS`: which methods it applies to (a registry family, one method,
or ``"*"`` for all), the measured figure it judges, its limit and the issue's wording. A method's
goal for a figure is the row naming the method, else the row naming its family, else the ``"*"``
row (:func:`goals_for`). Where a figure does not apply (no timm peer, no per-channel affine eval,
not a local method) the run has no value for it and the goal is reported ``n/a``.

Figures (each a ratio of medians from the same round-robin loop, forward + backward in training
unless said otherwise):

* ``eager`` — ``normkit`` over torch ``BatchNorm2d`` at the same shape;
* ``eager/LRN`` — over torch ``LocalResponseNorm`` at the same window (local methods);
* ``compiled`` — ``torch.compile(fullgraph=True)`` of the method over the compiled torch BN;
* ``peer`` — over another implementation of the same layer (:data:`PEERS`): timm's, or the
  paper's reference written in plain torch where timm has none;
* ``eval`` — evaluation forward over torch BN's; judged where the method's eval is an affine map
  per channel (:meth:`normkit.Normalization.folded` gives ``(C,)`` vectors);
* ``eval/mm`` — whitening eval forward over one block-diagonal matmul (``folded()`` gives blocks);
* ``saved`` — bytes autograd saves for backward beyond the input and parameters, over the input's;
  statistics aside (saved storages of at most ``N·C`` values, one per sample and channel: they are
  ``1/(H·W)`` of the input each), so the figure counts activation-sized tensors.

Example:
    >>> goals_for("pca_bw")["eager"].limit, goals_for("bn")["eager"].limit
    (2.5, 2.0)
    >>> verdict(1.9, goals_for("dbn")["eager"]), verdict(1.004, goals_for("dbn")["saved"])
    ('missed', 'met')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DECIMALS", "EXEMPT", "FIGURES", "GOALS", "PEERS", "Goal", "Peer", "goals_for",
           "verdict"]

DECIMALS = 2  # figures are printed, and judged, to this many decimals
FIGURES = ("eager", "eager/LRN", "compiled", "peer", "eval", "eval/mm", "saved")


@dataclass(frozen=True)
class Goal:
    """One goal: ``figure <= limit`` for the methods ``applies_to`` selects.

    ``applies_to``: ``"family:<name>"`` (a registry family), a method's registry name, or ``"*"``.
    """

    applies_to: str
    figure: str
    limit: float
    wording: str


_ISSUE_EAGER = "eager fwd+bwd <= {}x torch BN"
_UNNAMED = ("eager fwd+bwd <= 2x torch BN (family not named by issue 20: the library's "
            "non-native target)")

GOALS: tuple[Goal, ...] = (
    Goal("family:standardization", "eager", 2.0, _ISSUE_EAGER.format(2)),
    Goal("family:scaling", "eager", 2.0, _ISSUE_EAGER.format(2)),
    Goal("family:combination", "eager", 2.0, _ISSUE_EAGER.format(2)),
    Goal("family:robust", "eager", 2.0, _ISSUE_EAGER.format(2)),
    Goal("family:whitening", "eager", 1.8,
         "batch whitening (dbn, cd_bw, iternorm) eager fwd+bwd <= 1.8x torch BN"),
    Goal("pca_bw", "eager", 2.5, _ISSUE_EAGER.format(2.5)),
    Goal("group_whitening", "eager", 4.0, _ISSUE_EAGER.format(4)),
    Goal("instance_whitening", "eager", 4.0, _ISSUE_EAGER.format(4)),
    Goal("switchable_whitening", "eager", 4.0, _ISSUE_EAGER.format(4)),
    Goal("mixture_norm", "eager", 4.0, _ISSUE_EAGER.format(4)),
    Goal("family:multimode", "eager", 2.0, _UNNAMED),
    Goal("family:conditional", "eager", 2.0, _UNNAMED),
    Goal("family:local", "eager/LRN", 2.0,
         "local methods eager fwd+bwd <= 2x torch LocalResponseNorm at the same window"),
    Goal("*", "compiled", 1.2, "torch.compile(fullgraph=True) fwd+bwd <= 1.2x compiled torch BN"),
    Goal("*", "peer", 1.0, "no slower than the peer implementation (timm's layer, or the paper's "
         "reference in plain torch) (fwd+bwd)"),
    Goal("*", "eval", 1.1, "eval forward <= 1.1x torch BN eval (per-channel affine eval)"),
    Goal("*", "eval/mm", 1.2, "whitening eval forward <= 1.2x one block-diagonal matmul"),
    Goal("*", "saved", 1.0, "saved-for-backward memory beyond the input <= 1x the input "
         "(statistics of <= N*C values aside)"),
)


@dataclass(frozen=True)
class Peer:
    """Another implementation of a method: ``timm.layers.<cls>(C, **timm_kwargs)`` (``source=
    "timm"``) or, with ``source="torch"``, the plain-torch reference ``cls`` of
    :mod:`normkit._bench.reference` built from normkit's layer (same weights); either computes
    what ``normkit.create(method, C, **kwargs)`` computes."""

    cls: str
    kwargs: dict[str, Any]
    timm_kwargs: dict[str, Any]
    source: str = "timm"


# normkit's defaults where they match timm's (eps aside, which costs nothing); the kwargs make the
# computations equal where the defaults differ.
PEERS: dict[str, Peer] = {
    "evonorm_b0": Peer("EvoNorm2dB0", {}, {}),
    "evonorm_s0": Peer("EvoNorm2dS0", {"num_groups": 32}, {"groups": 32}),
    "frn": Peer("FilterResponseNormTlu2d", {}, {}),  # FRN + TLU; eps 1e-6 in both
    "ln": Peer("GroupNorm1", {}, {}),  # LN over C·H·W, per-channel affine
    "pn": Peer("LayerNorm2d", {"affine": True}, {}),  # LN over C per position
    "rms_norm": Peer("RmsNorm2d", {"over": "channels"}, {}),  # RMS over C per position
    # the paper's code (NVlabs/SPADE): param-free BN, the same conv net for γ(m), β(m)
    "spade": Peer("SPADEReference", {}, {}, source="torch"),
}

# Goals that a method's step cannot be judged by, with why; such a goal is listed "exempt" (not
# judged) and its figure still printed. SPADE's step is mostly the conv net that predicts γ(m),
# β(m) from the map (any implementation of SPADE runs it, and saves its activations): against a
# lone BN it measures the net, not the normalization; its peer, the paper's reference on the same
# net, is the judged comparison.
_SPADE = ("SPADE's conv net for γ(m), β(m) is most of the step; judged against the paper's "
          "reference implementation on the same net (peer) instead")
EXEMPT: dict[tuple[str, str], str] = {
    ("spade", "eager"): _SPADE,
    ("spade", "compiled"): _SPADE,
    ("spade", "saved"): _SPADE,
}


def _family(method: str) -> str:
    import normkit as nk

    return nk.info(method).family


def goals_for(method: str) -> dict[str, Goal]:
    """The goal of each figure for ``method`` (a registry name): method row, family row, ``*``."""
    family = _family(method)
    out: dict[str, Goal] = {}
    for rank in ("*", f"family:{family}", method):  # later ranks override earlier ones
        for g in GOALS:
            if g.applies_to == rank:
                out[g.figure] = g
    return out


def verdict(value: float | None, goal: Goal | None, error: str | None = None) -> str:
    """``met``/``missed`` for a measured ``value``, judged as printed (:data:`DECIMALS` places: the
    verdict never contradicts the table); ``missed`` when the measurement failed with ``error`` (a
    compile error misses the compiled goal); ``n/a`` without a goal or a value."""
    if goal is None:
        return "n/a"
    if error is not None:
        return "missed"
    if value is None or value != value:
        return "n/a"
    return "met" if round(value, DECIMALS) <= goal.limit else "missed"
