"""DRAN ablation: the fusion rule (the shipped weights decoded after sfnn, l1 and mean merges) and
the loss terms (short, reproducible autoencoder runs, every variant with the same seed, steps and
data), scored on the `val` pairs of splits.csv with medfuse eval's metrics.

    python benchmarks/dran_ablation.py --steps 300
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from medfuse_cli.models.infer import load_model
from medfuse_cli.train import TrainConfig, load_split, train, validate

HARVARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "harvard"
TASKS = ("mri-ct", "mri-pet", "mri-spect")
LOSSES = {"MSE + Sobel + SSIM (shipped recipe)": "recon", "MSE + Sobel": "recon-grad", "MSE only": "recon-mse"}


def _row(name: str, v: dict) -> str:
    return f"| {name} | " + " | ".join(
        f"{v[t]['SSIM']:.3f} / {v[t]['SSIM_worst']:.3f} / {v[t]['Qabf']:.3f} / {v[t]['VIF']:.3f}" for t in TASKS) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of each loss variant (0: rules only)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    header = ("| variant | " + " | ".join(f"{t.split('-')[1].upper()} SSIM / worst / Qabf / VIF" for t in TASKS)
              + " |\n|---|" + "---|" * len(TASKS))
    val = load_split(HARVARD, "val", "all")
    shipped = load_model("dran")
    print("Fusion rule (shipped weights):\n" + header)
    for rule in ("sfnn", "l1", "mean"):
        model = copy.deepcopy(shipped)
        model.rule = rule
        print(_row(rule, validate(model, val)), flush=True)
    if not args.steps:
        return
    print(f"\nLoss terms ({args.steps} steps each, batch 8 pairs, crop 96, seed 0, sfnn rule):\n" + header)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, recipe) in enumerate(LOSSES.items()):
            card = train(TrainConfig(data=str(HARVARD), out=tmp, name=f"v{i}", model="dran", recipe=recipe,
                                     steps=args.steps, crop=96, baselines=False))
            print(_row(name, card["validation"]), flush=True)


if __name__ == "__main__":
    main()
