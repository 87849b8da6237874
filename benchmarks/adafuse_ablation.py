"""AdaFuse ablation from short, reproducible runs: what the frequency branch, the attention
exchange and the loss each buy. Every variant trains with the same seed, steps and data (the
`train` split, all three tasks) and is scored on the `val` pairs with medfuse eval's metrics.

    python benchmarks/adafuse_ablation.py --steps 400
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from medfuse_cli.train import TrainConfig, train

HARVARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "harvard"
VARIANTS = {
    "full (medfuse loss)": {"recipe": "medfuse"},
    "no frequency branch": {"frequency": False, "recipe": "medfuse"},
    "no attention exchange": {"exchange": False, "recipe": "medfuse"},
    "asfe loss (authors' successor)": {"recipe": "asfe"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, change in VARIANTS.items():
            t0 = time.perf_counter()
            cfg = TrainConfig(data=str(HARVARD), out=tmp, name=f"v{len(rows)}", steps=args.steps, baselines=False,
                              **change)
            card = train(cfg)
            rows.append((name, card, time.perf_counter() - t0))
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n{args.steps} steps each, batch 8, seed 0; val pairs; SSIM / worst-source SSIM / Qabf / VIF\n")
    tasks = ("mri-ct", "mri-pet", "mri-spect")
    print("| variant | " + " | ".join(f"{t.split('-')[1].upper()} SSIM / worst / Qabf / VIF" for t in tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for name, card, _ in rows:
        v = card["validation"]
        print(f"| {name} | " + " | ".join(
            f"{v[t]['SSIM']:.3f} / {v[t]['SSIM_worst']:.3f} / {v[t]['Qabf']:.3f} / {v[t]['VIF']:.3f}" for t in tasks) + " |")


if __name__ == "__main__":
    main()
