"""Inference of the 2D networks: padding, batches of slices, device choice, cached models."""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from .checks import check_device_name, check_window

log = logging.getLogger(__name__)


def pick_device(name: str = "auto", announce: bool = True) -> torch.device:
    """The torch device of ``--device``: ``auto`` is the first CUDA device when there is one
    (said in a warning when ``announce``)."""
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            if announce:
                log.warning("--device auto: using CUDA device 0 (%s), float16", torch.cuda.get_device_name(0))
            return torch.device("cuda:0")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidInputError(f"--device {name}: no CUDA device is available (use cpu or auto)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return torch.device("cpu")


def device_summary() -> str:
    """Where ``--device auto`` runs the networks, and the torch build behind it (for bug reports: a
    CPU-only torch on a machine with a GPU is the usual reason a GPU is not used)."""
    build = f"torch {torch.__version__}, " + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                                               else "a CPU-only build")
    if torch.cuda.is_available():
        return f"--device auto: CUDA device 0, {torch.cuda.get_device_name(0)} ({build}; {torch.cuda.device_count()} device(s))"
    return f"--device auto: the CPU, {torch.get_num_threads()} threads ({build}; no CUDA device available)"


def autocast(device: torch.device):
    """Mixed precision (float16) on CUDA; a no-op on the CPU."""
    return torch.autocast(device_type="cuda", dtype=torch.float16, enabled=device.type == "cuda")


def on_gpu_memory_error(run, device: torch.device, sizes: list[int]):
    """``run(device, size)`` with the first size; on a CUDA out-of-memory error retry with the next
    (smaller) sizes, then on the CPU, each time with a warning."""
    for size in sizes:
        try:
            return run(device, size)
        except torch.cuda.OutOfMemoryError:
            if device.type != "cuda":
                raise
            torch.cuda.empty_cache()
            log.warning("out of GPU memory with size %d; retrying smaller", size)
    log.warning("out of GPU memory at every size; falling back to the CPU")
    return run(torch.device("cpu"), sizes[0])


@functools.lru_cache(maxsize=4)
def load_model(name: str, device: str = "cpu", channels_last: bool = True) -> torch.nn.Module:
    """A shipped model by name (weights checked against their card), in eval mode.

    2D networks are stored channels-last, which ``benchmarks/run_all.py`` shows is faster on the
    CPU (same outputs within 1e-5); it does not pay for the 3D network.
    """
    from ..train import build_model
    from .weights import WeightsError, load_checked

    state, card = load_checked(name)
    try:
        model = build_model(card.get("model", "adafuse"), card["architecture"])
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{card['weights']}: does not fit the architecture of its model card "
                           f"({' '.join(str(exc).split())[:200]})") from None
    model = model.to(device).eval()
    if channels_last and getattr(model, "dims", 2) == 2:
        model = model.to(memory_format=torch.channels_last)
    return model


