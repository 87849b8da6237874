"""A figure of a few `val` pairs: MRI, the other modality and the chosen methods (colour PET/SPECT
fused through YCbCr exactly as `medfuse fuse` does).

    python benchmarks/val_figure.py --methods mean,max,gff,adafuse --out docs/adafuse_val.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from medfuse_cli import read_image
from medfuse_cli.fusion import NETWORKS, model_name
from medfuse_cli.models.weights import card_path
from medfuse_cli.pipeline import FuseOptions, fuse_images

ROOT = Path(__file__).resolve().parents[1]
HARVARD = ROOT.parent / "shared" / "data" / "harvard"
PAIRS = [("mri-ct", "34010", "ct"), ("mri-pet", "25095", "pet"), ("mri-spect", "29010", "spect")]


def _show(ax, image, title: str) -> None:
    data = image.data[:, :, 0]
    data = np.swapaxes(data, 0, 1)
    ax.imshow(data.astype(np.uint8) if data.ndim == 3 else data, cmap=None if data.ndim == 3 else "gray",
              vmin=0, vmax=255)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="mean,max,gff,adafuse")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "adafuse_val.png")
    args = parser.parse_args()
    methods = args.methods.split(",")
    fig, axes = plt.subplots(len(PAIRS), 2 + len(methods), figsize=(2.2 * (2 + len(methods)), 2.3 * len(PAIRS)))
    for row, (folder, pid, other) in zip(axes, PAIRS):
        mri = read_image(HARVARD / folder / f"{pid}_mri.png")
        oth = read_image(HARVARD / folder / f"{pid}_{other}.png")
        _show(row[0], mri, f"{pid} MRI")
        _show(row[1], oth, other.upper())
        for ax, method in zip(row[2:], methods):
            fused, *_ = fuse_images(mri, oth, FuseOptions(method=method, metrics=False))
            _show(ax, fused, method)
    fig.tight_layout()
    out = args.out
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=80)
    print(out)
    # the model cards point at the figure of their val pairs
    rel = str(out.resolve().relative_to(ROOT)) if out.resolve().is_relative_to(ROOT) else str(out)
    for name in {model_name(m, t) for m in methods if m in NETWORKS for t, *_ in PAIRS}:
        card_file = card_path(name)
        card = json.loads(card_file.read_text())
        card["figure"] = {"file": rel, "shows": ["MRI", "other", *methods], "pairs": [p[1] for p in PAIRS]}
        card_file.write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
