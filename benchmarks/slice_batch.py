"""How many slices per forward pay on the CPU? ms per slice for batches of 1-16 slices, slice sides
96-512, in one run; the batch ``medfuse fuse`` now picks (``models.infer.slice_batch``) is starred,
beside the fixed batch of 8 it used before.

Slices are the real 256x256 Harvard MRI-PET pair, cropped (smaller sides) or tiled (larger).

    python benchmarks/slice_batch.py [--threads 2] [--networks adafuse,dran]
"""

from __future__ import annotations

import numpy as np
import torch
from common import harvard_pair, network_timing_args, timed

from medfuse_cli.models.infer import fuse_stack, load_model, slice_batch

SIDES = (96, 128, 192, 256, 384, 512)
BATCHES = (1, 2, 4, 8, 16)
SLICES = 16


def main() -> None:
    args = network_timing_args(__doc__.splitlines()[0], "adafuse,dran", 2)
    a, b = harvard_pair()
    print(f"torch {torch.__version__}, {args.threads} threads, {SLICES} slices per run, ms per slice\n")
    print("| network | side | " + " | ".join(f"batch {n}" for n in BATCHES) + " | picked: batch, ms | fixed 8 / picked |")
    print("|---|--:|" + "--:|" * (len(BATCHES) + 2))
    for name in args.networks.split(","):
        model = load_model(name, "cpu")
        budget = type(model).cpu_pixels_per_forward
        for side in SIDES:
            sa, sb = (np.tile(x, (2, 2))[:side, :side] for x in (a, b))
            stack_a, stack_b = np.repeat(sa[None], SLICES, 0), np.repeat(sb[None], SLICES, 0)
            picked = slice_batch(model, side, side, 8, torch.device("cpu"))
            ms = {}
            for n in sorted({*BATCHES, picked}):
                type(model).cpu_pixels_per_forward = 0  # exactly n slices per forward
                try:
                    ms[n] = timed(lambda n=n, m=model, xa=stack_a, xb=stack_b: fuse_stack(m, xa, xb, "mri-pet", batch=n),
                                  args.repeat) / SLICES * 1000
                finally:
                    type(model).cpu_pixels_per_forward = budget
            cells = [f"**{ms[n]:.1f}**" if n == picked else f"{ms[n]:.1f}" for n in BATCHES]
            print(f"| {name} | {side} | " + " | ".join(cells) + f" | {picked}, {ms[picked]:.1f} | {ms[8] / ms[picked]:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
