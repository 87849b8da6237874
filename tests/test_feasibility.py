"""benchmarks/feasibility.py: optimising the fused image itself raises Qabf and holds its hinges."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from conftest import shared_path

from medfuse_cli.metrics import compute
from medfuse_cli.train import load_split


def test_free_image_gains_qabf_and_keeps_both_sources():
    shared_path("harvard")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from feasibility import optimise

    p = load_split(shared_path("harvard"), "val", "mri-spect")[0]
    a, b = np.round(p["a"] * 255.0), np.round(p["b"] * 255.0)
    start = np.round((a + b) / 2)  # the mean rule: both sources kept, weak edges
    before = compute(a, b, start)
    worst_min = before["SSIM_worst"] - 0.02
    f = optimise(a, b, start, worst_min, ssim_min=0.0, vif_min=None, steps=40, lr=0.01)
    after = compute(a, b, f)
    assert f.shape == a.shape and f.min() >= 0 and f.max() <= 255 and np.array_equal(f, np.round(f))
    assert after["Qabf"] > before["Qabf"] + 0.05  # the objective moves
    assert after["SSIM_worst"] >= worst_min - 0.01  # the survival hinge holds (weight 50)
    # and it is the hinge that holds it: without, Qabf climbs further by dropping the SPECT
    free = compute(a, b, optimise(a, b, start, 0.0, ssim_min=0.0, vif_min=None, steps=40, lr=0.01))
    assert free["SSIM_worst"] < worst_min - 0.05 and free["Qabf"] > after["Qabf"]
