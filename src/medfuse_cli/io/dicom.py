"""DICOM series reading (pydicom): a folder searched recursively, a zip, or one file.

Slices are grouped by SeriesInstanceUID, sorted by their position along the slice normal
(never by InstanceNumber), rescaled slice by slice, and stacked. A gantry tilt or uneven
slice spacing is resampled onto a regular orthogonal grid (as dcm2niix's tilt-corrected,
equalised output) with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import reprlib
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut

from ..errors import ChoiceRequiredError, InvalidInputError
from ..image import Image, Modality, Provenance
from .frames import FrameChoice
from .limits import check_voxel_count, colour_8bit
from .stack import Slice, SliceStack, stack_slices

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NON_IMAGE_SOP = {
    "1.2.840.10008.1.3.10",  # Media Storage Directory (DICOMDIR)
}


@dataclass
class _Entry:
    """One DICOM file: where to find it and its header (pixels not yet read)."""

    name: str
    header: Dataset
    opener: object = field(repr=False)  # callable returning a binary file object


@dataclass
class SeriesInfo:
    """A series found in a DICOM input, as listed to the user (no patient identifiers)."""

    uid: str
    number: int | None
    description: str
    modality: str
    n_files: int
    localizer: bool = False  # ImageType says LOCALIZER (a scout), never a series to fuse

    def label(self) -> str:
        num = "-" if self.number is None else str(self.number)
        return f"#{num} {self.modality} '{self.description}' ({self.n_files} files) {self.uid}"


def _iter_sources(path: Path) -> Iterator[tuple[str, object]]:
    """Yield ``(name, opener)`` for every candidate file under a folder, in a zip, or a file."""
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            yield str(f.relative_to(path)), (lambda f=f: open(f, "rb"))  # noqa: SIM115 - the caller closes it
    elif zipfile.is_zipfile(path):
        try:
            zf = zipfile.ZipFile(path)
            members = [m for m in zf.infolist() if not m.is_dir()]
        except (zipfile.BadZipFile, OSError) as exc:
            raise InvalidInputError(f"{path.name}: unreadable zip ({exc})") from exc
        for m in sorted(members, key=lambda m: m.filename):
            yield m.filename, (lambda m=m: io.BytesIO(zf.read(m)))
    else:
        yield path.name, (lambda: open(path, "rb"))  # noqa: SIM115 - the caller closes it


WHOLE_NUMBERS = ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored",
                 "InstanceNumber", "SeriesNumber")  # read with int()


def _parse_all(ds: Dataset) -> None:
    """Convert every element now (pydicom parses values lazily), so a damaged value fails here,
    inside the reader's error handling, not later at first use."""
    ds.walk(lambda _ds, _elem: None)
    for key in WHOLE_NUMBERS:
        value = ds.get(key)
        if value is not None and value != "" and not isinstance(value, int):
            raise ValueError(f"{key} is {reprlib.repr(value)}, not one whole number")


def _read_header(name: str, opener: object) -> Dataset | None:
    """The header of a DICOM file, or ``None`` when it is not DICOM."""
    try:
        with opener() as fh:  # type: ignore[operator]
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
        _parse_all(ds)
    except InvalidDicomError:
        return None  # not DICOM (no DICM preamble): a README, a thumbnail... ignored
    except zipfile.BadZipFile as exc:  # a member whose CRC fails was taken for "not DICOM", and its slice lost
        raise InvalidInputError(f"{name}: damaged file in the zip ({str(exc).split(' for file ')[0]})") from exc
    except Exception as exc:  # pydicom raises many types on damaged headers
        raise InvalidInputError(f"{name}: damaged DICOM file ({exc})") from exc
    sop = str(ds.get("SOPClassUID", ""))
    if "Rows" not in ds and "Image Storage" in pydicom.uid.UID(sop).name:
        # pydicom stops quietly at the end of a short file: never drop a slice from a series silently
        raise InvalidInputError(f"{name}: truncated DICOM image (the file ends before its pixel data)")
    return ds


def _is_image(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) not in _NON_IMAGE_SOP and "Rows" in ds and "SeriesInstanceUID" in ds


