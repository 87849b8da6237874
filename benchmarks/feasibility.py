"""Can any image meet targets (1)-(3) of PEERS.md on a val pair? Ask the pixels directly.

For every val pair of the chosen modality pairs, start from a method's output (AdaFuse by default)
and optimise the fused image F itself (no network; the change to F is a sum of four scales, full to
1/8, so Adam moves regions as well as pixels) to raise the differentiable Qabf of
``models/losses.py`` while hinges (weight 50) hold, on that pair:

- (1) both sources survive: min(SSIM(MRI,F), SSIM(other,F)) >= that of pixel max + ``--margin``;
- (2) mean SSIM >= the best classic rule's on that pair + ``--margin``;
- optional ``--vif``: VIF(MRI,F) + VIF(other,F) >= ``--vif`` (the VIF clause of the DRAN issue).

Per-pair constraints are stricter than the targets (which are means over pairs); ``--pooled``
optimises the pairs of a modality pair together, under the targets as written: the mean over
pairs of the worse source's SSIM at least pixel max's mean + margin, and the mean SSIM at least
the best rule's mean + margin (one pair may then give up what another gains). For a colour
PET / SPECT, F is the luminance that ``medfuse fuse`` puts back with the source's Cb / Cr; the
optimisation sees F through that put-back (RGB clipped to 0..255, as the written PNG is) and the
result is the written PNG's luminance (``--luminance-only``: F itself, as before 2026-11-23, which
skipped the clipping and so overstated every colour ceiling). The result is scored with
``medfuse eval``'s metrics on F rounded to 0..255, as a fused PNG would be. Gradient
ascent finds a good image, not the best one, so its Qabf is a lower bound on the best Qabf any image
can have under (1) and (2): how far a network may still climb and, when the bound sits near the
target, how close to that ceiling a network must come. (The per-pair best rule's SSIM, averaged,
is above every peer network's mean SSIM in PEERS.md, so (2) covers them too.) Needs ../shared/data.

    python benchmarks/feasibility.py --groups mri-pet,mri-spect
    python benchmarks/feasibility.py --groups mri-spect --every 3 --pooled
    python benchmarks/feasibility.py --groups mri-ct --every 3 --steps 1000 --vif 0.674
    python benchmarks/feasibility.py --volumes --init dcfb3d --steps 600    # held-out volumes, 3D
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from harvard_methods import HARVARD
from volumes_heldout import MODALITY, VOLUMES

from medfuse_cli.evaluate import find_cases, metric_array, metric_layout
from medfuse_cli.fusion import CLASSIC_RULES
from medfuse_cli.intensity import luminance, rgb_to_ycbcr, ycbcr_to_rgb
from medfuse_cli.io import read_image
from medfuse_cli.metrics import compute
from medfuse_cli.models import losses
from medfuse_cli.pipeline import FuseOptions, fuse_images

RULES = list(CLASSIC_RULES)


def _pairs(volumes: bool, groups: list[str], every: int):
    """(group, id, fixed, moving, fuse options) of the val pairs or of the held-out volume pairs."""
    if volumes:
        from medfuse_cli.volumes import pairs

        for p in pairs(VOLUMES, "held-out"):
            opts = {"transform": "none", "moving_modality": MODALITY[p.task]}
            yield p.task, p.id, read_image(p.fixed), read_image(p.moving), opts
        return
    cases, _ = find_cases(HARVARD, [], "val")
    for group in groups:
        for case in [c for c in cases if c.group == group][::every]:
            yield group, case.id, read_image(case.fixed), read_image(case.moving), {}


def _fuse(fixed, moving, method: str, opts: dict) -> tuple[np.ndarray, np.ndarray]:
    fused, moved, _, _ = fuse_images(fixed, moving, FuseOptions(method=method, metrics=False, **opts))
    return metric_array(fused), metric_array(moved)


def _chroma(moving) -> tuple[np.ndarray, np.ndarray] | None:
    """Cb, Cr of a colour MOVING (2D, on FIXED's grid) in the metrics' layout; None for greyscale."""
    if not moving.is_color:
        return None
    _, cb, cr = rgb_to_ycbcr(moving.data)
    return metric_layout(cb, True), metric_layout(cr, True)


def _written(y: torch.Tensor, chroma: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The luminance (0..1) of the RGB that luminance ``y`` (0..1) becomes with this Cb / Cr, clipped."""
    cb, cr = chroma[0] - 128.0, chroma[1] - 128.0
    y = y * 255.0
    rgb = [y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb]
    r, g, b = (c.clamp(0, 255) for c in rgb)
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255.0


def optimise(a: np.ndarray, b: np.ndarray, f0: np.ndarray, worst_min: float, ssim_min: float,
             vif_min: float | None, steps: int, lr: float,
             chroma: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Maximise the mean Qabf of N images F (arrays (N, ...), 0..255) under hinges on their means,
    F in [0, 1]; with ``chroma`` (Cb, Cr), F is a luminance seen, and returned, as the clipped
    colour image written with them."""
    ta, tb = (torch.tensor(x / 255.0, dtype=torch.float32)[:, None] for x in (a, b))
    tc = None if chroma is None else tuple(torch.tensor(c, dtype=torch.float32)[:, None] for c in chroma)
    seen = (lambda f: f) if tc is None else (lambda f: _written(f, tc))
    base = torch.tensor(f0 / 255.0, dtype=torch.float32)[:, None]
    size = base.shape[2:]
    # the change to F as a sum of 4 scales (full, 1/2, 1/4, 1/8): Adam then moves regions, not only pixels
    levels = [torch.zeros(len(base), 1, *(-(-n // 2**k) for n in size), requires_grad=True) for k in range(4)]
    opt = torch.optim.Adam(levels, lr=lr)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    up = lambda d: torch.nn.functional.interpolate(d, size=size, mode=mode, align_corners=False)
    for _ in range(steps):
        f = seen((base + sum(up(d) for d in levels)).clamp(0, 1))
        sa, sb = losses.ssim(f, ta), losses.ssim(f, tb)
        loss = -losses.qabf(ta, tb, f).mean()
        loss = loss + 50 * torch.relu(worst_min - torch.minimum(sa, sb).mean())
        loss = loss + 50 * torch.relu(ssim_min - ((sa + sb) / 2).mean())
        if vif_min is not None:
            v = losses.vif(ta, f) + losses.vif(tb, f)
            loss = loss + 50 * torch.relu(vif_min - v.mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    f = (base + sum(up(d) for d in levels)).clamp(0, 1).detach()[:, 0].numpy() * 255.0
    if chroma is None:
        return np.round(f)
    return luminance(ycbcr_to_rgb(f, *chroma)).astype(np.float64)  # rounded and clipped RGB, as written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="mri-ct,mri-pet,mri-spect")
    parser.add_argument("--init", default="adafuse", help="method whose output F starts from")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--margin", type=float, default=0.005)
    parser.add_argument("--vif", type=float, default=None, help="also require VIF >= this on each pair (on their mean with --pooled)")
    parser.add_argument("--pooled", action="store_true",
                        help="2D: optimise each modality pair's images together, with the floors on their means")
    parser.add_argument("--every", type=int, default=1, help="use every N-th val pair")
    parser.add_argument("--volumes", action="store_true", help="the held-out volume pairs (3D) instead")
    parser.add_argument("--luminance-only", action="store_true",
                        help="score F itself, not the clipped colour image fuse writes from it (the old way)")
    args = parser.parse_args()
    if args.pooled and args.volumes:
        parser.error("--pooled is for the 2D val pairs (the volumes differ in size)")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    found: dict[str, list[dict]] = {}
    for group, pid, fixed, moving, opts in _pairs(args.volumes, args.groups.split(","), args.every):
        outs = {rule: _fuse(fixed, moving, rule, opts) for rule in RULES}
        a, b = metric_array(fixed), outs["max"][1]
        found.setdefault(pid if args.volumes else group, []).append({
            "id": pid, "a": a, "b": b, "f0": _fuse(fixed, moving, args.init, opts)[0],
            "scores": {rule: compute(a, b, f) for rule, (f, _) in outs.items()},
            "chroma": None if args.volumes or args.luminance_only else _chroma(moving)})
    rows: dict[str, list[dict]] = {}
    for group, cases in found.items():
        for batch in [cases] if args.pooled else [[c] for c in cases]:
            worst_min = np.mean([c["scores"]["max"]["SSIM_worst"] for c in batch]) + args.margin
            ssim_min = max(np.mean([c["scores"][r]["SSIM"] for c in batch]) for r in RULES) + args.margin
            chroma = None if batch[0]["chroma"] is None else tuple(np.stack(x) for x in zip(*(c["chroma"] for c in batch)))
            fs = optimise(*(np.stack([c[k] for c in batch]) for k in ("a", "b", "f0")), worst_min, ssim_min,
                          args.vif, args.steps, args.lr, chroma)
            for c, f in zip(batch, fs):
                rows.setdefault(group, []).append({**c["scores"], "start": compute(c["a"], c["b"], c["f0"]),
                                                   "free": compute(c["a"], c["b"], f)})
                print(f"{c['id']}: Qabf {rows[group][-1]['start']['Qabf']:.3f} -> {rows[group][-1]['free']['Qabf']:.3f}",
                      flush=True)
    keys = ("SSIM", "SSIM_A", "SSIM_B", "SSIM_worst", "Qabf", "VIF", "MI")
    print(f"\n{sum(map(len, rows.values()))} pairs, {args.steps} steps from {args.init}, "
          f"margin {args.margin}, VIF >= {args.vif}, luminance only {args.luminance_only}, pooled {args.pooled}, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| pair | image | n | " + " | ".join(keys) + " |")
    print("|---|---|--:|" + "--:|" * len(keys))
    for group, rs in rows.items():
        for name in (*RULES, "start", "free"):
            label = {"start": args.init, "free": "free image (optimised)"}.get(name, name)
            means = [np.mean([r[name][k] for r in rs]) for k in keys]
            print(f"| {group} | {label} | {len(rs)} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
