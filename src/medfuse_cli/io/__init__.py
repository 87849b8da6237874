"""Reading and writing images: the only package that touches image files."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import GeometryError, InputNotFoundError, InvalidInputError, OutputError
from ..image import Image, Modality
from .atomic import check_name_and_place, check_writable
from .frames import FrameChoice
from .itk import ITK_OUTPUT_SUFFIXES, ITK_SUFFIXES, read_itk, write_itk
from .raster import READ_ONLY_SUFFIXES

__all__ = ["FrameChoice", "check_format_fits", "check_output", "guess_modality", "output_format", "read_image", "read_modality",
           "write_image"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ANALYZE_SUFFIXES = (".hdr", ".img")  # NIfTI-1 pairs and Analyze 7.5 (SPM's older format): read only
RASTER_SUFFIXES = (".png", ".tif", ".tiff")  # written; JPEG and BMP are read too
RASTER_READ_SUFFIXES = (*RASTER_SUFFIXES, *READ_ONLY_SUFFIXES)
# the images of a pairs folder, each named by one file (an Analyze / NIfTI pair by its .hdr)
PAIR_SUFFIXES = (".nii.gz", ".nii", ".hdr", *RASTER_READ_SUFFIXES, *ITK_OUTPUT_SUFFIXES)


def named_pattern(tag: str) -> re.Pattern[str]:
    """``ID_TAG.EXT`` for the one-file image suffixes (``ID_mri.png``, ``CASE_0000.nii.gz``): groups
    ``id`` and ``ext`` (with its dot); ``tag`` is a regular expression."""
    exts = "|".join(re.escape(e) for e in sorted(PAIR_SUFFIXES, key=len, reverse=True))
    return re.compile(rf"^(?P<id>.+)_{tag}(?P<ext>{exts})$", re.IGNORECASE)


def partners(mri: Path, ident: str, ext: str, tags: Sequence[str] = ("ct", "pet", "spect")) -> list[tuple[str, Path]]:
    """The files ``ID_TAG`` beside ``mri`` (``ID_mri.EXT``) for each of ``tags``, with any one-file image
    suffix, ``ext`` first: ``001_mri.png`` pairs with ``001_pet.tif``, ``001_mri.nii.gz`` with ``001_ct.nii``."""
    found: list[tuple[str, Path]] = []
    seen: set[tuple[int, int]] = set()  # one file found under two spellings of its suffix (a case-blind disk)
    for tag in tags:
        for suffix in dict.fromkeys((ext, *PAIR_SUFFIXES)):
            path = mri.with_name(f"{ident}_{tag}{suffix}")
            try:
                stat = path.stat() if path.is_file() else None
            except OSError:
                stat = None
            if stat is None or (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            found.append((tag, path))
    return found


_MODALITY_WORDS = {
    Modality.MR: ("mri", "mr", "t1", "t1w", "t1c", "t1ce", "t1gd", "t2", "t2w", "pd", "flair", "epi", "adc", "dwi"),
    Modality.CT: ("ct", "transm"),
    Modality.PT: ("pet", "pt", "fdg"),
    Modality.NM: ("spect", "nm"),
}


def guess_modality(name: str) -> Modality:
    """Modality named in a file name (``00123_pet.png``, ``OldNorm_T1.nii.gz``), else ``OT``.

    >>> guess_modality("02004_spect.png")
    <Modality.NM: 'NM'>
    """
    tokens = set(re.split(r"[^a-z0-9]+", name.lower()))
    found = {m for m, words in _MODALITY_WORDS.items() if tokens & set(words)}
    return found.pop() if len(found) == 1 else Modality.OT


def read_modality(path: str | os.PathLike[str]) -> Modality:
    """An input's modality as :func:`read_image` gives it, without reading its pixels: a DICOM
    input's from its headers, else (or when they say nothing known) the one its name says."""
    path = Path(path)
    if _kind(path) == "dicom":
        from .dicom import chosen_series

        try:
            modality = Modality.parse(chosen_series(path).modality)
        except ValueError:
            modality = Modality.OT
        if modality is not Modality.OT:
            return modality
    return guess_modality(path.name)


def _kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES + ANALYZE_SUFFIXES):
        return "nifti"
    if name.endswith(RASTER_READ_SUFFIXES):
        return "raster"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(".zip"):
        return "dicom"
    with open(path, "rb") as fh:
        head = fh.read(352)
    if head[128:132] == b"DICM" or name.endswith((".dcm", ".ima")):
        return "dicom"
    if head[344:348] in (b"n+1\0", b"n+2\0") or head[4:8] == b"n+2\0":
        return "nifti"
    if head[:2] == b"\x1f\x8b":
        return "nifti"
    raise InvalidInputError(
        f"{path.name}: not a recognised image (expected NIfTI (.nii, .nii.gz, .hdr/.img), NRRD, MetaImage, a DICOM folder/zip/file, PNG, TIFF, JPEG or BMP)"
    )