def slice_batch(model: torch.nn.Module | type[torch.nn.Module], rows: int, cols: int, batch: int, device: torch.device) -> int:
    """Slices per forward: at most ``batch``; on the CPU also at most the model's
    ``cpu_pixels_per_forward`` pixels (at least one slice). Larger batches overflow the CPU's
    caches and run slower per slice (``benchmarks/slice_batch.py``); a GPU takes the whole batch."""
    budget = getattr(model, "cpu_pixels_per_forward", 0)
    if device.type != "cpu" or not budget:
        return batch
    return max(1, min(batch, budget // (rows * cols)))


def planned_slice_batch(name: str, rows: int, cols: int, batch: int, device: str) -> int:
    """Slices per forward that :func:`fuse_stack` will run for the 2D network ``name`` on slices of
    ``rows`` x ``cols`` with ``batch`` and ``--device``, known before any model is loaded."""
    from .adafuse import AdaFuse
    from .dran import DRAN

    cls = {"adafuse": AdaFuse, "dran": DRAN}[name]
    m = cls.multiple
    return slice_batch(cls, rows + (-rows) % m, cols + (-cols) % m, batch, pick_device(device, announce=False))


@torch.inference_mode()
def fuse_stack(model: torch.nn.Module, a: np.ndarray, b: np.ndarray, task: str, batch: int = 8,
               device: torch.device | None = None, info: dict | None = None,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Fuse stacks of slices ``(n, rows, cols)`` in [0, 1], at most ``batch`` at a time
    (:func:`slice_batch`; ``info`` receives the number as ``slices_per_forward``); returns float32
    in [0, 1]. ``progress(done, total)`` hears of every batch of slices."""
    from .adafuse import TASKS

    device = device or next(model.parameters()).device
    m = getattr(model, "multiple", 1)
    n, h, w = a.shape
    ph, pw = (-h) % m, (-w) % m
    batch = min(slice_batch(model, h + ph, w + pw, batch, device), n)
    if info is not None:
        info["slices_per_forward"] = batch
    out = np.empty((n, h, w), np.float32)
    tid = TASKS.index(task)
    for i in range(0, n, batch):
        ta = torch.from_numpy(np.ascontiguousarray(a[i : i + batch], np.float32))[:, None].to(device)
        tb = torch.from_numpy(np.ascontiguousarray(b[i : i + batch], np.float32))[:, None].to(device)
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            ta, tb = F.pad(ta, (0, pw, 0, ph), mode=mode), F.pad(tb, (0, pw, 0, ph), mode=mode)
        t = torch.full((ta.shape[0],), tid, dtype=torch.long, device=device)
        with autocast(device):
            f = model(ta, tb, t)[:, 0, :h, :w]
        out[i : i + batch] = f.float().cpu().numpy()
        if progress is not None:
            progress(min(i + batch, n), n)
    return out


def _starts(length: int, patch: int, step: int) -> list[int]:
    """Window starts covering ``length``: every ``step``, the last one flush with the end."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch, step))
    return [*starts, length - patch]


def gaussian_importance(shape: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """A separable Gaussian centred on a window (sigma = side / 8), floored at 1e-3 of its peak."""
    w = np.ones(shape, np.float32)
    for axis, n in enumerate(shape):
        x = np.arange(n, dtype=np.float32) - (n - 1) / 2
        g = np.exp(-0.5 * (x / max(n * sigma_scale, 1e-6)) ** 2).astype(np.float32)
        w = w * g.reshape([n if i == axis else 1 for i in range(len(shape))])
    return np.maximum(w / w.max(), 1e-3)


@torch.inference_mode()
def sliding_window(model: torch.nn.Module, a: np.ndarray, b: np.ndarray, patch: int = 96, overlap: float = 0.25,
                   device: torch.device | None = None, task: str | None = None,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Fuse volumes ``(z, y, x)`` in [0, 1] with a 3D network, window by window.

    Windows of ``patch`` voxels a side (rounded up to the model's multiple; shorter sides are
    padded by replication) overlap by ``overlap`` and are blended with Gaussian weights, so
    memory is bounded by the window, not the volume (besides the output itself). A volume that
    fits in one window is fused in one call. ``task`` (one of ``adafuse.TASKS``) conditions a model
    with a task embedding, which needs it. ``progress(done, total)`` hears of every window.
    """
    from .adafuse import TASKS

    check_window(patch, overlap)
    device = device or next(model.parameters()).device
    m = getattr(model, "multiple", 1)
    patch = -(-patch // m) * m
    dims = a.shape
    win = tuple(min(patch, -(-n // m) * m) for n in dims)
    pad = [max(w - n, 0) for w, n in zip(win, dims, strict=True)]
    if any(pad):
        widths = [(0, p) for p in pad]
        a, b = np.pad(a, widths, mode="edge"), np.pad(b, widths, mode="edge")
    full = a.shape
    steps = [max(m, round(w * (1 - overlap) / m) * m) for w in win]
    grids = [_starts(n, w, s) for n, w, s in zip(full, win, steps, strict=True)]
    t = None if task is None else torch.tensor([TASKS.index(task)], device=device)
    if all(len(g) == 1 for g in grids):
        ta = torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None].to(device)
        tb = torch.from_numpy(np.ascontiguousarray(b, np.float32))[None, None].to(device)
        with autocast(device):
            out = model(ta, tb, t)[0, 0].float().cpu().numpy()
        return out[tuple(slice(0, n) for n in dims)]
    weight = gaussian_importance(win)
    acc = np.zeros(full, np.float32)
    norm = np.zeros(full, np.float32)
    corners = list(itertools.product(*grids))
    for done, (z, y, x) in enumerate(corners, 1):
        sl = (slice(z, z + win[0]), slice(y, y + win[1]), slice(x, x + win[2]))
        ta = torch.from_numpy(np.ascontiguousarray(a[sl], np.float32))[None, None].to(device)
        tb = torch.from_numpy(np.ascontiguousarray(b[sl], np.float32))[None, None].to(device)
        with autocast(device):
            acc[sl] += model(ta, tb, t)[0, 0].float().cpu().numpy() * weight
        norm[sl] += weight
        if progress is not None:
            progress(done, len(corners))
    return (acc / norm)[tuple(slice(0, n) for n in dims)]
