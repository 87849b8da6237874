"""Stacking positioned 2D slices into a regular volume (DICOM geometry, LPS+).

Slices are sorted along the normal of their planes. Regular stacks are stacked as they
are, the step between the first two slices defining the third axis (as dcm2niix does). A gantry tilt (slice origins shifted in-plane) or uneven spacing is resampled onto a
regular orthogonal grid: every output slice is the linear blend, along the normal, of the
two bracketing input slices, each shifted in-plane by bilinear interpolation. The output
lattice is aligned with the first slice's pixels, so that slice is kept exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import GeometryError, InvalidInputError
from .frames import FrameChoice

TILT_TOL_MM = 0.01  # in-plane shift of slice origins above which a stack counts as tilted
UNEVEN_TOL = 0.05  # max deviation from a regular grid, as a fraction of the slice spacing


@dataclass
class Slice:
    pixels: np.ndarray  # (rows, cols) as stored
    iop: np.ndarray  # 6 direction cosines, LPS
    ipp: np.ndarray  # position of the first pixel, LPS mm
    spacing: np.ndarray  # PixelSpacing: (between rows, between columns)
    slope: float = 1.0
    inter: float = 0.0
    order: tuple = ()  # sort key among frames at one position (time, instance)
    instance: int = 0  # InstanceNumber: only picks which end of the stack anchors the grid


@dataclass
class SliceStack:
    """Slices of one frame, sorted along the normal, all with one orientation and size."""

    slices: list[Slice]
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    positions: np.ndarray  # position of each slice along ``normal``
    frames_note: str | None = None  # what was taken from a 4D series (FrameChoice.note)

    @classmethod
    def from_slices(cls, slices: list[Slice], name: str, frames: FrameChoice) -> SliceStack:
        if not slices:
            raise InvalidInputError(f"{name}: no image slices")
        iop = slices[0].iop
        shape = slices[0].pixels.shape
        for s in slices:
            if s.pixels.shape != shape:
                raise InvalidInputError(f"{name}: slices of different sizes in one series ({shape} vs {s.pixels.shape})")
            if not np.allclose(s.iop, iop, atol=1e-4):
                raise InvalidInputError(f"{name}: slices with different orientations in one series")
            if not np.allclose(s.spacing, slices[0].spacing, atol=1e-4):
                raise InvalidInputError(f"{name}: slices with different pixel spacings in one series")
        row_dir = iop[:3] / np.linalg.norm(iop[:3])
        col_dir = iop[3:] / np.linalg.norm(iop[3:])
        if abs(float(row_dir @ col_dir)) > 1e-3:
            raise InvalidInputError(f"{name}: ImageOrientationPatient axes are not orthogonal")
        normal = np.cross(row_dir, col_dir)
        t = np.array([float(normal @ s.ipp) for s in slices])
        # Several slices at one position: frames of a 4D series (time, gates, echoes).
        keys = np.round(t, 2)
        uniq, counts = np.unique(keys, return_counts=True)
        if counts.max() > 1:
            _check_frames_coincide(slices, keys, normal, name)
            if counts.min() != counts.max():
                raise InvalidInputError(
                    f"{name}: positions hold different numbers of slices ({counts.min()}..{counts.max()}); "
                    "duplicate or missing files?"
                )
            index = frames.select(int(counts[0]), name)
            note = frames.note(index, int(counts[0]))
            chosen: list[Slice] = []
            for key in uniq:
                at = sorted((s for s, k in zip(slices, keys, strict=True) if k == key), key=lambda s: s.order)
                if index is None:
                    mean = np.mean([s.pixels * s.slope + s.inter for s in at], axis=0)
                    chosen.append(Slice(mean, at[0].iop, at[0].ipp, at[0].spacing, instance=at[0].instance))
                else:
                    chosen.append(at[index])
            slices = chosen
            t = np.array([float(normal @ s.ipp) for s in slices])
        else:
            note = None
        order = np.argsort(t, kind="stable")
        return cls([slices[i] for i in order], row_dir, col_dir, normal, t[order], note)


def _check_frames_coincide(slices: list[Slice], keys: np.ndarray, normal: np.ndarray, name: str) -> None:
    """Slices at one position along the normal are frames of a 4D series only if they lie at one point;
    slices that step across their own plane have positions and an orientation that disagree (a damaged
    or rewritten header), which no frame choice mends."""
    pixel = float(min(slices[0].spacing))
    for key in np.unique(keys):
        at = np.array([s.ipp for s, k in zip(slices, keys, strict=True) if k == key], float)
        spread = at.max(axis=0) - at.min(axis=0)
        if float(np.linalg.norm(spread)) > pixel:
            step = spread / np.linalg.norm(spread)
            raise InvalidInputError(
                f"{name}: the slices' positions step along ({', '.join(f'{v:.2f}' for v in step)}), within their own "
                f"plane (ImageOrientationPatient's normal is ({', '.join(f'{v:.2f}' for v in normal)})): "
                "positions and orientation disagree; a damaged or rewritten header?")


def _rescaled(stack: SliceStack) -> np.ndarray:
    """``(cols, rows, n)`` array of rescaled values; integer when every rescale is integral."""
    slopes = np.array([s.slope for s in stack.slices])
    inters = np.array([s.inter for s in stack.slices])
    integral = np.all(slopes == 1.0) and np.all(inters == np.round(inters)) and all(
        s.pixels.dtype.kind in "iu" for s in stack.slices
    )
    raw = np.stack([s.pixels.T for s in stack.slices], axis=2)
    if integral:
        vol = raw.astype(np.int64) + inters.astype(np.int64)[None, None, :]
        lo, hi = int(vol.min()), int(vol.max())
        for dt in (np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return vol.astype(dt)
        return vol
    vol = raw.astype(np.float64) * slopes[None, None, :] + inters[None, None, :]
    return vol.astype(np.float32)


def stack_slices(stack: SliceStack, name: str, thickness: float = 1.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Volume ``(cols, rows, n)``, its voxel-to-LPS affine, and notes on any resampling.

    ``thickness`` (mm) sets the third axis of a single-slice image.
    """
    first = stack.slices[0]
    d_col, d_row = float(first.spacing[1]), float(first.spacing[0])  # along row_dir, col_dir
    vol = _rescaled(stack)
    n = vol.shape[2]
    affine = np.eye(4)
    affine[:3, 0] = stack.row_dir * d_col
    affine[:3, 1] = stack.col_dir * d_row
    affine[:3, 3] = first.ipp
    if n == 1:
        affine[:3, 2] = stack.normal * thickness
        return vol, affine, []
    t = stack.positions
    gaps = np.diff(t)
    if np.any(gaps < 1e-3):
        raise InvalidInputError(f"{name}: two slices share one position; duplicate files?")
    offsets = np.array([[(s.ipp - first.ipp) @ stack.row_dir, (s.ipp - first.ipp) @ stack.col_dir] for s in stack.slices])
    # As dcm2niix: the acquisition's first slice (lowest InstanceNumber) and its neighbour
    # define the grid; with it at the far end, anchor there and count back.
    from_end = stack.slices[-1].instance < first.instance
    step = float(gaps[-1] if from_end else gaps[0])
    anchor = t[-1] - step * (n - 1) if from_end else t[0]
    deviation = float(np.max(np.abs(t - anchor - step * np.arange(n))))
    tilted = float(np.max(np.abs(offsets))) > TILT_TOL_MM
    uneven = deviation > UNEVEN_TOL * step
    if not tilted and not uneven:
        if from_end:
            step_vec = stack.slices[-1].ipp - stack.slices[-2].ipp
            affine[:3, 2] = step_vec
            affine[:3, 3] = stack.slices[-1].ipp - (n - 1) * step_vec
        else:
            affine[:3, 2] = stack.slices[1].ipp - first.ipp
        return vol, affine, []
    return _resample_regular(vol, stack, offsets, d_col, d_row, tilted, uneven)


