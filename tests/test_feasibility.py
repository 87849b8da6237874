"""benchmarks/feasibility.py: optimising the fused image itself raises Qabf and holds its hinges."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from conftest import shared_path

from medfuse_cli.metrics import compute
from medfuse_cli.train import load_split


def _feasibility():
    shared_path("harvard")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import feasibility

    return feasibility


def test_free_image_gains_qabf_and_keeps_both_sources():
    optimise = _feasibility().optimise
    p = load_split(shared_path("harvard"), "val", "mri-spect")[0]
    a, b = np.round(p["a"] * 255.0), np.round(p["b"] * 255.0)
    start = np.round((a + b) / 2)  # the mean rule: both sources kept, weak edges
    before = compute(a, b, start)
    worst_min = before["SSIM_worst"] - 0.02
    f = optimise(a[None], b[None], start[None], worst_min, ssim_min=0.0, vif_min=None, steps=40, lr=0.01)[0]
    after = compute(a, b, f)
    assert f.shape == a.shape and f.min() >= 0 and f.max() <= 255 and np.array_equal(f, np.round(f))
    assert after["Qabf"] > before["Qabf"] + 0.05  # the objective moves
    assert after["SSIM_worst"] >= worst_min - 0.01  # the survival hinge holds (weight 50)
    # and it is the hinge that holds it: without, Qabf climbs further by dropping the SPECT
    free = compute(a, b, optimise(a[None], b[None], start[None], 0.0, ssim_min=0.0, vif_min=None, steps=40,
                                  lr=0.01)[0])
    assert free["SSIM_worst"] < worst_min - 0.05 and free["Qabf"] > after["Qabf"]


def test_pooled_floors_hold_on_the_mean_through_the_colour_put_back():
    """Two real SPECT pairs optimised together (--pooled): the survival floor holds on their mean and
    Qabf rises; the put-back the optimisation sees is the one fuse writes (clipped RGB, its Y)."""
    import torch

    from medfuse_cli.evaluate import find_cases, metric_array
    from medfuse_cli.intensity import luminance, ycbcr_to_rgb
    from medfuse_cli.io import read_image

    feasibility = _feasibility()
    cases = [c for c in find_cases(shared_path("harvard"), [], "val")[0] if c.group == "mri-spect"][:2]
    fixed, moving = [read_image(c.fixed) for c in cases], [read_image(c.moving) for c in cases]
    a, b = np.stack([metric_array(x) for x in fixed]), np.stack([metric_array(y) for y in moving])
    cb, cr = (np.stack(x) for x in zip(*(feasibility._chroma(m) for m in moving)))
    start = np.round((a + b) / 2)
    y = torch.tensor(start / 255.0, dtype=torch.float32)[:, None]
    seen = feasibility._written(y, tuple(torch.tensor(c, dtype=torch.float32)[:, None] for c in (cb, cr)))
    written = np.stack([luminance(ycbcr_to_rgb(s, c1, c2)) for s, c1, c2 in zip(start, cb, cr)])
    assert np.abs(seen[:, 0].numpy() * 255.0 - written).max() < 0.6  # the same up to 8-bit rounding
    assert np.abs(written - start).max() > 5  # and the clipping matters on these SPECT slices
    before = [compute(x, z, f) for x, z, f in zip(a, b, written)]
    floor = float(np.mean([s["SSIM_worst"] for s in before])) - 0.02
    f = feasibility.optimise(a, b, start, floor, ssim_min=0.0, vif_min=None, steps=40, lr=0.01, chroma=(cb, cr))
    after = [compute(x, z, g) for x, z, g in zip(a, b, f)]
    assert np.mean([s["SSIM_worst"] for s in after]) >= floor - 0.01
    assert np.mean([s["Qabf"] for s in after]) > np.mean([s["Qabf"] for s in before]) + 0.03
