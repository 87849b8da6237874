"""Memory budget of one fusion: before the heavy steps, choose the network's window (or batch of
slices) and whether to score, so that the run stays under ``--max-memory``; refuse (exit 10)
when even the leanest plan would not fit.

The estimate is the resident memory after reading both inputs plus per-voxel costs of the later
steps on FIXED's grid, measured on this code (``benchmarks/memory_guard.py`` prints the
estimate beside the measured peak):

* registration, resampling, normalising, the fused and the written arrays: ``BASE`` (fixed bytes,
  bytes per voxel);
* the report's metrics (SSIM, VIF, FMI... in float64): ``METRICS`` (fixed bytes, bytes per voxel,
  bytes per voxel of the largest slab they filter at once, see ``metrics.largest_slab``, for each
  metric computed at once by its threads);
* a network: its weights and activations for one window of ``patch**3`` voxels (DCFB-3D) or one
  batch of slices (AdaFuse, DRAN; on the CPU the batch they will really run, which for large slices
  is smaller than ``BATCHES[0]``, see ``models.infer.slice_batch``), plus the sliding window's accumulators (counted in full even
  though the metrics run after it: freed memory is not all returned to the system).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidInputError, OutOfMemoryError

log = logging.getLogger(__name__)

BASE = (100e6, 45)  # (fixed bytes, bytes per FIXED voxel)
METRICS = (260e6, 35, 90)
# network: (fixed bytes, bytes per pixel of a slice batch or per voxel of a window, bytes per volume voxel)
# (DRAN's 800 bytes per pixel were measured on single 2048x2048 and 4096x4096 slices, which it encodes and
# decodes in strips (``models.dran.in_strips``): its two encodings and their blend, 128 bytes per pixel each, and
# the nuclear norms' copies remain whole; a slice under ``STRIP_PIXELS`` runs whole, about a kilobyte per pixel,
# within the fixed part)
NETWORK_COST = {"adafuse": (80e6, 850, 0), "dran": (270e6, 800, 0), "dcfb3d": (40e6, 600, 8)}
PATCHES = (96, 64, 48, 32)
BATCHES = (8, 2, 1)
MIN_LIMIT = 256 << 20


def parse_size(text: str) -> int | None:
    """``"auto"`` -> None; ``"4G"``, ``"800M"``, ``"1.5GiB"``, ``"2000000000"`` -> bytes."""
    text = str(text).strip()
    if text.lower() == "auto":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?", text)
    if not m:
        raise InvalidInputError(f"--max-memory {text!r}: give a size such as 4G, 800M or auto")
    size = int(float(m[1]) * 1024 ** " KMGT".index((m[2] or " ").upper()))
    if size < MIN_LIMIT:
        raise InvalidInputError(f"--max-memory {text}: at least 256M is needed to load the libraries")
    return size


def available() -> int:
    """Memory this process may still use: MemAvailable, or the cgroup's limit if tighter, plus
    what the process already holds (its resident set is part of the budget)."""
    free = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as a, open(usage_file) as b:
                raw = a.read().strip()
                if raw != "max":
                    free = min(free, int(raw) - int(b.read().strip()))
            break
        except (OSError, ValueError):
            continue
    return resident() + max(free, 0)


def worker_budget(max_memory: str) -> str:
    """``auto`` inside a dask worker: what is available, but at most 90% of the worker's own memory
    limit (dask stops a worker at 95% of it), so cases running side by side share the machine
    instead of each counting on all of it. Any other value, or outside a worker: unchanged."""
    if str(max_memory).lower() != "auto":
        return max_memory
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        return max_memory
    if not limit:
        return max_memory
    return str(max(MIN_LIMIT, min(int(0.9 * limit), available())))


def resident() -> int:
    """Resident memory of this process now, bytes."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak() -> int:
    """Peak resident memory of this process so far, bytes: ``VmHWM`` of its own address space
    (``ru_maxrss`` would also count the parent's memory when a large process started this one,
    since Linux carries the high-water mark across fork and exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Plan:
    """What a fusion may do within its budget; recorded in the report."""

    limit_bytes: int
    estimate_bytes: int
    metrics: bool
    patch: int
    batch: int
    metric_threads: int = 1  # metrics computed at once (threads)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "peak_bytes": peak()}


def _estimate(shape: tuple[int, ...], method: str, metrics: bool, patch: int, batch: int, threads: int = 1) -> int:
    voxels = 1
    for s in shape:
        voxels *= int(s)
    network = 0.0
    if method in NETWORK_COST:
        fixed, per_unit, per_voxel = NETWORK_COST[method]
        unit = min(patch, max(shape)) ** 3 if method == "dcfb3d" else batch * int(shape[0]) * int(shape[1])
        network = fixed + per_unit * unit + per_voxel * voxels
    scoring = scoring_bytes(shape, threads) if metrics else 0.0
    # the network's memory is not all returned to the system before the metrics run: count both
    return int(resident() + BASE[0] + BASE[1] * voxels + network + scoring)


def scoring_bytes(shape: tuple[int, ...], threads: int = 1) -> float:
    """Memory the metrics need for FIXED's grid ``(x, y, z)``, ``threads`` of them computed at once."""
    from .metrics import HEAVY_METRICS, largest_slab

    x, y, z = (int(s) for s in shape[:3])
    slab = largest_slab((y, x) if z == 1 else (z, y, x))
    return METRICS[0] + METRICS[1] * x * y * z + METRICS[2] * slab * max(1, min(threads, HEAVY_METRICS))


