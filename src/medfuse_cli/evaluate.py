"""``medfuse eval``: score fused images against their two sources, for one pair or folders of pairs.

Intensity mapping to the 0..255 greyscale the metrics expect (:mod:`medfuse_cli.metrics`):
colour images become the luminance Y of full-range BT.601 YCbCr; 8-bit PNG/TIFF slices and
colour images are used as they are (0..255); every other image (NIfTI / DICOM volumes, 16-bit
slices) is mapped by its own 0.5-99.5 percentile window to 0..255, as ``medfuse fuse`` normalises.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import GeometryError, InputNotFoundError, InvalidInputError, MedfuseError
from .image import Image
from .intensity import luminance, nan_as_background, window_for
from .io import PAIR_SUFFIXES, named_pattern, partners
from .metrics import METRICS, compute
from .parallel import cpu_threads, thread_map

log = logging.getLogger(__name__)

CONVENTIONS = {
    "intensities": "greyscale 0..255; colour as Y of full-range BT.601 YCbCr; 8-bit slices as stored, "
    "other images by their 0.5-99.5 percentile window",
    "MI": "MI(A,F) + MI(B,F), bits, 256x256 joint histogram of rounded values",
    "SSIM": "mean of SSIM(A,F) and SSIM(B,F); Gaussian sigma 1.5, 11 taps per axis (3D window for volumes; 2D windows on each slice of a slab under 11 slices), "
    "K1 0.01, K2 0.03, L 255; SSIM_A, SSIM_B apart and SSIM_worst = the lower",
    "PSNR": "10 log10(255^2 / mean of MSE(A,F), MSE(B,F)); a perfect match is 100 dB",
    "VIF": "VIF(A,F) + VIF(B,F), pixel-domain VIFP, 4 scales, sigma_n^2 2",
    "Qabf": "Xydeas-Petrovic, 3x3 Sobel, zero padding, standard constants",
    "FMI": "fast FMI of raw pixels, 3x3 windows, mean of the two sources",
    "CC": "mean of corr(A,F), corr(B,F)",
    "SCD": "corr(F-B, A) + corr(F-A, B)",
    "EN/SD/SF/AG": "of F: entropy in bits (256 bins), population std, spatial frequency, average gradient "
    "(forward differences)",
    "volumes": "Qabf, VIF, FMI pooled over axial slices; the others over all voxels",
}
PAIR_RE = named_pattern("mri")
OTHERS = ("ct", "pet", "spect")
SMALL_IMAGE_VOXELS = 2**20  # --workers 0 scores images up to this size (2D slices) one per core at once
EXTENSIONS = PAIR_SUFFIXES


def metric_array(image: Image) -> np.ndarray:
    """An image as float64 0..255 greyscale, ``(rows, cols)`` or ``(slices, rows, cols)``."""
    data = np.array(luminance(image.data) if image.is_color else image.data, dtype=np.float64)  # a copy
    if not np.isfinite(data).all():  # before the window, which an all-NaN image has none of
        raise InvalidInputError(f"{image.provenance.source} has NaN/inf values; metrics are undefined")
    window = window_for(image)
    if (window.lo, window.hi) != (0.0, 255.0):
        span = window.hi - window.lo
        if span > 0:  # in place: no whole-volume temporaries
            data -= window.lo
            data /= span
            np.clip(data, 0, 1, out=data)
            data *= 255
        else:
            data[...] = 0
    return metric_layout(data, image.is_2d)


def metric_layout(data: np.ndarray, is_2d: bool) -> np.ndarray:
    """Stored ``(x, y[, z])`` order to the metrics' ``(rows, cols)`` / ``(slices, rows, cols)``."""
    data = np.asarray(data, dtype=np.float64)
    return data[:, :, 0].T if is_2d else data.transpose(2, 1, 0)


def _grid_key(image: Image) -> str:
    return "2D" if image.is_2d else "3D"


