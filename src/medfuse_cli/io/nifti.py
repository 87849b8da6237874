"""NIfTI-1/2 reading and writing (nibabel), keeping the reference geometry exactly."""

from __future__ import annotations

import functools
import gzip
import logging
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from ..errors import GeometryError, InvalidInputError
from ..image import Image, Modality, NiftiGeometry, Provenance
from ..parallel import in_background
from .atomic import atomic_write_bytes
from .frames import FrameChoice
from .limits import (
    check_affine,
    check_components,
    check_voxel_count,
    colour_8bit,
    inflated_size,
    real_valued,
)

RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
RGBA32 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])  # read as colour, alpha dropped
# NIFTI_INTENT_VECTOR, _RGB_VECTOR, _RGBA_VECTOR: a 5D file of one time point whose 5th axis holds
# a voxel's components, as SimpleITK writes a vector image (an 8- or 16-bit RGB(A) one is colour)
VECTOR_INTENTS = (1007, 2003, 2004)
log = logging.getLogger(__name__)
FORMS_APART_MM = 0.1  # an sform and a qform further apart than this at a corner are warned of
SPATIAL_UNITS = {1: ("meter", 1000.0), 3: ("micron", 0.001)}  # xyzt_units codes; others (mm, unknown) are mm
_NATIVE_DTYPES = {np.dtype(t) for t in ("u1", "i1", "i2", "u2", "i4", "u4", "f4", "f8", "i8", "u8")}


def _geometry(header: nib.Nifti1Header, affine: np.ndarray) -> NiftiGeometry:
    return NiftiGeometry(
        sform=tuple(tuple(float(v) for v in row) for row in header.get_sform()[:3]),
        sform_code=int(header["sform_code"]),
        quatern=tuple(float(header[k]) for k in ("quatern_b", "quatern_c", "quatern_d")),  # type: ignore[arg-type]
        qoffset=tuple(float(header[k]) for k in ("qoffset_x", "qoffset_y", "qoffset_z")),  # type: ignore[arg-type]
        pixdim=tuple(float(v) for v in header["pixdim"]),
        qform_code=int(header["qform_code"]),
        affine=tuple(tuple(float(v) for v in row) for row in affine),
        units=_spatial_unit(header)[0],
    )


def _spatial_unit(header: nib.Nifti1Header) -> tuple[str, float]:
    """The header's spatial unit and millimetres per unit (ITK reads metres and microns this way
    too); an unknown or invalid code is mm."""
    return SPATIAL_UNITS.get(int(header["xyzt_units"]) & 0x07, ("mm", 1.0))


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _load_misnamed(path: Path) -> nib.Nifti1Image | nib.Nifti2Image | None:
    """A one-file NIfTI whose name does not say what it is: a ``.nii`` that is gzip-compressed, a
    ``.nii.gz`` that is not (a file inflated without being renamed), or one of another name that
    :func:`io.read_image` took for NIfTI by its content; read by its content as FSL and ITK (zlib's
    ``gzopen``) read it: nibabel goes by the name and refused all three. None for a file nibabel reads
    by its name (and for a pair). The image reads through the open file, which :func:`read_nifti` closes."""
    name = path.name.lower()
    gz = _is_gzip(path)
    if name.endswith((".hdr", ".img", ".hdr.gz", ".img.gz", ".nii.gz" if gz else ".nii")):
        return None
    opened = gzip.open(path) if gz else open(path, "rb")  # noqa: SIM115 - closed by read_nifti
    try:
        block = opened.read(540)
        opened.seek(0)
        kind = next((k for k in (nib.Nifti1Image, nib.Nifti2Image) if k.header_class.may_contain_header(block)), None)
        if kind is None:  # no NIfTI header: nibabel's refusal says why
            opened.close()
            return None
        log.info("%s: a %sNIfTI, read by its content", path.name, "gzip-compressed " if gz else "")
        return kind.from_stream(opened)
    except BaseException:
        opened.close()
        raise


def _load(path: Path) -> nib.Nifti1Pair | nib.Nifti2Pair:
    """A NIfTI image or pair; an Analyze 7.5 one converted to NIfTI-1 with its affine as sform."""
    try:
        img = _load_misnamed(path) or nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, EOFError, OSError, ValueError,
            OverflowError, zlib.error) as exc:
        raise InvalidInputError(f"{path.name}: not a readable NIfTI file ({exc})") from exc
    if isinstance(img, (nib.Nifti1Pair, nib.Nifti2Pair)):  # a .nii, or a NIfTI-1/2 .hdr/.img pair
        return img
    if not isinstance(img, nib.AnalyzeImage):
        raise InvalidInputError(f"{path.name}: not a NIfTI image ({type(img).__name__})")
    try:
        converted = nib.Nifti1Image.from_image(img)
        converted.header.set_sform(img.affine, code=2)  # so its outputs carry the grid it was read on
        converted.header.set_qform(img.affine, code=2)
    except (nib.spatialimages.HeaderDataError, ValueError, np.linalg.LinAlgError) as exc:  # zero voxel size, ...
        raise InvalidInputError(f"{path.name}: not a usable Analyze header ({exc})") from exc
    # Analyze 7.5 has no orientation field: nibabel (as SPM) takes the voxels as LAS around the
    # header's origin, unless SPM wrote the affine into a .mat file beside it
    if not (isinstance(img, nib.Spm99AnalyzeImage) and path.with_suffix(".mat").is_file()):
        log.warning("%s: an Analyze 7.5 header gives no orientation; voxels taken as %s (SPM's convention), so only "
                    "registration can place it", path.name, "".join(nib.aff2axcodes(img.affine)))
    return converted


