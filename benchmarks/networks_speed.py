"""Speed of the shipped 2D networks on CPU beside the laplacian rule, measured in one run.

Milliseconds per 256x256 pair (fusion step only, batch 1, first call excluded) with 1 and 2
torch threads, and slices per second fusing the SPM 2 mm volume pair slice by slice.

    python benchmarks/networks_speed.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from medfuse_cli import read_image
from medfuse_cli.fusion import NETWORKS, VOLUME_NETWORKS, fuse_classic, model_name
from medfuse_cli.intensity import window_for
from medfuse_cli.models.infer import fuse_stack, load_model
from medfuse_cli.models.weights import card_path

ROOT = Path(__file__).resolve().parents[1]
HARVARD = ROOT.parent / "shared" / "data" / "harvard" / "mri-pet"


def _timed(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    names = {n: model_name(n, "mri-pet") for n in NETWORKS if n not in VOLUME_NETWORKS}  # 2D networks
    models = {n: load_model(name) for n, name in names.items() if card_path(name).is_file()}
    print("networks:", ", ".join(f"{n} ({names[n]})" for n in models) or "none installed")
    if HARVARD.is_dir():
        a = read_image(HARVARD / "25015_mri.png").data[:, :, 0].T / 255.0
        b = read_image(HARVARD / "25015_pet.png").data[:, :, 0, 0].T / 255.0
    else:
        a, b = np.random.default_rng(0).random((2, 256, 256))
    a, b = a.astype(np.float32), b.astype(np.float32)
    print("256x256 pair, fusion step only (ms per pair; ratio to laplacian):")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        lap = _timed(lambda: fuse_classic("laplacian", a, b), 50)
        line = f"  {threads} thread(s): laplacian {lap * 1000:6.2f} ms"
        for n, model in models.items():
            net = _timed(lambda m=model: fuse_stack(m, a[None], b[None], "mri-pet"), 10)
            line += f"   {n} {net * 1000:7.1f} ms ({net / lap:.0f}x)"
        print(line)
    torch.set_num_threads(2)
    t1 = read_image(ROOT / "examples" / "spm12" / "OldNorm_T1.nii.gz")
    pet = read_image(ROOT / "examples" / "spm12" / "OldNorm_PET.nii.gz")
    va = window_for(t1).apply(t1.data).transpose(2, 1, 0)
    vb = window_for(pet).apply(pet.data).transpose(2, 1, 0)
    n = va.shape[0]
    lap = _timed(lambda: fuse_classic("laplacian", va, vb), 3)
    line = f"SPM volume {t1.shape}, {n} axial slices, 2 threads: laplacian 3D {lap:.2f} s"
    for name, model in models.items():
        net = _timed(lambda m=model: fuse_stack(m, va, vb, "mri-pet", batch=8), 2)
        line += f"   {name} {n / net:.1f} slices/s ({net:.2f} s)"
    print(line)


if __name__ == "__main__":
    main()
