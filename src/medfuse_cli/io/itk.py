"""NRRD and MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) through SimpleITK, as 3D Slicer and
ITK tools save volumes; and the one conversion between :class:`Image` (RAS+) and SimpleITK (LPS+)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import (
    GeometryError,
    InputNotFoundError,
    InvalidInputError,
    MedfuseError,
    OutputError,
    os_reason,
)
from ..image import Image, Modality, Provenance
from .atomic import atomic_write_bytes
from .limits import (
    check_affine,
    check_components,
    check_voxel_count,
    colour_8bit,
    inflated_size,
)

log = logging.getLogger(__name__)

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
ITK_OUTPUT_SUFFIXES = (".nrrd", ".mha")  # one file each (.nhdr / .mhd keep their voxels in a second file)
LPS = np.diag([-1.0, -1.0, 1.0])


def to_sitk(image: Image, channel: int | None = None):
    """A SimpleITK image (LPS) of a greyscale :class:`Image`, one of its colour channels, or (with
    ``channel`` -1) all three as a vector image."""
    import SimpleITK as sitk

    if channel == -1 and image.is_color:
        return sitk.Compose([sitk.Cast(to_sitk(image, c), sitk.sitkUInt8) for c in range(3)])
    data = image.data if channel is None else image.data[..., channel]
    if data.ndim != 3:
        raise GeometryError("SimpleITK takes a greyscale image, one colour channel or all three")
    direction = LPS @ image.direction
    if image.is_sheared:
        raise GeometryError(f"{image.provenance.source}: sheared affine; resample it to an orthogonal grid first")
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.float32))
    out.SetSpacing([float(s) for s in image.spacing])
    out.SetOrigin([float(v) for v in LPS @ np.asarray(image.origin)])
    out.SetDirection([float(v) for v in direction.ravel()])
    return out


def read_itk(path: Path) -> Image:
    """A 2D or 3D NRRD / MetaImage file (greyscale, or RGB as colour) as an :class:`Image`.

    ITK's readers run in a child process: fuzzing found damaged headers that crash them (a
    segmentation fault, or an exit from inside MetaIO), which no exception handler catches; the
    child's death becomes a one-line error here. It costs about 0.4 s per file."""
    _check_header(path)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), tmp], capture_output=True, text=True,
                              check=False)
        refusal = [line for line in proc.stderr.splitlines() if line.startswith(_REFUSAL)]
        if proc.returncode == _CHILD_REFUSED and refusal:  # a medfuse error, not ITK exiting with status 3
            code, _, message = refusal[-1][len(_REFUSAL):].partition(" ")
            raise _ERRORS.get(code, InvalidInputError)(message)
        if proc.returncode != 0 or not (Path(tmp) / "data.npy").is_file():
            raise InvalidInputError(f"{path.name}: damaged NRRD/MetaImage file (ITK's reader failed, exit status "
                                    f"{proc.returncode})")
        data = np.load(Path(tmp) / "data.npy")
        affine = np.load(Path(tmp) / "affine.npy")
    affine[:3] = np.diag(_header_geometry(path)) @ affine[:3]
    fmt = "nrrd" if path.name.lower().endswith((".nrrd", ".nhdr")) else "metaimage"
    return Image(data=data, affine=affine, modality=Modality.OT, provenance=Provenance(source=path.name, format=fmt))


_CHILD = "import sys; from medfuse_cli.io.itk import _child; _child(sys.argv[1], sys.argv[2])"
_CHILD_REFUSED = 3
_REFUSAL = "medfuse-refused: "
_ERRORS = {"3": InputNotFoundError, "4": InvalidInputError, "5": GeometryError}


def _child(path: str, out: str) -> None:
    """The child of :func:`read_itk`: the image as two .npy files in ``out``, or a medfuse error
    (marked, with its exit code and message) on stderr and exit status 3."""
    try:
        data, affine = _read_here(Path(path))
    except MedfuseError as exc:
        print(f"{_REFUSAL}{exc.exit_code} {exc}", file=sys.stderr)
        sys.exit(_CHILD_REFUSED)
    np.save(Path(out) / "data.npy", data)
    np.save(Path(out) / "affine.npy", affine)


