"""Every method on the held-out volume pairs, through the real fuse path, scored as ``medfuse eval``.

The held-out pairs (never trained on; ``medfuse_cli.volumes.HELD_OUT``): the IBSI STS002 patient's
MR T1 with its FDG-PET and with its CT, and the SPM OldNorm_T2 template with the attenuation
template (CT-like). Their volumes are world-aligned already, so they are fused with
``--transform none`` (resampled onto the MRI by their affines). 3D metrics: SSIM with a 3D window
to each source, Qabf / VIF pooled over axial slices. Prints a markdown table and, with
``--figure``, draws the three orthogonal middle slices of one pair for a few methods.

    python benchmarks/volumes_heldout.py --figure docs/dcfb3d_heldout.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from medfuse_cli import read_image
from medfuse_cli.fusion import CLASSIC_RULES
from medfuse_cli.models.weights import card_path
from medfuse_cli.pipeline import FuseOptions, fuse_images
from medfuse_cli.volumes import pairs

ROOT = Path(__file__).resolve().parents[1]
VOLUMES = ROOT.parent / "shared" / "data" / "volumes"
MODALITY = {"mri-pet": "PT", "mri-ct": "CT"}
COLUMNS = ("SSIM", "SSIM_A", "SSIM_B", "SSIM_worst", "Qabf", "VIF", "MI")


def run(methods: list[str], device: str = "cpu") -> tuple[dict, dict]:
    """Metrics per pair and method, and the fused arrays of the first pair (for the figure)."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    arrays: dict[str, np.ndarray] = {}
    for i, p in enumerate(pairs(VOLUMES, "held-out")):
        fixed, moving = read_image(p.fixed), read_image(p.moving)
        results[p.id] = {}
        for m in methods:
            opts = FuseOptions(method=m, transform="none", moving_modality=MODALITY[p.task], device=device)
            fused, moved, _, details = fuse_images(fixed, moving, opts)
            results[p.id][m] = {k: details["metrics"]["values"][k] for k in COLUMNS}
            results[p.id][m]["seconds"] = details["timings"]["fuse_s"]
            if i == 0:
                arrays.setdefault("MRI", fixed.data)
                arrays.setdefault(p.task.split("-")[1].upper(), moved.data)
                arrays[m] = fused.data
            print(f"{p.id:32s} {m:10s} " + " ".join(f"{k} {results[p.id][m][k]:.3f}" for k in COLUMNS), flush=True)
    return results, arrays


def table(results: dict) -> str:
    lines = ["| pair | method | SSIM | SSIM(MRI,F) | SSIM(other,F) | worst | Qabf | VIF | MI |",
             "|---|---|---|---|---|---|---|---|---|"]
    for pid, rows in results.items():
        best = {k: max(r[k] for r in rows.values()) for k in COLUMNS}
        for m, r in rows.items():
            cells = [f"**{r[k]:.3f}**" if r[k] == best[k] else f"{r[k]:.3f}" for k in COLUMNS]
            lines.append(f"| {pid} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(arrays: dict[str, np.ndarray], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arrays)
    fig, axes = plt.subplots(3, len(names), figsize=(2.2 * len(names), 6.6))
    for j, name in enumerate(names):
        v = arrays[name].astype(np.float32)
        lo, hi = np.percentile(v, (0.5, 99.5))
        mid = [s // 2 for s in v.shape[:3]]
        views = (v[:, :, mid[2]], v[:, mid[1], :], v[mid[0], :, :])  # axial, coronal, sagittal
        for i, sl in enumerate(views):
            axes[i, j].imshow(np.rot90(sl), cmap="gray", vmin=lo, vmax=hi, aspect="auto")
            axes[i, j].axis("off")
        axes[0, j].set_title(name, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print("wrote", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    networks = [n for n in ("adafuse", "dcfb3d") if card_path(n).is_file()]
    parser.add_argument("--methods", default=",".join([*CLASSIC_RULES, *networks]))
    parser.add_argument("--figure", type=Path, help="PNG of the first pair's orthogonal middle slices")
    parser.add_argument("--figure-methods", default="max,gff,adafuse,dcfb3d")
    parser.add_argument("--json", type=Path, help="write the metrics here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results, arrays = run(args.methods.split(","))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.figure:
        keep = list(arrays)[:2] + [m for m in args.figure_methods.split(",") if m in arrays]  # sources, methods
        figure({k: arrays[k] for k in keep}, args.figure)


if __name__ == "__main__":
    main()