_SCANS: OrderedDict[tuple, list[_Entry]] = OrderedDict()  # the latest scans (FIXED's and MOVING's)
SCANS_KEPT = 2


def _scan_key(path: Path) -> tuple:
    """What a scan of ``path`` depends on: its files' names, sizes and modification times."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return (str(path.resolve()), *((str(f), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]))


def scan(path: Path) -> list[_Entry]:
    """All image DICOM files under ``path`` (headers only); non-image files are skipped. A command
    reads an input's headers more than once (its series, then one series, then the DICOM output's
    references): the latest scans are kept while the files are unchanged."""
    try:
        key = _scan_key(path)
    except OSError:
        key = None
    if key in _SCANS:
        _SCANS.move_to_end(key)
        return list(_SCANS[key])
    entries = _scan(path)
    if key is not None:
        _SCANS[key] = entries
        while len(_SCANS) > SCANS_KEPT:
            _SCANS.popitem(last=False)
    return list(entries)


def _one_per_instance(entries: list[_Entry], where: str) -> list[_Entry]:
    """The entries without second copies of one instance (the same SOPInstanceUID, which the standard
    gives to one image only: a file copied twice, ``IM1.dcm`` and ``IM1 (1).dcm``), with a warning;
    before, the copies made a position of two slices, and the series was refused."""
    seen: dict[tuple[str, str], str] = {}
    kept, copies = [], []
    for entry in entries:
        uid = str(entry.header.get("SOPInstanceUID", "") or "")
        # and one position: a faulty anonymiser that gives every slice one UID must not lose slices
        key = (uid, str(entry.header.get("ImagePositionPatient", "")))
        if uid and key in seen:
            copies.append(f"{entry.name} (= {seen[key]})")
            continue
        if uid:
            seen[key] = entry.name
        kept.append(entry)
    if copies:
        log.warning("%s: %d file(s) repeat an image already read (the same SOPInstanceUID) and are left out: %s",
                    where, len(copies), ", ".join(copies[:3]) + (f" and {len(copies) - 3} more" if len(copies) > 3 else ""))
    return kept


def _scan(path: Path) -> list[_Entry]:
    entries, skipped, objects = [], [], Counter()
    for name, opener in _iter_sources(path):
        ds = _read_header(name, opener)
        if ds is None or not _is_image(ds):
            skipped.append(name)
            if ds is not None:  # DICOM, but no image: contours, a report, a DICOMDIR...
                objects[str(ds.get("Modality", "") or "") or pydicom.uid.UID(str(ds.get("SOPClassUID", ""))).name] += 1
            continue
        entries.append(_Entry(name=name, header=ds, opener=opener))
    if skipped:
        log.info("ignored %d non-image or non-DICOM file(s) in %s", len(skipped), path.name)
    entries = _one_per_instance(entries, path.name)
    if not entries:
        from . import ITK_SUFFIXES, PAIR_SUFFIXES

        what = "folder" if path.is_dir() else "file"
        images = [n for n in skipped if n.lower().endswith((*PAIR_SUFFIXES, *ITK_SUFFIXES))]
        hint = ""
        if objects:
            listed = ", ".join(f"{kind} ({n})" for kind, n in objects.most_common())
            hint = f"; it holds DICOM objects that are not images: {listed}"
        if images and path.is_dir():
            hint += f"; it holds {len(images)} other image file(s): give one itself, e.g. {path / images[0]}"
        elif images:
            hint += f"; it holds {len(images)} other image file(s) (e.g. {images[0]}): unzip it and give one itself"
        if objects and what == "file" and not zipfile.is_zipfile(path):
            raise InvalidInputError(f"{path.name}: a DICOM {next(iter(objects))} object, not an image")
        raise InvalidInputError(f"{path.name}: no DICOM image found in this {what}{hint}")
    return entries


def _series_info(uid: str, group: list[_Entry]) -> SeriesInfo:
    ds = group[0].header
    number = ds.get("SeriesNumber")
    return SeriesInfo(
        uid=uid,
        number=int(number) if number not in (None, "") else None,
        description=str(ds.get("SeriesDescription", "") or ""),
        modality=str(ds.get("Modality", "OT") or "OT"),
        n_files=len(group),
        localizer="LOCALIZER" in [str(t).upper() for t in (ds.get("ImageType") or [])],
    )


def group_series(entries: list[_Entry]) -> dict[str, list[_Entry]]:
    groups: dict[str, list[_Entry]] = {}
    for e in entries:
        groups.setdefault(str(e.header.SeriesInstanceUID), []).append(e)
    return groups


def list_series(path: Path) -> list[SeriesInfo]:
    """The image series in a DICOM input, ordered by series number."""
    groups = group_series(scan(path))
    infos = [_series_info(uid, g) for uid, g in groups.items()]
    return sorted(infos, key=lambda s: (s.number is None, s.number or 0, s.uid))


def chosen_series(path: Path, series: str | None = None) -> SeriesInfo:
    """The series of a DICOM input that :func:`read_dicom` reads (headers only)."""
    groups = group_series(scan(path))
    uid = _choose_series(groups, series, path.name)
    return _series_info(uid, groups[uid])


SERIES_LISTED = 10  # in a message; `medfuse info` lists them all


def _labels(infos: list[SeriesInfo]) -> str:
    """The series for a message: the first ``SERIES_LISTED``, and how many more."""
    shown = "; ".join(i.label() for i in infos[:SERIES_LISTED])
    more = len(infos) - SERIES_LISTED
    return shown + (f"; and {more} more (`medfuse info` on the input lists them all)" if more > 0 else "")


def study_series_pair(path: Path) -> tuple[str, str]:
    """The series to fuse in one study (a PACS export: the DICOM files of several series side by
    side): its one MR series (FIXED) and its one CT, PET or SPECT series (MOVING), localizers left
    out; otherwise a choice the user must make (exit 2), with the series listed."""
    found = [i for i in list_series(path) if not i.localizer]
    mr = [i for i in found if i.modality == "MR"]
    other = [i for i in found if i.modality in ("CT", "PT", "NM")]
    if len(mr) == 1 and len(other) == 1:
        return mr[0].uid, other[0].uid
    raise ChoiceRequiredError(f"DICOM files of {len(mr)} MR and {len(other)} CT/PET/SPECT series, needs one of each "
                              "(or give --fixed-series and --moving-series): " + _labels(found))


def _choose_series(groups: dict[str, list[_Entry]], series: str | None, name: str) -> str:
    infos = {uid: _series_info(uid, g) for uid, g in groups.items()}
    if series is None:
        if len(groups) == 1:
            return next(iter(groups))
        kept = [uid for uid, i in infos.items() if not i.localizer]
        if len(kept) == 1:  # a localizer (scout) is never the series to fuse
            log.info("%s: left out %d localizer series", name, len(groups) - 1)
            return kept[0]
        listing = _labels(sorted(infos.values(), key=lambda i: (i.number or 0)))
        raise ChoiceRequiredError(f"{name} holds {len(groups)} series; choose one with --series: {listing}")
    wanted = series.strip()
    matches = [u for u, i in infos.items() if wanted in (u, str(i.number), i.description)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ChoiceRequiredError(
            f"{name}: no series matches --series {wanted!r}; found: "
            + _labels(list(infos.values()))
        )
    raise ChoiceRequiredError(f"{name}: --series {wanted!r} matches {len(matches)} series; give the UID")


def _pixels(entry: _Entry) -> tuple[Dataset, np.ndarray]:
    """``entry``'s header (parsed by :func:`scan`) and its pixels; the file is read again for them,
    the elements before the pixels are not parsed again."""
    ds: Dataset | None = None
    try:
        with entry.opener() as fh:  # type: ignore[operator]
            ds = pydicom.dcmread(fh)
        arr = ds.pixel_array
        palette = _is_palette(ds)
        if palette:  # indices into a colour table (colour-mapped PET/NM): the colours are the image
            arr = apply_color_lut(arr, ds)
        colour = _samples(ds) == 3
        bits = 16 if palette else int(ds.get("BitsStored") or 16)  # of a colour channel; palette entries span 0..65535
    except Exception as exc:
        if ds is not None and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise InvalidInputError(f"{entry.name}: an image header without pixel data") from exc
        syntax = ds.file_meta.get("TransferSyntaxUID") if ds is not None and hasattr(ds, "file_meta") else None
        if syntax is not None and syntax.is_transfer_syntax and syntax.is_compressed and "Unable to decode" in str(exc):
            raise InvalidInputError(f"{entry.name}: pixel data compressed as '{syntax.name}', which no installed "
                                    "decoder reads (decompress it, e.g. with gdcmconv --raw)") from exc
        raise InvalidInputError(f"{entry.name}: corrupt or undecodable DICOM pixel data ({exc})") from exc
    return entry.header, colour_8bit(arr, entry.name, bits) if colour else arr


def _samples(ds: Dataset) -> int:
    """Samples per pixel as read: 3 for RGB and for palette colour (its table gives RGB)."""
    return 3 if _is_palette(ds) else int(ds.get("SamplesPerPixel", 1) or 1)


def _is_palette(ds: Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper() == "PALETTE COLOR"


def _float(ds: Dataset, key: str, default: float) -> float:
    value = ds.get(key)
    try:
        return default if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return default


def _vector(ds: Dataset, key: str, n: int, name: str) -> np.ndarray:
    value = ds.get(key)
    try:
        vec = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        vec = np.zeros(0)
    if vec.shape != (n,) or not np.all(np.isfinite(vec)):
        raise InvalidInputError(f"{name}: missing or invalid {key}")
    if key == "PixelSpacing" and not np.all(vec > 0):
        raise InvalidInputError(f"{name}: PixelSpacing {vec.tolist()} is not positive")
    if key == "ImageOrientationPatient" and min(np.linalg.norm(vec[:3]), np.linalg.norm(vec[3:])) < 0.5:
        raise InvalidInputError(f"{name}: ImageOrientationPatient {vec.tolist()} is not two unit vectors")
    return vec


def _multiframe_slices(ds: Dataset, arr: np.ndarray, name: str, colour: bool = False) -> list[Slice]:
    """Split a multi-frame object (enhanced CT/MR/PET, or NM tomo; greyscale or colour) into
    positioned slices."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if arr.ndim == (3 if colour else 2):
        arr = arr[None]
    if arr.shape[0] != n:
        raise InvalidInputError(f"{name}: NumberOfFrames={n} but pixel data holds {arr.shape[0]} frames")
    out = []
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None:
        for i, fg in enumerate(per_frame):
            def item(seq: str, fg: Dataset = fg, i: int = i) -> Dataset:
                if seq in fg:
                    return fg[seq].value[0]
                if seq in shared:
                    return shared[seq].value[0]
                raise InvalidInputError(f"{name}: frame {i} lacks {seq}")

            iop = _vector(item("PlaneOrientationSequence"), "ImageOrientationPatient", 6, name)
            ipp = _vector(item("PlanePositionSequence"), "ImagePositionPatient", 3, name)
            spacing = _vector(item("PixelMeasuresSequence"), "PixelSpacing", 2, name)
            try:
                pvt = item("PixelValueTransformationSequence")
                slope, inter = _float(pvt, "RescaleSlope", 1.0), _float(pvt, "RescaleIntercept", 0.0)
            except InvalidInputError:
                slope, inter = _float(ds, "RescaleSlope", 1.0), _float(ds, "RescaleIntercept", 0.0)
            out.append(Slice(arr[i], iop, ipp, spacing, slope, inter, (i,), i))
        return out
    # NM (SPECT) reconstructed tomo: geometry in DetectorInformationSequence, equal steps.
    det = ds.get("DetectorInformationSequence")
    if det is None:
        raise InvalidInputError(f"{name}: multi-frame DICOM without per-frame geometry is not supported")
    iop = _vector(det[0], "ImageOrientationPatient", 6, name)
    ipp0 = _vector(det[0], "ImagePositionPatient", 3, name)
    spacing = _vector(ds, "PixelSpacing", 2, name)
    step = _float(ds, "SpacingBetweenSlices", _float(ds, "SliceThickness", 0.0))
    if step == 0.0:
        raise InvalidInputError(f"{name}: NM multi-frame without SpacingBetweenSlices")
    normal = np.cross(iop[:3], iop[3:])
    slope, inter = _float(ds, "RescaleSlope", 1.0), _float(ds, "RescaleIntercept", 0.0)
    return [Slice(arr[i], iop, ipp0 + i * step * normal, spacing, slope, inter, (i,), i) for i in range(n)]