def on_fixed_grid(fixed: Image, other: Image, role: str) -> Image:
    """``other`` on FIXED's grid: as it is, or with its axes reordered or reversed when it holds FIXED's
    voxels in another order (a DICOM series read back in its slices' order, a reoriented NIfTI);
    otherwise a GeometryError (2D: one size)."""
    if fixed.is_2d != other.is_2d:
        raise GeometryError(f"{role} {other.provenance.source} is {_grid_key(other)}, FIXED is {_grid_key(fixed)}")
    if not fixed.is_2d and not np.allclose(fixed.affine, other.affine, atol=1e-3):
        from nibabel.orientations import (
            apply_orientation,
            inv_ornt_aff,
            io_orientation,
            ornt_transform,
        )

        order = ornt_transform(io_orientation(other.affine), io_orientation(fixed.affine))
        data = apply_orientation(other.data, order)
        affine = other.affine @ inv_ornt_aff(order, other.data.shape[:3])
        if data.shape[:3] == fixed.shape[:3] and np.allclose(affine, fixed.affine, atol=1e-3):
            return dataclasses.replace(other, data=np.ascontiguousarray(data), affine=fixed.affine.copy())
    if fixed.shape[:3] != other.shape[:3]:
        raise GeometryError(
            f"{role} {other.provenance.source} is {'x'.join(map(str, other.shape[:3]))}, FIXED is "
            f"{'x'.join(map(str, fixed.shape[:3]))}: not on one grid"
            + ("" if fixed.is_2d else " (resample it first: medfuse register FIXED IMAGE -o OUT)")
        )
    if not fixed.is_2d and not np.allclose(fixed.affine, other.affine, atol=1e-3):
        raise GeometryError(
            f"{role} {other.provenance.source} has the size of FIXED but another position/orientation: "
            "not on one grid (resample it first: medfuse register FIXED IMAGE -o OUT)"
        )
    return other


def score(fixed: Image, moving: Image, fused: Image, max_memory: str | None = None,
          workers: int = 1, threads: int = 1) -> dict[str, float]:
    """All metrics of ``fused`` against FIXED (A) and MOVING (B), which must share its grid; NaN in a
    source is background, as ``fuse`` takes it. ``threads`` metrics are computed at once.
    ``max_memory`` (``--max-memory``): fewer threads, or a refusal, when the metrics would need more,
    for each of ``workers`` pairs scored at once (``fuse`` plans its memory itself)."""
    moving = on_fixed_grid(fixed, moving, "MOVING")
    fused = on_fixed_grid(fixed, fused, "fused image")
    if max_memory is not None:
        from .memory import check_scoring

        threads = check_scoring(fixed.shape, max_memory, workers, threads)
    fixed, moving = nan_as_background(fixed, "FIXED"), nan_as_background(moving, "MOVING")
    return compute(metric_array(fixed), metric_array(moving), metric_array(fused), threads)


@dataclass
class Case:
    """One pair of sources and the fused image of each method (None when missing)."""

    id: str
    group: str
    fixed: Path
    moving: Path
    fused: dict[str, Path | None] = field(default_factory=dict)


def _find(folder: Path, stem: str, rglob: bool) -> Path | None:
    """``folder/ID.*`` (or one ``ID.*`` anywhere below with ``rglob``), else a folder ``folder/ID``: a
    fused volume written as a DICOM series (``fuse -o ID``, ``batch --dicom``)."""
    for ext in EXTENSIONS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    if rglob:
        hits = [p for ext in EXTENSIONS for p in folder.rglob(f"{stem}{ext}")]
        if len(hits) > 1:
            raise InvalidInputError(f"{folder}: several fused images named {stem}.*: {', '.join(map(str, hits[:3]))}")
        if hits:
            return hits[0]
    return folder / stem if (folder / stem).is_dir() else None


def _find_fused(fused_dir: Path, rel: Path, stem: str, unique: bool) -> Path | None:
    """``fused_dir/REL/ID.*`` (the layout of the pairs folder), else, when ID names one pair only,
    ``fused_dir/ID.*`` or a single ``ID.*`` anywhere below ``fused_dir``."""
    hit = _find(fused_dir / rel, stem, rglob=False) if rel != Path(".") else None
    if hit is None and unique:
        hit = _find(fused_dir, stem, rglob=True)
    return hit


def _split_ids(pairs: Path, split: str) -> set[tuple[str, str | None]]:
    table = pairs / "splits.csv"
    if not table.is_file():
        raise InputNotFoundError(f"{table} not found: the {split!r} split needs it (a CSV with columns pair_id, split)")
    from .tables import read_table

    rows = read_table(table, ("pair_id", "split"))
    ids = {(r["pair_id"], r.get("modality_pair") or None) for r in rows if r["split"] == split}
    if not ids:
        splits = sorted({r["split"] for r in rows})
        raise InvalidInputError(f"--split {split}: no such split in {table} (has {', '.join(splits)})")
    return ids


