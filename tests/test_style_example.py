"""``examples/style_transfer.py --quick``: trains a few steps, writes a valid PNG grid of the
expected size, and the stylized features carry the style's statistics (float64)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402

from examples_util import load_example  # noqa: E402


def test_quick_run_writes_grid_and_matches_statistics(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    example = load_example("style_transfer")
    out = example.main(["--quick", "--out", str(tmp_path / "st")])
    png = out["png"]
    assert png == tmp_path / "st" / "style_transfer.png" and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)
    assert img.shape[:2] == out["size"] == (460, 1000) and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.05  # not a blank canvas
    losses = out["losses"]
    assert len(losses) == 15 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0]
    errors = out["errors"]
    # float64 stylization with eps = 1e-10: the only error left is ε/λ_min(Σ_c) (≈ 1e-8 here)
    for key in ("adain_mean", "adain_std", "wct_zca_mean", "wct_zca_cov", "wct_newton_cov"):
        assert errors[key] < 1e-6, (key, errors[key])
    text = capsys.readouterr().out
    assert "trained 15 steps" in text and "wrote" in text