def _check_size(path: Path, header: nib.Nifti1Header, shape: tuple[int, ...]) -> None:
    """Refuse an uncompressed file (the ``.img`` of a pair) shorter than its header claims, before
    reading any voxel."""
    if _is_gzip(path):
        return  # the decompressed size is only known by reading; a short stream fails while reading
    need = int(header.get_data_offset()) + int(np.prod(shape, dtype=object)) * header.get_data_dtype().itemsize
    have = path.stat().st_size
    if need > have:
        raise InvalidInputError(f"{path.name}: truncated: the header needs {need:,} bytes, the file has {have:,}")


def _warn_if_forms_differ(header, shape: tuple[int, ...], name: str) -> None:
    """Warn when the sform and qform both claim to place the image (codes > 0) but place it
    differently: medfuse (like nibabel and FSL) follows the sform, and a tool that reads the qform
    would show the image, and medfuse's output, elsewhere."""
    if int(header["sform_code"]) == 0 or int(header["qform_code"]) == 0:
        return
    try:
        qform = header.get_qform()
    except ValueError:  # nibabel: quaternion b, c, d longer than 1 (not a rotation)
        log.warning("%s: the header's qform is not a rotation (quaternion longer than 1); medfuse follows the "
                    "sform, but a tool that reads the qform cannot place the image", name)
        return
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]).T
    apart = _spatial_unit(header)[1] * float(np.max(np.linalg.norm((header.get_sform() - qform) @ corners, axis=0)))
    if apart > FORMS_APART_MM:
        log.warning("%s: the header's sform and qform place the image differently (up to %.1f mm apart at its "
                    "corners); medfuse follows the sform, as nibabel and FSL do, and copies both to its output: a "
                    "tool that reads the qform will show both elsewhere", name, apart)


def read_nifti(path: Path, frames: FrameChoice | None = None) -> Image:
    """Read a ``.nii`` / ``.nii.gz`` file or a ``.hdr`` / ``.img`` pair (NIfTI-1 or Analyze 7.5); the
    affine follows the header's sform/qform codes."""
    img = _load(path)
    try:
        return _image_of(img, path, frames or FrameChoice(offered=False))
    finally:
        for held in img.file_map.values():
            if held.fileobj is not None:  # a file read by its content
                held.fileobj.close()