def method_names(folders: list[Path]) -> list[str]:
    """Names of the methods: folder names, made unique with their parents when needed."""
    names = [f.resolve().name for f in folders]
    if len(set(names)) < len(names):
        names = [f"{f.resolve().parent.name}/{f.resolve().name}" for f in folders]
    if len(set(names)) < len(names):
        names = [str(f) for f in folders]
    return names


def find_cases(pairs: Path, fused_dirs: list[Path], split: str | None = None,
               option: str = "--pairs") -> tuple[list[Case], list[str]]:
    """Pair ``ID_mri.*`` with ``ID_{ct,pet,spect}.*`` under ``pairs``; find ``ID.*`` in each fused folder
    (in the sub-folder matching the pair's, e.g. ``FUSED/mri-pet/ID.png``, or at the top when the ID
    is unique).

    Returns the cases and the names of the methods (one per fused folder). ``option`` names ``pairs``
    in errors (the command's own option).
    """
    if not pairs.is_dir():
        raise InputNotFoundError(f"{option} {pairs}: not a folder")
    for d in fused_dirs:
        if not d.is_dir():
            raise InputNotFoundError(f"--fused {d}: not a folder")
    keep = _split_ids(pairs, split) if split else None
    names = method_names(fused_dirs)
    cases: list[Case] = []
    unpaired: list[str] = []
    for mri in sorted(pairs.rglob("*_mri.*")):
        m = PAIR_RE.match(mri.name)
        if not m:
            continue
        found = partners(mri, m["id"], m["ext"], OTHERS)
        if len(found) != 1:
            unpaired.append(mri.name)
            continue
        group, other = found[0]
        if keep is not None and not ({(m["id"], f"mri-{group}"), (m["id"], None)} & keep):
            continue
        cases.append(Case(m["id"], f"mri-{group}", mri, other))
    counts = Counter(c.id for c in cases)
    for case in cases:
        rel = case.fixed.parent.relative_to(pairs)
        case.fused = {n: _find_fused(d, rel, case.id, counts[case.id] == 1) for n, d in zip(names, fused_dirs)}
    if unpaired:
        log.warning("%d MRI slices without exactly one CT/PET/SPECT partner: %s", len(unpaired), ", ".join(unpaired[:5]))
    if not cases:
        raise InputNotFoundError(f"{option} {pairs}: no ID_mri + ID_ct/pet/spect pairs found" + (f" in split {split}" if split else ""))
    return cases, names


