"""A fused volume as a new derived DICOM series, one Secondary Capture image per slice (highdicom).

Every file is a highdicom ``SCImage`` (its required modules checked by highdicom) with FIXED's
geometry added: Image Position / Orientation (Patient), Pixel Spacing, Slice Thickness and the
Frame of Reference, so viewers, SimpleITK and ``medfuse convert`` place it exactly on FIXED. New
SeriesInstanceUID and SOPInstanceUIDs; FIXED's StudyInstanceUID, FrameOfReferenceUID and patient
and study attributes when FIXED is a DICOM series (new ones otherwise); ImageType
DERIVED\\SECONDARY, a DerivationDescription, FIXED's and MOVING's series referenced, content
qualification RESEARCH. Grey results are 12-bit (the fused values mapped linearly from their range
to 0..4095, a window over their 0.5-99.5th percentiles); colour results are RGB.

``anonymize``: no patient name, ID, birth date or sex, no study date, time, ID, accession number or
referring physician; new Study and Frame of Reference UIDs; PatientIdentityRemoved YES.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OutputError, os_reason
from ..image import Image

log = logging.getLogger(__name__)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x; +y, -y; +z, -z in LPS
SERIES_FILE = re.compile(r"IM\d{5,}\.dcm")  # the files of a series medfuse writes


@dataclass(frozen=True)
class DicomContext:
    """What a DICOM series needs beyond the image: its sources, the method, privacy."""

    fixed: Path | None = None  # FIXED's DICOM input (folder, zip or file), for patient and study
    fixed_series: str | None = None  # FIXED's SeriesInstanceUID
    moving: Path | None = None  # MOVING's DICOM input, when it is one (its instances are referenced)
    moving_series: str | None = None  # MOVING's SeriesInstanceUID
    description: str = "medfuse fusion"
    anonymize: bool = False


def _series_headers(path: Path | None, series: str | None) -> list:
    """The headers of every file of one series of a DICOM input (none when it is not DICOM)."""
    if path is None:
        return []
    from .dicom import group_series, scan

    groups = group_series(scan(path))
    entries = groups.get(series or "") or next(iter(groups.values()), [])
    return [e.header for e in entries]


def _referenced_series(headers: list):
    """A Referenced Series item: the series UID and every SOP instance of it."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.SeriesInstanceUID = str(headers[0].SeriesInstanceUID)
    refs = []
    for h in headers:
        ref = Dataset()
        ref.ReferencedSOPClassUID = str(h.SOPClassUID)
        ref.ReferencedSOPInstanceUID = str(h.SOPInstanceUID)
        refs.append(ref)
    item.ReferencedInstanceSequence = Sequence(refs)
    return item


def _orientation_letters(v: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(v)))
    return _LETTERS[axis][0 if v[axis] > 0 else 1]


def _grey_to_12bit(data: np.ndarray, name: str) -> tuple[np.ndarray, float, float]:
    """``data`` scaled linearly from its finite range to 0..4095, and a window for it; NaN is
    written as the lowest value and +-inf as the ends (they used to blank the whole series)."""
    finite = np.isfinite(data)
    lo, hi = (float(data[finite].min()), float(data[finite].max())) if finite.any() else (0.0, 0.0)
    if not finite.all():
        log.warning("%s: %d NaN/inf voxels written as the lowest value (NaN) or the range's ends (inf)",
                    name, int(data.size - np.count_nonzero(finite)))
    clean = np.nan_to_num(data.astype(np.float64), nan=lo, posinf=hi, neginf=lo)
    scale = 4095.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip(np.rint((clean - lo) * scale), 0, 4095).astype(np.uint16)
    p_lo, p_hi = np.percentile(out, (0.5, 99.5))
    width = max(float(p_hi - p_lo), 1.0)
    return out, float(p_lo) + width / 2, width


def check_replaceable(folder: Path) -> None:
    """``--overwrite`` replaces a folder only when it holds nothing but a series medfuse wrote
    (``IM#####.dcm`` files): never a folder of the user's other files."""
    if not folder.is_dir():
        return
    others = [p.name for p in folder.iterdir() if not (p.is_file() and SERIES_FILE.fullmatch(p.name))]
    if others:
        raise OutputError(f"output {folder} is a folder holding other files ({', '.join(sorted(others)[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); --overwrite replaces only a DICOM series medfuse "
                          "wrote: give a new folder name")