def _suv_factor(ds: Dataset, name: str) -> float:
    """Factor from Bq/ml to body-weight SUV (g/ml), or an error naming what is missing."""
    units = str(ds.get("Units", "")).upper()
    if units not in ("BQML",):
        raise InvalidInputError(f"{name}: SUV needs PET in Bq/ml (Units is {units or 'missing'})")
    if str(ds.get("DecayCorrection", "")).upper() not in ("START", "ADMIN"):
        raise InvalidInputError(f"{name}: SUV needs DecayCorrection START or ADMIN")
    weight = _float(ds, "PatientWeight", 0.0)
    rp = ds.get("RadiopharmaceuticalInformationSequence")
    if weight <= 0 or not rp:
        raise InvalidInputError(f"{name}: SUV needs PatientWeight and RadiopharmaceuticalInformationSequence")
    rp = rp[0]
    dose = _float(rp, "RadionuclideTotalDose", 0.0)
    half_life = _float(rp, "RadionuclideHalfLife", 0.0)
    if dose <= 0 or half_life <= 0:
        raise InvalidInputError(f"{name}: SUV needs RadionuclideTotalDose and RadionuclideHalfLife")
    if str(ds.get("DecayCorrection", "")).upper() == "START":
        start = str(rp.get("RadiopharmaceuticalStartTime", "") or "")
        scan_t = str(ds.get("SeriesTime", "") or ds.get("AcquisitionTime", "") or "")
        if not start or not scan_t:
            raise InvalidInputError(f"{name}: SUV needs RadiopharmaceuticalStartTime and SeriesTime")

        def seconds(t: str) -> float:
            t = t.split(".")[0].ljust(6, "0")
            d = datetime.strptime(t[:6], "%H%M%S")
            return d.hour * 3600 + d.minute * 60 + d.second

        delta = seconds(scan_t) - seconds(start)
        if delta < 0:
            delta += 24 * 3600
        dose = dose * 2.0 ** (-delta / half_life)
    return weight * 1000.0 / dose


