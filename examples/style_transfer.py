"""Style transfer with AdaIN and WCT (book ch. 10.2) on scikit-learn's two bundled photographs.

A small convolutional encoder/decoder (3 → 16 → 32 channels at half resolution, and back) is
trained here for reconstruction only, on random crops of ``china.jpg`` and ``flower.jpg``
(downsampled to ``--size`` pixels high), then one image (content: the temple) is stylized with the
other (style: the flower) by replacing its encoder features' statistics:

* AdaIN (:func:`normkit.apply.style.adain`): per-channel mean and std of the style;
* WCT (:func:`normkit.apply.style.wct`): mean and full channel covariance of the style, with exact
  ZCA whitening and with IterNorm's Newton–Schulz whitening,

at ``α ∈ {0, 0.5, 1}`` (``α = 0`` is the plain reconstruction), decoded and written as a PNG grid
(rows: method; columns: content, style, the three α) to ``--out``. The stylization runs in float64
on the features so their statistics can be checked against the style's exactly; the example prints
the relative errors.

There are no pretrained VGG weights here (nothing is downloaded), and a decoder trained only to
invert one shallow encoder is no perceptual model: the result is a crude colour/texture-statistics
transfer (the flower's palette and contrast on the temple's layout), not the painterly output of the
papers. The point is the mechanics — which statistics each method matches — not the look.

Run::

    python examples/style_transfer.py                    # ~1–2 min on 2 CPU cores
    python examples/style_transfer.py --quick            # seconds (a few training steps)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from normkit.apply.style import adain, feature_moments, wct  # noqa: E402

ALPHAS = (0.0, 0.5, 1.0)
FIGSIZE, DPI = (10.0, 4.6), 100  # the PNG is 1000 × 460 pixels


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/style_transfer"),
                   help="directory for style_transfer.png")
    p.add_argument("--steps", type=int, default=1500, help="reconstruction training steps")
    p.add_argument("--size", type=int, default=96, help="image height in pixels (width × 1.5)")
    p.add_argument("--crop", type=int, default=48, help="training crop size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eps", type=float, default=1e-10,
                   help="ridge of the float64 stylization (content variance / covariance)")
    p.add_argument("--iterations", type=int, default=30, help="Newton–Schulz steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps, for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 15)
    return args


def load_images(height: int) -> tuple[Tensor, Tensor]:
    """``china.jpg`` and ``flower.jpg`` as float tensors ``(1, 3, height, 1.5·height)`` in [0, 1]."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images  # two (427, 640, 3) uint8 arrays, shipped with sklearn
    size = (height, round(1.5 * height))
    out = [F.interpolate(torch.from_numpy(im.copy()).permute(2, 0, 1)[None].float() / 255, size=size,
                         mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
           for im in imgs]
    return out[0], out[1]


class AutoEncoder(nn.Module):
    """Encoder ``3 → 16 → 32`` (stride 2; features linear, so no channel is dead) and a decoder
    back to RGB by nearest upsampling and two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 3, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def crops(images: Sequence[Tensor], n: int, size: int, gen: torch.Generator) -> Tensor:
    """``n`` random ``size × size`` crops (random image, position, horizontal flip)."""
    out = []
    for _ in range(n):
        im = images[int(torch.randint(len(images), (1,), generator=gen))]
        h, w = im.shape[-2:]
        i = int(torch.randint(h - size + 1, (1,), generator=gen))
        j = int(torch.randint(w - size + 1, (1,), generator=gen))
        patch = im[0, :, i:i + size, j:j + size]
        out.append(patch.flip(-1) if torch.rand((), generator=gen) < 0.5 else patch)
    return torch.stack(out)


def train(model: AutoEncoder, images: Sequence[Tensor], args: argparse.Namespace) -> list[float]:
    """Adam on the pixel MSE of reconstructions of random crops; returns the loss per step."""
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.steps, 1))
    losses = []
    for _ in range(args.steps):
        x = crops(images, args.batch_size, args.crop, gen)
        loss = F.mse_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def stylize(model: AutoEncoder, content: Tensor, style: Tensor,
            args: argparse.Namespace) -> tuple[dict[str, list[Tensor]], dict[str, float]]:
    """Decoded images per method and α, and the relative errors of the α = 1 features'
    statistics against the style's (float64)."""
    fc, fs = model.encoder(content).double(), model.encoder(style).double()
    methods = {
        "AdaIN": lambda a: adain(fc, fs, alpha=a, eps=args.eps),
        "WCT (ZCA)": lambda a: wct(fc, fs, alpha=a, eps=args.eps),
        f"WCT (Newton–\nSchulz, T = {args.iterations})": lambda a: wct(
            fc, fs, alpha=a, eps=args.eps, whitening="newton", iterations=args.iterations),
    }
    images: dict[str, list[Tensor]] = {}
    feats: dict[str, Tensor] = {}
    for name, fn in methods.items():
        images[name] = []
        for a in ALPHAS:
            f = fn(a)
            feats[name] = f  # the last one: α = 1
            images[name].append(model.decoder(f.float()).clamp(0, 1))
    mean_s, cov_s = feature_moments(fs)
    std_s = fs.flatten(2).std(-1, correction=0)
    a_feat, z_feat, n_feat = feats.values()
    errors = {
        "adain_mean": _rel(a_feat.flatten(2).mean(-1), mean_s),
        "adain_std": _rel(a_feat.flatten(2).std(-1, correction=0), std_s),
        "wct_zca_mean": _rel(feature_moments(z_feat)[0], mean_s),
        "wct_zca_cov": _rel(feature_moments(z_feat)[1], cov_s),
        "wct_newton_cov": _rel(feature_moments(n_feat)[1], cov_s),
    }
    cov_c = feature_moments(fc)[1][0]
    lam = torch.linalg.eigvalsh(cov_c)
    errors["content_lambda_min_over_trace"] = (lam[0] / lam.sum()).item()
    return images, errors


def _show(ax, img: Tensor, title: str = "", ylabel: str = "") -> None:  # type: ignore[no-untyped-def]
    ax.imshow(img[0].permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot(content: Tensor, style: Tensor, images: dict[str, list[Tensor]], path: Path) -> None:
    """Grid: one row per method; columns content, style, α = 0, 0.5, 1."""
    rows, cols = len(images), 2 + len(ALPHAS)
    fig, axes = plt.subplots(rows, cols, figsize=FIGSIZE, dpi=DPI, squeeze=False)
    heads = ["content", "style", *(f"α = {a:g}" for a in ALPHAS)]
    for r, (name, outs) in enumerate(images.items()):
        for k, img in enumerate([content, style, *outs]):
            _show(axes[r][k], img, heads[k] if r == 0 else "", name if k == 0 else "")
    fig.subplots_adjust(left=0.07, right=0.99, top=0.94, bottom=0.02, wspace=0.05, hspace=0.08)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays FIGSIZE × DPI
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:  # type: ignore[type-arg]
    args = parse(argv)
    torch.manual_seed(args.seed)
    content, style = load_images(args.size)
    model = AutoEncoder()
    tic = time.perf_counter()
    losses = train(model, [content, style], args)
    seconds = time.perf_counter() - tic
    model.eval()
    with torch.no_grad():
        recon = sum(F.mse_loss(model(x), x).item() for x in (content, style)) / 2
    images, errors = stylize(model, content, style, args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "style_transfer.png"
    plot(content, style, images, path)
    print(f"trained {args.steps} steps in {seconds:.1f} s "
          f"(torch threads: {torch.get_num_threads()}); "
          f"reconstruction MSE of the full images: {recon:.4f}")
    print("relative errors of the stylized (α = 1) feature statistics vs the style's:")
    for k, v in errors.items():
        print(f"  {k}: {v:.2e}")
    print(f"wrote {path}")
    return {"png": path, "train_seconds": seconds, "losses": losses, "reconstruction_mse": recon,
            "errors": errors, "size": (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))}


if __name__ == "__main__":
    main()
