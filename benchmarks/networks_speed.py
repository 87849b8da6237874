"""Speed of the shipped 2D networks on CPU beside the laplacian rule, measured in one run.

Milliseconds per 256x256 pair (fusion step only, batch 1, first call excluded) with 1 and 2
torch threads, and slices per second fusing the SPM 2 mm volume pair slice by slice.

    python benchmarks/networks_speed.py
"""

from __future__ import annotations

import torch
from common import harvard_pair, spm_volumes, timed

from medfuse_cli.fusion import NETWORKS, VOLUME_NETWORKS, fuse_classic, model_name
from medfuse_cli.models.infer import fuse_stack, load_model
from medfuse_cli.models.weights import card_path


def main() -> None:
    names = {n: model_name(n, "mri-pet") for n in NETWORKS if n not in VOLUME_NETWORKS}  # 2D networks
    models = {n: load_model(name) for n, name in names.items() if card_path(name).is_file()}
    print("networks:", ", ".join(f"{n} ({names[n]})" for n in models) or "none installed")
    a, b = harvard_pair()
    print("256x256 pair, fusion step only (ms per pair; ratio to laplacian):")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        lap = timed(lambda: fuse_classic("laplacian", a, b), 50)
        line = f"  {threads} thread(s): laplacian {lap * 1000:6.2f} ms"
        for n, model in models.items():
            net = timed(lambda m=model: fuse_stack(m, a[None], b[None], "mri-pet"), 10)
            line += f"   {n} {net * 1000:7.1f} ms ({net / lap:.0f}x)"
        print(line)
    torch.set_num_threads(2)
    va, vb = spm_volumes()
    n = va.shape[0]
    lap = timed(lambda: fuse_classic("laplacian", va, vb), 3)
    line = f"SPM volume {va.shape[::-1]}, {n} axial slices, 2 threads: laplacian 3D {lap:.2f} s"
    for name, model in models.items():
        net = timed(lambda m=model: fuse_stack(m, va, vb, "mri-pet", batch=8), 2)
        line += f"   {name} {n / net:.1f} slices/s ({net:.2f} s)"
    print(line)


if __name__ == "__main__":
    main()
