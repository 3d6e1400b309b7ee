"""GANs on a 2-D mixture of Gaussians (book ch. 10.3): how normalization in the generator and the
discriminator decides mode coverage.

Data: the 8-mode ring (radius 2, std 0.02; ``--grid``: the 5 × 5 grid, spacing 2, std 0.05). Models:

* generator: MLP ``z (8) → 64 → 64 → 2`` with BN (``nk.create("bn")``) after each hidden Linear,
  or conditional BN (``nk.create("cbn", num_classes=modes)``) whose ``γ, β`` are picked by the
  mode label (class-conditional GAN; the discriminator then also sees the one-hot label);
* discriminator: MLP ``2 → 64 → 64 → 1`` with LeakyReLU(0.2) and no normalization, or every
  Linear reparametrized by :mod:`normkit.weight`: spectral norm (``sn``), orthogonalization by
  Newton's iteration (``oni``, 5 steps, rows not centred: see ``WEIGHT_OPTIONS``) or weight
  normalization (``wn``); the weight is normalized once per discriminator update on real and
  fake batches (``parametrize.cached``) and once in the generator update.

Non-saturating GAN loss, Adam (lr 1e-3 decayed linearly to 0, β = (0.5, 0.999)), batch 256, 2000
steps, seeds fixed (the data, initialization and noise of seed ``s`` are the same in every setting).

Metrics on ``--samples`` (2500) generator samples drawn in one batch with batch statistics in the
BN layers, as in training (:func:`normkit.apply.batch_statistics`; labels uniform): a sample is
**high quality** if it lies within 3 std of its nearest mode centre; a mode is **covered** if it
receives at least ``--min-share`` (1 %) of all samples as high-quality samples (25 of 2500: a
fifth of its fair share on 25 modes, a twelfth on 8). Printed as a markdown table
per setting and seed; the samples of the first seed are drawn in a PNG grid of scatter plots.

Run::

    python examples/gan_mixture.py                 # 8 settings × 2 seeds (~3.5 min on 2 cores)
    python examples/gan_mixture.py --quick         # seconds
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import normkit as nk  # noqa: E402

GENERATORS = ("bn", "cbn")
DISCRIMINATORS = ("none", "sn", "oni", "wn")
SETTINGS = [(g, d) for g in GENERATORS for d in DISCRIMINATORS]


# ------------------------------------------------------------------------------- data, metrics
def ring_centres(modes: int = 8, radius: float = 2.0) -> Tensor:
    """``modes`` centres evenly on a circle of ``radius`` ``(modes, 2)``."""
    angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    return (radius * torch.stack([angle.cos(), angle.sin()], 1)).float()


def grid_centres(side: int = 5, spacing: float = 2.0) -> Tensor:
    """A ``side × side`` grid of centres with ``spacing``, centred on 0 ``(side², 2)``."""
    ticks = (torch.arange(side, dtype=torch.float32) - (side - 1) / 2) * spacing
    return torch.cartesian_prod(ticks, ticks)


def mixture_of_gaussians(n: int, centres: Tensor, std: float, *,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``n`` samples of the equal-weight isotropic mixture ``(1/K) Σ_k N(c_k, std² I)`` and their
    mode labels: ``(n, 2)`` floats and ``(n,)`` ints."""
    labels = torch.randint(len(centres), (n,), generator=generator)
    noise = torch.randn(n, centres.shape[1], generator=generator)
    return centres[labels] + std * noise, labels


def mode_coverage(samples: Tensor, centres: Tensor, std: float, *,
                  min_share: float = 0.01) -> dict[str, float | int | list[int]]:
    """High-quality samples (within ``3·std`` of the nearest centre) and covered modes (at least
    ``min_share·n`` high-quality samples).

    Returns ``{"covered": int, "modes": K, "hq_share": float, "counts": [per mode]}``.
    """
    if samples.dim() != 2 or samples.shape[1] != centres.shape[1]:
        raise ValueError(f"samples must be (n, {centres.shape[1]}), got {tuple(samples.shape)}")
    dist = torch.cdist(samples.float(), centres.float())
    nearest, which = dist.min(1)
    good = nearest <= 3 * std
    counts = torch.bincount(which[good], minlength=len(centres))
    threshold = min_share * len(samples)
    return {"covered": int((counts >= max(threshold, 1)).sum()), "modes": len(centres),
            "hq_share": good.float().mean().item() if len(samples) else 0.0,
            "counts": counts.tolist()}