def write_dicom_series(image: Image, folder: Path, ctx: DicomContext, overwrite: bool = False) -> None:
    """Write ``image`` as a new series of single-frame files in ``folder``, atomically (a temporary
    folder renamed into place)."""
    from highdicom import UID
    from highdicom.sc import SCImage as _sc_image
    from pydicom.sequence import Sequence

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise OutputError(f"output {folder} exists; use --overwrite to replace it")
    check_replaceable(folder)
    fixed_headers = _series_headers(ctx.fixed, ctx.fixed_series)
    ref = fixed_headers[0] if fixed_headers else None
    keep = ref is not None and not ctx.anonymize
    study_uid = str(ref.StudyInstanceUID) if keep and "StudyInstanceUID" in ref else UID()
    frame_uid = str(ref.FrameOfReferenceUID) if keep and "FrameOfReferenceUID" in ref else UID()
    series_uid = UID()
    patient = {}
    if keep:
        patient = {
            "patient_name": ref.get("PatientName"), "patient_id": ref.get("PatientID"),
            "patient_birth_date": ref.get("PatientBirthDate") or None, "patient_sex": ref.get("PatientSex") if ref.get("PatientSex") in ("M", "F", "O") else None,
            "accession_number": ref.get("AccessionNumber"), "study_id": ref.get("StudyID"),
            "study_date": ref.get("StudyDate") or None, "study_time": ref.get("StudyTime") or None,
            "referring_physician_name": ref.get("ReferringPhysicianName"),
        }
    elif ctx.anonymize:
        patient = {"patient_name": "ANONYMOUS", "patient_id": "ANONYMOUS"}

    lin = image.affine[:3, :3]
    axes = [LPS_FROM_RAS @ lin[:, i] for i in range(3)]
    spacing = [float(np.linalg.norm(a)) for a in axes]
    row_dir, col_dir = axes[0] / spacing[0], axes[1] / spacing[1]  # along a row (columns grow), down a column
    colour = image.is_color
    if colour:
        pixels = np.clip(np.rint(image.data), 0, 255).astype(np.uint8)
        centre, width = 127.5, 256.0
    else:
        pixels, centre, width = _grey_to_12bit(image.data, folder.name)
    sources = [h for h in (fixed_headers, _series_headers(ctx.moving, ctx.moving_series)) if h]

    parent = folder.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=parent))
    try:
        for k in range(image.shape[2]):
            sl = pixels[:, :, k].transpose(1, 0, 2) if colour else pixels[:, :, k].T
            with warnings.catch_warnings():  # highdicom's name-format warnings would print the patient's name
                warnings.simplefilter("ignore")
                sc = _sc_image(
                    pixel_array=np.ascontiguousarray(sl), photometric_interpretation="RGB" if colour else "MONOCHROME2",
                    bits_allocated=8 if colour else 16, coordinate_system="PATIENT", study_instance_uid=study_uid,
                    series_instance_uid=series_uid, series_number=9000 + int(ref.get("SeriesNumber", 0) or 0) if keep else 9000,
                    sop_instance_uid=UID(), instance_number=k + 1, manufacturer="medfuse",
                    pixel_spacing=(spacing[1], spacing[0]),
                    patient_orientation=(_orientation_letters(row_dir), _orientation_letters(col_dir)),
                    **patient,
                )
            if not colour:
                sc.BitsStored, sc.HighBit = 12, 11
                sc.WindowCenter, sc.WindowWidth = f"{centre:.1f}", f"{width:.1f}"
            sc.ImageType = ["DERIVED", "SECONDARY"]
            sc.DerivationDescription = ctx.description[:1024]
            sc.SeriesDescription = "medfuse fused"
            sc.ContentQualification = "RESEARCH"
            sc.BurnedInAnnotation = "NO"
            sc.FrameOfReferenceUID = frame_uid
            sc.PositionReferenceIndicator = ""
            sc.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
            ipp = LPS_FROM_RAS @ (image.affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
            sc.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
            sc.SliceThickness = f"{spacing[2]:.6f}"
            sc.Laterality = ""  # type 2C; empty: not known from the sources
            if ref is not None and ref.get("PatientPosition"):  # e.g. HFS, as converters expect it
                sc.PatientPosition = str(ref.PatientPosition)
            if sources:  # derived from every instance of the source series
                series_items = [_referenced_series(h) for h in sources]
                sc.ReferencedSeriesSequence = Sequence(series_items)
                sc.SourceImageSequence = Sequence([r for item in series_items for r in item.ReferencedInstanceSequence])
            if ctx.anonymize:
                sc.PatientIdentityRemoved = "YES"
                sc.DeidentificationMethod = "medfuse --anonymize: identity removed, new study UIDs"
            sc.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)  # SERIES_FILE
        old = None
        if folder.exists():
            old = parent / f".{folder.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise OutputError(f"cannot write {folder}: {os_reason(exc)}") from exc
    except ValueError as exc:  # highdicom refuses an attribute copied from FIXED
        raise OutputError(f"cannot write {folder} as DICOM: {str(exc).splitlines()[0]}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
