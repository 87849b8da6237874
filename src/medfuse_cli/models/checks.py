"""Checks of the network options that need no torch (so classic rules never import it)."""

from __future__ import annotations

import re

from ..errors import InvalidInputError

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else is a one-line error (exit 4)."""
    if not DEVICE_RE.match(name):
        raise InvalidInputError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")


def check_window(patch: int, overlap: float) -> None:
    """Sliding-window options: a side of at least 8 voxels, an overlap in [0, 1)."""
    if patch < 8:
        raise InvalidInputError(f"--patch {patch}: must be at least 8 voxels")
    if not 0 <= overlap < 1:
        raise InvalidInputError(f"--overlap {overlap}: must be at least 0 and below 1")