# ---------------------------------------------------------------------------------------- models
class Generator(nn.Module):
    """``z → [Linear → (C)BN → ReLU] × depth → Linear(2)``; with ``conditional`` the BN layers are
    class-conditional (``γ, β`` per mode label)."""

    def __init__(self, z_dim: int, hidden: int, num_classes: int, *, conditional: bool,
                 depth: int = 2) -> None:
        super().__init__()
        self.conditional = conditional
        sizes = [z_dim] + [hidden] * depth
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        kw = {"num_classes": num_classes} if conditional else {}
        self.norms = nn.ModuleList(nk.create("cbn" if conditional else "bn", hidden, **kw)
                                   for _ in range(depth))
        self.out = nn.Linear(hidden, 2)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        h = z
        for lin, norm in zip(self.linears, self.norms, strict=True):
            h = lin(h)
            h = norm(h, labels) if self.conditional else norm(h)
            h = F.relu(h)
        return self.out(h)


class Discriminator(nn.Module):
    """``x (⊕ one-hot label) → [Linear → LeakyReLU(0.2)] × depth → Linear(1)``."""

    def __init__(self, hidden: int, num_classes: int, *, conditional: bool, depth: int = 2) -> None:
        super().__init__()
        self.num_classes = num_classes if conditional else 0
        sizes = [2 + self.num_classes] + [hidden] * depth + [1]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.LeakyReLU(0.2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.num_classes:
            x = torch.cat([x, F.one_hot(labels, self.num_classes).to(x.dtype)], 1)
        return self.net(x).squeeze(1)


# ONI without centring: centring each unit's weights over a fan-in of 2 would make every row of
# the first layer orthogonal to (1, 1), blinding the discriminator to one input direction.
WEIGHT_OPTIONS: dict[str, dict[str, object]] = {"sn": {}, "oni": {"iterations": 5, "center": False},
                                                "wn": {}}


def build(setting: tuple[str, str], modes: int, args: argparse.Namespace) -> tuple[Generator, Discriminator]:
    """The generator and discriminator of ``setting = (generator, discriminator)``."""
    g_kind, d_kind = setting
    if g_kind not in GENERATORS or d_kind not in DISCRIMINATORS:
        raise ValueError(f"unknown setting {setting!r}; generators {GENERATORS}, "
                         f"discriminators {DISCRIMINATORS}")
    conditional = g_kind == "cbn"
    gen = Generator(args.z_dim, args.hidden, modes, conditional=conditional)
    disc = Discriminator(args.hidden, modes, conditional=conditional)
    if d_kind != "none":
        nk.weight.apply_to_model(disc, d_kind, **WEIGHT_OPTIONS[d_kind])
    return gen, disc


def _data(args: argparse.Namespace) -> tuple[Tensor, float]:
    return (grid_centres(), 0.05) if args.grid else (ring_centres(), 0.02)


def train(setting: tuple[str, str], seed: int, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    """Train one setting for ``args.steps`` steps; returns the models, samples and metrics."""
    centres, std = _data(args)
    modes = len(centres)
    torch.manual_seed(seed)
    gen, disc = build(setting, modes, args)
    data_rng = torch.Generator().manual_seed(10_000 + seed)
    noise_rng = torch.Generator().manual_seed(20_000 + seed)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.999))
    bce = F.binary_cross_entropy_with_logits
    b = args.batch_size
    ones, zeros = torch.ones(b), torch.zeros(b)
    tic = time.perf_counter()
    decay = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1 - k / max(args.steps, 1))
             for o in (opt_g, opt_d)] if args.decay else []
    for _ in range(args.steps):
        real, real_y = mixture_of_gaussians(b, centres, std, generator=data_rng)
        z = torch.randn(b, args.z_dim, generator=noise_rng)
        fake_y = torch.randint(modes, (b,), generator=noise_rng)
        fake = gen(z, fake_y)
        with parametrize.cached():  # one weight normalization (one SN power step) per D update
            d_loss = bce(disc(real, real_y), ones) + bce(disc(fake.detach(), fake_y), zeros)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = bce(disc(fake, fake_y), ones)  # non-saturating
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        for sched in decay:
            sched.step()
    seconds = time.perf_counter() - tic
    gen.eval()
    with torch.no_grad(), nk.apply.batch_statistics(gen):  # batch statistics, as in training
        eval_rng = torch.Generator().manual_seed(30_000 + seed)
        z = torch.randn(args.samples, args.z_dim, generator=eval_rng)
        labels = torch.randint(modes, (args.samples,), generator=eval_rng)
        samples = gen(z, labels)
    metrics = mode_coverage(samples, centres, std, min_share=args.min_share)
    return {"setting": setting, "seed": seed, "generator": gen, "discriminator": disc,
            "samples": samples, "seconds": seconds, "d_loss": d_loss.item(),
            "g_loss": g_loss.item(), **metrics}


