"""One table: every method's speed, peak memory and, for networks, achieved GFLOP/s beside the
machine's measured float32 matmul GFLOP/s, all measured in one run.

- 2D: milliseconds per 256x256 pair (a real Harvard MRI-PET pair, or the bundled T1/PET middle
  slices without ../shared), fusion step only, first call excluded.
- 3D: seconds for the bundled 91x109x91 SPM T1 + PET pair (slice by slice for 2D networks,
  sliding window for DCFB-3D).
- Peak memory: resident set of a fresh process that runs only that method (its ``VmHWM``).
- GFLOP/s: floating-point operations of one forward (``torch.utils.flop_counter``) / its time.
- Optimisations, before -> after in the same run: 1 -> 2 threads; contiguous -> channels-last
  weights (2D networks); for volumes with 2D networks, one slice per forward -> batches of up to 8
  slices (fewer where the network's CPU pixel budget says so: ``models.infer.slice_batch``).

    python benchmarks/run_all.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from common import harvard_pair, run_measured, spm_volumes, timed


def matmul_gflops(threads: int, n: int = 2048) -> float:
    torch.set_num_threads(threads)
    x, y = torch.rand(n, n), torch.rand(n, n)
    return 2 * n**3 / timed(lambda: x @ y, 5) / 1e9


def measure(method: str, threads: int) -> dict:
    """Every figure of one method (run in its own process for the memory figure)."""
    from medfuse_cli.fusion import (
        CLASSIC_RULES,
        VOLUME_NETWORKS,
        fuse_classic,
        model_name,
    )
    from medfuse_cli.models.adafuse import TASKS
    from medfuse_cli.models.infer import fuse_stack, load_model, sliding_window

    torch.set_num_threads(threads)
    a, b = harvard_pair()
    va, vb = spm_volumes()
    row: dict = {"method": method}
    if method in CLASSIC_RULES:
        row["ms_2d"] = timed(lambda: fuse_classic(method, a, b), 20) * 1000
        row["s_3d"] = timed(lambda: fuse_classic(method, va, vb), 1)
        return row
    model = load_model(model_name(method, "mri-pet"))
    if method in VOLUME_NETWORKS:
        row["s_3d"] = timed(lambda: sliding_window(model, va, vb, task="mri-pet"), 1)
        x = torch.from_numpy(np.ascontiguousarray(va[:88, :104, :88]))[None, None]
        y = torch.from_numpy(np.ascontiguousarray(vb[:88, :104, :88]))[None, None]
        args = (x, y, torch.tensor([TASKS.index("mri-pet")]))
        seconds = timed(lambda: model(*args), 2)
    else:
        for t in (1, threads):
            torch.set_num_threads(t)
            row[f"ms_2d_{t}t"] = timed(lambda: fuse_stack(model, a[None], b[None], "mri-pet"), 5) * 1000
        row["ms_2d"] = row[f"ms_2d_{threads}t"]
        plain = load_model(model_name(method, "mri-pet"), channels_last=False)
        row["ms_2d_contiguous"] = timed(lambda: fuse_stack(plain, a[None], b[None], "mri-pet"), 5) * 1000
        row["s_3d_batch1"] = timed(lambda: fuse_stack(model, va, vb, "mri-pet", batch=1), 1)
        row["s_3d"] = timed(lambda: fuse_stack(model, va, vb, "mri-pet", batch=8), 1)
        row["s_3d_contiguous"] = timed(lambda: fuse_stack(plain, va, vb, "mri-pet", batch=8), 1)
        x, y = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
        args = (x, y, torch.tensor([1]))
        seconds = row["ms_2d"] / 1000
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(*args)
    row["gflop"] = counter.get_total_flops() / 1e9
    row["gflops_per_s"] = row["gflop"] / seconds
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.threads)))
        return
    from medfuse_cli.fusion import CLASSIC_RULES, NETWORKS
    from medfuse_cli.models.weights import card_path

    peak = {t: matmul_gflops(t) for t in sorted({1, args.threads})}
    print("matmul float32 2048^3: " + ", ".join(f"{t} thread(s) {g:.1f} GFLOP/s" for t, g in peak.items()))
    methods = [*CLASSIC_RULES, *(n for n in NETWORKS if card_path(n).is_file())]
    print("| method | 2D ms / pair | 2D ms, 1 thread | 2D ms, not channels-last | 3D s / volume | 3D s, not channels-last | 3D s, 1 slice per forward | peak GiB | GFLOP per forward | GFLOP/s | % of matmul |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for m in methods:
        try:
            _, gib, out = run_measured([sys.executable, __file__, "--one", m, "--threads", str(args.threads)])
        except RuntimeError:
            print(f"| {m} | failed |")
            continue
        r = json.loads(out.strip().splitlines()[-1])
        f = lambda k, fmt, r=r: format(r[k], fmt) if k in r else ""
        pct = f"{100 * r['gflops_per_s'] / peak[args.threads]:.0f}%" if "gflops_per_s" in r else ""
        print(f"| {m} | {f('ms_2d', '.1f')} | {f('ms_2d_1t', '.1f')} | {f('ms_2d_contiguous', '.1f')} | {f('s_3d', '.2f')} "
              f"| {f('s_3d_contiguous', '.2f')} | {f('s_3d_batch1', '.2f')} "
              f"| {gib:.2f} | {f('gflop', '.2f')} | {f('gflops_per_s', '.1f')} | {pct} |", flush=True)


if __name__ == "__main__":
    main()
