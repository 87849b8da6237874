"""A figure of a few `val` pairs: MRI, the other modality, mean, max, laplacian and AdaFuse
(colour PET/SPECT fused through YCbCr exactly as `medfuse fuse` does). Writes docs/adafuse_val.png.

    python benchmarks/adafuse_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from medfuse_cli import read_image
from medfuse_cli.pipeline import FuseOptions, fuse_images

ROOT = Path(__file__).resolve().parents[1]
HARVARD = ROOT.parent / "shared" / "data" / "harvard"
PAIRS = [("mri-ct", "34010", "ct"), ("mri-pet", "25095", "pet"), ("mri-spect", "29010", "spect")]
METHODS = ("mean", "max", "laplacian", "adafuse")


def _show(ax, image, title: str) -> None:
    data = image.data[:, :, 0]
    data = np.swapaxes(data, 0, 1)
    ax.imshow(data.astype(np.uint8) if data.ndim == 3 else data, cmap=None if data.ndim == 3 else "gray",
              vmin=0, vmax=255)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def main() -> None:
    fig, axes = plt.subplots(len(PAIRS), 2 + len(METHODS), figsize=(2.2 * (2 + len(METHODS)), 2.3 * len(PAIRS)))
    for row, (folder, pid, other) in zip(axes, PAIRS):
        mri = read_image(HARVARD / folder / f"{pid}_mri.png")
        oth = read_image(HARVARD / folder / f"{pid}_{other}.png")
        _show(row[0], mri, f"{pid} MRI")
        _show(row[1], oth, other.upper())
        for ax, method in zip(row[2:], METHODS):
            fused, *_ = fuse_images(mri, oth, FuseOptions(method=method, metrics=False))
            _show(ax, fused, method)
    fig.tight_layout()
    out = ROOT / "docs" / "adafuse_val.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=80)
    print(out)


if __name__ == "__main__":
    main()
