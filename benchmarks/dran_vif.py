"""What holds DRAN's VIF below the released weights' on MRI-CT? Fine-tunes of the shipped weights
(per-pixel l1 merge) that change one suspect at a time, scored on the `val` pairs of splits.csv
with medfuse eval's metrics (SSIM / worst / Qabf / VIF per pair).

- ``--decoder W``: a larger decoder. A residual branch (W channels, dilations 1, 2, 4, 8: a
  receptive field of 33 px) is added to the shipped decoder; its last layer starts at zero, so
  training starts exactly at the shipped model.
- ``--objective constrained``: the feasibility objective of ``benchmarks/feasibility.py`` instead
  of the ``balanced`` fusion loss (which also pulls F toward pixel max): Qabf + ``--vif`` x VIF,
  with each task's mean SSIM and worse-source SSIM held above the mean / max rules' (+ 0.01) as
  hinges; the autoencoder loss is kept in both.
- ``--crop 256 --batch 2``: whole slices, where the loss's VIF is the metric's own.

    python benchmarks/dran_vif.py --vif 6 --decoder 64 --steps 800
    python benchmarks/dran_vif.py --objective constrained --vif 3 --steps 600 [--crop 256 --batch 2 --steps 300]

Diagnostics only: nothing is written to weights/.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch import nn

from medfuse_cli.models.infer import load_model
from medfuse_cli.models.losses import (
    RECIPES,
    constrained_loss,
    reconstruction_loss,
    vif,
)
from medfuse_cli.train import (
    TrainConfig,
    _batch,
    descend,
    dran_loss,
    load_split,
    validate,
)

HARVARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "harvard"
TASKS = ("mri-ct", "mri-pet", "mri-spect")


class WiderDecoder(nn.Module):
    """The shipped decoder plus a zero-initialised residual branch of ``width`` channels."""

    def __init__(self, old: nn.Module, channels: int, width: int) -> None:
        super().__init__()
        self.old = old
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        for d in (2, 4, 8):
            layers += [nn.Conv2d(width, width, 3, padding=d, dilation=d), nn.LeakyReLU(0.2)]
        last = nn.Conv2d(width, 1, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.branch = nn.Sequential(*layers, last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.old(z) + self.branch(z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=("balanced", "constrained"), default="balanced")
    parser.add_argument("--vif", type=float, default=6.0, help="weight of the VIF term")
    parser.add_argument("--decoder", type=int, default=0, help="channels of an added decoder branch (0: none)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = copy.deepcopy(load_model("dran", "cpu", channels_last=False))
    if args.decoder:
        model.decoder = WiderDecoder(model.decoder, model.config["channels"], args.decoder)
    model.train()
    cfg = TrainConfig(data=str(HARVARD), model="dran", recipe="recon-fuse-vif", steps=args.steps, batch=args.batch,
                      crop=args.crop, lr=3e-4, loss_weights={"fuse_vif": args.vif})
    train_pairs, val = load_split(HARVARD, "train", "all"), load_split(HARVARD, "val", "all")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    floors = {**RECIPES["constrained"], "margin": 0.01, "worst_margin": 0.01}
    t0 = time.perf_counter()
    for step in range(args.steps):
        a, b, t = _batch(train_pairs, cfg, gen)
        if args.objective == "balanced":
            loss, _ = dran_loss(model, a, b, cfg.recipe, cfg.loss_weights)
        else:
            x = torch.cat([a, b])
            loss, _ = reconstruction_loss(x, model.reconstruct(x))
            f = model(a, b)
            loss = loss + constrained_loss(a, b, f, floors, t)[0] + args.vif * (1 - (vif(a, f) + vif(b, f)).mean() / 2)
        descend(model, opt, cfg, step, loss)
    minutes = (time.perf_counter() - t0) / 60
    scores = validate(model, val)
    print(f"{args.objective}, VIF x{args.vif:g}, decoder branch {args.decoder or 'none'}, crop {args.crop}, "
          f"batch {args.batch}, {args.steps} steps, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{minutes:.1f} min")
    print("| pair | SSIM | worst | Qabf | VIF |\n|---|--:|--:|--:|--:|")
    for task in TASKS:
        s = scores[task]
        print(f"| {task} | {s['SSIM']:.3f} | {s['SSIM_worst']:.3f} | {s['Qabf']:.3f} | {s['VIF']:.3f} |")


if __name__ == "__main__":
    main()
