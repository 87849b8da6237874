"""Sanity limits checked from headers before any voxel is allocated."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidInputError, OutOfMemoryError

MAX_VOXELS = 2**31  # 8 GiB of float32: far beyond any clinical volume
MAX_PIXELS_2D = 2**26  # a 8192 x 8192 slice: far beyond any radiological 2D image
MAX_PAGES = 2**16  # pages of a TIFF stack: far beyond any scan's slices
READ_BYTES_PER_VOXEL = 8  # the stored array and its float32 copy


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
