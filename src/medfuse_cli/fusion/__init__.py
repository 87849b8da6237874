"""Fusion methods behind one entry point: classic rules and the trained networks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InvalidInputError
from .classic import CLASSIC_RULES, fuse_classic

NETWORKS = ("adafuse", "dran", "dcfb3d")
VOLUME_NETWORKS = ("dcfb3d",)  # fuse whole volumes (sliding window); the others go slice by slice
# what ``auto`` picks for volumes: AdaFuse slice by slice scored a little higher than DCFB-3D on the
# held-out volumes (mean of SSIM, worst-source SSIM and Qabf) and runs faster (README, DCFB-3D)
AUTO_3D = "adafuse"
METHODS = (*CLASSIC_RULES, *NETWORKS, "auto")

__all__ = ["AUTO_3D", "CLASSIC_RULES", "METHODS", "NETWORKS", "VOLUME_NETWORKS", "check_fits", "fuse", "fuse_classic",
           "model_name", "resolve_method"]


def resolve_method(method: str, volume: bool = False, learnt_pair: bool = True) -> str:
    """``auto`` -> AdaFuse for 2D pairs and :data:`AUTO_3D` for volumes when their weights are
    installed and the pair is one the networks learnt (``learnt_pair``: an MRI with a CT, PET or
    SPECT), else the laplacian rule."""
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    if not learnt_pair:
        return "laplacian"
    from ..models.weights import card_path

    for choice in ((AUTO_3D, "adafuse") if volume else ("adafuse",)):
        if card_path(choice).is_file():
            return choice
    return "laplacian"


def check_fits(method: str, volume: bool) -> None:
    """Volume networks need volumes: a 2D pair is a one-line error (exit 4)."""
    if method in VOLUME_NETWORKS and not volume:
        raise InvalidInputError(f"--method {method} fuses volumes; for 2D slices use adafuse, dran or a classic rule")


def model_name(method: str, task: str) -> str:
    """The installed weights of a network for one task: ``NETWORK-TASK`` if shipped, else ``NETWORK``."""
    from ..models.weights import card_path

    return f"{method}-{task}" if card_path(f"{method}-{task}").is_file() else method


def fuse(method: str, a: np.ndarray, b: np.ndarray, task: str = "mri-pet", device: str = "auto",
         patch: int = 96, overlap: float = 0.25, threads: int = 0, info: dict | None = None,
         batch: int = 8, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Fuse normalised arrays ``(x, y, z)`` in [0, 1] of one shape. 2D networks go slice by slice
    along the third array axis (axial for most scans), ``batch`` slices at a time; volume networks
    by overlapping windows of ``patch`` voxels. ``threads`` > 0 sets torch's CPU threads. ``info``,
    when given, receives the device a network ran on (and a 2D network's slices per forward);
    ``progress(done, total)`` hears of a network's batches of slices or windows."""
    volume = a.shape[2] > 1
    method = resolve_method(method, volume)
    if method in CLASSIC_RULES:
        return fuse_classic(method, a, b)
    import torch

    from ..models.infer import (
        fuse_stack,
        load_model,
        on_gpu_memory_error,
        pick_device,
        sliding_window,
    )

    check_fits(method, volume)
    if threads:
        torch.set_num_threads(threads)
    name = model_name(method, task)
    sa, sb = a.transpose(2, 1, 0), b.transpose(2, 1, 0)

    def run(dev: torch.device, size: int) -> np.ndarray:
        if info is not None:
            n = torch.get_num_threads()
            info["device"] = (f"cpu, {n} thread{'s' * (n != 1)}" if dev.type == "cpu"
                              else f"{dev} ({torch.cuda.get_device_name(dev)}, float16)")
        model = load_model(name, str(dev))
        if method in VOLUME_NETWORKS:
            return sliding_window(model, sa, sb, size, overlap, device=dev, task=task, progress=progress)
        return fuse_stack(model, sa, sb, task, batch=size, device=dev, info=info, progress=progress)

    # on a GPU out-of-memory error: smaller windows (batches of slices), then the CPU
    sizes = [patch, max(patch // 2, 8), 8] if method in VOLUME_NETWORKS else [batch, max(batch // 4, 1), 1]
    out = on_gpu_memory_error(run, pick_device(device), sizes)
    return np.clip(out.transpose(2, 1, 0), 0.0, 1.0).astype(np.float32)