def evaluate_cases(
    cases: list[Case], methods: list[str], read: Callable[[Path], Image], progress: Callable[[], None] | None = None,
    keep_going: bool = False, max_memory: str = "auto", workers: int = 0,
) -> list[dict[str, Any]]:
    """Score every (case, method); rows with ``id``, ``group``, ``method``, ``fused`` and metrics, in
    the order of ``cases`` then ``methods`` (``progress`` ticks once a row). A pair whose metrics would
    need more than ``max_memory`` is refused (exit 10). ``workers`` threads (the filters release the
    GIL): fused images scored at once (a case's sources read once and shared), each checked as if
    every worker scored one of its size; with fewer images than workers, the spare workers compute
    an image's metrics at once. ``workers=0``: images of at most :data:`SMALL_IMAGE_VOXELS` voxels
    (judged by the first case's FIXED; 2D slices) :func:`~medfuse_cli.parallel.cpu_threads` at once
    (as many as ``max_memory`` holds), larger ones one at a time, its metrics on that many threads
    (fewer if the memory is short).

    ``keep_going`` (folders of pairs): a case whose sources or fused image cannot be read or scored
    becomes a row whose ``error`` holds the one-line message, and the others are still scored;
    otherwise the first such error stops the run.
    """
    import threading

    def attempt(row: dict[str, Any], work: Callable[..., Any], *args: Any) -> Any:
        try:
            return work(*args)
        except MedfuseError as exc:
            if not keep_going:
                raise
            row["error"] = str(exc)
            return None

    tasks = [(i, method) for i, case in enumerate(cases) for method in methods]
    sources: dict[int, Any] = {}  # a case's (FIXED, MOVING), or the error reading them; until its last row
    rows_left = Counter(i for i, _ in tasks)
    case_locks = [threading.Lock() for _ in cases]
    lock = threading.Lock()

    def sources_of(i: int, row: dict[str, Any]) -> Any:
        with case_locks[i]:
            if i not in sources:
                pair = attempt(row, lambda c: (read(c.fixed), read(c.moving)), cases[i])
                sources[i] = row["error"] if pair is None else pair
            return sources[i]

    if not workers and len(tasks) > 1:  # small images: one per core at once (threads on one cost more than they save)
        first = sources_of(tasks[0][0], {})
        if not isinstance(first, str) and math.prod(first[0].shape) <= SMALL_IMAGE_VOXELS:
            from .memory import scoring_workers

            fit = cpu_threads() if max_memory is None else scoring_workers(first[0].shape, max_memory, cpu_threads())
            workers = fit if fit > 1 else 0  # as many as fit; else one at a time, as for large images
    at_once = max(1, min(workers, len(tasks)))  # no more images at once than there are images
    threads = max(1, workers // at_once) if workers else cpu_threads()  # the spare workers: one image's metrics

    def score_row(task: tuple[int, str]) -> dict[str, Any]:
        i, method = task
        case, path = cases[i], cases[i].fused.get(method)
        row: dict[str, Any] = {"id": case.id, "group": case.group, "method": method, "fused": str(path) if path else None}
        try:
            if path is None:
                row["error"] = "missing"
                return row
            pair = sources_of(i, row)
            if isinstance(pair, str):
                row["error"] = pair
                return row
            values = attempt(row, lambda f: score(*pair, read(f), max_memory, at_once, threads), path)
            if values is not None:
                row.update(values)
            return row
        finally:
            with lock:
                rows_left[i] -= 1
                if not rows_left[i]:
                    sources.pop(i, None)

    rows = thread_map(score_row, tasks, at_once, progress, name="medfuse-eval")
    missing = [r for r in rows if r.get("error") == "missing"]
    if missing:
        log.warning("%d fused images missing (e.g. %s for %s); their means leave them out",
                    len(missing), missing[0]["method"], missing[0]["id"])
    return rows


def failures(rows: list[dict[str, Any]]) -> str | None:
    """One line on the rows that could not be scored (a missing fused image is not a failure), or None."""
    failed = [r for r in rows if r.get("error") not in (None, "missing")]
    if not failed:
        return None
    first = failed[0]
    return (f"{len(failed)} of {len(rows)} fused images could not be scored (first: {first['method']} for "
            f"{first['group']} {first['id']}: {first['error']})")


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean of every metric per group and method: ``{group: {method: {"n": N, metric: mean}}}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if "error" in row:
            continue
        out.setdefault(row["group"], {}).setdefault(row["method"], []).append(row)  # type: ignore[arg-type]
    for methods in out.values():
        for method, items in methods.items():
            methods[method] = {"n": len(items), **{k: float(np.mean([r[k] for r in items])) for k in METRICS}}
    return out


def best_per_column(means: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """The method(s) with the highest value of each metric (at 4 significant digits)."""
    best: dict[str, set[str]] = {}
    for k in METRICS:
        vals = {m: float(f"{v[k]:.4g}") for m, v in means.items()}
        top = max(vals.values())
        best[k] = {m for m, v in vals.items() if v == top}
    return best


def to_json(rows: list[dict[str, Any]], means: dict) -> dict[str, Any]:
    return {"tool": "medfuse", "version": __version__, "conventions": CONVENTIONS, "means": means, "cases": rows}


def to_csv(rows: list[dict[str, Any]], means: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group", "id", "method", "fused", *METRICS, "error"])
    for r in rows:
        writer.writerow([r["group"], r["id"], r["method"], r["fused"] or "",
                         *(f"{r[k]:.6g}" if k in r else "" for k in METRICS), r.get("error", "")])
    for group, methods in means.items():
        for method, v in methods.items():
            writer.writerow([group, f"mean of {v['n']}", method, "", *(f"{v[k]:.6g}" for k in METRICS), ""])
    return buf.getvalue()


def single_pair_cases(fixed: Path, moving: Path, fused: Iterable[Path]) -> tuple[list[Case], list[str]]:
    """One pair with several fused images; methods are named by file name."""
    fused = list(fused)
    if not fused:
        raise InvalidInputError("give at least one FUSED image")
    names = []
    for f in fused:
        name = f.name
        for ext in EXTENSIONS:
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
                break
        names.append(name)
    if len(set(names)) < len(names):
        names = [str(f) for f in fused]
    case = Case(Path(os.fspath(fixed)).name, "pair", fixed, moving, dict(zip(names, fused)))
    return [case], names
