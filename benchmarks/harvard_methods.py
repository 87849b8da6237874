"""Score fusion methods on the Harvard pairs with ``medfuse eval``'s metrics.

Fuses each pair with every classic rule (or the methods given) exactly as ``medfuse fuse`` does
(in memory: the PNG it would write is lossless, so the scores are those of the written file) and
prints the mean of every metric per modality pair and method as a Markdown table. Needs
../shared/data.

    python benchmarks/harvard_methods.py                      # classic rules, all pairs
    python benchmarks/harvard_methods.py --split val --methods mean,max,laplacian,wavelet,adafuse
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path

from medfuse_cli.evaluate import find_cases, score, summarise
from medfuse_cli.fusion.classic import CLASSIC_RULES
from medfuse_cli.io import read_image
from medfuse_cli.metrics import METRICS
from medfuse_cli.pipeline import FuseOptions, fuse_images

HARVARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "harvard"


METHODS: list[str] = list(CLASSIC_RULES)


def _init(methods: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    METHODS[:] = methods


def _score_case(case) -> list[dict]:
    fixed, moving = read_image(case.fixed), read_image(case.moving)
    rows = []
    for rule in METHODS:
        fused, moved, _, _ = fuse_images(fixed, moving, FuseOptions(method=rule, metrics=False))
        rows.append({"id": case.id, "group": case.group, "method": rule, **score(fixed, moved, fused)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", help="only this split of splits.csv (train / val)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default=",".join(CLASSIC_RULES), help="comma-separated fuse methods")
    args = parser.parse_args()
    cases, _ = find_cases(HARVARD, [], args.split)
    t0 = time.perf_counter()
    with multiprocessing.Pool(args.workers, initializer=_init, initargs=(args.methods.split(","),)) as pool:
        rows = [r for chunk in pool.imap(_score_case, cases, chunksize=4) for r in chunk]
    means = summarise(rows)
    print(f"{len(cases)} pairs{' of split ' + args.split if args.split else ''}, {time.perf_counter() - t0:.0f} s\n")
    print("| pair | method | n | " + " | ".join(METRICS) + " |")
    print("|---|---|--:|" + "--:|" * len(METRICS))
    for group in sorted(means):
        for rule, v in means[group].items():
            print(f"| {group} | {rule} | {v['n']} | " + " | ".join(f"{v[k]:.3f}" for k in METRICS) + " |")


if __name__ == "__main__":
    main()