def _missing_slices(gaps: np.ndarray) -> str:
    """``; N slice(s) missing ...?`` when every gap is the usual one or a whole multiple of it: files
    lost from a regular series look so, rather than a scan with uneven slices."""
    usual = float(np.median(gaps))
    if usual <= 0:
        return ""
    multiples = np.rint(gaps / usual)
    if multiples.max() < 2 or np.abs(gaps - multiples * usual).max() > 0.02 * usual:
        return ""
    return f"; the others are even: {int((multiples - 1).sum())} slice(s) missing from the series?"


def _resample_regular(
    vol: np.ndarray,
    stack: SliceStack,
    offsets: np.ndarray,
    d_col: float,
    d_row: float,
    tilted: bool,
    uneven: bool,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    t = stack.positions
    gaps = np.diff(t)
    typical = [g for g in gaps if g >= 0.5 * float(np.median(gaps))]
    extent = float(t[-1] - t[0])
    missing = _missing_slices(gaps)
    if missing:  # a regular series with files lost: its own grid, its slices kept as they are
        n_out = round(extent / float(np.median(gaps))) + 1
    else:
        n_out = math.ceil(extent / min(typical) - 1e-6) + 1
    step = extent / (n_out - 1)
    # output lattice aligned with the first slice's pixels
    a_min = math.floor(offsets[:, 0].min() / d_col + 1e-6) * d_col
    b_min = math.floor(offsets[:, 1].min() / d_row + 1e-6) * d_row
    nx = vol.shape[0] + math.ceil((offsets[:, 0].max() - a_min) / d_col - 1e-6)
    ny = vol.shape[1] + math.ceil((offsets[:, 1].max() - b_min) / d_row - 1e-6)
    if nx * ny * n_out > 2**31:
        raise GeometryError("tilt/spacing correction would need an absurdly large grid")
    fill = float(vol.min())
    src = vol.astype(np.float32)
    cache: dict[int, np.ndarray] = {}

    def shifted(k: int) -> np.ndarray:
        if k not in cache:
            shift = ((a_min - offsets[k, 0]) / d_col, (b_min - offsets[k, 1]) / d_row)
            cache[k] = ndimage.affine_transform(
                src[:, :, k], np.eye(2), offset=shift, output_shape=(nx, ny), order=1, mode="constant", cval=fill
            )
        return cache[k]

    out = np.empty((nx, ny, n_out), dtype=np.float32)
    for m in range(n_out):
        pos = t[0] + m * step
        k = min(int(np.searchsorted(t, pos, side="right")) - 1, len(t) - 2)
        w = float(np.clip((pos - t[k]) / (t[k + 1] - t[k]), 0.0, 1.0))
        out[:, :, m] = shifted(k) if w == 0.0 else (1 - w) * shifted(k) + w * shifted(k + 1)
        for old in [key for key in cache if key < k]:
            del cache[old]
    if vol.dtype.kind in "iu":
        out = np.rint(out).astype(vol.dtype)
    first = stack.slices[0]
    affine = np.eye(4)
    affine[:3, 0] = stack.row_dir * d_col
    affine[:3, 1] = stack.col_dir * d_row
    affine[:3, 2] = stack.normal * step
    affine[:3, 3] = first.ipp + a_min * stack.row_dir + b_min * stack.col_dir
    spacing = f"uneven slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm{missing})"
    what = " and ".join(w for w, on in (("gantry tilt", tilted), (spacing, uneven)) if on)
    note = (
        f"{what}: resampled {len(t)} slices onto a regular orthogonal grid of {n_out} slices, "
        f"{step:.3f} mm apart along the slice normal (as dcm2niix's tilt-corrected/equalised output)"
    )
    return out, affine, [note]
