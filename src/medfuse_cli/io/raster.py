"""2D raster slices: PNG (Pillow) and TIFF (tifffile), greyscale or RGB, 8 or 16 bit; JPEG and BMP
are read too (Pillow), never written (medfuse writes lossless PNG or TIFF).

A raster pixel (column i, row j) is placed at RAS+ ``(-i, -j, 0)`` mm: 1 mm pixels in the
radiological display convention (image left = patient right, top = anterior), the same
voxel order a DICOM axial slice has. The array is stored as ``(width, height, 1[, 3])``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from ..errors import GeometryError, InvalidInputError
from ..image import Image, Modality, Provenance
from .atomic import atomic_write_bytes
from .limits import (
    MAX_PAGES,
    MAX_PIXELS_2D,
    check_voxel_count,
    colour_8bit,
    real_valued,
)

log = logging.getLogger(__name__)

RASTER_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
TIFF_SUFFIXES = (".tif", ".tiff")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, either byte order
READ_ONLY_SUFFIXES = (".jpg", ".jpeg", ".bmp")
MIN_GREY_LEVELS = 64  # float pixels within 0..255 spanning fewer are scaled to 0..255 for PNG, not rounded
RASTER_FORMATS = ("png", "tiff", "jpeg", "bmp")  # Provenance.format of a raster slice


def _from_pixels(pixels: np.ndarray, name: str, fmt: str) -> Image:
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4):
        pixels = pixels[:, :, : pixels.shape[2] - 1]  # drop alpha (grey + alpha, RGB + alpha)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        r, g, b = (pixels[..., c] for c in range(3))
        if np.array_equal(r, g) and np.array_equal(g, b):
            pixels = r  # greyscale stored as RGB
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise GeometryError(f"{name}: unsupported raster layout {pixels.shape}; expected greyscale or RGB")
    if pixels.ndim == 3:
        pixels = colour_8bit(pixels, name)
    pixels = real_valued(pixels, name)
    if pixels.dtype.kind not in "uif":
        pixels = pixels.astype(np.float32)
    data = np.ascontiguousarray(np.swapaxes(pixels, 0, 1)[:, :, None])
    return Image(data=data, affine=RASTER_AFFINE.copy(), modality=Modality.OT,
                 provenance=Provenance(source=name, format=fmt))


_MM_PER_UNIT = {"mm": 1.0, "millimeter": 1.0, "cm": 10.0, "centimeter": 10.0, "m": 1000.0, "meter": 1000.0,
                "inch": 25.4, "micron": 1e-3, "um": 1e-3, "\u00b5m": 1e-3,
                "\\u00b5m": 1e-3}  # ImageJ writes micrometres as the six characters \u00B5m


def _tiff_stack(tif, name: str) -> Image:
    """A multi-page greyscale TIFF (an ImageJ / Fiji stack) as a volume: pages are slices along +z,
    in-plane placed as a single slice is; voxel size from ImageJ's ``spacing`` and ``unit`` and the
    resolution tags, else 1 mm with a warning."""
    series = tif.series[0]
    if series.ndim != 3 or "S" in series.axes:
        raise GeometryError(f"{name}: only greyscale TIFF stacks of one channel and time point are read "
                            f"(axes {series.axes}, shape {series.shape})")
    check_voxel_count(series.shape, name)
    pixels = series.asarray()
    meta = tif.imagej_metadata or {}
    scale = _MM_PER_UNIT.get(str(meta.get("unit", "")).strip().lower())
    page = tif.pages[0]
    res = [page.tags.get(t) for t in ("XResolution", "YResolution")]
    if scale is None or any(r is None for r in res) or "spacing" not in meta:
        spacing = (1.0, 1.0, 1.0)
        log.warning("%s: no voxel size in the TIFF stack (ImageJ unit, spacing and resolution); 1 mm assumed", name)
    else:
        x, y = (scale * r.value[1] / r.value[0] for r in res)  # pixels per unit -> mm per pixel
        spacing = (x, y, scale * float(meta["spacing"]))
    if pixels.dtype.kind not in "uif":
        pixels = pixels.astype(np.float32)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    return Image(data=np.ascontiguousarray(pixels.transpose(2, 1, 0)), affine=affine, modality=Modality.OT,
                 provenance=Provenance(source=name, format="tiff"))


def _check_complete(tif, size: int, name: str) -> None:
    """Refuse a TIFF with an empty page, pixel data missing or running past the end of the file
    (``size`` bytes), or an ImageJ stack holding fewer images than its header announces: tifffile
    would give zeros for the missing pixels, or the first slice alone. Pages are visited by index:
    iterating a damaged file's pages (as its series do) can run on forever."""
    count = len(tif.pages)
    if count > MAX_PAGES:
        raise InvalidInputError(f"{name}: the TIFF claims {count:,} pages; refusing")
    for k in range(count):
        page = tif.pages[k]
        if not page.shape or page.dtype is None:
            raise InvalidInputError(f"{name}: damaged TIFF: page {k + 1} of {count} holds no image")
        counts, offsets = page.databytecounts, page.dataoffsets
        if not any(counts) or len(offsets) != len(counts):
            raise InvalidInputError(f"{name}: damaged TIFF: a page claims {'x'.join(map(str, page.shape))} pixels "
                                    "but holds no pixel data")
        if any(o + c > size for o, c in zip(offsets, counts, strict=True)):
            raise InvalidInputError(f"{name}: truncated TIFF: its pixel data runs past the end of the file")
        if page.compression == 1 and sum(counts) < page.size * page.bitspersample // 8:
            raise InvalidInputError(f"{name}: truncated or damaged TIFF: a page of {'x'.join(map(str, page.shape))} "
                                    f"pixels holds only {sum(counts)} bytes")
    announced = (tif.imagej_metadata or {}).get("images", 1)
    if isinstance(announced, int) and announced > count:  # ImageJ may keep one page for contiguous data
        shape = tif.series[0].shape
        held = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        if announced > held:
            raise InvalidInputError(f"{name}: truncated or damaged TIFF stack: its ImageJ header announces "
                                    f"{announced} images, the file holds {max(held, count)}")


