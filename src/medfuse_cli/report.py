"""JSON run reports and a figure a person can read at a glance (matplotlib, headless; PNG, PDF, SVG or JPEG)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError
from .image import Image
from .intensity import luminance
from .io.atomic import atomic_write_bytes

FIGURE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpeg", ".jpeg": "jpeg"}  # suffix -> matplotlib's
_FIGURE_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}  # no dates: same inputs, same bytes


def write_report(report: dict[str, Any], path: Path, overwrite: bool = False) -> None:
    payload = json.dumps(report, indent=2, default=_jsonable).encode() + b"\n"
    atomic_write_bytes(path, payload, overwrite)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _canonical(image: Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The voxel array flipped/permuted to the nearest RAS+ axes (for display only), and the voxel
    spacing along those axes."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(image.affine)
    spacing = [1.0, 1.0, 1.0]
    for axis, (to, _) in enumerate(ornt):
        spacing[int(to)] = float(image.spacing[axis])
    return nib.orientations.apply_orientation(image.data, ornt), (spacing[0], spacing[1], spacing[2])


def _aspect(spacing: tuple[float, ...], sel: tuple) -> float:
    """imshow's aspect (pixel height / width) of a slice ``sel`` shown by :func:`_show`: its
    columns run along the first kept axis, its rows along the second."""
    kept = [spacing[i] for i, s in enumerate(sel) if s != "mid" and not isinstance(s, int)]
    return kept[1] / kept[0] if len(kept) == 2 and kept[0] > 0 else 1.0


def _planes(image: Image) -> list[tuple[str, Any, bool]]:
    """(name, selector on the RAS array, flip rows) for the middle slice of each plane."""
    if image.is_2d:
        return [("slice", (slice(None), slice(None), 0), False)]
    return [
        ("axial", (slice(None), slice(None), "mid"), True),
        ("coronal", (slice(None), "mid", slice(None)), True),
        ("sagittal", ("mid", slice(None), slice(None)), True),
    ]


def _take(array: np.ndarray, sel: tuple) -> np.ndarray:
    return array[tuple(array.shape[i] // 2 if s == "mid" else s for i, s in enumerate(sel))]


def _show(data: np.ndarray, flip: bool = False) -> np.ndarray:
    """2D (i, j[, 3]) array -> display array (rows, cols[, 3]) scaled to 0..1."""
    shown = np.swapaxes(data, 0, 1).astype(np.float32)
    if flip:
        shown = shown[::-1]
    if shown.ndim == 3:
        return np.clip(shown / 255.0, 0, 1)
    finite = shown[np.isfinite(shown)]
    lo, hi = np.percentile(finite, (0.5, 99.5)) if finite.size else (0.0, 1.0)
    return np.clip((shown - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


def figure_format(path: Path) -> str:
    """The figure format ``path``'s suffix names; refused (exit 6) when it names none."""
    fmt = FIGURE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"figure {path.name}: use .png, .pdf, .svg or .jpg")
    return fmt


def write_figure(fixed: Image, moved: Image, fused: Image, path: Path, overwrite: bool = False) -> None:
    """MRI, other modality (on the MRI grid), fused and an overlay, one row per plane, in the format of
    ``path``'s suffix."""
    fmt = figure_format(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    planes = _planes(fixed)
    if fixed.is_2d:
        arrays, spacing = [fixed.data, moved.data, fused.data], fixed.spacing
    else:
        canonical = [_canonical(im) for im in (fixed, moved, fused)]
        arrays, spacing = [c[0] for c in canonical], canonical[0][1]
    fig, axes = plt.subplots(len(planes), 4, figsize=(12, 3.2 * len(planes)), squeeze=False)
    titles = (
        f"FIXED {fixed.modality.value}",
        f"MOVING {moved.modality.value} (registered)",
        "fused",
        "overlay",
    )
    for row, (name, sel, flip) in enumerate(planes):
        aspect = _aspect(spacing, sel)  # physical proportions, e.g. 5 mm slices against 0.4 mm pixels
        f_slice, m_slice, u_slice = (_take(a, sel) for a in arrays)
        f_img, m_img, u_img = (_show(a, flip) for a in (f_slice, m_slice, u_slice))
        m_grey = _show(luminance(m_slice), flip) if moved.is_color else m_img
        panels = [f_img, m_img, u_img, None]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            if panel is None:
                ax.imshow(f_img, cmap="gray", interpolation="nearest", aspect=aspect)
                ax.imshow(np.ma.masked_less(m_grey, 0.15), cmap="hot", alpha=0.45, interpolation="nearest",
                          aspect=aspect)
            else:
                ax.imshow(panel, cmap=None if panel.ndim == 3 else "gray", interpolation="nearest", aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=10)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "medfuse"}):  # SVG ids from a fixed salt, not a random one
        fig.savefig(buf, format=fmt, dpi=90, metadata=_FIGURE_METADATA.get(fmt))
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), overwrite)