def read_dicom(
    path: Path,
    series: str | None = None,
    frames: FrameChoice | None = None,
    suv: bool = False,
) -> Image:
    """Read one DICOM series from a folder, zip or file into an :class:`Image` (RAS+)."""
    frames = frames or FrameChoice(offered=False)
    groups = group_series(scan(path))
    uid = _choose_series(groups, series, path.name)
    group = groups[uid]
    first = group[0].header
    if path.is_file() and len(group) == 1 and int(first.get("NumberOfFrames", 1) or 1) == 1 \
            and not zipfile.is_zipfile(path):
        _warn_if_one_of_a_series(path, uid)
    rows, cols = int(first.get("Rows") or 0), int(first.get("Columns") or 0)
    check_voxel_count((rows, cols, len(group) * int(first.get("NumberOfFrames", 1) or 1)), path.name)

    slices: list[Slice] = []
    datasets = []
    samples = {_samples(e.header) for e in group}
    if not samples <= {1} and samples != {3}:
        raise InvalidInputError(f"{path.name}: {samples} samples per pixel (or greyscale mixed with colour); "
                                "medfuse reads greyscale, RGB or palette-colour series")
    colour = samples == {3}
    for entry in group:
        ds, arr = _pixels(entry)
        datasets.append(ds)
        if colour and arr.shape[-1:] != (3,):
            raise InvalidInputError(f"{entry.name}: colour pixel data of shape {arr.shape} is not RGB")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            slices.extend(_multiframe_slices(ds, arr, entry.name, colour))
            continue
        iop = _vector(ds, "ImageOrientationPatient", 6, entry.name)
        ipp = _vector(ds, "ImagePositionPatient", 3, entry.name)
        spacing = _vector(ds, "PixelSpacing", 2, entry.name)
        order = (str(ds.get("AcquisitionTime", "") or ""), int(ds.get("InstanceNumber", 0) or 0))
        slope, inter = _float(ds, "RescaleSlope", 1.0), _float(ds, "RescaleIntercept", 0.0)
        slices.append(Slice(arr, iop, ipp, spacing, slope, inter, order, order[1]))

    suv_factor = _suv_factor(datasets[0], path.name) if suv else None
    thickness = _float(first, "SpacingBetweenSlices", _float(first, "SliceThickness", 1.0)) or 1.0
    if colour:  # RGB (pydicom gives YBR as RGB): each channel stacked as a greyscale series
        stacks = [SliceStack.from_slices([dataclasses.replace(sl, pixels=sl.pixels[..., c], slope=1.0, inter=0.0)
                                          for sl in slices], path.name, frames) for c in range(3)]
        stacked = [stack_slices(st, path.name, thickness) for st in stacks]
        vol = np.clip(np.rint(np.stack([v for v, _, _ in stacked], axis=-1)), 0, 255).astype(np.uint8)
        _, affine_lps, notes = stacked[0]
    else:
        stacks = [SliceStack.from_slices(slices, path.name, frames)]
        vol, affine_lps, notes = stack_slices(stacks[0], path.name, thickness)
    modality_code = str(first.get("Modality", "OT") or "OT")
    try:
        modality = Modality.parse(modality_code)
    except ValueError:
        modality = Modality.OT
    if str(first.get("PhotometricInterpretation", "") or "").strip().upper() == "MONOCHROME1":
        vol, note = _monochrome1(vol, modality)
        notes = [*notes, note]
    for note in notes:
        log.warning("%s: %s", path.name, note)
    units = _units(first)
    if suv_factor is not None:
        vol = (vol.astype(np.float64) * suv_factor).astype(np.float32)
        units = "SUVbw"
    number = first.get("SeriesNumber")
    prov = Provenance(
        source=path.name,
        format="dicom",
        series_uid=uid,
        series_number=int(number) if number not in (None, "") else None,
        series_description=str(first.get("SeriesDescription", "") or "") or None,
        steps=[*notes, *([stacks[0].frames_note] if stacks[0].frames_note else [])],  # the frame: no warning
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "") or "") or None,
    )
    return Image(data=vol, affine=LPS_TO_RAS @ affine_lps, modality=modality, units=units, provenance=prov)