def _image_of(img: nib.Nifti1Pair | nib.Nifti2Pair, path: Path, frames: FrameChoice) -> Image:
    header = img.header
    shape = tuple(int(s) for s in img.shape)
    check_voxel_count(shape, path.name)
    _check_size(path.with_suffix(".img") if path.suffix.lower() == ".hdr" else path, header, shape)  # a pair's voxels
    gzipped = {held for held in {Path(f.filename) for f in img.file_map.values() if f.filename} or {path}
               if _is_gzip(held)}
    rgb = header.get_data_dtype() in (RGB24, RGBA32)  # RGB24: as medfuse writes colour results
    complex_ = header.get_data_dtype().kind == "c"
    vector = len(shape) == 5 and shape[3] == 1 and shape[4] > 1 and int(header["intent_code"]) in VECTOR_INTENTS
    if vector:
        check_components(shape[4], header.get_data_dtype(), path.name)
        shape = (*shape[:3], 1)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise GeometryError(f"{path.name}: {len(shape)}D NIfTI images are not supported")
    if len(shape) < 2:
        raise GeometryError(f"{path.name}: a {len(shape)}D NIfTI is not an image")
    slope, inter = img.dataobj.slope, img.dataobj.inter
    scaled = not (slope in (None, 1.0) and inter in (None, 0.0)) and not (rgb or vector)  # colour is never scaled
    if rgb and len(shape) == 4 and shape[3] > 1:
        raise GeometryError(f"{path.name}: 4D RGB NIfTI images are not supported")
    steps = []
    # nibabel stops reading at the voxels' end, before gzip's checksum: the files are inflated to their
    # ends meanwhile, in helper threads (zlib frees the GIL), and damaged data refused
    checks = [in_background(functools.partial(inflated_size, held, held.name)) for held in gzipped]
    try:
        if len(shape) == 4 and shape[3] > 1:
            index = frames.select(shape[3], path.name)
            steps.append(frames.note(index, shape[3]))
            if index is None:
                voxels = real_valued(np.asanyarray(img.dataobj), path.name) if complex_ else img.get_fdata(dtype=np.float32)
                raw = voxels.mean(axis=3, dtype=np.float32)
            else:
                raw = img.dataobj[..., index]
        else:  # nibabel would apply scl_slope / scl_inter to colour too (and fail on RGB24 / RGBA32)
            raw = img.dataobj.get_unscaled() if rgb or vector else np.asanyarray(img.dataobj)
        data = np.asarray(raw)
    except (EOFError, OSError, ValueError, OverflowError, zlib.error, gzip.BadGzipFile) as exc:
        raise InvalidInputError(f"{path.name}: truncated or corrupt NIfTI data ({exc})") from exc
    for check in checks:
        check()
    if vector:  # (x, y, z, 1, RGB[A]): colour, alpha dropped as for PNG
        data = colour_8bit(np.ascontiguousarray(data[:, :, :, 0, :3]), path.name)
    else:
        data = data.reshape(data.shape[:3] if data.ndim >= 3 else data.shape + (1,) * (3 - data.ndim))
    if rgb:
        data = np.stack([data[c] for c in RGB24.names], axis=-1)
    data = real_valued(data, path.name)
    if data.dtype.byteorder not in ("=", "|"):
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype not in _NATIVE_DTYPES and data.dtype != np.float32:
        data = data.astype(np.float32)
    if scaled and data.dtype.kind in "iu":
        data = data.astype(np.float32)  # nibabel already applied the scaling to floats
    affine = img.affine
    if affine is None:
        raise GeometryError(f"{path.name}: no usable affine in the header")
    unit, to_mm = _spatial_unit(header)
    if to_mm != 1.0:  # nibabel gives the affine in the header's unit
        affine = np.diag([to_mm, to_mm, to_mm, 1.0]) @ affine
        log.info("%s: the header's unit is the %s: read in mm, written back in %ss", path.name, unit, unit)
    check_affine(affine, path.name)
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0 and data.shape[2] > 1:
        log.warning("%s: the header gives no position or orientation (sform and qform codes 0); voxels taken as "
                    "%s at %s mm around the centre, so only registration can place it", path.name,
                    "".join(nib.aff2axcodes(affine)), "x".join(f"{v:g}" for v in header.get_zooms()[:3]))
    _warn_if_forms_differ(header, data.shape[:3], path.name)
    return Image(
        data=data,
        affine=affine.astype(np.float64),
        modality=Modality.OT,
        units=None,
        provenance=Provenance(source=path.name, format="nifti", steps=steps),
        nifti_geometry=_geometry(header, affine),
    )


def _header_for(image: Image, dtype: np.dtype) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    geom = image.nifti_geometry
    if geom is not None and np.array_equal(np.asarray(geom.affine), image.affine):
        header["pixdim"] = np.asarray(geom.pixdim, dtype=np.float32)
        header["srow_x"], header["srow_y"], header["srow_z"] = (np.asarray(r, np.float32) for r in geom.sform)
        header["sform_code"] = geom.sform_code
        header["quatern_b"], header["quatern_c"], header["quatern_d"] = geom.quatern
        header["qoffset_x"], header["qoffset_y"], header["qoffset_z"] = geom.qoffset
        header["qform_code"] = geom.qform_code
        header.set_xyzt_units(geom.units, "sec")  # the raw fields above are in that unit
    else:
        code = 1 if geom is None else (geom.sform_code or geom.qform_code or 1)
        header.set_sform(image.affine, code=code)
        header.set_qform(image.affine, code=code)
        header.set_xyzt_units("mm", "sec")
    header["descrip"] = f"medfuse {__version__}".encode()
    return header


def nifti_bytes(image: Image, gz: bool) -> bytes:
    """Encode an image as a single-file NIfTI-1 (gzip-compressed when ``gz``)."""
    data = image.data
    if image.is_color:
        rgb = np.clip(np.rint(data), 0, 255).astype(np.uint8) if data.dtype != np.uint8 else data
        data = np.ascontiguousarray(rgb).view(RGB24)[..., 0]
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    elif data.dtype not in _NATIVE_DTYPES:
        data = data.astype(np.float32)
    header = _header_for(image, data.dtype)
    nimg = nib.Nifti1Image(data, None, header=header)
    # Nifti1Image(..., None, header) keeps the header's sform/qform as set above.
    nimg.header.set_data_shape(data.shape)
    raw = nimg.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


def write_nifti(image: Image, path: Path, overwrite: bool = False) -> None:
    """Write ``image`` to ``path`` (gzip when it ends in ``.gz``), atomically."""
    atomic_write_bytes(path, nifti_bytes(image, gz=path.name.lower().endswith(".gz")), overwrite)