def check_scoring(shape: tuple[int, ...], max_memory: str = "auto", workers: int = 1, threads: int = 1) -> int:
    """The metric threads (at most ``threads`` and ``HEAVY_METRICS``) for scoring a grid within
    ``max_memory`` (``auto``: what is available), as if each of ``workers`` scored a pair of this size:
    ``medfuse eval``'s check before each pair. Refuses (:class:`OutOfMemoryError`) when one thread
    would need more."""
    from .metrics import HEAVY_METRICS

    limit = parse_size(max_memory)
    limit = available() if limit is None else limit
    for t in range(max(1, min(threads, HEAVY_METRICS)), 0, -1):
        need = resident() + workers * scoring_bytes(shape, t)
        if need <= limit:
            break
    log.debug("scoring %s voxels on %d thread(s): estimate %.0f MiB, limit %.0f MiB", "x".join(map(str, shape[:3])),
              t, need / 2**20, limit / 2**20)
    if need > limit:
        at_once = f" ({workers} fused images at once)" if workers > 1 else ""
        raise OutOfMemoryError(f"scoring {'x'.join(map(str, shape[:3]))} voxels{at_once} needs about {need / 2**30:.1f} "
                               f"GiB but may use {limit / 2**30:.1f} GiB; raise --max-memory, free memory"
                               + (" or use fewer --workers" if workers > 1 else ""))
    return t


def scoring_workers(shape: tuple[int, ...], max_memory: str, workers: int) -> int:
    """How many of ``workers`` can score grids of this size at once, one metric thread each, within
    ``max_memory`` (at least 1; :func:`check_scoring` refuses one that does not fit)."""
    limit = parse_size(max_memory)
    limit = available() if limit is None else limit
    return max(1, min(workers, int((limit - resident()) // scoring_bytes(shape, 1))))


def plan(shape: tuple[int, ...], method: str, metrics: bool, patch: int, max_memory: str,
         device: str = "cpu", threads: int = 1) -> Plan:
    """The richest plan under the limit: first compute fewer of the ``threads`` metrics at once, then
    drop to smaller windows / batches, then skip the metrics; :class:`OutOfMemoryError` when nothing
    fits. ``device`` is ``--device``: on the CPU a 2D network's batch is what it will really run (at
    most its pixels per forward)."""
    from .metrics import HEAVY_METRICS

    limit = parse_size(max_memory)
    limit = available() if limit is None else limit
    if method in NETWORK_COST:
        import torch  # noqa: F401 - loaded now, so that the resident memory counts it
    windows = [patch, *(p for p in PATCHES if p < patch)] if method == "dcfb3d" else [patch]
    if method in ("adafuse", "dran"):
        from .models.infer import planned_slice_batch

        slices = int(shape[2]) if len(shape) > 2 else 1
        runs = (min(slices, planned_slice_batch(method, int(shape[0]), int(shape[1]), b, device)) for b in BATCHES)
        batches = sorted(set(runs), reverse=True)
    else:
        batches = [BATCHES[0]]
    at_once = range(max(1, min(threads, HEAVY_METRICS)), 0, -1)
    tries = [(True, p, b, t) for p in windows for b in batches for t in at_once] if metrics else []
    tries += [(False, p, b, 1) for p in windows for b in batches]
    for m, p, b, t in tries:
        est = _estimate(shape, method, m, p, b, t)
        if est <= limit:
            notes = []
            if metrics and not m:
                notes.append("metrics skipped to stay under the memory limit (score with 'medfuse eval')")
            if p != patch:
                notes.append(f"sliding window {p} instead of {patch} to stay under the memory limit")
            if b != batches[0]:
                notes.append(f"batches of {b} slices instead of {batches[0]} to stay under the memory limit")
            for note in notes:
                log.warning("%s", note)
            return Plan(limit, est, m, p, b, t, notes)
    need = _estimate(shape, method, False, windows[-1], batches[-1])
    what = "registration" if method == "register" else "fusion"
    raise OutOfMemoryError(f"this {what} needs about {need / 2**30:.1f} GiB ({'x'.join(map(str, shape))} voxels on "
                           f"FIXED's grid, {method}) but may use {limit / 2**30:.1f} GiB; raise --max-memory, "
                           "free memory, or give a smaller FIXED")
