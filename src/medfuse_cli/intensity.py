"""Intensity normalisation per modality, colour (YCbCr) handling, and mapping back.

Normalisation maps an image to float32 in [0, 1] through a window ``(lo, hi)``:

- 8-bit raster slices (PNG/TIFF as in the Harvard pairs) are already display-windowed:
  ``(0, 255)``, i.e. divided by 255.
- CT with ``--ct-window``: ``brain`` (level 40, width 80 HU), ``bone`` (level 600, width 2800)
  or ``L,W``; the window is ``L - W/2 .. L + W/2``.
- Everything else (MR, CT without a window, PET, SPECT): the robust percentile window
  0.5th .. 99.5th percentile of the finite voxels.

Colour (RGB pseudo-colour PET/SPECT) is split into full-range BT.601 YCbCr; Y is fused, Cb/Cr
are reattached to the fused Y, so the output is colour.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError
from .image import Image, Modality
from .io.raster import RASTER_FORMATS

log = logging.getLogger(__name__)

CT_WINDOWS = {"brain": (40.0, 80.0), "bone": (600.0, 2800.0)}
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Window:
    lo: float
    hi: float
    rule: str

    def apply(self, data: np.ndarray) -> np.ndarray:
        scale = 1.0 / (self.hi - self.lo) if self.hi > self.lo else 0.0
        return np.clip((data.astype(np.float32) - self.lo) * scale, 0.0, 1.0).astype(np.float32)

    def invert(self, unit: np.ndarray) -> np.ndarray:
        return (unit.astype(np.float32) * (self.hi - self.lo) + self.lo).astype(np.float32)


def parse_ct_window(text: str | None) -> tuple[float, float] | None:
    """``brain`` / ``bone`` / ``"L,W"`` -> (level, width)."""
    if text is None:
        return None
    key = text.strip().lower()
    if key in CT_WINDOWS:
        return CT_WINDOWS[key]
    try:
        level, width = (float(v) for v in key.split(","))
    except ValueError:
        raise InvalidInputError(f"--ct-window {text!r}: use brain, bone or LEVEL,WIDTH (e.g. 40,80)") from None
    if width <= 0:
        raise InvalidInputError("--ct-window width must be positive")
    return level, width


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Full-range BT.601 luma Y of an RGB array (last axis), same scale as the input."""
    rgb = rgb.astype(np.float32)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def rgb_to_ycbcr(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-range BT.601 (JPEG) YCbCr of 0..255 RGB."""
    rgb = rgb.astype(np.float32)
    y = luminance(rgb)
    cb = 128.0 + (-0.168736 * rgb[..., 0] - 0.331264 * rgb[..., 1] + 0.5 * rgb[..., 2])
    cr = 128.0 + (0.5 * rgb[..., 0] - 0.418688 * rgb[..., 1] - 0.081312 * rgb[..., 2])
    return y, cb, cr


def ycbcr_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr`, rounded and clipped to uint8."""
    cb, cr = cb - 128.0, cr - 128.0
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    b = y + 1.772 * cb
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def check_colormap(name: str) -> None:
    """A colour map matplotlib knows (``hot``, ``inferno``, ``jet`` ...), or exit 4."""
    import matplotlib

    if name not in matplotlib.colormaps:
        raise InvalidInputError(f"unknown colour map {name!r}; try hot, inferno, magma, viridis or jet "
                                "(any name of matplotlib.colormaps)")


def colourised(image: Image, window: Window, name: str) -> Image:
    """A greyscale image as 0..255 RGB through a matplotlib colour map over ``window``, as PET and
    SPECT are shown (and as the Harvard pairs come)."""
    import matplotlib

    check_colormap(name)
    rgb = matplotlib.colormaps[name](window.apply(image.data))[..., :3] * 255.0
    return image.with_data(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def window_for(image: Image, ct_window: tuple[float, float] | None = None) -> Window:
    """The normalisation window of an image (see module docstring)."""
    data = luminance(image.data) if image.is_color else image.data
    if image.provenance.format in RASTER_FORMATS and data.dtype == np.uint8 or image.is_color:
        return Window(0.0, 255.0, "8-bit display range 0..255")
    if image.modality is Modality.CT and ct_window is not None:
        level, width = ct_window
        low = float(np.nanmin(data))
        if low > -500:
            log.warning("%s: lowest value %g, where air would be about -1000 HU: not in Hounsfield units? "
                        "The CT window L=%g W=%g may not fit", image.provenance.source, low, level, width)
        return Window(level - width / 2, level + width / 2, f"CT window L={level:g} W={width:g} HU")
    finite = data[np.isfinite(data)]
    lo, hi = (float(v) for v in np.percentile(finite, PERCENTILES))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    return Window(lo, hi, f"percentiles {PERCENTILES[0]}..{PERCENTILES[1]}")


def usable(image: Image, role: str) -> Image:
    """``image`` ready to fuse (:func:`nan_as_background`); a constant image is refused: nothing
    sensible can be fused."""
    image = nan_as_background(image, role)
    axes = (0, 1, 2) if image.is_color else None  # a colour image: each channel constant
    low, high = np.atleast_1d(np.min(image.data, axis=axes)), np.atleast_1d(np.max(image.data, axis=axes))
    if np.array_equal(low, high):
        value = ", ".join(f"{float(v):g}" for v in low)
        what = f"colour ({value})" if image.is_color else value
        raise InvalidInputError(f"{role} {image.provenance.source} is constant (every voxel is {what}); nothing to fuse")
    return image


def nan_as_background(image: Image, role: str) -> Image:
    """NaN voxels (SPM and others write NaN outside a mask) become the lowest finite value, with a
    warning; infinite voxels and an image without a finite voxel are refused."""
    data = image.data
    if data.dtype.kind != "f":
        return image
    finite = np.isfinite(data)
    if finite.all():
        return image
    src = image.provenance.source
    n_inf = int(np.count_nonzero(np.isinf(data)))
    if n_inf:
        raise InvalidInputError(f"{role} {src} has {n_inf} infinite voxels")
    if not finite.any():
        raise InvalidInputError(f"{role} {src} has no finite voxel (every voxel is NaN)")
    n_nan = data.size - int(np.count_nonzero(finite))
    low = float(data[finite].min())
    log.warning("%s %s: %d NaN voxels (%.1f%%) taken as background (%g)", role, src, n_nan, 100 * n_nan / data.size, low)
    steps = [*image.provenance.steps, f"{n_nan} NaN voxels set to the lowest finite value {low:g}"]
    return image.with_data(np.where(finite, data, np.asarray(low, data.dtype)),
                           provenance=dataclasses.replace(image.provenance, steps=steps))
