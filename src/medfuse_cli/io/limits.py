"""Sanity limits checked from headers before any voxel is allocated."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidInputError

MAX_VOXELS = 2**31  # 8 GiB of float32: far beyond any clinical volume


def check_voxel_count(shape: Sequence[int], name: str) -> None:
    """Refuse headers that claim empty or absurd sizes."""
    if any(int(s) <= 0 for s in shape):
        raise InvalidInputError(f"{name}: the header claims an empty image (shape {tuple(shape)})")
    total = 1
    for s in shape:
        total *= int(s)
    if total > MAX_VOXELS:
        raise InvalidInputError(f"{name}: the header claims {total:,} voxels (shape {tuple(shape)}); refusing")
