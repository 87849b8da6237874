"""Fusion methods behind one entry point: classic rules and the trained networks."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError
from .classic import CLASSIC_RULES, fuse_classic

NETWORKS = ("adafuse", "dran")
METHODS = (*CLASSIC_RULES, *NETWORKS, "auto")

__all__ = ["CLASSIC_RULES", "METHODS", "NETWORKS", "fuse", "fuse_classic", "model_name", "resolve_method"]


def resolve_method(method: str) -> str:
    """``auto`` -> AdaFuse when its weights are installed, else the laplacian rule."""
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    from ..models.weights import card_path

    return "adafuse" if card_path("adafuse").is_file() else "laplacian"


def model_name(method: str, task: str) -> str:
    """The installed weights of a network for one task: ``NETWORK-TASK`` if shipped, else ``NETWORK``."""
    from ..models.weights import card_path

    return f"{method}-{task}" if card_path(f"{method}-{task}").is_file() else method


def fuse(method: str, a: np.ndarray, b: np.ndarray, task: str = "mri-pet", device: str = "auto") -> np.ndarray:
    """Fuse normalised arrays ``(x, y, z)`` in [0, 1] of one shape; networks go slice by slice (axial)."""
    method = resolve_method(method)
    if method in CLASSIC_RULES:
        return fuse_classic(method, a, b)
    from ..models.infer import fuse_stack, load_model, pick_device

    dev = pick_device(device)
    model = load_model(model_name(method, task), str(dev))
    stack = fuse_stack(model, a.transpose(2, 1, 0), b.transpose(2, 1, 0), task, device=dev)
    return np.clip(stack.transpose(2, 1, 0), 0.0, 1.0).astype(np.float32)