SIBLINGS_LOOKED_AT = 500  # files beside a lone slice whose series is looked up


def _warn_if_one_of_a_series(path: Path, uid: str) -> None:
    """Warn when a single-slice file given alone has files of its series beside it: the user may have
    meant the series (its folder) and would get one slice instead of the volume."""
    mates, siblings = 0, []
    with contextlib.suppress(OSError):  # a folder that cannot be listed
        siblings = sorted(p for p in path.parent.iterdir() if p != path)
    for sibling in siblings[:SIBLINGS_LOOKED_AT]:
        with contextlib.suppress(Exception):  # not DICOM, unreadable, a folder: not of the series
            ds = pydicom.dcmread(sibling, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            mates += str(ds.get("SeriesInstanceUID", "")) == uid
    if mates:
        log.warning("%s is one slice of a series with %d more file(s) beside it; medfuse read this one slice: give "
                    "the folder to read the series", path.name, mates)


def _monochrome1(vol: np.ndarray, modality: Modality) -> tuple[np.ndarray, str]:
    """A MONOCHROME1 series (viewers show its lowest values white) as MONOCHROME2, as ITK reads it:
    inverted within its range, so the anatomy looks as a viewer shows it. Quantities (CT numbers,
    activity: modalities whose DICOM objects never use MONOCHROME1) keep their values."""
    if modality in (Modality.CT, Modality.PT, Modality.NM):
        return vol, f"MONOCHROME1 ignored: a {modality.value} series' values are quantities, kept as stored"
    wide = vol.astype(np.int64 if vol.dtype.kind in "iu" else np.float64)  # the sum of the extremes may overflow
    inverted = (wide.max() + wide.min()) - wide  # within [min, max] again, so back in the stored type
    return inverted.astype(vol.dtype), "MONOCHROME1 (lowest values shown white): inverted, as viewers show it"


def _units(ds: Dataset) -> str | None:
    modality = str(ds.get("Modality", ""))
    if modality == "CT":
        return "HU"
    if modality in ("PT", "NM"):
        return str(ds.get("Units", "") or "") or None
    return None
