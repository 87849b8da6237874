"""Sanity limits on what an input claims: sizes checked from its header before any voxel is
allocated; components and types (colour, complex) as they are read."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import GeometryError, InvalidInputError, OutOfMemoryError

log = logging.getLogger(__name__)

MAX_VOXELS = 2**31  # 8 GiB of float32: far beyond any clinical volume
MAX_PIXELS_2D = 2**26  # a 8192 x 8192 slice: far beyond any radiological 2D image
MAX_PAGES = 2**16  # pages of a TIFF stack: far beyond any scan's slices
READ_BYTES_PER_VOXEL = 8  # the stored array and its float32 copy


def check_affine(affine: np.ndarray, name: str) -> None:
    """Refuse a header's voxel-to-world matrix that is not finite or has (next to) no volume: a voxel
    size of 0 or 1e-9 mm, or collinear axes."""
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise GeometryError(f"{name}: invalid spacing, origin or direction (a voxel size of zero or not finite, "
                            "or collinear axes)")


def inflated_size(path: Path, name: str, start: int = 0, gzip: bool = True) -> int:
    """Inflate a gzip file (every member) or, with ``gzip`` False, a zlib stream from byte ``start``,
    discarding what comes out, and return its size: the streams' checksums, at their ends, are what
    tell damaged data from good, and a reader that stops once it has its voxels never reaches them."""
    inflate, total, pending = zlib.decompressobj(31 if gzip else 15), 0, b""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            while chunk := pending or fh.read(1 << 20):
                if inflate.eof:  # the next gzip member, or trailing bytes (ignored, as gzip does)
                    chunk += fh.read(1 << 20) if len(chunk) < 2 else b""
                    if not (gzip and chunk.startswith(b"\x1f\x8b")):
                        return total
                    inflate = zlib.decompressobj(31)
                total += len(inflate.decompress(chunk, 1 << 24))
                pending = inflate.unused_data if inflate.eof else inflate.unconsumed_tail
    except zlib.error as exc:
        raise InvalidInputError(f"{name}: corrupt compressed data ({exc})") from None
    if not inflate.eof:
        raise InvalidInputError(f"{name}: truncated compressed data (it ends after {total:,} bytes, mid-stream)")
    return total


def check_voxel_count(shape: Sequence[int], name: str, limit: int = MAX_VOXELS) -> None:
    """Refuse headers that claim empty or absurd sizes (more than ``limit`` voxels)."""
    if any(int(s) <= 0 for s in shape):
        raise InvalidInputError(f"{name}: the header claims an empty image (shape {tuple(shape)})")
    total = 1
    for s in shape:
        total *= int(s)
    if total > limit:
        raise InvalidInputError(f"{name}: the header claims {total:,} voxels (shape {tuple(shape)}); refusing")
    from ..memory import available

    need, free = total * READ_BYTES_PER_VOXEL, available()
    if need > free:
        raise OutOfMemoryError(f"{name}: reading {total:,} voxels needs about {need / 2**30:.1f} GiB; "
                               f"{free / 2**30:.1f} GiB are available")


def check_components(components: int, dtype: np.dtype, name: str) -> None:
    """One value per voxel (greyscale), or 3 / 4 8- or 16-bit ones (RGB / RGBA: colour, alpha dropped);
    anything else, such as a float vector field, is refused."""
    if components == 1 or (components in (3, 4) and np.dtype(dtype) in (np.uint8, np.uint16)):
        return
    raise InvalidInputError(f"{name}: {components} {np.dtype(dtype)} components per voxel (a vector field?); "
                            "medfuse reads greyscale, or 8- or 16-bit RGB(A) as colour")


def colour_8bit(rgb: np.ndarray, name: str, bits: int = 16) -> np.ndarray:
    """RGB voxels as 8-bit, which the colour path (YCbCr over 0..255) works on: 16-bit ones holding
    ``bits`` bits (DICOM's BitsStored) scaled from 0..2**bits-1, rounded; other types refused."""
    if rgb.dtype == np.uint8:
        return rgb
    if rgb.dtype != np.uint16:
        raise InvalidInputError(f"{name}: RGB of {rgb.dtype} channels; medfuse reads 8- or 16-bit RGB")
    top = 2 ** min(max(int(bits), 8), 16) - 1
    log.info("%s: %d-bit RGB read as 8-bit", name, bits)
    return np.round(np.minimum(rgb, top) * (255.0 / top)).astype(np.uint8)


def real_valued(data: np.ndarray, name: str) -> np.ndarray:
    """Complex voxels (some MR reconstructions) as their float32 magnitude, with a warning; others as they are."""
    if data.dtype.kind != "c":
        return data
    log.warning("%s: complex voxels; their magnitude is used", name)
    return np.abs(data).astype(np.float32)