def _read_here(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (x, y, z[, c]) and RAS affine of a 2D or 3D NRRD / MetaImage file, read by ITK in this
    process (see :func:`read_itk`)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    # by the suffix in any case: ITK's own choice knows only lower case (X.MHA was "unreadable")
    reader.SetImageIO("MetaImageIO" if path.suffix.lower() in (".mha", ".mhd") else "NrrdImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InvalidInputError(f"{path.name}: unreadable NRRD/MetaImage header ({_first_line(exc)})") from None
    size, dim, comps = list(reader.GetSize()), reader.GetDimension(), reader.GetNumberOfComponents()
    if dim not in (2, 3):
        raise GeometryError(f"{path.name}: {dim}D image; medfuse reads 2D slices and 3D volumes from NRRD/MetaImage")
    check_voxel_count(size, path.name)
    try:
        itk = reader.Execute()
    except RuntimeError as exc:
        reason = _first_line(exc)  # MetaIO's ends in a stale errno ("Reason: Success") and says the rest on stderr
        reason = "its voxels do not match the header" if reason.startswith("Reason:") else reason
        raise InvalidInputError(f"{path.name}: corrupt or truncated image data ({reason})") from None
    data = sitk.GetArrayFromImage(itk)  # (z, y, x[, c]) or (y, x[, c])
    if reader.GetImageIO() == "MetaImageIO":
        _check_compressed_metaimage(path, data.nbytes)
    check_components(comps, data.dtype, path.name)
    data = colour_8bit(data[..., :3], path.name) if comps > 1 else data  # RGBA: alpha dropped
    data = data[None] if dim == 2 else data
    data = np.moveaxis(data, (0, 1, 2), (2, 1, 0))
    spacing, origin = np.ones(3), np.zeros(3)
    direction = np.eye(3)
    spacing[:dim] = itk.GetSpacing()
    origin[:dim] = itk.GetOrigin()
    direction[:dim, :dim] = np.asarray(itk.GetDirection(), float).reshape(dim, dim)
    affine = np.eye(4)
    affine[:3, :3] = LPS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS @ origin
    if comps == 1:  # colour is 8-bit (colour_8bit)
        data = data.astype(np.float32)
    check_affine(affine, path.name)
    return data, affine


def _header(path: Path) -> tuple[list[tuple[str, str]], int | None]:
    """The ``key: value`` (NRRD) or ``Key = Value`` (MetaImage) fields of a header, keys in lower case
    without spaces, and where a MetaImage file's own voxels start (``ElementDataFile = LOCAL``)."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    nrrd = head.startswith(b"NRRD")
    local = None if nrrd else re.search(rb"ElementDataFile[ \t]*=[ \t]*LOCAL[ \t]*\r?\n", head, re.IGNORECASE)
    end = head.find(b"\n\n") if nrrd else local.end() if local else -1
    fields = []
    for line in head[: end if end >= 0 else len(head)].decode("latin-1").splitlines():
        key, sep, value = line.partition(":" if nrrd else "=")
        if sep:
            fields.append((key.strip().lower().replace(" ", ""), value.strip()))
    return fields, local.end() if local else None


MM_PER_UNIT = {"mm": 1.0, "millimeter": 1.0, "millimeters": 1.0, "cm": 10.0, "m": 1000.0, "meter": 1000.0,
               "meters": 1000.0, "um": 1e-3, "\u00b5m": 1e-3, "micron": 1e-3, "microns": 1e-3}


_UNKNOWN_READ_AS = {"spacings": ("spacings", "1 mm"), "spaceorigin": ("space origin", "0"),
                    "elementspacing": ("ElementSpacing", "1 mm"), "offset": ("Offset", "0"), "origin": ("Origin", "0"),
                    "position": ("Position", "0")}


def _header_geometry(path: Path) -> list[float]:
    """What ITK leaves out of a header's geometry: millimetres per unit of each world axis from an NRRD
    ``space units`` or a MetaImage ``DistanceUnits`` (ITK ignores them: a header in cm was read as
    mm, 10 times too small); 1 where unsaid, or unknown (warned). Spacings or an origin said to be
    unknown (``nan``, which the NRRD format allows), an axis said not to be spatial (``none``),
    which ITK reads as 1 mm and 0 without a word, and an NRRD space that names no patient
    directions, which ITK reads as LPS, are warned of too."""
    fields = _header(path)[0]
    units = next((re.findall(r'"([^"]*)"', value) for key, value in fields if key == "spaceunits"), [])
    units = units or next(([value] * 3 for key, value in fields if key == "distanceunits" and value != "?"), [])
    scale = [MM_PER_UNIT.get(unit.strip().lower(), 1.0) for unit in units[:3]] + [1.0] * (3 - len(units[:3]))
    for unit in dict.fromkeys(u.strip() for u in units[:3]):
        if unit and unit.lower() not in MM_PER_UNIT:
            log.warning("%s: space unit %r unknown; taken as mm", path.name, unit)
    if scale != [1.0, 1.0, 1.0]:
        log.info("%s: space units %s: read in mm", path.name, " ".join(units))
    values = dict(fields)
    space = values.get("space", "").strip().lower()
    volume = "sizes" in values and len([n for n in _numbers(values["sizes"]) if n > 1]) >= 3
    if space in _NOT_PATIENT_SPACES or (not space and volume):
        log.warning("%s: NRRD %s, which names no patient directions: its axes are read as LPS, as ITK and 3D Slicer "
                    "read them%s; check left and right", path.name, f"space {space!r}" if space else "without a space",
                    ", which mirrors a left-handed frame" if space == "3d-left-handed" else "")
    for key, value in fields:
        name, taken = _UNKNOWN_READ_AS.get(key, ("", ""))
        if taken and any(not np.isfinite(v) for v in _numbers(value)):
            log.warning("%s: unknown value in %s %r; read as %s", path.name, name, value[:60], taken)
        if key == "spacedirections" and "none" in value.lower().split():
            log.warning("%s: space directions %r: an axis that is not spatial, read as slices 1 mm apart", path.name,
                        value[:60])
    return scale


_NOT_PATIENT_SPACES = ("scanner-xyz", "3d-right-handed", "3d-left-handed")  # NRRD spaces ITK reads as LPS


def _numbers(text: str) -> list[float]:
    """The numbers of a header value (``2 2 nan``, NRRD's ``(2,0,0) (0,2,0)``); other words skipped."""
    out = []
    for token in re.sub(r"[(),]", " ", text).split():
        with contextlib.suppress(ValueError):
            out.append(float(token))
    return out


_GRID_FIELDS = {"elementspacing": "ElementSpacing", "elementsize": "ElementSize", "transformmatrix": "TransformMatrix",
                "rotation": "Rotation", "orientation": "Orientation", "spacedirections": "space directions"}


def _check_header(path: Path) -> None:
    """Before ITK reads: a header (``.nhdr``, ``.mhd``, or an ``.nrrd`` / ``.mha`` that points elsewhere)
    may name the file that holds its voxels; it must be one file beside the header, so that an
    untrusted header cannot make medfuse read (and write into its output) any other file on the
    machine. Voxel sizes and directions must be finite (ITK refused a ``nan`` in them with a bare
    "(0 0 0)", or read it as 0)."""
    for key, value in _header(path)[0]:
        if key in _GRID_FIELDS and not all(np.isfinite(_numbers(value))):
            raise GeometryError(f"{path.name}: {_GRID_FIELDS[key]} {value[:60]!r} is not finite: no usable grid")
        if key not in ("datafile", "elementdatafile") or value.upper() == "LOCAL":
            continue
        name = Path(value.split()[0]) if value else Path()
        if value.upper().startswith("LIST") or len(value.split()) > 1 or name.is_absolute() or name.name != value \
                or not _is_file(path.parent / name):
            raise InvalidInputError(f"{path.name}: its voxels must be in one file beside the header, not {value[:80]!r}")


def _check_compressed_metaimage(path: Path, nbytes: int) -> None:
    """ITK's MetaImage reader takes a damaged compressed payload without a word (garbage or zeros from
    where the stream breaks on): inflate it here and refuse it unless it is one whole zlib stream of
    ``nbytes`` bytes, as the header promises."""
    fields, start = _header(path)
    values = dict(fields)
    if values.get("compresseddata", "").lower() != "true" or "headersize" in values:
        return
    data = path if start is not None else path.parent / values.get("elementdatafile", "")
    total = inflated_size(data, path.name, start or 0, gzip=False)
    if total != nbytes:
        raise InvalidInputError(f"{path.name}: compressed image data of {total:,} bytes, not the {nbytes:,} of its header")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, or with a NUL byte
        return False


def write_itk(image: Image, path: Path, overwrite: bool = False) -> None:
    """Write ``image`` as one compressed ``.nrrd`` or ``.mha`` file, atomically. A write ITK cannot
    finish (a full disk) is an :class:`OutputError` with ITK's reason, and what ITK prints about it
    on the process's stderr is dropped (one line from medfuse instead)."""
    import SimpleITK as sitk

    itk = to_sitk(image, -1 if image.is_color else None)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
            tmp_file = Path(tmp) / ("image" + path.suffix.lower())
            try:
                with native_stderr_dropped():
                    sitk.WriteImage(itk, str(tmp_file), useCompression=True)
            except RuntimeError as exc:
                message = " ".join(str(exc).split())
                reason = re.search(r"Reason: (.+?)(?: \(|$)", message) or re.search(r".*: (.+)$", message)
                raise OutputError(f"cannot write {path}: {(reason[1] if reason else message)[:200]}") from None
            atomic_write_bytes(path, tmp_file.read_bytes(), overwrite)
    except OSError as exc:  # the temporary folder
        raise OutputError(f"cannot write {path}: {os_reason(exc)}") from exc


@contextlib.contextmanager
def native_stderr_dropped() -> Iterator[None]:
    """File descriptor 2 on the null device while the block runs (C++ libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(exc).__name__