def read_image(
    path: str | os.PathLike[str],
    series: str | None = None,
    frames: FrameChoice | None = None,
    suv: bool = False,
) -> Image:
    """Read any supported input into an :class:`~medfuse_cli.image.Image` (RAS+ affine).

    Parameters
    ----------
    path
        A NIfTI file, a DICOM folder (searched recursively), zip or file, or a PNG/TIFF slice.
    series
        For DICOM inputs with several series: SeriesInstanceUID, SeriesNumber or description.
    frames
        Which frame of a 4D input to take (required for 4D inputs).
    suv
        Convert PET in Bq/ml to body-weight SUV (DICOM only; needs the dose and weight).
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file or folder")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise InputNotFoundError(f"{path}: permission denied")
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        raise InvalidInputError(f"{path.name}: the folder is empty")
    if path.is_file() and path.stat().st_size == 0:
        raise InvalidInputError(f"{path.name}: the file is empty")
    kind = _kind(path)
    if suv and kind != "dicom":
        raise InvalidInputError(f"{path.name}: --suv needs a DICOM PET series (it reads dose and weight)")
    if series is not None and kind != "dicom":
        raise InvalidInputError(f"{path.name}: --series applies to DICOM inputs only")
    if kind == "dicom":
        from .dicom import read_dicom

        image = read_dicom(path, series=series, frames=frames, suv=suv)
    elif kind == "nifti":
        from .nifti import read_nifti

        image = read_nifti(path, frames=frames)
    elif kind == "itk":
        image = read_itk(path)
    else:
        from .raster import read_raster

        image = read_raster(path)
    if image.modality is Modality.OT:
        image.modality = guess_modality(path.name)
    return image


def output_format(path: str | os.PathLike[str]) -> str:
    """``nifti``, ``raster``, ``itk`` (NRRD / MetaImage) or ``dicom`` (a path without an extension, or an existing folder: a
    DICOM series folder)."""
    if os.fspath(path) == "-":
        raise OutputError("-: an image cannot go to standard output; give a file (.nii.gz, .png, ...) or a folder (DICOM)")
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(RASTER_SUFFIXES):
        return "raster"
    if name.endswith(ITK_OUTPUT_SUFFIXES):
        return "itk"
    if path.is_dir() or not path.suffix:
        return "dicom"
    read_only = [s for s in (*READ_ONLY_SUFFIXES, *ANALYZE_SUFFIXES, *ITK_SUFFIXES) if name.endswith(s)]
    what = f"{read_only[0]} is read, never written" if read_only else "unknown output format"
    raise OutputError(f"{path.name}: {what}; use .nii.gz, .nii, .nrrd, .mha, .png, .tif, .tiff or a folder (DICOM)")


def check_output(path: str | os.PathLike[str], overwrite: bool = False,
                 inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Fail before any work when ``path`` has an unknown format, exists, cannot be written, or is
    inside one of the folders of ``inputs``."""
    path = Path(path)
    if output_format(path) == "dicom":
        check_name_and_place(path, inputs)
        if path.exists() and not path.is_dir():
            raise OutputError(f"output {path} is a file; a DICOM series needs a folder")
        if path.exists() and not overwrite:
            raise OutputError(f"output {path} exists; use --overwrite to replace it")
        from .dicom_write import check_replaceable

        check_replaceable(path)
        parent = path.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise OutputError(f"cannot write to {parent} (permission denied)")
        return
    check_writable(path, overwrite, inputs)


def check_format_fits(path: str | os.PathLike[str], grid: Image) -> None:
    """Whether the output's format can hold a result on FIXED's (the input's) ``grid``, checked before
    the work: a volume as PNG / TIFF is a one-line error (exit 5); so is a DICOM series on a PNG / TIFF /
    JPEG / BMP slice's grid, which has no place in space (exit 6); a NIfTI or DICOM slice's result is a
    series of one image. (By the grid's source, not the written image's: ``register`` writes MOVING, a
    PNG, say, on a NIfTI slice's grid.)"""
    from .raster import RASTER_FORMATS

    fmt = output_format(path)
    if fmt == "raster" and not grid.is_2d:
        x, y, z = grid.shape[:3]
        kind = "PNG" if Path(path).name.lower().endswith(".png") else "TIFF"
        raise GeometryError(f"a {x}x{y}x{z} volume cannot be written as {kind}; write NIfTI (.nii.gz) instead")
    if fmt == "dicom" and grid.provenance.format in RASTER_FORMATS:
        raise OutputError(f"{Path(path).name}: a DICOM series needs a place in space, which a "
                          f"{grid.provenance.format.upper()} slice has not; write the result as .png, .tif or .nii.gz")


def write_image(image: Image, path: str | os.PathLike[str], overwrite: bool = False, dicom=None) -> None:
    """Write ``image`` atomically; the format follows the path (see :func:`output_format`).
    ``dicom`` is the :class:`~medfuse_cli.io.dicom_write.DicomContext` of a DICOM series."""
    path = Path(path)
    fmt = output_format(path)
    if fmt == "raster":
        check_format_fits(path, image)  # a volume cannot be a PNG / TIFF
    if fmt == "dicom":
        from .dicom_write import DicomContext, write_dicom_series

        write_dicom_series(image, path, dicom or DicomContext(), overwrite)
    elif fmt == "nifti":
        from .nifti import write_nifti

        write_nifti(image, path, overwrite)
    elif fmt == "itk":
        write_itk(image, path, overwrite)
    else:
        from .raster import write_raster

        write_raster(image, path, overwrite)
