"""Inference of the 2D networks: padding, batches of slices, device choice, cached models."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidInputError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda: no CUDA device is available (use cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise InvalidInputError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


@functools.lru_cache(maxsize=4)
def load_model(name: str, device: str = "cpu") -> torch.nn.Module:
    """A shipped model by name (weights checked against their card), in eval mode."""
    from ..train import build_model
    from .weights import load_checked

    state, card = load_checked(name)
    model = build_model(card.get("model", "adafuse"), card["architecture"])
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.inference_mode()
def fuse_stack(model: torch.nn.Module, a: np.ndarray, b: np.ndarray, task: str, batch: int = 8,
               device: torch.device | None = None) -> np.ndarray:
    """Fuse stacks of slices ``(n, rows, cols)`` in [0, 1]; returns float32 in [0, 1]."""
    from .adafuse import TASKS

    device = device or next(model.parameters()).device
    m = getattr(model, "multiple", 1)
    n, h, w = a.shape
    ph, pw = (-h) % m, (-w) % m
    out = np.empty((n, h, w), np.float32)
    tid = TASKS.index(task)
    for i in range(0, n, batch):
        ta = torch.from_numpy(np.ascontiguousarray(a[i : i + batch], np.float32))[:, None].to(device)
        tb = torch.from_numpy(np.ascontiguousarray(b[i : i + batch], np.float32))[:, None].to(device)
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            ta, tb = F.pad(ta, (0, pw, 0, ph), mode=mode), F.pad(tb, (0, pw, 0, ph), mode=mode)
        t = torch.full((ta.shape[0],), tid, dtype=torch.long, device=device)
        f = model(ta, tb, t)[:, 0, :h, :w]
        out[i : i + batch] = f.float().cpu().numpy()
    return out
