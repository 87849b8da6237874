"""Fusion methods behind one entry point: classic rules and the trained networks."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError
from .classic import CLASSIC_RULES, fuse_classic

NETWORKS = ("adafuse", "dran", "dcfb3d")
VOLUME_NETWORKS = ("dcfb3d",)  # fuse whole volumes (sliding window); the others go slice by slice
# what ``auto`` picks for volumes: AdaFuse slice by slice scored a little higher than DCFB-3D on the
# held-out volumes (mean of SSIM, worst-source SSIM and Qabf) and runs faster (README, DCFB-3D)
AUTO_3D = "adafuse"
METHODS = (*CLASSIC_RULES, *NETWORKS, "auto")

__all__ = ["AUTO_3D", "CLASSIC_RULES", "METHODS", "NETWORKS", "VOLUME_NETWORKS", "fuse", "fuse_classic", "model_name",
           "resolve_method"]


def resolve_method(method: str, volume: bool = False) -> str:
    """``auto`` -> AdaFuse for 2D pairs and :data:`AUTO_3D` for volumes when their weights are
    installed, else the laplacian rule."""
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    from ..models.weights import card_path

    for choice in ((AUTO_3D, "adafuse") if volume else ("adafuse",)):
        if card_path(choice).is_file():
            return choice
    return "laplacian"


def model_name(method: str, task: str) -> str:
    """The installed weights of a network for one task: ``NETWORK-TASK`` if shipped, else ``NETWORK``."""
    from ..models.weights import card_path

    return f"{method}-{task}" if card_path(f"{method}-{task}").is_file() else method


def fuse(method: str, a: np.ndarray, b: np.ndarray, task: str = "mri-pet", device: str = "auto",
         patch: int = 96, overlap: float = 0.25) -> np.ndarray:
    """Fuse normalised arrays ``(x, y, z)`` in [0, 1] of one shape. 2D networks go slice by slice
    (axial); volume networks by overlapping windows of ``patch`` voxels."""
    volume = a.shape[2] > 1
    method = resolve_method(method, volume)
    if method in CLASSIC_RULES:
        return fuse_classic(method, a, b)
    from ..models.infer import fuse_stack, load_model, pick_device, sliding_window

    if method in VOLUME_NETWORKS and not volume:
        raise InvalidInputError(f"--method {method} fuses volumes; for 2D slices use adafuse, dran or a classic rule")
    dev = pick_device(device)
    model = load_model(model_name(method, task), str(dev))
    if method in VOLUME_NETWORKS:
        out = sliding_window(model, a.transpose(2, 1, 0), b.transpose(2, 1, 0), patch, overlap, device=dev)
    else:
        out = fuse_stack(model, a.transpose(2, 1, 0), b.transpose(2, 1, 0), task, device=dev)
    return np.clip(out.transpose(2, 1, 0), 0.0, 1.0).astype(np.float32)
