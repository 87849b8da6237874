"""Typed errors; each maps to one documented exit code (see README, "Exit codes")."""

from __future__ import annotations


class MedfuseError(Exception):
    """Base class of every error medfuse reports to the user as one line."""

    exit_code: int = 1


class ChoiceRequiredError(MedfuseError):
    """The input is valid but ambiguous: an option must choose (``--series``, ``--frame``)."""

    exit_code = 2


class InputNotFoundError(MedfuseError):
    """An input path does not exist or cannot be read."""

    exit_code = 3


class InvalidInputError(MedfuseError):
    """The input holds no usable image: empty, not an image, corrupt or truncated."""

    exit_code = 4


class GeometryError(MedfuseError):
    """The image's shape or geometry cannot be used as asked (4D, 3D into PNG, ...)."""

    exit_code = 5


class OutputError(MedfuseError):
    """The output exists (and ``--overwrite`` was not given) or cannot be written."""

    exit_code = 6


class OutOfMemoryError(MedfuseError):
    """The work cannot fit in the memory it may use (``--max-memory``), or ran out of it."""

    exit_code = 10


def os_reason(exc: BaseException) -> str:
    """The operating system's reason for a failed read or write (``strerror``, e.g. "File too large"),
    also when a library re-raised it wrapped in its own message (pydicom adds a traceback's text)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error (please report it; rerun with --debug for a traceback)",
    2: "usage error, or an ambiguous input that needs a choice (--series, --frame / --mean-frames)",
    3: "input not found or not readable",
    4: "no usable image or option value: empty folder, not an image, corrupt or truncated file, "
    "unsupported encoding, infinite, all-NaN or constant image, unknown method/modality/window",
    5: "unusable geometry: 4D frame out of range, a volume written to a 2D format, bad affine, a sheared FIXED, "
    "a pair that does not overlap, a PNG/TIFF slice with a volume, a volume FIXED with a slice, rigid/affine asked for a "
    "slice placed in a volume, PNG/TIFF slices of different aspect ratios",
    6: "output exists (use --overwrite), is an input or another output of the command, cannot be written, lies inside an input folder or holds one, is "
    "a folder of other files than a medfuse DICOM series, or has a too long name; "
    "another batch is writing to the same folder",
    7: "batch finished but some cases failed or timed out (see summary.csv); eval --pairs scored the others "
    "but some images could not be scored",
    8: "model weights missing, or not matching the sha256 of their model card",
    10: "out of memory, or the fusion (or eval's scoring of a pair) would need more than --max-memory "
    "(checked before the heavy steps)",
    130: "interrupted (Ctrl-C)",
    143: "terminated (SIGTERM, e.g. a scheduler's time limit; cleaned up as for Ctrl-C)",
}