def _is_tiff(path: Path) -> bool:
    """Whether the file is a TIFF by its first bytes, whatever its name (a PNG named .tif is read as PNG)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in TIFF_MAGIC
    except OSError:
        return path.suffix.lower() in TIFF_SUFFIXES  # the reader will say why it cannot be read


def is_stack(path: Path) -> bool:
    """True for a TIFF file of several slices (read as a volume); reads the header only."""
    if not _is_tiff(path):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            _check_complete(tif, path.stat().st_size, path.name)
            return _several_slices(tif)
    except (OSError, ValueError, IndexError, KeyError, InvalidInputError):  # unreadable: the fusion will say so
        return False


def _several_slices(tif) -> bool:
    return len(tif.pages) > 1 and len(tif.series[0].shape) > tif.pages[0].ndim


def read_raster(path: Path) -> Image:
    """Read a PNG, TIFF, JPEG or BMP slice, by its content (Pillow's formats, or TIFF by its first bytes)."""
    suffix = path.suffix.lower()
    if _is_tiff(path):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                check_voxel_count(page.shape, path.name, MAX_PIXELS_2D)
                _check_complete(tif, path.stat().st_size, path.name)
                if _several_slices(tif):
                    return _tiff_stack(tif, path.name)
                pixels = page.asarray()
                if "S" in page.axes:  # samples (colour channels) last, also when stored as planes
                    pixels = np.moveaxis(pixels, page.axes.index("S"), -1)
        except (GeometryError, InvalidInputError):
            raise
        except Exception as exc:
            raise InvalidInputError(f"{path.name}: not a readable TIFF ({exc})") from exc
        return _from_pixels(np.asarray(pixels), path.name, "tiff")
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(path) as im:
            check_voxel_count(im.size, path.name, MAX_PIXELS_2D)
            if im.mode == "P" or im.mode == "PA":
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            elif im.mode in ("LA", "La"):
                im = im.convert("L")
            elif im.mode == "I":
                pass
            elif im.mode not in ("L", "RGB", "RGBA", "I;16", "I;16B", "F", "1"):
                im = im.convert("RGB")
            pixels = np.asarray(im)
            fmt = {"JPEG": "jpeg", "BMP": "bmp"}.get(im.format or "", "png")
    except (UnidentifiedImageError, PILImage.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        kind = {"TIF": "TIFF", "JPG": "JPEG"}.get(suffix.lstrip(".").upper(), suffix.lstrip(".").upper())
        raise InvalidInputError(f"{path.name}: not a readable {kind} ({exc})") from exc
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if fmt == "jpeg":
        log.warning("%s is JPEG, which is lossy: its compression artefacts are fused and scored too", path.name)
    return _from_pixels(pixels, path.name, fmt)


def _to_storable(data: np.ndarray, name: str, allow_float: bool) -> np.ndarray:
    """Integer pixels for PNG (uint8 / uint16); TIFF also keeps float32."""
    if data.dtype in (np.uint8, np.uint16):
        return data
    if data.dtype.kind == "f" and allow_float:
        return data.astype(np.float32)
    finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    integral = data.dtype.kind in "iu" or bool(np.all(np.equal(np.mod(finite, 1), 0)))
    if integral and lo >= 0 and hi <= 255:
        return np.rint(np.nan_to_num(data, nan=0.0, posinf=hi, neginf=lo)).astype(np.uint8)
    if integral and lo >= 0 and hi <= 65535:
        return np.rint(np.nan_to_num(data, nan=0.0, posinf=hi, neginf=lo)).astype(np.uint16)
    fits = lo >= 0 and hi <= 255
    if data.dtype.kind == "f" and fits and hi - lo >= MIN_GREY_LEVELS:  # on the 8-bit scale: a fused 8-bit pair
        return np.rint(np.nan_to_num(data, nan=0.0, posinf=hi, neginf=lo)).astype(np.uint8)
    why = "span too few of 8-bit PNG's grey levels as they are" if fits else "do not fit 8-bit PNG"
    log.warning("%s: values %.4g..%.4g %s; scaled linearly to 0..255", name, lo, hi, why)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.rint((np.nan_to_num(data, nan=lo, posinf=hi, neginf=lo) - lo) * scale).clip(0, 255).astype(np.uint8)


def raster_bytes(image: Image, fmt: str) -> bytes:
    """Encode a single-slice image as PNG or TIFF bytes (:func:`..io.check_format_fits` refuses volumes)."""
    data = image.data[:, :, 0]
    pixels = np.ascontiguousarray(np.swapaxes(data, 0, 1))  # back to (rows, cols[, 3])
    if image.is_color:
        pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8) if pixels.dtype != np.uint8 else pixels
    else:
        pixels = _to_storable(pixels, image.provenance.source, allow_float=fmt == "tiff")
    buf = io.BytesIO()
    if fmt == "tiff":
        import tifffile

        tifffile.imwrite(buf, pixels, photometric="rgb" if image.is_color else "minisblack")
    else:
        from PIL import Image as PILImage

        PILImage.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_raster(image: Image, path: Path, overwrite: bool = False) -> None:
    fmt = "tiff" if path.suffix.lower() in TIFF_SUFFIXES else "png"
    atomic_write_bytes(path, raster_bytes(image, fmt), overwrite)