# ---------------------------------------------------------------------------------------- report
def label(setting: tuple[str, str]) -> str:
    g, d = setting
    return f"G: {g.upper()}, D: {d.upper() if d != 'none' else 'no norm'}"


def table(runs: Sequence[dict]) -> str:  # type: ignore[type-arg]
    """Markdown table: one row per setting and seed, then the mean over seeds per setting."""
    lines = ["| setting | seed | modes covered | high-quality share | train s |",
             "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {label(r['setting'])} | {r['seed']} | {r['covered']}/{r['modes']} | "
                     f"{r['hq_share']:.3f} | {r['seconds']:.1f} |")
    seeds = sorted({r["seed"] for r in runs})
    if len(seeds) > 1:
        lines += ["", "| setting | seeds | mean modes covered | mean high-quality share |",
                  "|---|---|---|---|"]
        for s in dict.fromkeys(r["setting"] for r in runs):
            rs = [r for r in runs if r["setting"] == s]
            lines.append(f"| {label(s)} | {len(rs)} | "
                         f"{sum(r['covered'] for r in rs) / len(rs):.2f}/{rs[0]['modes']} | "
                         f"{sum(r['hq_share'] for r in rs) / len(rs):.3f} |")
    return "\n".join(lines)


def plot(runs: Sequence[dict], args: argparse.Namespace, path: Path) -> None:  # type: ignore[type-arg]
    """Scatter of the real data and of each setting's samples (first seed)."""
    centres, std = _data(args)
    first = min(r["seed"] for r in runs)
    shown = [r for r in runs if r["seed"] == first]
    real, _ = mixture_of_gaussians(args.samples, centres, std, generator=torch.Generator().manual_seed(0))
    panels = [("real data", real, None), *((label(r["setting"]), r["samples"], r) for r in shown)]
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    lim = float(centres.abs().max()) + 1.0
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (title, pts, r) in zip(axes.flat, panels, strict=False):
        ax.set_visible(True)
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, alpha=0.4)
        ax.scatter(centres[:, 0].numpy(), centres[:, 1].numpy(), s=12, c="red", marker="x")
        if r is not None:
            title += f"\n{r['covered']}/{r['modes']} modes, HQ {r['hq_share']:.2f} (seed {r['seed']})"
        ax.set_title(title, fontsize=8)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/gan_mixture"),
                   help="directory for gan_mixture.png")
    p.add_argument("--grid", action="store_true", help="25-mode grid instead of the 8-mode ring")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--settings", nargs="+", default=[f"{g}-{d}" for g, d in SETTINGS],
                   help="GEN-DISC pairs, GEN in bn/cbn, DISC in none/sn/oni/wn")
    p.add_argument("--z-dim", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--decay", action=argparse.BooleanOptionalAction, default=True,
                   help="decay both learning rates linearly to 0")
    p.add_argument("--samples", type=int, default=2500)
    p.add_argument("--min-share", type=float, default=0.01)
    p.add_argument("--quick", action="store_true", help="a few steps, one seed, for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.batch_size = min(args.steps, 10), args.seeds[:1], 64
        args.hidden, args.samples = min(args.hidden, 32), min(args.samples, 500)
    args.settings = [tuple(s.split("-", 1)) for s in args.settings]
    return args


def main(argv: Sequence[str] | None = None) -> dict:  # type: ignore[type-arg]
    args = parse(argv)
    tic = time.perf_counter()
    runs = [train(s, seed, args) for s in args.settings for seed in args.seeds]
    total = time.perf_counter() - tic
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gan_mixture.png"
    plot(runs, args, path)
    centres, std = _data(args)
    print(f"{len(centres)} modes (std {std}), {args.steps} steps, batch {args.batch_size}, "
          f"{args.samples} samples; mode covered: ≥ {args.min_share:.0%} of samples within 3 std")
    text = table(runs)
    print(text)
    print(f"total {total:.1f} s (torch threads: {torch.get_num_threads()}); wrote {path}")
    return {"runs": runs, "table": text, "png": path, "seconds": total}


if __name__ == "__main__":
    main()
